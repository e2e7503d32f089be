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

from wiretrail import arrow_compute as ac
from wiretrail.app import icmp_kernel as K
from wiretrail.app.base import Datagram, Records
from wiretrail.app.icmp_kernel import (I_ECHO_ID, I_ECHO_SEQ, I_ENTROPY, I_FROM_ORIG, I_GATEWAY,
                                       I_GATEWAY_IS_TARGET, I_INNER_V6, I_IO_HI, I_IO_LO, I_IO_P, I_IR_HI,
                                       I_IR_LO, I_IR_P, I_MALFORMED, I_MTU, I_PLEN, I_PROTO, I_SID,
                                       I_TARGET, I_TARGET_HI, I_TARGET_LO, I_TRUNCATED, I_TS, I_TTL,
                                       I_TYPE, I_CODE, I_V6, I_FIELDS)

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
            row["replied"] = False
            row["_data"] = d.payload[8:]
            return _clean(echo_request(self.pending, (src, dst, row["echo_id"], row["echo_seq"]), row))
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


def echo_request(pending: dict, key, request) -> list:
    """An echo request into its session's `pending` ones (by key: sender, receiver, identifier,
    sequence number; oldest first): returns the requests it puts out unanswered, the one it
    repeats and the oldest when too many wait. (IcmpSession's rule; the batch path's too.)"""
    out = []
    old = pending.pop(key, None)
    if old is not None:  # a repeated request: the first stays unanswered
        out.append(old)
    pending[key] = request
    if len(pending) > MAX_PENDING:
        out.append(pending.pop(next(iter(pending))))
    return out


# ---- the stage's batch path: a batch's messages to rows, as columns -------------------------
#
# add_datagrams reads every message of a batch with one kernel call (icmp_kernel.parse_icmp:
# parse_message's fields as numbers, addresses as their 128-bit values) and the payloads'
# entropies with numpy, pairs echo requests and replies per session with echo_request (Python
# per echo message only), and keeps the rows, as numbers of their messages, in the one IcmpBook
# until their sessions close; close_sessions builds the closing sessions' rows in one go
# (`_rows`), addresses and names made a column at a time.

# a row waiting for its session to close: its session, message, kind, and an answered request's reply
D_SID, D_MSG, D_KIND, D_RTT, D_REPLY_LEN, D_DIFFERS = range(6)
DK_MESSAGE, DK_REQUEST, DK_ANSWERED = range(3)  # a message's own row; an echo request unanswered, answered


def _entropies(data: np.ndarray, start: np.ndarray, length: np.ndarray) -> np.ndarray:
    """`entropy` of each data[start[i]:start[i] + length[i]] (length >= 1), the same float64s:
    the same frequencies and terms (numpy's log2), added up as numpy's sum adds them."""
    if len(start) == 0:
        return np.zeros(0)
    p, first, count = K.byte_frequencies(data, start, length)
    return -K.sum_terms(p * np.log2(p), first, count)


def _type_name(code: int) -> str:
    v6, t = code >> 8, code & 0xFF
    return (TYPES6 if v6 else TYPES4).get(t, f"type_{t}")


def _code_name(code: int) -> str | None:
    v6, t, c = code >> 16, (code >> 8) & 0xFF, code & 0xFF
    cn = (CODES6 if v6 else CODES4).get(t)
    return cn[c] if cn and c < len(cn) else (None if not cn and c == 0 else f"code_{c}")


class _Names:
    """name(code) for arrays of codes, each name made once (module-wide: names are fixed)."""

    def __init__(self, name, size: int):
        self.name = name
        self.index = np.full(size, -1, dtype=np.int64)
        self.names: list = []
        self.array = pa.array([], pa.string())

    def of(self, codes: np.ndarray, valid: np.ndarray) -> pa.Array:
        codes = np.where(valid, codes, 0)
        at = self.index[codes]
        new = (at < 0) & valid
        if new.any():
            for code in np.unique(codes[new]).tolist():
                self.index[code] = len(self.names)
                self.names.append(self.name(code))
            self.array = pa.array(self.names, pa.string())
            at = self.index[codes]
        if not valid.any():
            return pa.nulls(len(codes), pa.string())
        return ac.take(self.array, pa.array(np.where(valid, at, 0), pa.int64(), mask=~valid))


_TYPE_NAMES = _Names(_type_name, 1 << 9)
_CODE_NAMES = _Names(_code_name, 1 << 17)
_PROTO_NAMES = _Names(lambda p: PROTO_NAMES.get(p, str(p)), 256)


