"""Capture readers against the corpus manifests, an independent struct-based reader, and tshark."""

from __future__ import annotations

import gzip
import json
import re
import shutil
import struct
import subprocess
from decimal import Decimal
from pathlib import Path

import numpy as np
import pytest

from wiretrail.batch import DECODABLE_LINKTYPES
from wiretrail.capture import iter_batches
from wiretrail.errors import CaptureError

CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "corpus"
FORMATS = CORPUS / "formats"
MALFORMED = CORPUS / "malformed"
BENCH_SMALL = Path(__file__).resolve().parents[1] / "bench-data" / "mix_small.pcap"

pytestmark = pytest.mark.skipif(not FORMATS.is_dir(), reason="corpus not available")


# --- helpers --------------------------------------------------------------------------------
def read_all(path, **kw):
    """(frames, batches, error): frames as a list of (ts, caplen, wirelen, iface, linktype, bytes)."""
    frames, batches, error = [], [], None
    try:
        for b in iter_batches(str(path), **kw):
            batches.append(b)
            for i in range(len(b)):
                o, c = int(b.offset[i]), int(b.caplen[i])
                frames.append((int(b.ts[i]), c, int(b.wirelen[i]), int(b.iface[i]), int(b.linktype[i]),
                               b.data[o:o + c].tobytes()))
    except CaptureError as err:
        error = err
    return frames, batches, error


def reference_frames(path: Path):
    """An independent, deliberately simple reader (whole file in memory, struct only).

    Returns (frames, is_spb) with frames as (ts_ns, caplen, wirelen, iface, linktype, bytes).
    """
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    elif raw[:4] == b"\x28\xb5\x2f\xfd":
        import zstandard

        raw = zstandard.ZstdDecompressor().decompressobj().decompress(raw)
    frames, is_spb = [], []
    magic = struct.unpack("<I", raw[:4])[0]
    if magic in (0xA1B2C3D4, 0xA1B23C4D, 0xD4C3B2A1, 0x4D3CB2A1):
        e = "<" if magic in (0xA1B2C3D4, 0xA1B23C4D) else ">"
        nano = struct.unpack(e + "I", raw[:4])[0] == 0xA1B23C4D
        linktype = struct.unpack(e + "I", raw[20:24])[0] & 0x03FFFFFF
        p = 24
        while p + 16 <= len(raw):
            sec, frac, incl, orig = struct.unpack(e + "IIII", raw[p:p + 16])
            if p + 16 + incl > len(raw):
                break
            frames.append((sec * 10**9 + frac * (1 if nano else 1000), incl, orig, 0, linktype,
                           raw[p + 16:p + 16 + incl]))
            is_spb.append(False)
            p += 16 + incl
        return frames, is_spb
    assert magic == 0x0A0D0D0A
    p, e, ifaces, section, last_ts = 0, "<", [], [], 0
    while p + 12 <= len(raw):
        if raw[p:p + 4] == b"\x0a\x0d\x0d\x0a":
            e = "<" if raw[p + 8:p + 12] == b"\x4d\x3c\x2b\x1a" else ">"
            section = []
        btype, blen = struct.unpack(e + "II", raw[p:p + 8])
        block = raw[p:p + blen]
        if btype == 1:
            lt, _, snap = struct.unpack(e + "HHI", block[8:16])
            resol, offset, q = 6, 0, 16
            while q + 4 <= blen - 4:
                code, ln = struct.unpack(e + "HH", block[q:q + 4])
                if code == 0:
                    break
                if code == 9:
                    resol = block[q + 4]
                if code == 14:
                    offset = struct.unpack(e + "q", block[q + 4:q + 12])[0]
                q += 4 + (ln + 3) // 4 * 4
            section.append(len(ifaces))
            ifaces.append((lt, snap, resol, offset))
        elif btype in (2, 6):
            if_id = struct.unpack(e + ("I" if btype == 6 else "H"), block[8:8 + (4 if btype == 6 else 2)])[0]
            hi, lo, incl, orig = struct.unpack(e + "IIII", block[12:28])
            g = section[if_id]
            lt, snap, resol, offset = ifaces[g]
            units = (hi << 32) | lo
            units -= (units >> 63) << 64  # int64 nanoseconds cannot hold more: read as signed
            if resol & 0x80:
                ts = units * 10**9 >> (resol & 0x7F)
            else:
                ts = units * 10**9 // 10**resol
            last_ts = ts + offset * 10**9
            frames.append((last_ts, incl, orig, g, lt, block[28:28 + incl]))
            is_spb.append(False)
        elif btype == 3:
            g = section[0]
            lt, snap = ifaces[g][:2]
            orig = struct.unpack(e + "I", block[8:12])[0]
            incl = min(orig, blen - 16, snap or orig)
            frames.append((last_ts, incl, orig, g, lt, block[12:12 + incl]))
            is_spb.append(True)
        p += blen
    return frames, is_spb


