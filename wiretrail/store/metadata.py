"""The metadata store: Parquet parts per table and hour, DuckDB views over them.

    tables/<table>/day=<YYYYMMDD>/hour=<HH>/part-<ns>-<pid>-<n>.parquet

Rows are buffered in memory and written out every `flush_seconds` (or `flush_rows`), one
part per table and hour, under a temporary name renamed when complete: a reader, or what
is left after a `kill -9`, only ever sees whole parts, and at most the last few seconds of
rows are lost. The hour of a row is the hour of its `ts` column unless the caller says
otherwise. When an hour holds many small parts they are merged into one (`compact`).
"""

from __future__ import annotations

import calendar
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
from pyarrow._parquet import ParquetWriter

from wiretrail import arrow_compute as ac
from wiretrail.batch import HOUR_NS
from wiretrail.errors import WiretrailError

if TYPE_CHECKING:
    import duckdb

TABLES_DIR = "tables"
INDEX_DIR = "index"
_SCHEMAS: dict[str, pa.Schema] = {}
_part_seq = 0


def register_schema(name: str, schema: pa.Schema) -> None:
    """Declare a table, so that it is queryable (empty) before any row of it is stored."""
    _SCHEMAS[name] = schema


def partition_dir(base: Path, hour: int) -> Path:
    day, hh = time.strftime("%Y%m%d %H", time.gmtime(hour * 3600)).split()
    return base / f"day={day}" / f"hour={hh}"


def hour_of_partition(path: Path) -> int | None:
    """Hours since the epoch of a `day=YYYYMMDD/hour=HH` directory, None if not one."""
    try:
        day = time.strptime(path.parent.name.removeprefix("day="), "%Y%m%d")
        hh = int(path.name.removeprefix("hour="))
    except ValueError:
        return None
    return calendar.timegm(day) // 3600 + hh


# Columns whose values are (nearly) all distinct random text: dictionary encoding them is
# wasted work, and so is compressing them (LZ4 finds nothing in random base62/base64 and
# cost 17% of writing a sessions part; the part is 10% larger without it).
_UNIQUE_COLUMNS = {"uid", "community_id"}


def _dictionary_columns(schema: pa.Schema) -> list[str]:
    """Dictionary-encode only repeating strings: trying it on integer columns and on unique
    strings cost more than all the rest of writing a part (measured: 0.25 s vs 0.04 s per
    million index rows)."""
    return [f.name for f in schema if pa.types.is_string(f.type) and f.name not in _UNIQUE_COLUMNS]


# Min/max statistics let a query skip parts and row groups, which only works on columns that
# follow the order rows are written in: time, and the session id (its high bits are the hour).
# On the others they cost writing time (15% of a sessions part) and prune nothing.
_STATISTICS_COLUMNS = ("ts", "last_ts", "sid")


def _statistics_columns(schema: pa.Schema) -> list[str]:
    return [name for name in _STATISTICS_COLUMNS if schema.get_field_index(name) >= 0]


def _compression(schema: pa.Schema) -> str | dict[str, str]:
    # per column only for flat schemas: a nested column missing from the mapping (it would
    # need its leaf paths, "answers.list.element") is written uncompressed
    if not any(name in _UNIQUE_COLUMNS for name in schema.names) or any(pa.types.is_nested(f.type) for f in schema):
        return "lz4"
    return {name: "none" if name in _UNIQUE_COLUMNS else "lz4" for name in schema.names}


def _writable(table: pa.Table) -> pa.Table:
    """`table` as Parquet will write it: a column declared not null (schemas declare the ones
    every row has, which spares Parquet their definition levels) that holds a null after all is
    written nullable, rather than the part failing (Parquet refuses it) and its rows lost."""
    schema = original = table.schema
    for i, field in enumerate(original):
        if not field.nullable and table.column(i).null_count:
            schema = schema.set(i, field.with_nullable(True))
    return table if schema is original else pa.Table.from_arrays(table.columns, schema=schema)


def part_options(schema: pa.Schema) -> dict:
    """The Parquet writer's options for a part of a table of `schema` (write_part's, before the
    caller's own)."""
    return {"compression": _compression(schema), "row_group_size": 1 << 17,
            "use_dictionary": _dictionary_columns(schema), "write_statistics": _statistics_columns(schema)}


