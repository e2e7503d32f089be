"""Packets back out of the store: one session's (index lookup and seeks), or a BPF selection
over a time range (only the hours in range are read)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from wiretrail.batch import HOUR_NS
from wiretrail.errors import CaptureError, WiretrailError
from wiretrail.sessions.flowtable import sid_of_uid
from wiretrail.store.index import lookup
from wiretrail.store.packets import PACKETS_DIR, file_paths, hour_dirs
from wiretrail.store.pcapfile import RECORD_HEADER_LEN, CaptureOutput, read_pcap_header

def _open_output(out: Path):
    try:
        return open(out, "wb")
    except OSError as err:
        raise WiretrailError(f"cannot write {out}: {err.strerror}") from None


def _link_of(path: Path, root: Path) -> str:
    return path.relative_to(Path(root) / PACKETS_DIR).parts[0]


def extract_session(store: Path, uid: str, out: Path, fmt: str = "pcap") -> int:
    """Write session `uid`'s stored packets, in capture order, to `out`; returns the count."""
    store = Path(store)
    if not store.is_dir():
        raise WiretrailError(f"no store at {store}")
    sid = sid_of_uid(uid)
    rows = lookup(store, sid)
    if rows.num_rows == 0:
        raise WiretrailError(f"no stored packets for session {uid} (unknown uid, or its packets were "
                             "not kept or have expired)")
    file_id = rows.column("file_id").to_numpy()
    offset = rows.column("offset").to_numpy()
    paths = file_paths(store)
    frames: list[tuple[int, str, int, np.ndarray, np.ndarray, list[bytes]]] = []
    for fid in np.unique(file_id):  # sorted: file ids grow with capture order
        path = paths.get(int(fid))
        if path is None:
            continue  # removed by retention since
        sel = np.flatnonzero(file_id == fid)
        with open(path, "rb") as f:
            linktype, snaplen, frac_ns = read_pcap_header(f)
            ts, wire, data = _read_records(f, offset[sel], frac_ns)
        frames.append((linktype, _link_of(path, store), snaplen, ts, wire, data))
    nanosecond = any(bool(np.any(fr[3] % 1000)) for fr in frames)
    with _open_output(out) as f:
        output = CaptureOutput(f, fmt, nanosecond=nanosecond)
        for linktype, link, snaplen, t, wire, data in frames:
            output.write(linktype, link, snaplen, t, wire, data)
    return output.count


def _read_records(f, offsets: np.ndarray, frac_ns: int) -> tuple[np.ndarray, np.ndarray, list[bytes]]:
    """Read the records at `offsets` (sorted) of an open store file: (times in ns, wire lengths,
    frames). `frac_ns`: ns per unit of the header's fraction (1000 in a microsecond file)."""
    fd = f.fileno()
    ts = np.empty(len(offsets), dtype=np.int64)
    wire = np.empty(len(offsets), dtype=np.int64)
    frames = []
    for k, off in enumerate(offsets.tolist()):
        head = os.pread(fd, RECORD_HEADER_LEN, off)
        hdr = np.frombuffer(head, dtype="<u4")
        if len(hdr) < 4:
            raise WiretrailError(f"{f.name}: packet record at offset {off} is cut short")
        frames.append(os.pread(fd, int(hdr[2]), off + RECORD_HEADER_LEN))
        ts[k] = int(hdr[0]) * 1_000_000_000 + int(hdr[1]) * frac_ns
        wire[k] = hdr[3]
    return ts, wire, frames


def extract_filter(store: Path, bpf: str, start: int | None, end: int | None, out: Path,
                   fmt: str = "pcap", links: list[str] | str | None = None) -> int:
    """Write the stored packets that match BPF filter `bpf` with start <= ts < end (ns since the
    epoch, None = open) to `out`, in time order; only the hour directories in range are read."""
    from wiretrail.capture import iter_batches
    from wiretrail.capture.bpf import bpf_match, compile_bpf

    store = Path(store)
    if not store.is_dir():
        raise WiretrailError(f"no store at {store}")
    if isinstance(links, str):
        links = [links]
    lo_hour = None if start is None else start // HOUR_NS - 1  # a file may start just before the hour
    hi_hour = None if end is None else end // HOUR_NS
    by_hour: dict[int, list[Path]] = {}
    for hour, link, directory in hour_dirs(store):
        if links and link not in links:
            continue
        if (lo_hour is None or hour >= lo_hour) and (hi_hour is None or hour <= hi_hour):
            by_hour.setdefault(hour, []).extend(sorted(directory.glob("*.pcap")))
    programs: dict[int, np.ndarray] = {}
    if bpf:
        compile_bpf(bpf, 1)  # a bad filter fails before any output is written
    with _open_output(out) as f:
        output = CaptureOutput(f, fmt, nanosecond=True)
        for hour in sorted(by_hour):
            picked = []  # one hour's matches from every file, merged in time order below
            for path in by_hour[hour]:
                link = _link_of(path, store)
                try:
                    for batch in iter_batches(str(path)):
                        # an all-zero record is the padding a killed writer can leave (store.packets)
                        sel = (batch.wirelen > 0) | (batch.caplen > 0)
                        if start is not None:
                            sel &= batch.ts >= start
                        if end is not None:
                            sel &= batch.ts < end
                        if bpf and sel.any():
                            lt = int(batch.interfaces[0].linktype)
                            if lt not in programs:
                                programs[lt] = compile_bpf(bpf, lt)
                            sel &= bpf_match(programs[lt], batch.data, batch.offset, batch.caplen, batch.wirelen)
                        for i in np.flatnonzero(sel).tolist():
                            o, n = int(batch.offset[i]), int(batch.caplen[i])
                            picked.append((int(batch.ts[i]), batch.interfaces[0].linktype, link,
                                           int(batch.wirelen[i]), batch.data[o:o + n].tobytes()))
                except CaptureError:
                    pass  # a file cut short by a crash: its whole records were used
            picked.sort(key=lambda p: p[0])
            for p in picked:
                output.write(p[1], p[2], 262144, np.array([p[0]]), np.array([p[3]]), [p[4]])
    return output.count
