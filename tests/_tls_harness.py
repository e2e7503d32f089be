"""Test-side TCP reassembly for the TLS tests: capture -> decode -> FlowTable -> Stream objects.

Deliberately simple (the application stage's reassembler is separate): per session and
direction, segments are placed by sequence number relative to the SYN (or the lowest
sequence seen), the first copy of a byte wins, bytes never seen become gaps. UDP payloads
are kept per session as Datagrams (for QUIC).
"""

from __future__ import annotations

import ipaddress
from collections import defaultdict

import numpy as np

from wiretrail.app.base import Datagram, Direction, Stream
from wiretrail.batch import FRAG_NONE
from wiretrail.capture import iter_batches
from wiretrail.decode import decode
from wiretrail.decode.fragments import FragmentReassembler
from wiretrail.sessions.flowtable import FlowTable, uid_of

SYN = 0x02
DEPTH = 4 << 20


def _addr(ver: int, hi: int, lo: int) -> str:
    if ver == 4:
        return str(ipaddress.IPv4Address(lo & 0xFFFFFFFF))
    return str(ipaddress.IPv6Address((hi << 64) | lo))


def _direction(segs: list[tuple[int, bytes, int, int]]) -> Direction:
    """segs: (seq32, payload, ts, flags) in arrival order."""
    syn = [s for s in segs if s[3] & SYN]
    data_segs = [s for s in segs if s[1]]
    if not data_segs:
        return Direction()
    ref = (syn[0][0] + 1) & 0xFFFFFFFF if syn else data_segs[0][0]

    def rel(seq: int) -> int:
        d = (seq - ref) & 0xFFFFFFFF
        return d - (1 << 32) if d >= (1 << 31) else d

    rels = [(rel(s[0]), s[1], s[2]) for s in data_segs]
    base = 0 if syn else min(r for r, _, _ in rels)
    base = min(base, min(r for r, _, _ in rels))
    end = min(max(r + len(p) for r, p, _ in rels) - base, DEPTH)
    buf = np.zeros(max(end, 0), dtype=np.uint8)
    have = np.zeros(max(end, 0), dtype=bool)
    start_ts = np.full(max(end, 0), -1, dtype=np.int64)  # time of the first copy, at its first new byte
    for r, p, ts in rels:  # arrival order: first copy wins
        a = r - base
        b = min(a + len(p), end)
        if b <= a:
            continue
        arr = np.frombuffer(p, dtype=np.uint8)[: b - a]
        new = ~have[a:b]
        if not new.any():
            continue
        buf[a:b][new] = arr[new]
        have[a:b] = True
        first_new = a + int(np.argmax(new))
        start_ts[first_new] = ts
    # compact: drop missing bytes, record gaps
    gaps = []
    data_idx = np.nonzero(have)[0]
    # gaps: runs of ~have inside [0, last have]
    if len(data_idx) == 0:
        return Direction()
    last = int(data_idx[-1]) + 1
    missing = ~have[:last]
    if missing.any():
        m = missing.astype(np.int8)
        edges = np.diff(np.concatenate([[0], m, [0]]))
        starts = np.nonzero(edges == 1)[0]
        stops = np.nonzero(edges == -1)[0]
        for s0, s1 in zip(starts, stops):
            off = int(s0 - missing[:s0].sum())
            gaps.append((off, int(s1 - s0)))
    data = buf[:last][have[:last]].tobytes()
    pos = np.cumsum(have[:last]) - 1  # data offset of each kept byte
    marks = np.nonzero((start_ts[:last] >= 0) & have[:last])[0]
    ts_offsets = pos[marks].astype(np.int64)
    tss = start_ts[marks].astype(np.int64)
    order = np.argsort(ts_offsets, kind="stable")
    return Direction(data=data, gaps=gaps, ts_offsets=ts_offsets[order], ts=tss[order],
                     truncated=end >= DEPTH)


