"""ICMP and ICMPv6 messages: the `icmp` table.

Rows: one per echo exchange (an echo request and the reply with the same identifier and
sequence number in the same session: one row at the request's time, with `rtt`,
`replied` and the reply's length; a request never answered is a row with `replied` false,
a reply with no request seen is a row of its own), and one row per other message
(unreachable, time exceeded, redirect, neighbour discovery, router advertisements, ...).

Per row: type and code with their names, the payload's length and Shannon entropy
(bits/byte: a ping's fixed pattern sits near 3-4, tunnelled or encrypted data near 8),
echo identifier/sequence, and for error messages (unreachable, time exceeded, parameter
problem, redirect, packet too big, source quench) the packet they quote: its protocol and
5-tuple as it was sent (`inner_orig_*` is the quoted packet's source, so the error points at
the session whose originator sent it; a NAT or a spoofed error may point elsewhere), plus
the MTU of "fragmentation needed"/"packet too big", the gateway of a redirect and the
target of a neighbour solicitation/advertisement.

How the stage feeds it (ICMP is not UDP: see `new_session`): per session, `new_session(d)`
on its first ICMP packet, `state.add(d)` per packet (rows come back for finished
exchanges and other messages), `state.close()` when the session closes (unanswered
requests). `d` is a `base.Datagram` whose `payload` is the whole ICMP message from its
type byte (header included, not the stage's usual L4 payload, which starts 8 bytes in),
`truncated` set when the capture cut it. `parse_message(msg, v6)` reads one message.

Nothing raises: a message too short for its type sets `malformed`.
"""

from __future__ import annotations

import ipaddress
import math
import struct

import numpy as np
import pyarrow as pa

from wiretrail.app.base import Datagram

TABLE = "icmp"
SCHEMA = pa.schema([
    ("ts", pa.timestamp("ns")),
    ("uid", pa.string()),
    ("orig_h", pa.string()),
    ("orig_p", pa.int32()),            # the session's: ICMP type as Zeek keys ICMP sessions
    ("resp_h", pa.string()),
    ("resp_p", pa.int32()),            # the session's: ICMP code (or the counterpart type)
    ("src_h", pa.string()),            # the sender of this message (of the request, for an exchange)
    ("dst_h", pa.string()),
    ("version", pa.int8()),            # 4: ICMP, 6: ICMPv6
    ("itype", pa.int16()),
    ("icode", pa.int16()),
    ("itype_name", pa.string()),
    ("icode_name", pa.string()),
    ("payload_len", pa.int32()),       # bytes after the 8-byte header (echo data, quoted packet, ...)
    ("payload_entropy", pa.float32()), # Shannon entropy of those bytes, bits per byte
    ("echo_id", pa.int32()),
    ("echo_seq", pa.int32()),
    ("replied", pa.bool_()),           # echo requests: was the reply seen
    ("rtt", pa.duration("ns")),
    ("reply_len", pa.int32()),         # echo reply data length
    ("reply_differs", pa.bool_()),     # echo reply data not equal to the request's
    ("inner_proto", pa.string()),      # tcp, udp, icmp, icmp6, or the protocol number
    ("inner_orig_h", pa.string()),     # the quoted packet's source ...
    ("inner_orig_p", pa.int32()),      # ... port (ICMP: type)
    ("inner_resp_h", pa.string()),     # ... destination
    ("inner_resp_p", pa.int32()),      # ... port (ICMP: code)
    ("inner_ttl", pa.int16()),
    ("mtu", pa.int32()),               # fragmentation needed / packet too big
    ("gateway", pa.string()),          # redirect: the better first hop
    ("target", pa.string()),           # neighbour solicitation/advertisement, redirect target (v6)
    ("truncated", pa.bool_()),
    ("malformed", pa.bool_()),
])
PORTS: set[int] = set()               # ICMP has no ports: the stage selects by IP protocol 1 and 58
NDPI = {"ICMP", "ICMPV6"}
IP_PROTOS = {1, 58}

TYPES4 = {0: "echo_reply", 3: "dest_unreachable", 4: "source_quench", 5: "redirect", 8: "echo_request",
          9: "router_advertisement", 10: "router_solicitation", 11: "time_exceeded", 12: "parameter_problem",
          13: "timestamp_request", 14: "timestamp_reply", 15: "info_request", 16: "info_reply",
          17: "address_mask_request", 18: "address_mask_reply", 30: "traceroute", 40: "photuris",
          42: "extended_echo_request", 43: "extended_echo_reply"}
