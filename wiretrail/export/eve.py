"""Suricata EVE JSON (one `eve.json`) from the metadata store.

Event types: flow (every session), dns, http, tls, smb, ftp, smtp. Each event carries
Suricata's common fields (timestamp, flow_id, event_type, src_ip, src_port, dest_ip,
dest_port, proto, app_proto, community_id); `flow_id` is the session id, the same for a
session's flow and protocol events, as Suricata does. src is the session's originator.
`ether` (Suricata's `ethernet: yes`) carries the session's link-layer addresses when known:
src_macs/dest_macs on flow events, src_mac/dest_mac on the others, for the direction the event
describes.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import duckdb
import pyarrow as pa

from wiretrail.errors import WiretrailError
from wiretrail.sessions.flowtable import sid_of_uid

_PROTO = {"tcp": "TCP", "udp": "UDP", "icmp": "ICMP"}
# nDPI master protocol -> Suricata's app_proto name. Not mDNS, LLMNR or NetBIOS names: Suricata's
# DNS parser is probed on its detection port only (53, suricata.yaml's default), and it has no
# parser of their own, so their flows are `failed` and give no dns events.
DNS_DETECTION_PORT = 53
_APP_PROTO = {
    "TLS": "tls", "HTTP": "http", "HTTP_Proxy": "http", "HTTP_Connect": "http", "HTTP2": "http2", "DNS": "dns",
    "SMBv1": "smb", "SMBv23": "smb", "FTP_CONTROL": "ftp", "FTP_DATA": "ftp-data",
    "SMTP": "smtp", "SMTPS": "tls", "IMAPS": "tls", "POPS": "tls", "SSH": "ssh", "DHCP": "dhcp", "NTP": "ntp",
    "Kerberos": "krb5", "SNMP": "snmp", "SIP": "sip", "RDP": "rdp", "MQTT": "mqtt", "QUIC": "quic",
    "IMAP": "imap", "POP3": "pop3", "TFTP": "tftp", "DCE_RPC": "dcerpc", "NFS": "nfs", "Modbus": "modbus",
    "DNP3": "dnp3", "IKE": "ike", "BitTorrent": "bittorrent-dht", "Telnet": "telnet", "LDAP": "ldap",
    "PostgreSQL": "pgsql", "RFB": "rfb", "VNC": "rfb", "WebSocket": "websocket",
}


def _ip(text: str | None) -> str | None:
    """Suricata writes IPv6 addresses in full (no :: and no dropped zeros)."""
    if text and ":" in text:
        import ipaddress

        try:
            return ipaddress.IPv6Address(text).exploded
        except ValueError:
            return text
    return text


def _app_proto(r: dict) -> str | None:
    if r.get("parsed"):
        return r["parsed"]
    if not (r.get("orig_bytes") or r.get("resp_bytes")):
        return None  # no payload, nothing for Suricata's detection to see (nDPI may guess by port)
    app = r.get("app")
    if app:
        name = _APP_PROTO.get(app.split(".")[0])
        if name:
            return name
    # payload that no Suricata parser took (UDP too: its detection gives up on the first
    # datagrams, as for NetBIOS name service broadcasts)
    return "failed" if r.get("proto") in ("tcp", "udp") else None


def _timestamp(ns: int) -> str:
    t = dt.datetime.fromtimestamp(ns // 1_000_000_000, dt.timezone.utc)
    return t.strftime("%Y-%m-%dT%H:%M:%S") + f".{(ns % 1_000_000_000) // 1000:06d}+0000"


def _rows(db: duckdb.DuckDBPyConnection, query: str):
    cursor = db.execute(query)
    names = [d[0] for d in cursor.description]
    while rows := cursor.fetchmany(65536):
        for row in rows:
            yield dict(zip(names, row))


def _clean(d: dict) -> dict:
    return {k: v for k, v in d.items() if v is not None and v != [] and v != ""}


def _present(d: dict) -> dict:
    """Drop unset values only (an empty TXT string is data)."""
    return {k: v for k, v in d.items() if v is not None}


def _state(r: dict) -> str:
    """Suricata's flow.state: TCP by its handshake and close, others by replies seen."""
    if r["proto"] != "tcp":
        return "established" if r["orig_pkts"] and r["resp_pkts"] else "new"
    if r["conn_state"] in ("SF", "RSTO", "RSTR", "RSTOS0", "RSTRH", "REJ", "SH", "SHR"):
        return "closed"
    if r["conn_state"] == "OTH":  # picked up midstream: Suricata (stream.midstream) starts it established
        return "closed" if _midstream_closed(r) else "established"
    if r["conn_state"] in ("S0", None):
        return "new"
    return "established"


def _midstream_closed(r: dict) -> bool:
    """A session picked up midstream saw a reset, or a FIN each way (Zeek's history letters)."""
    history = r.get("history") or ""
    return "R" in history or "r" in history or ("F" in history and "f" in history)


# Zeek conn_state -> Suricata's tcp.state at the end of the flow
_TCP_STATE = {"S0": "syn_sent", "S1": "established", "SF": "closed", "REJ": "closed", "RSTO": "closed",
              "RSTR": "closed", "RSTOS0": "closed", "RSTRH": "closed", "S2": "fin_wait1", "S3": "close_wait",
              "SH": "closed", "SHR": "closed", "OTH": "established"}
_FLAG_NAMES = (("fin", 0x01), ("syn", 0x02), ("rst", 0x04), ("psh", 0x08), ("ack", 0x10), ("urg", 0x20),
               ("ecn", 0x40), ("cwr", 0x80))


def _tcp(r: dict) -> dict | None:
    o, p = r.get("orig_tcp_flags"), r.get("resp_tcp_flags")
    if o is None and p is None:
        return None
    o, p = o or 0, p or 0
    both = o | p
    out = {"tcp_flags": f"{both:02x}", "tcp_flags_ts": f"{o:02x}", "tcp_flags_tc": f"{p:02x}"}
    out.update({name: True for name, bit in _FLAG_NAMES if both & bit})
    out["state"] = ("closed" if r["conn_state"] == "OTH" and _midstream_closed(r)
                    else _TCP_STATE.get(r["conn_state"], "established"))
    return out


