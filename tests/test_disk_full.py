"""A full disk during ingest: one line, exit status 1, and what was stored before stays readable."""

from __future__ import annotations

import errno
import json
import os
from io import StringIO

import pytest

from wiretrail.cli import main
from wiretrail.query import run_sql
from wiretrail.sample import generate, write_pcap


def _count(store) -> int:
    buf = StringIO()
    run_sql(store, "SELECT count(*) AS n FROM sessions WHERE link = 'first'", "json", buf)
    return json.loads(buf.getvalue())["n"]


@pytest.mark.parametrize("where", ["packets", "tables"])
def test_disk_full_mid_ingest(tmp_path, monkeypatch, capsys, where):
    frames, _ = generate(sessions=1500, seed=4)
    pcap = tmp_path / "s.pcap"
    write_pcap(pcap, frames)
    store = tmp_path / "store"
    # a first ingest that succeeds: this must survive the failing one
    assert main(["ingest", "--no-progress", "--store", str(store), "--link", "first", str(pcap)]) == 0
    capsys.readouterr()
    before = _count(store)

    from wiretrail.store import metadata

    real_pwrite = os.pwrite
    calls = {"n": 0}

    def failing_pwrite(fd, data, offset):
        calls["n"] += 1
        if calls["n"] > 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_pwrite(fd, data, offset)

    def failing_write_parquet(*a, **kw):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    if where == "packets":
        monkeypatch.setattr(os, "pwrite", failing_pwrite)
    else:
        monkeypatch.setattr(metadata, "_write_parquet", failing_write_parquet)
    rc = main(["ingest", "--no-progress", "--store", str(store), "--link", "second", str(pcap)])
    err = capsys.readouterr().err.strip().splitlines()
    monkeypatch.undo()
    assert rc == 1
    assert len(err) == 1 and err[0].startswith("wiretrail: cannot write the") and "No space left" in err[0]
    # the first ingest's sessions and packets are all there
    assert _count(store) == before > 1000
    buf = StringIO()
    run_sql(store, "SELECT uid FROM sessions WHERE link = 'first' LIMIT 1", "json", buf)
    uid = json.loads(buf.getvalue())["uid"]
    assert main(["extract", "--store", str(store), "--session", uid, "-o", str(tmp_path / "x.pcap")]) == 0
