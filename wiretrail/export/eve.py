"""Suricata EVE JSON (one `eve.json`) from the metadata store.

Event types: flow (every session), dns, http, tls, smb, ftp, smtp. Each event carries
Suricata's common fields (timestamp, flow_id, event_type, src_ip, src_port, dest_ip,
dest_port, proto, app_proto, community_id); `flow_id` is the session id, the same for a
session's flow and protocol events, as Suricata does. src is the session's originator.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import duckdb

from wiretrail.errors import WiretrailError

_PROTO = {"tcp": "TCP", "udp": "UDP", "icmp": "ICMP"}
_B62 = {c: i for i, c in enumerate("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")}


def _timestamp(ns: int) -> str:
    t = dt.datetime.fromtimestamp(ns // 1_000_000_000, dt.timezone.utc)
    return t.strftime("%Y-%m-%dT%H:%M:%S") + f".{(ns % 1_000_000_000) // 1000:06d}+0000"


def _flow_id(uid: str) -> int:
    v = 0
    for ch in uid[1:]:
        v = v * 62 + _B62.get(ch, 0)
    return v


def _rows(db: duckdb.DuckDBPyConnection, query: str):
    cursor = db.execute(query)
    names = [d[0] for d in cursor.description]
    while rows := cursor.fetchmany(65536):
        for row in rows:
            yield dict(zip(names, row))


def _clean(d: dict) -> dict:
    return {k: v for k, v in d.items() if v is not None and v != [] and v != ""}


def _state(conn_state: str | None) -> str:
    if conn_state in ("SF", "RSTO", "RSTR", "RSTOS0", "RSTRH", "REJ", "SH", "SHR"):
        return "closed"
    if conn_state in ("S0", "OTH", None):
        return "new"
    return "established"


def _flow(r: dict) -> dict:
    proto = _PROTO.get(r["proto"], str(r["ip_proto"]))
    if proto == "ICMP" and ":" in (r["orig_h"] or ""):
        proto = "IPv6-ICMP"
    flow = _clean({
        "pkts_toserver": r["orig_pkts"], "pkts_toclient": r["resp_pkts"],
        "bytes_toserver": r["orig_ip_bytes"], "bytes_toclient": r["resp_ip_bytes"],
        "start": _timestamp(r["ts_ns"]), "end": _timestamp(r["last_ns"]),
        "age": (r["last_ns"] - r["ts_ns"]) // 1_000_000_000, "state": _state(r["conn_state"]),
        "reason": "timeout", "alerted": False,
    })
    event = {"timestamp": _timestamp(r["ts_ns"]), "flow_id": _flow_id(r["uid"]), "event_type": "flow",
             "src_ip": r["orig_h"], "src_port": r["orig_p"], "dest_ip": r["resp_h"], "dest_port": r["resp_p"],
             "proto": proto, "app_proto": r["service"] or "failed" if r["proto"] == "tcp" else r["service"],
             "flow": flow, "community_id": r["community_id"]}
    if r["vlan"] is not None:
        event["vlan"] = [r["vlan"]] + ([r["inner_vlan"]] if r["inner_vlan"] is not None else [])
    if r["icmp_type"] is not None:
        event["icmp_type"], event["icmp_code"] = r["icmp_type"], r["icmp_code"]
    return _clean(event)


def _head(r: dict, event_type: str, app_proto: str, proto: str) -> dict:
    return {"timestamp": _timestamp(r["ts_ns"]), "flow_id": _flow_id(r["uid"]), "event_type": event_type,
            "src_ip": r.get("orig_h"), "src_port": r.get("orig_p"), "dest_ip": r.get("resp_h"),
            "dest_port": r.get("resp_p"), "proto": proto, "app_proto": app_proto}


def _dns(r: dict) -> list[dict]:
    proto = "TCP" if r.get("proto") == "tcp" else "UDP"
    out = []
    if r.get("query") is not None or r.get("qtype_name"):
        e = _head(r, "dns", "dns", proto)
        e["dns"] = _clean({"version": 2, "type": "query", "id": r.get("trans_id"), "rrname": r.get("query"),
                           "rrtype": r.get("qtype_name"), "opcode": r.get("opcode")})
        out.append(_clean(e))
    if r.get("rcode_name") is not None:
        e = _head(r, "dns", "dns", proto)
        answers = [_clean({"rrname": r.get("query"), "rrtype": r.get("qtype_name"), "ttl": int(ttl) if ttl is not None else None,
                           "rdata": a}) for a, ttl in zip(r.get("answers") or [], (r.get("TTLs") or []) + [None] * 999)]
        e["dns"] = _clean({"version": 2, "type": "answer", "id": r.get("trans_id"), "flags": f"{r.get('flags_raw') or 0:x}",
                           "qr": True, "aa": r.get("AA") or None, "tc": r.get("TC") or None, "rd": r.get("RD") or None,
                           "ra": r.get("RA") or None, "rrname": r.get("query"), "rrtype": r.get("qtype_name"),
                           "rcode": r.get("rcode_name"), "answers": answers})
        out.append(_clean(e))
    return out


def _http(r: dict) -> list[dict]:
    e = _head(r, "http", "http", "TCP")
    types = r.get("resp_mime_types") or []
    e["http"] = _clean({"hostname": r.get("host"), "url": r.get("uri"), "http_user_agent": r.get("user_agent"),
                        "http_content_type": types[0] if types else None, "http_refer": r.get("referrer"),
                        "http_method": r.get("method"), "protocol": f"HTTP/{r['version']}" if r.get("version") else None,
                        "status": r.get("status_code"), "length": r.get("response_body_len"),
                        "xff": r.get("xff")})
    return [_clean(e)]


def _tls_version(v: str | None) -> str | None:
    if not v:
        return None
    return {"TLSv10": "TLS 1.0", "TLSv11": "TLS 1.1", "TLSv12": "TLS 1.2", "TLSv13": "TLS 1.3",
            "SSLv3": "SSLv3", "SSLv2": "SSLv2"}.get(v, v)


def _tls(r: dict) -> list[dict]:
    e = _head(r, "tls", "tls", "TCP")
    e["tls"] = _clean({"subject": r.get("subject"), "issuerdn": r.get("issuer"), "sni": r.get("server_name"),
                       "version": _tls_version(r.get("version")),
                       "ja3": {"hash": r["ja3"]} if r.get("ja3") else None,
                       "ja3s": {"hash": r["ja3s"]} if r.get("ja3s") else None, "ja4": r.get("ja4"),
                       "client_alpns": r.get("alpn")})
    return [_clean(e)]


def _generic(event_type: str, fields: dict[str, str]):
    def convert(r: dict) -> list[dict]:
        e = _head(r, event_type, event_type, "TCP")
        e[event_type] = _clean({eve: r.get(col) for eve, col in fields.items()})
        return [_clean(e)]
    return convert


# store table -> EVE converter
EVENTS = {
    "dns": _dns, "http": _http, "tls": _tls,
    "ftp": _generic("ftp", {"command": "command", "command_data": "arg", "reply": "reply_msg",
                            "completion_code": "reply_code", "dynamic_port": "data_channel_resp_p"}),
    "smtp": _generic("smtp", {"helo": "helo", "mail_from": "mailfrom", "rcpt_to": "rcptto"}),
    "smb": _generic("smb", {"dialect": "dialect", "command": "command", "status": "status",
                            "filename": "name", "share": "tree"}),
}


def export(db: duckdb.DuckDBPyConnection, out_dir: Path) -> dict[str, int]:
    """Write eve.json; returns events written per event type."""
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
            for r in _rows(db, "SELECT *, epoch_ns(ts) AS ts_ns, epoch_ns(last_ts) AS last_ns FROM sessions ORDER BY ts"):
                emit([_flow(r)])
            for table, convert in EVENTS.items():
                if table in views:
                    for r in _rows(db, f'SELECT *, epoch_ns(ts) AS ts_ns FROM "{table}" ORDER BY ts'):
                        emit(convert(r))
    except OSError as err:
        raise WiretrailError(f"cannot write to {out_dir}: {err.strerror}") from None
    return counts