def _flow(r: dict) -> dict:
    proto = _PROTO.get(r["proto"], str(r["ip_proto"]))
    if proto == "ICMP" and ":" in (r["orig_h"] or ""):
        proto = "IPv6-ICMP"
    flow = _clean({
        "pkts_toserver": r["orig_pkts"], "pkts_toclient": r["resp_pkts"],
        "bytes_toserver": r.get("orig_wire_bytes", r["orig_ip_bytes"]),
        "bytes_toclient": r.get("resp_wire_bytes", r["resp_ip_bytes"]),
        "start": _timestamp(r["ts_ns"]), "end": _timestamp(r["last_ns"]),
        # whole seconds apart, as Suricata counts it (10.9 s to 36.1 s is 26)
        "age": r["last_ns"] // 1_000_000_000 - r["ts_ns"] // 1_000_000_000, "state": _state(r),
        "reason": r.get("close_reason") or "timeout", "alerted": False,
    })
    event = {"timestamp": _timestamp(r["ts_ns"]), "flow_id": sid_of_uid(r["uid"]), "event_type": "flow",
             "src_ip": _ip(r["orig_h"]), "src_port": r["orig_p"], "dest_ip": _ip(r["resp_h"]), "dest_port": r["resp_p"],
             "proto": proto, "app_proto": _app_proto(r), "flow": flow, "community_id": r["community_id"]}
    ether = _clean({"src_macs": [r["orig_l2_addr"]] if r.get("orig_l2_addr") else None,
                    "dest_macs": [r["resp_l2_addr"]] if r.get("resp_l2_addr") else None})
    if ether:
        event["ether"] = ether
    if r["vlan"] is not None:
        event["vlan"] = [r["vlan"]] + ([r["inner_vlan"]] if r["inner_vlan"] is not None else [])
    if r["proto"] == "tcp":
        event["tcp"] = _tcp(r)
    if r["icmp_type"] is not None:
        event["icmp_type"], event["icmp_code"] = r["icmp_type"], r["icmp_code"]
    return _clean(event)


# Suricata's flow timeouts by protocol and flow state, in seconds (the `flow-timeouts` of the
# suricata.yaml it ships): a packet coming later than this after the flow's last one starts a
# new flow. Zeek ends connections sooner (5 s after a FIN or RST, an unanswered SYN after 5 s,
# UDP after a minute idle, DNS after 10 s), so one Suricata flow can be several of our sessions.
FLOW_TIMEOUTS = {"tcp": {"new": 60, "established": 600, "closed": 60},
                 "udp": {"new": 30, "established": 300, "closed": 300}}
_STATE_ORDER = {"new": 0, "established": 1, "closed": 2}
_LONGEST_TIMEOUT_NS = max(t for d in FLOW_TIMEOUTS.values() for t in d.values()) * 1_000_000_000


def _starts_with_syn(r: dict) -> bool:
    """The session began with a SYN without ACK (Zeek's history starts S, after a ^ if flipped)."""
    history = (r.get("history") or "").lstrip("^")
    return history[:1] in ("S", "s")


class FlowMerger:
    """Sessions (in start order) -> the flows Suricata would have logged.

    Sessions of the same 5-tuple, VLANs, link and tunnel join the flow before them when they
    start within Suricata's timeout of that flow's last packet, for its state (FLOW_TIMEOUTS),
    unless the new session opens with a SYN on a flow that is closed or was picked up
    midstream: Suricata's TCP session reuse (TcpSessionReuseDoneEnoughSyn: a SYN starts a new
    flow when the old session is past LAST_ACK or has no TCP session), which is also where Zeek
    starts a new connection. Counters add up (turned when Zeek saw the later session's first
    packet from the other side), flags are or-ed, the state only moves forward, the end and
    the close reason come from the last session. TCP and UDP only (ICMP flows are keyed
    otherwise). The sessions table keeps Zeek's split.

    `flow_of` maps the uid of each session merged into an earlier one to that flow's uid."""

    def __init__(self):
        self.open: dict[tuple, dict] = {}
        self.flow_of: dict[str, str] = {}
        self._last_prune = 0

    @staticmethod
    def _key(r: dict) -> tuple | None:
        if r.get("proto") not in FLOW_TIMEOUTS or r.get("orig_p") is None:
            return None
        ends = tuple(sorted([(r["orig_h"] or "", r["orig_p"]), (r["resp_h"] or "", r["resp_p"])]))
        return (r["proto"], ends, r.get("vlan"), r.get("inner_vlan"), r.get("link"), r.get("tunnel"))

    def add(self, r: dict) -> list[dict]:
        """Take the next session; returns the flows that can no longer grow."""
        done = self._prune(r["ts_ns"])
        key = self._key(r)
        if key is None:
            return done + [r]
        f = self.open.get(key)
        if f is not None and self._joins(f, r):
            self._merge(f, r)
            return done
        if f is not None:
            done.append(f)
        self.open[key] = dict(r)
        return done

    def close(self) -> list[dict]:
        done = list(self.open.values())
        self.open.clear()
        return done

    def _prune(self, now: int) -> list[dict]:
        """Flows idle past the longest timeout cannot take another session: out they go (bounds
        memory to the flows of the last ten minutes)."""
        if now - self._last_prune < _LONGEST_TIMEOUT_NS:
            return []
        self._last_prune = now
        gone = [k for k, f in self.open.items() if now - f["last_ns"] >= _LONGEST_TIMEOUT_NS]
        return [self.open.pop(k) for k in gone]

    @staticmethod
    def _joins(f: dict, r: dict) -> bool:
        state = _state(f)
        if r["ts_ns"] - f["last_ns"] >= FLOW_TIMEOUTS[f["proto"]][state] * 1_000_000_000:
            return False
        if f["proto"] == "tcp" and _starts_with_syn(r):
            return not (state == "closed" or f.get("conn_state") == "OTH")
        return True

    def _merge(self, f: dict, r: dict) -> None:
        self.flow_of[r["uid"]] = f["uid"]
        # Zeek may have seen the later session's first packet from the flow's responder
        turned = (r["orig_h"], r["orig_p"]) != (f["orig_h"], f["orig_p"])
        sides = (("orig", "resp"), ("resp", "orig")) if turned else (("orig", "orig"), ("resp", "resp"))
        before = _state(f)
        for mine, theirs in sides:
            for name in ("pkts", "ip_bytes", "wire_bytes", "bytes"):
                add = r.get(f"{theirs}_{name}")
                if add is not None or f.get(f"{mine}_{name}") is not None:
                    f[f"{mine}_{name}"] = (f.get(f"{mine}_{name}") or 0) + (add or 0)
            flags = r.get(f"{theirs}_tcp_flags")
            if flags is not None or f.get(f"{mine}_tcp_flags") is not None:
                f[f"{mine}_tcp_flags"] = (f.get(f"{mine}_tcp_flags") or 0) | (flags or 0)
        f["last_ns"] = max(f["last_ns"], r["last_ns"])
        f["close_reason"] = r.get("close_reason")
        if _STATE_ORDER[_state(r)] > _STATE_ORDER[before]:  # Suricata's state only moves forward
            f["conn_state"], f["history"] = r.get("conn_state"), r.get("history")
        if not f.get("parsed") and not f.get("app"):
            f["parsed"], f["app"] = r.get("parsed"), r.get("app")


