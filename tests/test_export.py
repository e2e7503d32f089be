"""Zeek logs and Suricata EVE from a store holding sessions and protocol records."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from wiretrail.cli import main
from wiretrail.sample import generate, write_pcap


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    d = tmp_path_factory.mktemp("export")
    frames, truth = generate(sessions=300, seed=9)
    write_pcap(d / "s.pcap", frames)
    assert main(["ingest", "--no-progress", "--store", str(d / "store"), str(d / "s.pcap")]) == 0
    return d, truth


def lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_zeek_logs(store):
    d, truth = store
    assert main(["export", "--store", str(d / "store"), "--format", "zeek", "--out", str(d / "zeek")]) == 0
    conn = lines(d / "zeek" / "conn.log")
    dns = lines(d / "zeek" / "dns.log")
    assert len(conn) == len(truth)
    dns_sessions = {t.orig_p for t in truth if t.resp_p == 53}
    assert dns and {r["id.orig_p"] for r in dns} == dns_sessions
    conn_uids = {r["uid"] for r in conn}
    assert all(r["uid"] in conn_uids and r["id.resp_p"] == 53 and r["query"] for r in dns)
    assert all(isinstance(r["ts"], float) for r in dns)


def test_eve(store):
    d, truth = store
    assert main(["export", "--store", str(d / "store"), "--format", "eve", "--out", str(d / "eve")]) == 0
    events = lines(d / "eve" / "eve.json")
    kinds = Counter(e["event_type"] for e in events)
    assert kinds["flow"] == len(truth) and kinds["dns"] > 0
    flows = {e["flow_id"]: e for e in events if e["event_type"] == "flow"}
    for e in events:
        assert e["flow_id"] in flows  # every protocol event belongs to a flow event
        assert e["timestamp"].endswith("+0000") and e["proto"] in ("TCP", "UDP", "ICMP", "IPv6-ICMP")
        if e["event_type"] == "dns":
            f = flows[e["flow_id"]]
            ends = {(e["src_ip"], e["src_port"]), (e["dest_ip"], e["dest_port"])}
            assert ends == {(f["src_ip"], f["src_port"]), (f["dest_ip"], f["dest_port"])}
            # Suricata 8: a request goes client -> server, a response server -> client
            assert e["dns"]["type"] in ("request", "response")
            assert (e["dns"]["type"] == "request") == (e["src_ip"] == f["src_ip"])
