"""Test helper: a capture through capture -> decode -> flow table, as protocol modules see it.

`events_of(trace, ports)` runs the pipeline and returns, in capture order, the UDP
datagrams with payload to or from one of `ports` (as `Datagram`s, payload copied out of
the batch) and the moments the flow table closed their sessions. `run_sessions` feeds
them to one per-session state object each (`add(d)`, `close()`), `run_tracker` to one
object for the whole capture (`add(d)`, `expire(now)`, `close()`). `tcp_streams` gives
naively reassembled TCP streams (in-order, no gap handling beyond sequence sorting) for
modules with a `parse_stream`.

Also: Zeek log reading (TSV with a #fields header, or JSON lines) and the corpus manifest.
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from wiretrail.app.base import Datagram, Direction, Stream
from wiretrail.batch import FRAG_NONE
from wiretrail.sessions.flowtable import FlowTable, uid_of

ZEEK = Path(__file__).resolve().parents[1].parent / "shared" / "corpus" / "zeek"


def addr_text(hi: int, lo: int) -> str:
    if hi == 0 and (lo >> 32) == 0xFFFF:
        return str(ipaddress.IPv4Address(lo & 0xFFFFFFFF))
    return str(ipaddress.IPv6Address((hi << 64) | lo))


@dataclass
class Closed:
    uid: str
    ts: int


@dataclass
class _TcpSeg:
    uid: str
    from_orig: bool
    seq: int
    ts: int
    payload: bytes
    orig: tuple


def _pipeline():
    from wiretrail.capture import iter_batches
    from wiretrail.decode import decode
    return iter_batches, decode


def _packets(trace: Path):
    """Yield (batch, cols, sid[], is_orig[], rows-order) per batch, fragments reassembled."""
    iter_batches, decode = _pipeline()
    try:
        from wiretrail.decode.fragments import FragmentReassembler
        frags = FragmentReassembler()
    except ImportError:
        frags = None
    table = FlowTable()
    from wiretrail.errors import WiretrailError
    try:
        for batch in iter_batches(str(trace)):
            if len(batch) == 0:
                continue
            cols = decode(batch)
            link = np.zeros(len(batch), dtype=np.int16)
            sid, is_orig = table.update(cols, batch.ts, batch.wirelen, link)[:2]
            yield "pkts", (batch, cols, sid, is_orig)
            if frags is not None:
                rows = np.nonzero(cols["frag"] != FRAG_NONE)[0]
                if len(rows):
                    whole, _ = frags.add(batch, cols, rows, np.arange(len(rows), dtype=np.int64))
                    if len(whole):
                        wc = decode(whole)
                        wsid, worig = table.update(wc, whole.ts, whole.wirelen,
                                                   np.zeros(len(whole), dtype=np.int16))[:2]
                        yield "pkts", (whole, wc, wsid, worig)
            yield "closed", table.expire(int(batch.ts.max()))
    except WiretrailError:
        pass
    yield "closed", table.flush()


def _sum16(b: bytes) -> int:
    if len(b) % 2:
        b += b"\0"
    s = sum(np.frombuffer(b, dtype=">u2").tolist())
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def udp_checksum_ok(src: tuple[int, int], dst: tuple[int, int], udp: bytes, v4: bool) -> bool:
    """Does the UDP checksum verify? (A zero checksum over IPv4 means none: ok.)"""
    if len(udp) < 8:
        return False
    if v4 and udp[6:8] == b"\0\0":
        return True
    if v4:
        ph = (src[1] & 0xFFFFFFFF).to_bytes(4, "big") + (dst[1] & 0xFFFFFFFF).to_bytes(4, "big")
        ph += bytes([0, 17]) + len(udp).to_bytes(2, "big")
    else:
        ph = src[0].to_bytes(8, "big") + src[1].to_bytes(8, "big") + dst[0].to_bytes(8, "big")
        ph += dst[1].to_bytes(8, "big") + len(udp).to_bytes(4, "big") + bytes([0, 0, 0, 17])
    return _sum16(ph + udp) == 0xFFFF


def events_of(trace: Path, ports: set[int], *, tcp: bool = False, verify_checksums: bool = False) -> list:
    """Datagrams (and with tcp=True, _TcpSeg) on `ports`, and Closed markers, in time order per batch.

    verify_checksums drops UDP datagrams whose checksum is wrong (complete ones only), as
    Zeek does unless run with -C."""
    out = []
    for kind, item in _packets(trace):
        if kind == "closed":
            uids = item.column("uid").to_pylist() if item.num_rows else []
            now = max((e.ts for e in out if not isinstance(e, Closed)), default=0)
            out += [Closed(u, now) for u in uids]
            continue
        batch, c, sid, is_orig = item
        proto = c["proto"]
        sel = (sid >= 0) & (c["pl_len"] > 0) & (c["frag"] == FRAG_NONE)
        sel &= (proto == 17) | ((proto == 6) if tcp else False)
        ok = np.isin(c["sport"], list(ports)) | np.isin(c["dport"], list(ports))
        rows = np.nonzero(sel & ok)[0]
        evs = []
        data = batch.data
        for i in rows:
            i = int(i)
            off = int(batch.offset[i])
            p0 = off + int(c["pl_off"][i])
            payload = bytes(data[p0:p0 + int(c["pl_len"][i])])
            src = addr_text(int(c["src_hi"][i]), int(c["src_lo"][i]))
            dst = addr_text(int(c["dst_hi"][i]), int(c["dst_lo"][i]))
            sp, dp = int(c["sport"][i]), int(c["dport"][i])
            fo = bool(is_orig[i])
            orig = (src, sp, dst, dp) if fo else (dst, dp, src, sp)
            uid = uid_of(int(sid[i]))
            ts = int(batch.ts[i])
            if proto[i] == 17:
                l4 = off + int(c["l4_off"][i])
                udp_len = (int(data[l4 + 4]) << 8) | int(data[l4 + 5]) if c["l4_off"][i] >= 0 else 0
                if verify_checksums and udp_len - 8 == len(payload) and not udp_checksum_ok(
                        (int(c["src_hi"][i]), int(c["src_lo"][i])), (int(c["dst_hi"][i]), int(c["dst_lo"][i])),
                        bytes(data[l4:l4 + udp_len]), int(c["ip_ver"][i]) == 4):
                    continue
                evs.append(Datagram(uid=uid, ts=ts, payload=payload, from_orig=fo, orig_h=orig[0],
                                    orig_p=orig[1], resp_h=orig[2], resp_p=orig[3],
                                    truncated=udp_len - 8 > len(payload)))
            else:
                evs.append(_TcpSeg(uid, fo, int(c["tcp_seq"][i]), ts, payload, orig))
        evs.sort(key=lambda e: e.ts)
        out += evs
    return out


def run_sessions(events: list, factory) -> list[dict]:
    """One state object per session uid: factory(first datagram), .add(d), .close() at session end."""
    states: dict = {}
    rows: list[dict] = []
    for e in events:
        if isinstance(e, Closed):
            st = states.pop(e.uid, None)
            if st is not None:
                rows += st.close()
        elif isinstance(e, Datagram):
            st = states.get(e.uid)
            if st is None:
                st = states[e.uid] = factory(e)
            rows += st.add(e)
    for st in states.values():
        rows += st.close()
    return rows


def run_tracker(events: list, tracker) -> list[dict]:
    """One state object for the whole capture: .expire(now) before each datagram, .add(d), .close()."""
    rows: list[dict] = []
    for e in events:
        if isinstance(e, Datagram):
            rows += tracker.expire(e.ts)
            rows += tracker.add(e)
    rows += tracker.close()
    return rows


def tcp_streams(events: list) -> list[Stream]:
    """TCP sessions among `events` as Streams (segments sorted by sequence, overlaps dropped)."""
    by: dict[str, dict] = {}
    for e in events:
        if isinstance(e, _TcpSeg):
            s = by.setdefault(e.uid, {"orig": e.orig, True: [], False: []})
            s[e.from_orig].append(e)
    out = []
    for uid, s in by.items():
        dirs = []
        for side in (True, False):
            segs = s[side]
            d = Direction()
            if segs:
                base = segs[0].seq
                segs = sorted(segs, key=lambda g: ((g.seq - base) & 0xFFFFFFFF, g.ts))
                buf = bytearray()
                offs, tss = [], []
                for g in segs:
                    rel = (g.seq - base) & 0xFFFFFFFF
                    if rel + len(g.payload) <= len(buf):
                        continue
                    new = g.payload[max(0, len(buf) - rel):]
                    offs.append(len(buf))
                    tss.append(g.ts)
                    buf += new
                d = Direction(data=bytes(buf), ts_offsets=np.array(offs, dtype=np.int64),
                              ts=np.array(tss, dtype=np.int64))
            dirs.append(d)
        o = s["orig"]
        out.append(Stream(uid=uid, orig_h=o[0], orig_p=o[1], resp_h=o[2], resp_p=o[3], orig=dirs[0], resp=dirs[1]))
    return out


# ---- Zeek logs ---------------------------------------------------------------------------------

def read_zeek_log(path: Path) -> list[dict]:
    """Rows of a Zeek log as dicts of strings ('-' unset, '(empty)' empty); JSON lines too."""
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    rows: list[dict] = []
    fields = None
    for line in text.splitlines():
        if not line.strip():
            continue
        if line.startswith("{"):
            rows.append(json.loads(line))
        elif line.startswith("#fields"):
            fields = line.split("\t")[1:]
        elif line.startswith("#") or fields is None:
            continue
        else:
            rows.append(dict(zip(fields, line.split("\t"))))
    return rows


def zeek_vector(v) -> list[str] | None:
    """A Zeek set/vector field as a list (None if unset)."""
    if isinstance(v, list):
        return [str(x) for x in v]
    if v in (None, "-"):
        return None
    if v == "(empty)":
        return []
    return [x.replace("\\x2c", ",") for x in v.split(",")]


def manifest_tests(log: str) -> list[dict]:
    return [t for t in json.loads((ZEEK / "manifest.json").read_text()) if log in t["logs"]]