def load(path) -> tuple[list[Stream], dict[str, list[Datagram]]]:
    """TCP Streams and per-session UDP Datagrams of a capture, in session start order."""
    table = FlowTable()
    tcp: dict[int, dict] = {}
    udp: dict[int, list[Datagram]] = defaultdict(list)
    order: list[int] = []
    defrag = FragmentReassembler()

    def batches():
        """The capture's batches, then each batch's reassembled IP datagrams (as the pipeline)."""
        for batch in iter_batches(str(path)):
            cols = decode(batch)
            yield batch, cols, *table.update(cols, batch.ts, batch.wirelen)[:2]
            rows = np.flatnonzero(cols["frag"] != FRAG_NONE)
            if len(rows):
                whole, _ = defrag.add(batch, cols, rows, np.arange(len(rows), dtype=np.int64))
                if len(whole):
                    wcols = decode(whole)
                    yield whole, wcols, *table.update(wcols, whole.ts, whole.wirelen)[:2]

    for batch, cols, sid, is_orig in batches():
        proto = cols["proto"]
        for i in np.nonzero((sid >= 0) & ((proto == 6) | (proto == 17)))[0]:
            s = int(sid[i])
            if s not in tcp and s not in udp:
                order.append(s)
            o = bool(is_orig[i])
            ver = int(cols["ip_ver"][i])
            src = _addr(ver, int(cols["src_hi"][i]), int(cols["src_lo"][i]))
            dst = _addr(ver, int(cols["dst_hi"][i]), int(cols["dst_lo"][i]))
            sp, dp = int(cols["sport"][i]), int(cols["dport"][i])
            st = int(batch.offset[i]) + int(cols["pl_off"][i])
            n = int(cols["pl_len"][i])
            payload = bytes(batch.data[st:st + n]) if n > 0 and cols["pl_off"][i] >= 0 else b""
            ts = int(batch.ts[i])
            if proto[i] == 6:
                e = tcp.get(s)
                if e is None:
                    oh, op, rh, rp = (src, sp, dst, dp) if o else (dst, dp, src, sp)
                    e = tcp[s] = {"key": (oh, op, rh, rp), "o": [], "r": []}
                e["o" if o else "r"].append((int(cols["tcp_seq"][i]), payload, ts, int(cols["tcp_flags"][i])))
            else:
                oh, op, rh, rp = (src, sp, dst, dp) if o else (dst, dp, src, sp)
                udp[s].append(Datagram(uid=uid_of(s), ts=ts, payload=payload, from_orig=o,
                                       orig_h=oh, orig_p=op, resp_h=rh, resp_p=rp))
    streams = []
    for s in order:
        e = tcp.get(s)
        if e is None:
            continue
        oh, op, rh, rp = e["key"]
        streams.append(Stream(uid=uid_of(s), orig_h=oh, orig_p=op, resp_h=rh, resp_p=rp,
                              orig=_direction(e["o"]), resp=_direction(e["r"])))
    return streams, {uid_of(s): d for s, d in udp.items()}


# ---- TLS messages, built by hand (shared by the TLS and nDPI tests) -----------------------

def tls_record(ct: int, body: bytes, ver: bytes = b"\x03\x03") -> bytes:
    return bytes([ct]) + ver + len(body).to_bytes(2, "big") + body


def handshake_msg(mt: int, body: bytes) -> bytes:
    return bytes([mt]) + len(body).to_bytes(3, "big") + body


def extension(t: int, body: bytes) -> bytes:
    return t.to_bytes(2, "big") + len(body).to_bytes(2, "big") + body


def client_hello(sni=b"example.com", alpn=(b"h2", b"http/1.1")) -> bytes:
    exts = b""
    exts += extension(0x0A0A, b"")  # GREASE
    sn = b"\x00" + len(sni).to_bytes(2, "big") + sni
    exts += extension(0, len(sn).to_bytes(2, "big") + sn)
    exts += extension(10, b"\x00\x06\x00\x1d\x00\x17\x00\x18")
    exts += extension(11, b"\x01\x00")
    exts += extension(13, b"\x00\x04\x04\x03\x08\x04")
    al = b"".join(bytes([len(a)]) + a for a in alpn)
    exts += extension(16, len(al).to_bytes(2, "big") + al)
    exts += extension(43, b"\x04\x03\x04\x03\x03")
    ciphers = b"\x1a\x1a\x13\x01\x13\x02\xc0\x2f"
    body = (b"\x03\x03" + bytes(32) + b"\x20" + bytes(range(32)) + len(ciphers).to_bytes(2, "big") + ciphers
            + b"\x01\x00" + len(exts).to_bytes(2, "big") + exts)
    return handshake_msg(1, body)
