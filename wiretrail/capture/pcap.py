"""Classic pcap: a 24-byte global header, then 16-byte record headers each followed by
the captured bytes. Microsecond (0xa1b2c3d4) and nanosecond (0xa1b23c4d) magics, in
either byte order."""

from __future__ import annotations

import struct
from collections.abc import Iterator

import numpy as np

from wiretrail.batch import FrameBatch, Interface
from wiretrail.bytes_kernels import prefetch_intrinsic
from wiretrail.capture.frames import BATCH_FULL, CORRUPT, NEED_INPUT
from wiretrail.capture.source import MAX_RECORD_BYTES, ChunkReader
from wiretrail.errors import CaptureError
from wiretrail.jit import kernel, numba_hook

PCAP_USEC_MAGIC = 0xA1B2C3D4
PCAP_NSEC_MAGIC = 0xA1B23C4D
GLOBAL_HEADER_BYTES = 24
RECORD_HEADER_BYTES = 16
# libpcap's own ceiling for a record (MAXIMUM_SNAPLEN): a caplen beyond both it and the
# file's snaplen means the record header is garbage, not a big packet.
LIBPCAP_MAX_SNAPLEN = 262144

# How far ahead of the record being read the indexer has the file's cache lines fetched. Each
# record header's place depends on the one before (its caplen), so without it every header
# waited on memory in turn: 0.10 -> 0.04 CPU s to index mix.pcap's 1.7 M records (bytes
# 256-2048 ahead all measured alike).
PREFETCH_BYTES = 1024

_prefetch = None


@numba_hook
def _define_intrinsics() -> None:
    global _prefetch
    _prefetch = prefetch_intrinsic()


@kernel(inline=True)
def read_u32(buf, p, big_endian):
    if big_endian:
        return (np.uint32(buf[p]) << 24) | (np.uint32(buf[p + 1]) << 16) | (np.uint32(buf[p + 2]) << 8) | np.uint32(buf[p + 3])
    return (np.uint32(buf[p + 3]) << 24) | (np.uint32(buf[p + 2]) << 16) | (np.uint32(buf[p + 1]) << 8) | np.uint32(buf[p])


@kernel(inline=True)
def read_u16(buf, p, big_endian):
    if big_endian:
        return (np.uint32(buf[p]) << 8) | np.uint32(buf[p + 1])
    return (np.uint32(buf[p + 1]) << 8) | np.uint32(buf[p])


def u32_at(buf, pos: int, big_endian: bool) -> int:
    """read_u32 for Python code (error paths): calling a kernel helper from Python would
    bring numba in."""
    return int.from_bytes(buf[pos:pos + 4].tobytes(), "big" if big_endian else "little")


@kernel
def index_pcap_records(buf, pos, end, big_endian, frac_to_ns, max_caplen,
                       offset, caplen, wirelen, ts, batch_bytes):
    """Fill the columns for the whole records in buf[pos:end], leaving the frames where they
    are (offset[i] points into buf): no copy. Stops after `batch_bytes` of records.

    Returns (pos, n, status): pos is the first unconsumed byte; status says why it stopped
    (NEED_INPUT, BATCH_FULL or CORRUPT with pos at the bad record header).
    """
    rows = offset.shape[0]
    start_pos = pos
    n = 0
    fetched = pos  # the cache lines before this are fetched (a prefetch never faults: no bound)
    while True:
        if n >= rows or pos - start_pos >= batch_bytes:
            return pos, n, BATCH_FULL
        if end - pos < 16:
            return pos, n, NEED_INPUT
        while fetched < pos + PREFETCH_BYTES:
            _prefetch(buf, fetched)
            fetched += 64
        sec = np.int64(read_u32(buf, pos, big_endian))
        frac = np.int64(read_u32(buf, pos + 4, big_endian))
        incl = np.int64(read_u32(buf, pos + 8, big_endian))
        orig = np.int64(read_u32(buf, pos + 12, big_endian))
        if incl > max_caplen:
            return pos, n, CORRUPT
        if end - pos - 16 < incl:
            return pos, n, NEED_INPUT
        offset[n] = pos + 16
        caplen[n] = incl
        wirelen[n] = min(orig, 0x7FFFFFFF)
        ts[n] = sec * 1_000_000_000 + frac * frac_to_ns
        n += 1
        pos += 16 + incl