def _numbers(v: np.ndarray, valid: np.ndarray, type: pa.DataType) -> pa.Array:
    if pa.types.is_timestamp(type) or pa.types.is_duration(type):
        return pa.array(np.where(valid, v, 0), pa.int64(), mask=~valid).view(type)
    return pa.array(np.where(valid, v, 0).astype(type.to_pandas_dtype()), type, mask=~valid)


def _addresses(hi: np.ndarray, lo: np.ndarray, v4: np.ndarray, valid: np.ndarray) -> pa.Array:
    from wiretrail.sessions.flowtable import addr_texts

    if not valid.any():
        return pa.nulls(len(hi), pa.string())
    at = np.flatnonzero(valid)
    texts = addr_texts(hi[at].view(np.uint64), lo[at].view(np.uint64), v4[at])
    where = np.full(len(hi), 0, dtype=np.int64)
    where[at] = np.arange(len(at))
    return ac.take(texts, pa.array(where, mask=~valid))


COMPACT_AFTER = 4096  # messages of closed sessions the book keeps at most (unless as many live ones)


class IcmpBook:
    """The batch path's state of every ICMP session at once: in the stage's `states` each ICMP
    session's value is this one object. Per session its addresses (`hosts`: orig_h, resp_h) and
    echo requests waiting (`pending`: {(sender, receiver, identifier, sequence): (message,
    its data)}); the messages of the open sessions (`num`, I_* columns) and their rows so far
    (`done`, D_* columns, in the order IcmpSession returns them)."""

    def __init__(self):
        self.hosts: dict[int, tuple[str, str]] = {}
        self.messages: dict[int, int] = {}  # sid -> its messages in `num`
        self.pending: dict[int, dict] = {}
        self.num = np.zeros((1024, I_FIELDS), dtype=np.int64)
        self.n = 0       # messages in `num`
        self.dead = 0    # ... of closed sessions
        self.done = np.zeros((0, 6), dtype=np.int64)

    def append(self, num: np.ndarray) -> int:
        """Messages in; returns the number of the first."""
        if self.n + len(num) > len(self.num):
            bigger = np.zeros((2 * (self.n + len(num)), I_FIELDS), dtype=np.int64)
            bigger[:self.n] = self.num[:self.n]
            self.num = bigger
        self.num[self.n:self.n + len(num)] = num
        self.n += len(num)
        return self.n - len(num)

    def close(self, sids: np.ndarray) -> Records | list:
        """The rows of the sessions `sids`: those made so far, then the requests still waiting
        (IcmpSession.close); and the sessions forgotten."""
        sid_list = sids.tolist()
        sorted_sids = np.sort(sids)
        done = sorted_sids[np.minimum(np.searchsorted(sorted_sids, self.done[:, D_SID]), len(sids) - 1)] == \
            self.done[:, D_SID]
        rows = [self.done[done]]
        for s in sid_list:
            pending = self.pending.pop(s, None)
            if pending:
                rows.append(np.array([[s, m, DK_REQUEST, 0, 0, 0] for m, _ in pending.values()], dtype=np.int64))
        rows = np.concatenate(rows)
        self.done = self.done[~done]
        try:
            return self._rows(rows) if len(rows) else []
        finally:  # the sessions are forgotten even when making their rows failed (a bug): no leak
            for s in sid_list:
                self.hosts.pop(s, None)
                self.dead += self.messages.pop(s, 0)
            if self.dead > max(self.n - self.dead, COMPACT_AFTER):
                self.compact()

    def compact(self) -> None:
        """The messages of closed sessions dropped, the others renumbered."""
        live = np.isin(self.num[:self.n, I_SID], np.fromiter(self.hosts, dtype=np.int64, count=len(self.hosts)))
        renumber = np.cumsum(live) - 1
        num = self.num[:self.n][live]
        self.num = np.zeros((max(1024, 2 * len(num)), I_FIELDS), dtype=np.int64)
        self.n = self.dead = 0
        self.append(num)
        self.done[:, D_MSG] = renumber[self.done[:, D_MSG]]
        for pending in self.pending.values():
            for key, (m, data) in pending.items():
                pending[key] = (int(renumber[m]), data)

    def _rows(self, rows: np.ndarray) -> Records:
        msg = self.num[rows[:, D_MSG]]
        kind = rows[:, D_KIND]
        n = len(rows)
        yes = np.ones(n, dtype=bool)
        from_orig = msg[:, I_FROM_ORIG] == 1
        # the sender and receiver: the session's hosts (per session), the message's way round
        sessions, at = np.unique(rows[:, D_SID], return_inverse=True)
        hosts = [self.hosts[s] for s in sessions.tolist()]
        orig = ac.take(pa.array([h[0] for h in hosts], pa.string()), pa.array(at.reshape(-1)))
        resp = ac.take(pa.array([h[1] for h in hosts], pa.string()), pa.array(at.reshape(-1)))
        sent_by_orig = pa.array(from_orig)
        v6 = msg[:, I_V6] == 1
        typ, code = msg[:, I_TYPE], msg[:, I_CODE]
        plen = msg[:, I_PLEN]
        echo = msg[:, I_ECHO_ID] >= 0
        request = kind != DK_MESSAGE
        answered = kind == DK_ANSWERED
        proto = msg[:, I_PROTO]
        inner = proto >= 0
        inner_v4 = msg[:, I_INNER_V6] == 0
        gateway4 = msg[:, I_GATEWAY] >= 0
        target = msg[:, I_TARGET] == 1
        gateway = gateway4 | (msg[:, I_GATEWAY_IS_TARGET] == 1)
        entropy = msg[:, I_ENTROPY].view(np.float64).astype(np.float32)
        cols = {
            "ts": pa.array(msg[:, I_TS]).view(pa.timestamp("ns")),
            "src_h": ac.if_else(sent_by_orig, orig, resp),
            "dst_h": ac.if_else(sent_by_orig, resp, orig),
            "version": pa.array(np.where(v6, 6, 4).astype(np.int8)),
            "itype": _numbers(typ, typ >= 0, pa.int16()),
            "icode": _numbers(code, code >= 0, pa.int16()),
            "itype_name": _TYPE_NAMES.of((msg[:, I_V6] << 8) | typ, code >= 0),
            "icode_name": _CODE_NAMES.of((msg[:, I_V6] << 16) | (typ << 8) | code, code >= 0),
            "payload_len": _numbers(plen, plen >= 0, pa.int32()),
            "payload_entropy": pa.array(entropy, mask=plen <= 0),
            "echo_id": _numbers(msg[:, I_ECHO_ID], echo, pa.int32()),
            "echo_seq": _numbers(msg[:, I_ECHO_SEQ], echo, pa.int32()),
            "replied": pa.array(answered, mask=~request),
            "rtt": _numbers(rows[:, D_RTT], answered, pa.duration("ns")),
            "reply_len": _numbers(rows[:, D_REPLY_LEN], answered, pa.int32()),
            "reply_differs": pa.array(rows[:, D_DIFFERS] == 1, mask=~answered | (rows[:, D_DIFFERS] < 0)),
            "inner_proto": _PROTO_NAMES.of(proto, inner),
            "inner_orig_h": _addresses(msg[:, I_IO_HI], msg[:, I_IO_LO], inner_v4, inner),
            "inner_orig_p": _numbers(msg[:, I_IO_P], msg[:, I_IO_P] >= 0, pa.int32()),
            "inner_resp_h": _addresses(msg[:, I_IR_HI], msg[:, I_IR_LO], inner_v4, inner),
            "inner_resp_p": _numbers(msg[:, I_IR_P], msg[:, I_IR_P] >= 0, pa.int32()),
            "inner_ttl": _numbers(msg[:, I_TTL], inner, pa.int16()),
            "mtu": _numbers(msg[:, I_MTU], msg[:, I_MTU] >= 0, pa.int32()),
            "gateway": _addresses(np.where(gateway4, 0, msg[:, I_TARGET_HI]),
                                  np.where(gateway4, msg[:, I_GATEWAY], msg[:, I_TARGET_LO]), gateway4, gateway),
            "target": _addresses(msg[:, I_TARGET_HI], msg[:, I_TARGET_LO], ~yes, target),
            "truncated": pa.array(msg[:, I_TRUNCATED] == 1),
            "malformed": pa.array(msg[:, I_MALFORMED] == 1),
        }
        return Records(pa.table(cols), rows[:, D_SID].copy())


