"""SQL over the store (DuckDB views over the Parquet tables), printed for people or programs."""

from __future__ import annotations

import csv
import datetime as dt
import json
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator

import duckdb

from wiretrail.errors import WiretrailError


@contextmanager
def open_store(store: Path) -> Iterator[duckdb.DuckDBPyConnection]:
    """A DuckDB connection with one view per table of the store (see store.metadata)."""
    from wiretrail.sessions.schema import SESSIONS_SCHEMA
    from wiretrail.store.metadata import open_db, register_schema

    register_schema("sessions", SESSIONS_SCHEMA)  # queryable (empty) before any session is stored

    if not Path(store).is_dir():
        raise WiretrailError(f"no store at {store} (ingest a capture first, or pass --store)")
    db = open_db(store)
    try:
        yield db
    finally:
        db.close()


def _plain(value):
    if isinstance(value, (dt.datetime, dt.date, dt.time, dt.timedelta)):
        return str(value)
    if isinstance(value, bytes):
        return value.hex()
    return value


def _print_table(names: list[str], rows: list[tuple], out: IO[str]) -> None:
    cells = [["" if v is None else str(_plain(v)) for v in row] for row in rows]
    widths = [len(n) for n in names]
    for row in cells:
        widths = [max(w, len(c)) for w, c in zip(widths, row)]
    numeric = [all(_is_number(r[i]) for r in rows) and bool(rows) for i in range(len(names))]

    def fmt(row):
        return "  ".join(c.rjust(w) if num else c.ljust(w) for c, w, num in zip(row, widths, numeric)).rstrip()

    out.write(fmt(names) + "\n")
    out.write("  ".join("-" * w for w in widths) + "\n")
    for row in cells:
        out.write(fmt(row) + "\n")
    out.write(f"({len(rows)} row{'s' if len(rows) != 1 else ''})\n")


def _is_number(v) -> bool:
    return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))


def run_sql(store: Path, query: str, fmt: str, out: IO[str]) -> None:
    """Run one SQL statement; `fmt` is table, csv or json (one JSON object per line)."""
    with open_store(store) as db:
        try:
            cursor = db.execute(query)
        except duckdb.Error as err:
            raise WiretrailError(f"SQL error: {str(err).splitlines()[0]}") from None
        if cursor.description is None:
            return
        names = [d[0] for d in cursor.description]
        if fmt == "table":
            _print_table(names, cursor.fetchall(), out)
            return
        writer = csv.writer(out, lineterminator="\n") if fmt == "csv" else None
        if writer:
            writer.writerow(names)
        while rows := cursor.fetchmany(10000):
            for row in rows:
                if writer:
                    writer.writerow(["" if v is None else _plain(v) for v in row])
                else:
                    out.write(json.dumps({n: _plain(v) for n, v in zip(names, row)}, default=str) + "\n")
