"""pcapng: blocks of (type, total length, body, total length).

The numba kernel walks packet blocks (EPB, SPB, the obsolete PB) and skips every other
block (NRB, ISB, DSB, custom, unknown). Section headers and interface descriptions are
rare, so the kernel stops at them and Python parses them: each section has its own byte
order and its own interfaces; interface numbers in the batches are global to the file.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

import numpy as np
from wiretrail.jit import kernel

from wiretrail.batch import FrameBatch, Interface
from wiretrail.capture.frames import BATCH_FULL, CONTROL, CORRUPT, NEED_INPUT, FrameBuffer
from wiretrail.capture.pcap import read_u16, read_u32, u32_at
from wiretrail.capture.source import MAX_RECORD_BYTES, ChunkReader
from wiretrail.errors import CaptureError

SHB_TYPE = 0x0A0D0D0A
IDB_TYPE = 1
OPB_TYPE = 2   # obsolete Packet Block
SPB_TYPE = 3
EPB_TYPE = 6
BYTE_ORDER_MAGIC = 0x1A2B3C4D

OPT_IF_NAME = 2
OPT_IF_TSRESOL = 9
OPT_IF_TSOFFSET = 14

# Why the kernel stopped with CORRUPT (state[ERROR_CODE]); state[ERROR_VALUE] is the bad value.
ERR_BLOCK_LENGTH = 1
ERR_SHORT_PACKET_BLOCK = 2
ERR_UNDEFINED_INTERFACE = 3
ERR_NO_INTERFACE = 4
ERR_CAPLEN = 5

# Slots of the kernel's int64 state array (carried across calls).
LAST_TS = 0
SKIPPED = 1
ERROR_CODE = 2
ERROR_VALUE = 3

# Timestamps finer than 2^-30 s are cut to 2^-30 s so the conversion cannot overflow.
_MAX_BINARY_SHIFT = 30


@kernel(allocates=True)
def parse_pcapng_blocks(buf, pos, end, big_endian, if_global, if_snaplen, if_ts_mul, if_ts_div,
                        if_ts_shift, if_ts_offset, if_accept, state,
                        data, fill, offset, caplen, wirelen, ts, iface, n, batch_bytes):
    """Append the packets of whole blocks from buf[pos:end] to the output arrays.

    Returns (pos, n, fill, status); pos is the start of the first block not consumed.
    An SPB has no timestamp: it gets the previous packet's (state[LAST_TS]).
    """
    rows = offset.shape[0]
    capacity = data.shape[0]
    n_ifaces = if_global.shape[0]
    while True:
        if n >= rows:
            return pos, n, fill, BATCH_FULL
        if end - pos < 12:
            return pos, n, fill, NEED_INPUT
        block_type = read_u32(buf, pos, big_endian)
        if block_type == SHB_TYPE:
            return pos, n, fill, CONTROL
        block_len = np.int64(read_u32(buf, pos + 4, big_endian))
        if block_len < 12 or block_len % 4 != 0 or block_len > MAX_RECORD_BYTES:
            state[ERROR_CODE] = ERR_BLOCK_LENGTH
            state[ERROR_VALUE] = block_len
            return pos, n, fill, CORRUPT
        if block_type == IDB_TYPE:
            return pos, n, fill, CONTROL
        if end - pos < block_len:
            return pos, n, fill, NEED_INPUT
        if block_type == EPB_TYPE or block_type == OPB_TYPE or block_type == SPB_TYPE:
            if n_ifaces == 0:
                state[ERROR_CODE] = ERR_NO_INTERFACE
                state[ERROR_VALUE] = 0
                return pos, n, fill, CORRUPT
            if block_type == SPB_TYPE:
                if_id = 0
                orig = np.int64(read_u32(buf, pos + 8, big_endian))
                incl = min(orig, block_len - 16)
                if if_snaplen[0] > 0:
                    incl = min(incl, np.int64(if_snaplen[0]))
                start = pos + 12
                stamp = state[LAST_TS]
            else:
                if block_len < 32:
                    state[ERROR_CODE] = ERR_SHORT_PACKET_BLOCK
                    state[ERROR_VALUE] = block_len
                    return pos, n, fill, CORRUPT
                if block_type == EPB_TYPE:
                    if_id = np.int64(read_u32(buf, pos + 8, big_endian))
                else:
                    if_id = np.int64(read_u16(buf, pos + 8, big_endian))
                if if_id >= n_ifaces:
                    state[ERROR_CODE] = ERR_UNDEFINED_INTERFACE
                    state[ERROR_VALUE] = if_id
                    return pos, n, fill, CORRUPT
                units = (np.uint64(read_u32(buf, pos + 12, big_endian)) << np.uint64(32)) | np.uint64(
                    read_u32(buf, pos + 16, big_endian))
                incl = np.int64(read_u32(buf, pos + 20, big_endian))
                orig = np.int64(read_u32(buf, pos + 24, big_endian))
                if incl > block_len - 32:
                    state[ERROR_CODE] = ERR_CAPLEN
                    state[ERROR_VALUE] = incl
                    return pos, n, fill, CORRUPT
                start = pos + 28
                shift = if_ts_shift[if_id]
                if shift >= 0:
                    if shift > _MAX_BINARY_SHIFT:
                        units = units >> np.uint64(shift - _MAX_BINARY_SHIFT)
                        shift = np.int64(_MAX_BINARY_SHIFT)
                    whole = units >> np.uint64(shift)
                    part = units & ((np.uint64(1) << np.uint64(shift)) - np.uint64(1))
                    stamp = np.int64(whole) * 1_000_000_000 + np.int64((part * np.uint64(1_000_000_000)) >> np.uint64(shift))
                else:
                    stamp = np.int64(units) * if_ts_mul[if_id] // if_ts_div[if_id]
                stamp += if_ts_offset[if_id]
                state[LAST_TS] = stamp
            if not if_accept[if_id]:
                state[SKIPPED] += 1
                pos += block_len
                continue
            if fill + incl > capacity:
                return pos, n, fill, BATCH_FULL
            data[fill:fill + incl] = buf[start:start + incl]
            offset[n] = fill
            caplen[n] = incl
            wirelen[n] = min(orig, 0x7FFFFFFF)
            ts[n] = stamp
            iface[n] = if_global[if_id]
            fill += incl
            n += 1
            pos += block_len
            if fill >= batch_bytes:
                return pos, n, fill, BATCH_FULL
        else:
            pos += block_len


class _Section:
    """The interfaces of the current section, as the arrays the kernel reads."""

    def __init__(self):
        self.global_ids: list[int] = []
        self.snaplen: list[int] = []
        self.ts_mul: list[int] = []
        self.ts_div: list[int] = []
        self.ts_shift: list[int] = []
        self.ts_offset: list[int] = []
        self.accept: list[bool] = []
        self.arrays()

    def add(self, global_id: int, snaplen: int, tsresol: int, tsoffset_s: int, accept: bool) -> None:
        self.global_ids.append(global_id)
        self.snaplen.append(snaplen)
        if tsresol & 0x80:  # a power of two
            self.ts_mul.append(1), self.ts_div.append(1)
            self.ts_shift.append(min(tsresol & 0x7F, 63))
        else:  # a power of ten
            exp = tsresol
            self.ts_mul.append(10 ** max(0, 9 - exp))
            self.ts_div.append(10 ** min(max(0, exp - 9), 18))
            self.ts_shift.append(-1)
        self.ts_offset.append(max(-(2**62), min(2**62, tsoffset_s * 1_000_000_000)))
        self.accept.append(accept)
        self.arrays()

    def arrays(self) -> None:
        self.a_global = np.array(self.global_ids, dtype=np.int16)
        self.a_snaplen = np.array(self.snaplen, dtype=np.int64)
        self.a_mul = np.array(self.ts_mul, dtype=np.int64)
        self.a_div = np.array(self.ts_div, dtype=np.int64)
        self.a_shift = np.array(self.ts_shift, dtype=np.int64)
        self.a_offset = np.array(self.ts_offset, dtype=np.int64)
        self.a_accept = np.array(self.accept, dtype=np.bool_)


def _parse_idb(block: bytes, endian: str) -> tuple[int, int, str, int, int]:
    """(linktype, snaplen, name, tsresol, tsoffset seconds) of an IDB; bad options are ignored."""
    linktype, _reserved, snaplen = struct.unpack_from(endian + "HHI", block, 8)
    name, tsresol, tsoffset = "", 6, 0
    p, stop = 16, len(block) - 4
    while p + 4 <= stop:
        code, length = struct.unpack_from(endian + "HH", block, p)
        value = block[p + 4:p + 4 + length]
        if code == 0 or len(value) < length:
            break
        if code == OPT_IF_NAME:
            name = value.split(b"\0", 1)[0].decode("utf-8", "replace")
        elif code == OPT_IF_TSRESOL and length >= 1:
            tsresol = value[0]
        elif code == OPT_IF_TSOFFSET and length >= 8:
            tsoffset = struct.unpack(endian + "q", value[:8])[0]
        p += 4 + ((length + 3) & ~3)
    return linktype, snaplen, name, tsresol, tsoffset


_ERROR_TEXT = {
    ERR_BLOCK_LENGTH: "bad block length {value}",
    ERR_SHORT_PACKET_BLOCK: "packet block too short ({value} bytes)",
    ERR_UNDEFINED_INTERFACE: "packet block on undefined interface {value}",
    ERR_NO_INTERFACE: "packet block before any interface description block",
    ERR_CAPLEN: "packet block caplen {value} exceeds the block",
}


def read_pcapng(src: ChunkReader, path: str, batch_bytes: int,
                linktypes: frozenset[int] | None) -> Iterator[FrameBatch]:
    interfaces: list[Interface] = []
    section = _Section()
    big_endian = False
    state = np.zeros(4, dtype=np.int64)
    out = FrameBuffer(batch_bytes)
    packets = 0
    fault: str | None = None
    fault_at = 0
    while True:
        src.release_before(src.pos)  # the batches before this one are done with
        src.pos, out.n, out.fill, status = parse_pcapng_blocks(
            src.buf, src.pos, src.end, big_endian, section.a_global, section.a_snaplen,
            section.a_mul, section.a_div, section.a_shift, section.a_offset, section.a_accept, state,
            out.data, out.fill, out.offset, out.caplen, out.wirelen, out.ts, out.iface, out.n,
            out.batch_bytes)
        if status == BATCH_FULL:
            if out.n == 0:
                out.grow_data(MAX_RECORD_BYTES)
                continue
            packets += out.n
            yield out.take(interfaces, path)
        elif status == NEED_INPUT:
            need = 12
            if src.available >= 8:
                need = max(need, u32_at(src.buf, src.pos + 4, big_endian))
            if not src.fill(need):
                break
        elif status == CORRUPT:
            fault = _ERROR_TEXT[int(state[ERROR_CODE])].format(value=int(state[ERROR_VALUE]))
            fault_at = src.offset
            break
        else:  # CONTROL: a section header or an interface description
            block_type = u32_at(src.buf, src.pos, big_endian)
            if block_type == SHB_TYPE:
                if not src.ensure(12):
                    break
                bom = src.buf[src.pos + 8:src.pos + 12].tobytes()
                if bom == struct.pack(">I", BYTE_ORDER_MAGIC):
                    big_endian = True
                elif bom == struct.pack("<I", BYTE_ORDER_MAGIC):
                    big_endian = False
                else:
                    fault, fault_at = f"bad byte-order magic 0x{bom.hex()}", src.offset + 8
                    break
                block_len = u32_at(src.buf, src.pos + 4, big_endian)
                if block_len < 28 or block_len % 4 or block_len > MAX_RECORD_BYTES:
                    fault, fault_at = f"bad block length {block_len}", src.offset
                    break
                section = _Section()
            else:
                block_len = u32_at(src.buf, src.pos + 4, big_endian)
                if block_len < 20:
                    fault, fault_at = f"bad block length {block_len}", src.offset
                    break
            if not src.ensure(block_len):
                break
            if block_type == IDB_TYPE:
                endian = ">" if big_endian else "<"
                block = src.buf[src.pos:src.pos + block_len].tobytes()
                linktype, snaplen, name, tsresol, tsoffset = _parse_idb(block, endian)
                if len(interfaces) >= 32767:
                    fault, fault_at = "more than 32767 interfaces", src.offset
                    break
                section.add(len(interfaces), snaplen, tsresol, tsoffset,
                            linktypes is None or linktype in linktypes)
                interfaces.append(Interface(linktype=linktype, snaplen=snaplen, name=name))
            src.pos += block_len

    if out.n:
        packets += out.n
        yield out.take(interfaces, path)
    if fault is not None:
        raise CaptureError(path, fault, offset=fault_at, packets=packets)
    if src.error:
        raise CaptureError(path, src.error, offset=src.offset, packets=packets)
    if src.available:
        raise CaptureError(path, "truncated block", offset=src.offset, packets=packets)
    skipped = int(state[SKIPPED])
    if packets == 0 and skipped:
        kinds = sorted({i.linktype for i in interfaces if linktypes is not None and i.linktype not in linktypes})
        raise CaptureError(path, "unknown link type " + ", ".join(map(str, kinds)), packets=0)