def _head(r: dict, event_type: str, app_proto: str, proto: str, packet: int | None = None) -> dict:
    """The common fields. `packet`: the capture packet the event is logged on (pcap_cnt; Suricata
    then names the packet's source too, pkt_src: the wire for a packet of the capture itself)."""
    e = {"timestamp": _timestamp(r["ts_ns"]), "flow_id": sid_of_uid(r.get("flow_uid") or r["uid"]),
         "event_type": event_type}
    if packet:
        e["pcap_cnt"] = packet
    e.update({"src_ip": _ip(r.get("orig_h")), "src_port": r.get("orig_p"), "dest_ip": _ip(r.get("resp_h")),
              "dest_port": r.get("resp_p"), "proto": proto})
    if packet and not r.get("session_tunnel"):
        e["pkt_src"] = "wire/pcap"
    e.update({"app_proto": app_proto, "community_id": r.get("community_id")})
    ether = _clean({"src_mac": r.get("orig_l2_addr"), "dest_mac": r.get("resp_l2_addr")})
    if ether:
        e["ether"] = ether
    return e


# Suricata's tls field names (eve-log tls `custom`) -> our keys in the event; the sets its
# `extended: no` and `extended: yes` log
TLS_FIELDS = {"subject": "subject", "issuer": "issuerdn", "sni": "sni", "version": "version", "ja3": "ja3",
              "ja3s": "ja3s", "ja4": "ja4", "client_alpns": "client_alpns", "fingerprint": "fingerprint",
              "serial": "serial", "not_before": "notbefore", "not_after": "notafter",
              "client_handshake": "client_handshake", "server_handshake": "server_handshake"}
TLS_BASIC = frozenset({"subject", "issuer", "subjectaltname"})
TLS_EXTENDED = TLS_BASIC | {"version", "serial", "fingerprint", "not_before", "not_after", "ja3", "ja3s", "ja4",
                            "client", "client_alpns", "server_alpns", "sni"}


@dataclass(frozen=True)
class EveOptions:
    """What Suricata's configuration changes in the events written (its defaults here):
    eve-log's dns `requests`/`responses`, and the SMTP MIME decoder's `extract-urls`,
    `extract-urls-schemes` and `log-url-scheme`."""

    dns_requests: bool = True
    dns_responses: bool = True
    smtp_extract_urls: bool = True
    smtp_url_schemes: tuple[str, ...] = ("http",)
    smtp_log_url_scheme: bool = False
    # eve-log tls: the fields logged, by Suricata's names (TLS_FIELDS); `extended: yes` as the
    # suricata.yaml Suricata ships
    tls_fields: frozenset[str] = TLS_EXTENDED
    # eve-log http `dump-all-headers` (both, request or response): the messages' headers
    http_request_headers: bool = False
    http_response_headers: bool = False

    @classmethod
    def from_suricata_config(cls, config) -> EveOptions:
        """From a parsed suricata.yaml (what it does not set keeps Suricata's default; a part of
        another shape than Suricata's is ignored, as a user's file may hold anything)."""
        kw: dict = {}
        config = _dict(config)
        for output in _list(config.get("outputs")):
            for t in _list(_dict(_dict(output).get("eve-log")).get("types")):
                if t == "tls":  # listed without settings: Suricata's basic fields
                    kw["tls_fields"] = TLS_BASIC
                tls = _dict(t).get("tls")
                if isinstance(tls, dict):
                    kw["tls_fields"] = TLS_EXTENDED if _yes(tls.get("extended")) else TLS_BASIC
                    if isinstance(tls.get("custom"), list):  # custom replaces the set
                        kw["tls_fields"] = frozenset(str(f).lower() for f in tls["custom"])
                http = _dict(t).get("http")
                if isinstance(http, dict) and "dump-all-headers" in http:
                    dump = str(http["dump-all-headers"])  # Suricata compares the value's first letters
                    kw["http_request_headers"] = dump.startswith(("both", "request"))
                    kw["http_response_headers"] = dump.startswith(("both", "response"))
                dns = _dict(t).get("dns")
                if isinstance(dns, dict):
                    for key in ("requests", "responses"):
                        if key in dns:
                            kw[f"dns_{key}"] = _yes(dns[key])
        mime = _dict(_dict(_dict(_dict(config.get("app-layer")).get("protocols")).get("smtp")).get("mime"))
        if "extract-urls" in mime:
            kw["smtp_extract_urls"] = _yes(mime["extract-urls"])
        if isinstance(mime.get("extract-urls-schemes"), list):
            kw["smtp_url_schemes"] = tuple(str(x).lower() for x in mime["extract-urls-schemes"])
        if "log-url-scheme" in mime:
            kw["smtp_log_url_scheme"] = _yes(mime["log-url-scheme"])
        return cls(**kw)