def manifest_linktypes(entry) -> set[int]:
    return {int(m.group(1)) for m in (re.search(r"\((\d+)\)", s) for s in entry.get("linktypes", [])) if m}


FORMAT_ENTRIES = json.loads((FORMATS / "manifest.json").read_text())
CAPTURE_ENTRIES = [e for e in FORMAT_ENTRIES if e["format"] in ("pcap", "pcapng", "pcapng+zstd")]


# --- formats corpus ---------------------------------------------------------------------------
def test_formats_manifest():
    agree, lines = 0, []
    for entry in CAPTURE_ENTRIES:
        path = FORMATS / entry["file"]
        frames, batches, error = read_all(path, linktypes=None)
        interfaces = batches[-1].interfaces if batches else []
        problems = []
        if error is not None:
            problems.append(f"error {error}")
        if len(frames) != entry["packets"]:
            problems.append(f"{len(frames)} packets, manifest {entry['packets']}")
        seen = {f[4] for f in frames}
        if not seen <= manifest_linktypes(entry):
            problems.append(f"link types {sorted(seen)} vs {entry['linktypes']}")
        if "interfaces" in entry and frames and len(interfaces) != entry["interfaces"]:
            problems.append(f"{len(interfaces)} interfaces, manifest {entry['interfaces']}")
        if problems:
            lines.append(f"  {entry['file']}: {'; '.join(problems)}")
        else:
            agree += 1
    print(f"\nformats: {agree}/{len(CAPTURE_ENTRIES)} files agree with the manifest")
    print("\n".join(lines))
    assert agree == len(CAPTURE_ENTRIES)


def test_not_captures_are_refused():
    for entry in FORMAT_ENTRIES:
        if entry["format"] in ("pcap", "pcapng", "pcapng+zstd"):
            continue
        frames, _, error = read_all(FORMATS / entry["file"])
        assert not frames and error is not None
        assert str(FORMATS / entry["file"]) in str(error) and "\n" not in str(error)


def test_linktypes_assigned_but_not_decoded_are_read_unassigned_refused():
    # Kept in the store like any packet (no sessions); only a number outside the registry is an error.
    for name in ("arkime/nflog.pcap", "arkime/80211http.pcap"):
        frames, _, error = read_all(FORMATS / name)
        assert frames and error is None, name
    frames, _, error = read_all(CORPUS / "malformed" / "unknown_linktype.pcap")
    assert not frames and error is not None and "unknown link type 4242" in str(error)
    frames, _, error = read_all(FORMATS / "pcapplusplus/microsecs_big_endian.pcap", linktypes=DECODABLE_LINKTYPES)
    assert not frames and "unknown link type" in str(error)
    # Decodable files are read with the default filter.
    frames, _, error = read_all(FORMATS / "pcapplusplus/sll.pcap")
    assert error is None and len(frames) == 518


def test_known_timestamps_and_names():
    def stamps(name):
        return [f[0] for f in read_all(FORMATS / name, linktypes=None)[0]]

    assert stamps("pcapplusplus/microsecs.pcap") == [1_000_002_000, 1_000_001_000]
    assert stamps("pcapplusplus/nanosecs.pcap") == [1_000_002_000, 1_000_001_234]
    assert stamps("pcapplusplus/microsecs_big_endian.pcap")[0] == 1474059824_864984_000
    assert stamps("pcapplusplus/nanosecs_big_endian.pcap")[0] == 1766361926_167647291
    _, batches, _ = read_all(FORMATS / "pcapng-test-generator/output_le/advanced/test100.pcapng")
    assert [i.name for i in batches[-1].interfaces][:2] == ["eth0", "null1"]


def test_reference_reader_agreement():
    """Every packet equal (ts, lengths, interface, link type, bytes) to the struct-based reader."""
    agree = total = 0
    for entry in CAPTURE_ENTRIES:
        path = FORMATS / entry["file"]
        ours = read_all(path, linktypes=None)[0]
        ref, _ = reference_frames(path)
        total += 1
        agree += ours == ref
    print(f"\nreference reader: {agree}/{total} files agree packet for packet")
    assert agree == total


