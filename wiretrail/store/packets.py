"""The packet store: every kept frame, appended to rotating capture files.

    packets/<link>/<YYYYMMDD>/<HH>/<file_id>.pcap

One open file per (link, link type); a file takes the packets of one hour (the hour of its
first packet: a packet a little out of time order goes into the file that is open) and
rotates at `max_file_bytes`. `file_id` is a store-wide number, so the packet index holds
(file_id, byte offset) and a file is found from its name alone. Each batch is laid out by
one kernel and written with one write per file, then flushed: after `write` returns, a
`kill -9` of the process cannot lose it.
"""

from __future__ import annotations

import calendar
import errno
import fcntl
import mmap
import os
import re
import time
from pathlib import Path

import numpy as np

from wiretrail.batch import HOUR_NS, FrameBatch
from wiretrail.errors import WiretrailError
from wiretrail.store.pcapfile import RECORD_HEADER_LEN, pcap_header, pcap_records

PACKETS_DIR = "packets"
_UNSAFE = re.compile(r"[^A-Za-z0-9._@+=-]")


def link_dir_name(link: str) -> str:
    """A link name made safe as one directory name (interface names may hold odd characters)."""
    name = _UNSAFE.sub("_", link) or "default"
    return "_" + name if name.startswith(".") else name


def hour_dir(hour: int) -> str:
    """YYYYMMDD/HH of an hour since the epoch."""
    return time.strftime("%Y%m%d/%H", time.gmtime(hour * 3600))


def hour_dirs(root: Path) -> list[tuple[int, str, Path]]:
    """Every (hour since the epoch, link directory name, directory) of the packet store
    (hour_dir's inverse)."""
    out = []
    for hh in (Path(root) / PACKETS_DIR).glob("*/*/*"):
        try:
            hour = calendar.timegm(time.strptime(hh.parent.name + hh.name, "%Y%m%d%H")) // 3600
        except ValueError:
            continue
        out.append((hour, hh.parent.parent.name, hh))
    return out


def file_paths(root: Path) -> dict[int, Path]:
    """Every capture file of the store by file id."""
    out = {}
    for p in (Path(root) / PACKETS_DIR).glob("*/*/*/*.pcap"):
        if p.stem.isdigit():
            out[int(p.stem)] = p
    return out


_BLOCK = 4096                # O_DIRECT alignment (file offsets, lengths, buffer addresses)
# An open file's staging buffer: appended bytes go out in O_DIRECT writes of at most its
# size. Fewer, larger writes cost less system time (440 MB written here: 0.046 CPU s in 1 MB
# writes, 0.028 s in 4 MB ones), so the first few files open at once get 4 MB; past them each
# gets 1 MB, which bounds the memory however many links (VLANs) are open.
_STAGE_BYTES, _STAGE_FILES, _SMALL_STAGE_BYTES = 4 << 20, 4, 1 << 20


