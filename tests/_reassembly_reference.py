"""The TCP reassembler as it was before its state moved into numba arrays (wiretrail at
a434a3a, with its one payload-gathering kernel as plain Python): the property test in
test_reassembly.py feeds it and wiretrail.app.reassembly.Reassembler the same random
segment streams and expects the same directions. Its module docstring follows.

TCP stream reassembly for the sessions whose protocol needs it.

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
- Acknowledgements: the packets of one direction that acknowledge new bytes of the other
  are kept as (bytes acknowledged, packet number), so that a record can name the packet
  that made it complete: Suricata (IDS mode) hands a direction's bytes to its parser when
  the other side acknowledges them, and logs a transaction on that packet (`pcap_cnt`).
- Bounds: `depth` bytes per direction (later bytes are counted, not kept: Suricata's
  stream.reassembly.depth, 1 MiB by default), and `memcap` bytes for all sessions; past the
  memcap the sessions holding most are truncated first.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from operator import itemgetter

import numpy as np

from wiretrail.app.base import Direction
from wiretrail.app.reassembly import _ack_padding
from wiretrail.batch import TCP_ACK, TCP_SYN


def _gather(data, offset, pl_off, pl_len, rows, out, out_off):
    """Copy the payloads of `rows` back to back into `out`; out_off[k] = start of row k."""
    pos = 0
    for k in range(len(rows)):
        i = rows[k]
        n = int(pl_len[i])
        out_off[k] = pos
        if n > 0:
            src = int(offset[i]) + int(pl_off[i])
            out[pos:pos + n] = data[src:src + n]
            pos += n
    out_off[len(rows)] = pos
    return pos


_SEQ_TIME = itemgetter(0, 2)


def _side_keys(sid: np.ndarray, from_orig: np.ndarray) -> np.ndarray:
    """sid * 2 + direction, one number per side, as uint64: a sid's top bits are its hour, and
    from late 2029 on sid * 2 no longer fits in an int64."""
    return sid.astype(np.uint64) * np.uint64(2) + from_orig.astype(np.uint64)


@dataclass
class _Block:
    """The segments one batch brought to one side, back to back: segment k is
    data[starts[k] - starts[0]:starts[k + 1] - starts[0]], at relative sequence rel[k], seen at
    ts[k]. Kept as one block, not a chunk per segment, so that a batch costs Python one object
    per side, not one per packet."""
    rel: np.ndarray
    data: bytes
    starts: np.ndarray
    ts: np.ndarray

    def chunks(self) -> list[tuple[int, bytes, int]]:
        """(relative seq, bytes, ts) per segment."""
        bounds, data = (self.starts - self.starts[0]).tolist(), self.data
        return list(zip(self.rel.tolist(), [data[a:b] for a, b in zip(bounds, bounds[1:])], self.ts.tolist()))

    @classmethod
    def of_chunks(cls, chunks: list[tuple[int, bytes, int]]) -> "_Block":
        lengths = [len(c[1]) for c in chunks]
        starts = np.zeros(len(chunks) + 1, dtype=np.int64)
        np.cumsum(lengths, out=starts[1:])
        return cls(rel=np.array([c[0] for c in chunks], dtype=np.int64), data=b"".join(c[1] for c in chunks),
                   starts=starts, ts=np.array([c[2] for c in chunks], dtype=np.int64))


@dataclass
class _Side:
    base: int = -1                  # absolute sequence number of stream offset 0
    # what the side holds, one _Block per batch that brought it bytes
    blocks: list = field(default_factory=list)
    # the chunks so far follow each other exactly from offset 0, in the order they came (no gap,
    # no overlap, no reordering: the usual case), and where the next one would start
    in_order: bool = True
    next_rel: int = 0
    kept: int = 0                   # bytes held in chunks
    beyond_depth: int = 0           # bytes seen past the depth
    truncated: bool = False
    depth: int = -1                 # this direction's own depth (Reassembler.limit), -1: the default
    # acknowledgements of this direction's bytes by the other side, per batch: (relative ack,
    # packet number) arrays, in packet order; only where the value changed within a batch
    acks: list = field(default_factory=list)


class ReferenceReassembler:
    def __init__(self, depth: int = 1 << 20, memcap: int = 256 << 20):
        self.depth = depth
        self.memcap = memcap
        self.sides: dict[tuple[int, bool], _Side] = {}
        self.held = 0
        self.conflicts = 0
        self._buf = np.empty(0, dtype=np.uint8)

    def add(self, batch, cols: dict, rows: np.ndarray, sid: np.ndarray, is_orig: np.ndarray,
            first_packet: int = 0) -> None:
        """Take the TCP packets `rows` of a batch (sessions that want their streams).
        `first_packet`: the capture-file number of the batch's first frame (0: not known, and
        acknowledgements are not kept)."""
        if len(rows) == 0:
            return
        rows = np.ascontiguousarray(rows, dtype=np.int64)
        sides = self.sides
        # SYNs fix the base of their direction even without payload; a later one moves it while
        # the direction holds no bytes yet (SYN-ACKs with different ISNs: the last one counts)
        syn = rows[(cols["tcp_flags"][rows] & TCP_SYN) != 0]
        for s, o, q in zip(sid[syn].tolist(), is_orig[syn].tolist(), cols["tcp_seq"][syn].tolist()):
            side = sides.get((s, o))
            if side is None:
                side = sides[(s, o)] = _Side()
            if side.base < 0 or (not side.blocks and not side.truncated):
                side.base = (q + 1) & 0xFFFFFFFF
        padded = _ack_padding(batch, cols, rows)  # an input rule, not bookkeeping: the module's own
        if padded is not None:
            cols = {**cols, "pl_len": cols["pl_len"].copy()}
            cols["pl_len"][padded] = 0
        data_rows = rows[cols["pl_len"][rows] > 0]
        if len(data_rows):
            self._data(batch, cols, data_rows, sid, is_orig)
        if first_packet:  # after the data: a side the batch's data made (no SYN seen) has its base
            self._acks(cols, rows[(cols["tcp_flags"][rows] & TCP_ACK) != 0], sid, is_orig, first_packet)

    def _data(self, batch, cols: dict, rows: np.ndarray, sid: np.ndarray, is_orig: np.ndarray) -> None:
        """The payloads of `rows` (packets with payload) into their sides' chunks."""
        sides = self.sides
        # Per (session, direction) group, in packet order within a group. Python runs once per
        # group (its _Side); what each packet keeps is worked out for all packets at once.
        key = _side_keys(sid[rows], is_orig[rows])
        order = np.argsort(key, kind="stable")
        rows, key = rows[order], key[order]
        first = np.concatenate([[0], np.flatnonzero(np.diff(key)) + 1])
        last = np.append(first[1:], len(rows))
        seq = cols["tcp_seq"][rows].astype(np.int64)
        group_sides = []
        bases = np.empty(len(first), dtype=np.int64)
        depths = np.empty(len(first), dtype=np.int64)
        for g, (k, q) in enumerate(zip(key[first].tolist(), seq[first].tolist())):
            side = sides.get((k >> 1, bool(k & 1)))
            if side is None:
                side = sides[(k >> 1, bool(k & 1))] = _Side()
            if side.base < 0:  # no SYN seen: the first segment is offset 0
                side.base = q
            group_sides.append(side)
            bases[g] = side.base
            depths[g] = self.depth if side.depth < 0 else side.depth
        group = np.repeat(np.arange(len(first)), last - first)
        rel = (seq - bases[group]) & 0xFFFFFFFF
        length = cols["pl_len"][rows].astype(np.int64)
        # before the base (a retransmission of the SYN's data, or garbage): dropped
        inside = rel < (1 << 31)
        # bytes past the depth are counted, not kept
        keep = np.where(inside, np.clip(depths[group] - rel, 0, length), 0)
        cut = np.add.reduceat(np.where(inside, length - keep, 0), first)
        held = np.add.reduceat(keep, first)
        kept = np.flatnonzero(keep > 0)  # packets that start before the depth

        # only the kept bytes are gathered (one copy per batch; chunks slice it)
        kept_rows = rows[kept]
        kept_len = cols["pl_len"].copy()
        kept_len[kept_rows] = keep[kept]
        need = int(keep.sum())
        if len(self._buf) < need:
            self._buf = np.empty(need + need // 4, dtype=np.uint8)
        out_off = np.empty(len(kept_rows) + 1, dtype=np.int64)
        _gather(batch.data, batch.offset, cols["pl_off"], kept_len, kept_rows, self._buf, out_off)
        payload = self._buf[:need].tobytes()
        offsets = rel[kept]
        ends = offsets + keep[kept]
        kept_ts = batch.ts[kept_rows].astype(np.int64, copy=False)
        at = np.searchsorted(kept, first).tolist() + [len(kept)]  # each group's first segment
        bounds = out_off.tolist()
        # segments that do not start where the one before them in their group ended, counted so
        # that breaks[j] - breaks[i + 1] is how many of segments i+1..j-1 do not
        breaks = np.concatenate([[0, 0], np.cumsum(offsets[1:] != ends[:-1])]).tolist()
        first_rel, last_end = offsets.tolist(), ends.tolist()
        for g, side in enumerate(group_sides):
            i, j = at[g], at[g + 1]
            if i < j:
                side.blocks.append(_Block(rel=offsets[i:j], data=payload[bounds[i]:bounds[j]],
                                          starts=out_off[i:j + 1], ts=kept_ts[i:j]))
                if side.in_order:
                    if first_rel[i] == side.next_rel and breaks[j] == breaks[i + 1]:
                        side.next_rel = last_end[j - 1]
                    else:
                        side.in_order = False
            n = int(cut[g])
            if n:
                side.beyond_depth += n
                side.truncated = True
            n = int(held[g])
            side.kept += n
            self.held += n
        if self.held > self.memcap:
            self._shed()

    def _acks(self, cols: dict, rows: np.ndarray, sid: np.ndarray, is_orig: np.ndarray, first_packet: int) -> None:
        """Keep the ACKs of `rows` on the side they acknowledge (the other direction), relative
        to its base; only a side whose base is known, and only values that change."""
        if len(rows) == 0:
            return
        key = _side_keys(sid[rows], ~is_orig[rows])  # the side acknowledged
        order = np.argsort(key, kind="stable")
        rows, key = rows[order], key[order]
        first = np.concatenate([[0], np.flatnonzero(np.diff(key)) + 1])
        last = np.append(first[1:], len(rows))
        bases = np.full(len(first), -1, dtype=np.int64)
        limits = np.empty(len(first), dtype=np.int64)
        group_sides = []
        sides = self.sides
        for g, k in enumerate(key[first].tolist()):
            side = sides.get((k >> 1, bool(k & 1)))
            group_sides.append(side)
            if side is not None and side.base >= 0:
                bases[g] = side.base
                limits[g] = (self.depth if side.depth < 0 else side.depth) + 1
        group = np.repeat(np.arange(len(first)), last - first)
        rel = (cols["tcp_ack"][rows].astype(np.int64) - bases[group]) & 0xFFFFFFFF
        # a known base, not before it, within the depth (+1: a FIN), and a new value
        keep = (bases[group] >= 0) & (rel < (1 << 31)) & (rel <= limits[group])
        keep[1:] &= (rel[1:] != rel[:-1]) | (key[1:] != key[:-1])
        if not keep.any():
            return
        at = np.concatenate([[0], np.cumsum(keep)]).tolist()
        rel, packets = rel[keep], rows[keep] + first_packet
        for g, side in enumerate(group_sides):
            i, j = at[first[g]], at[last[g]]
            if i < j:
                side.acks.append((rel[i:j], packets[i:j]))

    def limit(self, sid: int, depth: int) -> None:
        """Keep at most `depth` bytes per direction of session `sid` (its protocol needs no more)."""
        for d in (True, False):
            self.sides.setdefault((sid, d), _Side()).depth = min(depth, self.depth)

    def _shed(self) -> None:
        """Past the memcap: cut the directions holding most to what they hold now / 2."""
        for side in sorted(self.sides.values(), key=lambda s: -s.kept):
            if self.held <= self.memcap * 3 // 4:
                break
            keep, total = [], 0
            for c in sorted((c for b in side.blocks for c in b.chunks()), key=lambda c: c[0]):
                if total >= side.kept // 2:
                    break
                keep.append(c)
                total += len(c[1])
            self.held -= side.kept - total
            side.blocks = [_Block.of_chunks(keep)] if keep else []
            side.kept, side.truncated, side.in_order = total, True, False

    def take(self, sid: int, from_orig: bool) -> Direction:
        """Rebuild one direction of a session and forget it."""
        side = self.sides.pop((sid, from_orig), None)
        if side is None:
            return Direction()
        self.held -= side.kept
        blocks = side.blocks
        if blocks and side.in_order:
            # the common case: every byte once, in order, from the start: one join
            if len(blocks) == 1:
                b = blocks[0]
                return Direction(data=b.data, gaps=[], ts_offsets=b.rel, ts=b.ts, truncated=side.truncated,
                                 acks=side.acks)
            return Direction(data=b"".join([b.data for b in blocks]), gaps=[],
                             ts_offsets=np.concatenate([b.rel for b in blocks]),
                             ts=np.concatenate([b.ts for b in blocks]), truncated=side.truncated, acks=side.acks)
        chunks = [c for b in blocks for c in b.chunks()]
        chunks.sort(key=_SEQ_TIME)
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
                         ts=np.array(ts_val, dtype=np.int64), truncated=side.truncated, acks=side.acks)

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