def tshark_fields(path: Path):
    """(ts, caplen, wirelen, if_name) per packet record as tshark reads it.

    tshark also lists custom blocks as frames (no interface id): those are dropped. Its
    interface names are compared only in a file's first section (tshark 4.0 maps later
    sections' interface ids onto the first section's interfaces) and when the IDB names one.
    """
    out = subprocess.run(["tshark", "-r", str(path), "-T", "fields", "-e", "frame.time_epoch", "-e", "frame.len",
                          "-e", "frame.cap_len", "-e", "frame.interface_name", "-e", "frame.section_number",
                          "-e", "frame.interface_id"],
                         capture_output=True, text=True, check=True).stdout
    rows = []
    for line in out.splitlines():
        ts, wirelen, caplen, name, section, if_id = (line.split("\t") + [""] * 6)[:6]
        if section and not if_id:
            continue
        if (section and section != "1") or name == "unknown":
            name = ""
        rows.append((int(Decimal(ts) * 10**9) if ts else None, int(caplen), int(wirelen), name))
    return rows


@pytest.mark.skipif(shutil.which("tshark") is None, reason="tshark not installed")
def test_tshark_agreement():
    files = agree = packets = packets_agree = 0
    for entry in CAPTURE_ENTRIES:
        path = FORMATS / entry["file"]
        ours, batches, _ = read_all(path, linktypes=None)
        theirs = tshark_fields(path)
        names = [i.name for i in batches[-1].interfaces] if batches else []
        same_file = len(ours) == len(theirs)
        for mine, ref in zip(ours, theirs):
            ts, caplen, wirelen, name = ref
            # tshark reads pcapng time units as unsigned; beyond int64 nanoseconds we read them as
            # signed (pcapplusplus/pcapng-example.pcapng has such stamps), so those are not compared.
            comparable = ts is not None and ts < 2**63
            ok = (caplen, wirelen) == (mine[1], mine[2]) and (not comparable or ts == mine[0])
            if name and names:  # tshark escapes control characters in its fields
                ok &= names[mine[3]].replace("\r", "\\r").replace("\n", "\\n") == name
            packets += 1
            packets_agree += ok
            same_file &= ok
        files += 1
        agree += same_file
    print(f"\ntshark: {agree}/{files} files, {packets_agree}/{packets} packets agree (ts, caplen, wirelen, if_name)")
    assert agree == files and packets_agree == packets


# --- malformed corpus ---------------------------------------------------------------------------
def test_malformed_manifest():
    entries = json.loads((MALFORMED / "manifest.json").read_text())
    agree, lines = 0, []
    for entry in entries:
        path = MALFORMED / entry["file"]
        frames, _, error = read_all(path)
        ok = entry["min_packets"] <= len(frames) <= entry["max_packets"]
        if entry["expect"] == "ok":
            ok &= error is None
        elif entry["expect"] == "error":
            ok &= error is not None and len(frames) == 0
        if error is not None:
            text = str(error)
            ok &= str(path) in text and "\n" not in text and error.packets == len(frames)
            if entry["expect"] == "partial":
                ok &= error.offset is not None
        agree += ok
        lines.append(f"  {'ok ' if ok else 'BAD'} {entry['file']}: {len(frames)} packets"
                     + (f", {error}" if error else ""))
    print(f"\nmalformed: {agree}/{len(entries)} files give the manifest's outcome")
    print("\n".join(lines))
    assert agree == len(entries)


def test_caplen_gt_wirelen_kept():
    frames, _, error = read_all(MALFORMED / "caplen_gt_origlen.pcap")
    assert error is None and any(f[1] > f[2] for f in frames)


