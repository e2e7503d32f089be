"""Kernels: numba functions, compiled ahead of time when they can be.

Every hot loop is written once, in Python, for numba (`@kernel`). Importing numba and
readying its typing and target contexts costs about 0.45 CPU s in every command, whether
the kernels then come from numba's on-disk cache or not: a third of ingesting 1.7 M packets.
So `python -m wiretrail.aot` (run by scripts/setup.sh) compiles the kernels, with numba's
ahead-of-time compiler, into extension modules under `wiretrail/_aot/` (one per kernel: pycc
mistypes a kernel compiled after another one in the same module), beside a manifest of
what they hold and the hash of the sources they were built from. A kernel that allocates no
array is compiled without numba's reference counting, which otherwise counts every array an
inlined helper takes up and down, atomically, on each call; so the per-packet kernels take
their scratch arrays from the caller, and those that allocate say so (`allocates=True`).

The compiled code is for this machine's CPU: the manifest records which, and a tree moved to
another kind of machine goes back to numba.

At run time a kernel is then the compiled function, called through a check of its
arguments (the compiled wrappers trust their callers: an int32 array where int64 was
compiled would be read as garbage). Anything the extension does not cover — an extension
built from other sources, a kernel it lacks, arguments of other types — goes to numba,
as it would without the extension: correct first, fast where it was prepared for.
WIRETRAIL_NO_AOT=1 turns the extension off (the build itself runs that way).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
AOT_DIR = PACKAGE / "_aot"
MANIFEST = AOT_DIR / "manifest.json"

# Every module that defines kernels: their sources make up the hash an extension is checked
# against (a kernel inlines helpers from other modules, so one module's change stales them all).
KERNEL_MODULES = (
    "wiretrail.bytes_kernels",
    "wiretrail.capture.pcap",
    "wiretrail.capture.pcapng",
    "wiretrail.capture.bpf",
    "wiretrail.decode.kernel",
    "wiretrail.sessions.flowtable",
    "wiretrail.store.pcapfile",
    "wiretrail.store.index",
    "wiretrail.app.reassembly",
    "wiretrail.app.session_rows",
    "wiretrail.app.ndpi_kernel",
    "wiretrail.app.tls_kernel",
    "wiretrail.app.dns_kernel",
    "wiretrail.app.icmp_kernel",
    "wiretrail.app.stage_kernel",
)

_kernels: list["Kernel"] = []     # every @kernel, in definition order
ALLOCATING: set[str] = set()      # the kernels declared @kernel(allocates=True), by qualified name
_hooks: list = []                 # definitions only numba can make (intrinsics), run once it is in use
_numba_in_use = False
_compiled = None                  # the manifest's kernels once looked up; False: not usable


def sources_hash() -> str:
    digest = hashlib.sha256()
    for name in KERNEL_MODULES:
        path = PACKAGE.joinpath(*name.split(".")[1:]).with_suffix(".py")
        digest.update(name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def cpu_signature() -> str:
    """What the compiled code depends on of this machine: it is built for the host CPU (its
    instruction-set extensions), so a tree moved to another machine must not use it."""
    import platform

    text = f"{platform.machine()} {platform.python_version()}"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "flags", "Features", "CPU part")):
                    text += "\n" + line.strip()
                elif not line.strip():
                    break  # the first processor is enough
    except OSError:
        text += " " + platform.processor()
    return hashlib.sha256(text.encode()).hexdigest()


def _extension():
    """The manifest's kernels, or False when they were not built from these sources on this
    kind of CPU."""
    global _compiled
    if _compiled is None:
        _compiled = False
        if os.environ.get("WIRETRAIL_NO_AOT") != "1" and MANIFEST.exists():
            try:
                manifest = json.loads(MANIFEST.read_text())
                if manifest.get("sources") == sources_hash() and manifest.get("cpu") == cpu_signature():
                    _compiled = manifest["kernels"]
            except (OSError, ValueError, KeyError):
                _compiled = False
    return _compiled


def _compiled_variants(qualname: str) -> list:
    import importlib

    out = []
    for v in _extension().get(qualname, []):
        try:
            ext = importlib.import_module(f"wiretrail._aot.{v['extension']}")
        except ImportError:
            return []
        out.append((getattr(ext, v["function"]), v["args"]))
    return out


def _args_check(specs: list):
    """One predicate over all of a variant's arguments, from their manifest entries
    (["array", dtype, ndim, contiguous] or ["scalar"]): a compiled variant reads its arguments
    as those types without checking, so a call must match them all. Written out as one
    function's code rather than a loop over per-argument checks: the check runs before every
    call, and this way costs about 0.9 us instead of 2.2 us for twelve arguments."""
    import numpy as np

    env = {"ndarray": np.ndarray}
    terms = []
    for i, spec in enumerate(specs):
        if spec[0] == "array":
            env[f"d{i}"] = np.dtype(spec[1])
            term = f"type(a{i}) is ndarray and a{i}.dtype == d{i} and a{i}.ndim == {int(spec[2])}"
            terms.append(term + (f" and a{i}.flags.c_contiguous" if spec[3] else ""))
        else:
            terms.append(f"not hasattr(a{i}, '__len__')")
    params = ", ".join(f"a{i}" for i in range(len(specs)))
    exec(f"def check({params}):\n    return {' and '.join(f'({t})' for t in terms) or 'True'}\n", env)
    return env["check"]


class Kernel:
    """A kernel while the compiled extension is in use: its compiled variants, tried in turn,
    and numba's version of it, made only if a call needs it."""

    def __init__(self, py_func, inline: bool, variants):
        self.py_func = py_func
        self.inline = inline
        self.__name__ = py_func.__name__
        self.__doc__ = py_func.__doc__
        self.__wrapped__ = py_func
        self.variants = [(fn, len(args), _args_check(args)) for fn, args in variants]
        self.dispatcher = None

    def __call__(self, *args):
        for fn, arity, check in self.variants:
            if arity == len(args) and check(*args):
                return fn(*args)
        return _use_numba(self)(*args)

    def __repr__(self) -> str:
        return f"<kernel {self.py_func.__module__}.{self.__name__} ({len(self.variants)} compiled)>"


