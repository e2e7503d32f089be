"""Build the compiled kernels (see wiretrail.jit): `python -m wiretrail.aot [--force]`.

The kernels are compiled for the argument types they are really called with: a sample
capture made by wiretrail.sample goes through ingest (with and without the application
layer, with a BPF store filter), extraction to pcapng and ingest of that pcapng, under
numba; every signature numba compiled on the way is then compiled again, ahead of time,
into an extension module per kernel under `wiretrail/_aot/` (numba's pycc, for this
machine's CPU), and `wiretrail/_aot/manifest.json` records each kernel's variants and the
hash of the sources.
A kernel that the sample never reached stays with numba. Nothing is done when the
extension already matches the sources.
"""

from __future__ import annotations

import os

os.environ["WIRETRAIL_NO_AOT"] = "1"  # the build runs the kernels under numba, to see their types

import argparse
import importlib
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from wiretrail import jit


def _exercise(work: Path) -> None:
    from wiretrail import sample
    from wiretrail.ingest import IngestOptions, ingest
    from wiretrail.store.extract import extract_filter

    capture = work / "sample.pcap"
    sample.write_sample(capture, sessions=300)
    ingest([capture], IngestOptions(store=work / "full", progress=False))
    ingest([capture], IngestOptions(store=work / "spine", progress=False, app=False, store_filter="tcp or udp"))
    extract_filter(work / "spine", "tcp", None, None, work / "tcp.pcapng", fmt="pcapng")
    ingest([work / "tcp.pcapng"], IngestOptions(store=work / "again", progress=False, app=False))
    # a session table that has to grow (ingest starts it large enough for the sample)
    from wiretrail.capture import iter_batches
    from wiretrail.decode import decode
    from wiretrail.sessions.flowtable import FlowTable

    flows = FlowTable(initial_capacity=16)
    for batch in iter_batches(capture):
        flows.update(decode(batch), batch.ts, batch.wirelen, np.zeros(len(batch), dtype=np.int16))
    # the reassembler's kernels, also those the sample's ingest may not reach (its hash table
    # growing, its arena squeezed, limits and drops, the memcap), called as the stage calls them
    from wiretrail.app.reassembly import Reassembler

    reasm, flows = Reassembler(memcap=1 << 14), FlowTable()
    for batch in iter_batches(capture):
        cols = decode(batch)
        sid, is_orig, *_ = flows.update(cols, batch.ts, batch.wirelen, np.zeros(len(batch), dtype=np.int16))
        rows = np.flatnonzero((cols["proto"] == 6) & (sid >= 0))
        for s in range(1, 2000):  # sides enough for the table to grow
            reasm.limit(-s, 100)
        for s in range(1, 2000):
            reasm.drop(-s)
        reasm.add(batch, cols, rows, sid, is_orig, 1)
        list(reasm.take_many(np.unique(sid[rows])))
    # its arena squeezed in place (the arena grows without a copy: the sample never fills it
    # with dead bytes), as _arena_room does
    from wiretrail.app.reassembly import _pack

    _pack(reasm._G, reasm._st, reasm._arena, reasm._arena, True)
    # the session rows' id table growing, rows given back and taken by other sessions
    from wiretrail.app.session_rows import SessionRows

    session_rows = SessionRows(capacity=16)
    session_rows.add_column("x", np.int8, 0)
    many = np.arange(100, dtype=np.int64) * 7919
    session_rows.attach(many, np.arange(100, dtype=np.int64))
    session_rows.release(many[::2])
    session_rows.find(many)
    session_rows.attach(many + 1, np.arange(100, dtype=np.int64))
    # the sample has no TLS session: the TLS kernels are called as app.tls and app.x509 call
    # them, on a made-up handshake that reaches them all (the hello parsers also on their own,
    # as for QUIC: a kernel that only another kernel calls gets no variant of its own when numba
    # loads the caller from its cache)
    from wiretrail.app import tls, x509

    streams = [_tls_session(), _tls_session()]
    tls.parse_streams(streams)
    x509.parse_streams(streams)
    tls.analyze(_tls_session()).client_hello  # the hellos of one session: handshake on its own
    tls.parse_client_hello(b"")
    tls.parse_server_hello(b"")


def _tls_session():
    """A TLS 1.2 session (SNI, ALPN, certificates from both sides, ACKs) for _exercise."""
    from wiretrail.app.base import Direction, Stream

    def record(content_type: int, body: bytes) -> bytes:
        return bytes([content_type, 3, 3]) + len(body).to_bytes(2, "big") + body

    def message(msg_type: int, body: bytes) -> bytes:
        return bytes([msg_type]) + len(body).to_bytes(3, "big") + body

    def extension(ext_type: int, body: bytes) -> bytes:
        return ext_type.to_bytes(2, "big") + len(body).to_bytes(2, "big") + body

    def vector(body: bytes, width: int = 2) -> bytes:
        return len(body).to_bytes(width, "big") + body

    certificate = message(11, vector(vector(b"\x30\x03\x02\x01\x01", 3), 3))
    extensions = (extension(0, vector(b"\x00" + vector(b"example.com"))) + extension(10, vector(b"\x00\x1d"))
                  + extension(11, b"\x01\x00") + extension(13, vector(b"\x04\x03"))
                  + extension(16, vector(vector(b"h2", 1))) + extension(43, b"\x02\x03\x03"))
    client = record(22, message(1, b"\x03\x03" + bytes(32) + vector(bytes(32), 1) + vector(b"\xc0\x2f")
                                + b"\x01\x00" + vector(extensions)))
    client += record(22, certificate) + record(20, b"\x01") + record(22, bytes(40))
    server = record(22, message(2, b"\x03\x03" + bytes(32) + vector(bytes(32), 1) + b"\xc0\x2f\x00"
                                + vector(extension(16, vector(vector(b"h2", 1)))))
                    + certificate + message(12, b"\x03\x00\x17") + message(14, b""))
    server += record(20, b"\x01") + record(22, bytes(40))

    def side(data: bytes) -> Direction:
        return Direction(data=data, ts_offsets=np.zeros(1, dtype=np.int64), ts=np.ones(1, dtype=np.int64),
                         acks=[(np.array([len(data)], dtype=np.int64), np.array([2], dtype=np.int64))])

    return Stream(uid="C", orig_h="10.0.0.1", orig_p=1024, resp_h="10.0.0.2", resp_p=443, orig=side(client),
                  resp=side(server))


