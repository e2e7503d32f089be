#!/bin/sh
# Instructions executed by a full ingest, under valgrind: a figure that does not move with
# the machine's load, for A/B comparisons of two trees on this shared, noisy machine (its VM
# has no hardware counters for perf).
#
#   bench/count_instructions.sh [TREE] [CAPTURE]     (defaults: this tree, bench-data/mix.pcap)
#
# Two trees compare only with each other: the kernels run under numba compiled for a generic
# x86-64 CPU (valgrind cannot run the AVX-512 code of the ahead-of-time build), so numba's
# import is counted too (the same in both). The tree's .pyc files are written and its numba
# cache warmed by an ingest of the same capture first, so that no compiling counts (a kernel
# compiled under valgrind costs billions of instructions). About 4 minutes on mix.pcap; the
# stores go to a temporary directory.
# Time-based flushes are off (--flush-seconds 1e9): under valgrind an ingest takes minutes,
# and a flush every 5 s of that made the number of Parquet parts, and the count, depend on how
# fast the run went (two counts of one tree differed by 7-8 M with them on).
set -eu
here=$(cd "$(dirname "$0")/.." && pwd)
tree=$(cd "${1:-$here}" && pwd)
capture=$(cd "$(dirname "${2:-$here/bench-data/mix.pcap}")" && pwd)/$(basename "${2:-mix.pcap}")
python="$here/.venv/bin/python"
command -v valgrind >/dev/null || { echo "count_instructions: valgrind is not installed" >&2; exit 1; }
export NUMBA_CPU_NAME=generic WIRETRAIL_NO_AOT=1 PYTHONPATH="$tree"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$tree"
"$python" -m compileall -q wiretrail >/dev/null
# ingest STORE [COMMAND...]: the capture into STORE, run under COMMAND if one is given
ingest() {
    store=$1; shift
    "$@" "$python" -c "import sys; from wiretrail.cli import main; sys.argv = ['wiretrail', 'ingest', '--no-progress', '--flush-seconds', '1e9', '$capture', '--store', '$store']; main()"
}
ingest "$work/warm" >/dev/null 2>&1
ingest "$work/store" valgrind --tool=cachegrind --cache-sim=no --cachegrind-out-file="$work/cg.out" \
    >"$work/log" 2>&1 || { tail -n 20 "$work/log" >&2; exit 1; }
refs=$(sed -n 's/.*I *refs: *//p' "$work/log")
echo "$tree: $refs instructions (full ingest of $(basename "$capture"))"