def test_compressed_equal_plain(tmp_path):
    import zstandard

    frames_gz = read_all(MALFORMED / "valid.pcap.gz")[0]
    plain = tmp_path / "valid.pcap"
    plain.write_bytes(gzip.decompress((MALFORMED / "valid.pcap.gz").read_bytes()))
    assert frames_gz == read_all(plain)[0] and len(frames_gz) == 20
    assert read_all(MALFORMED / "valid.pcap.zst")[0] == read_all(MALFORMED / "valid_big_endian_nano.pcap")[0]
    assert (read_all(FORMATS / "pcapplusplus/file_heuristics/pcapng-example.pcapng.zst")[0]
            == read_all(FORMATS / "pcapplusplus/pcapng-example.pcapng")[0])
    # A multi-chunk file, compressed both ways (and as two concatenated gzip members).
    source = FORMATS / "pcapplusplus/sll.pcap"
    data = source.read_bytes()
    (tmp_path / "x.gz").write_bytes(gzip.compress(data[:5000]) + gzip.compress(data[5000:]))
    (tmp_path / "x.zst").write_bytes(zstandard.ZstdCompressor().compress(data))
    want = read_all(source)[0]
    assert read_all(tmp_path / "x.gz", chunk_bytes=4096)[0] == want
    assert read_all(tmp_path / "x.zst", chunk_bytes=4096)[0] == want


