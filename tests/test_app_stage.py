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
    for batch in iter_batches(str(pcap), batch_bytes=1 << 14):
        pipe.process(batch)
    pipe.finish()
    rows = sql(tmp_path / "s", "SELECT app FROM sessions")
    assert len(rows) == len(truth)
    unknown = sum(r["app"] == "Unknown" for r in rows)
    print(f"\nidentification bounded to 3 live sessions: {pipe.app.ndpi_state.skipped} sessions skipped, "
          f"{len(rows) - unknown}/{len(rows)} identified")
    assert pipe.app.ndpi_state.skipped > 0 and len(rows) - unknown > 0
    assert len(pipe.app.ndpi_state.live) <= 3