def write_part(directory: Path, table: pa.Table, **parquet_options) -> Path:
    """Write one Parquet part atomically (temporary name, then rename).

    LZ4, not zstd: a zstd context is set up for every column chunk, about 1.4 ms more per part
    of a 36-column table whatever its rows, and ingest writes a part per table and hour at
    each flush (measured on mix.pcap, interleaved runs: 0.09 CPU s less for a full ingest).
    The parts are about 45% larger, under 2% of the store (packets are the rest), and read
    faster."""
    global _part_seq
    _part_seq += 1
    name = f"part-{time.time_ns()}-{os.getpid()}-{_part_seq}.parquet"
    tmp = directory / (name + ".tmp")
    options = {**part_options(table.schema), **parquet_options}
    table = _writable(table)
    # built in memory and written with one call: a path given to pyarrow costs a filesystem
    # lookup and an output stream per part (0.3 of the 1.0 ms a one-row part took)
    try:
        sink = pa.BufferOutputStream()
        _write_parquet(table, sink, **options)
        try:
            f = open(tmp, "wb")
        except FileNotFoundError:  # the partition's first part (a mkdir per part cost more than a small part)
            directory.mkdir(parents=True, exist_ok=True)
            f = open(tmp, "wb")
        with f:
            f.write(sink.getvalue())
        os.replace(tmp, directory / name)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise WiretrailError(f"cannot write the metadata store: {err.strerror}: {directory}") from None
    return directory / name


# What pyarrow.parquet.write_table passes to the writer beside the caller's options. The writer
# is pyarrow's own (pyarrow._parquet, which pyarrow.parquet wraps): `import pyarrow.parquet`
# also imports pyarrow.fs and with it the S3, GCS, Azure and HDFS bindings and ssl, 10 ms of
# every ingest for a sink that is a buffer in memory. pyarrow is pinned, and tests/test_store.py
# checks the bytes against pyarrow.parquet.write_table's.
_WRITER_DEFAULTS = {"version": "2.6", "writer_engine_version": "V2", "data_page_version": "1.0",
                    "use_deprecated_int96_timestamps": False, "use_compliant_nested_type": True,
                    "store_schema": True}


def _write_parquet(table: pa.Table, sink, row_group_size: int | None = None, **options) -> None:
    writer = ParquetWriter(sink, table.schema, **{**_WRITER_DEFAULTS, **options})
    try:
        writer.write_table(table, row_group_size=row_group_size)
    finally:
        writer.close()


def runs_of(values: np.ndarray) -> list[tuple[int, int]]:
    """(start, end) of each run of equal neighbours in `values`."""
    cuts = np.flatnonzero(np.diff(values)) + 1
    return list(zip([0, *cuts.tolist()], [*cuts.tolist(), len(values)]))


def write_by_hour(base: Path, pieces: list[tuple[pa.Table, np.ndarray]], **parquet_options) -> list[int]:
    """Write tables (each with its rows' hours) as one part per hour.

    Each hour's part is written from contiguous columns: its runs of rows are gathered and
    copied together once (each hour keeps its rows' order). Writing the runs as they were
    copied nothing, but sessions close out of start-time order, and Parquet then wrote
    columns of hundreds of tiny chunks: 0.17-0.23 CPU s against 0.12 s for the session parts
    of mix.pcap. The gathering is `combine_chunks` of the runs' slices: one copy, and no index
    array as `take` needs (pyarrow's own `take` would also import pyarrow.compute: see
    wiretrail.arrow_compute).
    """
    pieces = [(t, h) for t, h in pieces if t.num_rows]
    if not pieces:
        return []
    table = pieces[0][0] if len(pieces) == 1 else pa.concat_tables([t for t, _ in pieces])
    hours = pieces[0][1] if len(pieces) == 1 else np.concatenate([h for _, h in pieces])
    runs_by_hour: dict[int, list[pa.Table]] = {}
    for lo, hi in runs_of(hours):
        runs_by_hour.setdefault(int(hours[lo]), []).append(table.slice(lo, hi - lo))
    for hour in sorted(runs_by_hour):
        runs = runs_by_hour[hour]
        part = runs[0] if len(runs) == 1 else pa.concat_tables(runs)
        write_part(partition_dir(base, hour), part.combine_chunks(), **parquet_options)
    return sorted(runs_by_hour)