def test_truncated_compressed_keeps_packets(tmp_path):
    import zstandard

    data = (FORMATS / "pcapplusplus/sll.pcap").read_bytes()
    z = zstandard.ZstdCompressor().compress(data)
    (tmp_path / "cut.zst").write_bytes(z[:len(z) // 2])
    frames, _, error = read_all(tmp_path / "cut.zst")
    assert error is not None and "truncated zstd" in str(error) and 0 < len(frames) < 518


# --- chunk and batch boundaries -------------------------------------------------------------------
@pytest.mark.parametrize("name", ["pcapplusplus/sll.pcap", "pcapplusplus/pcapng-example.pcapng",
                                  "pcapng-test-generator/output_be/difficult/test202.pcapng",
                                  "pcapplusplus/many_interfaces-1.pcapng"])
def test_tiny_chunks_and_batches(name):
    path = FORMATS / name
    want = read_all(path, linktypes=None)[0]
    for chunk, batch in ((64, 1), (100, 300), (1000, 5000), (4096, 1 << 20)):
        frames, sizes = [], []
        # checked as read: a batch's buffers are reused by the next-but-one batch
        for b in iter_batches(str(path), chunk_bytes=chunk, batch_bytes=batch, linktypes=None):
            sizes.append(len(b))
            # frames in order, inside the buffer, not overlapping (pcap batches point into the
            # chunk buffer, record headers in between; pcapng ones are copied back to back)
            assert b.offset[0] >= 0 and int(b.offset[-1] + b.caplen[-1]) <= len(b.data)
            assert np.all(b.offset[1:] >= b.offset[:-1] + b.caplen[:-1])
            frames.extend((int(b.ts[i]), int(b.caplen[i]), int(b.wirelen[i]), int(b.iface[i]), int(b.linktype[i]),
                           b.data[b.offset[i]:b.offset[i] + b.caplen[i]].tobytes()) for i in range(len(b)))
        assert frames == want, (chunk, batch)
        if batch == 1:
            assert all(n == 1 for n in sizes)


def test_a_batch_stays_valid_while_the_next_is_read():
    path = FORMATS / "pcapplusplus/sll.pcap"
    want = read_all(path)[0]
    it = iter_batches(str(path), batch_bytes=2000)
    prev = next(it)
    snapshot = prev.data.tobytes()
    for b in it:
        assert prev.data.tobytes() == snapshot  # untouched by reading `b`
        prev, snapshot = b, b.data.tobytes()
    assert len(want) > 10


@pytest.mark.skipif(not BENCH_SMALL.is_file(), reason="bench data not built")
def test_bench_small_batches():
    total = 0
    sizes = []
    for b in iter_batches(str(BENCH_SMALL), batch_bytes=1 << 20, chunk_bytes=1 << 19):
        total += len(b)
        sizes.append(int(b.caplen.sum()) + 16 * len(b))  # record bytes in the batch
        assert b.ts.dtype == np.int64 and b.linktype.dtype == np.uint16 and b.iface.dtype == np.int16
    # a batch never exceeds batch_bytes by more than one record, nor the chunk it points into
    assert all(0 < s <= (1 << 19) + 65536 for s in sizes)  # the mapped reader keeps the chunk bound too
    assert total == sum(1 for _ in reference_frames(BENCH_SMALL)[0])


def test_errors_are_capture_errors(tmp_path):
    """Bit flips and cuts of valid files: only CaptureError ever escapes."""
    rng = np.random.default_rng(7)
    for name in ("pcapplusplus/pcapng-example.pcapng", "pcapplusplus/sll.pcap",
                 "pcapng-test-generator/output_be/difficult/test202.pcapng"):
        data = bytearray((FORMATS / name).read_bytes())
        for trial in range(60):
            damaged = bytearray(data)
            for pos in rng.integers(0, len(damaged), size=4):
                damaged[pos] = rng.integers(0, 256)
            cut = int(rng.integers(1, len(damaged) + 1))
            path = tmp_path / f"f{trial}"
            path.write_bytes(bytes(damaged[:cut]))
            for b in iter_batches_safely(path):
                assert len(b) >= 0


def iter_batches_safely(path):
    try:
        yield from iter_batches(str(path), chunk_bytes=512, linktypes=None)
    except CaptureError as err:
        assert "\n" not in str(err)


def test_missing_file():
    with pytest.raises(CaptureError, match="cannot open"):
        list(iter_batches("/nonexistent/file.pcap"))


def _pcapng_block(block_type: int, body: bytes) -> bytes:
    body += b"\0" * (-len(body) % 4)
    length = 12 + len(body)
    return struct.pack("<II", block_type, length) + body + struct.pack("<I", length)


def _option(code: int, value: bytes) -> bytes:
    return struct.pack("<HH", code, len(value)) + value + b"\0" * (-len(value) % 4)


def test_pcapng_tsresol_tsoffset_and_obsolete_packet_block(tmp_path):
    """Synthesised: binary and decimal if_tsresol, if_tsoffset, an OPB (type 2), an unknown block."""
    shb = _pcapng_block(0x0A0D0D0A, struct.pack("<IHHq", 0x1A2B3C4D, 1, 0, -1))
    idb_bin = _pcapng_block(1, struct.pack("<HHI", 1, 0, 0) + _option(2, b"bin0") + _option(9, bytes([0x94]))
                            + _option(14, struct.pack("<q", 100)) + _option(0, b""))
    idb_ns = _pcapng_block(1, struct.pack("<HHI", 1, 0, 0) + _option(9, bytes([9])))
    frame = bytes(range(60))
    units = (5 << 20) + (1 << 19)  # 5.5 s in 2^-20 s units
    epb = _pcapng_block(6, struct.pack("<IIIII", 0, units >> 32, units & 0xFFFFFFFF, 60, 64) + frame)
    opb = _pcapng_block(2, struct.pack("<HHIIII", 1, 0, 0, 7, 60, 60) + frame)
    unknown = _pcapng_block(0x40000BAD, b"whatever")
    path = tmp_path / "opts.pcapng"
    path.write_bytes(shb + idb_bin + idb_ns + unknown + epb + opb)
    frames, batches, error = read_all(path)
    assert error is None
    assert [(f[0], f[1], f[2], f[3]) for f in frames] == [(105_500_000_000, 60, 64, 0), (7, 60, 60, 1)]
    assert frames[0][5] == frame and batches[-1].interfaces[0].name == "bin0"
    assert frames == reference_frames(path)[0]


def test_mapped_file_cut_short_while_read(tmp_path):
    """A plain capture is read through a mapping; if the file is cut shorter meanwhile, reading
    stops at the new end with a one-line error instead of touching pages past it (which would
    kill the process with SIGBUS). Run in a child process, so that a crash fails only this test."""
    import sys

    pcap = tmp_path / "big.pcap"
    frame = bytes(range(256)) * 4  # 1 KiB frames
    with open(pcap, "wb") as f:
        f.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1))
        for k in range(4000):  # about 4 MB: mapped, not read
            f.write(struct.pack("<IIII", 1_700_000_000 + k, 0, len(frame), len(frame)) + frame)
    code = f"""
import os
from wiretrail.capture import iter_batches
from wiretrail.capture.source import MappedReader, open_reader
from wiretrail.errors import CaptureError
assert isinstance(open_reader({str(pcap)!r}), MappedReader)
got = 0
try:
    for i, b in enumerate(iter_batches({str(pcap)!r}, batch_bytes=1 << 16, chunk_bytes=1 << 16)):
        got += len(b)
        if i == 0:
            os.truncate({str(pcap)!r}, os.path.getsize({str(pcap)!r}) * 6 // 10)
    print("no error", got)
except CaptureError as err:
    print("error", got, str(err))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-1000:]
    kind, got, *msg = proc.stdout.split(maxsplit=2)
    assert kind == "error" and "cut short while it was being read" in msg[0]
    assert 0 < int(got) < 4000
