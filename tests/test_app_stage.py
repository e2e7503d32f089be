"""The application stage inside ingest: every session identified, records per protocol table."""

from __future__ import annotations

import json
from io import StringIO
from pathlib import Path

import pytest

from wiretrail.cli import main
from wiretrail.query import run_sql
from wiretrail.sample import generate, write_pcap


def sql(store: Path, query: str) -> list[dict]:
    buf = StringIO()
    run_sql(store, query, "json", buf)
    return [json.loads(line) for line in buf.getvalue().splitlines()]


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    d = tmp_path_factory.mktemp("app")
    frames, truth = generate(sessions=600, seed=5)
    pcap = d / "sample.pcap"
    write_pcap(pcap, frames)
    return d, pcap, truth


def test_sessions_are_identified(sample):
    d, pcap, truth = sample
    store = d / "store"
    assert main(["ingest", "--no-progress", "--store", str(store), str(pcap)]) == 0
    rows = sql(store, "SELECT proto, resp_p, conn_state, app, category, service FROM sessions")
    assert len(rows) == len(truth)
    # the sample's kinds of traffic and what nDPI must call them
    expect = {("tcp", 80, "SF"): ("HTTP", "http"), ("udp", 53, "SF"): ("DNS", "dns")}
    agree = total = 0
    for r in rows:
        want = expect.get((r["proto"], r["resp_p"], r["conn_state"]))
        if want:
            total += 1
            agree += (r["app"].split(".")[0], r["service"]) == want
    print(f"\napp stage on the sample: {agree}/{total} HTTP and DNS sessions identified as such")
    assert total > 100 and agree == total
    assert all(r["app"] and r["category"] for r in rows)


def test_without_the_app_layer_sessions_are_unchanged(sample):
    d, pcap, truth = sample
    with_app, without = d / "store", d / "plain"
    assert main(["ingest", "--no-progress", "--no-app", "--store", str(without), str(pcap)]) == 0
    q = "SELECT uid IS NOT NULL AS u, orig_h, orig_p, resp_h, resp_p, proto, conn_state, history, orig_pkts, " \
        "resp_pkts, orig_bytes, resp_bytes FROM sessions ORDER BY orig_h, orig_p, resp_h, resp_p, proto"
    assert sql(with_app, q) == sql(without, q)
    assert {r["app"] for r in sql(without, "SELECT app FROM sessions")} == {None}


CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "corpus"


@pytest.mark.skipif(not (CORPUS / "suricata-verify").is_dir(), reason="corpus not found")
def test_starttls_sessions_get_smtp_and_tls_records(tmp_path):
    pcap = next((CORPUS / "suricata-verify" / "tests" / "smtp-startssl").glob("*.pcap"))
    assert main(["ingest", "--no-progress", "--store", str(tmp_path / "s"), str(pcap)]) == 0
    smtp = sql(tmp_path / "s", "SELECT uid, tls FROM smtp")
    tls = sql(tmp_path / "s", "SELECT uid, version, resp_p FROM tls")
    assert smtp and smtp[0]["tls"] is True
    assert [r["uid"] for r in tls] == [smtp[0]["uid"]] and tls[0]["resp_p"] == 25 and tls[0]["version"]


def test_identification_state_is_bounded(sample, tmp_path):
    """Past NdpiState.max_live undecided sessions (a flood, a scan), new sessions are left
    unidentified instead of taking memory: everything else goes on."""
    from wiretrail.capture import iter_batches
    from wiretrail.ingest import IngestOptions, Pipeline

    _, pcap, truth = sample
    pipe = Pipeline(IngestOptions(store=tmp_path / "s", batch_bytes=1 << 14))
    pipe.app.ndpi_state.max_live = 3
    peak = 0
    for batch in iter_batches(str(pcap), batch_bytes=1 << 14):
        pipe.process(batch)
        peak = max(peak, pipe.app.ndpi_state.live_count)
    pipe.finish()
    rows = sql(tmp_path / "s", "SELECT app FROM sessions")
    assert len(rows) == len(truth)
    unknown = sum(r["app"] == "Unknown" for r in rows)
    print(f"\nidentification bounded to 3 live sessions: {pipe.app.ndpi_state.skipped} sessions skipped, "
          f"{len(rows) - unknown}/{len(rows)} identified")
    assert pipe.app.ndpi_state.skipped > 0 and len(rows) - unknown > 0
    assert 0 < peak <= 3 and pipe.app.ndpi_state.live_count == 0


