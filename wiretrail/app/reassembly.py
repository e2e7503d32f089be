"""TCP stream reassembly for the sessions whose protocol needs it.

What a direction ("side": session and direction) holds lives in numpy arrays that numba
kernels read and write, so that Python runs once per batch (`add`) and once per group of
closing sessions (`take_many`), not once per side or per packet:

- a hash table (open addressing, linear probing) from side key (sid * 2 + 1 for the
  originator's bytes, sid * 2 for the responder's) to a row of `_S`, the side's state
  (rows reused through a free list);
- the segments kept, one row of `_G` each (relative sequence, length, time, place in the
  byte arena), linked per side in the order they came, their bytes in `_arena`; and the
  acknowledgements kept, one row of `_A` each, linked likewise. Rows and bytes are taken
  from the end of their array and never reused one by one (what is taken or dropped is
  dead): when an array is full, its live part is squeezed together, or moved into one
  twice as large. Segment rows and their bytes come in the same order and keep it, so
  that the arena is squeezed by one walk over the segment rows.
Python makes room between kernel calls: before a batch for what it can bound (side rows,
segment and ACK rows: one per packet at most), and when a kernel stops because the hash
table is half full or the arena has no room for a payload.

A direction is rebuilt when its session closes (or asked for earlier):

- Sequence numbers are relative to the SYN (ISN + 1), or to the first segment seen when
  the SYN was missed, unwrapped over 32 bits.
- Overlaps and retransmissions: the first copy of a byte wins (Suricata's "first" policy,
  and what Windows and most BSDs do; Linux prefers new data for some overlaps). Bytes that
  differ from the first copy are counted in `conflicts`: an evasion attempt or corruption
  (only checked against the bytes of the last part rebuilt, the usual case).
- Bytes never seen are gaps: recorded as (offset, length) and left out of the data.
- A bare ACK whose payload is 2 to 7 zero bytes is frame padding counted in the IP length
  (`_ack_padding`), not stream bytes.
- Acknowledgements: the packets of one direction that acknowledge new bytes of the other
  are kept as (bytes acknowledged, packet number), so that a record can name the packet
  that made it complete: Suricata (IDS mode) hands a direction's bytes to its parser when
  the other side acknowledges them, and logs a transaction on that packet (`pcap_cnt`).
  Only for a side whose base is known, within its depth (+1: a FIN), and only where the
  value changes from the previous ACK of the same batch.
- Bounds: `depth` bytes per direction (later bytes are counted, not kept: Suricata's
  stream.reassembly.depth, 1 MiB by default; `limit` lowers it per session), and `memcap`
  bytes for all sessions; past the memcap the sides holding most are cut first, each to
  the segments that come first in sequence up to half of what it held.
- Encrypted TLS: every direction's bytes are walked as they come in order by TLS's record
  watcher (tls_kernel.watch_records: a stream that does not begin with a TLS record stops
  it at once), which finds where the TLS parser will stop reading: the end of the fourth
  application-data record. For a session whose parsers read only that
  (`cut_after_handshake`), nothing after it is kept: the rest is ciphertext, which Suricata,
  likewise, stops reassembling once a session is encrypted (on mix.pcap the TLS bytes kept
  go from 149 to 105 MB; most of the rest is directions that reach their 64 KB depth first).

Within a batch, SYNs fix their side's base first, then the payloads are kept (a side first
met in a batch's payloads is made in key order: the order `_shed` breaks ties in), then the
ACKs; `limit`, `cut_after_handshake` and `drop` are queued and applied in order before
anything else.
"""

from __future__ import annotations

import numpy as np
from wiretrail.jit import kernel, numba_hook

from wiretrail.app.base import Direction, JoinedStreams
from wiretrail.app.tls_kernel import N_WATCH, W_AT, W_END, watch_records, watch_reset
from wiretrail.batch import TCP_ACK, TCP_FIN, TCP_PSH, TCP_RST, TCP_SYN
from wiretrail.bytes_kernels import memmove_intrinsic

# ---- per-side fields (_S columns) ------------------------------------------------------------
BASE = 0        # absolute sequence number of stream offset 0, -1: not known yet
DEPTH = 1       # this side's own depth (Reassembler.limit), -1: the default
KEPT = 2        # bytes held in its segments
TRUNC = 3       # 1: the depth or the memcap cut the stream
SEG_HEAD, SEG_TAIL, NSEG = 4, 5, 6
ACK_HEAD, ACK_TAIL, NACK = 7, 8, 9
ORDER = 10      # creation number: ties of the memcap's "holding most" go to the older side
ACK_STAMP = 11  # the batch (add number) of the side's last ACK ...
ACK_LAST = 12   # ... and its relative value: an ACK repeating it in that batch is not kept
LIVE = 13
NEXT_FREE = 14
WATCH = 15      # N_WATCH columns: the TLS record watcher's state (tls_kernel.watch_records)
CUT = WATCH + N_WATCH  # 1: keep nothing past the watcher's end (Reassembler.cut_after_handshake)
N_S = CUT + 1

# ---- per-segment fields (_G columns) and per-ACK fields (_A columns) -------------------------
G_REL, G_LEN, G_TS, G_OFF, G_NEXT = range(5)
N_G = 5
A_REL, A_PKT, A_NEXT = range(3)
N_A = 3

# ---- scalars (_st) ---------------------------------------------------------------------------
(ST_HELD, ST_CONFLICTS, ST_ORDER, ST_SIDES, ST_S_USED, ST_S_FREE, ST_S_NFREE, ST_G_USED, ST_G_LIVE,
 ST_A_USED, ST_A_LIVE, ST_ARENA_USED, ST_STAMP, ST_DEPTH, ST_MEMCAP, ST_NEED_DATA, ST_NEED_SEG,
 ST_NEED_ACK) = range(18)
N_ST = 18

