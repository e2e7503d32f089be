"""The application stage's per-packet selections as kernels: one pass over a batch's columns
where numpy made an array per comparison (app.stage)."""

from __future__ import annotations

import numpy as np

from wiretrail.batch import TCP_ACK, TCP_SYN
from wiretrail.jit import kernel

_SYN_OR_ACK = TCP_SYN | TCP_ACK

# What the stage does with a TCP session's packets once nDPI has decided it (its
# `stream_code`, set by AppStage._judge): not judged yet, kept, dropped, left to the port.
UNDECIDED, WANTED, UNWANTED, BY_PORT = 0, 1, 2, 3


@kernel
def tcp_candidates(proto, sid, pl_len, tcp_flags, sport, dport, port_table, out_rows, out_on_port):
    """The batch's TCP packets of a session that carry a payload, a SYN or an ACK (what the
    reassembler keeps: bytes, a direction's base, what the other side has received), and
    whether a stream module reads either of their ports (port_table, by port). Written at the
    start of the out_ arrays, in order; returns how many."""
    n = 0
    for i in range(len(sid)):
        if proto[i] != 6 or sid[i] < 0:
            continue
        if pl_len[i] <= 0 and (tcp_flags[i] & _SYN_OR_ACK) == 0:
            continue
        out_rows[n] = i
        out_on_port[n] = port_table[sport[i]] or port_table[dport[i]]
        n += 1
    return n


@kernel
def wanted_streams(cand, on_port, srow, code, by_code, pl_len, tcp_flags, has, has_stream, out_rows):
    """Of the candidates `cand` (their sessions' rows srow), the packets whose stream is kept:
    with `by_code`, WANTED by their session's code, or not UNWANTED and on a stream module's
    port or not judged yet; without, on a stream module's port. A session that keeps a payload
    or a SYN is marked `has_stream` in `has`. Returns how many rows were written at the start
    of out_rows, in order."""
    n = 0
    for k in range(len(cand)):
        s = srow[k]
        if by_code:
            c = code[s]
            keep = c == WANTED or (c != UNWANTED and (on_port[k] or c == UNDECIDED))
        else:
            keep = on_port[k]
        if not keep:
            continue
        r = cand[k]
        out_rows[n] = r
        n += 1
        if pl_len[r] > 0 or (tcp_flags[r] & TCP_SYN) != 0:
            has[s] |= has_stream
    return n
