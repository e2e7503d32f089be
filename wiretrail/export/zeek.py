"""Zeek-compatible logs (JSON lines, Zeek's field names) from the metadata store.

Zeek's JSON writer prints times as epoch seconds with microsecond precision, intervals as
seconds, and leaves unset fields out of the record; we do the same so tools that read
Zeek's JSON logs (SIEM parsers, zeek-cut -j, jq recipes) read ours unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path

import duckdb

from wiretrail.errors import WiretrailError

# Store column -> Zeek conn.log field, in Zeek's order. Times are converted below.
CONN_FIELDS = [
    ("ts", "ts"),
    ("uid", "uid"),
    ("orig_h", "id.orig_h"),
    ("orig_p", "id.orig_p"),
    ("resp_h", "id.resp_h"),
    ("resp_p", "id.resp_p"),
    ("proto", "proto"),
    ("service", "service"),
    ("duration", "duration"),
    ("orig_bytes", "orig_bytes"),
    ("resp_bytes", "resp_bytes"),
    ("conn_state", "conn_state"),
    ("missed_bytes", "missed_bytes"),
    ("history", "history"),
    ("orig_pkts", "orig_pkts"),
    ("orig_ip_bytes", "orig_ip_bytes"),
    ("resp_pkts", "resp_pkts"),
    ("resp_ip_bytes", "resp_ip_bytes"),
    ("tunnel", "tunnel_parents"),
    ("vlan", "vlan"),
    ("inner_vlan", "inner_vlan"),
    ("community_id", "community_id"),
    ("link", "link"),
]

# Columns stored as integer nanoseconds (timestamps come back from DuckDB as datetimes,
# so we select them as epoch nanoseconds instead).
_TIME_COLUMNS = {"ts"}
_INTERVAL_COLUMNS = {"duration"}


def _select_list(columns: set[str]) -> list[tuple[str, str]]:
    return [(col, name) for col, name in CONN_FIELDS if col in columns]


def write_conn_log(db: duckdb.DuckDBPyConnection, out_dir: Path) -> int:
    """Write conn.log (Zeek JSON) from the `sessions` view; returns the number of records."""
    columns = {row[0] for row in db.execute("DESCRIBE sessions").fetchall()}
    fields = _select_list(columns)
    exprs = []
    for col, _ in fields:
        if col in _TIME_COLUMNS:
            exprs.append(f"epoch_ns({col}) AS {col}")
        else:
            exprs.append(col)
    cursor = db.execute(f"SELECT {', '.join(exprs)} FROM sessions ORDER BY ts, uid")
    out_dir.mkdir(parents=True, exist_ok=True)
    count = 0
    with open(out_dir / "conn.log", "w", encoding="utf-8") as out:
        while True:
            rows = cursor.fetchmany(65536)
            if not rows:
                break
            for row in rows:
                record = {}
                for (col, name), value in zip(fields, row):
                    if value is None or value == "":
                        continue
                    if col in _TIME_COLUMNS or col in _INTERVAL_COLUMNS:
                        value = round(value / 1e9, 6)
                    elif col == "tunnel":
                        value = [value]
                    record[name] = value
                out.write(json.dumps(record, separators=(",", ":")))
                out.write("\n")
                count += 1
    return count


def export(db: duckdb.DuckDBPyConnection, out_dir: Path) -> dict[str, int]:
    """Write every Zeek log the store can fill; returns records written per log."""
    try:
        return {"conn.log": write_conn_log(db, out_dir)}
    except OSError as err:
        raise WiretrailError(f"cannot write to {out_dir}: {err.strerror}") from None