# take_many's per-direction results (_take_kernel's `meta` columns); the ends are cumulative
# over one kernel call, so a direction's part of each output runs from the previous end
M_DATA_END, M_TS_END, M_GAP_END, M_ACK_END, M_TRUNC = range(5)
N_M = 5

_DROP = -2      # an op's depth that means drop (a limit's depth is >= 0, or -1: the default)
_CUT = -3       # an op's depth that means cut_after_handshake
_TABLE_FULL = -1  # _add_data stopped making sides: the hash table needs to grow
_GOLD = np.uint64(0x9E3779B97F4A7C15)
_S32 = np.uint64(32)
_U1 = np.uint64(1)
_U2 = np.uint64(2)
_SEQ_MASK = 0xFFFFFFFF
_HALF = 1 << 31
_EMPTY = np.zeros(0, dtype=np.int64)


@numba_hook
def _define_intrinsics() -> None:
    """The intrinsics the kernels call; numba builds them when it compiles a kernel (the
    compiled extension has them built in). Every byte kept is copied three times (batch ->
    arena -> take's buffer -> bytes): as memmoves."""
    global _copy
    _copy = memmove_intrinsic()


# ---- hash table: T[h] = (side key, side row), row -1: empty ------------------------------------
@kernel(inline=True)
def _side_key(sid, orig):
    """sid * 2 + direction, wrapped to an int64: a sid's top bits are its hour, and from late
    2029 on sid * 2 no longer fits (the table stores the key's 64 bits, whatever their sign)."""
    return np.int64(np.uint64(sid) * _U2 + (_U1 if orig else np.uint64(0)))


@kernel(inline=True)
def _home(key, cap):
    h = np.uint64(key) * _GOLD
    return np.int64((h ^ (h >> _S32)) & np.uint64(cap - 1))


@kernel(inline=True)
def _find(T, key):
    """The side row of `key`, -1 if none."""
    mask = len(T) - 1
    h = _home(key, len(T))
    while True:
        s = T[h, 1]
        if s < 0 or T[h, 0] == key:
            return s
        h = (h + 1) & mask


@kernel(inline=True)
def _insert(T, key, s):
    mask = len(T) - 1
    h = _home(key, len(T))
    while T[h, 1] >= 0:
        h = (h + 1) & mask
    T[h, 0] = key
    T[h, 1] = s


@kernel(inline=True)
def _remove(T, key):
    """Take `key` out of the table (moving back the entries its place was delaying, so that no
    tombstones pile up); its side row, -1 if none."""
    cap = len(T)
    mask = cap - 1
    i = _home(key, cap)
    while True:
        s = T[i, 1]
        if s < 0:
            return -1
        if T[i, 0] == key:
            break
        i = (i + 1) & mask
    j = i
    while True:
        j = (j + 1) & mask
        if T[j, 1] < 0:
            break
        k = _home(T[j, 0], cap)
        # the entry at j may fill the hole at i unless its home lies cyclically in (i, j]
        if (i <= j and (k <= i or k > j)) or (i > j and k <= i and k > j):
            T[i, 0] = T[j, 0]
            T[i, 1] = T[j, 1]
            i = j
    T[i, 1] = -1
    return s


@kernel(inline=True)
def _table_full(T, st):
    """No room for one more side at a load of at most one half."""
    return 2 * (st[ST_SIDES] + 1) > len(T)


@kernel
def _rehash(T, bigger):
    for h in range(len(T)):
        if T[h, 1] >= 0:
            _insert(bigger, T[h, 0], T[h, 1])


# ---- sides -----------------------------------------------------------------------------------
@kernel(inline=True)
def _new_side(T, S, st, key):
    """A side for `key` (Python made room for its row; the caller checked the table)."""
    s = st[ST_S_FREE]
    if s >= 0:
        st[ST_S_FREE] = S[s, NEXT_FREE]
        st[ST_S_NFREE] -= 1
    else:
        s = st[ST_S_USED]
        st[ST_S_USED] = s + 1
    S[s, BASE] = -1
    S[s, DEPTH] = -1
    S[s, KEPT] = 0
    S[s, TRUNC] = 0
    S[s, SEG_HEAD] = -1
    S[s, SEG_TAIL] = -1
    S[s, NSEG] = 0
    S[s, ACK_HEAD] = -1
    S[s, ACK_TAIL] = -1
    S[s, NACK] = 0
    S[s, ORDER] = st[ST_ORDER]
    st[ST_ORDER] += 1
    S[s, ACK_STAMP] = -1
    S[s, ACK_LAST] = -1
    S[s, LIVE] = 1
    watch_reset(S, s, WATCH)
    S[s, CUT] = 0
    _insert(T, key, s)
    st[ST_SIDES] += 1
    return s


@kernel(inline=True)
def _free_side(T, S, G, st, key):
    """Forget side `key` (if there is one): its row goes back to the free list; its segments
    (marked dead: no length), ACKs and bytes are left for the next squeeze."""
    s = _remove(T, key)
    if s < 0:
        return
    g = S[s, SEG_HEAD]
    for _ in range(S[s, NSEG]):
        G[g, G_LEN] = 0
        g = G[g, G_NEXT]
    st[ST_SIDES] -= 1
    st[ST_HELD] -= S[s, KEPT]
    st[ST_G_LIVE] -= S[s, NSEG]
    st[ST_A_LIVE] -= S[s, NACK]
    S[s, LIVE] = 0
    S[s, NEXT_FREE] = st[ST_S_FREE]
    st[ST_S_FREE] = s
    st[ST_S_NFREE] += 1