def _fake_modules(batch):
    """A stream and a datagram module that count bytes, written row by row or, with `batch`,
    with the stage's batch calls (parse_streams, add_datagrams, close_sessions) as Records;
    "joined": parse_streams reads JoinedStreams; "broken": it raises (the stage falls back
    to parse_stream session by session)."""
    from types import SimpleNamespace

    import numpy as np
    import pyarrow as pa

    from wiretrail.app.base import SESSION_COLUMNS, Records
    from wiretrail.app.stage import _Module

    stream_schema = pa.schema([*SESSION_COLUMNS, ("orig_bytes", pa.int64()), ("resp_bytes", pa.int64())])
    dgram_schema = pa.schema([*SESSION_COLUMNS, ("size", pa.int64()), ("count", pa.int64())])

    def parse_stream(s):
        return [{"ts": s.orig.time_at(0), "uid": s.uid, "orig_h": s.orig_h, "orig_p": s.orig_p, "resp_h": s.resp_h,
                 "resp_p": s.resp_p, "orig_bytes": len(s.orig.data), "resp_bytes": len(s.resp.data)}]

    def parse_streams(streams):
        if batch == "broken":
            raise RuntimeError("a parser bug")
        if batch == "joined":
            j = streams
            size, at = np.diff(j.data_at), j.ts_at
            has_ts = at[:-1] < at[1:]
            first_ts = np.zeros(len(size), dtype=np.int64)  # (Direction.time_at(0): 0 for no packet)
            first_ts[has_ts] = j.ts[at[:-1][has_ts]]
            rows = np.flatnonzero((size[0::2] + size[1::2]) > 0)  # (no row for a session with no bytes)
            table = pa.table({"ts": pa.array(first_ts[0::2][rows], pa.timestamp("ns")),
                              "orig_bytes": size[0::2][rows], "resp_bytes": size[1::2][rows]})
            return Records(table, rows)
        table = pa.table({"ts": pa.array([s.orig.time_at(0) for s in streams], pa.timestamp("ns")),
                          "orig_bytes": [len(s.orig.data) for s in streams],
                          "resp_bytes": [len(s.resp.data) for s in streams]})
        return Records(table, np.arange(len(streams)))

    class Counter:
        def __init__(self, d):
            self.ts, self.n, self.uid = d.ts, 0, d.uid

        def add(self, d):
            self.n += 1
            return [{"ts": d.ts, "uid": d.uid, "size": len(d.payload)}]

        def close(self):
            return [{"ts": self.ts, "uid": self.uid, "count": self.n}]

    def add_datagrams(states, b):
        for s, ts in zip(b.sid.tolist(), b.ts.tolist()):
            st = states.get(s)
            if st is None:
                st = states[s] = SimpleNamespace(ts=ts, n=0)
            st.n += 1
        table = pa.table({"ts": pa.array(b.ts, pa.timestamp("ns")), "size": b.end - b.start})
        return Records(table, b.sid), 0

    def close_sessions(states, sids):
        got = [states.pop(s) for s in sids.tolist()]
        table = pa.table({"ts": pa.array([g.ts for g in got], pa.timestamp("ns")), "count": [g.n for g in got]})
        return Records(table, sids)

    stream = SimpleNamespace(SCHEMA=stream_schema, parse_stream=parse_stream)
    dgram = SimpleNamespace(SCHEMA=dgram_schema, new_session=Counter)
    if batch:
        stream.parse_streams, dgram.add_datagrams, dgram.close_sessions = parse_streams, add_datagrams, close_sessions
    if batch in ("joined", "broken"):
        stream.JOINED = True
    return [_Module("bytes", "bytes", stream_schema, np.array([80]), frozenset(), stream, False, True),
            _Module("counts", "counts", dgram_schema, np.array([53]), frozenset(), dgram, True, False)]


def test_batch_calls_give_the_rows_of_row_by_row_calls(sample, tmp_path):
    """A module's batch calls (Records) and its row-by-row calls give the same tables: the
    stage fills the session columns of Records and keeps rows in session order."""
    from wiretrail.app.stage import AppStage
    from wiretrail.capture import iter_batches
    from wiretrail.ingest import IngestOptions, Pipeline

    _, pcap, _ = sample
    got = {}
    for batch in (False, True, "joined", "broken"):
        store = tmp_path / str(batch)
        pipe = Pipeline(IngestOptions(store=store, batch_bytes=1 << 14))
        pipe.app = AppStage(identify=False, modules=_fake_modules(batch))
        for b in iter_batches(str(pcap), batch_bytes=1 << 14):
            pipe.process(b)
        pipe.finish()
        # uids differ between runs: each row's uid must name a session with the row's 5-tuple
        got[batch] = {t: sql(store, f"SELECT t.* EXCLUDE (uid), s.uid IS NOT NULL AS own FROM {t} t "
                                    "LEFT JOIN sessions s ON s.uid = t.uid AND s.orig_h = t.orig_h AND "
                                    "s.orig_p = t.orig_p AND s.resp_h = t.resp_h AND s.resp_p = t.resp_p ORDER BY ALL")
                      for t in ("bytes", "counts")}
    print(f"\nbatch calls: {len(got[True]['bytes'])} stream rows, {len(got[True]['counts'])} datagram rows")
    assert len(got[False]["bytes"]) > 100 and len(got[False]["counts"]) > 100
    assert all(r["own"] and r["resp_p"] == 80 for r in got[True]["bytes"])
    assert all(r["own"] for r in got[True]["counts"])
    assert got[True] == got[False] == got["joined"] == got["broken"]


def test_reordered_gives_the_rows_a_take_gives():
    """Merging a protocol table's pieces back into session order (AppStage._tables): by slices
    when the order is a few runs, by a take when it is many; the same rows in the same order."""
    import numpy as np
    import pyarrow as pa

    from wiretrail.app.stage import _reordered

    rng = np.random.default_rng(7)
    for trial in range(200):
        n = int(rng.integers(1, 400))
        table = pa.table({"k": pa.array(np.arange(n)),
                          "l": pa.array([[int(i)] * int(i % 3) for i in range(n)], pa.list_(pa.int64()))})
        if trial % 2:  # pieces each in order, merged: a few runs
            ks = np.concatenate([np.sort(rng.choice(10 * n, size=m, replace=False))
                                 for m in np.diff([0, *sorted(rng.integers(0, n, size=2).tolist()), n])])
        else:  # any order: many runs
            ks = rng.permutation(n)
        order = np.argsort(ks, kind="stable")
        got = _reordered(table, order)
        assert got.to_pydict() == table.take(pa.array(order)).to_pydict()
