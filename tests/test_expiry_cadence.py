"""Sessions are expired every few batches (ingest.EXPIRE_BATCHES), not after each: the store must
not depend on how often, only the number of closes does."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq

from wiretrail import ingest as ingest_module
from wiretrail.app import stage
from wiretrail.ingest import IngestOptions, ingest
from wiretrail.sample import generate, write_pcap


def _tables(store: Path) -> dict[str, list[str]]:
    """Every table's rows, as sorted texts, without the run's random session ids."""
    out = {}
    for table_dir in sorted((store / "tables").iterdir()):
        rows = []
        for part in table_dir.rglob("*.parquet"):
            for row in pq.read_table(part).to_pylist():
                rows.append(repr(sorted((k, v) for k, v in row.items() if "uid" not in k and k != "sid")))
        out[table_dir.name] = sorted(rows)
    return out


def test_how_often_sessions_expire_changes_no_table(tmp_path, monkeypatch):
    frames, _ = generate(sessions=1500, seed=11)  # two hours of traffic: sessions time out all along
    pcap = tmp_path / "s.pcap"
    write_pcap(pcap, frames)
    closes = []
    real_close = stage.AppStage.close

    def counted(self, sessions):
        if sessions.num_rows:
            closes[-1] += 1
        return real_close(self, sessions)

    monkeypatch.setattr(stage.AppStage, "close", counted)
    stores, sessions = {}, []
    every = (1, ingest_module.EXPIRE_BATCHES, 13)
    for n in every:
        monkeypatch.setattr(ingest_module, "EXPIRE_BATCHES", n)
        closes.append(0)
        store = tmp_path / f"every_{n}"
        report = ingest([pcap], IngestOptions(store=store, batch_bytes=1 << 15))  # about 40 batches
        assert not report.errors
        sessions.append(report.sessions)
        stores[n] = _tables(store)
    print(f"\nexpiry every {every} batches: {closes} closes, {sessions} sessions")
    assert closes[0] > closes[1] > closes[2] > 1
    assert sessions[0] == sessions[1] == sessions[2] > 1000
    first = stores[every[0]]
    assert set(first) >= {"sessions", "dns", "http"}
    for n in every[1:]:
        assert stores[n].keys() == first.keys()
        for name, rows in first.items():
            assert stores[n][name] == rows, f"expiry every {n} batches: table {name} differs"
