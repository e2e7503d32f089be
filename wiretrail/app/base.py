"""What a protocol module gives the application stage, and what it gets from it.

A protocol module (`app/dns.py`, `app/tls.py`, ...) declares:

    TABLE = "dns"                    # its table in the store (and Zeek log name where it has one)
    SCHEMA = pa.schema([...])        # first columns: ts (timestamp ns), uid (string)
    PORTS = {53, 5353, ...}          # server ports that select a session without nDPI
    NDPI = {"DNS", ...}              # nDPI master/app names that select a session
and one or more of
    def parse_datagram(d: Datagram) -> list[dict]        # UDP: one payload at a time, no state
    def new_session(d: Datagram) -> state                 # UDP: state per session, made on its first
                                                          #   datagram: state.add(d) -> rows, state.close() -> rows
    def add_datagrams(states, b: DatagramBatch)           # optional, with new_session: a batch's datagrams
                                                          #   at once (the stage prefers it); states is
                                                          #   the module's {sid: state}, kept by the stage
                                                          #   -> ([(sid, row), ...] or Records indexed by
                                                          #   sid, number of parser errors)
    def close_sessions(states, sids: np.ndarray)         # optional, with new_session: the states of the
                                                          #   closing sessions `sids` (those that have one)
                                                          #   finished at once, popped from `states`
                                                          #   -> [(sid, row), ...] or Records indexed by sid
    def new_tracker() -> tracker                          # UDP: one state for all sessions (DHCP's
                                                          #   exchanges span sessions): add(d), expire(now), close()
    def parse_stream(s: Stream) -> list[dict]             # TCP: both reassembled directions
    def parse_streams(streams: list[Stream])              # optional: many sessions' streams at once (the
                                                          #   stage prefers it; parse_stream stays the
                                                          #   fallback) -> Records or a list of them,
                                                          #   indexed by position in `streams`
    JOINED = True                                         # optional: parse_streams also takes a
                                                          #   JoinedStreams (the reassembler's output as
                                                          #   it is: no Direction per side; sessions
                                                          #   with no bytes included: no row for them)

Rows are plain dicts keyed by SCHEMA's names (missing keys are null), or, from the batch
calls, `Records`: a table of SCHEMA's columns and, per row, the item it belongs to; the
stage fills the session columns (uid, orig_h, ...) of Records itself. A parser never
raises on what it is fed: a malformed message yields a row with `malformed` set (or no
row), never an exception; the stage still guards every call, so a parser bug costs one
session's records, not the ingest.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa


# The columns that say which session a record belongs to: first in the protocol tables.
SESSION_COLUMNS = [
    ("ts", pa.timestamp("ns")),
    ("uid", pa.string()),
    ("orig_h", pa.string()),
    ("orig_p", pa.int32()),
    ("resp_h", pa.string()),
    ("resp_p", pa.int32()),
]


@dataclass(slots=True)  # one per datagram handed to a parser: slots make it cheaper to build
class Datagram:
    uid: str
    ts: int                 # ns since the epoch
    payload: bytes          # the UDP payload as captured (may be cut short by the snaplen)
    from_orig: bool         # sent by the session's originator
    orig_h: str
    orig_p: int
    resp_h: str
    resp_p: int
    truncated: bool = False  # the payload is shorter than the UDP length said
    packet: int = 0          # its packet number in the capture file (1-based; 0 if not known)


_ESCAPES = [chr(b) if 0x20 <= b < 0x7F else f"\\x{b:02x}" for b in range(256)]


def escaped_text(b: bytes) -> str:
    """Bytes as log text: printable ASCII as is, any other byte as \\xNN (Zeek's escaping)."""
    if b.isascii():
        s = b.decode("ascii")
        if s.isprintable():
            return s
    return "".join(_ESCAPES[c] for c in b)


def address_texts(hi: np.ndarray, lo: np.ndarray) -> list[str]:
    """Addresses as the flow table keeps them (128 bits in two uint64; IPv4 as ::ffff:a.b.c.d)
    as the sessions table writes them: IPv4 as a dotted quad."""
    from wiretrail.sessions.flowtable import addr_texts

    hi, lo = np.asarray(hi, dtype=np.uint64), np.asarray(lo, dtype=np.uint64)
    return addr_texts(hi, lo, ipv4_mapped(hi, lo)).to_pylist()


def ipv4_mapped(hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
    """Whether 128-bit addresses (two uint64) are IPv4-mapped (::ffff:a.b.c.d): how the flow
    table keeps IPv4, and how an IPv6 field may carry it."""
    return (hi == 0) & ((lo >> np.uint64(32)) == np.uint64(0xFFFF))


@dataclass(slots=True)
class Endpoints:
    """The two ends of each datagram's session, as columns: the originator's and the
    responder's address (as the flow table keeps them: address_texts) and port (for a whole IP
    protocol, the type and code that keyed the session). Address texts are made only for the
    datagrams a module asks about (`texts`): DNS needs them only for the rare session whose
    roles it flips, where texts for every session cost a Python tuple each (11,700 on
    mix.pcap)."""

    orig_hi: np.ndarray     # uint64
    orig_lo: np.ndarray
    resp_hi: np.ndarray
    resp_lo: np.ndarray
    orig_p: np.ndarray      # int64
    resp_p: np.ndarray

    def texts(self, at: np.ndarray) -> tuple[list[str], list[str]]:
        """(orig_h, resp_h) texts of the datagrams `at`."""
        return (address_texts(self.orig_hi[at], self.orig_lo[at]),
                address_texts(self.resp_hi[at], self.resp_lo[at]))

    def resp_multicast(self, at: np.ndarray) -> np.ndarray:
        """Whether the responder's address of the datagrams `at` is multicast (IPv4 224/4,
        IPv6 ff00::/8)."""
        hi, lo = self.resp_hi[at], self.resp_lo[at]
        return np.where(ipv4_mapped(hi, lo), (lo >> np.uint64(28)) & np.uint64(0xF) == np.uint64(0xE),
                        (hi >> np.uint64(56)) == np.uint64(0xFF))


@dataclass(slots=True)
class DatagramBatch:
    """The datagrams of one batch for one module, as columns (row j is one datagram, in
    capture order): what `add_datagrams` gets instead of a Datagram per payload.

    For a module of a whole IP protocol (IP_PROTOS: ICMP) a "datagram" is the L4 message from
    its header on, as its Datagram's payload would be: its own type and code (what the stage
    gives a Datagram as orig_p/resp_p) are its first two bytes, and `ends` has the session's
    (the type and code that keyed it)."""

    data: np.ndarray        # uint8: the batch's bytes; payload j is data[start[j]:end[j]]
    start: np.ndarray       # int64
    end: np.ndarray         # int64
    sid: np.ndarray         # int64 session ids
    from_orig: np.ndarray   # bool
    ts: np.ndarray          # int64 ns
    packet: np.ndarray      # int64 packet numbers in the capture file (1-based; 0 if not known)
    truncated: np.ndarray   # bool: the payload is shorter than the UDP (IP) length said
    ends: Endpoints         # each datagram's session's addresses and ports


@dataclass(slots=True)
class Records:
    """A protocol's rows as columns, from a batch call: row i belongs to input item index[i]
    (a position in parse_streams' list, a session id from add_datagrams or close_sessions).
    The session columns of `table` (uid, orig_h, orig_p, resp_h, resp_p) may be left out, or
    null in some rows: the stage sets them from the session (a value the module gives stays:
    DNS rows of a session whose roles were flipped); `ts` and the protocol's own columns are
    the module's (one it leaves out is null)."""

    table: pa.Table
    index: np.ndarray          # int64, one per row
    name: str | None = None    # the table the rows go to, when not the module's own


@dataclass
class Direction:
    """One direction of a TCP session, reassembled up to the depth limit.

    `data` holds the bytes in sequence order with gaps filled by nothing: `gaps` lists
    (offset in data, missing byte count) where bytes were never seen. `ts_offsets` and
    `ts` map stream offsets to packet times: ts[i] is the time of the packet that carried
    the byte at ts_offsets[i] (the first of that packet's new bytes)."""

    data: bytes = b""
    gaps: list[tuple[int, int]] = field(default_factory=list)
    ts_offsets: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    ts: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    truncated: bool = False  # the depth limit cut the stream
    # the other side's acknowledgements, as the reassembler kept them: per batch, arrays of
    # (bytes acknowledged counted in sequence numbers from the direction's start, gaps included;
    # the packet number of each ACK), in packet order (empty: not known)
    acks: list = field(default_factory=list, repr=False, compare=False)
    # ts_offsets and ts as Python lists, made by the first time_at: parsers ask for many times
    # per direction, and bisect on a list beats a numpy call per lookup
    _times: tuple[list, list] | None = field(default=None, init=False, repr=False, compare=False)
    _ack_origin: tuple | None = field(default=None, init=False, repr=False, compare=False)
    _ack_reach: tuple[list, list] | None = field(default=None, init=False, repr=False, compare=False)

    def after(self, offset: int) -> Direction:
        """The same direction from stream offset `offset` on (what a proxy carried after its
        handshake)."""
        offset = max(0, min(offset, len(self.data)))
        keep = self.ts_offsets >= offset
        ts_offsets = np.concatenate([[0], self.ts_offsets[keep] - offset]) if len(self.ts) else self.ts_offsets
        ts = np.concatenate([[self.time_at(offset)], self.ts[keep]]) if len(self.ts) else self.ts
        if len(ts_offsets) > 1 and ts_offsets[1] == 0:  # a packet began exactly there
            ts_offsets, ts = ts_offsets[1:], ts[1:]
        out = Direction(data=self.data[offset:], gaps=[(o - offset, n) for o, n in self.gaps if o >= offset],
                        ts_offsets=ts_offsets.astype(np.int64), ts=ts.astype(np.int64), truncated=self.truncated)
        if self.acks:
            out._ack_origin = (self, offset)
        return out

    def contiguous_end(self) -> int:
        """Where the bytes stop following each other: the offset of the first gap (the end of
        `data` if none). Parsers that cannot resync stop there."""
        return max(0, min([len(self.data), *(off for off, _ in self.gaps)]))

    def acked_by(self, end: int) -> int:
        """Number of the packet (from the other side) that first acknowledged the bytes of `data`
        up to `end` (exclusive): where Suricata hands them to its parser and logs what they
        complete. 0 if none did (or not known)."""
        origin = self._ack_origin
        if origin is not None:  # a part of another direction (after)
            return origin[0].acked_by(end + origin[1])
        if not self.acks or end <= 0:
            return 0
        # in sequence numbers: the bytes of the gaps before `end` count too
        seq_end = end + sum(n for o, n in self.gaps if o < end)
        reach = self._ack_reach
        if reach is None:
            # the highest ACK so far at each ACK, in packet order: the first ACK to reach a
            # point is where this running maximum first does, found by bisection (parsers ask
            # once per message)
            rel = np.concatenate([r for r, _ in self.acks])
            packets = np.concatenate([p for _, p in self.acks])
            reach = self._ack_reach = (np.maximum.accumulate(rel).tolist(), packets.tolist())
        highest, packets = reach
        i = bisect_left(highest, seq_end)
        return int(packets[i]) if i < len(highest) else 0

    def time_at(self, offset: int) -> int:
        """Time of the packet that carried stream byte `offset` (ns)."""
        if len(self.ts) == 0:
            return 0
        times = self._times
        if times is None:
            times = self._times = (np.asarray(self.ts_offsets).tolist(), np.asarray(self.ts).tolist())
        offsets, ts = times
        i = bisect_right(offsets, offset) - 1  # as np.searchsorted(ts_offsets, offset, side="right")
        return int(ts[max(i, 0)])


def ranges(start: np.ndarray, count: np.ndarray) -> np.ndarray:
    """start[i], start[i] + 1, ..., start[i] + count[i] - 1, for every i in turn."""
    total = int(count.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    ends = np.cumsum(count)
    return np.repeat(start - (ends - count), count) + np.arange(total)


@dataclass
class JoinedStreams:
    """Both directions of many sessions end to end, as the reassembler rebuilt them: what a
    batch parser reads without a Direction (and a bytes copy) per side. Side j is session
    j // 2's originator (j even) or responder (j odd); its bytes are data[data_at[j]:
    data_at[j + 1]], its packet times ts_offsets and ts[ts_at[j]:ts_at[j + 1]], its gaps
    (gap_off, gap_len)[gap_at[j]:gap_at[j + 1]] and the other side's ACKs (ack_rel,
    ack_pkt)[ack_at[j]:ack_at[j + 1]], each as in Direction (offsets relative to the side)."""

    data: np.ndarray        # uint8
    data_at: np.ndarray     # int64, one more than the sides
    ts_offsets: np.ndarray
    ts: np.ndarray
    ts_at: np.ndarray
    gap_off: np.ndarray
    gap_len: np.ndarray
    gap_at: np.ndarray
    ack_rel: np.ndarray
    ack_pkt: np.ndarray
    ack_at: np.ndarray
    truncated: np.ndarray   # bool per side

    def __len__(self) -> int:
        return (len(self.data_at) - 1) // 2

    def contiguous_ends(self) -> np.ndarray:
        """Direction.contiguous_end of every side: its length, or its first gap's offset."""
        ends = np.diff(self.data_at)
        has = np.flatnonzero(np.diff(self.gap_at) > 0)
        if len(has):
            first = np.minimum.reduceat(self.gap_off, self.gap_at[:-1][has]) if len(self.gap_off) else 0
            ends[has] = np.maximum(0, np.minimum(ends[has], first))
        return ends

    def seq_ends(self, sides: np.ndarray, ends: np.ndarray) -> np.ndarray:
        """`ends` (offsets in sides' data) in sequence numbers: the bytes of the gaps before count too."""
        ends = np.array(ends, dtype=np.int64)
        for q in np.flatnonzero(np.diff(self.gap_at)[sides] > 0).tolist():
            j = sides[q]
            a, b = self.gap_at[j], self.gap_at[j + 1]
            off, n = self.gap_off[a:b], self.gap_len[a:b]
            ends[q] += int(n[off < ends[q]].sum())
        return ends

    def swapped(self, sessions: np.ndarray) -> "JoinedStreams":
        """A copy with the two sides of `sessions` (by number) exchanged: for a session whose
        responder speaks first as a client would (its SYN missed, the SYN-ACK's sender taken
        for the originator, as Zeek does on ports it does not know)."""
        perm = np.arange(len(self.data_at) - 1, dtype=np.int64)
        perm[2 * sessions], perm[2 * sessions + 1] = 2 * sessions + 1, 2 * sessions

        def gather(at, *arrays):  # each side's piece of `arrays`, in the new side order
            lens = np.diff(at)[perm]
            new_at = np.zeros(len(perm) + 1, dtype=np.int64)
            np.cumsum(lens, out=new_at[1:])
            idx = ranges(at[:-1][perm], lens)
            return (new_at, *(a[idx] for a in arrays))

        data_at, data = gather(self.data_at, self.data)
        ts_at, ts_offsets, ts = gather(self.ts_at, self.ts_offsets, self.ts)
        gap_at, gap_off, gap_len = gather(self.gap_at, self.gap_off, self.gap_len)
        ack_at, ack_rel, ack_pkt = gather(self.ack_at, self.ack_rel, self.ack_pkt)
        return JoinedStreams(data, data_at, ts_offsets, ts, ts_at, gap_off, gap_len, gap_at, ack_rel, ack_pkt,
                             ack_at, self.truncated[perm])

    def direction(self, j: int) -> Direction:
        """Side j as a Direction (for the parsers that read one session at a time)."""
        a, b = self.ts_at[j], self.ts_at[j + 1]
        g0, g1 = self.gap_at[j], self.gap_at[j + 1]
        k0, k1 = self.ack_at[j], self.ack_at[j + 1]
        return Direction(self.data[self.data_at[j]:self.data_at[j + 1]].tobytes(),
                         list(zip(self.gap_off[g0:g1].tolist(), self.gap_len[g0:g1].tolist())),
                         self.ts_offsets[a:b], self.ts[a:b], bool(self.truncated[j]),
                         [(self.ack_rel[k0:k1], self.ack_pkt[k0:k1])] if k1 > k0 else [])


@dataclass
class Stream:
    uid: str
    orig_h: str
    orig_p: int
    resp_h: str
    resp_p: int
    orig: Direction          # client -> server
    resp: Direction          # server -> client
    app: str = ""            # nDPI's Master.App for the session, "" if not known


def guarded(parse):
    """A module's parse_stream from its parser: a bug in the parser costs that session one
    row flagged `malformed`, never an exception (the stage also guards, but loses the row)."""
    def parse_stream(s: Stream) -> list[dict]:
        try:
            return parse(s)
        except Exception:
            return [{"ts": s.orig.time_at(0) or s.resp.time_at(0), "uid": s.uid, "orig_h": s.orig_h,
                     "orig_p": s.orig_p, "resp_h": s.resp_h, "resp_p": s.resp_p, "malformed": True}]
    parse_stream.__doc__ = parse.__doc__
    return parse_stream