# ---- adding a batch --------------------------------------------------------------------------
@kernel
def _add_syns(start, rows, tcp_flags, tcp_seq, sid, is_orig, T, S, st):
    """SYNs fix the base of their direction, even without payload (and before the batch's
    payloads, whatever their order); a later SYN with another sequence number moves it while
    the direction has no bytes yet (several SYN-ACKs with different ISNs: the data follows
    the last one, which the client acknowledged). Returns the row it stopped at: len(rows)
    when done, else the table needs to grow."""
    for k in range(start, len(rows)):
        i = rows[k]
        if tcp_flags[i] & TCP_SYN:
            key = _side_key(sid[i], is_orig[i])
            s = _find(T, key)
            if s < 0:
                if _table_full(T, st):
                    return k
                s = _new_side(T, S, st, key)
            if S[s, BASE] < 0 or (S[s, NSEG] == 0 and S[s, TRUNC] == 0):  # (no segment: nothing kept)
                S[s, BASE] = (np.int64(tcp_seq[i]) + 1) & _SEQ_MASK
                watch_reset(S, s, WATCH)  # offsets start anew
    return len(rows)


@kernel(inline=True)
def _segment_before(G, x, y):
    """Segment row x goes before y: lower relative sequence number, then earlier come (rows
    are made in arrival order, and compaction keeps their order)."""
    if G[x, G_REL] != G[y, G_REL]:
        return G[x, G_REL] < G[y, G_REL]
    if G[x, G_TS] != G[y, G_TS]:
        return G[x, G_TS] < G[y, G_TS]
    return x < y


@kernel(inline=True)
def _before(a, x, y, G, segments):
    """x goes before y: segment rows by _segment_before (segments True), else values."""
    return _segment_before(G, a[x], a[y]) if segments else a[x] < a[y]


