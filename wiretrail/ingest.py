"""The file pipeline: capture files -> decode -> sessions -> packet store + metadata store.

One call per batch for every stage; Python runs per batch (and per closed session),
never per packet. Files of one command are one continuous stream: a session that
continues from one file into the next stays one session.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from wiretrail.batch import FRAG_NONE, VLAN_NONE, FrameBatch
from wiretrail.errors import CaptureError, WiretrailError


@dataclass
class IngestOptions:
    store: Path
    link: str | None = None            # link name for the files; default: pcapng if_name, else "default"
    link_by: str = "interface"         # "interface" or "vlan"
    store_filter: str | None = None    # BPF: only matching packets go to the packet store
    snaplen: int | None = None         # truncate stored packets
    session_packets: int | None = None  # store only the first N packets of each session
    session_bytes: int | None = None   # store only the first N bytes (frame bytes) of each session
    max_age_days: float | None = None  # age is packet time vs now: off by default for file ingest
    quota_bytes: int | None = None
    flush_seconds: float = 5.0         # buffered index/table rows go to disk at least this often
    app: bool = True                   # application layer: identification, reassembly, records
    identify: bool = True              # nDPI identification (records still come from ports without it)
    stream_depth: int = 1 << 20        # reassembled bytes kept per direction of a session
    community_id_seed: int = 0         # as Zeek's CommunityID::seed / Suricata's community-id-seed
    timeouts: dict = field(default_factory=dict)  # FlowTable timeouts in ns (idle_timeout_tcp, ...)
    progress: bool = False
    batch_bytes: int = 16 << 20          # frames per batch: 5% less CPU than 8 MB on mix.pcap, 43 MB more peak
    # hand the memory freed while ingesting back to the system at the end (malloc_trim: 8-11 ms
    # after mix.pcap); a caller that exits right after (the CLI) has no use for it
    release_memory: bool = True


@dataclass
class IngestReport:
    files: int = 0
    packets: int = 0
    bytes: int = 0
    stored_packets: int = 0
    sessions: int = 0
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)      # worth saying, not an error
    records: dict[str, int] = field(default_factory=dict)  # protocol records per table

    def summary(self) -> str:
        rate = self.packets / self.seconds if self.seconds > 0 else 0.0
        return (f"{self.files} file(s), {self.packets} packets ({self.bytes / 1e6:.1f} MB), "
                f"{self.sessions} sessions, {self.stored_packets} packets stored, "
                f"{self.seconds:.1f} s ({rate / 1e3:.0f} k packets/s)"
                + (f", {len(self.errors)} file(s) with errors" if self.errors else "")
                + ("\nrecords: " + ", ".join(f"{k} {v}" for k, v in sorted(self.records.items()))
                   if self.records else ""))


class LinkMapper:
    """Maps each packet to a virtual link id (int16) by interface name or by VLAN."""

    def __init__(self, link_by: str, default_name: str | None):
        self.link_by = link_by
        self.default_name = default_name
        self.names: list[str] = []
        self._ids: dict[str, int] = {}

    def _id(self, name: str) -> int:
        if name not in self._ids:
            if len(self.names) >= 32767:
                raise WiretrailError("more than 32767 distinct links")
            self._ids[name] = len(self.names)
            self.names.append(name)
        return self._ids[name]

    def map(self, batch: FrameBatch, cols: dict[str, np.ndarray]) -> np.ndarray:
        if self.link_by == "vlan":
            vlan = cols["vlan"]
            uniq, inverse = np.unique(vlan, return_inverse=True)
            ids = np.array([self._id("untagged" if v == VLAN_NONE else f"vlan{int(v)}") for v in uniq],
                           dtype=np.int16)
            return ids[inverse]
        ids = np.array([self._id(self._iface_name(batch, i)) for i in range(len(batch.interfaces))] or [0],
                       dtype=np.int16)
        if len(ids) == 1:  # one interface: a fill, not a gather
            return np.full(len(batch), ids[0], dtype=np.int16)
        return ids[batch.iface]

    def _iface_name(self, batch: FrameBatch, i: int) -> str:
        if self.default_name:
            return self.default_name if len(batch.interfaces) <= 1 else f"{self.default_name}{i}"
        name = batch.interfaces[i].name if i < len(batch.interfaces) else ""
        return name or "default"


def _use_jemalloc() -> None:
    """Arrow's default pool (mimalloc) keeps freed pages; jemalloc hands them back, which
    keeps a long ingest's memory flat (measured: about 60 MB less peak on mix.pcap)."""
    import pyarrow as pa

    try:
        pa.set_memory_pool(pa.jemalloc_memory_pool())
    except (NotImplementedError, AttributeError):  # a pyarrow built without jemalloc
        pass