class _OpenFile:
    """One capture file being appended to.

    Written with O_DIRECT where the filesystem allows it, as Arkime writes its pcap files:
    packets bypass the page cache, so a store written at line rate neither evicts
    everything else nor makes the writer pay for page-cache writeback (measured here:
    0.01 s of system time for 470 MB, against 0.1 to 0.9 s buffered). Data goes through
    an aligned staging buffer; the last, partial block is written padded with zeros and
    written again, completed, by the next append. `close` cuts the file to its real size;
    a file left by a killed writer may end in up to one block of zeros.
    """

    def __init__(self, file_id: int, path: Path, hour: int, linktype: int, nanosecond: bool,
                 stage: np.ndarray | int = _STAGE_BYTES):
        self.file_id = file_id
        self.path = path
        self.hour = hour
        self.linktype = linktype
        path.parent.mkdir(parents=True, exist_ok=True)
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        try:
            self.fd = os.open(path, flags | getattr(os, "O_DIRECT", 0))
        except OSError as err:
            if err.errno != errno.EINVAL:  # tmpfs and a few others refuse O_DIRECT
                raise
            self.fd = os.open(path, flags)
        # page-aligned: a new one of `stage` bytes, or a closed file's when the file replaces
        # one (its pages already in memory)
        self.stage = stage if isinstance(stage, np.ndarray) else np.frombuffer(
            mmap.mmap(-1, stage, flags=mmap.MAP_PRIVATE), dtype=np.uint8)
        self.pending = 0      # bytes in stage, starting at file offset block_pos
        self.block_pos = 0
        self.size = 0
        self.append(np.frombuffer(pcap_header(linktype, 262144, nanosecond), dtype=np.uint8))

    def append(self, records: np.ndarray) -> int:
        """Append bytes; returns the file offset where they start."""
        start = self.size
        done, n = 0, len(records)
        while done < n:
            take = min(n - done, len(self.stage) - self.pending)
            self.stage[self.pending:self.pending + take] = records[done:done + take]
            self.pending += take
            done += take
            self._write_stage()
        self.size += n
        return start

    def _write_stage(self) -> None:
        padded = -(-self.pending // _BLOCK) * _BLOCK
        self.stage[self.pending:padded] = 0
        view = memoryview(self.stage)[:padded]
        pos = self.block_pos
        while view:
            written = os.pwrite(self.fd, view, pos)
            view, pos = view[written:], pos + written
        whole = self.pending // _BLOCK * _BLOCK  # keep the partial block for the next write
        if whole:
            rest = self.pending - whole
            self.stage[:rest] = self.stage[whole:self.pending]
            self.block_pos += whole
            self.pending = rest

    def close(self) -> None:
        try:
            os.ftruncate(self.fd, self.size)
        finally:
            os.close(self.fd)


class PacketWriter:
    """Appends batches to the store's capture files; returns where each packet went.

    One writer per store at a time (file ids are numbered by the writer): a second one
    fails at once with a clear message instead of interleaving its files with the first's.
    """

    def __init__(self, root: Path, max_file_bytes: int = 1 << 30):
        self.root = Path(root)
        self.max_file_bytes = max_file_bytes
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = open(self.root / ".writer.lock", "a")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock.close()
            raise WiretrailError(f"{self.root} is being written by another wiretrail process") from None
        ids = file_paths(self.root)
        self.next_id = max(ids, default=-1) + 1
        self.open: dict[tuple[int, int, bool], _OpenFile] = {}
        self.link_names: list[str] = []
        self._out = np.empty(0, dtype=np.uint8)  # record buffer reused across batches

    def _file(self, link: int, linktype: int, nanosecond: bool, hour: int) -> _OpenFile:
        cur = self.open.get((link, linktype, nanosecond))
        if cur is not None and cur.hour >= hour and cur.size < self.max_file_bytes:
            return cur
        if cur is not None:
            cur.close()
            hour = max(hour, cur.hour)
        name = self.link_names[link] if link < len(self.link_names) else f"link{link}"
        path = self.root / PACKETS_DIR / link_dir_name(name) / hour_dir(hour) / f"{self.next_id:010d}.pcap"
        try:
            stage = cur.stage if cur is not None else (
                _STAGE_BYTES if len(self.open) < _STAGE_FILES else _SMALL_STAGE_BYTES)
            new = _OpenFile(self.next_id, path, hour, linktype, nanosecond, stage)
        except OSError as err:
            raise WiretrailError(f"cannot write the packet store: {err.strerror}: {path}") from None
        self.next_id += 1
        self.open[(link, linktype, nanosecond)] = new
        return new

    def write(self, batch: FrameBatch, link: np.ndarray, link_names: list[str], keep: np.ndarray | None,
              snaplen: int | None) -> tuple[np.ndarray, np.ndarray]:
        """Store the frames of `batch` where `keep` (all if None), truncated to `snaplen`.

        Returns (file_id int32[n], record offset int64[n]); both -1 for frames not stored.
        """
        n = len(batch)
        self.link_names = link_names
        file_id = np.full(n, -1, dtype=np.int32)
        file_off = np.full(n, -1, dtype=np.int64)
        # The rows are a slice when every frame is kept (the usual case): the columns are then
        # read as views, not gathered whole for each batch.
        rows = slice(0, n) if keep is None or keep.all() else np.flatnonzero(keep)
        group = link[rows].astype(np.int64) << 16 | batch.linktype[rows].astype(np.int64)
        if len(group) == 0:
            return file_id, file_off
        snap = (1 << 30) if snaplen is None else int(snaplen)
        # almost always one link and one link type: skip np.unique's hashing then
        if group.min() == group.max():
            self._write_group(batch, int(group[0]) >> 16, int(group[0]) & 0xFFFF, rows, snap, file_id, file_off)
            return file_id, file_off
        at = np.arange(n, dtype=np.int64)[rows]
        for g in np.unique(group).tolist():
            self._write_group(batch, g >> 16, g & 0xFFFF, at[group == g], snap, file_id, file_off)
        return file_id, file_off

    def _write_group(self, batch, link, linktype, rows, snap, file_id, file_off) -> None:
        """Write frames `rows` (a slice or an index array, in batch order) of one link and link
        type."""
        # A file holds one hour: cut the rows where the (never decreasing) hour moves on.
        hours = np.maximum.accumulate(batch.ts[rows] // HOUR_NS)
        cuts = [0, *(np.flatnonzero(np.diff(hours)) + 1).tolist(), len(hours)]
        # Frames read from a little-endian pcap keep that file's timestamp resolution, so
        # runs of whole records can be written as they lie in the read buffer.
        nanosecond = batch.pcap_record_frac_ns != 1000
        for lo, hi in zip(cuts[:-1], cuts[1:]):
            seg_rows = slice(rows.start + lo, rows.start + hi) if isinstance(rows, slice) else rows[lo:hi]
            records, rec_off = self._as_is(batch, seg_rows, snap)
            if records is None:
                at = np.arange(seg_rows.start, seg_rows.stop) if isinstance(seg_rows, slice) else seg_rows
                need = int(np.minimum(batch.caplen[at], snap).sum()) + 16 * len(at)
                if len(self._out) < need:
                    self._out = np.empty(need + need // 4, dtype=np.uint8)
                records, rec_off = pcap_records(batch.data, batch.offset, batch.caplen, batch.wirelen, batch.ts,
                                                at, snap, nanosecond=nanosecond, out=self._out)
            f = self._file(link, linktype, nanosecond, int(hours[lo]))
            try:
                start = f.append(records)
            except OSError as err:
                raise WiretrailError(f"cannot write the packet store: {err.strerror}: {f.path}") from None
            file_id[seg_rows] = f.file_id
            file_off[seg_rows] = start + rec_off

    @staticmethod
    def _as_is(batch: FrameBatch, rows, snap: int):
        """(records, offsets) when `rows` are whole, adjacent pcap records in the batch's buffer
        (see FrameBatch.pcap_record_frac_ns); (None, None) when they must be laid out anew."""
        if not batch.pcap_record_frac_ns:
            return None, None
        off, cap = batch.offset[rows], batch.caplen[rows]
        if int(cap.max()) > snap or not np.array_equal(off[1:], off[:-1] + cap[:-1] + RECORD_HEADER_LEN):
            return None, None
        start = int(off[0]) - RECORD_HEADER_LEN
        return batch.data[start:int(off[-1] + cap[-1])], off - RECORD_HEADER_LEN - start

    def close(self) -> None:
        for f in self.open.values():
            f.close()
        self.open.clear()
        if not self._lock.closed:
            self._lock.close()  # releases the lock