def _ts_hours(table: pa.Table) -> np.ndarray:
    column = table.column("ts")
    ts = np.concatenate([c.view(pa.int64()).to_numpy(zero_copy_only=False) for c in column.chunks]) \
        if column.num_chunks != 1 else column.chunk(0).view(pa.int64()).to_numpy(zero_copy_only=False)
    return ts // HOUR_NS


class TableWriter:
    """Buffers rows per table and writes them out as hourly parts every few seconds."""

    def __init__(self, root: Path, flush_seconds: float = 5.0, flush_rows: int = 100_000):
        self.base = Path(root) / TABLES_DIR
        self.flush_seconds = flush_seconds
        self.flush_rows = flush_rows
        self.pending: dict[str, list[pa.Table]] = {}
        self.rows = 0
        self.last_flush = time.monotonic()
        self.touched: set[tuple[str, int]] = set()

    def append(self, name: str, table: pa.Table) -> None:
        if table.num_rows:
            self.pending.setdefault(name, []).append(table)
            self.rows += table.num_rows

    def maybe_flush(self) -> None:
        if self.rows >= self.flush_rows or time.monotonic() - self.last_flush >= self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        for name, tables in self.pending.items():
            hours = write_by_hour(self.base / name, [(t, _ts_hours(t)) for t in tables])
            self.touched.update((name, h) for h in hours)
        self.pending.clear()
        self.rows = 0
        self.last_flush = time.monotonic()

    def close(self) -> None:
        self.flush()
        for name, hour in sorted(self.touched):
            compact(partition_dir(self.base / name, hour))


def compact(directory: Path, min_parts: int = 8, sort_by: str | None = None, **parquet_options) -> None:
    """Merge the parts of one partition into one when there are at least `min_parts`.

    The merged part is complete on disk before the small ones go: a reader sees the rows
    twice for an instant at worst, never loses them.
    """
    parts = sorted(directory.glob("part-*.parquet"))
    if len(parts) < min_parts:
        return
    import pyarrow.parquet as pq  # (see _write_parquet)

    table = pa.concat_tables([pq.read_table(p) for p in parts], promote_options="default")
    if sort_by:
        table = ac.sort_by(table, sort_by)
    write_part(directory, table, **parquet_options)
    for p in parts:
        p.unlink(missing_ok=True)


def remove_stale_parts(root: Path) -> int:
    """Delete temporary parts a killed writer left behind (call holding the writer lock)."""
    stale = [*(Path(root) / TABLES_DIR).glob("*/*/*/*.parquet.tmp"), *(Path(root) / INDEX_DIR).glob("*/*/*.parquet.tmp")]
    for p in stale:
        p.unlink(missing_ok=True)
    return len(stale)


def _view_sql(name: str, pattern: str) -> str:
    return (f"CREATE OR REPLACE VIEW \"{name}\" AS SELECT * FROM read_parquet('{pattern}', "
            "union_by_name = true, hive_partitioning = false)")


def open_db(root: Path) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB with one view per table (and `packet_index` over the packet index).

    Views are built at open from the parts on disk; a table with no part yet is an empty view
    of its registered schema, so queries work on a new store.
    """
    import duckdb  # here, not at the top: ingest never queries, and the import costs 80 ms

    root = Path(root)
    db = duckdb.connect(":memory:")
    names = set(_SCHEMAS)
    tables = root / TABLES_DIR
    if tables.is_dir():
        names |= {p.name for p in tables.iterdir() if p.is_dir()}
    sources = {name: tables / name for name in names}
    sources["packet_index"] = root / INDEX_DIR
    for name, base in sorted(sources.items()):
        if any(base.glob("*/*/*.parquet")):
            db.execute(_view_sql(name, str(base / "*" / "*" / "*.parquet").replace("'", "''")))
        elif name in _SCHEMAS or name == "packet_index":
            schema = _SCHEMAS.get(name) or INDEX_SCHEMA
            db.register(f"_empty_{name}", schema.empty_table())
            db.execute(f"CREATE OR REPLACE VIEW \"{name}\" AS SELECT * FROM \"_empty_{name}\"")
    return db


# The packet index: where each stored packet of a session is (see store.index). Never null,
# and declared so: Parquet then writes no definition levels (a third of the time writing the
# index took, 1.7 M rows for mix.pcap); parts written before, with nullable columns, read the same.
INDEX_SCHEMA = pa.schema([
    pa.field("sid", pa.int64(), nullable=False),
    pa.field("file_id", pa.int32(), nullable=False),
    pa.field("offset", pa.int64(), nullable=False),
])