TYPES6 = {1: "dest_unreachable", 2: "packet_too_big", 3: "time_exceeded", 4: "parameter_problem",
          128: "echo_request", 129: "echo_reply", 130: "mld_query", 131: "mld_report", 132: "mld_done",
          133: "router_solicitation", 134: "router_advertisement", 135: "neighbor_solicitation",
          136: "neighbor_advertisement", 137: "redirect", 138: "router_renumbering",
          139: "node_information_query", 140: "node_information_response", 141: "inverse_nd_solicitation",
          142: "inverse_nd_advertisement", 143: "mldv2_report", 144: "home_agent_discovery_request",
          145: "home_agent_discovery_reply", 146: "mobile_prefix_solicitation",
          147: "mobile_prefix_advertisement", 151: "multicast_router_advertisement",
          152: "multicast_router_solicitation", 153: "multicast_router_termination", 155: "rpl_control",
          160: "extended_echo_request", 161: "extended_echo_reply"}
CODES4 = {
    3: ["net_unreachable", "host_unreachable", "protocol_unreachable", "port_unreachable",
        "fragmentation_needed", "source_route_failed", "dest_network_unknown", "dest_host_unknown",
        "source_host_isolated", "network_admin_prohibited", "host_admin_prohibited", "network_unreachable_tos",
        "host_unreachable_tos", "communication_admin_prohibited", "host_precedence_violation",
        "precedence_cutoff"],
    5: ["redirect_network", "redirect_host", "redirect_tos_network", "redirect_tos_host"],
    11: ["ttl_exceeded", "fragment_reassembly_exceeded"],
    12: ["pointer_indicates_error", "missing_option", "bad_length"],
}
CODES6 = {
    1: ["no_route", "admin_prohibited", "beyond_scope", "address_unreachable", "port_unreachable",
        "source_policy_failed", "reject_route", "source_routing_header_error"],
    3: ["hop_limit_exceeded", "fragment_reassembly_exceeded"],
    4: ["erroneous_header_field", "unrecognized_next_header", "unrecognized_ipv6_option"],
}
ERRORS4 = {3, 4, 5, 11, 12}
ERRORS6 = {1, 2, 3, 4}
ECHO4 = (8, 0)
ECHO6 = (128, 129)
PROTO_NAMES = {1: "icmp", 6: "tcp", 17: "udp", 58: "icmp6", 132: "sctp", 47: "gre", 50: "esp"}
MAX_PENDING = 4096


def entropy(b: bytes) -> float | None:
    if not b:
        return None
    counts = np.bincount(np.frombuffer(b, dtype=np.uint8), minlength=256)
    p = counts[counts > 0] / len(b)
    return float(-(p * np.log2(p)).sum())


def _quoted(q: bytes, out: dict) -> None:
    """The IP packet quoted by an error message: its protocol and 5-tuple."""
    if not q:
        return
    v = q[0] >> 4
    if v == 4 and len(q) >= 20:
        ihl = (q[0] & 0x0F) * 4
        proto = q[9]
        out["inner_ttl"] = q[8]
        out["inner_orig_h"] = str(ipaddress.IPv4Address(q[12:16]))
        out["inner_resp_h"] = str(ipaddress.IPv4Address(q[16:20]))
        l4 = q[ihl:] if ihl >= 20 else b""
        frag_off = struct.unpack_from(">H", q, 6)[0] & 0x1FFF
        if frag_off:
            l4 = b""  # a later fragment quotes no transport header
    elif v == 6 and len(q) >= 40:
        proto = q[6]
        out["inner_ttl"] = q[7]
        out["inner_orig_h"] = ipaddress.IPv6Address(q[8:24]).compressed
        out["inner_resp_h"] = ipaddress.IPv6Address(q[24:40]).compressed
        p = 40
        # walk extension headers (hop-by-hop, routing, destination options; fragment)
        for _ in range(8):
            if proto in (0, 43, 60) and p + 2 <= len(q):
                nxt, ln = q[p], (q[p + 1] + 1) * 8
                proto, p = nxt, p + ln
            elif proto == 44 and p + 8 <= len(q):
                nxt, off = q[p], struct.unpack_from(">H", q, p + 2)[0] >> 3
                proto, p = nxt, p + 8
                if off:
                    p = len(q) + 1
            else:
                break
        l4 = q[p:] if p <= len(q) else b""
    else:
        out["malformed"] = True
        return
    out["inner_proto"] = PROTO_NAMES.get(proto, str(proto))
    if proto in (6, 17, 132) and len(l4) >= 4:
        out["inner_orig_p"], out["inner_resp_p"] = struct.unpack_from(">HH", l4)
    elif proto in (1, 58) and len(l4) >= 2:
        out["inner_orig_p"], out["inner_resp_p"] = l4[0], l4[1]