# Idle and finished sessions are looked for every this many batches (16 MB of capture each):
# what a kill -9 can lose grows by as much.
EXPIRE_BATCHES = 4


class Pipeline:
    """Holds the state that spans batches and files: flow table, fragments, writers."""

    def __init__(self, opts: IngestOptions):
        from wiretrail.decode.fragments import FragmentReassembler
        from wiretrail.sessions.flowtable import FlowTable
        from wiretrail.sessions.schema import SESSIONS_SCHEMA
        from wiretrail.store.index import IndexWriter
        from wiretrail.store.metadata import TableWriter, register_schema, remove_stale_parts
        from wiretrail.store.packets import PacketWriter

        self.opts = opts
        self.report = IngestReport()
        _use_jemalloc()
        root = Path(opts.store)
        root.mkdir(parents=True, exist_ok=True)
        register_schema("sessions", SESSIONS_SCHEMA)
        self.links = LinkMapper(opts.link_by, opts.link)
        self.flows = FlowTable(link_names=self.links.names, community_id_seed=opts.community_id_seed,
                               **opts.timeouts)
        self.fragments = FragmentReassembler()
        self.packets = PacketWriter(root)  # takes the store's writer lock
        remove_stale_parts(root)
        self.index = IndexWriter(root, flush_seconds=opts.flush_seconds)
        self.tables = TableWriter(root, flush_seconds=opts.flush_seconds)
        self.app = None
        if opts.app:
            from wiretrail.app.stage import AppStage

            self.app = AppStage(identify=opts.identify, depth=opts.stream_depth)
            for name, schema in self.app.tables().items():
                register_schema(name, schema)
            if self.app.identify_error:
                self.report.notes.append(self.app.identify_error)
        self._bpf: dict[int, np.ndarray] = {}
        self._frag_pos: dict[int, tuple[int, int, int]] = {}  # tag -> (file_id, offset, link)
        self._next_tag = 0
        self.file_packets = 0        # packets of the current file so far (records' packet numbers)
        self._batches_since_expire = 0
        self._last_ts = 0            # the last batch's latest packet time (expiry's now)

    # --- store policy -------------------------------------------------------------------
    def _filter_mask(self, batch: FrameBatch) -> np.ndarray | None:
        if not self.opts.store_filter:
            return None
        from wiretrail.capture.bpf import bpf_match, compile_bpf

        keep = np.zeros(len(batch), dtype=bool)
        for lt in np.unique(batch.linktype):
            lt = int(lt)
            if lt not in self._bpf:
                self._bpf[lt] = compile_bpf(self.opts.store_filter, lt)
            rows = np.nonzero(batch.linktype == lt)[0]
            sub = bpf_match(self._bpf[lt], batch.data, batch.offset[rows], batch.caplen[rows], batch.wirelen[rows])
            keep[rows] = sub
        return keep

    def _session_caps(self, sid: np.ndarray, seq: np.ndarray, cum_bytes: np.ndarray) -> np.ndarray | None:
        if self.opts.session_packets is None and self.opts.session_bytes is None:
            return None
        keep = np.ones(len(sid), dtype=bool)
        has = sid >= 0
        if self.opts.session_packets is not None:
            keep &= ~has | (seq < self.opts.session_packets)
        if self.opts.session_bytes is not None:
            keep &= ~has | (cum_bytes <= self.opts.session_bytes)
        return keep

    # --- one batch ----------------------------------------------------------------------
    def process(self, batch: FrameBatch) -> None:
        from wiretrail.decode import decode

        n = len(batch)
        if n == 0:
            return
        cols = decode(batch)
        link = self.links.map(batch, cols)
        sid, is_orig, seq, cum_bytes, row = self.flows.update(cols, batch.ts, batch.wirelen, link)
        if self.app is not None:
            self.app.process(batch, cols, sid, is_orig, seq, row, first_packet=self.file_packets + 1)
        self.file_packets += n

        keep = self._filter_mask(batch)
        caps = self._session_caps(sid, seq, cum_bytes)
        if caps is not None:
            keep = caps if keep is None else keep & caps
        file_id, file_off = self.packets.write(batch, link, self.links.names, keep, self.opts.snaplen)
        stored = file_off >= 0
        self.report.stored_packets += int(stored.sum())

        indexed = stored & (sid >= 0)
        if indexed.all():  # the usual case: no copies
            self.index.append(sid, file_id, file_off)
        else:
            self.index.append(sid[indexed], file_id[indexed], file_off[indexed])
        self._tunnel_sessions(batch, cols, link, file_id, file_off)
        self._fragments(batch, cols, link, file_id, file_off)

        self.report.packets += n
        self.report.bytes += int(batch.caplen.sum())
        # Sessions are closed every EXPIRE_BATCHES batches, not after each: a close has a cost of
        # its own (building the sessions table; in the application stage a few dozen array and
        # table operations per protocol table), which a close per batch paid 29 times on
        # mix.pcap. When does not change what: update() splits a session on the same timeouts
        # when its next packet comes, and session ids are never reused.
        self._last_ts = int(batch.ts.max())
        self._batches_since_expire += 1
        if self._batches_since_expire >= EXPIRE_BATCHES:
            self._batches_since_expire = 0
            self._close(self.flows.expire(self._last_ts))
        self.index.maybe_flush()
        self.tables.maybe_flush()

    def _tunnel_sessions(self, batch, cols, link, file_id, file_off) -> None:
        """UDP tunnels are sessions too (sessions.tunnels); their packets are indexed under both."""
        from wiretrail.sessions.tunnels import tunnel_sessions

        rows, osid = tunnel_sessions(self.flows, batch, cols, link,
                                     self.app.identify if self.app is not None else None)
        ok = (osid >= 0) & (file_off[rows] >= 0)
        if ok.any():
            self.index.append(osid[ok], file_id[rows][ok], file_off[rows][ok])

    def _fragments(self, batch, cols, link, file_id, file_off) -> None:
        """Reassemble IP fragments; the reassembled datagram joins its session, and every
        stored fragment is indexed under that session."""
        rows = np.nonzero(cols["frag"] != FRAG_NONE)[0]
        if len(rows) == 0:
            return
        tags = np.arange(self._next_tag, self._next_tag + len(rows), dtype=np.int64)
        self._next_tag += len(rows)
        for tag, r in zip(tags.tolist(), rows.tolist()):  # per fragment: fragments are rare
            self._frag_pos[tag] = (int(file_id[r]), int(file_off[r]), int(link[r]))
        whole, parts = self.fragments.add(batch, cols, rows, tags)
        if len(whole):
            from wiretrail.decode import decode

            wcols = decode(whole)
            wlink = np.array([self._frag_pos[int(p[0])][2] for p in parts], dtype=np.int16)
            wsid, wis_orig, wseq, _, wrow = self.flows.update(wcols, whole.ts, whole.wirelen, wlink)
            if self.app is not None:
                self.app.process(whole, wcols, wsid, wis_orig, wseq, wrow)
            for s, p in zip(wsid.tolist(), parts):
                self._index_fragments(s, p)
        for p in self.fragments.expire(int(batch.ts.max())):
            self._index_fragments(-1, p)

    def _index_fragments(self, sid: int, tags) -> None:
        pos = [self._frag_pos.pop(int(t)) for t in tags]
        if sid < 0:
            return
        pos = [p for p in pos if p[1] >= 0]
        if pos:
            arr = np.array(pos, dtype=np.int64)
            self.index.append(np.full(len(arr), sid, dtype=np.int64), arr[:, 0].astype(np.int32), arr[:, 1])

    def _close(self, sessions) -> None:
        if sessions is None or not sessions.num_rows:
            return
        records = {}
        if self.app is not None:
            sessions, records = self.app.close(sessions)
        self.report.sessions += sessions.num_rows
        self.tables.append("sessions", sessions)
        self._records(records)

    def _records(self, records: dict) -> None:
        for name, table in records.items():
            self.report.records[name] = self.report.records.get(name, 0) + table.num_rows
            self.tables.append(name, table)

    def finish(self) -> None:
        for p in self.fragments.expire(None):
            self._index_fragments(-1, p)
        # those past their timeouts at the last packet close as timed out (as they would have
        # at the next expiry), the others as still open at the end of input
        self._close(self.flows.expire(self._last_ts, scan=True))
        self._close(self.flows.flush())
        if self.app is not None:
            self._records(self.app.finish())
            if self.app.parser_errors:  # a parser raised (a bug): those sessions lost their records
                self.report.notes.append(f"{self.app.parser_errors} protocol parser error(s): the records of "
                                         "those sessions were dropped")
            if self.app.bad_rows:  # a parser wrote a value its column cannot hold: say where
                self.report.notes.append("records dropped (a value out of its column's range): "
                                         + ", ".join(f"{k} {v}" for k, v in sorted(self.app.bad_rows.items())))
        self.packets.close()
        self.index.close()
        self.tables.close()


