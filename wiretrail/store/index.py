"""The packet index: for every stored packet, its session and where it is.

    index/day=<YYYYMMDD>/hour=<HH>/part-*.parquet   (sid, file_id, offset, ts), sorted by sid

Rows are partitioned by the hour their session started, which the session id carries
(batch.SID_HOUR_SHIFT), so a session's packets are found by reading one hour's parts, and
within them Parquet's row-group statistics on the sorted `sid` skip the rest: an index
lookup, never a scan of the capture files (Arkime keeps per-session packet positions for
the same reason).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from wiretrail.batch import SID_HOUR_SHIFT
from wiretrail.store.metadata import INDEX_DIR, INDEX_SCHEMA, compact, partition_dir, write_by_hour


# Offsets and times grow within a session: delta encoding packs them; statistics are only
# useful on `sid`, which lookups filter on.
PARQUET_OPTIONS = {"use_dictionary": False, "write_statistics": ["sid"],
                   "column_encoding": {"offset": "DELTA_BINARY_PACKED", "ts": "DELTA_BINARY_PACKED"}}


class IndexWriter:
    def __init__(self, root: Path, flush_seconds: float = 5.0, flush_rows: int = 500_000):
        self.base = Path(root) / INDEX_DIR
        self.flush_seconds = flush_seconds
        self.flush_rows = flush_rows
        self.pending: list[tuple[np.ndarray, ...]] = []
        self.rows = 0
        self.last_flush = time.monotonic()
        self.touched: set[int] = set()

    def append(self, sid: np.ndarray, file_id: np.ndarray, offset: np.ndarray, ts: np.ndarray) -> None:
        if len(sid):
            self.pending.append((sid.astype(np.int64, copy=False), file_id.astype(np.int32, copy=False),
                                 offset.astype(np.int64, copy=False), ts.astype(np.int64, copy=False)))
            self.rows += len(sid)

    def maybe_flush(self) -> None:
        if self.rows >= self.flush_rows or time.monotonic() - self.last_flush >= self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            cols = [np.concatenate(c) for c in zip(*self.pending)]
            # sort by session; stable, so each session's rows stay in capture order
            order = np.argsort(cols[0], kind="stable")
            cols = [c[order] for c in cols]
            table = pa.Table.from_arrays([pa.array(c) for c in cols], schema=INDEX_SCHEMA)
            hours = cols[0] >> SID_HOUR_SHIFT
            write_by_hour(self.base, table, hours, **PARQUET_OPTIONS)
            self.touched.update(np.unique(hours).tolist())
        self.pending.clear()
        self.rows = 0
        self.last_flush = time.monotonic()

    def close(self) -> None:
        self.flush()
        for hour in sorted(self.touched):
            compact(partition_dir(self.base, hour), sort_by="sid", **PARQUET_OPTIONS)


def lookup(root: Path, sid: int) -> pa.Table:
    """Index rows of session `sid`, in capture order (file, offset)."""
    directory = partition_dir(Path(root) / INDEX_DIR, int(sid) >> SID_HOUR_SHIFT)
    parts = sorted(directory.glob("*.parquet"))
    if not parts:
        return INDEX_SCHEMA.empty_table()
    tables = [pq.read_table(p, filters=[("sid", "=", int(sid))], schema=INDEX_SCHEMA) for p in parts]
    table = pa.concat_tables(tables)
    return table.sort_by([("file_id", "ascending"), ("offset", "ascending")])