def read_pcap(src: ChunkReader, path: str, batch_bytes: int,
              linktypes: frozenset[int] | None) -> Iterator[FrameBatch]:
    if not src.ensure(GLOBAL_HEADER_BYTES):
        raise CaptureError(path, src.error or "truncated pcap global header", offset=0)
    header = src.buf[src.pos:src.pos + GLOBAL_HEADER_BYTES].tobytes()
    magic_le = struct.unpack_from("<I", header)[0]
    big_endian = magic_le not in (PCAP_USEC_MAGIC, PCAP_NSEC_MAGIC)
    magic, _major, _minor, _zone, _sigfigs, snaplen, network = struct.unpack(
        (">" if big_endian else "<") + "IHHiIII", header)
    frac_to_ns = 1 if magic == PCAP_NSEC_MAGIC else 1000
    linktype = network & 0x03FFFFFF  # upper bits carry FCS information
    if linktypes is not None and linktype not in linktypes:
        raise CaptureError(path, f"unknown link type {linktype}", offset=20)
    src.pos += GLOBAL_HEADER_BYTES
    interfaces = [Interface(linktype=linktype, snaplen=snaplen)]
    max_caplen = min(max(snaplen, LIBPCAP_MAX_SNAPLEN), MAX_RECORD_BYTES)

    # Batches point into the reader's chunk buffer (see ChunkReader): the frames are not
    # copied. A batch is the whole records of one chunk, or `batch_bytes` of them.
    batch_bytes = min(batch_bytes, src.batch_limit)
    rows = max(64, batch_bytes // RECORD_HEADER_BYTES + 1)
    packets = 0
    status = NEED_INPUT
    while True:
        src.release_before(src.pos)  # the batches before this one are done with
        offset = np.empty(rows, dtype=np.int64)
        caplen = np.empty(rows, dtype=np.int32)
        wirelen = np.empty(rows, dtype=np.int32)
        ts = np.empty(rows, dtype=np.int64)
        src.pos, n, status = index_pcap_records(src.buf, src.pos, src.end, big_endian, frac_to_ns, max_caplen,
                                                offset, caplen, wirelen, ts, batch_bytes)
        if n:
            packets += n
            yield FrameBatch(data=src.buf[:src.pos], offset=offset[:n], caplen=caplen[:n], wirelen=wirelen[:n],
                             ts=ts[:n], iface=np.zeros(n, dtype=np.int16),
                             linktype=np.full(n, linktype, dtype=np.uint16), interfaces=interfaces, source=path,
                             pcap_record_frac_ns=0 if big_endian else frac_to_ns)
        if status == BATCH_FULL:
            if n >= rows:  # out of rows before batch_bytes: tiny frames
                rows *= 2
            continue
        if status == NEED_INPUT:
            need = RECORD_HEADER_BYTES
            if src.available >= RECORD_HEADER_BYTES:
                need += u32_at(src.buf, src.pos + 8, big_endian)
            if not src.fill(need):
                break
        else:  # CORRUPT
            caplen_bad = u32_at(src.buf, src.pos + 8, big_endian)
            fault, fault_at = f"caplen {caplen_bad} exceeds the snaplen {snaplen}", src.offset
            break

    if status == CORRUPT:
        raise CaptureError(path, f"corrupt record header: {fault}", offset=fault_at, packets=packets)
    if src.error:
        raise CaptureError(path, src.error, offset=src.offset, packets=packets)
    if src.available:
        what = "record header" if src.available < RECORD_HEADER_BYTES else "record data"
        raise CaptureError(path, f"truncated {what}", offset=src.offset, packets=packets)