def _progress(opts: IngestOptions, paths: list[Path]):
    if not opts.progress:
        return None
    from tqdm import tqdm

    total = sum(p.stat().st_size for p in paths if p.is_file())
    return tqdm(total=total, unit="B", unit_scale=True, desc="ingest", leave=False)


# glibc malloc's M_TRIM_THRESHOLD and M_MMAP_THRESHOLD (malloc.h), and their defaults
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_DEFAULT_THRESHOLD = 128 << 10


def _malloc_keeps_freed(keep: bool, trim: bool = True) -> None:
    """While ingesting, glibc's malloc keeps the memory freed (its heap is not trimmed, and
    blocks up to 32 MB come from it, not from a mapping of their own): each batch's arrays
    then land on pages an earlier batch touched. Otherwise they were mostly fresh pages, each
    a page fault that zeroes it (3 us apiece on these machines): 98,000 faults per ingest of
    mix.pcap against 82,000. Afterwards the defaults are set back and, with `trim`, the heap's
    free top handed back (malloc_trim). Does nothing where the C library is not glibc."""
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        mallopt, malloc_trim = libc.mallopt, libc.malloc_trim
    except (OSError, AttributeError):
        return
    if keep:
        mallopt(_M_MMAP_THRESHOLD, 32 << 20)  # the largest value glibc accepts everywhere
        mallopt(_M_TRIM_THRESHOLD, 1 << 30)
    else:
        mallopt(_M_MMAP_THRESHOLD, _DEFAULT_THRESHOLD)
        mallopt(_M_TRIM_THRESHOLD, _DEFAULT_THRESHOLD)
        if trim:
            malloc_trim(0)


