#!/usr/bin/env python3
"""Full ingest of the benchmark captures against peer tools, in the same run.

    .venv/bin/python bench/ingest_bench.py [--data bench-data] [--capture mix.pcap]

Builds the captures with ../shared/bench/make_capture.sh if they are missing, brings the
ahead-of-time compiled kernels up to date (python -m wiretrail.aot, as setup does) and warms
numba's compile cache on mix_small.pcap for anything left to numba (compiling is a one-off,
not ingest work),
then times, on the same file and the same machine, one after another:
  wiretrail ingest --no-app  (decode, sessions, packet store, packet index, Parquet)
  wiretrail ingest           (the same plus nDPI identification, reassembly, protocol records)
  argus -r -w        (flow records)
  ndpiReader -i      (nDPI identification; its "Unique flows" is the session count peer)
  tcpdump -r -w      (a plain copy: the floor for any tool that writes every packet)
  NFStream           (nDPI flows from Python, in its own venv under bench-data/)
then the spine and argus again on the capture followed by itself (mix_x2.pcap, made with
editcap and mergecap: how memory and the ratio go as a capture grows),
and prints packets per CPU-second (user + sys), peak RSS and the ratios: every tool runs once
per round (--rounds, default 3) and the median is reported. The machines are shared and
noisy: compare ratios from one run, not absolute figures across runs.
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from wiretrail.sessions.schema import NDPI_FLOW_COUNT_SQL

REPO = Path(__file__).resolve().parents[1]
SHARED_BENCH = REPO.parent / "shared" / "bench"


def timed(cmd: list[str], **kw) -> tuple[float, int, str]:
    """Run cmd under GNU time; returns (cpu seconds, peak RSS in KiB, stdout+stderr)."""
    fmt = "WTBENCH %U %S %M"
    proc = subprocess.run(["/usr/bin/time", "-f", fmt, *cmd], capture_output=True, text=True, **kw)
    out = proc.stdout + proc.stderr
    m = re.search(r"WTBENCH ([\d.]+) ([\d.]+) (\d+)", out)
    if proc.returncode != 0 or not m:
        sys.exit(f"failed: {' '.join(cmd)}\n{out[-2000:]}")
    return float(m.group(1)) + float(m.group(2)), int(m.group(3)), out


def packet_count(path: Path) -> int:
    out = subprocess.run(["capinfos", "-c", "-M", str(path)], capture_output=True, text=True).stdout
    m = re.search(r"Number of packets:\s+(\d+)", out)
    return int(m.group(1)) if m else 0


def nfstream_python(data: Path) -> str | None:
    """A venv of its own for NFStream (it brings pandas, which Wiretrail keeps out of its own),
    made from the interpreter Wiretrail's venv comes from, so that both run on the same Python
    (made again if an earlier one came from another)."""
    venv = data / "nfstream-venv"
    cfg = venv / "pyvenv.cfg"
    home = f"home = {Path(sys.base_prefix) / 'bin'}"
    if cfg.exists() and home not in cfg.read_text().splitlines():
        shutil.rmtree(venv)
    if not (venv / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        r = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "nfstream==6.6.0"], capture_output=True)
        if r.returncode != 0:
            print("NFStream could not be installed: left out")
            return None
    return str(venv / "bin" / "python")


def doubled(capture: Path) -> Path:
    """The capture followed by itself shifted past its end (editcap, mergecap): twice the
    packets and sessions, to show how memory and the ratios go as a capture grows."""
    out = capture.with_name(capture.stem + "_x2.pcap")
    if not out.exists():
        info = subprocess.run(["capinfos", "-u", "-M", str(capture)], capture_output=True, text=True).stdout
        m = re.search(r"Capture duration:\s+([\d.]+)", info)
        shift = int(float(m.group(1))) + 1 if m else 86400
        moved = out.with_suffix(".part")
        subprocess.run(["editcap", "-t", str(shift), str(capture), str(moved)], check=True)
        subprocess.run(["mergecap", "-F", "pcap", "-a", "-w", str(out), str(capture), str(moved)], check=True)
        moved.unlink()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=REPO / "bench-data")
    ap.add_argument("--capture", default="mix.pcap")
    ap.add_argument("--rounds", type=int, default=3, help="runs of every tool (the median is reported)")
    ap.add_argument("--no-doubled", action="store_true", help="skip the capture-twice-as-long runs")
    args = ap.parse_args()
    data = args.data
    if not (data / "mix.pcap").exists() or not (data / "mix_small.pcap").exists():
        subprocess.run(["sh", str(SHARED_BENCH / "make_capture.sh"), str(data)], check=True)
    capture = data / args.capture
    subprocess.run([str(REPO / ".venv" / "bin" / "python"), "-m", "wiretrail.aot"], check=True)
    subprocess.run([str(REPO / ".venv" / "bin" / "python"), "-m", "compileall", "-q", str(REPO / "wiretrail")], check=True)
    packets = packet_count(capture)
    wiretrail = str(REPO / ".venv" / "bin" / "wiretrail")
    print(f"capture: {capture.name}, {packets} packets, {capture.stat().st_size / 1e6:.0f} MB")

    with tempfile.TemporaryDirectory(dir=data) as tmp:
        tmp = Path(tmp)
        # Warm numba's on-disk cache (compiling is a one-off, not ingest work); the second run's
        # peak memory on the small file, set against the big file's, shows whether memory stays flat.
        for _ in range(2):
            _, small_rss, _ = timed([wiretrail, "ingest", "--no-progress", "--no-app", "--store", str(tmp / "warm"),
                                     str(data / "mix_small.pcap")])
            shutil.rmtree(tmp / "warm")
        timed([wiretrail, "ingest", "--no-progress", "--store", str(tmp / "warm"), str(data / "mix_small.pcap")])
        shutil.rmtree(tmp / "warm")

        # Every tool once per round, rounds one after another: each sees the machine as the
        # others do; the median of the rounds is reported (the machines are shared and noisy).
        nfstream = nfstream_python(data)
        runs: dict[str, list[tuple[float, int]]] = {}
        sessions = ndpi_flows = flow_keys = -1
        records = "none"
        store_mb = 0.0
        for _ in range(args.rounds):
            # the spine alone (decode, sessions, packet store, index, Parquet), then everything
            cpu, rss, out = timed([wiretrail, "ingest", "--no-progress", "--no-app", "--store", str(tmp / "store"),
                                   str(capture)])
            m = re.search(r"(\d+) sessions", out)
            sessions = int(m.group(1)) if m else -1
            runs.setdefault("wiretrail ingest --no-app", []).append((cpu, rss))
            store_mb = sum(f.stat().st_size for f in (tmp / "store").rglob("*") if f.is_file()) / 1e6
            if flow_keys < 0:
                out = subprocess.run([wiretrail, "sql", "--store", str(tmp / "store"), "--format", "csv",
                                      NDPI_FLOW_COUNT_SQL], capture_output=True, text=True, check=True).stdout
                flow_keys = int(out.split()[-1])
            shutil.rmtree(tmp / "store")
            cpu, rss, out = timed([wiretrail, "ingest", "--no-progress", "--store", str(tmp / "store"), str(capture)])
            runs.setdefault("wiretrail ingest (nDPI, records)", []).append((cpu, rss))
            m = re.search(r"records: (.*)", out)
            records = m.group(1) if m else "none"
            shutil.rmtree(tmp / "store")

            cpu, rss, _ = timed(["argus", "-r", str(capture), "-w", str(tmp / "out.argus")])
            runs.setdefault("argus -r -w", []).append((cpu, rss))
            cpu, rss, out = timed(["ndpiReader", "-i", str(capture)])
            m = re.search(r"Unique flows:\s+(\d+)", out)
            ndpi_flows = int(m.group(1)) if m else -1
            runs.setdefault("ndpiReader -i", []).append((cpu, rss))
            cpu, rss, _ = timed(["tcpdump", "-r", str(capture), "-w", str(tmp / "copy.pcap")])
            runs.setdefault("tcpdump -r -w (copy)", []).append((cpu, rss))
            if not args.no_doubled:
                twice = doubled(capture)
                cpu, rss, _ = timed([wiretrail, "ingest", "--no-progress", "--no-app", "--store", str(tmp / "store"),
                                     str(twice)])
                runs.setdefault("wiretrail ingest --no-app, x2", []).append((cpu, rss))
                shutil.rmtree(tmp / "store")
                cpu, rss, _ = timed(["argus", "-r", str(twice), "-w", str(tmp / "out.argus")])
                runs.setdefault("argus -r -w, x2", []).append((cpu, rss))
            if nfstream:
                cpu, rss, _ = timed([nfstream, "-c", "from nfstream import NFStreamer\n"
                                     f"sum(1 for _ in NFStreamer(source={str(capture)!r}, n_meters=1))"])
                runs.setdefault("NFStream 6.6.0 (n_meters=1)", []).append((cpu, rss))
        results = {name: (statistics.median(c for c, _ in r), max(m for _, m in r)) for name, r in runs.items()}
        spread = {name: (min(c for c, _ in r), max(c for c, _ in r)) for name, r in runs.items()}

    spine = packets / results["wiretrail ingest --no-app"][0]
    full = packets / results["wiretrail ingest (nDPI, records)"][0]
    print(f"median of {args.rounds} rounds (CPU s = user + sys; min-max in brackets)")
    print(f"{'tool':<34} {'CPU s':>7} {'(min-max)':>13} {'pkts/CPU-s':>12} {'peak RSS':>10} {'spine/tool':>11} "
          f"{'full/tool':>10}")
    for name, (cpu, rss) in results.items():
        if name.endswith(", x2"):  # printed on their own below
            continue
        rate = packets / cpu if cpu else float("inf")
        lo, hi = spread[name]
        print(f"{name:<34} {cpu:7.2f} {f'({lo:.2f}-{hi:.2f})':>13} {rate / 1e6:10.2f} M {rss / 1024:8.0f} MB "
              f"{spine / rate:10.2f}x {full / rate:9.2f}x")
    # Each round runs every tool once, in turn: a ratio within a round compares runs that saw
    # the machine's load of the same minute (the medians above may come from different rounds).
    full_cpu = [c for c, _ in runs["wiretrail ingest (nDPI, records)"]]
    for peer in ("ndpiReader -i", "NFStream 6.6.0 (n_meters=1)"):
        if peer in runs:
            ratios = sorted(p / f for (p, _), f in zip(runs[peer], full_cpu))
            print(f"full ingest against {peer}, round by round: median {statistics.median(ratios):.2f}x "
                  f"({ratios[0]:.2f}-{ratios[-1]:.2f})")
    diff = (sessions - ndpi_flows) / ndpi_flows * 100 if ndpi_flows > 0 else float("nan")
    print(f"sessions: wiretrail {sessions}, ndpiReader unique flows {ndpi_flows} ({diff:+.2f}%)")
    diff = (flow_keys - ndpi_flows) / ndpi_flows * 100 if ndpi_flows > 0 else float("nan")
    print(f"flows as ndpiReader defines them (sessions.schema.NDPI_FLOW_COUNT_SQL): wiretrail {flow_keys} ({diff:+.3f}%)")
    print(f"store size (--no-app): {store_mb:.0f} MB for {capture.stat().st_size / 1e6:.0f} MB of capture")
    print(f"records (full ingest): {records}")
    small = data / "mix_small.pcap"
    print(f"wiretrail --no-app peak RSS: {small_rss / 1024:.0f} MB on {small.name} ({small.stat().st_size / 1e6:.0f} MB), "
          f"{results['wiretrail ingest --no-app'][1] / 1024:.0f} MB on {capture.name} "
          f"({capture.stat().st_size / 1e6:.0f} MB)"
          + (f", {results['wiretrail ingest --no-app, x2'][1] / 1024:.0f} MB on it twice as long"
             if "wiretrail ingest --no-app, x2" in results else ""))
    if "argus -r -w, x2" in results:
        print(f"twice as long ({2 * packets} packets): spine {results['wiretrail ingest --no-app, x2'][0]:.2f} CPU s, "
              f"argus {results['argus -r -w, x2'][0]:.2f}: spine/argus "
              f"{results['argus -r -w, x2'][0] / results['wiretrail ingest --no-app, x2'][0]:.2f}x")


if __name__ == "__main__":
    main()