def _book_of(states: dict) -> IcmpBook:
    book = next(iter(states.values()), None)
    return book if isinstance(book, IcmpBook) else IcmpBook()


def add_datagrams(states: dict, b) -> tuple[list, int]:
    """The stage's batch entry point: a batch's ICMP messages (from their type byte, as
    new_session's datagrams have them), each made and paired as IcmpSession.add would (see the
    section's comment); their rows come from close_sessions. `states` is this module's {sid:
    state}, where every ICMP session's state is the one IcmpBook. Returns ([], 0)."""
    m = len(b.sid)
    if m == 0:
        return [], 0
    book = _book_of(states)
    sid_list = b.sid.tolist()
    sessions, first, sess = np.unique(b.sid, return_index=True, return_inverse=True)
    session_list = sessions.tolist()
    hosts = book.hosts
    is_new = np.array([s not in hosts for s in session_list], dtype=bool)
    if is_new.any():
        new = sessions[is_new].tolist()
        hosts.update(zip(new, zip(*b.ends.texts(first[is_new]))))
        states.update(dict.fromkeys(new, book))
    for s, n in zip(session_list, np.bincount(sess.reshape(-1)).tolist()):
        book.messages[s] = book.messages.get(s, 0) + n
    # a session's messages are ICMPv6 if its originator's address is IPv6 (IcmpSession.v6)
    v6 = np.array([":" in book.hosts[s][0] for s in session_list], dtype=bool)[sess.reshape(-1)]
    start = np.ascontiguousarray(b.start, dtype=np.int64)
    end = np.ascontiguousarray(b.end, dtype=np.int64)
    num = K.parse_icmp(b.data, start, end, v6)
    body = np.flatnonzero(num[:, I_PLEN] > 0)
    num[body, I_ENTROPY] = _entropies(b.data, start[body] + 8, num[body, I_PLEN]).view(np.int64)
    num[:, I_SID] = b.sid
    num[:, I_TS] = b.ts
    num[:, I_FROM_ORIG] = b.from_orig
    num[:, I_TRUNCATED] = b.truncated
    base = book.append(num)
    # every message its own row, but echo requests (waiting for their replies) and the replies
    # that find one
    typ = num[:, I_TYPE]
    request = np.where(v6, typ == ECHO6[0], typ == ECHO4[0]) & (num[:, I_MALFORMED] == 0)
    reply = np.where(v6, typ == ECHO6[1], typ == ECHO4[1]) & (num[:, I_MALFORMED] == 0)
    echo = np.flatnonzero(request | reply)
    if not len(echo):
        rows = np.zeros((m, 6), dtype=np.int64)
        rows[:, D_SID], rows[:, D_MSG] = b.sid, base + np.arange(m)
        book.done = np.concatenate([book.done, rows])
        return [], 0
    out: list[tuple] = []  # (sid, message, kind, rtt, reply length, reply differs), in order
    at = 0
    data = b.data
    for j, s, orig, ident, seq, ts, is_request, truncated in zip(
            echo.tolist(), b.sid[echo].tolist(), b.from_orig[echo].tolist(), num[echo, I_ECHO_ID].tolist(),
            num[echo, I_ECHO_SEQ].tolist(), b.ts[echo].tolist(), request[echo].tolist(), b.truncated[echo].tolist()):
        out += [(sid_list[k], base + k, DK_MESSAGE, 0, 0, 0) for k in range(at, j)]  # the messages before it
        at = j + 1
        orig_h, resp_h = book.hosts[s]
        src, dst = (orig_h, resp_h) if orig else (resp_h, orig_h)
        pending = book.pending.get(s)
        if pending is None:
            pending = book.pending[s] = {}
        body = data[start[j] + 8:end[j]].tobytes()
        if is_request:
            for old, _ in echo_request(pending, (src, dst, ident, seq), (base + j, body)):
                out.append((s, old, DK_REQUEST, 0, 0, 0))
            continue
        got = pending.pop((dst, src, ident, seq), None)
        if got is None:
            out.append((s, base + j, DK_MESSAGE, 0, 0, 0))
            continue
        q, q_body = got
        out.append((s, q, DK_ANSWERED, max(0, ts - int(book.num[q, I_TS])), int(num[j, I_PLEN]),
                    -1 if truncated else int(body != q_body)))
    out += [(s, base + k, DK_MESSAGE, 0, 0, 0) for s, k in zip(sid_list[at:], range(at, m))]
    book.done = np.concatenate([book.done, np.array(out, dtype=np.int64).reshape(-1, 6)])
    return [], 0


def close_sessions(states: dict, sids: np.ndarray) -> Records | list:
    """The stage's batch close: the rows of the sessions `sids` (IcmpSession's rows from add and
    close, in that order), their states popped from `states`."""
    book = None
    for s in sids.tolist():
        state = states.pop(s, None)
        if state is not None:
            book = state
    if not isinstance(book, IcmpBook):
        return []
    return book.close(np.asarray(sids, dtype=np.int64))
