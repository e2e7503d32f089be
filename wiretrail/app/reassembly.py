"""TCP stream reassembly for the sessions whose protocol needs it.

Per batch, the payloads of the selected packets are gathered into one buffer by a numba
kernel and grouped by (session, direction) with numpy; Python then runs once per group,
not per packet, keeping (relative sequence, bytes, time) chunks. A direction is rebuilt
when its session closes (or asked for earlier):

- Sequence numbers are relative to the SYN (ISN + 1), or to the first segment seen when
  the SYN was missed, unwrapped over 32 bits.
- Overlaps and retransmissions: the first copy of a byte wins (Suricata's "first" policy,
  and what Windows and most BSDs do; Linux prefers new data for some overlaps). Bytes that
  differ from the first copy are counted in `conflicts`: an evasion attempt or corruption.
- Bytes never seen are gaps: recorded as (offset, length) and left out of the data.
- Bounds: `depth` bytes per direction (later bytes are counted, not kept: Suricata's
  stream.reassembly.depth, 1 MiB by default), and `memcap` bytes for all sessions; past the
  memcap the sessions holding most are truncated first.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from wiretrail.jit import kernel

from wiretrail.app.base import Direction
from wiretrail.batch import TCP_SYN


@kernel
def _gather(data, offset, pl_off, pl_len, rows, out, out_off):
    """Copy the payloads of `rows` back to back into `out`; out_off[k] = start of row k."""
    pos = 0
    for k in range(len(rows)):
        i = rows[k]
        n = pl_len[i]
        out_off[k] = pos
        if n > 0:
            src = offset[i] + pl_off[i]
            out[pos:pos + n] = data[src:src + n]
            pos += n
    out_off[len(rows)] = pos
    return pos


@dataclass
class _Side:
    base: int = -1                  # absolute sequence number of stream offset 0
    chunks: list = field(default_factory=list)  # (relative seq, bytes, ts)
    kept: int = 0                   # bytes held in chunks
    beyond_depth: int = 0           # bytes seen past the depth
    truncated: bool = False
    depth: int = -1                 # this direction's own depth (Reassembler.limit), -1: the default


class Reassembler:
    def __init__(self, depth: int = 1 << 20, memcap: int = 256 << 20):
        self.depth = depth
        self.memcap = memcap
        self.sides: dict[tuple[int, bool], _Side] = {}
        self.held = 0
        self.conflicts = 0
        self._buf = np.empty(0, dtype=np.uint8)

    def add(self, batch, cols: dict, rows: np.ndarray, sid: np.ndarray, is_orig: np.ndarray) -> None:
        """Take the TCP packets `rows` of a batch (sessions that want their streams)."""
        if len(rows) == 0:
            return
        rows = np.ascontiguousarray(rows, dtype=np.int64)
        # SYNs fix the base of their direction even without payload
        flags = cols["tcp_flags"][rows]
        for r in rows[(flags & TCP_SYN) != 0].tolist():
            side = self.sides.setdefault((int(sid[r]), bool(is_orig[r])), _Side())
            if side.base < 0:
                side.base = (int(cols["tcp_seq"][r]) + 1) & 0xFFFFFFFF
        rows = rows[cols["pl_len"][rows] > 0]
        if len(rows) == 0:
            return
        need = int(cols["pl_len"][rows].sum())
        if len(self._buf) < need:
            self._buf = np.empty(need + need // 4, dtype=np.uint8)
        out_off = np.empty(len(rows) + 1, dtype=np.int64)
        _gather(batch.data, batch.offset, cols["pl_off"], cols["pl_len"], rows, self._buf, out_off)
        payload = self._buf[:need].tobytes()  # one copy per batch; chunks slice it
        key = sid[rows] * 2 + is_orig[rows].astype(np.int64)
        order = np.argsort(key, kind="stable")
        bounds = np.flatnonzero(np.diff(key[order])) + 1
        seq = cols["tcp_seq"][rows]
        ts = batch.ts[rows]
        for grp in np.split(order, bounds):  # per (session, direction): Python per group
            k = int(key[grp[0]])
            side = self.sides.setdefault((k >> 1, bool(k & 1)), _Side())
            for j in grp.tolist():
                self._chunk(side, int(seq[j]), payload[out_off[j]:out_off[j + 1]], int(ts[j]))
        if self.held > self.memcap:
            self._shed()

    def limit(self, sid: int, depth: int) -> None:
        """Keep at most `depth` bytes per direction of session `sid` (its protocol needs no more)."""
        for d in (True, False):
            self.sides.setdefault((sid, d), _Side()).depth = min(depth, self.depth)

    def _chunk(self, side: _Side, seq: int, data: bytes, ts: int) -> None:
        if side.base < 0:
            side.base = seq
        rel = (seq - side.base) & 0xFFFFFFFF
        if rel >= 1 << 31:  # before the base (a retransmission of the SYN's data, or garbage)
            return
        depth = self.depth if side.depth < 0 else side.depth
        if rel >= depth:
            side.beyond_depth += len(data)
            side.truncated = True
            return
        if rel + len(data) > depth:
            side.beyond_depth += rel + len(data) - depth
            data = data[:depth - rel]
            side.truncated = True
        side.chunks.append((rel, data, ts))
        side.kept += len(data)
        self.held += len(data)

    def _shed(self) -> None:
        """Past the memcap: cut the directions holding most to what they hold now / 2."""
        for side in sorted(self.sides.values(), key=lambda s: -s.kept):
            if self.held <= self.memcap * 3 // 4:
                break
            keep, total = [], 0
            for c in sorted(side.chunks, key=lambda c: c[0]):
                if total >= side.kept // 2:
                    break
                keep.append(c)
                total += len(c[1])
            self.held -= side.kept - total
            side.chunks, side.kept, side.truncated = keep, total, True

    def take(self, sid: int, from_orig: bool) -> Direction:
        """Rebuild one direction of a session and forget it."""
        side = self.sides.pop((sid, from_orig), None)
        if side is None:
            return Direction()
        self.held -= side.kept
        chunks = sorted(side.chunks, key=lambda c: (c[0], c[2]))
        parts, gaps, ts_off, ts_val = [], [], [], []
        end = 0  # relative seq covered so far
        out_len = 0
        for rel, data, ts in chunks:
            if rel + len(data) <= end:  # wholly seen before: a retransmission
                self._count_conflicts(parts, out_len, end, rel, data)
                continue
            if rel > end:  # bytes never seen (at offset 0: the stream's start was missed)
                gaps.append((out_len, rel - end))
                end = rel
            new = data[end - rel:]
            ts_off.append(out_len)
            ts_val.append(ts)
            parts.append(new)
            out_len += len(new)
            end += len(new)
        return Direction(data=b"".join(parts), gaps=gaps, ts_offsets=np.array(ts_off, dtype=np.int64),
                         ts=np.array(ts_val, dtype=np.int64), truncated=side.truncated)

    def _count_conflicts(self, parts, out_len, end, rel, data) -> None:
        """A retransmission whose bytes differ from the first copy (only checked when the first
        copy is the last part, the common case; enough to flag an evasion attempt)."""
        if parts and rel >= end - len(parts[-1]):
            start = len(parts[-1]) - (end - rel)
            if parts[-1][start:start + len(data)] != data:
                self.conflicts += 1

    def drop(self, sid: int) -> None:
        for d in (True, False):
            side = self.sides.pop((sid, d), None)
            if side is not None:
                self.held -= side.kept
