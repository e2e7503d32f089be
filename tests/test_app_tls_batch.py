"""TLS and x509 rows of many sessions at once (tls.parse_streams, x509.parse_streams) against the
row-by-row calls (parse_stream), and what the batch path derives on its own: fingerprints from
the kernel's fingerprint keys against those of the hellos, and the log packet from ACKs
against Direction.acked_by."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from _tls_harness import load
from wiretrail.app import tls, x509
from wiretrail.app.base import Direction, JoinedStreams, Stream

CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "corpus"
ZEEK = CORPUS / "zeek"
JA4 = CORPUS / "ja4"

pytestmark = pytest.mark.skipif(not ZEEK.exists(), reason="corpus not present")


def _captures() -> list[Path]:
    """The Zeek traces with an ssl or x509 log, and the JA4 captures."""
    zeek = json.loads((ZEEK / "manifest.json").read_text())
    out = [ZEEK / t["trace"] for t in zeek if "ssl" in t["logs"] or "x509" in t["logs"]]
    out += [JA4 / t["pcap"] for t in json.loads((JA4 / "manifest.json").read_text())]
    return sorted({p for p in out if p.exists()})


def _with_acks(rng: random.Random, d: Direction) -> Direction:
    """d with made-up ACKs of its bytes (the harness keeps none): a few batches of them, some
    out of order, so that `packet` has something to find."""
    span = len(d.data) + sum(n for _, n in d.gaps)
    acks, packet = [], rng.randint(1, 1000)
    for _ in range(rng.randint(1, 3)):
        rel = np.array(sorted(rng.randint(0, span + 2) for _ in range(rng.randint(0, 12))), dtype=np.int64)
        if rng.random() < 0.3:
            rel = rel[::-1].copy()
        acks.append((rel, np.arange(packet, packet + len(rel), dtype=np.int64)))
        packet += len(rel) + 1
    return Direction(data=d.data, gaps=list(d.gaps), ts_offsets=d.ts_offsets, ts=d.ts, acks=acks)


_streams: list[list[Stream]] = []


def _corpus_streams() -> list[list[Stream]]:
    """Every TCP stream of the captures (per capture), most with ACKs, some parts of them (as a
    proxy's inner connection: Direction.after)."""
    if not _streams:
        rng = random.Random(5)
        for path in _captures():
            streams = []
            for s in load(path)[0]:
                if rng.random() < 0.8:
                    s = Stream(s.uid, s.orig_h, s.orig_p, s.resp_h, s.resp_p, _with_acks(rng, s.orig),
                               _with_acks(rng, s.resp))
                streams.append(s)
                if rng.random() < 0.1:
                    streams.append(Stream(s.uid, s.orig_h, s.orig_p, s.resp_h, s.resp_p, s.orig.after(rng.randint(0, 9)),
                                          s.resp.after(rng.randint(0, 9))))
            _streams.append(streams)
    return _streams


def _batch_rows(module, streams: list[Stream]) -> list[tuple[int, dict]]:
    records = module.parse_streams(streams)
    assert records.name is None and (np.diff(records.index) >= 0).all()
    out = []
    for k, row in zip(records.index.tolist(), tls.dicts(records.table)):
        s = streams[k]  # the session's columns, as the stage fills them
        row.update(uid=s.uid, orig_h=s.orig_h, orig_p=s.orig_p, resp_h=s.resp_h, resp_p=s.resp_p)
        out.append((k, {name: row.get(name) for name in module.SCHEMA.names}))
    return out


def _single_rows(module, streams: list[Stream]) -> list[tuple[int, dict]]:
    out = []
    for k, s in enumerate(streams):
        tls._last = None  # each session read on its own, as the stage's fallback does
        out += [(k, {name: row.get(name) for name in module.SCHEMA.names}) for row in module.parse_stream(s)]
    return out


def test_batch_rows_are_the_rows_of_sessions_one_by_one():
    """Per capture, and for all captures as one batch: the same rows (every column, x509's too)
    as parse_stream gives session by session."""
    per_capture = _corpus_streams()
    everything = [s for streams in per_capture for s in streams]
    counts = {}
    for module in (tls, x509):
        single = _single_rows(module, everything)
        batch, base = [], 0
        for streams in per_capture:
            batch += [(base + k, row) for k, row in _batch_rows(module, streams)]
            base += len(streams)
        assert batch == single
        assert _batch_rows(module, everything) == single
        counts[module.TABLE] = len(single)
    with_packet = sum(1 for _, row in _single_rows(tls, everything) if row["packet"] is not None)
    print(f"\nbatch vs one by one: {len(everything)} TCP streams of {len(per_capture)} captures, "
          f"{counts['tls']} tls rows ({with_packet} with a packet), {counts['x509']} x509 rows equal")
    assert counts["tls"] > 100 and counts["x509"] > 50 and with_packet > 20


def test_fingerprints_from_keys_are_those_of_the_hellos():
    """The batch path fingerprints each distinct key the kernel made (GREASE left out, JA4's lists
    sorted) once: the same JA3, JA4 and JA3S as the hellos themselves give."""
    n = 0
    for streams in _corpus_streams():
        for s in streams:
            a = tls.analyze(s)
            if a.row is None:
                continue
            ch, sh = a.client_hello, a.server_hello
            assert a.row["ja3"] == (tls.ja3(ch) if ch else None)
            assert a.row["ja4"] == (tls.ja4(ch, "t") if ch else None)
            assert a.row["ja3s"] == (tls.ja3s(sh) if sh else None)
            n += ch is not None
    print(f"\nfingerprints from keys: {n} client hellos")
    assert n > 100


def test_acked_by_many_is_acked_by():
    rng = random.Random(9)
    sides, ends = [], []
    for _ in range(3000):
        size = rng.randint(0, 200)
        gaps = sorted((rng.randint(0, size), rng.randint(1, 50)) for _ in range(rng.choice([0, 0, 1, 2])))
        d = _with_acks(rng, Direction(data=bytes(size), gaps=gaps))
        if rng.random() < 0.2:
            d.acks = []
        if rng.random() < 0.2:
            d = d.after(rng.randint(0, 20))
        sides.append(d)
        ends.append(rng.randint(-2, size + 60))
    got = tls.acked_by_many(sides, np.array(ends, dtype=np.int64))
    assert got.tolist() == [d.acked_by(e) for d, e in zip(sides, ends)]
    assert (got > 0).sum() > 1000


def _mutated(rng: random.Random, d: Direction) -> Direction:
    """d's first bytes with a few bytes changed, cut, inserted or dropped, a gap now and then."""
    b = bytearray(d.data[:6000])
    for _ in range(rng.randint(1, 6)):
        i = rng.randrange(len(b) + 1)
        op = rng.random()
        if op < 0.5 and b:
            b[min(i, len(b) - 1)] = rng.randrange(256)
        elif op < 0.65:
            del b[i:]
        elif op < 0.8:
            b[i:i] = rng.randbytes(rng.randint(1, 16))
        elif op < 0.9:
            del b[i:i + rng.randint(1, 32)]
        else:
            b[i:i + 2] = rng.choice([b"\xff\xff", b"\x00\x00", b"\x40\x00", b"\x00\x01"])
    gaps = [(rng.randint(0, len(b)), rng.randint(1, 99))] if rng.random() < 0.1 else []
    return Direction(data=bytes(b), gaps=gaps, ts_offsets=d.ts_offsets, ts=d.ts, acks=d.acks)


def test_batch_rows_of_broken_handshakes_are_those_one_by_one():
    """Mutated TLS streams (malformed records, hellos, certificate lists; gaps): the same rows in
    a batch as one by one, whatever the batch's other sessions."""
    rng = random.Random(11)
    tls_streams = [s for streams in _corpus_streams() for s in streams
                   if s.orig.data[:1] == b"\x16" or s.resp.data[:1] == b"\x16"]
    streams = []
    for _ in range(3000):
        s = rng.choice(tls_streams)
        k = rng.random()
        streams.append(Stream(s.uid, s.orig_h, s.orig_p, s.resp_h, s.resp_p,
                              _mutated(rng, s.orig) if k < 0.66 else s.orig,
                              _mutated(rng, s.resp) if k > 0.33 else s.resp))
    for module in (tls, x509):
        assert _batch_rows(module, streams) == _single_rows(module, streams)
    malformed = sum(1 for _, row in _single_rows(tls, streams) if row["malformed"])
    print(f"\nbroken handshakes: {len(streams)} mutated streams, {malformed} malformed rows, batch equal")
    assert malformed > 300


def _joined_of(streams: list[Stream]) -> JoinedStreams:
    """The streams end to end, as the reassembler's take_joined gives them."""
    sides = [d for s in streams for d in (s.orig, s.resp)]

    def at(lengths):
        out = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=out[1:])
        return out

    def cat(arrays):
        return np.concatenate([np.asarray(a, dtype=np.int64) for a in arrays]) if arrays else np.zeros(0, np.int64)

    acks = [(cat([r for r, _ in d.acks]), cat([p for _, p in d.acks])) for d in sides]
    return JoinedStreams(
        data=np.frombuffer(b"".join(d.data for d in sides), dtype=np.uint8).copy(),
        data_at=at([len(d.data) for d in sides]),
        ts_offsets=cat([d.ts_offsets for d in sides]), ts=cat([d.ts for d in sides]),
        ts_at=at([len(d.ts) for d in sides]),
        gap_off=cat([[o for o, _ in d.gaps] for d in sides]), gap_len=cat([[n for _, n in d.gaps] for d in sides]),
        gap_at=at([len(d.gaps) for d in sides]),
        ack_rel=cat([r for r, _ in acks]), ack_pkt=cat([p for _, p in acks]), ack_at=at([len(r) for r, _ in acks]),
        truncated=np.array([d.truncated for d in sides], dtype=bool))


def test_joined_streams_give_the_rows_of_the_streams():
    """parse_streams on JoinedStreams (what the stage hands tls and x509 from the reassembler)
    gives the rows it gives on the same sessions' Stream objects."""
    streams = [s for per in _corpus_streams() for s in per
               if s.orig._ack_origin is None and s.resp._ack_origin is None]  # (no proxied parts)
    joined = _joined_of(streams)
    for module in (tls, x509):
        tls._read_last = None
        want = module.parse_streams(streams)
        tls._read_last = None
        got = module.parse_streams(joined)
        assert got.index.tolist() == want.index.tolist() and got.table.equals(want.table)
    print(f"\njoined streams: {len(streams)} sessions, {want.table.num_rows} x509 rows as from Stream objects")
    assert want.table.num_rows > 50
