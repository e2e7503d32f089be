"""Reading the store while an ingest writes it, and what a `kill -9` of that ingest leaves."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

from wiretrail.sample import generate, write_pcap


def _wiretrail(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "wiretrail.cli", *args], capture_output=True, text=True, **kw)


def test_concurrent_reader_and_kill_9(tmp_path):
    frames, _ = generate(sessions=3000, seed=11)
    pcap = tmp_path / "sample.pcap"
    write_pcap(pcap, frames)
    store = tmp_path / "store"
    # The same file many times over: a long ingest (each pass replays the same two hours).
    # Small flush intervals make parts appear within the test's patience on a slow machine.
    proc = subprocess.Popen([sys.executable, "-m", "wiretrail.cli", "ingest", "--no-progress", "--flush-seconds",
                             "0.5", "--store", str(store), *[str(pcap)] * 400], stderr=subprocess.PIPE, text=True)
    try:
        seen = []
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            if not store.is_dir():  # the ingest is still starting
                time.sleep(0.2)
                continue
            r = _wiretrail("sql", "--store", str(store), "--format", "json",
                           "SELECT count(*) AS n FROM packet_index")
            assert r.returncode == 0, r.stderr  # a reader never sees a half-written part
            seen.append(json.loads(r.stdout)["n"])
            if len([n for n in seen if n > 0]) >= 2:
                break
            time.sleep(0.2)
        assert proc.poll() is None, "ingest ended before the test could kill it"
        assert seen and seen[-1] > 0 and seen[-1] >= seen[-2]
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # What the killed ingest left opens, answers queries, and gives packets back.
    r = _wiretrail("sql", "--store", str(store), "--format", "json",
                   "SELECT (SELECT count(*) FROM packet_index) AS idx, (SELECT count(*) FROM sessions) AS s")
    assert r.returncode == 0, r.stderr
    counts = json.loads(r.stdout)
    print(f"\nkill -9 during ingest: {counts['idx']} indexed packets and {counts['s']} sessions survive")
    assert counts["idx"] >= seen[-1]
    r = _wiretrail("sql", "--store", str(store), "--format", "json",
                   "SELECT sid FROM packet_index GROUP BY sid ORDER BY count(*) DESC LIMIT 1")
    sid = json.loads(r.stdout)["sid"]
    from wiretrail.sessions.flowtable import uid_of

    r = _wiretrail("extract", "--store", str(store), "--session", uid_of(sid), "-o", str(tmp_path / "x.pcap"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "x.pcap").stat().st_size > 24
    # and a new ingest can write to it again (the dead writer's lock went with it)
    r = _wiretrail("ingest", "--no-progress", "--store", str(store), str(pcap))
    assert r.returncode == 0, r.stderr
