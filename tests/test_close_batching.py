"""Closed sessions go through the application stage in runs (ingest.CLOSE_ROWS, CLOSE_BATCHES):
the store must not depend on how they are gathered, only the number of closes does."""

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


def test_gathering_closes_changes_no_table(tmp_path, monkeypatch):
    frames, _ = generate(sessions=1500, seed=11)  # two hours of traffic: sessions time out all along
    pcap = tmp_path / "s.pcap"
    write_pcap(pcap, frames)
    closes = []
    real_close = stage.AppStage.close

    def counted(self, sessions):
        closes[-1] += 1
        return real_close(self, sessions)

    monkeypatch.setattr(stage.AppStage, "close", counted)
    stores, sessions = {}, []
    for label, rows, batches in (("per batch", 1, 1), ("as shipped", ingest_module.CLOSE_ROWS,
                                                       ingest_module.CLOSE_BATCHES), ("by rows", 200, 1000)):
        monkeypatch.setattr(ingest_module, "CLOSE_ROWS", rows)
        monkeypatch.setattr(ingest_module, "CLOSE_BATCHES", batches)
        closes.append(0)
        store = tmp_path / label.replace(" ", "_")
        report = ingest([pcap], IngestOptions(store=store, batch_bytes=1 << 15))  # about 40 batches
        assert not report.errors
        sessions.append(report.sessions)
        stores[label] = _tables(store)
    per_batch, shipped, by_rows = closes
    print(f"\nclose batching: {per_batch} closes per batch, {shipped} as shipped, {by_rows} by 200 rows")
    assert per_batch > shipped > 1 and per_batch > by_rows > 1
    assert sessions[0] == sessions[1] == sessions[2] > 1000
    assert set(stores["per batch"]) >= {"sessions", "dns", "http"}
    for label in ("as shipped", "by rows"):
        assert stores[label].keys() == stores["per batch"].keys()
        for name, rows in stores["per batch"].items():
            assert stores[label][name] == rows, f"{label}: table {name} differs"