def _dict(v) -> dict:
    return v if isinstance(v, dict) else {}


def _list(v) -> list:
    return v if isinstance(v, list) else []


def _yes(v) -> bool:
    return v is True or str(v).lower() in ("yes", "true", "on", "1")


def _email_urls(urls: list[str] | None, options: EveOptions) -> list[str] | None:
    """Suricata's email.url: for each configured scheme in turn, the URLs with it in the order
    found, the whole list then written last first (its decoder pushes them so and logs them
    reversed); without log-url-scheme the "scheme://" is cut off."""
    if not urls or not options.smtp_extract_urls:
        return None
    out = []
    for scheme in options.smtp_url_schemes:
        prefix = scheme + "://"
        out.extend(u if options.smtp_log_url_scheme else u[len(prefix):]
                   for u in urls if u[:len(prefix)].lower() == prefix)
    return out[::-1] or None


def _dns(r: dict, options: EveOptions = EveOptions()) -> list[dict]:
    """Suricata 8's DNS events (version 3): one per message, a request from the client and a
    response from the server (src and dest swapped, as the packet went)."""
    if DNS_DETECTION_PORT not in (r.get("orig_p"), r.get("resp_p")):
        return []  # mDNS, LLMNR, NetBIOS: Suricata does not parse them (see DNS_DETECTION_PORT)
    proto = "TCP" if r.get("proto") == "tcp" else "UDP"
    name = r.get("query_original") or r.get("query")
    queries = [_clean({"rrname": name, "rrtype": r.get("qtype_name")})] if name is not None else []
    out = []
    if r.get("query_flags") is not None and options.dns_requests:
        e = _head(r, "dns", "dns", proto, r.get("query_packet"))
        flags = r["query_flags"]
        e["dns"] = _clean({"version": 3, "type": "request", "tx_id": r.get("tx_id"), "id": r.get("trans_id"),
                           "flags": f"{flags:x}", "rd": bool(flags & 0x0100) or None, "opcode": r.get("opcode"),
                           "queries": queries})
        out.append(_clean(e))
    if r.get("response_flags") is not None and options.dns_responses:
        e = _head(r, "dns", "dns", proto, r.get("response_packet"))
        e["src_ip"], e["src_port"], e["dest_ip"], e["dest_port"] = (_ip(r.get("resp_h")), r.get("resp_p"),
                                                                    _ip(r.get("orig_h")), r.get("orig_p"))
        if "ether" in e:  # the server's message: its link-layer source is the responder's
            e["ether"] = _clean({"src_mac": r.get("resp_l2_addr"), "dest_mac": r.get("orig_l2_addr")})
        e["timestamp"] = _timestamp(r["response_ns"]) if r.get("response_ns") else e["timestamp"]
        flags = r["response_flags"]
        answers = [_present(a) for a in (r.get("answer_records") or [])]
        grouped: dict[str, list] = {}
        for a in answers:
            for key in ("rdata", "soa", "srv", "sshfp"):  # SOA, SRV and SSHFP group as objects
                if a.get(key) is not None:
                    grouped.setdefault(a.get("rrtype"), []).append(a[key])
        e["dns"] = _clean({"version": 3, "type": "response", "tx_id": r.get("tx_id"), "id": r.get("trans_id"),
                           "flags": f"{flags:x}", "qr": True, "aa": bool(flags & 0x0400) or None,
                           "tc": bool(flags & 0x0200) or None, "rd": bool(flags & 0x0100) or None,
                           "ra": bool(flags & 0x0080) or None, "opcode": r.get("opcode"),
                           "rcode": r.get("rcode_name"), "queries": queries, "answers": answers, "grouped": grouped,
                           "authorities": [_present(a) for a in (r.get("authority_records") or [])]})
        out.append(_clean(e))
    return out


def _http(r: dict, options: EveOptions = EveOptions()) -> list[dict]:
    e = _head(r, "http", "http", "TCP")
    e["tx_id"] = r.get("tx_id")
    host, port = r.get("host"), None
    if host and host.count(":") == 1 and host.rsplit(":", 1)[1].isdigit():  # Suricata splits the port off
        host, port = host.rsplit(":", 1)[0], int(host.rsplit(":", 1)[1])
    e["http"] = _clean({"hostname": host, "http_port": port, "url": r.get("uri"),
                        "http_user_agent": r.get("user_agent"),
                        "http_content_type": r.get("response_content_type"), "http_refer": r.get("referrer"),
                        "http_method": r.get("method"), "protocol": f"HTTP/{r['version']}" if r.get("version") else None,
                        "status": None if r.get("status_string") else r.get("status_code"),
                        "status_string": r.get("status_string"), "length": r.get("response_body_len"),
                        "xff": r.get("xff"),
                        "request_headers": _htp_headers(r.get("request_headers")) if options.http_request_headers
                        else None,
                        "response_headers": _htp_headers(r.get("response_headers")) if options.http_response_headers
                        else None})
    return [_clean(e)]


def _htp_headers(headers: list[dict] | None) -> list[dict] | None:
    """A message's headers as Suricata logs them: as its libhtp keeps them, one per name (the
    first one's case and place), a repeated header's values joined with ", " (Content-Length
    keeps its first; after the first repeat of each name, 64 more repeats are taken in all);
    a name cut at 255 bytes, a value at 2047, either at a NUL (written as C strings)."""
    if not headers:
        return None
    out: list[list[str]] = []
    at: dict[str, int] = {}
    repeated: set[str] = set()
    repeats = 0
    for h in headers:
        name, value = h["name"] or "", h["value"] or ""
        key = name.lower()
        i = at.get(key)
        if i is None:
            at[key] = len(out)
            out.append([name, value])
            continue
        if key in repeated:
            if repeats >= 64:
                continue
            repeats += 1
        repeated.add(key)
        if key != "content-length":
            out[i][1] += ", " + value
    return [{"name": _c_string(n, 255), "value": _c_string(v, 2047)} for n, v in out]


