"""TCP reassembly against PcapPlusPlus's expected streams, plus overlap, gap and bound cases."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest

from wiretrail.app.reassembly import Reassembler
from wiretrail.batch import FrameBatch
from wiretrail.capture import iter_batches
from wiretrail.decode import decode
from wiretrail.sessions.flowtable import FlowTable

PPP = Path(__file__).resolve().parents[1].parent / "shared" / "corpus" / "pcapplusplus"
MISSING = re.compile(rb"\[(\d+) bytes missing\]")


def one_batch(path: Path) -> FrameBatch:
    batches = [dataclasses.replace(b, data=b.data.copy(), offset=b.offset.copy(), caplen=b.caplen.copy(),
                                   wirelen=b.wirelen.copy(), ts=b.ts.copy(), iface=b.iface.copy(),
                                   linktype=b.linktype.copy()) for b in iter_batches(str(path))]
    assert len(batches) == 1
    return batches[0]


def reorder(batch: FrameBatch, order: list[int]) -> FrameBatch:
    idx = np.array(order, dtype=np.int64)
    return dataclasses.replace(batch, offset=batch.offset[idx], caplen=batch.caplen[idx],
                               wirelen=batch.wirelen[idx], ts=batch.ts[idx], iface=batch.iface[idx],
                               linktype=batch.linktype[idx])


def streams(batch: FrameBatch, depth: int = 1 << 20, batch_packets: int = 0, memcap: int = 256 << 20):
    """{sid: (orig Direction, resp Direction)} for every TCP session of the batch, fed to the
    reassembler whole or `batch_packets` packets at a time."""
    step = batch_packets or len(batch)
    table = FlowTable()
    r = Reassembler(depth=depth, memcap=memcap)
    seen = set()
    for lo in range(0, len(batch), step):
        part = reorder(batch, list(range(lo, min(lo + step, len(batch)))))
        cols = decode(part)
        sid, is_orig, *_ = table.update(cols, part.ts, part.wirelen)
        rows = np.flatnonzero((cols["proto"] == 6) & (sid >= 0))
        r.add(part, cols, rows, sid, is_orig)
        seen.update(sid[rows].tolist())
    return {s: (r.take(s, True), r.take(s, False)) for s in sorted(seen)}, r


def tokens(direction) -> list[bytes]:
    """A direction as the pieces a segment-by-segment reassembler releases, gaps written the
    way PcapPlusPlus writes them."""
    cuts = list(direction.ts_offsets) + [len(direction.data)]
    gaps = dict(direction.gaps)
    out = []
    for a, b in zip(cuts[:-1], cuts[1:]):
        if a in gaps:
            out.append(b"[%d bytes missing]" % gaps.pop(a))
        out.append(direction.data[a:b])
    for _, n in sorted(gaps.items()):  # a gap at the very end
        out.append(b"[%d bytes missing]" % n)
    return out


def interleaves(expected: bytes, a: list[bytes], b: list[bytes]) -> bool:
    """Is `expected` the pieces of a and b, each kept in order, interleaved?"""
    i = j = pos = 0
    while i < len(a) or j < len(b):
        if i < len(a) and expected.startswith(a[i], pos):
            pos += len(a[i])
            i += 1
        elif j < len(b) and expected.startswith(b[j], pos):
            pos += len(b[j])
            j += 1
        else:
            return False
    return pos == len(expected)


# Cases fed in file order, or reordered by index operations we can replay exactly.
def _no_syn(n):
    return list(range(2, n))


def _ipv6_ooo(n):
    order = list(range(n))
    order.insert(12, order.pop(10))
    order.insert(17, order.pop(15))
    return order


def _out_of_order(n):
    order = list(range(n))
    order[9], order[10] = order[10], order[9]
    order.insert(23, order.pop(18))
    for i in range(12):
        order.insert(24 + i, order.pop(35))
    return order


REPLAYS = {"tcp_no_syn": _no_syn, "tcp_ipv6_out_of_order": _ipv6_ooo, "tcp_out_of_order": _out_of_order}


@pytest.mark.skipif(not (PPP / "manifest.json").exists(), reason="corpus not found")
def test_pcapplusplus_streams():
    cases = [c for c in json.loads((PPP / "manifest.json").read_text()) if c["kind"] == "tcp_reassembly"]
    checked = agree = 0
    for case in cases:
        if not case["expected"] or (case.get("input_transform") and case["id"] not in REPLAYS):
            continue
        if case["id"] == "tcp_timestamps":
            continue
        batch = one_batch(PPP / case["input"])
        if case["id"] in REPLAYS:
            batch = reorder(batch, REPLAYS[case["id"]](len(batch)))
        got, _ = streams(batch)
        expected = case["expected"]
        if isinstance(expected, str):
            expected = {"": expected}
        for what, path in expected.items():
            if path is None or "metadata" in path:
                continue
            want = (PPP / path).read_bytes()
            checked += 1
            if "only (-s)" in what:  # one direction per file
                ok = any(d.data == want for o, r in got.values() for d in (o, r))
            else:
                ok = any(interleaves(want, tokens(o), tokens(r)) for o, r in got.values())
            agree += ok
            if not ok:
                print(f"  {case['id']} {what}: differs")
    print(f"\npcapplusplus tcp reassembly: {agree}/{checked} expected streams reproduced")
    assert checked >= 12 and agree == checked


def test_missing_data_becomes_gaps():
    batch = one_batch(PPP / "tcp_reassembly" / "one_tcp_stream.pcap")
    n = len(batch)
    got_all, _ = streams(batch)
    (o_all, r_all), = got_all.values()
    dropped = [k for k in range(n) if k not in (28, 30)]
    got, _ = streams(reorder(batch, dropped))
    (o, r), = got.values()
    lost = sum(g for _, g in o.gaps) + sum(g for _, g in r.gaps)
    assert lost > 0 and len(o.data) + len(r.data) + lost == len(o_all.data) + len(r_all.data)


def test_overlap_first_copy_wins_and_depth_bound():
    batch = one_batch(PPP / "tcp_reassembly" / "one_tcp_stream.pcap")
    n = len(batch)
    got, _ = streams(reorder(batch, list(range(n)) + list(range(3, n))))  # every segment twice
    plain, _ = streams(batch)
    assert [(o.data, r.data) for o, r in got.values()] == [(o.data, r.data) for o, r in plain.values()]
    got, r = streams(batch, depth=1000)
    (o, s), = got.values()
    assert len(o.data) <= 1000 and len(s.data) <= 1000 and (o.truncated or s.truncated)
    assert r.held == 0  # everything taken


def test_same_streams_whatever_the_batches():
    """A stream fed a few packets per batch (each batch a block of its own), out of order and
    with every segment twice, comes out as when fed whole."""
    batch = one_batch(PPP / "tcp_reassembly" / "one_tcp_stream.pcap")
    n = len(batch)
    whole, _ = streams(batch)
    for order in (list(range(n)), _out_of_order(n), list(range(n)) + list(range(3, n))):
        mixed = reorder(batch, order)
        one, _ = streams(mixed)
        for per_batch in (1, 3, 7):
            got, r = streams(mixed, batch_packets=per_batch)
            assert [(o.data, o.gaps, s.data, s.gaps) for o, s in got.values()] == \
                [(o.data, o.gaps, s.data, s.gaps) for o, s in one.values()]
            assert [list(o.ts_offsets) for o, _ in got.values()] == [list(o.ts_offsets) for o, _ in one.values()]
            assert r.held == 0
    assert [(o.data, s.data) for o, s in one.values()] == [(o.data, s.data) for o, s in whole.values()]


def test_sessions_from_2030_on():
    """A sid's top bits are its hour: from late 2029 on, sid * 2 overflows an int64. Streams of
    a capture dated 2031 come out as the same capture's do."""
    batch = one_batch(PPP / "tcp_reassembly" / "one_tcp_stream.pcap")
    later = dataclasses.replace(batch, ts=batch.ts - batch.ts.min() + 1_924_992_000 * 10**9)  # 2031-01-01
    got, r = streams(later, batch_packets=4)
    assert min(got) >= 1 << 62
    want, _ = streams(batch, batch_packets=4)
    assert [(o.data, o.gaps, s.data, s.gaps) for o, s in got.values()] == \
        [(o.data, o.gaps, s.data, s.gaps) for o, s in want.values()]
    assert all(o.data and s.data for o, s in got.values()) and r.held == 0


