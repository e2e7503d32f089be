"""wiretrail.decode.fragments: PcapPlusPlus's defragmentation vectors, orderings, overlaps,
timeouts and bounds."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from _frames import eth, ip4, ip6, make_batch, read_pcap, udp  # noqa: E402

from wiretrail.batch import ANOM_TRUNCATED_IP, FRAG_NONE  # noqa: E402
from wiretrail.decode import decode  # noqa: E402
from wiretrail.decode.fragments import FragmentReassembler  # noqa: E402

CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "corpus"
PPP = CORPUS / "pcapplusplus"
DEFRAG = PPP / "ip_defrag"
needs_corpus = pytest.mark.skipif(not PPP.is_dir(), reason="needs the corpus")


def feed(frames, linktype=1, ts=None, reasm=None, batch_size=None):
    """Feed frames (in the given order) through decode + reassembler; returns the reassembled
    frames (bytes), the tag arrays and the reassembler. Tags are the frame positions."""
    reasm = FragmentReassembler() if reasm is None else reasm
    ts = ts if ts is not None else list(range(len(frames)))
    out, parts = [], []
    step = batch_size or max(len(frames), 1)
    for s in range(0, len(frames), step):
        b = make_batch(frames[s:s + step], linktype, ts=ts[s:s + step])
        cols = decode(b)
        rows = np.nonzero(cols["frag"] != FRAG_NONE)[0]
        whole, p = reasm.add(b, cols, rows, rows.astype(np.int64) + s)
        for i in range(len(whole)):
            out.append(whole.data[whole.offset[i]:whole.offset[i] + whole.caplen[i]].tobytes())
        parts += p
    return out, parts, reasm


def expected_hex(name) -> bytes:
    return bytes.fromhex((DEFRAG / name).read_text().strip())


def same_ip(got: bytes, exp: bytes, mask_ipv6_len: bool = False) -> bool:
    if mask_ipv6_len:  # PcapPlusPlus's test overwrites the IPv6 payload length (see the manifest caveat)
        got, exp = got[:18] + got[20:], exp[:18] + exp[20:]
    return got == exp


@needs_corpus
def test_pcapplusplus_defrag_vectors():
    cases = []  # (name, frames, expected frame, mask)
    http, _, _, lt = read_pcap(DEFRAG / "frag_http_req.pcap")
    http_exp = expected_hex("frag_http_req_reassembled.txt")
    cases.append(("ipv4 sanity", http, http_exp, False))
    for name, order in [("A", [1, 0] + list(range(2, 11))), ("D", [10] + list(range(10))),
                        ("E", list(range(10, -1, -1)))]:
        cases.append((f"ipv4 out-of-order {name}", [http[k] for k in order], http_exp, False))
    b = list(http)
    b[5], b[9] = b[9], b[5]
    b[2], b[6] = b[6], b[2]
    cases.append(("ipv4 out-of-order B", b, http_exp, False))
    c = list(http)
    c[5], c[10] = c[10], c[5]
    cases.append(("ipv4 out-of-order C", c, http_exp, False))
    v6, _, _, _ = read_pcap(DEFRAG / "ip6_fragments.pcap")
    v6_exp = expected_hex("ip6_fragments_packet1.txt")
    cases.append(("ipv6 sanity", v6[:7], v6_exp, True))
    cases.append(("ipv6 out-of-order", [v6[k] for k in (2, 1, 0, 3, 4, 6, 5)], v6_exp, True))
    pad, _, _, _ = read_pcap(DEFRAG / "frag_with_padding.pcap")
    cases.append(("padding + VLAN", pad, expected_hex("frag_with_padding_defragmented.dat"), False))
    ipdu = read_pcap(PPP / "examples_ipdefragutil/http_req.pcap")[0][0]
    cases.append(("IPDefragUtil sanity", http, ipdu, False))
    v6in, _, _, _ = read_pcap(PPP / "examples_ipdefragutil/ipv6-frag.pcap")
    cases.append(("IPDefragUtil ipv6", v6in, read_pcap(PPP / "examples_ipdefragutil/no-ipv6-frag.pcap")[0][0], False))
    frag_util, _, _, _ = read_pcap(PPP / "examples_ipfragutil/http_req_frag.pcap")
    cases.append(("IPFragUtil reverse", frag_util, read_pcap(PPP / "examples_ipfragutil/http_req.pcap")[0][0], False))

    # multiple datagrams, both files interleaved in a shuffled order
    v4, _, _, _ = read_pcap(DEFRAG / "ip4_fragments.pcap")
    mixed = v4 + v6
    order = list(range(len(mixed)))
    random.Random(7).shuffle(order)
    got, parts, _ = feed([mixed[k] for k in order])
    # IPv4 datagrams by identification (a late duplicate of a fragment may arrive after its
    # datagram completed), IPv6 by the first frame of the datagram (no duplicates there)
    by_first = {}
    for frame, p in zip(got, parts):
        if frame[12:14] == b"\x08\x00":
            by_first[("id", int.from_bytes(frame[18:20], "big"))] = frame
        else:
            by_first[min(order[t] for t in p.tolist())] = frame
    multi = [("multi ip4 0x1ea0", ("id", 0x1EA0), "ip4_fragments_packet1.txt", False),
             ("multi ip4 0x1ea3", ("id", 0x1EA3), "ip4_fragments_packet4.txt", False),
             ("multi ip4 0x1ea4", ("id", 0x1EA4), "ip4_fragments_packet6.txt", False),
             ("multi ip6 0x2c5323", len(v4), "ip6_fragments_packet1.txt", True),
             ("multi ip6 0x98d687d1", len(v4) + 7, "ip6_fragments_packet2.txt", True)]
    results = []
    for name, frames, exp, mask in cases:
        out, _, _ = feed(frames)
        results.append((name, len(out) == 1 and same_ip(out[0], exp, mask)))
    for name, first, fname, mask in multi:
        results.append((name, first in by_first and same_ip(by_first[first], expected_hex(fname), mask)))
    # every datagram of the two multi files completes: 6 IPv4 + 4 IPv6
    results.append(("multi: 10 datagrams", len(got) == 10))

    # partial data, as PcapPlusPlus exposes it
    for name, frames, fname, mask in [("ipv4 partial", http[:6], "frag_http_req_partial.txt", False),
                                      ("ipv6 partial", v6[:5], "ip6_fragments_packet1_partial.txt", False)]:
        _, _, r = feed(frames)
        whole, _ = r.partial()
        ok = len(whole) == 1 and same_ip(whole.data[:whole.caplen[0]].tobytes(), expected_hex(fname), mask)
        results.append((name, ok))

    good = sum(ok for _, ok in results)
    print(f"\npcapplusplus defrag: {good}/{len(results)} datagrams identical")
    assert [name for name, ok in results if not ok] == []


@needs_corpus
def test_pcapplusplus_malformed_and_non_fragments():
    bad, _, _, _ = read_pcap(DEFRAG / "ip4_bad_fragment.pcap")
    # IHL 15 in a 42-byte MPLS payload: the decoder already refuses the header (PcapPlusPlus
    # reads it as a fragment and then rejects it), so nothing is stored
    cols = decode(make_batch(bad))
    assert cols["frag"][0] == FRAG_NONE and cols["anomaly"][0] & ANOM_TRUNCATED_IP
    out, _, r = feed(bad)
    assert out == [] and len(r) == 0
    # the same lie with a readable header: total length 3841 in a short frame, offset 288
    lie = eth(0x0800, ip4("0.0.0.1", "0.0.0.1", 29, b"\0" * 22, off=288, tot=3841))
    out, _, r = feed([lie])
    assert out == [] and len(r) == 0 and r.bad_fragments == 1
    assert [t.tolist() for t in r.expire(None)] == [[0]]
    vl, _, _, _ = read_pcap(DEFRAG / "VlanPackets.pcap")
    cols = decode(make_batch(vl))
    assert np.all(cols["frag"] == FRAG_NONE)
    assert np.all(cols["ip_ver"][:20] > 0) and np.all(cols["ip_ver"][20:26] == 0)


# ---- hand-built fragments ---------------------------------------------------------------------

def v4_frags(payload: bytes, size: int, ident=1, src="10.0.0.1", dst="10.0.0.2", proto=17):
    out = []
    for off in range(0, len(payload), size):
        chunk = payload[off:off + size]
        out.append(eth(0x0800, ip4(src, dst, proto, chunk, ident=ident, off=off, mf=int(off + size < len(payload)))))
    return out


def v6_frags(payload: bytes, size: int, ident=5, pre=b"", pre_nh=None):
    import struct
    out = []
    for off in range(0, len(payload), size):
        chunk = payload[off:off + size]
        fh = bytes([17, 0]) + struct.pack("!HI", off | int(off + size < len(payload)), ident)
        if pre:
            out.append(eth(0x86DD, ip6("2001:db8::1", "2001:db8::2", pre_nh, pre[:0] + bytes([44]) + pre[1:] + fh + chunk)))
        else:
            out.append(eth(0x86DD, ip6("2001:db8::1", "2001:db8::2", 44, fh + chunk)))
    return out


DGRAM = udp(1000, 2000, bytes(range(256)) * 12)


def test_ipv4_roundtrip_any_order_and_decodes():
    frames = v4_frags(DGRAM, 400)
    want = eth(0x0800, ip4("10.0.0.1", "10.0.0.2", 17, DGRAM, ident=1))
    for seed in range(5):
        order = list(range(len(frames)))
        random.Random(seed).shuffle(order)
        out, parts, r = feed([frames[k] for k in order], batch_size=3)
        assert out == [want] and sorted(parts[0].tolist()) == list(range(len(frames))) and len(r) == 0
    cols = decode(make_batch(out))
    assert (cols["sport"][0], cols["dport"][0], cols["frag"][0], cols["pl_len"][0]) == (1000, 2000, 0, len(DGRAM) - 8)


def test_ipv6_roundtrip_with_extension_header_before_fragment():
    hbh = bytes([44, 0]) + b"\x01\x04\0\0\0\0"
    frames = v6_frags(DGRAM, 400, pre=hbh, pre_nh=0)
    out, parts, _ = feed(frames[::-1])
    want = eth(0x86DD, ip6("2001:db8::1", "2001:db8::2", 0, bytes([17]) + hbh[1:] + DGRAM))
    assert out == [want]
    cols = decode(make_batch(out))
    assert (cols["proto"][0], cols["sport"][0], cols["frag"][0]) == (17, 1000, 0)


def test_whole_frame_metadata():
    frames = v4_frags(DGRAM, 1000)
    b = make_batch(frames, ts=[100, 300, 200, 250])
    b.iface[:] = 0
    cols = decode(b)
    rows = np.nonzero(cols["frag"] != FRAG_NONE)[0]
    whole, parts = FragmentReassembler().add(b, cols, rows, np.array([10, 11, 12, 13]))
    assert len(whole) == 1 and whole.ts[0] == 250 and whole.linktype[0] == 1
    assert whole.caplen[0] == whole.wirelen[0] == len(whole.data)
    assert parts[0].tolist() == [10, 11, 12, 13]


def test_overlap_first_arrival_wins():
    base = bytes(800)
    other = b"\xff" * 800
    f0 = eth(0x0800, ip4("1.1.1.1", "2.2.2.2", 17, base[:400], ident=9, mf=1))
    f1 = eth(0x0800, ip4("1.1.1.1", "2.2.2.2", 17, base[400:], ident=9, off=400))
    dup = eth(0x0800, ip4("1.1.1.1", "2.2.2.2", 17, other[200:600], ident=9, off=200, mf=1))
    out, _, r = feed([f0, dup, f1])
    # 0-400 from f0, 400-600 from dup (it came before f1), the rest from f1
    assert out and out[0][14 + 20:] == base[:400] + other[400:600] + base[600:] and r.bad_fragments >= 1
    out, _, _ = feed([dup, f0, f1])
    assert out[0][14 + 20:] == base[:200] + other[200:600] + base[600:]


def test_timeout_and_flush():
    frames = v4_frags(DGRAM, 400)
    r = FragmentReassembler(timeout_ns=1000)
    out, _, r = feed(frames[:2], ts=[0, 10], reasm=r)
    assert out == [] and len(r) == 1
    assert r.expire(500) == [] and len(r) == 1
    tags = r.expire(1001)
    assert [t.tolist() for t in tags] == [[0, 1]] and len(r) == 0 and r.timed_out == 1
    out, _, r = feed(frames[2:], reasm=r)  # the rest alone never completes (tags restart at 0)
    assert out == [] and len(r) == 1
    assert sorted(t for a in r.expire(None) for t in a.tolist()) == list(range(len(frames) - 2))


def test_bounds_evict_oldest():
    r = FragmentReassembler(max_datagrams=3)
    frames = [v4_frags(DGRAM, 400, ident=k)[0] for k in range(5)]
    feed(frames, reasm=r)
    assert len(r) == 3 and r.evicted == 2
    assert sorted(t.tolist()[0] for t in r.expire(10**6 - 1)) == [0, 1]
    r = FragmentReassembler(max_bytes=1000)
    feed([v4_frags(DGRAM, 400, ident=k)[0] for k in range(5)], reasm=r)
    assert len(r) == 2 and r._bytes <= 1000


def test_oversize_train_dropped():
    big = eth(0x0800, ip4("1.1.1.1", "2.2.2.2", 17, b"x" * 200, ident=3, off=65400))
    first = eth(0x0800, ip4("1.1.1.1", "2.2.2.2", 17, b"y" * 200, ident=3, mf=1))
    out, _, r = feed([first, big])
    assert out == [] and len(r) == 0 and r.bad_fragments == 1
    assert sorted(t for a in r.expire(None) for t in a.tolist()) == [0, 1]


def test_non_fragments_pass_untouched():
    r = FragmentReassembler()
    b = make_batch([eth(0x0800, ip4("1.1.1.1", "2.2.2.2", 17, udp(1, 2, b"abc")))])
    whole, parts = r.add(b, decode(b), np.zeros(0, np.int64), np.zeros(0, np.int64))
    assert len(whole) == 0 and parts == [] and r.expire(None) == []


def test_manifest_is_covered():
    if not PPP.is_dir():
        pytest.skip("needs the corpus")
    ids = {c["id"] for c in json.loads((PPP / "manifest.json").read_text()) if c["kind"] == "ip_defrag"}
    assert {"ipv4_sanity", "ipv4_out_of_order", "ipv6_sanity", "multiple_datagrams", "padding"} <= ids


@pytest.mark.skipif(not (CORPUS / "suricata-verify").is_dir(), reason="needs the corpus")
def test_suricata_verify_defrag_captures():
    """Suricata's defrag regression captures (IPv6 behind Ethernet, VLAN, PPP; fragments inside
    GRE/PPP): every datagram completes and the result decodes cleanly down to its L4 header."""
    from _frames import read_capture

    files = sorted((CORPUS / "suricata-verify" / "tests" / "defrag").glob("*/*.pcap"))
    assert files
    done = 0
    for f in files:
        b = read_capture(f)
        cols = decode(b)
        rows = np.nonzero(cols["frag"] != FRAG_NONE)[0]
        r = FragmentReassembler()
        whole, parts = r.add(b, cols, rows, rows.astype(np.int64))
        assert len(whole) >= 1 and len(r) == 0, f
        wc = decode(whole)
        assert np.all(wc["anomaly"] == 0) and np.all(wc["l4_off"] >= 0) and np.all(wc["frag"] == FRAG_NONE), f
        done += len(whole)
    print(f"\nsuricata-verify defrag: {done} datagrams from {len(files)} captures reassembled and decoded")
