"""A row per live session for the application stage's per-session state, found by session id
in one kernel call per batch.

The stage and nDPI keep a few values per session (its nDPI flow, its label, whether its TCP
streams are wanted...). Kept in Python dicts keyed by session id, every batch paid a
np.unique and a dict lookup per session it touched, several times over. Here the values are
numpy columns indexed by a row that `map` finds (or makes) for every packet's session at once
(an open-addressing hash table from session id to row, linear probing, in numpy arrays), so
that per-session decisions are array operations. A row is made with every column at its
fill value, and given back by `release` when its session closes.
"""

from __future__ import annotations

import numpy as np

from wiretrail.jit import kernel

_EMPTY = -1
# st (the table's scalars): free rows left in `free`, keys in the table
ST_FREE, ST_KEYS = 0, 1


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


@kernel
def _map_kernel(start, keys, vals, free, st, sids, out, made):
    """Row of each sids[k] (k from `start`), made from the free list where new (made[k] set);
    -1 for a negative id. Stops at the first k that needs room (the table half full or no free
    row) and returns it; len(sids) when done."""
    mask = len(keys) - 1
    for k in range(start, len(sids)):
        s = sids[k]
        made[k] = False
        if s < 0:
            out[k] = -1
            continue
        h = _probe(keys, s, mask)
        if keys[h] == s:
            out[k] = vals[h]
            continue
        if st[ST_FREE] == 0 or 2 * (st[ST_KEYS] + 1) > len(keys):
            return k
        st[ST_FREE] -= 1
        row = free[st[ST_FREE]]
        keys[h] = s
        vals[h] = row
        st[ST_KEYS] += 1
        out[k] = row
        made[k] = True
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
def _release_kernel(keys, vals, free, st, sids):
    """Forget sids (those present): their rows go back to the free list. Deletion by backward
    shift (no tombstones: probes stay as short as the load factor says). Returns rows freed."""
    mask = len(keys) - 1
    freed = 0
    for k in range(len(sids)):
        s = sids[k]
        if s < 0:
            continue
        h = _probe(keys, s, mask)
        if keys[h] == _EMPTY:
            continue
        free[st[ST_FREE]] = vals[h]
        st[ST_FREE] += 1
        st[ST_KEYS] -= 1
        freed += 1
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
    return freed


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
    """Session id -> row, and the columns kept per row (`add_column`, then `col[name]`)."""

    def __init__(self, capacity: int = 1 << 12):
        capacity = 1 << max(4, int(capacity - 1).bit_length())
        self._keys = np.full(2 * capacity, _EMPTY, dtype=np.int64)
        self._vals = np.zeros(2 * capacity, dtype=np.int64)
        self._free = np.arange(capacity - 1, -1, -1, dtype=np.int64)  # popped from the end: row 0 first
        self._st = np.array([capacity, 0], dtype=np.int64)
        self.capacity = capacity
        self.col: dict[str, np.ndarray] = {}
        self._fill: dict[str, object] = {}
        self.add_column("_scratch", np.int64, 0)  # for distinct()

    def __len__(self) -> int:
        return int(self._st[ST_KEYS])

    def add_column(self, name: str, dtype, fill) -> None:
        self.col[name] = np.full(self.capacity, fill, dtype=dtype)
        self._fill[name] = fill

    def map(self, sids: np.ndarray) -> np.ndarray:
        """The row of every session of `sids` (per packet, say), made where the session has none
        (its columns at their fill values); -1 for a negative id."""
        sids = np.ascontiguousarray(sids, dtype=np.int64)
        out = np.empty(len(sids), dtype=np.int64)
        made = np.empty(len(sids), dtype=np.bool_)
        at = 0
        while True:
            at = _map_kernel(at, self._keys, self._vals, self._free, self._st, sids, out, made)
            if at == len(sids):
                break
            self._grow()
        if made.any():
            fresh = out[made]
            for name, column in self.col.items():
                column[fresh] = self._fill[name]
        return out

    def firsts(self, rows: np.ndarray) -> np.ndarray:
        """Where in `rows` (rows map() gave, none negative) each distinct one first comes:
        np.unique's sort replaced by one scatter into a scratch column (where an index repeats,
        numpy keeps the last value written: written in reverse, the first)."""
        at = np.arange(len(rows), dtype=np.int64)
        scratch = self.col["_scratch"]
        scratch[rows[::-1]] = at[::-1]
        return np.flatnonzero(scratch[rows] == at)

    def distinct(self, rows: np.ndarray) -> np.ndarray:
        """The distinct rows among `rows`, in the order each first comes."""
        return rows[self.firsts(rows)]

    def find(self, sids: np.ndarray) -> np.ndarray:
        """The row of every session of `sids`, -1 where it has none (none is made)."""
        sids = np.ascontiguousarray(sids, dtype=np.int64)
        out = np.empty(len(sids), dtype=np.int64)
        _find_kernel(self._keys, self._vals, sids, out)
        return out

    def release(self, sids: np.ndarray) -> None:
        """Forget sessions (closed): their rows are free for others."""
        if len(sids):
            _release_kernel(self._keys, self._vals, self._free, self._st, np.ascontiguousarray(sids, dtype=np.int64))

    def _grow(self) -> None:
        """Twice the rows (new ones on the free list) and twice the table."""
        old, new = self.capacity, 2 * self.capacity
        keys = np.full(2 * new, _EMPTY, dtype=np.int64)
        vals = np.zeros(2 * new, dtype=np.int64)
        _rehash_kernel(self._keys, self._vals, keys, vals)
        self._keys, self._vals = keys, vals
        free = self._free[:self._st[ST_FREE]]
        self._free = np.empty(new, dtype=np.int64)
        added = np.arange(new - 1, old - 1, -1, dtype=np.int64)
        self._free[:len(added)] = added  # the old free rows stay on top: taken first
        self._free[len(added):len(added) + len(free)] = free
        self._st[ST_FREE] = len(added) + len(free)
        for name, column in self.col.items():
            self.col[name] = np.concatenate([column, np.full(new - old, self._fill[name], dtype=column.dtype)])
        self.capacity = new