@kernel(inline=True)
def _heapsort(a, n, G, segments):
    """Sort a[:n] in place, as _before says: a kernel that allocates nothing cannot call
    np.sort, and a heapsort has no quadratic case (a stream sent backwards)."""
    for top in range(n // 2 - 1, -1, -1):
        _sift_down(a, top, n, G, segments)
    for end in range(n - 1, 0, -1):
        a[0], a[end] = a[end], a[0]
        _sift_down(a, 0, end, G, segments)


@kernel(inline=True)
def _sift_down(a, i, n, G, segments):
    while True:
        child = 2 * i + 1
        if child >= n:
            return
        if child + 1 < n and _before(a, child, child + 1, G, segments):
            child += 1
        if not _before(a, i, child, G, segments):
            return
        a[i], a[child] = a[child], a[i]
        i = child


@kernel
def _add_data(start, rows, tcp_seq, pl_len, pl_off, data, offset, ts, sid, is_orig, T, S, G, arena, st,
              row_side, missing):
    """The payloads of `rows` (those with one) from row `start` on into their sides' segments.
    Returns len(rows) when done; _TABLE_FULL if the table must grow first (then call again from
    0); else the row it stopped at, whose payload needs st[ST_NEED_DATA] more bytes free in
    the arena (the row's side may have been made and its base set: doing it again is
    harmless). row_side[k]: the side row of rows[k], found by the call from 0 (-1: made after
    it looked); `missing`: room for len(rows) keys. Allocates nothing, so that it is compiled
    without reference counting (see wiretrail.aot); the caller sheds (_shed) past the memcap."""
    n = len(rows)
    if start == 0:
        # sides first met here are made in key order (as the reference grouped them)
        m = 0  # (keys unsigned: in the reference's order)
        for k in range(n):
            i = rows[k]
            if pl_len[i] > 0:
                key = _side_key(sid[i], is_orig[i])
                row_side[k] = _find(T, key)
                if row_side[k] < 0:
                    missing[m] = np.uint64(key)
                    m += 1
        if m:
            _heapsort(missing, m, G, False)
            for k in range(m):
                if k == 0 or missing[k] != missing[k - 1]:
                    if _table_full(T, st):
                        return _TABLE_FULL
                    _new_side(T, S, st, np.int64(missing[k]))
    default_depth = st[ST_DEPTH]
    for k in range(start, n):
        i = rows[k]
        length = np.int64(pl_len[i])
        if length <= 0:
            continue
        s = row_side[k]
        if s < 0:
            s = _find(T, _side_key(sid[i], is_orig[i]))
        q = np.int64(tcp_seq[i])
        if S[s, BASE] < 0:  # no SYN seen: the first segment is offset 0
            S[s, BASE] = q
        rel = (q - S[s, BASE]) & _SEQ_MASK
        if rel >= _HALF:  # before the base (a retransmission of the SYN's data, or garbage)
            continue
        depth = S[s, DEPTH]
        if depth < 0:
            depth = default_depth
        keep = min(max(depth - rel, 0), length)  # bytes past the depth are counted, not kept
        if keep < length:
            S[s, TRUNC] = 1
        src = offset[i] + pl_off[i]
        if keep > 0 and S[s, WATCH + W_AT] >= 0:
            watch_records(S, s, WATCH, data, src, rel, keep)
        if S[s, CUT] and S[s, WATCH + W_END] >= 0:  # past what the parsers read: not kept (nor truncated)
            keep = min(keep, max(S[s, WATCH + W_END] - rel, 0))
        if keep == 0:
            continue
        at = st[ST_ARENA_USED]
        if at + keep > len(arena):
            st[ST_NEED_DATA] = keep
            return k
        _copy(arena, at, data, src, keep)
        st[ST_ARENA_USED] = at + keep
        g = st[ST_G_USED]
        st[ST_G_USED] = g + 1
        st[ST_G_LIVE] += 1
        G[g, G_REL] = rel
        G[g, G_LEN] = keep
        G[g, G_TS] = ts[i]
        G[g, G_OFF] = at
        G[g, G_NEXT] = -1
        if S[s, NSEG] == 0:
            S[s, SEG_HEAD] = g
        else:
            G[S[s, SEG_TAIL], G_NEXT] = g
        S[s, SEG_TAIL] = g
        S[s, NSEG] += 1
        S[s, KEPT] += keep
        st[ST_HELD] += keep
    return n


@kernel(allocates=True)
def _shed(S, G, st):
    """Past the memcap: the sides holding most (the older first among equals), until what is
    held is down to 3/4 of the memcap, are each cut to their segments first in sequence (the
    earlier-come first among equals) until half of what the side held is reached, and marked
    truncated."""
    live = np.empty(st[ST_S_USED], dtype=np.int64)
    n = 0
    for s in range(st[ST_S_USED]):
        if S[s, LIVE]:
            live[n] = s
            n += 1
    live = live[:n]
    live = live[np.argsort(S[live, ORDER])]
    live = live[np.argsort(-S[live, KEPT], kind="mergesort")]
    target = st[ST_MEMCAP] * 3 // 4
    for s in live:
        if st[ST_HELD] <= target:
            break
        kept = S[s, KEPT]
        nseg = S[s, NSEG]
        segs = np.empty(nseg, dtype=np.int64)
        g = S[s, SEG_HEAD]
        for j in range(nseg):
            segs[j] = g
            g = G[g, G_NEXT]
        segs = segs[np.argsort(G[segs, G_REL], kind="mergesort")]
        total = 0
        n_keep = 0
        while n_keep < nseg and total < kept // 2:
            total += G[segs[n_keep], G_LEN]
            n_keep += 1
        for j in range(n_keep):  # what is kept, in sequence order
            G[segs[j], G_NEXT] = segs[j + 1] if j + 1 < n_keep else -1
        for j in range(n_keep, nseg):  # the rest is dead
            G[segs[j], G_LEN] = 0
        S[s, SEG_HEAD] = segs[0] if n_keep else -1
        S[s, SEG_TAIL] = segs[n_keep - 1] if n_keep else -1
        S[s, NSEG] = n_keep
        st[ST_G_LIVE] -= nseg - n_keep
        st[ST_HELD] -= kept - total
        S[s, KEPT] = total
        S[s, TRUNC] = 1


@kernel
def _add_acks(rows, tcp_flags, tcp_ack, sid, is_orig, first_packet, T, S, A, st):
    """The ACKs of `rows` on the side they acknowledge (the other direction), relative to its
    base; only a side whose base is known, within its depth (+1: a FIN), and only values that
    differ from the previous ACK of that side in this batch."""
    stamp = st[ST_STAMP] + 1
    st[ST_STAMP] = stamp
    default_depth = st[ST_DEPTH]
    for k in range(len(rows)):
        i = rows[k]
        if not tcp_flags[i] & TCP_ACK:
            continue
        s = _find(T, _side_key(sid[i], not is_orig[i]))
        if s < 0 or S[s, BASE] < 0:
            continue
        rel = (np.int64(tcp_ack[i]) - S[s, BASE]) & _SEQ_MASK
        if S[s, ACK_STAMP] == stamp and S[s, ACK_LAST] == rel:
            continue
        S[s, ACK_STAMP] = stamp
        S[s, ACK_LAST] = rel
        depth = S[s, DEPTH]
        if depth < 0:
            depth = default_depth
        if rel >= _HALF or rel > depth + 1:
            continue
        a = st[ST_A_USED]
        st[ST_A_USED] = a + 1
        st[ST_A_LIVE] += 1
        A[a, A_REL] = rel
        A[a, A_PKT] = i + first_packet
        A[a, A_NEXT] = -1
        if S[s, NACK] == 0:
            S[s, ACK_HEAD] = a
        else:
            A[S[s, ACK_TAIL], A_NEXT] = a
        S[s, ACK_TAIL] = a
        S[s, NACK] += 1


@kernel
def _apply_ops(start, op_sid, op_depth, T, S, G, st):
    """Queued limits, cuts and drops from op `start` on, in the order they were asked for: a
    limit or a cut makes both sides of its session (the originator's first) and sets their
    depth or their CUT; a drop forgets them. Returns the op it stopped at: len(op_sid) when
    done, else the table needs to grow."""
    for j in range(start, len(op_sid)):
        d = op_depth[j]
        if d == _DROP:
            _free_side(T, S, G, st, _side_key(op_sid[j], True))
            _free_side(T, S, G, st, _side_key(op_sid[j], False))
            continue
        orig, resp = _side_key(op_sid[j], True), _side_key(op_sid[j], False)
        so, sr = _find(T, orig), _find(T, resp)
        new = (1 if so < 0 else 0) + (1 if sr < 0 else 0)
        if new and 2 * (st[ST_SIDES] + new) > len(T):
            return j
        if so < 0:
            so = _new_side(T, S, st, orig)
        if sr < 0:
            sr = _new_side(T, S, st, resp)
        if d == _CUT:
            S[so, CUT] = 1
            S[sr, CUT] = 1
        else:
            S[so, DEPTH] = d
            S[sr, DEPTH] = d
    return len(op_sid)


# ---- room ------------------------------------------------------------------------------------
@kernel
def _pack(G, st, src, dst, in_place):
    """The live segments' bytes moved to the start of `dst` (`src` itself when `in_place`).
    Segment rows are in arena order (both are taken from their ends together, and squeezed
    keeping their order), so the bytes move in arena order, never forward: none is
    overwritten before it has moved (a move may overlap its own old place, which memmove
    allows)."""
    pos = 0
    for g in range(st[ST_G_USED]):
        length = G[g, G_LEN]
        if length == 0:  # dead
            continue
        off = G[g, G_OFF]
        if off != pos or not in_place:
            _copy(dst, pos, src, off, length)
        G[g, G_OFF] = pos
        pos += length
    st[ST_ARENA_USED] = pos


@kernel(allocates=True)
def _compact_rows(S, G, A, st, new_G, new_A):
    """The live segment rows copied to the start of new_G in their order (the arena's), and the
    live ACK rows to the start of new_A side by side; the links follow."""
    moved = np.empty(st[ST_G_USED], dtype=np.int64)
    ng = 0
    for g in range(st[ST_G_USED]):
        if G[g, G_LEN]:
            for f in range(N_G):
                new_G[ng, f] = G[g, f]
            moved[g] = ng
            ng += 1
    for g in range(ng):
        if new_G[g, G_NEXT] >= 0:
            new_G[g, G_NEXT] = moved[new_G[g, G_NEXT]]
    na = 0
    for s in range(st[ST_S_USED]):
        if not S[s, LIVE]:
            continue
        if S[s, NSEG]:
            S[s, SEG_HEAD] = moved[S[s, SEG_HEAD]]
            S[s, SEG_TAIL] = moved[S[s, SEG_TAIL]]
        a = S[s, ACK_HEAD]
        for j in range(S[s, NACK]):
            new_A[na, A_REL] = A[a, A_REL]
            new_A[na, A_PKT] = A[a, A_PKT]
            new_A[na, A_NEXT] = na + 1
            if j == 0:
                S[s, ACK_HEAD] = na
            na += 1
            a = A[a, A_NEXT]
        if S[s, NACK]:
            S[s, ACK_TAIL] = na - 1
            new_A[na - 1, A_NEXT] = -1
    st[ST_G_USED] = ng
    st[ST_A_USED] = na


# ---- taking directions -----------------------------------------------------------------------
@kernel
def _take_kernel(keys, start, per, T, S, G, A, arena, st, out, ts_off, ts_val, gap_off, gap_len,
                 ack_rel, ack_pkt, order, meta, group):
    """Rebuild and forget the sides keys[start:], `per` at a time (a session's two directions),
    as many groups as the output buffers hold in full; meta[j - start] says where direction
    j's parts end. Returns the index of the first key not taken (len(keys) when done); if even
    the first group did not fit, st[ST_NEED_*] say what it needs. gap_off, gap_len and `order`
    (room for one side's segment numbers) are as long as ts_off: a side has at most one gap
    per segment. `group`: room for `per` side rows."""
    nd = nt = ng = na = 0
    for j in range(start, len(keys)):
        m = j - start
        if m % per == 0:  # a group's first side: does the whole group fit?
            need_data = need_seg = need_ack = 0
            for q in range(per):
                s = group[q] = _find(T, keys[j + q]) if j + q < len(keys) else -1
                if s >= 0:
                    need_data += S[s, KEPT]
                    need_seg += S[s, NSEG]
                    need_ack += S[s, NACK]
            if nd + need_data > len(out) or nt + need_seg > len(ts_off) or na + need_ack > len(ack_rel):
                st[ST_NEED_DATA] = need_data
                st[ST_NEED_SEG] = need_seg
                st[ST_NEED_ACK] = need_ack
                return j
        s = group[m % per]
        if s < 0:
            meta[m, M_DATA_END] = nd
            meta[m, M_TS_END] = nt
            meta[m, M_GAP_END] = ng
            meta[m, M_ACK_END] = na
            meta[m, M_TRUNC] = 0
            continue
        nseg = S[s, NSEG]
        # the segments in (relative seq, time) order, the earlier-come first among equals:
        # usually they came that way
        segs = order[:nseg]
        g = S[s, SEG_HEAD]
        ordered = True
        for i in range(nseg):
            segs[i] = g
            if i and _segment_before(G, g, segs[i - 1]):
                ordered = False
            g = G[g, G_NEXT]
        if not ordered:
            _heapsort(segs, nseg, G, True)
        d0 = nd
        end = 0         # relative seq covered so far
        last_at = 0     # where the last part written starts in `out`, and its length
        last_len = -1
        for g in segs:
            rel = G[g, G_REL]
            length = G[g, G_LEN]
            off = G[g, G_OFF]
            if rel + length <= end:  # wholly seen before: a retransmission
                if last_len >= 0 and rel >= end - last_len:
                    at = last_at + last_len - (end - rel)
                    for b in range(length):
                        if out[at + b] != arena[off + b]:
                            st[ST_CONFLICTS] += 1
                            break
                continue
            if rel > end:  # bytes never seen (at offset 0: the stream's start was missed)
                gap_off[ng] = nd - d0
                gap_len[ng] = rel - end
                ng += 1
                end = rel
            skip = end - rel
            new = length - skip
            _copy(out, nd, arena, off + skip, new)
            ts_off[nt] = nd - d0
            ts_val[nt] = G[g, G_TS]
            nt += 1
            last_at = nd
            last_len = new
            nd += new
            end += new
        a = S[s, ACK_HEAD]
        for _ in range(S[s, NACK]):
            ack_rel[na] = A[a, A_REL]
            ack_pkt[na] = A[a, A_PKT]
            na += 1
            a = A[a, A_NEXT]
        meta[m, M_DATA_END] = nd
        meta[m, M_TS_END] = nt
        meta[m, M_GAP_END] = ng
        meta[m, M_ACK_END] = na
        meta[m, M_TRUNC] = S[s, TRUNC]
        _free_side(T, S, G, st, keys[j])
    return len(keys)


def _side_keys(sid: np.ndarray, from_orig: np.ndarray) -> np.ndarray:
    """The kernels' side keys (_side_key) of sessions `sid`, one direction each."""
    return (sid.astype(np.uint64) * np.uint64(2) + from_orig.astype(np.uint64)).view(np.int64)


def _grown(arr: np.ndarray, used: int, rows: int) -> np.ndarray:
    """`arr` (rows of state) with room for at least `rows` rows; its first `used` kept. The
    rows past `used` are left untouched, so they cost no memory until used."""
    out = np.empty((max(rows, 2 * len(arr)),) + arr.shape[1:], dtype=arr.dtype)
    out[:used] = arr[:used]
    return out


def _empty_table(cap: int) -> np.ndarray:
    table = np.empty((cap, 2), dtype=np.int64)
    table[:, 1] = -1
    return table


def _ack_padding(batch, cols: dict, rows: np.ndarray) -> np.ndarray | None:
    """The rows of `rows` that are bare ACKs (no SYN, FIN, RST or PSH) whose "payload" is 2 to
    7 zero bytes: padding of a short frame that a device also counted in the IP length (nDPI's
    heuristic_tcp_ack_payload.pcap holds a capture of it). Taken as data, those zeros would
    stand in the stream where the sender's real bytes go next (the first copy of a byte wins).
    nDPI's "TCP ACK payload" heuristic skips the same packets; one zero byte is a keep-alive
    and stays. None: no such row."""
    pl_len = cols["pl_len"][rows]
    flags = cols["tcp_flags"][rows]
    cand = np.flatnonzero((pl_len >= 2) & (pl_len < 8) & ((flags & (TCP_SYN | TCP_FIN | TCP_RST | TCP_PSH)) == 0)
                          & ((flags & TCP_ACK) != 0))
    if not len(cand):
        return None
    r = rows[cand]
    start = batch.offset[r].astype(np.int64) + cols["pl_off"][r].astype(np.int64)
    k = np.arange(7, dtype=np.int64)
    inside = k[None, :] < pl_len[cand][:, None].astype(np.int64)
    data = batch.data
    byte = data[np.minimum(start[:, None] + k[None, :], len(data) - 1)]
    zero = ((byte == 0) | ~inside).all(axis=1)
    return r[zero] if zero.any() else None


def _reserve(size: int) -> np.ndarray:
    """`size` bytes of address space, private, with no memory behind a page until it is written
    (MAP_NORESERVE: not counted against the memory that can be committed); a plain array of 64
    KB where that cannot be had."""
    import mmap
    import sys

    noreserve = getattr(mmap, "MAP_NORESERVE", 0x4000 if sys.platform == "linux" else 0)  # (Python 3.13 names it)
    try:
        return np.frombuffer(mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | noreserve), dtype=np.uint8)
    except (OSError, ValueError, OverflowError):
        return np.empty(1 << 16, dtype=np.uint8)


