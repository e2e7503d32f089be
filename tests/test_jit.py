"""wiretrail.jit: kernels compiled ahead of time give what numba gives, keep numba out of a
command's start-up, and hand any call they were not compiled for back to numba."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys

import pytest

from wiretrail import jit
from wiretrail.sample import write_sample

pytestmark = pytest.mark.skipif(not jit._extension(),
                                reason="compiled kernels not built for these sources (python -m wiretrail.aot)")


def _run(code: str, no_aot: bool = False) -> str:
    env = dict(os.environ)
    env.pop("WIRETRAIL_NO_AOT", None)
    if no_aot:
        env["WIRETRAIL_NO_AOT"] = "1"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_compiled_kernels_match_numba(tmp_path):
    pcap = tmp_path / "sample.pcap"
    write_sample(pcap, sessions=400, seed=7)
    dumps = {}
    for no_aot in (False, True):
        store = tmp_path / f"store-{no_aot}"
        out = _run(f"""
import sys, json, hashlib
from pathlib import Path
from wiretrail.ingest import IngestOptions, ingest
from wiretrail.store.metadata import open_db
store = Path({str(store)!r})
ingest([Path({str(pcap)!r})], IngestOptions(store=store, progress=False))
numba_loaded = "numba" in sys.modules
con = open_db(store)
rows = {{t: con.execute(f"SELECT COLUMNS(lambda c: c NOT IN ('uid', 'sid')) FROM {{t}} ORDER BY ALL").fetchall()
        for t in ("sessions", "dns", "http", "tls")}}
print(json.dumps({{"numba": numba_loaded, "rows": {{t: len(r) for t, r in rows.items()}},
                  "digest": {{t: hashlib.sha256(str(r).encode()).hexdigest() for t, r in rows.items()}}}}))
""", no_aot=no_aot)
        dumps[no_aot] = json.loads(out.strip().splitlines()[-1])
    compiled, numba = dumps[False], dumps[True]
    print(f"\ncompiled kernels: rows {compiled['rows']}; numba loaded: {compiled['numba']}")
    assert compiled["rows"]["sessions"] > 300
    assert compiled["rows"] == numba["rows"]
    assert compiled["digest"] == numba["digest"]
    assert compiled["numba"] is False   # the point of compiling ahead of time
    assert numba["numba"] is True


def test_arguments_outside_the_compiled_types_go_to_numba():
    # index_pcap_records was compiled for int64 offsets: int32 ones must not reach the compiled
    # code (it would read them as int64), but still work, through numba.
    out = _run("""
import sys
import numpy as np
from wiretrail.capture import pcap
from wiretrail.sample import generate, write_pcap
from pathlib import Path
import tempfile
d = Path(tempfile.mkdtemp())
frames, _ = generate(20, 3)
write_pcap(d / "s.pcap", frames)
buf = np.fromfile(d / "s.pcap", dtype=np.uint8)
def run(offset_dtype):
    n = 4096
    off = np.zeros(n, offset_dtype); cl = np.zeros(n, np.int32); wl = np.zeros(n, np.int32); ts = np.zeros(n, np.int64)
    pos, count, status = pcap.index_pcap_records(buf, 24, len(buf), False, 1000, 262144, off, cl, wl, ts, 1 << 40)
    return count, off[:count].astype(np.int64).tolist(), cl[:count].tolist()
before = "numba" in sys.modules
a = run(np.int64)
middle = "numba" in sys.modules
b = run(np.int32)
print(before, middle, "numba" in sys.modules, a == b, a[0])
""")
    before, middle, after, same, count = out.split()
    assert (before, middle, after) == ("False", "False", "True")
    assert same == "True" and int(count) > 20


def test_manifest_describes_every_compiled_variant():
    manifest = json.loads(jit.MANIFEST.read_text())
    assert manifest["sources"] == jit.sources_hash() and manifest["cpu"] == jit.cpu_signature()
    names = set(manifest["kernels"])
    for hot in ("wiretrail.capture.pcap.index_pcap_records", "wiretrail.decode.kernel.decode_kernel",
                "wiretrail.sessions.flowtable._update_kernel", "wiretrail.store.pcapfile._records_kernel"):
        assert hot in names
    # the kernels that run once per packet are built without reference counting (see aot.build:
    # an array allocated inside one of them would bring back a count per inlined helper call)
    for per_packet in ("wiretrail.capture.pcap.index_pcap_records", "wiretrail.decode.kernel.decode_kernel",
                       "wiretrail.sessions.flowtable._update_kernel", "wiretrail.app.ndpi_kernel.feed_kernel",
                       "wiretrail.app.session_rows._attach_kernel", "wiretrail.app.reassembly._add_acks"):
        assert not any(v["refcounts"] for v in manifest["kernels"][per_packet]), per_packet
    # every kernel has variants but those only other kernels call: one the build's sample never
    # reached brings numba in for all of them the first time it is called (as _pack once did)
    for name in jit.KERNEL_MODULES:
        importlib.import_module(name)
    unbuilt = {f"{k.py_func.__module__}.{k.__name__}" for k in jit._kernels
               if not k.variants and not k.inline}
    assert unbuilt <= {"wiretrail.app.session_rows._slot_of"}, unbuilt
    for variants in manifest["kernels"].values():
        for v in variants:
            # loads (a missing symbol would send every kernel back to numba at run time)
            assert callable(getattr(importlib.import_module(f"wiretrail._aot.{v['extension']}"), v["function"]))
            assert all(a[0] in ("array", "scalar") for a in v["args"])


def test_stale_sources_are_not_used(tmp_path, monkeypatch):
    monkeypatch.setattr(jit, "_compiled", None)
    monkeypatch.setattr(jit, "sources_hash", lambda: "0" * 64)
    assert jit._extension() is False


def test_another_cpu_does_not_use_them(monkeypatch):
    # built for the host CPU: a tree moved to another machine must fall back to numba
    monkeypatch.setattr(jit, "_compiled", None)
    monkeypatch.setattr(jit, "cpu_signature", lambda: "f" * 64)
    assert jit._extension() is False
