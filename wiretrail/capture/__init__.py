"""Packet sources: capture files (pcap, pcapng, gzip or zstd compressed) read as FrameBatches.

`iter_batches` detects the format from the magic number (never the file name), reads
the file in fixed-size chunks, and parses record headers in numba kernels: memory stays
bounded and no Python object is built per packet. A damaged file yields every whole
packet before the fault, then raises CaptureError with a one-line message.
"""

from __future__ import annotations

import struct
from collections.abc import Collection, Iterator

from wiretrail.batch import ASSIGNED_LINKTYPES, FrameBatch
from wiretrail.capture.pcap import PCAP_NSEC_MAGIC, PCAP_USEC_MAGIC, read_pcap
from wiretrail.capture.pcapng import SHB_TYPE, read_pcapng
from wiretrail.capture.source import DEFAULT_CHUNK_BYTES, open_reader
from wiretrail.errors import CaptureError

__all__ = ["iter_batches"]

_PCAP_MAGICS = {PCAP_USEC_MAGIC, PCAP_NSEC_MAGIC}
_SNOOP_MAGIC = b"snoop\0\0\0"


def iter_batches(path: str, batch_bytes: int = 16 << 20, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                 linktypes: Collection[int] | None = ASSIGNED_LINKTYPES) -> Iterator[FrameBatch]:
    """Yield the frames of the capture file `path` in batches of about `batch_bytes`.

    `linktypes` are the link types to deliver (default: every assigned one);
    a pcap file of another type is refused, and pcapng packets on interfaces of another
    type are skipped (an error if they were all the file had). None delivers every type.

    A batch's arrays belong to the reader: they stay valid while the next batch is read
    and are reused after that (pcap batches point straight into the read buffer, so no
    frame is copied). Copy what must outlive that.
    """
    path = str(path)
    accepted = None if linktypes is None else frozenset(linktypes)
    try:
        src = open_reader(path, chunk_bytes)
    except OSError as err:
        raise CaptureError(path, f"cannot open: {err.strerror or err}") from None
    try:
        src.fill(4)
        if src.available < 4:
            if src.error:
                raise CaptureError(path, src.error, offset=0)
            raise CaptureError(path, "empty file" if src.available == 0 else "not a capture file (too short)",
                               offset=0)
        head = src.buf[:8].tobytes()
        magic_le, magic_be = struct.unpack_from("<I", head)[0], struct.unpack_from(">I", head)[0]
        if magic_le in _PCAP_MAGICS or magic_be in _PCAP_MAGICS:
            reader = read_pcap(src, path, batch_bytes, accepted)
        elif magic_le == SHB_TYPE:
            reader = read_pcapng(src, path, batch_bytes, accepted)
        elif head == _SNOOP_MAGIC:
            raise CaptureError(path, "snoop capture files are not supported", offset=0)
        else:
            inner = f"{src.compression} file whose content is " if src.compression else ""
            raise CaptureError(path, f"{inner}not a capture file (magic 0x{head[:4].hex()})", offset=0)
        try:
            yield from reader
        except CaptureError:
            raise
        except Exception as err:  # a reader bug must still surface as one line for this file
            raise CaptureError(path, f"unreadable: {type(err).__name__}: {err}".splitlines()[0],
                               offset=src.offset) from err
    finally:
        src.close()
