"""Zeek-compatible logs (JSON lines, Zeek's field names) from the metadata store.

Zeek's JSON writer prints times as epoch seconds with microsecond precision, intervals as
seconds, and leaves unset fields out of the record; we do the same so tools that read
Zeek's JSON logs (SIEM parsers, zeek-cut -j, jq recipes) read ours unchanged. Columns
Zeek does not have (ja4, malformed, ...) are written too: Zeek readers skip unknown
fields, and analysts want them.
"""

from __future__ import annotations

import json
from pathlib import Path

import duckdb

from wiretrail.errors import WiretrailError

# Store column -> Zeek conn.log field, in Zeek's order.
CONN_FIELDS = [
    ("ts", "ts"), ("uid", "uid"), ("orig_h", "id.orig_h"), ("orig_p", "id.orig_p"), ("resp_h", "id.resp_h"),
    ("resp_p", "id.resp_p"), ("proto", "proto"), ("service", "service"), ("duration", "duration"),
    ("orig_bytes", "orig_bytes"), ("resp_bytes", "resp_bytes"), ("conn_state", "conn_state"),
    ("missed_bytes", "missed_bytes"), ("history", "history"), ("orig_pkts", "orig_pkts"),
    ("orig_ip_bytes", "orig_ip_bytes"), ("resp_pkts", "resp_pkts"), ("resp_ip_bytes", "resp_ip_bytes"),
    ("tunnel", "tunnel_parents"), ("vlan", "vlan"), ("inner_vlan", "inner_vlan"),
    ("community_id", "community_id"), ("orig_l2_addr", "orig_l2_addr"), ("resp_l2_addr", "resp_l2_addr"),
    ("link", "link"), ("app", "app"), ("category", "category"),
]

_ID = {"orig_h": "id.orig_h", "orig_p": "id.orig_p", "resp_h": "id.resp_h", "resp_p": "id.resp_p"}

# Zeek log -> (store table, column renames beyond the id.* ones, rows to keep (SQL) or None).
LOGS: dict[str, tuple[str, dict[str, str], str | None]] = {
    "dns.log": ("dns", {}, None),
    "dhcp.log": ("dhcp", {}, None),
    "ssl.log": ("tls", {}, None),
    "x509.log": ("x509", {
        "version": "certificate.version", "serial": "certificate.serial", "subject": "certificate.subject",
        "issuer": "certificate.issuer", "not_valid_before": "certificate.not_valid_before",
        "not_valid_after": "certificate.not_valid_after", "key_alg": "certificate.key_alg",
        "sig_alg": "certificate.sig_alg", "key_type": "certificate.key_type",
        "key_length": "certificate.key_length", "exponent": "certificate.exponent", "curve": "certificate.curve",
        "san_dns": "san.dns", "san_uri": "san.uri", "san_email": "san.email", "san_ip": "san.ip",
        "basic_constraints_ca": "basic_constraints.ca", "basic_constraints_path_len": "basic_constraints.path_len",
    }, None),
    "http.log": ("http", {}, None),
    "ftp.log": ("ftp", {
        "data_channel_passive": "data_channel.passive", "data_channel_orig_h": "data_channel.orig_h",
        "data_channel_resp_h": "data_channel.resp_h", "data_channel_resp_p": "data_channel.resp_p",
    }, None),
    "smtp.log": ("smtp", {}, None),
    "ssh.log": ("ssh", {}, None),
    "smb_files.log": ("smb", {"tree": "path"}, "action IS NOT NULL"),
}

# Integer-nanosecond columns that Zeek writes as intervals (seconds).
_INTERVALS = {"duration", "rtt"}


def _write(db: duckdb.DuckDBPyConnection, table: str, renames: dict[str, str], where: str | None,
           path: Path, fields: list[tuple[str, str]] | None = None) -> int:
    described = db.execute(f'DESCRIBE "{table}"').fetchall()
    types = {row[0]: row[1] for row in described}
    if fields is None:
        fields = [(col, renames.get(col, _ID.get(col, col))) for col in types]
    fields = [(col, name) for col, name in fields if col in types]
    exprs = [f'epoch_ns("{col}") AS "{col}"' if types[col].startswith("TIMESTAMP") else f'"{col}"'
             for col, _ in fields]
    times = {col for col, _ in fields if types[col].startswith("TIMESTAMP")}
    intervals = {col for col, _ in fields if col in _INTERVALS and types[col] in ("BIGINT", "INTEGER")}
    order = "ORDER BY ts" + (", uid" if "uid" in types else "") if "ts" in types else ""
    cursor = db.execute(f'SELECT {", ".join(exprs)} FROM "{table}" {"WHERE " + where if where else ""} {order}')
    count = 0
    with open(path, "w", encoding="utf-8") as out:
        while rows := cursor.fetchmany(65536):
            for row in rows:
                record = {}
                for (col, name), value in zip(fields, row):
                    if value is None or value == "" or value == []:
                        continue
                    if col in times or col in intervals:
                        value = round(value / 1e9, 6)
                    elif col == "tunnel":
                        value = [value]
                    record[name] = value
                out.write(json.dumps(record, separators=(",", ":"), default=str))
                out.write("\n")
                count += 1
    return count


def export(db: duckdb.DuckDBPyConnection, out_dir: Path) -> dict[str, int]:
    """Write every Zeek log the store can fill; returns records written per log."""
    tables = {row[0] for row in db.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall()}
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        written = {"conn.log": _write(db, "sessions", {}, None, out_dir / "conn.log", CONN_FIELDS)}
        for log, (table, renames, where) in LOGS.items():
            if table in tables:
                written[log] = _write(db, table, renames, where, out_dir / log)
        return written
    except OSError as err:
        raise WiretrailError(f"cannot write to {out_dir}: {err.strerror}") from None
