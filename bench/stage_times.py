#!/usr/bin/env python3
"""Where a full ingest's CPU time goes: in-process timers around the pipeline's stages.

    .venv/bin/python bench/stage_times.py [--capture bench-data/mix.pcap] [--no-app]

Wraps the stages' functions with process-time counters (inclusive: a stage's line contains
the stages called inside it, shown indented under it), ingests the capture into a temporary
store and prints CPU seconds and calls per stage. The wrappers cost about a microsecond per
call: the per-batch and per-close figures are exact enough, the per-session parse_stream lines
read a little high. Not a benchmark against peers (bench/ingest_bench.py is): this is to see
which stage to work on next.
"""

from __future__ import annotations

import argparse
import importlib
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# (depth, "module:attribute path"): the stages in pipeline order, depth for the indentation
STAGES = [
    (0, "wiretrail.decode:decode"),
    (0, "wiretrail.ingest:LinkMapper.map"),
    (0, "wiretrail.sessions.flowtable:FlowTable.update"),
    (0, "wiretrail.app.stage:AppStage.process"),
    (1, "wiretrail.app.ndpi:classify_batch"),
    (2, "wiretrail.app.ndpi_kernel:feed_kernel"),
    (2, "wiretrail.app.ndpi:NdpiState.take_slots"),
    (2, "wiretrail.app.ndpi:NdpiState.decide_slots"),
    (1, "wiretrail.app.stage:AppStage._datagrams"),
    (1, "wiretrail.app.stage:AppStage._streams"),
    (2, "wiretrail.app.reassembly:Reassembler.add"),
    (0, "wiretrail.store.packets:PacketWriter.write"),
    (0, "wiretrail.store.index:IndexWriter.append"),
    (0, "wiretrail.ingest:Pipeline._tunnel_sessions"),
    (0, "wiretrail.ingest:Pipeline._fragments"),
    (0, "wiretrail.sessions.flowtable:FlowTable.expire"),
    (0, "wiretrail.sessions.flowtable:FlowTable.flush"),
    (0, "wiretrail.app.stage:AppStage.close"),
    (1, "wiretrail.app.ndpi:NdpiState.finish_ids"),
    (1, "wiretrail.app.reassembly:Reassembler.take_many"),
    (1, "wiretrail.app.stage:AppStage._run_batch"),
    (1, "wiretrail.app.stage:AppStage._run_joined"),
    (1, "wiretrail.app.stage:AppStage._tables"),
    (0, "wiretrail.store.index:IndexWriter.maybe_flush"),
    (0, "wiretrail.store.index:IndexWriter.close"),
    (0, "wiretrail.store.metadata:TableWriter.maybe_flush"),
    (0, "wiretrail.store.metadata:TableWriter.close"),
    (1, "wiretrail.store.metadata:write_part"),
    (0, "wiretrail.store.packets:PacketWriter.close"),
]
# every protocol module's entry points, under AppStage.close or .process
PROTOCOL_ENTRIES = ("parse_stream", "parse_streams", "parse_datagram", "add_datagrams", "new_session", "close_sessions")


def resolve(spec: str):
    module_name, path = spec.split(":")
    owner = importlib.import_module(module_name)
    *parents, name = path.split(".")
    for p in parents:
        owner = getattr(owner, p)
    return owner, name


def wrap(owner, name: str, label: str, totals: dict) -> bool:
    fn = getattr(owner, name, None)
    if fn is None or not callable(fn):
        return False
    acc = totals.setdefault(label, [0.0, 0])
    clock = time.process_time

    def timed(*args, **kwargs):
        t = clock()
        try:
            return fn(*args, **kwargs)
        finally:
            acc[0] += clock() - t
            acc[1] += 1

    setattr(owner, name, timed)
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--capture", type=Path, default=REPO / "bench-data" / "mix.pcap")
    ap.add_argument("--no-app", action="store_true", help="the spine only")
    args = ap.parse_args()
    if not args.capture.is_file():
        sys.exit(f"{args.capture}: no such file (bench/ingest_bench.py builds the captures)")

    totals: dict[str, list] = {}
    shown: list[tuple[int, str]] = []
    for depth, spec in STAGES:
        owner, name = resolve(spec)
        if wrap(owner, name, spec.split(":")[1], totals):
            shown.append((depth, spec.split(":")[1]))
    from wiretrail.app.stage import PROTOCOLS

    for proto in PROTOCOLS:
        mod = importlib.import_module(f"wiretrail.app.{proto}")
        for entry in PROTOCOL_ENTRIES:
            if wrap(mod, entry, f"{proto}.{entry}", totals):
                shown.append((2, f"{proto}.{entry}"))

    from wiretrail.ingest import IngestOptions, ingest

    store = Path(tempfile.mkdtemp(prefix="wt-stages-"))
    try:
        t0 = time.process_time()
        report = ingest([args.capture], IngestOptions(store=store / "s", app=not args.no_app))
        total = time.process_time() - t0
    finally:
        shutil.rmtree(store, ignore_errors=True)
    print(f"{args.capture.name}: {report.packets} packets, {report.sessions} sessions, "
          f"ingest {total:.2f} CPU s (imports before it not counted)")
    top = 0.0
    for depth, label in shown:
        seconds, calls = totals[label]
        if calls == 0:
            continue
        if depth == 0:
            top += seconds
        print(f"{'  ' * depth}{label:<{44 - 2 * depth}} {seconds:7.3f} s {seconds / total * 100:5.1f}%  {calls:7d} calls")
    print(f"{'reading the capture, the rest':<44} {total - top:7.3f} s {(total - top) / total * 100:5.1f}%")


if __name__ == "__main__":
    main()