def _njit(py_func, inline: bool):
    from numba import njit

    return njit(cache=True, inline="always" if inline else "never")(py_func)


def _use_numba(wanted: Kernel):
    """Switch every kernel to numba: a kernel compiled by numba calls its helpers through
    module globals, which must then be numba functions too."""
    global _numba_in_use
    if not _numba_in_use:
        _numba_in_use = True
        for k in _kernels:
            k.dispatcher = _njit(k.py_func, k.inline)
        for hook in _hooks:
            hook()
        by_id = {id(k): k.dispatcher for k in _kernels}
        for name, module in list(sys.modules.items()):
            if name.startswith("wiretrail.") and module is not None:
                for attr, value in list(vars(module).items()):
                    if isinstance(value, Kernel):
                        setattr(module, attr, by_id[id(value)])
    return wanted.dispatcher


def kernel(py_func=None, *, inline: bool = False, allocates: bool = False):
    """`@kernel` or `@kernel(inline=True)` (a helper inlined into the kernels that call it).
    `allocates=True`: the kernel makes arrays (np.empty and the like), so its compiled form
    keeps numba's reference counting; the others are built without it (see wiretrail.aot)."""
    def decorate(fn):
        module = fn.__module__
        if module not in KERNEL_MODULES and module != "__main__":
            raise RuntimeError(f"{module} defines kernels: list it in wiretrail.jit.KERNEL_MODULES")
        if allocates:
            ALLOCATING.add(f"{module}.{fn.__name__}")
        if not _extension() or _numba_in_use:
            return _njit(fn, inline)
        k = Kernel(fn, inline, _compiled_variants(f"{module}.{fn.__name__}"))
        _kernels.append(k)
        return k
    return decorate(py_func) if py_func is not None else decorate


def numba_hook(fn):
    """Run `fn` (it defines intrinsics and the like, which only numba can build) now if numba
    is in use, or when a call first needs numba."""
    if not _extension() or _numba_in_use:
        fn()
    else:
        _hooks.append(fn)
    return fn


def extension_in_use() -> bool:
    return bool(_extension()) and not _numba_in_use