def _c_string(text: str, limit: int) -> str:
    text = text.split("\x00", 1)[0]
    if len(text) <= limit // 4:
        return text  # short enough whatever its UTF-8 length
    return text.encode("utf-8", "surrogateescape")[:limit].decode("utf-8", "ignore")


def _tls_version(r: dict) -> str | None:
    """Suricata's version: the server's, else the client's (only a ClientHello seen). TLS 1.3
    drafts before 16 (0x7f01..0x7f0f, or 0x0304 in the ServerHello's own version field, where
    drafts 1-15 put it) are all "draft-<16"."""
    v = r.get("version")
    if not v:
        v = r.get("client_version")
        if not v:
            return None
    elif v == "TLSv13" and r.get("server_version") == "TLSv13":
        return "TLS 1.3 draft-<16"
    if v.startswith("TLSv13-draft"):
        n = v[len("TLSv13-draft"):]
        fb = n.endswith("-fb")
        n = n[:-3] if fb else n
        if n.isdigit() and not fb and int(n) < 16:
            return "TLS 1.3 draft-<16"
        return f"TLS 1.3 draft-{n}" + ("-fb" if fb else "")
    return {"TLSv10": "TLSv1", "TLSv11": "TLS 1.1", "TLSv12": "TLS 1.2", "TLSv13": "TLS 1.3",
            "SSLv3": "SSLv3", "SSLv2": "SSLv2"}.get(v, v)


def _dn(zeek_dn: str | None) -> str | None:
    """Zeek's distinguished name (RFC 4514 order, ',' between parts) as Suricata prints it:
    the certificate's order, ', ' between parts."""
    if not zeek_dn:
        return zeek_dn
    parts, cur, escaped = [], [], False
    for ch in zeek_dn:
        if escaped:
            cur.append(ch)
            escaped = False
        elif ch == "\\":  # Zeek escapes a separator inside a value: Suricata does not
            escaped = True
        elif ch == ",":
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return ", ".join(reversed(parts))


def _colons(hexstr: str | None, upper: bool = False) -> str | None:
    if not hexstr:
        return None
    h = hexstr.upper() if upper else hexstr.lower()
    return ":".join(h[i:i + 2] for i in range(0, len(h), 2))


