"""Byte helpers inlined into the kernels of every stage: big-endian reads of wire fields, and
text written straight into a uint8 buffer (numbers in decimal, bytes as log text), so that a
kernel makes the strings of a whole batch without a Python object per value."""

from __future__ import annotations

import numpy as np

from wiretrail.jit import kernel

HEXDIGITS = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)


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
