"""Virtual links and the packet store's keep policies, through the command line."""

from __future__ import annotations

import json
import struct
from io import StringIO
from pathlib import Path

import pytest

from wiretrail.cli import main
from wiretrail.query import run_sql
from wiretrail.sample import generate, write_pcap


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    d = tmp_path_factory.mktemp("policy")
    frames, truth = generate(sessions=400, seed=21)
    pcap = d / "sample.pcap"
    write_pcap(pcap, frames)
    return pcap, truth


def sql(store: Path, query: str) -> list[dict]:
    buf = StringIO()
    run_sql(store, query, "json", buf)
    return [json.loads(line) for line in buf.getvalue().splitlines()]


def records(path: Path) -> list[tuple[int, int]]:
    """(captured length, wire length) of every record of a little-endian pcap."""
    raw = path.read_bytes()
    out, pos = [], 24
    while pos + 16 <= len(raw):
        _, _, incl, orig = struct.unpack_from("<IIII", raw, pos)
        out.append((incl, orig))
        pos += 16 + incl
    return out


def ingest(store: Path, *args: str) -> None:
    assert main(["ingest", "--no-progress", "--store", str(store), *args]) == 0


def test_same_traffic_on_two_links_stays_apart(sample, tmp_path):
    pcap, truth = sample
    store = tmp_path / "store"
    ingest(store, "--link", "tap-a", str(pcap))
    ingest(store, "--link", "tap-b", str(pcap))
    per_link = {r["link"]: r["n"] for r in sql(store, "SELECT link, count(*) AS n FROM sessions GROUP BY link")}
    assert per_link == {"tap-a": len(truth), "tap-b": len(truth)}
    assert {p.name for p in (store / "packets").iterdir()} == {"tap-a", "tap-b"}
    # one session of each link: the same packets, from its own link's files
    a = sql(store, "SELECT * FROM sessions WHERE link = 'tap-a' AND conn_state = 'SF' AND proto = 'tcp' LIMIT 1")[0]
    b = sql(store, f"SELECT uid FROM sessions WHERE link = 'tap-b' AND orig_h = '{a['orig_h']}' AND orig_p = "
                   f"{a['orig_p']} AND resp_h = '{a['resp_h']}' AND resp_p = {a['resp_p']}")
    assert len(b) == 1 and b[0]["uid"] != a["uid"]
    outs = []
    for uid in (a["uid"], b[0]["uid"]):
        out = tmp_path / f"{uid}.pcap"
        assert main(["extract", "--store", str(store), "--session", uid, "-o", str(out)]) == 0
        outs.append(out.read_bytes())
    assert len(outs) == 2 and outs[0] == outs[1] and len(outs[0]) > 24


def test_links_by_vlan(sample, tmp_path):
    pcap, truth = sample
    store = tmp_path / "store"
    ingest(store, "--link-by", "vlan", str(pcap))
    rows = sql(store, "SELECT link, vlan, count(*) AS n FROM sessions GROUP BY ALL ORDER BY link")
    want_tagged = sum(1 for t in truth if t.vlan is not None)
    assert {r["link"]: r["n"] for r in rows} == {"untagged": len(truth) - want_tagged, "vlan20": want_tagged}
    assert all((r["vlan"] is None) == (r["link"] == "untagged") for r in rows)


def test_keep_policies(sample, tmp_path):
    pcap, truth = sample
    total_pkts = sum(len(t.frames) for t in truth)

    store = tmp_path / "first2"
    ingest(store, "--session-packets", "2", str(pcap))
    per_session = sql(store, "SELECT sid, count(*) AS n FROM packet_index GROUP BY sid")
    counts = sorted(r["n"] for r in per_session)
    # a fragmented datagram is one packet of its session, stored as all its fragments (the sample
    # has one, of three fragments); every other session keeps exactly its first two frames
    assert counts[-1] == 3 and counts[-2] == 2 and sum(c > 2 for c in counts) == 1
    assert sql(store, "SELECT count(*) AS n FROM sessions")[0]["n"] == len(truth)  # sessions unaffected

    store = tmp_path / "dns-only"
    ingest(store, "--store-filter", "udp port 53", str(pcap))
    dns_pkts = sum(len(t.frames) for t in truth if t.resp_p == 53)
    assert sql(store, "SELECT count(*) AS n FROM packet_index")[0]["n"] == dns_pkts < total_pkts
    assert sql(store, "SELECT count(*) AS n FROM sessions")[0]["n"] == len(truth)

    store = tmp_path / "snap"
    ingest(store, "--snaplen", "64", str(pcap))
    uid = sql(store, "SELECT uid FROM sessions ORDER BY orig_bytes + resp_bytes DESC LIMIT 1")[0]["uid"]
    out = tmp_path / "snap.pcap"
    assert main(["extract", "--store", str(store), "--session", uid, "-o", str(out)]) == 0
    recs = records(out)
    assert recs and all(incl <= 64 for incl, _ in recs) and any(orig > 64 for _, orig in recs)


def test_retention_command_empties_store_under_a_tiny_quota(sample, tmp_path, capsys):
    pcap, _ = sample
    store = tmp_path / "store"
    ingest(store, str(pcap))
    capsys.readouterr()
    assert main(["retention", "--store", str(store), "--max-age-days", "100000", "--quota", "1"]) == 0
    assert capsys.readouterr().out.startswith("removed 2 hour(s)")
    assert sql(store, "SELECT count(*) AS n FROM sessions")[0]["n"] == 0
    assert not list((store / "packets").rglob("*.pcap"))


def test_session_timeouts_are_settable(tmp_path):
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from _frames import eth, ip4, udp

    from wiretrail.sample import write_pcap

    t0 = 1_700_000_000 * 10**9
    frame = eth(0x0800, ip4("10.0.0.1", "10.0.0.2", 17, udp(5000, 6000, b"ping")))
    pcap = tmp_path / "gap.pcap"
    write_pcap(pcap, [(t0, frame), (t0 + 90 * 10**9, frame)])  # 90 s apart
    ingest(tmp_path / "default", str(pcap))
    ingest(tmp_path / "long", "--udp-timeout", "120", str(pcap))
    count = "SELECT count(*) AS n FROM sessions"
    assert sql(tmp_path / "default", count)[0]["n"] == 2  # Zeek's 60 s UDP timeout splits them
    assert sql(tmp_path / "long", count)[0]["n"] == 1
    assert main(["ingest", "--no-progress", "--tcp-timeout", "-1", "--store", str(tmp_path / "x"), str(pcap)]) == 1
    # other IP protocols (here VRRP) have their own idle timeout, 60 s unless set
    vrrp = tmp_path / "vrrp.pcap"
    frame = eth(0x0800, ip4("10.0.0.1", "224.0.0.18", 112, bytes(20)))
    write_pcap(vrrp, [(t0, frame), (t0 + 90 * 10**9, frame)])
    ingest(tmp_path / "vrrp_default", str(vrrp))
    ingest(tmp_path / "vrrp_long", "--other-timeout", "120", str(vrrp))
    assert sql(tmp_path / "vrrp_default", count)[0]["n"] == 2
    assert sql(tmp_path / "vrrp_long", count)[0]["n"] == 1
