"""IP fragment reassembly (IPv4 and IPv6) across batches.

Fragments are rare, so the work here is Python per fragment; the batch's other packets are
never touched (the caller passes only the fragment rows). A completed datagram comes out
as one synthetic frame: the first fragment's bytes before its IP header (link layer and
any tunnel headers, unchanged), the IP header with the fragmentation undone, the payload.

Overlap policy: the data that arrived first wins (as in PcapPlusPlus and BSD's "first"
policy; Linux prefers later data for some overlaps). A later fragment that overlaps with
different bytes is counted in `bad_fragments` and its conflicting bytes are ignored.
"""

from __future__ import annotations

import struct
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from wiretrail.batch import FrameBatch

MAX_IP_DATAGRAM = 65535
_IPV6_EXT = (0, 43, 60, 135)  # headers that may sit before the Fragment header (AH: 51, in 4-byte units)


@dataclass
class _Datagram:
    first_ts: int
    tags: list[int] = field(default_factory=list)
    pieces: list[tuple[int, bytes]] = field(default_factory=list)  # (offset, data) in arrival order
    head: bytes | None = None   # first fragment: bytes before the IP header + unfragmentable IP part
    l3_off: int = 0             # where the IP header starts in `head`
    nh_pos: int = 0             # IPv6: position in `head` of the Next Header byte that named the Fragment header
    next_header: int = 0        # IPv6: the Fragment header's Next Header
    end: int = -1               # payload length, known once the last fragment (MF=0) arrived
    nbytes: int = 0
    linktype: int = 0
    iface: int = 0


def _ipv4_checksum(h: bytearray) -> int:
    s = sum(struct.unpack(f"!{len(h) // 2}H", bytes(h)))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


