"""The packet index: for every stored packet, its session and where it is.

    index/day=<YYYYMMDD>/hour=<HH>/part-*.parquet   (sid, file_id, offset), sorted by sid

Rows are partitioned by the hour their session started, which the session id carries
(batch.SID_HOUR_SHIFT), so a session's packets are found by reading one hour's parts, and
within them Parquet's row-group statistics on the sorted `sid` skip the rest: an index
lookup, never a scan of the capture files (Arkime keeps per-session packet positions for
the same reason). A packet's time is not repeated here: its record header in the capture
file has it, and extraction reads that header anyway (timestamps were 60% of the index's
bytes and 40% of the time spent writing it, on mix.pcap).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from wiretrail import arrow_compute as ac
from wiretrail.batch import SID_HOUR_SHIFT
from wiretrail.jit import kernel
from wiretrail.store.metadata import INDEX_DIR, INDEX_SCHEMA, compact, partition_dir, runs_of, write_part


# Offsets grow within a session: delta encoding packs them; statistics are only useful on
# `sid`, which lookups filter on. LZ4: the index is written at packet rate, and costs a third
# less CPU than with zstd for 3% more bytes (measured on mix.pcap's index).
PARQUET_OPTIONS = {"use_dictionary": False, "write_statistics": ["sid"], "compression": "lz4",
                   "column_encoding": {"offset": "DELTA_BINARY_PACKED"}}


@kernel(allocates=True)
def _sorted_by_session(sid, file_id, offset, table, group_key, group_start, row_group,
                       out_sid, out_file_id, out_offset):
    """The index rows sorted by session, stably (each session's rows stay in capture order),
    written straight into the out_ columns.

    An index flush holds ~20 packets per session, so rows are grouped through a hash table,
    only the distinct sessions are sorted, and rows are placed by counting. Session ids are
    hashes below their hour bits: a plain sort meets random order (numpy's stable argsort:
    0.2 s per 1.7 M rows here), and an argsort followed by four gathers read every column
    twice more."""
    n = sid.shape[0]
    mask = np.uint64(table.shape[0] - 1)
    groups = 0
    for i in range(n):
        key = sid[i]
        h = (np.uint64(key) * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(20)
        while True:
            h &= mask
            g = table[h]
            if g < 0:
                g = groups
                groups += 1
                table[h] = g
                group_key[g] = key
                group_start[g] = 0
                break
            if group_key[g] == key:
                break
            h += np.uint64(1)
        row_group[i] = g
        group_start[g] += 1
    rank = np.argsort(group_key[:groups])
    pos = 0
    for r in range(groups):
        g = rank[r]
        count = group_start[g]
        group_start[g] = pos
        pos += count
    for i in range(n):
        g = row_group[i]
        k = group_start[g]
        group_start[g] = k + 1
        out_sid[k] = sid[i]
        out_file_id[k] = file_id[i]
        out_offset[k] = offset[i]


class _SortSpace:
    """sort_by_session's table, work columns and output, kept from one flush to the next: made
    anew for each, they were fresh pages every time (a page fault each)."""

    def __init__(self):
        self.rows = 0
        self.arrays: tuple[np.ndarray, ...] = ()

    def take(self, n: int, room: int = 0) -> tuple[np.ndarray, ...]:
        """(table, group_key, group_start, row_group, out_sid, out_file_id, out_offset) for n rows
        (made for `room` rows if they must be made anew)."""
        if n > self.rows or not self.arrays:
            self.rows = max(n, room, 2 * self.rows)
            types = (np.int64, np.int64, np.int32, np.int64, np.int32, np.int64)
            self.arrays = (np.empty(1 << max(4, self.rows.bit_length()), dtype=np.int32),
                           *(np.empty(self.rows, dtype=t) for t in types))
        table = self.arrays[0][:1 << max(4, n.bit_length())]
        table.fill(-1)
        return (table, *(a[:n] for a in self.arrays[1:]))


def sort_by_session(sid: np.ndarray, file_id: np.ndarray, offset: np.ndarray,
                    space: _SortSpace | None = None, room: int = 0) -> tuple[np.ndarray, ...]:
    """(sid int64, file_id int32, offset int64) sorted by sid, stably; in `space`'s arrays (valid
    until its next use; made for `room` rows if it has too few) if given."""
    # int32 slots, one more than the rows at least: never full, and small enough to stay in cache
    table, group_key, group_start, row_group, *out = (space or _SortSpace()).take(len(sid), room)
    _sorted_by_session(np.ascontiguousarray(sid, dtype=np.int64), np.ascontiguousarray(file_id, dtype=np.int32),
                       np.ascontiguousarray(offset, dtype=np.int64), table, group_key, group_start, row_group, *out)
    return tuple(out)


class IndexWriter:
    def __init__(self, root: Path, flush_seconds: float = 5.0, flush_rows: int = 500_000):
        self.base = Path(root) / INDEX_DIR
        self.flush_seconds = flush_seconds
        self.flush_rows = flush_rows
        # the rows waiting for a flush: pending[k][:rows], columns kept from one flush to the next
        self.pending = (np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int32), np.empty(0, dtype=np.int64))
        self.rows = 0
        self.last_flush = time.monotonic()
        self.touched: set[int] = set()
        self._space = _SortSpace()

    def append(self, sid: np.ndarray, file_id: np.ndarray, offset: np.ndarray) -> None:
        n = len(sid)
        if not n:
            return
        end = self.rows + n
        if end > len(self.pending[0]):
            # a flush's worth at once (flushes come after a batch past flush_rows): no copies
            # while the first one fills up
            room = max(end, 2 * len(self.pending[0]), self.flush_rows + (self.flush_rows >> 2))
            grown = tuple(np.empty(room, dtype=c.dtype) for c in self.pending)
            for old, new in zip(self.pending, grown):
                new[:self.rows] = old[:self.rows]
            self.pending = grown
        for column, values in zip(self.pending, (sid, file_id, offset)):
            column[self.rows:end] = values
        self.rows = end

    def maybe_flush(self) -> None:
        if self.rows >= self.flush_rows or time.monotonic() - self.last_flush >= self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        if self.rows:
            # sorted by session; a session id starts with its hour, so the sort also lays the
            # hours out one after another
            cols = sort_by_session(*(c[:self.rows] for c in self.pending), space=self._space,
                                   room=len(self.pending[0]))
            hours = cols[0] >> SID_HOUR_SHIFT
            for lo, hi in runs_of(hours):
                part = pa.Table.from_arrays([pa.array(c[lo:hi]) for c in cols], schema=INDEX_SCHEMA)
                hour = int(hours[lo])
                write_part(partition_dir(self.base, hour), part, **PARQUET_OPTIONS)
                self.touched.add(hour)
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
    import pyarrow.parquet as pq  # here: ingest only writes (see metadata._write_parquet)

    tables = [pq.read_table(p, filters=[("sid", "=", int(sid))], schema=INDEX_SCHEMA) for p in parts]
    table = pa.concat_tables(tables)
    return ac.sort_by(table, [("file_id", "ascending"), ("offset", "ascending")])