def _arg_spec(t) -> list:
    from numba.core import types

    if isinstance(t, types.Array):
        return ["array", str(t.dtype), t.ndim, t.layout == "C"]
    return ["scalar"]


def _writable(t):
    from numba.core import types

    return t.copy(readonly=False) if isinstance(t, types.Array) and not t.mutable else t


def _compile(CC, extension: str, exports: list, py_func, nrt: bool) -> bool:
    """One kernel's variants into extension module `extension`; False if, built without
    reference counting, the extension does not load."""
    from numba.core.errors import NumbaError

    cc = CC(extension)
    cc.output_dir = str(jit.AOT_DIR)
    cc.target_cpu = "host"   # built where it runs (setup and CI build it on the machine itself)
    cc.use_nrt = nrt
    for function, sig in exports:
        cc.export(function, sig)(py_func)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cc.compile()
    except NumbaError as err:
        if nrt:
            raise
        # (not tried and caught: a failed compile leaves numba's state such that the same
        # kernel then fails with reference counting too)
        raise RuntimeError(f"{extension}: the kernel makes an array; declare it @kernel(allocates=True)") from err
    if not nrt:
        # A kernel that calls another, not inlined, links in that one as numba compiled it,
        # with reference counting: the extension would then not load (a missing NRT symbol),
        # and every kernel would go back to numba at run time. Loading it here says.
        import ctypes

        try:
            ctypes.CDLL(str(next(jit.AOT_DIR.glob(extension + ".*.so"))), mode=os.RTLD_NOW)
        except OSError:
            return False
    return True


def build(force: bool = False) -> int:
    sources = jit.sources_hash()
    if not force and jit.MANIFEST.exists():
        try:
            manifest = json.loads(jit.MANIFEST.read_text())
            if manifest.get("sources") == sources and manifest.get("cpu") == jit.cpu_signature():
                print("compiled kernels are up to date")
                return 0
        except ValueError:
            pass
    started = time.monotonic()
    for name in jit.KERNEL_MODULES:
        importlib.import_module(name)
    with tempfile.TemporaryDirectory() as tmp:
        _exercise(Path(tmp))

    from numba.core.registry import CPUDispatcher
    from numba.core.typing import signature

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pycc's pending-deprecation notice
        from numba.pycc import CC

    jit.AOT_DIR.mkdir(exist_ok=True)
    jit.MANIFEST.unlink(missing_ok=True)  # no manifest while the extensions are being replaced
    for old in jit.AOT_DIR.glob("k_*"):
        old.unlink()
    from numba.core.registry import cpu_target

    cpu_target.typing_context.refresh()  # as numba's dispatcher does before it compiles
    cpu_target.target_context.refresh()
    manifest: dict[str, list] = {}
    skipped, counted = [], []
    for name in jit.KERNEL_MODULES:
        module = sys.modules[name]
        for attr, fn in vars(module).items():
            if not isinstance(fn, CPUDispatcher) or fn.py_func.__module__ != name:
                continue
            if fn.targetoptions.get("inline") == "always":
                continue  # helpers: compiled into the kernels that call them
            extension = f"k_{name.rsplit('.', 1)[1]}_{attr.lstrip('_')}"
            exports, variants, seen = [], [], set()
            for args, overload in fn.overloads.items():
                args = tuple(_writable(t) for t in args)  # a read-only buffer passes as it is
                if args in seen:
                    continue
                seen.add(args)
                function = f"v{len(variants)}"
                exports.append((function, signature(overload.signature.return_type, *args)))
                variants.append({"extension": extension, "function": function,
                                 "args": [_arg_spec(t) for t in args]})
            if not variants:
                skipped.append(f"{name}.{attr}")
                continue
            # Without numba's reference counting unless the kernel allocates arrays: with it,
            # every array a helper inlined into a loop takes is counted up and down on each
            # call, atomically (a frame took 95 ns to decode against 74).
            counts = f"{name}.{attr}" in jit.ALLOCATING
            if not counts and not _compile(CC, extension, exports, fn.py_func, nrt=False):
                counts = True
            if counts:
                _compile(CC, extension, exports, fn.py_func, nrt=True)
                counted.append(f"{name}.{attr}")
            manifest[f"{name}.{attr}"] = [{**v, "refcounts": counts} for v in variants]
    jit.MANIFEST.write_text(json.dumps({"sources": sources, "cpu": jit.cpu_signature(), "kernels": manifest},
                                       indent=1) + "\n")
    count = sum(len(v) for v in manifest.values())
    print(f"compiled {count} kernel variants of {len(manifest)} kernels in {time.monotonic() - started:.0f} s"
          + (f"; with reference counting (they allocate): {', '.join(counted)}" if counted else "")
          + (f"; not called from Python by the sample: {', '.join(skipped)}" if skipped else ""))
    return 0


def main() -> None:
    ap = argparse.ArgumentParser(description="Compile Wiretrail's kernels ahead of time.")
    ap.add_argument("--force", action="store_true", help="rebuild even if up to date")
    sys.exit(build(ap.parse_args().force))


if __name__ == "__main__":
    main()
