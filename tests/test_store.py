"""The store on its own: capture files, packet index, Parquet tables, retention, extraction."""

from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from wiretrail.batch import HOUR_NS, SID_HOUR_SHIFT, FrameBatch, Interface
from wiretrail.errors import WiretrailError
from wiretrail.sample import generate
from wiretrail.store import retention
from wiretrail.store.extract import extract_session, sid_of_uid
from wiretrail.store.index import IndexWriter, lookup
from wiretrail.store.metadata import TableWriter, open_db, register_schema
from wiretrail.store.packets import PacketWriter, file_paths

T0 = 1_714_557_600 * 1_000_000_000  # 2024-05-01 10:00 UTC


def batch_of(frames: list[tuple[int, bytes]], linktype: int = 1) -> FrameBatch:
    data = np.frombuffer(b"".join(f for _, f in frames), dtype=np.uint8)
    caplen = np.array([len(f) for _, f in frames], dtype=np.int32)
    offset = np.zeros(len(frames), dtype=np.int64)
    offset[1:] = np.cumsum(caplen)[:-1]
    return FrameBatch(data=data, offset=offset, caplen=caplen, wirelen=caplen + 0,
                      ts=np.array([t for t, _ in frames], dtype=np.int64),
                      iface=np.zeros(len(frames), dtype=np.int16),
                      linktype=np.full(len(frames), linktype, dtype=np.uint16),
                      interfaces=[Interface(linktype)])


def read_pcap(path: Path) -> list[tuple[int, bytes, int]]:
    """An independent reader of the store's files: (ts ns, frame, wirelen) per record."""
    raw = path.read_bytes()
    magic = struct.unpack_from("<I", raw)[0]
    mult = {0xA1B23C4D: 1, 0xA1B2C3D4: 1000}[magic]
    out, pos = [], 24
    while pos + 16 <= len(raw):
        sec, frac, incl, orig = struct.unpack_from("<IIII", raw, pos)
        out.append((sec * 1_000_000_000 + frac * mult, raw[pos + 16:pos + 16 + incl], orig))
        pos += 16 + incl
    assert pos == len(raw)
    return out


def test_packet_files_round_trip_rotate_and_tcpdump_reads_them(tmp_path):
    frames, _ = generate(sessions=300, seed=3)
    fid, off = [], []
    w = PacketWriter(tmp_path, max_file_bytes=64 << 10)  # a file may overshoot by one batch
    for k in range(0, len(frames), 100):
        batch = batch_of(frames[k:k + 100])
        link = np.where(np.arange(k, k + len(batch)) % 3 == 0, 1, 0).astype(np.int16)
        f, o = w.write(batch, link, ["eth0", "vlan 20/x"], None, None)
        fid.append(f)
        off.append(o)
    w.close()
    fid, off = np.concatenate(fid), np.concatenate(off)
    files = file_paths(tmp_path)
    assert len(files) > 4  # rotated by size and by hour (the sample spans two hours)
    assert {p.parts[-4] for p in files.values()} == {"eth0", "vlan_20_x"}
    hours = {(p.parts[-3], p.parts[-2]) for p in files.values()}
    assert ("20240501", "10") in hours and ("20240501", "11") in hours
    by_file = {fid_: read_pcap(p) for fid_, p in files.items()}
    got = 0
    for i, (t, frame) in enumerate(frames):
        recs = by_file[int(fid[i])]
        # offsets are record starts: find the record by offset
        pos = 24
        for rec in recs:
            if pos == off[i]:
                assert rec == (t, frame, len(frame))
                got += 1
                break
            pos += 16 + len(rec[1])
    assert got == len(frames)
    some = next(iter(files.values()))
    r = subprocess.run(["tcpdump", "-nn", "-r", str(some)], capture_output=True, text=True)
    assert r.returncode == 0 and len(r.stdout.splitlines()) == len(read_pcap(some))


def test_keep_mask_snaplen_and_second_writer_refused(tmp_path):
    frames, _ = generate(sessions=20, seed=1)
    batch = batch_of(frames)
    keep = np.arange(len(batch)) % 2 == 0
    w = PacketWriter(tmp_path)
    with pytest.raises(WiretrailError, match="another wiretrail process"):
        PacketWriter(tmp_path)
    fid, off = w.write(batch, np.zeros(len(batch), np.int16), ["x"], keep, 40)
    w.close()
    assert (fid[~keep] == -1).all() and (off[~keep] == -1).all() and (fid[keep] >= 0).all()
    recs = [r for _, p in sorted(file_paths(tmp_path).items()) for r in read_pcap(p)]
    assert len(recs) == keep.sum()
    assert all(len(r[1]) <= 40 for r in recs)
    assert [r[2] for r in recs] == [len(f) for (t, f), k in zip(frames, keep) if k]  # wire length kept
    PacketWriter(tmp_path).close()  # the lock went with the first writer