def test_memcap_sheds_the_later_bytes_as_gaps():
    """Past the memcap the directions holding most are cut to what comes first in sequence:
    what a direction holds up to its first gap is the stream's start, and bytes shed before
    later ones are gaps (shed at the end, the direction just ends, marked truncated)."""
    batch = one_batch(PPP / "tcp_reassembly" / "one_tcp_stream.pcap")
    whole, _ = streams(batch)
    (o_all, r_all), = whole.values()
    memcap = (len(o_all.data) + len(r_all.data)) // 4
    got, r = streams(batch, batch_packets=5, memcap=memcap)
    (o, s), = got.values()
    assert o.truncated and s.truncated and s.gaps
    for part, full in ((o, o_all), (s, r_all)):
        first_gap = part.gaps[0][0] if part.gaps else len(part.data)
        assert 0 < first_gap and part.data[:first_gap] == full.data[:first_gap]
        assert len(part.data) + sum(n for _, n in part.gaps) < len(full.data)
    assert r.held == 0


def test_acked_by_names_the_first_packet_acknowledging_the_bytes():
    """Direction.acked_by(end): the first packet of the other side whose ACK covers the
    direction's bytes up to `end` (where Suricata hands them to its parser: pcap_cnt)."""
    batch = one_batch(PPP / "tcp_reassembly" / "one_tcp_stream.pcap")
    cols = decode(batch)
    sid, is_orig, *_ = FlowTable().update(cols, batch.ts, batch.wirelen)
    r = Reassembler()
    rows = np.flatnonzero((cols["proto"] == 6) & (sid >= 0))
    r.add(batch, cols, rows, sid, is_orig, first_packet=1)
    (s,) = np.unique(sid[rows]).tolist()
    for from_orig in (True, False):
        d = r.take(s, from_orig)
        syn = [k for k in rows.tolist() if is_orig[k] == from_orig and cols["tcp_flags"][k] & 0x02]
        base = (int(cols["tcp_seq"][syn[0]]) + 1) & 0xFFFFFFFF
        acks = [(k, (int(cols["tcp_ack"][k]) - base) & 0xFFFFFFFF) for k in rows.tolist()
                if is_orig[k] != from_orig and cols["tcp_flags"][k] & 0x10]
        for end in (1, len(d.data) // 2, len(d.data)):
            want = next((k + 1 for k, a in acks if a >= end and a < 1 << 31), 0)
            assert d.acked_by(end) == want and (want or end == len(d.data))
        assert d.after(10).acked_by(len(d.data) - 10) == d.acked_by(len(d.data))


# ---- the reassembler against the one it replaced, on random segment streams ------------------

def _random_capture(rng: np.random.Generator, make_stream=None, lossy: float = 1.0, shuffled: bool = True):
    """Packets of a few sessions, as (sid, from_orig, flags, seq, ack, payload, ts) in capture
    order: streams cut into segments, reordered, retransmitted (some with other bytes or other
    boundaries), some lost, SYNs seen or missed, sequence numbers that wrap, stray segments
    before the base, ACKs repeated and out of range. In some captures every segment has 100
    bytes and streams a few of them: sides then often hold as much as others (the memcap's ties).
    `make_stream(rng)`, if given, makes each direction's bytes; `lossy` scales how often a
    segment is lost or sent again; not `shuffled`: the packets come session by session, each
    direction's in order."""
    packets = []
    even = make_stream is None and rng.random() < 0.3
    sids = rng.choice([1, 7, 12345, (1 << 62) + 3, (1 << 63) - 5], size=int(rng.integers(1, 5)), replace=False)
    for sid in sids.tolist():
        isn = {d: int(rng.choice([rng.integers(0, 1 << 32), (1 << 32) - int(rng.integers(1, 400))])) for d in (True, False)}
        streams = {d: make_stream(rng) if make_stream else
                   rng.integers(0, 256, size=100 * int(rng.integers(0, 4)) if even else int(rng.integers(0, 2500)),
                                dtype=np.uint8).tobytes() for d in (True, False)}
        t = int(rng.integers(0, 1000))
        for d in (True, False):
            if rng.random() < 0.7:
                packets.append([sid, d, 0x02 | (0x10 if not d else 0), isn[d], (isn[not d] + 1) & 0xFFFFFFFF if not d else 0, b"", t])
            data, pos = streams[d], 0
            while pos < len(data):
                n = 100 if even else int(rng.integers(1, 300))
                piece = data[pos:pos + n]
                for copy in range(1 + (rng.random() < 0.2 * lossy)):
                    if copy and rng.random() < 0.5:  # a retransmission with other bytes
                        piece = bytes(rng.integers(0, 256, size=len(piece), dtype=np.uint8))
                    start = pos
                    if copy and rng.random() < 0.3:  # ... or other boundaries
                        start = max(0, pos - int(rng.integers(0, 50)))
                        piece = data[start:pos + n + int(rng.integers(0, 50))]
                    if rng.random() < 0.08 * lossy:  # lost
                        continue
                    ack = (isn[not d] + 1 + int(rng.integers(0, len(streams[not d]) + 40))) & 0xFFFFFFFF
                    packets.append([sid, d, 0x10 if rng.random() < 0.9 else 0, (isn[d] + 1 + start) & 0xFFFFFFFF,
                                    ack, piece, t + int(rng.integers(-3, 30))])
                pos += n
            if rng.random() < 0.2:  # stray bytes before the base
                packets.append([sid, d, 0x10, (isn[d] - 100) & 0xFFFFFFFF, 0, b"x" * 20, t])
            for _ in range(int(rng.integers(0, 6))):  # bare ACKs, some repeated
                ack = (isn[not d] + 1 + int(rng.integers(-5, len(streams[not d]) + 5))) & 0xFFFFFFFF
                for _ in range(int(rng.integers(1, 3))):
                    packets.append([sid, d, 0x10, (isn[d] + 1) & 0xFFFFFFFF, ack, b"", t + int(rng.integers(0, 40))])
    if not shuffled:
        return packets
    order = np.argsort(rng.random(len(packets)) + np.array([p[6] for p in packets]) / 400)  # mostly in time order
    return [packets[k] for k in order]


def _random_batches(rng: np.random.Generator, n: int, most: int) -> list[tuple[int, int]]:
    """n packets cut at fewer than `most` random places: the (start, end) of each non-empty batch."""
    cuts = sorted(rng.choice(n + 1, size=min(n + 1, int(rng.integers(1, most))), replace=False).tolist())
    return [(lo, hi) for lo, hi in zip([0] + cuts, cuts + [n]) if hi > lo]


def _fake_batch(packets):
    """A batch and its decoded columns from (sid, from_orig, flags, seq, ack, payload, ts)."""
    payloads = [p[5] for p in packets]
    lengths = np.array([len(b) + 10 for b in payloads], dtype=np.int64)
    offset = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    data = np.frombuffer(b"".join(b"\xee" * 10 + b for b in payloads), dtype=np.uint8).copy()
    batch = FrameBatch(data=data, offset=offset, caplen=lengths.astype(np.int32), wirelen=lengths.astype(np.int32),
                       ts=np.array([p[6] for p in packets], dtype=np.int64), iface=np.zeros(len(packets), dtype=np.int16),
                       linktype=np.ones(len(packets), dtype=np.uint16))
    cols = {"tcp_flags": np.array([p[2] for p in packets], dtype=np.uint8),
            "tcp_seq": np.array([p[3] for p in packets], dtype=np.uint32),
            "tcp_ack": np.array([p[4] for p in packets], dtype=np.uint32),
            "pl_len": np.array([len(b) for b in payloads], dtype=np.int32),
            "pl_off": np.full(len(packets), 10, dtype=np.int32)}
    sid = np.array([p[0] for p in packets], dtype=np.int64)
    is_orig = np.array([p[1] for p in packets], dtype=bool)
    return batch, cols, sid, is_orig


def _same(a, b) -> bool:
    acks = [(np.concatenate([r for r, _ in d.acks]).tolist(), np.concatenate([p for _, p in d.acks]).tolist())
            if d.acks else None for d in (a, b)]
    return (a.data == b.data and a.gaps == b.gaps and list(a.ts_offsets) == list(b.ts_offsets)
            and list(a.ts) == list(b.ts) and a.truncated == b.truncated and acks[0] == acks[1])


def _consistent(r: Reassembler) -> bool:
    """The reassembler's counts agree with what its arrays hold (the kernels trust them: they
    size the arrays that compaction writes)."""
    from wiretrail.app import reassembly as m

    st, S = r._st, r._S[:r._st[m.ST_S_USED]]
    live = S[S[:, m.LIVE] == 1]
    G = r._G[:st[m.ST_G_USED]]
    segs = G[G[:, m.G_LEN] > 0]  # in arena order, which squeezing the arena relies on
    return ((np.diff(segs[:, m.G_OFF]) > 0).all() and len(segs) == st[m.ST_G_LIVE]
            and len(live) == st[m.ST_SIDES] and live[:, m.KEPT].sum() == st[m.ST_HELD]
            and live[:, m.NSEG].sum() == st[m.ST_G_LIVE] and live[:, m.NACK].sum() == st[m.ST_A_LIVE]
            and st[m.ST_S_USED] - len(live) == st[m.ST_S_NFREE] and (r._T[:, 1] >= 0).sum() == len(live))


def _tiny(r: Reassembler, reserved: bool) -> Reassembler:
    """`r` (new) with arrays so small that every way of making room is taken: the table
    rehashed, rows grown and squeezed, the arena squeezed in place and grown (within its
    reservation of address space if `reserved`, else moved to a larger array), take's buffers
    grown."""
    from wiretrail.app import reassembly as m

    r._T = m._empty_table(2)
    r._S, r._G, r._A = np.empty((1, m.N_S), np.int64), np.empty((1, m.N_G), np.int64), np.empty((1, m.N_A), np.int64)
    r._arena, r._out = (r._reserved[:16] if reserved else np.empty(16, np.uint8)), np.empty(16, np.uint8)
    for name in ("_ts_off", "_ts_val", "_gap_off", "_gap_len", "_order", "_ack_rel", "_ack_pkt"):
        setattr(r, name, np.empty(1, np.int64))
    return r


def test_same_directions_as_the_reference_reassembler():
    """Random segment streams (reordered, overlapping, retransmitted with other bytes, with gaps,
    with and without SYNs, wrapping sequence numbers), fed in random batches with limits, drops
    and takes in between, under small depths and memcaps: every direction, `held` and
    `conflicts` as the reassembler this one replaced gives them."""
    from _reassembly_reference import ReferenceReassembler

    rng = np.random.default_rng(20240601)
    compared = shed = 0
    for case in range(250):
        depth = int(rng.choice([1 << 20, 700, 3000]))
        memcap = int(rng.choice([256 << 20, 1000, 4000, 12000]))
        new, old = Reassembler(depth=depth, memcap=memcap), ReferenceReassembler(depth=depth, memcap=memcap)
        if case % 2:
            new = _tiny(new, reserved=case % 4 == 1)
        packets = _random_capture(rng)
        sids = sorted({p[0] for p in packets})
        first = 0
        for lo, hi in _random_batches(rng, len(packets), 8):
            batch, cols, sid, is_orig = _fake_batch(packets[lo:hi])
            rows = np.flatnonzero(rng.random(hi - lo) < 0.95)  # a few rows not selected
            first_packet = 0 if rng.random() < 0.2 else first + 1
            for r in (new, old):
                r.add(batch, cols, rows, sid, is_orig, first_packet)
            first += hi - lo
            shed += old.held > memcap * 3 // 4
            for s in sids:  # between batches: what the stage may ask
                u = rng.random()
                if u < 0.1:
                    d = int(rng.choice([0, 100, 2000]))
                    new.limit(s, d)
                    old.limit(s, d)
                elif u < 0.13:
                    new.drop(s)
                    old.drop(s)
                elif u < 0.18:
                    from_orig = bool(rng.random() < 0.5)
                    assert _same(new.take(s, from_orig), old.take(s, from_orig)), case
                    compared += 1
            assert new.held == old.held and new.conflicts == old.conflicts and _consistent(new), case
        got = list(new.take_many(sids))
        for s, (o, r) in zip(sids, got):
            assert _same(o, old.take(s, True)) and _same(r, old.take(s, False)), (case, s)
            compared += 2
        assert new.held == old.held == 0 and new.conflicts == old.conflicts and _consistent(new), case
    assert compared > 1000 and shed > 20


# ---- TLS: nothing kept past the handshake's reading -----------------------------------------

def _tls_bytes(rng: np.random.Generator) -> bytes:
    """A direction as a TLS peer sends it: handshake, ChangeCipherSpec, alert and application-data
    records of random sizes (a few up to the largest a record may be), now and then a broken
    header, or something else than TLS first."""
    out = bytearray()
    if rng.random() < 0.1:
        out += rng.integers(0, 256, size=int(rng.integers(1, 40)), dtype=np.uint8).tobytes()
    for _ in range(int(rng.integers(0, 14))):
        kind = int(rng.choice([22, 22, 20, 21, 23, 23, 23, 23]))
        n = int(rng.integers(0, 1500)) if rng.random() < 0.85 else int(rng.integers(1500, (1 << 14) + 2048))
        if kind == 21 and rng.random() < 0.7:
            n = 2
        major = 3 if rng.random() > 0.02 else 9  # a broken header
        out += bytes([kind, major, int(rng.integers(0, 5)), n >> 8, n & 0xFF])
        out += rng.integers(0, 256, size=n, dtype=np.uint8).tobytes()
    return bytes(out)


def _acks(d) -> list:
    return [(r.tolist(), p.tolist()) for r, p in d.acks]


def test_cut_after_handshake_keeps_what_the_tls_parser_reads():
    """Random TLS-framed streams (records of all types and sizes, broken headers, other bytes
    first), segmented, reordered, retransmitted and lost as in the test above, fed in batches to
    a reassembler told to cut them after the handshake and to one that is not: every session's
    `tls` row (handshake, hellos, certificates, the packet the ACKs name) is the same from both,
    the cut directions are beginnings of the whole ones, and bytes were cut."""
    from wiretrail.app import tls
    from wiretrail.app.base import Stream

    rng = np.random.default_rng(20261204)
    kept = whole = sessions = shorter = 0
    for case in range(150):
        lossy = float(rng.choice([0.0, 0.3, 1.0]))
        packets = _random_capture(rng, _tls_bytes, lossy, shuffled=rng.random() < 0.3)
        sids = sorted({p[0] for p in packets})
        cut, full = Reassembler(depth=1 << 20), Reassembler(depth=1 << 20)
        cut.cut_after_handshake(np.array(sids, dtype=np.int64))
        first = 0
        for lo, hi in _random_batches(rng, len(packets), 6):
            batch, cols, sid, is_orig = _fake_batch(packets[lo:hi])
            rows = np.arange(hi - lo)
            for r in (cut, full):
                r.add(batch, cols, rows, sid, is_orig, first + 1)
            first += hi - lo
        pairs = {}
        for name, r in (("cut", cut), ("full", full)):
            pairs[name] = [Stream(uid=str(s), orig_h="10.0.0.1", orig_p=1000, resp_h="10.0.0.2", resp_p=443,
                                  orig=o, resp=p) for s, (o, p) in zip(sids, r.take_many(sids))]
        for a, b in zip(pairs["cut"], pairs["full"]):
            for x, y in ((a.orig, b.orig), (a.resp, b.resp)):
                assert y.data.startswith(x.data) and _acks(x) == _acks(y), case
                kept += len(x.data)
                whole += len(y.data)
                shorter += len(x.data) < len(y.data)
        got = [tls.parse_streams(pairs[name]) for name in ("cut", "full")]
        assert got[0].table.equals(got[1].table) and list(got[0].index) == list(got[1].index), case
        sessions += len(sids)
    print(f"\n{sessions} sessions: {shorter} directions cut after the handshake, {kept} of {whole} bytes kept")
    assert sessions > 200 and shorter > 50


# ---- JoinedStreams: the same directions, many sessions end to end -----------------------------

ZEEK_TRACES = PPP.parent / "zeek" / "traces"


@pytest.mark.skipif(not (ZEEK_TRACES / "smtp.pcap").exists(), reason="corpus not found")
def test_take_joined_gives_the_directions_of_take_many():
    """take_joined (in pieces: a small budget) and take_many on the same reassembler state:
    every side's bytes, gaps, times, ACKs and truncation equal, and JoinedStreams' contiguous
    ends and gap-counted ends those of the Directions."""
    batch = one_batch(ZEEK_TRACES / "smtp.pcap")
    cols = decode(batch)
    sid, is_orig, *_ = FlowTable().update(cols, batch.ts, batch.wirelen)
    rows = np.flatnonzero((cols["proto"] == 6) & (sid >= 0))
    # every other segment left out of some sessions: gaps to count
    keep = np.ones(len(rows), dtype=bool)
    some = np.unique(sid[rows])[::2]
    keep[np.isin(sid[rows], some) & (np.arange(len(rows)) % 5 == 2) & (cols["pl_len"][rows] > 0)] = False
    pair = [Reassembler(depth=4000), Reassembler(depth=4000)]
    for r in pair:
        r.add(batch, cols, rows[keep], sid, is_orig, first_packet=1)
    sids = np.unique(sid[rows])
    want = [d for o_r in pair[0].take_many(sids) for d in o_r]
    got, pieces, rng = [], 0, np.random.default_rng(3)
    pair[1]._out = np.empty(1024, dtype=np.uint8)  # (its first size, 1 MB, would hold them all)
    for first, piece in pair[1].take_joined(sids, budget=1 << 12):
        assert first == len(got) // 2
        pieces += 1
        sides = np.arange(2 * len(piece))
        ends = rng.integers(0, 5000, len(sides))
        want_here = want[len(got):len(got) + len(sides)]
        assert piece.contiguous_ends().tolist() == [d.contiguous_end() for d in want_here]
        assert piece.seq_ends(sides, ends).tolist() == [
            e + sum(n for o, n in d.gaps if o < e) for d, e in zip(want_here, ends.tolist())]
        got += [piece.direction(j) for j in sides.tolist()]
    assert len(got) == len(want) == 2 * len(sids) and pieces > 1
    gaps = acks = 0
    for a, b in zip(got, want):
        assert (a.data, a.gaps, a.truncated) == (b.data, b.gaps, b.truncated)
        assert a.ts_offsets.tolist() == b.ts_offsets.tolist() and a.ts.tolist() == b.ts.tolist()
        assert [(r.tolist(), p.tolist()) for r, p in a.acks] == [(r.tolist(), p.tolist()) for r, p in b.acks]
        for end in (1, len(a.data) // 2, len(a.data)):
            assert a.acked_by(end) == b.acked_by(end)
        gaps += len(a.gaps)
        acks += bool(a.acks)
    print(f"\ntake_joined: {len(sids)} sessions in {pieces} pieces as take_many ({gaps} gaps, {acks} sides with ACKs)")
    assert gaps > 0 and acks > 0