class Reassembler:
    def __init__(self, depth: int = 1 << 20, memcap: int = 256 << 20):
        self.depth = depth
        self.memcap = memcap
        self._st = np.zeros(N_ST, dtype=np.int64)
        self._st[ST_S_FREE] = -1
        self._T = _empty_table(1024)
        self._S = np.empty((256, N_S), dtype=np.int64)
        self._G = np.empty((1024, N_G), dtype=np.int64)
        self._A = np.empty((1024, N_A), dtype=np.int64)
        # The arena is the start of a reservation of address space, pages given only when first
        # written: it grows by taking more of it, nothing copied, instead of into a new array
        # twice as large each time (the copy, and as many fresh pages again, each a page fault:
        # 16,500 of them per ingest of mix.pcap against 8,300).
        self._reserved = _reserve(4 * memcap + 4 * depth)
        self._arena = self._reserved[:1 << 16]
        # take_many's output buffers (the directions' bytes are copied out of `_out`), and room
        # for one side's segment numbers
        self._out = np.empty(1 << 20, dtype=np.uint8)
        self._ts_off = np.empty(4096, dtype=np.int64)
        self._ts_val = np.empty(4096, dtype=np.int64)
        self._gap_off = np.empty(4096, dtype=np.int64)
        self._gap_len = np.empty(4096, dtype=np.int64)
        self._order = np.empty(4096, dtype=np.int64)
        self._group = np.empty(2, dtype=np.int64)  # _take_kernel's side rows of a group (per <= 2)
        self._ack_rel = np.empty(4096, dtype=np.int64)
        self._ack_pkt = np.empty(4096, dtype=np.int64)
        # limit, cut and drop, queued as (sid, depth or _CUT or _DROP) pairs: the stage asks for
        # them one session at a time, tens of thousands of them, applied by one kernel call when
        # the state is next used
        self._ops: list[int] = []

    @property
    def held(self) -> int:
        """Bytes held for all sessions."""
        self._apply()
        return int(self._st[ST_HELD])

    @property
    def conflicts(self) -> int:
        """Retransmissions whose bytes differed from the first copy, counted as directions are
        taken."""
        return int(self._st[ST_CONFLICTS])

    # ---- room ---------------------------------------------------------------------------------
    def _grow_table(self) -> None:
        bigger = _empty_table(2 * len(self._T))
        _rehash(self._T, bigger)
        self._T = bigger

    def _reserve(self, sides: int, segments: int, acks: int) -> None:
        """Rows for `sides` new sides, `segments` segments and `acks` ACKs. Segment and ACK rows
        are squeezed together when full (into arrays twice as large if they are more than half
        live)."""
        st = self._st
        if len(self._S) - int(st[ST_S_USED]) + int(st[ST_S_NFREE]) < sides:
            self._S = _grown(self._S, int(st[ST_S_USED]), int(st[ST_S_USED]) + sides)
        if len(self._G) - int(st[ST_G_USED]) < segments or len(self._A) - int(st[ST_A_USED]) < acks:
            new_G = np.empty((max(len(self._G), 2 * (int(st[ST_G_LIVE]) + segments)), N_G), dtype=np.int64)
            new_A = np.empty((max(len(self._A), 2 * (int(st[ST_A_LIVE]) + acks)), N_A), dtype=np.int64)
            _compact_rows(self._S, self._G, self._A, st, new_G, new_A)
            self._G, self._A = new_G, new_A

    def _arena_room(self, need: int) -> None:
        """`need` more bytes free at the arena's end: its dead bytes squeezed out, in place when
        that frees at least half of it (each move then pays for itself in new bytes), else into
        a new arena twice as large."""
        st = self._st
        held, cap = int(st[ST_HELD]), len(self._arena)
        if int(st[ST_ARENA_USED]) + need <= cap:
            return
        if held + need <= cap // 2:
            _pack(self._G, st, self._arena, self._arena, True)
            return
        size = max(2 * cap, 2 * (held + need))
        if size <= len(self._reserved) and self._arena.ctypes.data == self._reserved.ctypes.data:
            self._arena = self._reserved[:size]  # dead bytes stay until a later squeeze: there is room
            return
        bigger = np.empty(size, dtype=np.uint8)
        _pack(self._G, st, self._arena, bigger, False)
        self._arena = bigger

    def _apply(self) -> None:
        """The queued limits and drops."""
        if self._ops:
            ops = np.array(self._ops, dtype=np.int64).reshape(-1, 2).T.copy()
            self._ops = []
            self._reserve(2 * ops.shape[1], 0, 0)
            done = 0
            while True:
                done = _apply_ops(done, ops[0], ops[1], self._T, self._S, self._G, self._st)
                if done == ops.shape[1]:
                    break
                self._grow_table()

    # ---- the API ------------------------------------------------------------------------------
    def add(self, batch, cols: dict, rows: np.ndarray, sid: np.ndarray, is_orig: np.ndarray,
            first_packet: int = 0) -> None:
        """Take the TCP packets `rows` of a batch (sessions that want their streams).
        `first_packet`: the capture-file number of the batch's first frame (0: not known, and
        acknowledgements are not kept)."""
        if len(rows) == 0:
            return
        self._apply()
        st = self._st
        st[ST_DEPTH], st[ST_MEMCAP] = self.depth, self.memcap
        rows = np.ascontiguousarray(rows, dtype=np.int64)
        sid = np.ascontiguousarray(sid, dtype=np.int64)
        is_orig = np.ascontiguousarray(is_orig, dtype=np.bool_)
        n = len(rows)
        self._reserve(n, n, n if first_packet else 0)
        flags, seq = cols["tcp_flags"], cols["tcp_seq"]
        at = 0
        while True:
            at = _add_syns(at, rows, flags, seq, sid, is_orig, self._T, self._S, st)
            if at == n:
                break
            self._grow_table()
        pl_len, pl_off = cols["pl_len"], cols["pl_off"]
        padded = _ack_padding(batch, cols, rows)
        if padded is not None:  # taken as the ACKs they are, not as bytes of the stream
            pl_len = pl_len.copy()
            pl_len[padded] = 0
        data, offset, ts = batch.data, batch.offset, batch.ts
        row_side, missing = np.empty(n, dtype=np.int64), np.empty(n, dtype=np.uint64)
        at = 0
        while True:
            at = _add_data(at, rows, seq, pl_len, pl_off, data, offset, ts, sid, is_orig, self._T, self._S, self._G,
                           self._arena, st, row_side, missing)
            if at == n:
                break
            if at == _TABLE_FULL:
                self._grow_table()
                at = 0
            else:
                self._arena_room(int(st[ST_NEED_DATA]))
        if st[ST_HELD] > st[ST_MEMCAP] and (pl_len[rows] > 0).any():  # past the memcap after payloads
            _shed(self._S, self._G, st)
        if first_packet:  # after the data: a side the batch's data made (no SYN seen) has its base
            _add_acks(rows, flags, cols["tcp_ack"], sid, is_orig, first_packet, self._T, self._S, self._A, st)

    def limit(self, sid: int, depth: int) -> None:
        """Keep at most `depth` bytes per direction of session `sid` (its protocol needs no more)."""
        depth = min(depth, self.depth)
        self._ops += (sid, depth if depth >= 0 else -1)

    def cut_after_handshake(self, sids: np.ndarray) -> None:
        """Keep no byte of these sessions' directions past where TLS's record watcher says
        their handshake is read (see tls_kernel.watch_records): for sessions whose parsers
        read nothing else. What was kept before stays; ACKs are kept as before."""
        self._ops += np.column_stack([sids, np.full(len(sids), _CUT, dtype=np.int64)]).ravel().tolist()

    def drop(self, sid: int) -> None:
        """Forget session `sid`'s streams."""
        self._ops += (sid, _DROP)

    def limit_many(self, sids: np.ndarray, depths: np.ndarray) -> None:
        """limit() for each session of `sids`."""
        depths = np.minimum(np.asarray(depths, dtype=np.int64), self.depth)
        self._ops += np.column_stack([sids, np.where(depths >= 0, depths, -1)]).ravel().tolist()

    def drop_many(self, sids: np.ndarray) -> None:
        """drop() for each session of `sids`."""
        self._ops += np.column_stack([sids, np.full(len(sids), _DROP, dtype=np.int64)]).ravel().tolist()

    def take(self, sid: int, from_orig: bool) -> Direction:
        """Rebuild one direction of a session and forget it."""
        keys = _side_keys(np.array([sid], dtype=np.int64), np.array([from_orig]))
        return self._take_chunk(keys, 0, 1, None)[0][0]

    def take_many(self, sids, wanted=None):
        """Rebuild both directions of each session of `sids` and forget them: yields (orig
        Direction, resp Direction) per session, in order. With `wanted` (a truth value per
        session), a session not wanted is taken all the same (forgotten, its retransmissions
        counted) but yields None: its directions are not made. The directions are rebuilt a
        megabyte or so at a time, as the iteration reaches them (a session is taken when its
        group is, not before), so that taking many never holds all their bytes twice."""
        sids = np.asarray(sids, dtype=np.int64)
        keys = np.empty(2 * len(sids), dtype=np.int64)
        keys[0::2] = _side_keys(sids, np.ones(len(sids), dtype=bool))
        keys[1::2] = _side_keys(sids, np.zeros(len(sids), dtype=bool))
        want = None if wanted is None else np.repeat(np.asarray(wanted, dtype=bool), 2).tolist()
        start = 0
        while start < len(keys):
            made, done = self._take_chunk(keys, start, 2, want)
            start = done
            for orig, resp in zip(made[0::2], made[1::2]):
                yield None if orig is None else (orig, resp)

    def take_joined(self, sids, budget: int = 16 << 20):
        """Rebuild both directions of each session of `sids` and forget them, as JoinedStreams:
        yields (first session's position in `sids`, JoinedStreams of the sessions from there),
        about `budget` bytes at a time (a batch parser is called once per piece, and its cost
        per call should not matter: the buffers grow to the budget first). A piece's bytes are
        overwritten by the next take: read each piece before asking for the next."""
        sids = np.asarray(sids, dtype=np.int64)
        keys = np.empty(2 * len(sids), dtype=np.int64)
        keys[0::2] = _side_keys(sids, np.ones(len(sids), dtype=bool))
        keys[1::2] = _side_keys(sids, np.zeros(len(sids), dtype=bool))
        self._take_room(budget, budget >> 8, budget >> 8)
        start = 0
        while start < len(keys):
            self._apply()
            meta = np.empty((len(keys) - start, N_M), dtype=np.int64)
            while True:
                done = _take_kernel(keys, start, 2, self._T, self._S, self._G, self._A, self._arena, self._st,
                                    self._out, self._ts_off, self._ts_val, self._gap_off, self._gap_len,
                                    self._ack_rel, self._ack_pkt, self._order, meta, self._group)
                if done > start:
                    break
                st = self._st
                self._take_room(int(st[ST_NEED_DATA]), int(st[ST_NEED_SEG]), int(st[ST_NEED_ACK]))
            yield start // 2, self._joined(meta[:done - start])
            start = done

    def _joined(self, meta: np.ndarray) -> JoinedStreams:
        """What one _take_kernel call rebuilt, as JoinedStreams. Its bytes are a view of the
        output buffer, not a copy (they are most of what a take moves: a TLS close copied
        tens of MB): valid until the next take, which take_joined's caller only asks for once
        done with the piece. The other arrays are small and copied."""
        def starts(ends):
            at = np.zeros(len(ends) + 1, dtype=np.int64)
            at[1:] = ends
            return at

        data_at, ts_at, gap_at, ack_at = (starts(meta[:, c]) for c in (M_DATA_END, M_TS_END, M_GAP_END, M_ACK_END))
        nt, ng, na = ts_at[-1], gap_at[-1], ack_at[-1]
        return JoinedStreams(self._out[:data_at[-1]], data_at, self._ts_off[:nt].copy(),
                             self._ts_val[:nt].copy(), ts_at, self._gap_off[:ng].copy(), self._gap_len[:ng].copy(),
                             gap_at, self._ack_rel[:na].copy(), self._ack_pkt[:na].copy(), ack_at,
                             meta[:, M_TRUNC] == 1)

    def _take_chunk(self, keys: np.ndarray, start: int, per: int, want: list | None) -> tuple[list, int]:
        """Directions of keys[start:], `per` at a time, as many as the output buffers hold
        (grown if not even `per` fit): (a Direction, or None where `want` says no, per key
        taken; the index of the first key not taken)."""
        self._apply()
        st = self._st
        meta = np.empty((len(keys) - start, N_M), dtype=np.int64)
        while True:
            done = _take_kernel(keys, start, per, self._T, self._S, self._G, self._A, self._arena, st,
                                self._out, self._ts_off, self._ts_val, self._gap_off, self._gap_len, self._ack_rel,
                                self._ack_pkt, self._order, meta, self._group)
            if done > start:
                return self._directions(meta[:done - start], None if want is None else want[start:done]), done
            self._take_room(int(st[ST_NEED_DATA]), int(st[ST_NEED_SEG]), int(st[ST_NEED_ACK]))

    def _take_room(self, data: int, segments: int, acks: int) -> None:
        if len(self._out) < data:
            self._out = np.empty(max(data, 2 * len(self._out)), dtype=np.uint8)
        if len(self._ts_off) < segments:
            size = max(segments, 2 * len(self._ts_off))
            self._ts_off, self._ts_val = np.empty(size, dtype=np.int64), np.empty(size, dtype=np.int64)
            self._gap_off, self._gap_len = np.empty(size, dtype=np.int64), np.empty(size, dtype=np.int64)
            self._order = np.empty(size, dtype=np.int64)
        if len(self._ack_rel) < acks:
            size = max(acks, 2 * len(self._ack_rel))
            self._ack_rel, self._ack_pkt = np.empty(size, dtype=np.int64), np.empty(size, dtype=np.int64)

    def _directions(self, meta: np.ndarray, want: list | None) -> list:
        """The directions one _take_kernel call rebuilt, from its output buffers (copied: the
        buffers serve the next call); None for those `want` says are not wanted. Python's part
        of taking, per direction: kept to making the objects a Direction is made of."""
        data_end, ts_end, gap_end, ack_end, trunc = meta.T.tolist()
        data_start, ts_start, gap_start, ack_start = ([0] + ends[:-1] for ends in (data_end, ts_end, gap_end, ack_end))
        out = memoryview(self._out)
        ts_off = self._ts_off[:ts_end[-1]].copy()
        ts_val = self._ts_val[:ts_end[-1]].copy()
        gaps = list(zip(self._gap_off[:gap_end[-1]].tolist(), self._gap_len[:gap_end[-1]].tolist()))
        ack_rel = self._ack_rel[:ack_end[-1]].copy()
        ack_pkt = self._ack_pkt[:ack_end[-1]].copy()
        made = []
        append = made.append
        for t0, t1, d0, d1, g0, g1, a0, a1, cut, wanted in zip(ts_start, ts_end, data_start, data_end, gap_start,
                                                               gap_end, ack_start, ack_end, trunc,
                                                               want or [True] * len(trunc)):
            if not wanted:
                append(None)
            elif t0 == t1:  # no segment (no side, or only a SYN or a limit made it): no bytes
                append(Direction(b"", [], _EMPTY, _EMPTY, cut == 1, [(ack_rel[a0:a1], ack_pkt[a0:a1])] if a1 > a0 else []))
            else:
                append(Direction(out[d0:d1].tobytes(), gaps[g0:g1] if g1 > g0 else [], ts_off[t0:t1], ts_val[t0:t1],
                                 cut == 1, [(ack_rel[a0:a1], ack_pkt[a0:a1])] if a1 > a0 else []))
        return made
