"""Byte helpers inlined into the kernels of every stage: big-endian reads of wire fields, and
text written straight into a uint8 buffer (numbers in decimal, bytes as log text), so that a
kernel makes the strings of a whole batch without a Python object per value."""

from __future__ import annotations

import numpy as np

from wiretrail.jit import kernel

HEXDIGITS = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)

_memmove = None
_prefetch = None


def memmove_intrinsic():
    """`memmove(dst, dst_at, src, src_at, n)`: dst[dst_at:dst_at + n] = src[src_at:src_at + n]
    for uint8 arrays, as one libc memmove, no bounds checked. numba copies a slice assignment
    byte by byte, at about 1 GB/s. Built when numba compiles (a numba_hook of the module whose
    kernels call it binds it to a global of that module: a kernel finds its callees there)."""
    global _memmove
    if _memmove is None:
        from numba import types
        from numba.core import cgutils
        from numba.extending import intrinsic

        @intrinsic
        def memmove(typingctx, dst, dst_at, src, src_at, n):
            sig = types.void(dst, types.int64, src, types.int64, types.int64)

            def codegen(context, builder, signature, args):
                d = context.make_array(signature.args[0])(context, builder, args[0])
                s = context.make_array(signature.args[2])(context, builder, args[2])
                cgutils.raw_memmove(builder, builder.gep(d.data, [args[1]]), builder.gep(s.data, [args[3]]),
                                    args[4], 1)
                return context.get_dummy_value()
            return sig, codegen
        _memmove = memmove
    return _memmove


def prefetch_intrinsic():
    """`prefetch(a, i)`: ask the CPU to bring the cache line holding a[i] (a 1-D array) in,
    for reading, without waiting for it. A kernel that goes through a batch row by row calls
    it for a row some way ahead whose bytes the hardware prefetcher does not foresee (each
    frame's headers): the load that would miss is then in flight while the rows before it
    are worked on. A prefetch never faults, so `i` needs no bounds check. Built when numba
    compiles, as memmove_intrinsic is."""
    global _prefetch
    if _prefetch is None:
        from numba import types
        from numba.core import cgutils
        from numba.extending import intrinsic

        @intrinsic
        def prefetch(typingctx, a, i):
            sig = types.void(a, types.int64)

            def codegen(context, builder, signature, args):
                arr = context.make_array(signature.args[0])(context, builder, args[0])
                emit_prefetch(builder, builder.bitcast(builder.gep(arr.data, [args[1]]), cgutils.voidptr_t))
                return context.get_dummy_value()
            return sig, codegen
        _prefetch = prefetch
    return _prefetch


def emit_prefetch(builder, ptr) -> None:
    """The llvm.prefetch of byte pointer `ptr`, for an intrinsic's code: for reading (0),
    kept in all cache levels (locality 3), data cache (1)."""
    from llvmlite import ir
    from numba.core import cgutils

    i32 = ir.IntType(32)
    fnty = ir.FunctionType(ir.VoidType(), [ptr.type, i32, i32, i32])
    fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
    builder.call(fn, [ptr, i32(0), i32(3), i32(1)])


@kernel(inline=True)
def be16(b, p):
    return (np.int64(b[p]) << 8) | np.int64(b[p + 1])


@kernel(inline=True)
def be24(b, p):
    return (np.int64(b[p]) << 16) | (np.int64(b[p + 1]) << 8) | np.int64(b[p + 2])


@kernel(inline=True)
def be32(b, p):
    return (np.int64(b[p]) << 24) | (np.int64(b[p + 1]) << 16) | (np.int64(b[p + 2]) << 8) | np.int64(b[p + 3])


@kernel(inline=True)
def put_decimal(v, out, pos):
    """0 <= v < 1000 in decimal at out[pos:]; returns the end."""
    if v >= 100:
        out[pos] = 48 + v // 100
        pos += 1
    if v >= 10:
        out[pos] = 48 + (v // 10) % 10
        pos += 1
    out[pos] = 48 + v % 10
    return pos + 1


@kernel(inline=True)
def put_escaped(b, a, e, out, pos, hexdigits):
    """b[a:e] as log text at out[pos:] (printable ASCII as is, other bytes as \\xNN, as Zeek
    writes them); returns (the end, whether it had ASCII capitals)."""
    caps = False
    for i in range(a, e):
        c = b[i]
        if 0x20 <= c < 0x7F:
            out[pos] = c
            pos += 1
            if 0x41 <= c <= 0x5A:
                caps = True
        else:
            out[pos] = 92  # '\'
            out[pos + 1] = 120  # 'x'
            out[pos + 2] = hexdigits[c >> 4]
            out[pos + 3] = hexdigits[c & 15]
            pos += 4
    return pos, caps