def ingest(paths: list[Path], opts: IngestOptions) -> IngestReport:
    """Ingest capture files; a bad file is reported and skipped, the others still go in."""
    from wiretrail.capture import iter_batches

    paths = [Path(p) for p in paths]
    started = time.monotonic()
    pipe = Pipeline(opts)
    bar = _progress(opts, paths)
    failure: WiretrailError | None = None
    # Fewer garbage collections while ingesting: per batch the objects are few and large, and
    # at the default threshold (700 allocations) the collector walked the application layer's
    # records over and over. Put back afterwards: the caller may be a longer-lived program.
    thresholds = gc.get_threshold()
    gc.set_threshold(50_000, 20, 20)
    _malloc_keeps_freed(True)
    try:
        for path in paths:
            if not path.is_file():
                pipe.report.errors.append(f"{path}: no such file" if not path.exists() else f"{path}: not a file")
                continue
            pipe.file_packets = 0
            try:
                for batch in iter_batches(str(path), batch_bytes=opts.batch_bytes):
                    pipe.process(batch)
                    if bar is not None:
                        bar.update(int(batch.caplen.sum()) + 16 * len(batch))
            except CaptureError as err:
                pipe.report.errors.append(str(err))
            pipe.report.files += 1
    except WiretrailError as err:  # the store cannot be written (disk full, ...): stop, keep what is in
        failure = err
    finally:
        if bar is not None:
            bar.close()
        try:
            pipe.finish()
        except WiretrailError as err:
            failure = failure or err
        gc.set_threshold(*thresholds)
        _malloc_keeps_freed(False, trim=opts.release_memory)
    if failure is not None:
        raise failure
    if opts.max_age_days is not None or opts.quota_bytes is not None:
        from wiretrail.store import retention

        retention.enforce(opts.store, max_age_days=opts.max_age_days, quota_bytes=opts.quota_bytes)
    pipe.report.seconds = time.monotonic() - started
    return pipe.report

