"""The byte work of app/icmp.py in numba: every ICMP message of a batch read in one call.

`parse_icmp` reads the messages data[start[j]:end[j]] as app/icmp.py's `parse_message` reads
them (the same fields, the same places where a message is malformed), into one row of numbers
per message: -1 where parse_message has no value, addresses as numbers (IPv4 in the low
64-bit half), for app/icmp.py to turn into columns. `sum_terms` adds up the terms of each
message's payload entropy exactly as numpy's sum does (app/icmp.py's `entropy`), so that the
entropies are the same float64s.
"""

from __future__ import annotations

import numpy as np

from wiretrail.bytes_kernels import be16, be32
from wiretrail.jit import kernel

# per message: I_ENTROPY is the caller's; I_GATEWAY a redirect's IPv4 gateway (I_GATEWAY_IS_TARGET:
# an IPv6 redirect's, its target); I_INNER_V6: the quoted packet is IPv6; addresses as two
# 64-bit halves (their bits in int64)
(I_SID, I_TS, I_FROM_ORIG, I_TRUNCATED, I_V6, I_MALFORMED, I_TYPE, I_CODE, I_PLEN, I_ENTROPY, I_ECHO_ID, I_ECHO_SEQ,
 I_MTU, I_GATEWAY, I_GATEWAY_IS_TARGET, I_TARGET, I_TARGET_HI, I_TARGET_LO, I_PROTO, I_TTL, I_INNER_V6, I_IO_HI,
 I_IO_LO, I_IR_HI, I_IR_LO, I_IO_P, I_IR_P) = range(27)
I_FIELDS = 27


@kernel(inline=True)
def _be64(b, p):
    """8 bytes as the int64 with their bits."""
    return np.int64((np.uint64(be32(b, p)) << np.uint64(32)) | np.uint64(be32(b, p + 4)))


@kernel(inline=True)
def _quoted(b, q, qlen, row):
    """icmp.py's _quoted: the IP packet at b[q:q + qlen] quoted by an error message."""
    if qlen == 0:
        return
    version = b[q] >> 4
    if version == 4 and qlen >= 20:
        ihl = np.int64(b[q] & 0x0F) * 4
        proto = np.int64(b[q + 9])
        row[I_TTL] = b[q + 8]
        row[I_IO_HI] = 0
        row[I_IO_LO] = be32(b, q + 12)
        row[I_IR_HI] = 0
        row[I_IR_LO] = be32(b, q + 16)
        l4 = ihl
        l4_len = max(qlen - ihl, 0) if ihl >= 20 else 0
        if be16(b, q + 6) & 0x1FFF:
            l4_len = 0  # a later fragment quotes no transport header
    elif version == 6 and qlen >= 40:
        proto = np.int64(b[q + 6])
        row[I_TTL] = b[q + 7]
        row[I_INNER_V6] = 1
        row[I_IO_HI] = _be64(b, q + 8)
        row[I_IO_LO] = _be64(b, q + 16)
        row[I_IR_HI] = _be64(b, q + 24)
        row[I_IR_LO] = _be64(b, q + 32)
        p = 40
        # extension headers (hop-by-hop, routing, destination options; fragment)
        for _ in range(8):
            if (proto == 0 or proto == 43 or proto == 60) and p + 2 <= qlen:
                nxt = np.int64(b[q + p])
                p += (np.int64(b[q + p + 1]) + 1) * 8
                proto = nxt
            elif proto == 44 and p + 8 <= qlen:
                nxt = np.int64(b[q + p])
                off = be16(b, q + p + 2) >> 3
                proto = nxt
                p += 8
                if off:
                    p = qlen + 1
            else:
                break
        l4 = p
        l4_len = qlen - p if p <= qlen else 0
    else:
        row[I_MALFORMED] = 1
        return
    row[I_PROTO] = proto
    if (proto == 6 or proto == 17 or proto == 132) and l4_len >= 4:
        row[I_IO_P] = be16(b, q + l4)
        row[I_IR_P] = be16(b, q + l4 + 2)
    elif (proto == 1 or proto == 58) and l4_len >= 2:
        row[I_IO_P] = b[q + l4]
        row[I_IR_P] = b[q + l4 + 1]