def parse_message(msg: bytes, v6: bool) -> dict:
    """One ICMP (v6: ICMPv6) message from its type byte."""
    try:
        return _parse(msg, v6)
    except Exception:  # defensive: never raise
        return {"version": 6 if v6 else 4, "malformed": True}


def _parse(msg: bytes, v6: bool) -> dict:
    out: dict = {"version": 6 if v6 else 4, "malformed": False}
    if len(msg) < 4:
        out["malformed"] = True
        if msg:
            out["itype"] = msg[0]
        return out
    t, c = msg[0], msg[1]
    types, codes = (TYPES6, CODES6) if v6 else (TYPES4, CODES4)
    out["itype"], out["icode"] = t, c
    out["itype_name"] = types.get(t, f"type_{t}")
    cn = codes.get(t)
    out["icode_name"] = cn[c] if cn and c < len(cn) else (None if not cn and c == 0 else f"code_{c}")
    body = msg[8:]
    out["payload_len"] = len(body)
    out["payload_entropy"] = entropy(body)
    if len(msg) < 8:
        out["malformed"] = True
        return out
    echo = ECHO6 if v6 else ECHO4
    if t in echo or (not v6 and t in (13, 14, 15, 16, 17, 18)) or (v6 and t in (160, 161)) or \
            (not v6 and t in (42, 43)):
        out["echo_id"], out["echo_seq"] = struct.unpack_from(">HH", msg, 4)
        return out
    if (v6 and t in ERRORS6) or (not v6 and t in ERRORS4):
        if not v6 and t == 3 and c == 4:
            out["mtu"] = struct.unpack_from(">H", msg, 6)[0] or None
        elif v6 and t == 2:
            out["mtu"] = struct.unpack_from(">I", msg, 4)[0]
        elif not v6 and t == 5:
            out["gateway"] = str(ipaddress.IPv4Address(msg[4:8]))
        _quoted(body, out)
        return out
    if v6 and t in (135, 136) and len(msg) >= 24:
        out["target"] = ipaddress.IPv6Address(msg[8:24]).compressed
    elif v6 and t == 137:
        if len(msg) >= 40:
            out["target"] = ipaddress.IPv6Address(msg[8:24]).compressed
            out["gateway"] = out["target"]
            # the redirected header option (type 4) quotes the packet
            p = 40
            while p + 8 <= len(msg):
                ot, ol = msg[p], msg[p + 1] * 8
                if ol == 0:
                    out["malformed"] = True
                    break
                if ot == 4:
                    _quoted(msg[p + 8:p + ol], out)
                    break
                p += ol
        else:
            out["malformed"] = True
    return out


class IcmpSession:
    """Per-session state: echo requests wait here for their replies."""

    def __init__(self, d: Datagram):
        self.v6 = ":" in d.orig_h
        self.pending: dict[tuple, dict] = {}

    def add(self, d: Datagram) -> list[dict]:
        try:
            return self._add(d)
        except Exception:
            return [{"ts": d.ts, "malformed": True}]

    def _add(self, d: Datagram) -> list[dict]:
        row = parse_message(d.payload, self.v6)
        row["ts"] = d.ts
        src, dst = (d.orig_h, d.resp_h) if d.from_orig else (d.resp_h, d.orig_h)
        row["src_h"], row["dst_h"] = src, dst
        row["truncated"] = bool(d.truncated)
        t = row.get("itype")
        req, rep = ECHO6 if self.v6 else ECHO4
        if t == req and not row["malformed"]:
            key = (src, dst, row["echo_id"], row["echo_seq"])
            out = []
            old = self.pending.pop(key, None)
            if old is not None:  # a repeated request: the first stays unanswered
                out.append(old)
            row["replied"] = False
            row["_data"] = d.payload[8:]
            self.pending[key] = row
            if len(self.pending) > MAX_PENDING:
                out.append(self.pending.pop(next(iter(self.pending))))
            return _clean(out)
        if t == rep and not row["malformed"]:
            q = self.pending.pop((dst, src, row["echo_id"], row["echo_seq"]), None)
            if q is not None:
                q["replied"] = True
                q["rtt"] = max(0, d.ts - q["ts"])
                q["reply_len"] = row["payload_len"]
                q["reply_differs"] = d.payload[8:] != q["_data"] if not d.truncated else None
                return _clean([q])
        return [row]

    def close(self) -> list[dict]:
        out = list(self.pending.values())
        self.pending.clear()
        return _clean(out)


def _clean(rows: list[dict]) -> list[dict]:
    for r in rows:
        r.pop("_data", None)
        if r.get("payload_entropy") is not None and math.isnan(r["payload_entropy"]):
            r["payload_entropy"] = None
    return rows


def new_session(d: Datagram) -> IcmpSession:
    return IcmpSession(d)
