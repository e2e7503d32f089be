"""A row of columns per live session for the application stage's per-session state, at the
session's own row in the flow table.

The stage and nDPI keep a few values per session (its nDPI flow, its label, whether its TCP
streams are wanted...) as numpy columns indexed by a row, so that per-session decisions are
array operations. The row is the one FlowTable.update gives every packet's session (a session
keeps it until it closes, and no two live sessions share one): finding a packet's row is
then no lookup at all, only a check. (A session id was hashed to a row of this table's own
for every packet before: the 1.9 M rows asked for on mix.pcap took 31 ms, 20 ms now.) Each
row records which session it holds (`sid`): a row taken by a new session starts with every
column at its fill value. An open-addressing hash table (linear probing) from session id to
row is kept beside, filled once per session, for callers that know a session only by its
id: closing it (`find`, `release`) and the rows a module reports by session id.
"""

from __future__ import annotations

import numpy as np

from wiretrail.jit import kernel

_EMPTY = -1
# st (the table's scalars): keys in the table, sessions evicted (see attach)
ST_KEYS, ST_EVICTED = 0, 1


@kernel
def _slot_of(sid, mask):
    """Where session id `sid` starts probing (splitmix64's finaliser: ids differ in low and
    high bits alike)."""
    z = np.uint64(sid) * np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return np.int64(z & np.uint64(mask))


@kernel(inline=True)
def _probe(keys, s, mask):
    """Where session id s is in the table, or the empty slot where it would go."""
    h = _slot_of(s, mask)
    while keys[h] != s and keys[h] != _EMPTY:
        h = (h + 1) & mask
    return h


@kernel(inline=True)
def _delete(keys, vals, st, s, mask):
    """Forget session id s if present. Deletion by backward shift (no tombstones: probes stay
    as short as the load factor says)."""
    h = _probe(keys, s, mask)
    if keys[h] == _EMPTY:
        return
    st[ST_KEYS] -= 1
    # close the hole: move back each later key of the run whose home is not in (hole, j]
    hole = h
    j = (h + 1) & mask
    while keys[j] != _EMPTY:
        home = _slot_of(keys[j], mask)
        if (j > hole and (home <= hole or home > j)) or (j < hole and home <= hole and home > j):
            keys[hole] = keys[j]
            vals[hole] = vals[j]
            hole = j
        j = (j + 1) & mask
    keys[hole] = _EMPTY


@kernel
def _attach_kernel(start, keys, vals, st, row_sid, sids, rows, out, fresh):
    """Row of each sids[k] (k from `start`): rows[k], -1 where the id or the row is negative.
    A row that holds another session (or none) is given to sids[k] (fresh[k] set) and the id
    entered in the table. Stops at the first k that needs room in the table (half full) and
    returns it; len(sids) when done."""
    mask = len(keys) - 1
    for k in range(start, len(sids)):
        s = sids[k]
        r = rows[k]
        fresh[k] = False
        if s < 0 or r < 0:
            out[k] = -1
            continue
        out[k] = r
        if row_sid[r] == s:
            continue
        if 2 * (st[ST_KEYS] + 1) > len(keys):
            return k
        old = row_sid[r]
        if old >= 0:  # never released: the flow table gave the row to a new session since
            _delete(keys, vals, st, old, mask)
            st[ST_EVICTED] += 1
        h = _probe(keys, s, mask)
        if keys[h] == _EMPTY:
            st[ST_KEYS] += 1
        else:  # the id moved to another row (never, from one flow table): the old row is freed
            row_sid[vals[h]] = _EMPTY
        keys[h] = s
        vals[h] = r
        row_sid[r] = s
        fresh[k] = True
    return len(sids)


@kernel
def _find_kernel(keys, vals, sids, out):
    """Row of each sids[k], -1 where it has none."""
    mask = len(keys) - 1
    for k in range(len(sids)):
        s = sids[k]
        out[k] = -1
        if s >= 0:
            h = _probe(keys, s, mask)
            if keys[h] == s:
                out[k] = vals[h]


@kernel
def _release_kernel(keys, vals, st, row_sid, sids):
    """Forget sids (those present): out of the table, their rows marked as holding none."""
    mask = len(keys) - 1
    for k in range(len(sids)):
        s = sids[k]
        if s < 0:
            continue
        h = _probe(keys, s, mask)
        if keys[h] == _EMPTY:
            continue
        row_sid[vals[h]] = _EMPTY
        _delete(keys, vals, st, s, mask)


@kernel
def _firsts_kernel(rows, mark, stamp, out):
    """Where in `rows` each distinct row first comes, written to `out` in order; returns how
    many. A row is marked with this call's `stamp` when first met: one pass, where numpy took
    a scatter, a gather, a compare and a flatnonzero."""
    n = 0
    for k in range(len(rows)):
        r = rows[k]
        if mark[r] != stamp:
            mark[r] = stamp
            out[n] = k
            n += 1
    return n


