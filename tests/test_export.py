"""Zeek logs and Suricata EVE from a store holding sessions and protocol records."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from wiretrail.cli import main
from wiretrail.sample import generate, write_pcap
from wiretrail.sessions.flowtable import uid_of


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


def _text(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def test_link_layer_addresses(tmp_path):
    """conn.log's orig_l2_addr/resp_l2_addr (Zeek's names) are the first frame's addresses seen
    from the originator; EVE's ether: src_macs/dest_macs on flows, src_mac/dest_mac on protocol
    events, turned with the event's direction."""
    frames, truth = generate(sessions=300, seed=9)
    write_pcap(tmp_path / "s.pcap", frames)
    assert main(["ingest", "--no-progress", "--store", str(tmp_path / "store"), str(tmp_path / "s.pcap")]) == 0
    want = {}  # (orig_h, orig_p, resp_h, resp_p) -> (orig MAC, resp MAC) from each session's first frame
    for t in truth:
        if t.frames and t.proto != "icmp":
            first = frames[t.frames[0]][1]
            want[(t.orig_h, t.orig_p, t.resp_h, t.resp_p)] = (_text(first[6:12]), _text(first[0:6]))
    out = tmp_path / "out"
    assert main(["export", "--store", str(tmp_path / "store"), "--format", "zeek", "--out", str(out / "zeek")]) == 0
    conn = {r["uid"]: r for r in lines(out / "zeek" / "conn.log")
            if (r["id.orig_h"], r["id.orig_p"], r["id.resp_h"], r["id.resp_p"]) in want}
    assert len(conn) > 200
    macs = {uid: want[(r["id.orig_h"], r["id.orig_p"], r["id.resp_h"], r["id.resp_p"])] for uid, r in conn.items()}
    assert all((r["orig_l2_addr"], r["resp_l2_addr"]) == macs[uid] for uid, r in conn.items())
    assert main(["export", "--store", str(tmp_path / "store"), "--format", "eve", "--out", str(out / "eve")]) == 0
    events = lines(out / "eve" / "eve.json")
    assert all("ether" in e for e in events)
    flows = {e["flow_id"]: e for e in events if e["event_type"] == "flow" and uid_of(e["flow_id"]) in conn}
    assert len(flows) == len(conn)
    for fid, f in flows.items():
        o, r = macs[uid_of(fid)]
        assert f["ether"] == {"src_macs": [o], "dest_macs": [r]}
    dns = [e for e in events if e["event_type"] == "dns" and e["flow_id"] in flows]
    assert {e["dns"]["type"] for e in dns} == {"request", "response"}
    for e in dns:
        o, r = macs[uid_of(e["flow_id"])]
        assert (e["ether"]["src_mac"], e["ether"]["dest_mac"]) == ((o, r) if e["dns"]["type"] == "request" else (r, o))
