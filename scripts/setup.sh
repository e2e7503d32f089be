#!/usr/bin/env bash
# Install what Wiretrail needs on Debian 12: system packages, then a venv with the pinned
# Python packages. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

# libpcap compiles BPF filters; tcpdump, tshark, argus and ndpiReader are the peer tools that
# the tests and benchmarks compare against; Debian's Python with its venv module and headers
# (the kernels' ahead-of-time build compiles against them).
debs="libpcap0.8 tcpdump tshark argus-server argus-client libndpi-bin zstd time python3 python3-venv python3-dev"
missing=""
for d in $debs; do dpkg -s "$d" >/dev/null 2>&1 || missing="$missing $d"; done
if [ -n "$missing" ]; then
    sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq $missing >/dev/null
fi

# The venv is made from Debian's interpreter, whatever python3 comes first on the PATH: it is
# linked statically (Debian's changelog also names LTO/PGO builds), and a full ingest ran 5%
# faster on it than on a shared-library -O3 build of 3.11 (pyenv's, first on this machine's
# PATH). A venv made from another interpreter is made again.
if [ -x .venv/bin/python ] && ! grep -qx "home = /usr/bin" .venv/pyvenv.cfg; then
    rm -rf .venv
fi
if [ ! -x .venv/bin/python ]; then
    /usr/bin/python3 -m venv .venv
fi
.venv/bin/pip install -q --disable-pip-version-check -e '.[test]'
# nDPI 5 comes compiled inside the nfstream wheel (wiretrail.app.ndpi uses only that library,
# through cffi). Without --no-deps it would also bring pandas, which pyarrow then imports on
# first use: 0.13 s and 30 MB more for every command, for nothing.
.venv/bin/pip install -q --disable-pip-version-check --no-deps nfstream==6.6.0
# Compile the numba kernels ahead of time (wiretrail.jit): numba's start-up, 0.45 CPU s per
# command, is then paid here once. Three to four minutes here; a no-op when they are up to date.
.venv/bin/python -m wiretrail.aot
# Bytecode written now: where PYTHONDONTWRITEBYTECODE is set, every command would otherwise
# compile Wiretrail's modules again (0.04 s each time).
.venv/bin/python -m compileall -q wiretrail