class FragmentReassembler:
    """Reassembles IPv4/IPv6 datagrams from fragment rows of decoded batches.

    Bounded: past `max_bytes` of stored fragment data or `max_datagrams` pending datagrams
    the oldest datagrams are dropped; `expire` drops those whose first fragment is older
    than `timeout_ns`. Tags of dropped or rejected fragments come out of the next `expire`.
    """

    def __init__(self, max_bytes: int = 64 << 20, timeout_ns: int = 30 * 10**9, max_datagrams: int = 65536):
        self.max_bytes = max_bytes
        self.timeout_ns = timeout_ns
        self.max_datagrams = max_datagrams
        self._pending: OrderedDict[tuple, _Datagram] = OrderedDict()
        self._bytes = 0
        self._dropped: list[np.ndarray] = []
        # counters (what Zeek would report as weirds)
        self.bad_fragments = 0       # conflicting overlaps, malformed or oversize fragments
        self.evicted = 0             # datagrams dropped for the memory/count bounds
        self.timed_out = 0
        self.reassembled = 0

    def __len__(self) -> int:
        return len(self._pending)

    # ---- input ---------------------------------------------------------------------------
    def add(self, batch: FrameBatch, cols: dict[str, np.ndarray], rows: np.ndarray,
            tags: np.ndarray) -> tuple[FrameBatch, list[np.ndarray]]:
        rows = np.asarray(rows, dtype=np.int64)
        done: list[tuple[_Datagram, bytes, int]] = []
        if len(rows):
            g = {k: cols[k][rows].tolist() for k in ("ip_ver", "src_hi", "src_lo", "dst_hi", "dst_lo", "proto",
                                                      "frag_id", "vlan", "l3_off", "frag_off")}
            off = batch.offset[rows].tolist()
            cap = batch.caplen[rows].tolist()
            ts = batch.ts[rows].tolist()
            lts = batch.linktype[rows].tolist()
            ifs = batch.iface[rows].tolist()
            tag_list = np.asarray(tags, dtype=np.int64).tolist()
            for j in range(len(rows)):
                frame = batch.data[off[j]:off[j] + cap[j]].tobytes()
                key = (g["ip_ver"][j], g["src_hi"][j], g["src_lo"][j], g["dst_hi"][j], g["dst_lo"][j],
                       g["proto"][j], g["frag_id"][j], g["vlan"][j])
                out = self._add_one(key, frame, g["l3_off"][j], ts[j], tag_list[j], lts[j], ifs[j])
                if out is not None:
                    done.append((out[0], out[1], ts[j]))
            self._enforce_bounds()
        return self._frames(batch, done), [np.array(d.tags, dtype=np.int64) for d, _, _ in done]

    def _reject(self, tag: int) -> None:
        self.bad_fragments += 1
        self._dropped.append(np.array([tag], dtype=np.int64))

    def _add_one(self, key, frame: bytes, l3: int, ts: int, tag: int, linktype: int, iface: int):
        ip = frame[l3:]
        if l3 < 0 or len(ip) < 20:
            self._reject(tag)
            return None
        if key[0] == 4:
            ihl = (ip[0] & 15) * 4
            tot, fw = struct.unpack("!HH", ip[2:4] + ip[6:8])
            foff, mf = (fw & 0x1FFF) * 8, (fw >> 13) & 1
            if tot > len(ip) or tot < ihl:
                self._reject(tag)  # truncated or lying length: the data cannot be trusted
                return None
            data = ip[ihl:tot]
            unfrag_len, nh_pos, next_header = ihl, 0, 0
        else:
            if len(ip) < 48:
                self._reject(tag)
                return None
            tot = 40 + struct.unpack("!H", ip[4:6])[0]
            if tot > len(ip):
                self._reject(tag)
                return None
            nh, p, nh_pos = ip[6], 40, 6
            while nh != 44 and p + 2 <= tot:
                if nh == 51:
                    hl = (ip[p + 1] + 2) * 4
                elif nh in _IPV6_EXT:
                    hl = (ip[p + 1] + 1) * 8
                else:
                    break
                nh, nh_pos, p = ip[p], p, p + hl
            if nh != 44 or p + 8 > tot:
                self._reject(tag)
                return None
            next_header = ip[p]
            fw = struct.unpack("!H", ip[p + 2:p + 4])[0]
            foff, mf = fw & 0xFFF8, fw & 1
            data = ip[p + 8:tot]
            unfrag_len = p
        if foff + len(data) + unfrag_len > MAX_IP_DATAGRAM:
            # a fragment train past 65535 bytes (ping of death): the whole datagram goes
            self._reject(tag)
            self._drop(key)
            return None

        d = self._pending.get(key)
        if d is None:
            d = self._pending[key] = _Datagram(first_ts=ts, linktype=linktype, iface=iface)
        d.tags.append(tag)
        if foff == 0 and d.head is None:
            d.head = frame[:l3 + unfrag_len]
            d.l3_off = l3
            d.nh_pos = l3 + nh_pos
            d.next_header = next_header
            d.linktype, d.iface = linktype, iface
        if not mf:
            if d.end >= 0 and d.end != foff + len(data):
                self.bad_fragments += 1  # two different ends: keep the first
            elif d.end < 0:
                d.end = foff + len(data)
        for o, piece in d.pieces:
            lo, hi = max(o, foff), min(o + len(piece), foff + len(data))
            if lo < hi and piece[lo - o:hi - o] != data[lo - foff:hi - foff]:
                self.bad_fragments += 1
                break
        d.pieces.append((foff, data))
        d.nbytes += len(data)
        self._bytes += len(data)
        if d.head is None or d.end < 0:
            return None
        payload = self._payload(d, complete=True)
        if payload is None:
            return None
        del self._pending[key]
        self._bytes -= d.nbytes
        self.reassembled += 1
        return d, self._datagram(d, payload)

    @staticmethod
    def _payload(d: _Datagram, complete: bool) -> bytes | None:
        """The data from offset 0: the whole datagram (None if there is a hole) when `complete`,
        else the contiguous part received so far."""
        covered = 0
        for o, piece in sorted(d.pieces, key=lambda x: x[0]):
            if o > covered:
                break
            covered = max(covered, o + len(piece))
        if complete:
            if covered < d.end:
                return None
            size = d.end
        else:
            size = covered if d.end < 0 else min(covered, d.end)
        buf = bytearray(size)
        for o, piece in reversed(d.pieces):  # earlier arrivals written last: first-arrived data wins
            if o < size:
                buf[o:min(size, o + len(piece))] = piece[:size - o]
        return bytes(buf)

    @staticmethod
    def _datagram(d: _Datagram, payload: bytes) -> bytes:
        head = bytearray(d.head)
        ip = d.l3_off
        if (head[ip] >> 4) == 4:
            ihl = (head[ip] & 15) * 4
            head[ip + 2:ip + 4] = struct.pack("!H", ihl + len(payload))
            # the whole flags/offset field is cleared (DF too), as PcapPlusPlus and the
            # Linux stack do for a reassembled datagram
            head[ip + 6:ip + 8] = b"\0\0"
            head[ip + 10:ip + 12] = b"\0\0"
            head[ip + 10:ip + 12] = struct.pack("!H", _ipv4_checksum(head[ip:ip + ihl]))
        else:
            head[d.nh_pos] = d.next_header  # the Fragment header is not copied
            head[ip + 4:ip + 6] = struct.pack("!H", len(head) - ip - 40 + len(payload))
        return bytes(head) + payload

    # ---- bounds and timeouts ----------------------------------------------------------------
    def _drop(self, key) -> None:
        d = self._pending.pop(key, None)
        if d is not None:
            self._bytes -= d.nbytes
            self._dropped.append(np.array(d.tags, dtype=np.int64))

    def _enforce_bounds(self) -> None:
        while self._pending and (self._bytes > self.max_bytes or len(self._pending) > self.max_datagrams):
            self.evicted += 1
            self._drop(next(iter(self._pending)))

    def expire(self, now_ns: int | None) -> list[np.ndarray]:
        """Drop datagrams whose first fragment is older than the timeout (all when now_ns is
        None); returns the tags of their fragments and of fragments dropped since the last call."""
        if now_ns is None:
            self.timed_out += len(self._pending)
            for key in list(self._pending):
                self._drop(key)
        else:
            # pending datagrams are in order of their first fragment: stop at the first young one
            limit = now_ns - self.timeout_ns
            while self._pending:
                key, d = next(iter(self._pending.items()))
                if d.first_ts >= limit:
                    break
                self.timed_out += 1
                self._drop(key)
        out, self._dropped = self._dropped, []
        return out

    def partial(self) -> tuple[FrameBatch, list[np.ndarray]]:
        """The pending datagrams that have their first fragment, as frames holding the data
        received contiguously from offset 0 (as PcapPlusPlus exposes partial datagrams);
        they stay pending."""
        done = [(d, self._datagram(d, self._payload(d, complete=False)), max(d.first_ts, 0))
                for d in self._pending.values() if d.head is not None]
        return self._frames(None, done), [np.array(d.tags, dtype=np.int64) for d, _, _ in done]

    # ---- output -------------------------------------------------------------------------------
    @staticmethod
    def _frames(batch: FrameBatch | None, done) -> FrameBatch:
        frames = [f for _, f, _ in done]
        lens = np.array([len(f) for f in frames], dtype=np.int64)
        offset = np.zeros(len(frames), dtype=np.int64)
        if len(frames):
            offset[1:] = np.cumsum(lens)[:-1]
        interfaces = list(batch.interfaces) if batch is not None else []
        return FrameBatch(
            data=np.frombuffer(b"".join(frames), dtype=np.uint8).copy(),
            offset=offset, caplen=lens.astype(np.int32), wirelen=lens.astype(np.int32),
            ts=np.array([t for _, _, t in done], dtype=np.int64),
            iface=np.array([d.iface for d, _, _ in done], dtype=np.int16),
            linktype=np.array([d.linktype for d, _, _ in done], dtype=np.uint16),
            interfaces=interfaces, source=batch.source if batch is not None else "")
