"""The command line end to end on the project's own sample, whose ground truth is known."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from wiretrail.cli import main
from wiretrail.sample import generate, write_pcap


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    d = tmp_path_factory.mktemp("sample")
    frames, truth = generate(sessions=1500, seed=7)
    pcap = d / "sample.pcap"
    write_pcap(pcap, frames)
    store = d / "store"
    assert main(["ingest", "--no-progress", "--store", str(store), str(pcap)]) == 0
    return pcap, store, frames, truth


def sql(store: Path, query: str) -> list[dict]:
    from io import StringIO

    from wiretrail.query import run_sql

    buf = StringIO()
    run_sql(store, query, "json", buf)
    return [json.loads(line) for line in buf.getvalue().splitlines()]


def read_pcap(path: Path) -> list[tuple[int, bytes]]:
    """Plain reader for checking our own output (independent of wiretrail.capture)."""
    raw = path.read_bytes()
    magic = struct.unpack("<I", raw[:4])[0]
    scale = 1 if magic == 0xA1B23C4D else 1000
    out, pos = [], 24
    while pos + 16 <= len(raw):
        sec, frac, incl, _ = struct.unpack("<IIII", raw[pos:pos + 16])
        out.append((sec * 1_000_000_000 + frac * scale, raw[pos + 16:pos + 16 + incl]))
        pos += 16 + incl
    return out


def test_sessions_match_ground_truth(sample):
    _, store, _, truth = sample
    rows = sql(store, "SELECT proto, orig_h, orig_p, resp_h, resp_p, conn_state, orig_pkts, resp_pkts, "
                      "orig_bytes, resp_bytes, vlan FROM sessions")
    got = {(r["proto"], r["orig_h"], r["orig_p"], r["resp_h"], r["resp_p"]): r for r in rows}
    fields = ["conn_state", "orig_pkts", "resp_pkts", "orig_bytes", "resp_bytes", "vlan"]
    agree = Counter()
    found = 0
    for t in truth:
        r = got.get((t.proto, t.orig_h, t.orig_p, t.resp_h, t.resp_p))
        if r is None:
            continue
        found += 1
        for f in fields:
            agree[f] += r[f] == getattr(t, f)
    print(f"\nsample: {found}/{len(truth)} sessions found, {len(rows)} in store; "
          + ", ".join(f"{f} {agree[f]}/{found}" for f in fields))
    assert len(rows) == len(truth)
    assert found == len(truth)
    for f in fields:
        assert agree[f] == found, f


def test_extract_session_is_byte_identical(sample):
    pcap, store, frames, truth = sample
    out = pcap.parent / "one.pcap"
    # Every kind of session: TCP with data, REJ, DNS, ICMP, the VLAN segment, the fragmented datagram.
    picks = {}
    for t in truth:
        picks.setdefault((t.proto, t.conn_state, t.vlan is not None, len(t.frames) > 1 and t.orig_pkts == 1), t)
    original = read_pcap(pcap)  # the capture as written (microsecond timestamps)
    checked = 0
    for t in picks.values():
        uid = sql(store, f"SELECT uid FROM sessions WHERE orig_h = '{t.orig_h}' AND orig_p = {t.orig_p} "
                         f"AND resp_h = '{t.resp_h}' AND resp_p = {t.resp_p}")[0]["uid"]
        assert main(["extract", "--store", str(store), "--session", uid, "-o", str(out)]) == 0
        got = read_pcap(out)
        want = [original[i] for i in t.frames]
        assert got == want, (t, len(got), len(want))
        checked += 1
    print(f"\nextract --session: {checked}/{len(picks)} kinds of session byte-identical")


def test_extract_filter_matches_tcpdump(sample, tmp_path):
    pcap, store, _, _ = sample
    out = tmp_path / "dns.pcapng"
    assert main(["extract", "--store", str(store), "--filter", "udp port 53", "-o", str(out)]) == 0
    ours = subprocess.run(["tcpdump", "-nn", "-r", str(out)], capture_output=True, text=True).stdout.splitlines()
    ref = subprocess.run(["tcpdump", "-nn", "-r", str(pcap), "udp port 53"], capture_output=True,
                         text=True).stdout.splitlines()
    print(f"\nextract --filter 'udp port 53': {len(ours)} packets, tcpdump on the original: {len(ref)}")
    assert ours == ref


def test_zeek_export(sample, tmp_path):
    _, store, _, truth = sample
    assert main(["export", "--store", str(store), "--format", "zeek", "--out", str(tmp_path)]) == 0
    records = [json.loads(line) for line in (tmp_path / "conn.log").read_text().splitlines()]
    assert len(records) == len(truth)
    r = records[0]
    for name in ("ts", "uid", "id.orig_h", "id.orig_p", "id.resp_h", "id.resp_p", "proto", "conn_state",
                 "orig_pkts", "resp_pkts", "orig_ip_bytes", "community_id"):
        assert name in r, name
    assert isinstance(r["ts"], float) and r["ts"] > 1.7e9


def test_sql_formats_and_errors(sample, capsys):
    _, store, _, _ = sample
    assert main(["sql", "--store", str(store), "--format", "csv", "SELECT count(*) AS n FROM sessions"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "n" and int(out[1]) > 0
    assert main(["sql", "--store", str(store), "SELEC nonsense"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("wiretrail: SQL error") and err.count("\n") == 1


def test_bad_input_gives_one_line_and_keeps_other_files(tmp_path, sample):
    pcap, _, _, _ = sample
    junk = tmp_path / "junk.pcap"
    junk.write_bytes(b"this is not a capture file at all")
    store = tmp_path / "store"
    proc = subprocess.run([sys.executable, "-m", "wiretrail.cli", "ingest", "--no-progress", "--store", str(store),
                           str(junk), str(tmp_path / "missing.pcap"), str(pcap)], capture_output=True, text=True)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 2 and "junk.pcap" in lines[0] and "missing.pcap" in lines[1]
    n = sql(store, "SELECT count(*) AS n FROM sessions")[0]["n"]
    assert n > 1000  # the good file went in


def test_wrong_arguments_and_unknown_session(tmp_path, sample, capsys):
    _, store, _, _ = sample
    assert main(["extract", "--store", str(store), "--session", "Cnosuchsession", "-o", str(tmp_path / "x.pcap")]) == 1
    assert main(["extract", "--store", str(store), "--filter", "tcp port", "-o", str(tmp_path / "x.pcap")]) == 1
    assert main(["sql", "--store", str(tmp_path / "nostore"), "SELECT 1"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 3 and all(line.startswith("wiretrail: ") for line in err)


def test_wrong_arguments_one_line_each():
    for args in (["ingest", "--snaplen", "abc", "x.pcap"], ["frobnicate"], ["extract", "-o", "x.pcap"],
                 ["export", "--format", "csv", "--out", "x"], ["ingest", "--quota", "lots", "x.pcap"]):
        proc = subprocess.run([sys.executable, "-m", "wiretrail.cli", *args], capture_output=True, text=True)
        assert proc.returncode == 2, args
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("wiretrail") and "--help" in lines[0], (args, proc.stderr)


def test_ingest_never_imports_pyarrow_compute(sample, tmp_path):
    """Its import costs ~36 ms of every ingest (wiretrail.arrow_compute calls the functions by
    name instead): an ingest with records of every kind the sample has must not pull it in."""
    pcap = sample[0]
    code = ("import sys; from wiretrail.cli import main; "
            f"main(['ingest', '--no-progress', '--store', {str(tmp_path / 's')!r}, {str(pcap)!r}]); "
            "print('pyarrow.compute' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "records:" in proc.stdout  # the application layer ran
    assert proc.stdout.splitlines()[-1] == "False"