@kernel
def _rehash_kernel(keys, vals, new_keys, new_vals):
    mask = len(new_keys) - 1
    for i in range(len(keys)):
        s = keys[i]
        if s == _EMPTY:
            continue
        h = _slot_of(s, mask)
        while new_keys[h] != _EMPTY:
            h = (h + 1) & mask
        new_keys[h] = s
        new_vals[h] = vals[i]


class SessionRows:
    """The columns kept per session (`add_column`, then `col[name]`), at the sessions' rows in
    the flow table, and the session id -> row table."""

    def __init__(self, capacity: int = 1 << 12):
        capacity = 1 << max(4, int(capacity - 1).bit_length())
        self._keys = np.full(2 * capacity, _EMPTY, dtype=np.int64)
        self._vals = np.zeros(2 * capacity, dtype=np.int64)
        self._st = np.zeros(2, dtype=np.int64)
        self.capacity = capacity
        self.col: dict[str, np.ndarray] = {}
        self._fill: dict[str, object] = {}
        self.add_column("sid", np.int64, _EMPTY)   # the session each row holds
        self.add_column("_scratch", np.int64, 0)  # for firsts(): the stamp of the call that last met the row
        self._stamp = 0

    def __len__(self) -> int:
        return int(self._st[ST_KEYS])

    @property
    def evicted(self) -> int:
        """Sessions whose row went to another session before they were released: their state
        was lost. None when the owner releases every session the flow table closes."""
        return int(self._st[ST_EVICTED])

    def add_column(self, name: str, dtype, fill) -> None:
        self.col[name] = np.full(self.capacity, fill, dtype=dtype)
        self._fill[name] = fill

    def attach(self, sids: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """The row of every session of `sids` (per packet, say): `rows`, their rows in the flow
        table (FlowTable.update's), where each comes with every column at its fill value if it
        held another session or none; -1 where the id or the row is negative."""
        sids = np.ascontiguousarray(sids, dtype=np.int64)
        rows = np.ascontiguousarray(rows, dtype=np.int64)
        top = int(rows.max(initial=-1))
        if top >= self.capacity:
            self._grow_rows(top + 1)
        out = np.empty(len(sids), dtype=np.int64)
        fresh = np.empty(len(sids), dtype=np.bool_)
        at = 0
        while True:
            at = _attach_kernel(at, self._keys, self._vals, self._st, self.col["sid"], sids, rows, out, fresh)
            if at == len(sids):
                break
            self._grow_table()
        if fresh.any():
            made = out[fresh]
            for name, column in self.col.items():
                if name != "sid":
                    column[made] = self._fill[name]
        return out

    def firsts(self, rows: np.ndarray) -> np.ndarray:
        """Where in `rows` (rows attach() gave, none negative) each distinct one first comes, in
        order (np.unique's sort replaced by a mark per row in a scratch column)."""
        self._stamp += 1
        out = np.empty(len(rows), dtype=np.int64)
        n = _firsts_kernel(np.ascontiguousarray(rows, dtype=np.int64), self.col["_scratch"], self._stamp, out)
        return out[:n]

    def distinct(self, rows: np.ndarray) -> np.ndarray:
        """The distinct rows among `rows`, in the order each first comes."""
        return rows[self.firsts(rows)]

    def holding(self, sids: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """`rows` where each holds its session of `sids`, else -1 (attach not called for it yet,
        or a negative id or row): a session's row from the flow table, with no lookup."""
        rows = np.asarray(rows, dtype=np.int64)
        inside = (rows >= 0) & (rows < self.capacity)
        ok = inside & (self.col["sid"][np.where(inside, rows, 0)] == sids) & (np.asarray(sids) >= 0)
        return np.where(ok, rows, -1)

    def find(self, sids: np.ndarray) -> np.ndarray:
        """The row of every session of `sids`, -1 where it has none: by id, for callers that
        have no flow-table row (closing sessions)."""
        sids = np.ascontiguousarray(sids, dtype=np.int64)
        out = np.empty(len(sids), dtype=np.int64)
        _find_kernel(self._keys, self._vals, sids, out)
        return out

    def release(self, sids: np.ndarray) -> None:
        """Forget sessions (closed): their rows hold none until attach gives them to another."""
        if len(sids):
            _release_kernel(self._keys, self._vals, self._st, self.col["sid"],
                            np.ascontiguousarray(sids, dtype=np.int64))

    def _grow_table(self) -> None:
        keys = np.full(2 * len(self._keys), _EMPTY, dtype=np.int64)
        vals = np.zeros(2 * len(self._keys), dtype=np.int64)
        _rehash_kernel(self._keys, self._vals, keys, vals)
        self._keys, self._vals = keys, vals

    def _grow_rows(self, need: int) -> None:
        """Rows enough for row `need - 1` (the flow table grew): doubled until they are."""
        new = self.capacity
        while new < need:
            new *= 2
        for name, column in self.col.items():
            grown = np.full(new - self.capacity, self._fill[name], dtype=column.dtype)
            self.col[name] = np.concatenate([column, grown])
        self.capacity = new
