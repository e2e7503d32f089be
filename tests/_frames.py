"""Test helpers: FrameBatch from classic pcap files (pure Python) and from frames built here.

Stands in for wiretrail.capture in the decoder tests so that they do not depend on it.
"""

from __future__ import annotations

import struct

import numpy as np

from wiretrail.batch import FrameBatch, Interface


def read_pcap(path) -> tuple[list[bytes], list[int], list[int], int]:
    """Frames, timestamps (ns), wire lengths and the link type of a classic pcap file."""
    raw = open(path, "rb").read()
    magic = raw[:4]
    if magic in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1"):
        e = "<"
    elif magic in (b"\xa1\xb2\xc3\xd4", b"\xa1\xb2\x3c\x4d"):
        e = ">"
    else:
        raise ValueError(f"{path}: not a classic pcap file")
    nano = magic in (b"\x4d\x3c\xb2\xa1", b"\xa1\xb2\x3c\x4d")
    linktype = struct.unpack(e + "I", raw[20:24])[0] & 0xFFFF
    frames, ts, wire = [], [], []
    p = 24
    while p + 16 <= len(raw):
        sec, frac, incl, orig = struct.unpack(e + "IIII", raw[p:p + 16])
        p += 16
        frames.append(raw[p:p + incl])
        ts.append(sec * 10**9 + (frac if nano else frac * 1000))
        wire.append(orig)
        p += incl
    return frames, ts, wire, linktype


def read_pcapng(path) -> tuple[list[bytes], list[int], list[int], list[int]]:
    """Frames, timestamps (ns), wire lengths and per-frame link types of a pcapng file."""
    raw = open(path, "rb").read()
    frames, ts, wire, lts = [], [], [], []
    ifaces: list[tuple[int, int]] = []  # (linktype, ticks per second)
    e = "<"
    p = 0
    while p + 12 <= len(raw):
        btype = struct.unpack(e + "I", raw[p:p + 4])[0]
        if btype == 0x0A0D0D0A:
            e = "<" if raw[p + 8:p + 12] == b"\x4d\x3c\x2b\x1a" else ">"
            ifaces = []
        blen = struct.unpack(e + "I", raw[p + 4:p + 8])[0]
        if blen < 12:
            break
        body = raw[p + 8:p + blen - 4]
        if btype == 1:
            lt = struct.unpack(e + "H", body[:2])[0]
            res = 10**6
            q = 8
            while q + 4 <= len(body):
                code, olen = struct.unpack(e + "HH", body[q:q + 4])
                if code == 0:
                    break
                if code == 9 and olen >= 1:
                    v = body[q + 4]
                    res = 2 ** (v & 0x7F) if v & 0x80 else 10 ** v
                q += 4 + ((olen + 3) & ~3)
            ifaces.append((lt, res))
        elif btype in (6, 3, 2) and ifaces:
            if btype == 6:
                iid, hi, lo, incl, orig = struct.unpack(e + "IIIII", body[:20])
                data = body[20:20 + incl]
                t = ((hi << 32) | lo) * 10**9 // ifaces[iid][1]
            elif btype == 2:
                iid, _, hi, lo, incl, orig = struct.unpack(e + "HHIIII", body[:20])
                data = body[20:20 + incl]
                t = ((hi << 32) | lo) * 10**9 // ifaces[iid][1]
            else:
                iid, orig = 0, struct.unpack(e + "I", body[:4])[0]
                data = body[4:4 + min(orig, len(body) - 4)]
                t = 0
            frames.append(data)
            ts.append(t)
            wire.append(orig)
            lts.append(ifaces[iid][0])
        p += blen
    return frames, ts, wire, lts


def read_capture(path) -> FrameBatch:
    """FrameBatch of a pcap or pcapng file."""
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"\x0a\x0d\x0d\x0a":
        frames, ts, wire, lts = read_pcapng(path)
        return make_batch(frames, ts=ts, wirelen=wire, linktypes=lts)
    return pcap_batch(path)


def make_batch(frames, linktype=1, ts=None, wirelen=None, linktypes=None) -> FrameBatch:
    """One FrameBatch holding `frames` (bytes each); one interface per distinct link type."""
    n = len(frames)
    lens = np.array([len(f) for f in frames], dtype=np.int64)
    offset = np.zeros(n, dtype=np.int64)
    if n:
        offset[1:] = np.cumsum(lens)[:-1]
    data = np.frombuffer(b"".join(frames), dtype=np.uint8).copy() if n else np.zeros(0, np.uint8)
    lts = list(linktypes) if linktypes is not None else [linktype] * n
    kinds = sorted(set(lts)) or [linktype]
    iface = np.array([kinds.index(x) for x in lts], dtype=np.int16)
    return FrameBatch(
        data=data, offset=offset, caplen=lens.astype(np.int32),
        wirelen=(np.array(wirelen, dtype=np.int32) if wirelen is not None else lens.astype(np.int32)),
        ts=np.array(ts if ts is not None else range(n), dtype=np.int64), iface=iface,
        linktype=np.array(lts, dtype=np.uint16), interfaces=[Interface(k) for k in kinds])


def pcap_batch(path) -> FrameBatch:
    frames, ts, wire, lt = read_pcap(path)
    return make_batch(frames, lt, ts, wire)


# ---- frame builders -------------------------------------------------------------------------

def csum(b: bytes) -> int:
    if len(b) % 2:
        b += b"\0"
    s = sum(struct.unpack(f"!{len(b) // 2}H", b))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def ip4(src, dst, proto, payload, ttl=64, ident=1, mf=0, off=0, options=b"", tot=None) -> bytes:
    ihl = 5 + len(options) // 4
    total = tot if tot is not None else ihl * 4 + len(payload)
    h = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, total, ident, (mf << 13) | (off // 8), ttl, proto, 0,
                    bytes(map(int, src.split("."))), bytes(map(int, dst.split(".")))) + options
    h = h[:10] + struct.pack("!H", csum(h)) + h[12:]
    return h + payload


def ip6(src, dst, nh, payload, hlim=64, plen=None) -> bytes:
    import ipaddress
    return (struct.pack("!IHBB", 0x60000000, len(payload) if plen is None else plen, nh, hlim)
            + ipaddress.IPv6Address(src).packed + ipaddress.IPv6Address(dst).packed + payload)


def tcp(sport, dport, seq=1, ack=0, flags=0x18, win=1000, options=b"", payload=b"") -> bytes:
    doff = 5 + len(options) // 4
    return struct.pack("!HHIIBBHHH", sport, dport, seq, ack, doff << 4, flags, win, 0, 0) + options + payload


def udp(sport, dport, payload=b"") -> bytes:
    return struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload


def eth(ethertype, payload, vlans=()) -> bytes:
    h = b"\x00\x11\x22\x33\x44\x55" + b"\x66\x77\x88\x99\xaa\xbb"
    for tpid, vid in vlans:
        h += struct.pack("!HH", tpid, vid)
    return h + struct.pack("!H", ethertype) + payload