def test_index_lookup_and_session_extraction(tmp_path):
    frames, _ = generate(sessions=50, seed=5)
    batch = batch_of(frames)
    n = len(batch)
    sid = ((batch.ts // HOUR_NS) << SID_HOUR_SHIFT) | (np.arange(n) % 7)  # 7 fake sessions per hour
    w = PacketWriter(tmp_path)
    fid, off = w.write(batch, np.zeros(n, np.int16), ["eth0"], None, None)
    w.close()
    ix = IndexWriter(tmp_path)
    half = n // 2
    ix.append(sid[:half], fid[:half], off[:half])
    ix.flush()
    ix.append(sid[half:], fid[half:], off[half:])
    ix.close()
    target = int(sid[10])
    rows = lookup(tmp_path, target)
    expect = np.flatnonzero(sid == target)
    assert rows.column("offset").to_pylist() == off[expect].tolist()
    from wiretrail.sessions.flowtable import uid_of

    uid = uid_of(target)
    assert sid_of_uid(uid) == target
    out = tmp_path / "one.pcap"
    assert extract_session(tmp_path, uid, out) == len(expect)
    assert [(t, f) for t, f, _ in read_pcap(out)] == [frames[i] for i in expect]
    with pytest.raises(WiretrailError, match="no stored packets"):
        extract_session(tmp_path, uid_of(target + 1000), out)
    with pytest.raises(WiretrailError, match="not a session uid"):
        extract_session(tmp_path, "nonsense", out)


def test_tables_parts_views_compaction(tmp_path):
    schema = pa.schema([("uid", pa.string()), ("ts", pa.timestamp("ns")), ("n", pa.int64())])
    register_schema("things", schema)
    db = open_db(tmp_path)  # empty store: the view exists, with no rows
    assert db.execute("SELECT count(*) FROM things").fetchone() == (0,)
    db.close()
    tw = TableWriter(tmp_path, flush_seconds=1e9, flush_rows=10)
    for k in range(12):  # each append crosses flush_rows: 12 parts per hour, then compacted
        ts = pa.array([T0 + k * 60_000_000_000, T0 + HOUR_NS + k], pa.timestamp("ns"))
        tw.append("things", pa.table({"uid": [f"a{k}", f"b{k}"], "ts": ts, "n": [k, k]}, schema=schema))
        tw.rows += 10
        tw.maybe_flush()
    tw.close()
    parts = sorted((tmp_path / "tables" / "things").glob("*/*/*.parquet"))
    assert [p.parent.name for p in parts] == ["hour=10", "hour=11"]  # one part per hour after compaction
    db = open_db(tmp_path)
    assert db.execute("SELECT count(*), sum(n) FROM things").fetchone() == (24, 2 * sum(range(12)))
    assert db.execute("SELECT count(*) FROM packet_index").fetchone() == (0,)
    db.close()
    assert not list(tmp_path.rglob("*.tmp"))


def test_retention_by_age_and_quota_removes_packets_and_metadata_together(tmp_path):
    frames, _ = generate(sessions=200, seed=9)  # two hours of traffic
    batch = batch_of(frames)
    w = PacketWriter(tmp_path)
    w.write(batch, np.zeros(len(batch), np.int16), ["eth0"], None, None)
    w.close()
    schema = pa.schema([("ts", pa.timestamp("ns"))])
    tw = TableWriter(tmp_path)
    tw.append("sessions_t", pa.table({"ts": pa.array([T0, T0 + HOUR_NS], pa.timestamp("ns"))}, schema=schema))
    tw.close()
    hours = retention.store_hours(tmp_path)
    assert len(hours) == 2 and all(len(d) == 2 for d in hours.values())
    # age: "now" is 180 days and 90 minutes after T0: the first hour ended > 180 days ago
    msg = retention.enforce(tmp_path, max_age_days=180, now_ns=T0 + 180 * 86400 * 10**9 + 90 * 60 * 10**9)
    assert msg.startswith("removed 1 hour(s)")
    left = retention.store_hours(tmp_path)
    assert list(left) == [T0 // HOUR_NS + 1] and len(left[T0 // HOUR_NS + 1]) == 2
    # quota: 1 byte leaves nothing
    retention.enforce(tmp_path, max_age_days=None, quota_bytes=1)
    assert retention.store_hours(tmp_path) == {}


@pytest.mark.parametrize("stage", ["large", "small"])
def test_capture_file_appends_are_visible_at_once_and_exact_after_close(tmp_path, stage):
    from wiretrail.store.packets import _SMALL_STAGE_BYTES, _STAGE_BYTES, _OpenFile

    stage_bytes = _STAGE_BYTES if stage == "large" else _SMALL_STAGE_BYTES
    f = _OpenFile(0, tmp_path / "x" / "0.pcap", 0, 1, True, stage_bytes)
    assert len(f.stage) == stage_bytes
    rng = np.random.default_rng(0)
    written = bytearray(f.stage[:24].tobytes())
    # pieces smaller than a block, across blocks, and larger than the staging buffer
    for size in [1, 100, 4095, 4097, 5000, stage_bytes + 12345, 7, 3 * stage_bytes]:
        piece = rng.integers(0, 256, size, dtype=np.uint8)
        assert f.append(piece) == len(written)
        written += piece.tobytes()
        on_disk = (tmp_path / "x" / "0.pcap").read_bytes()
        # a reader sees every appended byte now; past them, at most one block of zero padding
        assert on_disk[:len(written)] == written and len(on_disk) - len(written) < 4096
        assert not any(on_disk[len(written):])
    f.close()
    assert (tmp_path / "x" / "0.pcap").read_bytes() == bytes(written)


def test_packet_writer_stages_bounded_by_open_files(tmp_path):
    from wiretrail.store.packets import _SMALL_STAGE_BYTES, _STAGE_BYTES, _STAGE_FILES, PacketWriter

    w = PacketWriter(tmp_path)
    w.link_names = [f"vlan{k}" for k in range(_STAGE_FILES + 3)]
    files = [w._file(k, 1, False, 0) for k in range(_STAGE_FILES + 3)]
    assert [len(f.stage) for f in files] == [_STAGE_BYTES] * _STAGE_FILES + [_SMALL_STAGE_BYTES] * 3
    w.close()


def test_index_rows_are_stably_sorted_by_session():
    from wiretrail.store.index import sort_by_session

    rng = np.random.default_rng(2)
    sids = (rng.integers(480_000, 480_003, 5000) << 43) | rng.integers(0, 1 << 43, 5000)
    for keys in (sids[rng.integers(0, 5000, 200_000)], rng.integers(0, 1 << 62, 3000), np.zeros(7, dtype=np.int64),
                 np.array([5, 1, 5, 0, 1], dtype=np.int64), np.zeros(0, dtype=np.int64)):
        n = len(keys)
        cols = (keys, rng.integers(0, 1 << 31, n).astype(np.int32), rng.integers(0, 1 << 40, n))
        order = np.argsort(keys, kind="stable")
        for got, col in zip(sort_by_session(*cols), cols):
            assert got.dtype == col.dtype and np.array_equal(got, col[order])


def test_a_not_null_column_holding_a_null_is_written_nullable_not_lost(tmp_path):
    """Schemas declare not null the columns every row has (no definition levels to write); a
    null there all the same must not cost the part (Parquet refuses to write it as declared)."""
    import pyarrow.parquet as pq

    from wiretrail.store.metadata import write_part

    schema = pa.schema([pa.field("a", pa.int64(), nullable=False), pa.field("b", pa.string(), nullable=False)])
    bad = pa.Table.from_arrays([pa.array([1, None, 3]), pa.array(["x", "y", "z"])], schema=schema)
    back = pq.read_table(write_part(tmp_path / "bad", bad))
    assert back.column("a").to_pylist() == [1, None, 3] and back.schema.field("a").nullable
    assert not back.schema.field("b").nullable  # the other declarations stand
    good = pa.Table.from_arrays([pa.array([1, 2, 3]), pa.array(["x", "y", "z"])], schema=schema)
    assert pq.read_schema(write_part(tmp_path / "good", good)).equals(schema)


def test_parts_are_what_pyarrow_parquet_writes_and_ingest_does_not_import_it(tmp_path):
    """Parts are written with pyarrow's Parquet writer class directly (metadata._write_parquet):
    the bytes are those pyarrow.parquet.write_table makes with the same options, and an ingest
    leaves pyarrow.parquet (with pyarrow.fs and its cloud bindings), pyarrow.compute and DuckDB
    unimported."""
    import pyarrow.parquet as pq

    from wiretrail.app.dns import SCHEMA as DNS_SCHEMA
    from wiretrail.store import metadata
    from wiretrail.store.metadata import write_part

    sessions = pa.table({"ts": pa.array([1, 2], pa.timestamp("ns")), "uid": ["CA", "CB"],
                         "answers": [["a", "b"], None], "n": pa.array([1, None], pa.int32())})
    for table in (sessions, DNS_SCHEMA.empty_table()):
        options = metadata.part_options(table.schema)
        ours, theirs = pa.BufferOutputStream(), pa.BufferOutputStream()
        metadata._write_parquet(table, ours, **options)
        pq.write_table(table, theirs, **options)
        assert ours.getvalue().to_pybytes() == theirs.getvalue().to_pybytes()
        assert pq.read_table(write_part(tmp_path / "t", table)).equals(table)

    capture = tmp_path / "s.pcap"
    from wiretrail.sample import write_sample

    write_sample(capture, sessions=200)
    probe = ("import sys; from pathlib import Path; from wiretrail.ingest import ingest, IngestOptions; "
             f"ingest([Path({str(capture)!r})], IngestOptions(store=Path({str(tmp_path / 'store')!r}), progress=False)); "
             "print(sorted(m for m in ('pyarrow.parquet', 'pyarrow.fs', 'pyarrow.compute', 'duckdb') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.split("\n")[-2] == "[]"