def _iso(ns: int | None) -> str | None:
    if ns is None:
        return None
    return dt.datetime.fromtimestamp(ns // 1_000_000_000, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")


# Suricata's names of protocol versions in the handshake objects (its SCTlsVersion); a number
# not here is not logged
_HS_VERSIONS = {0x0000: "UNDETERMINED", 0x0200: "SSLv2", 0x0300: "SSLv3", 0x0301: "TLSv1", 0x0302: "TLS 1.1",
                0x0303: "TLS 1.2", 0x0304: "TLS 1.3", 0x7F01: "TLS 1.3 draft-<16",
                **{0x7F00 | n: f"TLS 1.3 draft-{n}" for n in range(16, 29)},
                **{0xFB00 | n: f"TLS 1.3 draft-{n}-fb" for n in (20, 21, 22, 23, 26)}}


def _hs_version(versions: list[int | None]) -> str | None:
    """The highest of the versions a hello announced (GREASE skipped), as Suricata names it."""
    from wiretrail.app.tls import is_grease

    seen = [v for v in versions if v is not None and not is_grease(v)]
    return _HS_VERSIONS.get(max(seen)) if seen else _HS_VERSIONS[0]


def _client_handshake(r: dict) -> dict | None:
    """Suricata 8's client_handshake: the ClientHello's version (its own, raised by the first
    supported_versions entry Suricata knows), cipher suites, extensions and signature
    algorithms, GREASE left out."""
    from wiretrail.app.tls import is_grease, version_number  # only when asked: it loads the TLS kernels

    legacy = version_number(r.get("client_version"))
    if legacy is None and not r.get("client_ciphers"):
        return None  # no ClientHello
    versions = [legacy]
    first = next((v for v in r.get("client_supported_versions") or [] if v in _HS_VERSIONS and v > 0x0200), None)
    versions.append(first)
    plain = lambda key: [v for v in r.get(key) or [] if not is_grease(v)] or None  # noqa: E731
    return _present({"version": _hs_version(versions), "ciphers": plain("client_ciphers"),
                     "exts": plain("ssl_client_exts"), "sig_algs": plain("client_sig_algs")})


def _server_handshake(r: dict) -> dict | None:
    """Suricata 8's server_handshake: the ServerHello's own version field, its cipher suite and
    extensions."""
    from wiretrail.app.tls import cipher_number, is_grease, version_number

    version = version_number(r.get("server_version"))
    if version is None:
        return None  # no ServerHello
    cipher = cipher_number(r.get("cipher"))
    exts = [v for v in r.get("ssl_server_exts") or [] if not is_grease(v)]
    return _present({"version": _hs_version([version]),
                     "cipher": cipher if cipher is not None and not is_grease(cipher) else 0, "exts": exts or None})


def _tls(r: dict, options: EveOptions = EveOptions()) -> list[dict]:
    e = _head(r, "tls", "tls", "TCP", r.get("packet"))
    e["tx_id"] = r.get("tx_id")
    fields = options.tls_fields
    tls = {"subject": _dn(r.get("subject")), "issuerdn": _dn(r.get("issuer")), "sni": r.get("server_name"),
           "version": _tls_version(r),
           "ja3": {"hash": r["ja3"]} if r.get("ja3") else None,
           "ja3s": {"hash": r["ja3s"]} if r.get("ja3s") else None, "ja4": r.get("ja4"),
           "client_alpns": r.get("alpn"), "fingerprint": _colons(r.get("leaf_sha1")),
           "serial": _colons(r.get("leaf_serial"), upper=True),
           "notbefore": _iso(r.get("leaf_not_before")), "notafter": _iso(r.get("leaf_not_after")),
           "client_handshake": _client_handshake(r) if "client_handshake" in fields else None,
           "server_handshake": _server_handshake(r) if "server_handshake" in fields else None}
    e["tls"] = _clean({key: tls[key] for f, key in TLS_FIELDS.items() if f in fields})
    return [_clean(e)]


def _smtp(r: dict, options: EveOptions = EveOptions()) -> list[dict]:
    e = _head(r, "smtp", "smtp", "TCP", r.get("packet"))
    e["tx_id"] = r.get("tx_id")
    # the parameters as sent (older stores: the addresses, in angle brackets as usually sent)
    mail_from = r["mailfrom_param"] if r.get("mailfrom_param") is not None else _angle(r.get("mailfrom"))
    rcpt_to = r.get("rcptto_params") or [_angle(x) for x in (r.get("rcptto") or [])]
    e["smtp"] = _clean({"helo": r.get("helo"), "mail_from": mail_from, "rcpt_to": rcpt_to})
    # Suricata logs the email object for a transaction that reached DATA (its MIME state), status
    # PARSE_DONE; stores from before message_sent: when headers were read
    sent = r["message_sent"] if "message_sent" in r else (r.get("from") or r.get("to") or r.get("subject"))
    email = _clean({"status": "PARSE_DONE" if sent else None,
                    "from": r.get("from"), "to": r.get("to"), "cc": r.get("cc"), "subject": r.get("subject"),
                    "message_id": r.get("msg_id"), "x_mailer": r.get("user_agent"),
                    "attachment": r.get("attachments"), "url": _email_urls(r.get("urls"), options)})
    if email:
        e["email"] = email
    return [_clean(e)]


def _angle(v: str | None) -> str | None:
    """Suricata logs envelope addresses as sent, in angle brackets."""
    if not v:
        return v
    v = v.strip()
    return v if v.startswith("<") else f"<{v}>"


def _ftp(r: dict) -> list[dict]:
    e = _head(r, "ftp", "ftp", "TCP")
    e["tx_id"] = r.get("tx_id")
    msg, code = r.get("reply_msg"), r.get("reply_code")
    command = r.get("command") if r.get("command") != "<init>" else None
    if "command_data" in r:  # Suricata's own fields (stores before them: the Zeek ones)
        data = r.get("command_data")
        ftp = {"command": command, "command_data": data,
               "command_truncated": bool(r.get("command_truncated")) if data is not None else None,
               "reply": r.get("replies"), "completion_code": r.get("reply_codes")}
    else:
        ftp = {"command": command, "command_data": r.get("arg"),
               "reply": msg.split("\n") if isinstance(msg, str) else None,
               "completion_code": [str(code)] if code is not None else None}
    ftp.update({"dynamic_port": r.get("data_channel_resp_p"),
                "reply_received": "yes" if code is not None else "no",
                "reply_truncated": bool(r.get("reply_truncated"))})
    e["ftp"] = {k: v for k, v in ftp.items() if v is not None and v != []}
    return [_clean(e)]


# our SMB command and dialect names -> Suricata's
_SMB1_COMMANDS = {"NEGOTIATE": "NEGOTIATE_PROTOCOL", "SESSION_SETUP": "SESSION_SETUP_ANDX",
                  "LOGOFF": "LOGOFF_ANDX", "TREE_CONNECT": "TREE_CONNECT_ANDX", "CREATE": "NT_CREATE_ANDX",
                  "READ": "READ_ANDX", "WRITE": "WRITE_ANDX", "TRANSACTION2": "TRANS2"}
_SMB2_COMMANDS = {"NEGOTIATE": "NEGOTIATE_PROTOCOL", "LOGOFF": "SESSION_LOGOFF", "QUERY_DIRECTORY": "FIND",
                  "QUERY_INFO": "GET_INFO", "ECHO": "KEEPALIVE"}
_SMB_DIALECTS = {"SMB1": "NT LM 0.12", "2.0.2": "2.02", "2.1": "2.10", "3.0": "3.00", "3.0.2": "3.02", "3.1.1": "3.11"}


def _smb(r: dict) -> list[dict]:
    e = _head(r, "smb", "smb", "TCP")
    e["tx_id"] = r.get("tx_id")
    dialect, command = r.get("dialect"), r.get("command")
    smb1 = dialect == "SMB1"
    if command:
        command = ("SMB1_COMMAND_" + _SMB1_COMMANDS.get(command, command) if smb1
                   else "SMB2_COMMAND_" + _SMB2_COMMANDS.get(command, command))
    raw = r.get("command")
    smb = {"id": r["tx_id"] + 1 if r.get("tx_id") is not None else None,  # Suricata counts from 1
           # SMB 2/3 without a NEGOTIATE seen: Suricata knows no dialect
           "dialect": "unknown" if dialect == "SMB2" else _SMB_DIALECTS.get(dialect, dialect),
           "command": command, "status": r.get("status"), "status_code": _status_code(r.get("status")),
           "session_id": r.get("session_id"), "tree_id": r.get("tree_id")}
    if raw == "CREATE":  # Suricata's CREATE record: name, disposition, access, times, size, fuid
        name = r.get("name") or "<share_root>"
        smb["directory" if r.get("directory") and r.get("name") else "filename"] = name
        smb["disposition"] = r.get("disposition")
        smb["access"] = "delete on close" if r.get("delete_on_close") else "normal"
        for key in ("created", "accessed", "modified", "changed"):
            smb[key] = r.get(f"{key}_s") or 0
        smb["size"] = r.get("size") or 0
        smb["fuid"] = _fuid(r.get("file_id"))
    elif raw in ("READ", "WRITE"):  # a file transaction
        smb["filename"], smb["share"], smb["fuid"] = r.get("name"), r.get("tree"), _fuid(r.get("file_id"))
    elif raw == "TREE_CONNECT":
        smb["named_pipe" if r.get("share_type") == "PIPE" else "share"] = r.get("tree")
    elif raw == "NEGOTIATE":
        smb["client_dialects"] = r.get("client_dialects")
        smb["client_guid"] = r.get("client_guid")
        # Suricata writes the server's GUID for every NEGOTIATE, "" when the response gave none
        smb["server_guid"] = r.get("server_guid") or ""
    elif raw == "SET_INFO" and r.get("info_class") == "FileRenameInformation":
        smb["set_info"] = {"class": "FILE_INFO", "info_level": "SMB2_FILE_RENAME_INFO"}
        smb["rename"] = {"from": r.get("prev_name") or "<unknown>", "to": r.get("name")}
        smb["fuid"] = _fuid(r.get("file_id"))
    elif raw == "SET_INFO" and r.get("info_class") == "FileDispositionInformation":
        smb["filename"] = r.get("name") or "<unknown>"
        smb["access"] = "delete on close" if r.get("delete_on_close") else "normal"
        smb["fuid"] = _fuid(r.get("file_id"))
    else:
        smb["filename"], smb["share"] = r.get("name"), r.get("tree")
    if raw == "SESSION_SETUP":
        # Suricata's ntlmssp object comes from the AUTHENTICATE message only (the leg that names
        # the user): the NEGOTIATE leg's version alone is not logged
        if any(r.get(k) is not None for k in ("ntlm_user", "ntlm_domain", "ntlm_host")):
            smb["ntlmssp"] = _present({"domain": r.get("ntlm_domain") or "", "user": r.get("ntlm_user") or "",
                                       "host": r.get("ntlm_host") or "", "version": r.get("ntlm_version")})
        if r.get("native_os") is not None or r.get("native_lm") is not None:
            smb["request"] = {"native_os": r.get("native_os") or "", "native_lm": r.get("native_lm") or ""}
        if r.get("server_native_os") is not None or r.get("server_native_lm") is not None:  # SMB1
            smb["response"] = {"native_os": r.get("server_native_os") or "",
                               "native_lm": r.get("server_native_lm") or ""}
    if r.get("dcerpc_request") or r.get("dcerpc_response"):
        interfaces = [_present(i) for i in r.get("dcerpc_interfaces") or ()]
        smb["dcerpc"] = _present({"request": r.get("dcerpc_request"), "response": r.get("dcerpc_response"),
                                  "opnum": r.get("dcerpc_opnum"), "interfaces": interfaces or None,
                                  "call_id": r.get("dcerpc_call_id")})
    e["smb"] = _present(smb)
    return [_clean(e)]


def _status_code(status: str | None) -> str | None:
    """Suricata's status_code: an NT status in hex, no leading zeros; an SMB1 DOS error (class,
    code) as its code in four hex digits (the class is in the status name)."""
    if not status:
        return None
    if status.startswith("0x"):
        try:
            code = int(status, 16)
        except ValueError:
            return None
        if len(status) == 8:  # the parser's unnamed DOS error: 0x<class:2><code:4>
            return f"0x{code & 0xFFFF:04x}"
        return f"0x{code:x}"
    if not _STATUS_CODES:
        from wiretrail.app.smb import DOS_ERRORS, NT_STATUS

        _STATUS_CODES.update({v: f"0x{k:x}" for k, v in NT_STATUS.items()})
        _STATUS_CODES.update({v: f"0x{code:04x}" for (_cls, code), v in DOS_ERRORS.items()})
    return _STATUS_CODES.get(status)


_STATUS_CODES: dict[str, str] = {}


def _fuid(file_id: str | None) -> str | None:
    """Suricata's fuid: an SMB2 FileId (16 bytes) as a GUID, an SMB1 FID as 4 hex digits."""
    if not file_id:
        return None
    if len(file_id) == 32:
        g = bytes.fromhex(file_id)
        return (f"{g[3]:02x}{g[2]:02x}{g[1]:02x}{g[0]:02x}-{g[5]:02x}{g[4]:02x}-{g[7]:02x}{g[6]:02x}-"
                f"{g[9]:02x}{g[8]:02x}-{g[11]:02x}{g[10]:02x}{g[15]:02x}{g[14]:02x}{g[13]:02x}{g[12]:02x}")
    return file_id


# Records Suricata makes no transaction of (so logs nothing for, and does not count): SMB 2/3
# QUERY_INFO, SET_INFO other than a rename or a delete disposition (its smb2_create_new_tx),
# a READ answered only with END_OF_FILE (a read's file transaction is made by a response
# carrying data; READ and WRITE are file transactions, one per file as our rows are), and a
# READ or WRITE on a named pipe that carries no DCE/RPC (smb2.rs: "non-DCERPC pipe: skip").
_WHERE = {"smb": "WHERE NOT (coalesce(t.dialect, '') <> 'SMB1' AND (t.command = 'QUERY_INFO' OR "
                 "(t.command = 'SET_INFO' AND coalesce(t.info_class, '') NOT IN "
                 "('FileRenameInformation', 'FileDispositionInformation')) OR "
                 "(t.command = 'READ' AND t.status = 'STATUS_END_OF_FILE' AND coalesce(t.bytes, 0) = 0) OR "
                 "(t.command IN ('READ', 'WRITE') AND coalesce(t.share_type, '') = 'PIPE' AND t.dcerpc_request IS NULL))) "}

# Rows after which Suricata starts counting a flow's transactions again: HTTP after a granted
# CONNECT (the tunnelled requests are a new HTTP state, tx_id 0 on).
_TX_RESTART = {"http": "method = 'CONNECT' AND status_code BETWEEN 200 AND 299"}

# store table -> EVE converter
_CONFIGURED = {"dns", "smtp", "tls", "http"}  # converters that take EveOptions
EVENTS = {"dns": _dns, "http": _http, "tls": _tls, "ftp": _ftp, "smtp": _smtp, "smb": _smb}


def emit_table(db, table: str, convert, emit) -> None:
    columns = {row[0] for row in db.execute(f'DESCRIBE "{table}"').fetchall()}
    extra = ", epoch_ns(t.response_ts) AS response_ns" if "response_ts" in columns else ""
    if "created" in columns:  # SMB file times: Suricata writes whole epoch seconds (rounded down)
        extra += "".join(f", floor(epoch_ns(t.{c}) / 1e9)::BIGINT AS {c}_s"
                         for c in ("created", "accessed", "modified", "changed"))
    # tx_id: the transaction's number within its flow, as Suricata counts them
    # community_id comes from the session, as Suricata puts it on every event of a flow
    where = _WHERE.get(table, "")
    # the session's link-layer addresses (a store written before they existed has none)
    session_columns = {row[0] for row in db.execute('DESCRIBE "sessions"').fetchall()}
    macs = [c for c in ("orig_l2_addr", "resp_l2_addr") if c in session_columns and c not in columns]
    source, segment = f'"{table}"', ""
    if table in _TX_RESTART:  # number each stretch between restarts on its own
        source = (f'(SELECT *, coalesce(sum(CASE WHEN {_TX_RESTART[table]} THEN 1 END) OVER (PARTITION BY uid '
                  f'ORDER BY ts ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), 0) AS tx_segment '
                  f'FROM "{table}")')
        segment = ", t.tx_segment"
    # flow_uid: the flow the record's session is part of (FlowMerger), where Suricata counts it
    flow_uid = "coalesce(fo.flow_uid, t.uid)"
    query = (f'SELECT t.*, epoch_ns(t.ts) AS ts_ns{extra}, {flow_uid} AS flow_uid, '
             f'row_number() OVER (PARTITION BY {flow_uid}{segment} ORDER BY t.ts) - 1 AS tx_id, s.community_id, '
             f's.tunnel AS session_tunnel{"".join(f", s.{c}" for c in macs)} '
             f'FROM {source} t LEFT JOIN (SELECT uid, community_id, tunnel{"".join(f", {c}" for c in macs)} '
             f'FROM sessions) s USING (uid) LEFT JOIN eve_flow_of fo ON fo.uid = t.uid {where}'
             f'ORDER BY t.ts')
    if table == "tls" and "x509" in {v[0] for v in db.execute("SELECT view_name FROM duckdb_views()").fetchall()}:
        # the server's leaf certificate: the first of its chain (cert_chain_fps, leaf first)
        query = query.replace("SELECT t.*,", "SELECT t.*, c.leaf_sha1, c.leaf_serial, c.leaf_not_before, "
                                             "c.leaf_not_after,").replace(
            'FROM "tls" t LEFT JOIN',
            'FROM "tls" t LEFT JOIN (SELECT DISTINCT ON (fingerprint) fingerprint AS leaf_fp, sha1 AS leaf_sha1, '
            'serial AS leaf_serial, epoch_ns(not_valid_before) AS leaf_not_before, '
            'epoch_ns(not_valid_after) AS leaf_not_after FROM x509) c '
            'ON c.leaf_fp = list_extract(t.cert_chain_fps, 1) LEFT JOIN')
    if table != "dns":
        for r in _rows(db, query):
            emit(convert(r))
        return
    # Suricata numbers DNS messages, not exchanges: each message of a flow is a transaction
    # (tx_id 0, 1, 2, ... in the order they came), so events are numbered per flow here.
    flow, events = None, []
    for r in _rows(db, query.replace("ORDER BY t.ts", f"ORDER BY {flow_uid}, t.ts")):
        if r["flow_uid"] != flow:
            emit(_number_dns(events))
            flow, events = r["flow_uid"], []
        events.extend(convert(r))
    emit(_number_dns(events))


def _number_dns(events: list[dict]) -> list[dict]:
    events.sort(key=lambda e: (e.get("pcap_cnt") or 0, e["timestamp"]))
    for k, e in enumerate(events):
        e["dns"]["tx_id"] = k
    return events


def export(db: duckdb.DuckDBPyConnection, out_dir: Path, options: EveOptions | None = None) -> dict[str, int]:
    """Write eve.json; returns events written per event type. `options`: what a Suricata
    configuration would change (EveOptions; Suricata's defaults if not given)."""
    options = options or EveOptions()
    views = {row[0] for row in db.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall()}
    counts: dict[str, int] = {}
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with open(out_dir / "eve.json", "w", encoding="utf-8") as out:
            def emit(events):
                for e in events:
                    out.write(json.dumps(e, separators=(",", ":"), default=str))
                    out.write("\n")
                    counts[e["event_type"]] = counts.get(e["event_type"], 0) + 1
            # a session a parser made records of is that protocol, whatever nDPI said (Suricata's
            # app_proto is its parsers' verdict too)
            parsed = [t for t in EVENTS if t in views]
            by_records = (" UNION ALL ".join(f"SELECT DISTINCT uid, '{t}' AS parsed FROM \"{t}\""
                                             + (f" WHERE {DNS_DETECTION_PORT} IN (orig_p, resp_p)" if t == "dns" else "")
                                             for t in parsed)
                          if parsed else "SELECT NULL::VARCHAR AS uid, NULL::VARCHAR AS parsed WHERE false")
            flows = FlowMerger()
            for r in _rows(db, "SELECT s.*, epoch_ns(s.ts) AS ts_ns, epoch_ns(s.last_ts) AS last_ns, p.parsed "
                               f"FROM sessions s LEFT JOIN (SELECT uid, any_value(parsed) AS parsed FROM ({by_records}) "
                               "GROUP BY uid) p USING (uid) ORDER BY s.ts"):
                emit([_flow(f) for f in flows.add(r)])
            emit([_flow(f) for f in flows.close()])
            # the protocol events of a session merged into an earlier one belong to that flow
            db.register("eve_flow_of", pa.table({"uid": pa.array(list(flows.flow_of), pa.string()),
                                                 "flow_uid": pa.array(list(flows.flow_of.values()), pa.string())}))
            for table, convert in EVENTS.items():
                if table in views:
                    if table in _CONFIGURED:
                        convert = partial(convert, options=options)
                    emit_table(db, table, convert, emit)
    except OSError as err:
        raise WiretrailError(f"cannot write to {out_dir}: {err.strerror}") from None
    return counts