@kernel(allocates=True)
def parse_icmp(data, start, end, v6):
    """parse_message(data[start[j]:end[j]], v6[j]) for every j, as rows of numbers (I_V6 ..
    I_IR_P; the other columns are the caller's)."""
    m = len(start)
    num = np.full((m, I_FIELDS), -1, dtype=np.int64)
    for j in range(m):
        s = start[j]
        n = end[j] - s
        row = num[j]
        six = v6[j]
        row[I_V6] = six
        row[I_MALFORMED] = 0
        row[I_GATEWAY_IS_TARGET] = 0
        row[I_TARGET] = 0
        row[I_INNER_V6] = 0
        if n < 4:
            row[I_MALFORMED] = 1
            if n >= 1:
                row[I_TYPE] = data[s]
            continue
        t = np.int64(data[s])
        c = np.int64(data[s + 1])
        row[I_TYPE] = t
        row[I_CODE] = c
        row[I_PLEN] = max(n - 8, 0)
        if n < 8:
            row[I_MALFORMED] = 1
            continue
        if six:
            echo = t == 128 or t == 129 or t == 160 or t == 161
            error = 1 <= t <= 4
        else:
            echo = t == 0 or t == 8 or 13 <= t <= 18 or t == 42 or t == 43
            error = t == 3 or t == 4 or t == 5 or t == 11 or t == 12
        if echo:
            row[I_ECHO_ID] = be16(data, s + 4)
            row[I_ECHO_SEQ] = be16(data, s + 6)
            continue
        if error:
            if not six and t == 3 and c == 4:
                mtu = be16(data, s + 6)
                row[I_MTU] = mtu if mtu else -1
            elif six and t == 2:
                row[I_MTU] = be32(data, s + 4)
            elif not six and t == 5:
                row[I_GATEWAY] = be32(data, s + 4)
            _quoted(data, s + 8, n - 8, row)
            continue
        if six and (t == 135 or t == 136) and n >= 24:
            row[I_TARGET] = 1
            row[I_TARGET_HI] = _be64(data, s + 8)
            row[I_TARGET_LO] = _be64(data, s + 16)
        elif six and t == 137:
            if n < 40:
                row[I_MALFORMED] = 1
                continue
            row[I_TARGET] = 1
            row[I_TARGET_HI] = _be64(data, s + 8)
            row[I_TARGET_LO] = _be64(data, s + 16)
            row[I_GATEWAY_IS_TARGET] = 1
            # the redirected header option (type 4) quotes the packet
            p = 40
            while p + 8 <= n:
                ot = data[s + p]
                ol = np.int64(data[s + p + 1]) * 8
                if ol == 0:
                    row[I_MALFORMED] = 1
                    break
                if ot == 4:
                    _quoted(data, s + p + 8, max(min(p + ol, n) - (p + 8), 0), row)
                    break
                p += ol
    return num


@kernel(allocates=True)
def byte_frequencies(data, start, length):
    """For each payload data[start[i]:start[i] + length[i]] (length >= 1), the frequencies of
    the byte values it has, in byte order (count / length: the float64s numpy's division of the
    counts gives). Returns (p, first, count): payload i's are p[first[i]:first[i] + count[i]]."""
    k = len(start)
    first = np.zeros(k, dtype=np.int64)
    count = np.zeros(k, dtype=np.int64)
    p = np.empty(np.minimum(length, 256).sum(), dtype=np.float64)
    histogram = np.zeros(256, dtype=np.int64)
    n = 0
    for i in range(k):
        histogram[:] = 0
        for j in range(start[i], start[i] + length[i]):
            histogram[data[j]] += 1
        first[i] = n
        for v in range(256):
            if histogram[v]:
                p[n] = histogram[v] / length[i]
                n += 1
        count[i] = n - first[i]
    return p[:n], first, count


@kernel(inline=True)
def _block(a, lo, n):
    """numpy's pairwise_sum of a[lo:lo + n] for n <= 128: eight running sums, then the rest."""
    if n < 8:
        res = 0.0
        for i in range(n):
            res += a[lo + i]
        return res
    r0, r1, r2, r3 = a[lo], a[lo + 1], a[lo + 2], a[lo + 3]
    r4, r5, r6, r7 = a[lo + 4], a[lo + 5], a[lo + 6], a[lo + 7]
    i = 8
    while i < n - n % 8:
        r0 += a[lo + i]
        r1 += a[lo + i + 1]
        r2 += a[lo + i + 2]
        r3 += a[lo + i + 3]
        r4 += a[lo + i + 4]
        r5 += a[lo + i + 5]
        r6 += a[lo + i + 6]
        r7 += a[lo + i + 7]
        i += 8
    res = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
    while i < n:
        res += a[lo + i]
        i += 1
    return res


@kernel(inline=True)
def _half(n):
    """Where numpy's pairwise_sum splits n terms (more than 128): half, down to a multiple of 8."""
    h = n // 2
    return h - h % 8


@kernel(allocates=True)
def sum_terms(terms, first, count):
    """out[i] = terms[first[i]:first[i] + count[i]].sum() as numpy (2.x) computes it: its add
    reduction starts from 0.0 and adds the pairwise sum of the terms (blocks of 128, halved
    above that, each block with eight running sums). count[i] <= 256 (the distinct bytes of a
    payload): two levels of halving at most."""
    out = np.empty(len(first))
    for i in range(len(first)):
        lo, n = first[i], count[i]
        if n <= 128:
            total = _block(terms, lo, n)
        else:
            h = _half(n)
            rest = n - h
            if rest <= 128:
                right = _block(terms, lo + h, rest)
            else:
                h2 = _half(rest)
                right = _block(terms, lo + h, h2) + _block(terms, lo + h + h2, rest - h2)
            total = _block(terms, lo, h) + right
        out[i] = 0.0 + total
    return out
