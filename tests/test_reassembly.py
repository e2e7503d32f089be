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
        sid, is_orig, _, _ = table.update(cols, part.ts, part.wirelen)
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
    sid, is_orig, _, _ = FlowTable().update(cols, batch.ts, batch.wirelen)
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
