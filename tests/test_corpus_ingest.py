"""Every capture under ../shared/corpus ingests without a crash or traceback."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from wiretrail.ingest import IngestOptions, ingest

CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "corpus"
MAGICS = (b"\xd4\xc3\xb2\xa1", b"\xa1\xb2\xc3\xd4", b"\x4d\x3c\xb2\xa1", b"\xa1\xb2\x3c\x4d",
          b"\x0a\x0d\x0d\x0a", b"\x1f\x8b", b"\x28\xb5\x2f\xfd")


def corpus_captures() -> list[Path]:
    found = []
    for path in sorted(CORPUS.rglob("*")):
        if path.is_file() and path.suffix not in {".json", ".md", ".txt", ".out", ".log", ".rules", ".test",
                                                   ".yaml", ".py", ".lua"}:
            with open(path, "rb") as f:
                head = f.read(4)
            if head.startswith(MAGICS) or path.parent.name == "malformed":
                found.append(path)
    return found


@pytest.mark.skipif(not CORPUS.is_dir(), reason="../shared/corpus not present")
def test_every_corpus_capture_ingests(tmp_path):
    files = corpus_captures()
    outcome = Counter()
    packets = sessions = 0
    rejected = []
    for i, path in enumerate(files):
        report = ingest([path], IngestOptions(store=tmp_path / f"s{i}"))
        packets += report.packets
        sessions += report.sessions
        if report.errors:
            outcome["error"] += 1
            rejected.append(report.errors[0])
            assert len(report.errors) == 1 and "\n" not in report.errors[0]
            assert str(path) in report.errors[0]
        else:
            outcome["ok"] += 1
    print(f"\ncorpus ingest: {len(files)} captures, {outcome['ok']} clean, {outcome['error']} reported a fault "
          f"(one line each), {packets} packets, {sessions} sessions, no crash")
    for line in rejected:
        print("   ", line.replace(str(CORPUS), "corpus"))
    assert len(files) > 500
    # Only files broken on purpose (malformed/) and formats we do not read may report a fault.
    unexpected = [r for r in rejected if "/malformed/" not in r and "snoop" not in r]
    assert len(unexpected) <= 5, unexpected
