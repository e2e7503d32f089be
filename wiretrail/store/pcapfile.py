"""Writing and reading the store's capture files, and writing extracted captures.

The packet store keeps little-endian classic pcap files: every tool reads them, a record
is found by its byte offset alone, and appending needs no block structure. Timestamps are
in nanoseconds (magic 0xa1b23c4d), or in microseconds for frames that came from a
microsecond pcap, whose records are then stored exactly as they were read. Otherwise
record headers and frame bytes of a whole batch are laid out by one numba kernel.
"""

from __future__ import annotations

import struct
from typing import BinaryIO

import numpy as np
from wiretrail.jit import kernel

PCAP_MAGIC_US = 0xA1B2C3D4
PCAP_MAGIC_NS = 0xA1B23C4D
PCAP_HEADER_LEN = 24
RECORD_HEADER_LEN = 16
NS = 1_000_000_000


def pcap_header(linktype: int, snaplen: int, nanosecond: bool = True) -> bytes:
    magic = PCAP_MAGIC_NS if nanosecond else PCAP_MAGIC_US
    return struct.pack("<IHHiIII", magic, 2, 4, 0, 0, snaplen, linktype)


def read_pcap_header(f: BinaryIO) -> tuple[int, int, int]:
    """(linktype, snaplen, ns per unit of a record's time fraction) of one of the store's own
    files (little-endian, µs or ns)."""
    head = f.read(PCAP_HEADER_LEN)
    if len(head) < PCAP_HEADER_LEN:
        raise ValueError("short pcap header")
    magic, _, _, _, _, snaplen, linktype = struct.unpack("<IHHiIII", head)
    if magic not in (PCAP_MAGIC_NS, PCAP_MAGIC_US):
        raise ValueError("not a store capture file")
    return linktype, snaplen, 1 if magic == PCAP_MAGIC_NS else 1000


@kernel(inline=True)
def _put_u32(out, pos, v):
    v = np.uint32(np.int64(v) & 0xFFFFFFFF)
    out[pos] = v & 0xFF
    out[pos + 1] = (v >> 8) & 0xFF
    out[pos + 2] = (v >> 16) & 0xFF
    out[pos + 3] = (v >> 24) & 0xFF


@kernel(allocates=True)
def _records_kernel(data, offset, caplen, wirelen, ts, rows, snaplen, divisor, out, rec_off):
    """Lay out pcap records (16-byte header + frame) for `rows` into `out`; returns the length.
    `divisor` is 1 for nanosecond files, 1000 for microsecond ones."""
    pos = 0
    for k in range(len(rows)):
        i = rows[k]
        n = np.int64(caplen[i])
        if n > snaplen:
            n = snaplen
        t = ts[i]
        sec = t // NS
        rec_off[k] = pos
        _put_u32(out, pos, sec)
        _put_u32(out, pos + 4, (t - sec * NS) // divisor)
        _put_u32(out, pos + 8, n)
        _put_u32(out, pos + 12, wirelen[i])
        pos += RECORD_HEADER_LEN
        src = offset[i]
        out[pos:pos + n] = data[src:src + n]
        pos += n
    return pos


def pcap_records(data: np.ndarray, offset: np.ndarray, caplen: np.ndarray, wirelen: np.ndarray,
                 ts: np.ndarray, rows: np.ndarray, snaplen: int = 1 << 30,
                 nanosecond: bool = True, out: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """pcap records for frames `rows`: (bytes as uint8 array, each record's offset in it).
    `out`, if given, is a buffer large enough to hold them, reused by the caller."""
    rows = np.ascontiguousarray(rows, dtype=np.int64)
    if out is None:
        stored = np.minimum(caplen[rows].astype(np.int64), snaplen)
        out = np.empty(int(stored.sum()) + RECORD_HEADER_LEN * len(rows), dtype=np.uint8)
    rec_off = np.empty(len(rows), dtype=np.int64)
    end = _records_kernel(data, offset, caplen, wirelen, ts, rows, snaplen,
                          1 if nanosecond else 1000, out, rec_off)
    return out[:end], rec_off


# ---- pcapng (extraction output only) ----------------------------------------------------------

def _pad4(b: bytes) -> bytes:
    return b + b"\0" * (-len(b) % 4)


def _option(code: int, value: bytes) -> bytes:
    return struct.pack("<HH", code, len(value)) + _pad4(value)


def _block(btype: int, body: bytes) -> bytes:
    length = 12 + len(body)
    return struct.pack("<II", btype, length) + body + struct.pack("<I", length)


def pcapng_section_header(application: str = "wiretrail") -> bytes:
    body = struct.pack("<IHHq", 0x1A2B3C4D, 1, 0, -1)
    body += _option(4, application.encode()) + _option(0, b"")
    return _block(0x0A0D0D0A, body)


def pcapng_interface(linktype: int, snaplen: int, name: str) -> bytes:
    body = struct.pack("<HHI", linktype, 0, snaplen)
    opts = b""
    if name:
        opts += _option(2, name.encode())
    opts += _option(9, bytes([9]))  # if_tsresol: nanoseconds
    body += opts + _option(0, b"")
    return _block(0x00000001, body)


def pcapng_packets(iface: int, ts: np.ndarray, wirelen: np.ndarray, frames: list[bytes]) -> bytes:
    """Enhanced Packet Blocks for one interface (Python per packet: extraction output only)."""
    out = []
    for t, w, frame in zip(ts.tolist(), wirelen.tolist(), frames):
        body = struct.pack("<IIIII", iface, (t >> 32) & 0xFFFFFFFF, t & 0xFFFFFFFF, len(frame), w)
        out.append(_block(0x00000006, body + _pad4(frame)))
    return b"".join(out)


class CaptureOutput:
    """An extracted capture: pcap (one link type) or pcapng (interfaces added as met).

    pcap is written with microsecond timestamps when every timestamp allows it (what most
    tools expect) and nanosecond ones otherwise; the caller says which by `nanosecond`.
    """

    def __init__(self, f: BinaryIO, fmt: str, nanosecond: bool = True):
        self.f = f
        self.fmt = fmt
        self.nanosecond = nanosecond
        self.pcap_linktype: int | None = None
        self.interfaces: dict[tuple[int, str], int] = {}
        self.count = 0
        if fmt == "pcapng":
            f.write(pcapng_section_header())

    def write(self, linktype: int, link: str, snaplen: int, ts: np.ndarray, wirelen: np.ndarray,
              frames: list[bytes]) -> None:
        if not frames:
            return
        if self.fmt == "pcapng":
            key = (linktype, link)
            if key not in self.interfaces:
                self.interfaces[key] = len(self.interfaces)
                self.f.write(pcapng_interface(linktype, snaplen, link))
            self.f.write(pcapng_packets(self.interfaces[key], ts, wirelen, frames))
        else:
            if self.pcap_linktype is None:
                self.pcap_linktype = linktype
                self.f.write(pcap_header(linktype, max(snaplen, 262144), self.nanosecond))
            elif linktype != self.pcap_linktype:
                from wiretrail.errors import WiretrailError

                raise WiretrailError(f"packets of link types {self.pcap_linktype} and {linktype}: "
                                     "write .pcapng, which can hold both")
            div = 1 if self.nanosecond else 1000
            for t, w, frame in zip(ts.tolist(), wirelen.tolist(), frames):
                self.f.write(struct.pack("<IIII", t // NS, (t % NS) // div, len(frame), w))
                self.f.write(frame)
        self.count += len(frames)
