"""BPF: libpcap-compiled programs run by the numba VM select exactly the packets tcpdump selects."""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from wiretrail.capture import iter_batches
from wiretrail.capture.bpf import _run, bpf_match, compile_bpf
from wiretrail.errors import WiretrailError

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT.parent / "shared" / "corpus"

# (capture, what it exercises)
CAPTURES = [
    (CORPUS / "arkime" / "dns-udp.pcap", "Ethernet"),
    (CORPUS / "arkime" / "http-simple-get.pcap", "Ethernet"),
    (CORPUS / "formats" / "pcapplusplus" / "sll.pcap", "Linux SLL"),
    (CORPUS / "formats" / "pcapplusplus" / "sll2.pcap", "Linux SLL2"),
    (CORPUS / "formats" / "pcapplusplus" / "raw_ip.pcap", "raw IP (101)"),
    (CORPUS / "formats" / "pcapplusplus" / "null_loopback.pcap", "BSD loopback"),
    (CORPUS / "arkime" / "twovlan.pcap", "VLAN"),
    (CORPUS / "zeek" / "traces" / "q-in-q.pcap", "QinQ"),
    (CORPUS / "arkime" / "v6.pcap", "IPv6"),
    (CORPUS / "formats" / "pcapplusplus" / "ICMPv6_echos.cap", "ICMPv6"),
    (CORPUS / "formats" / "pcapplusplus" / "GrePackets.cap", "GRE"),
    (ROOT / "bench-data" / "mix_small.pcap", "Ethernet, 28 MB mix"),
]

FILTERS = [
    "tcp", "udp", "udp port 53", "host {host}", "net 10.0.0.0/8", "tcp[tcpflags] & tcp-syn != 0",
    "vlan", "vlan and tcp", "ip6", "icmp", "icmp6", "port 80 and not host {host}", "greater 1000",
    "less 100", "ip[6:2] & 0x1fff != 0", "arp", "not ip", "ether broadcast",
    "tcp[((tcp[12:1] & 0xf0) >> 2):4] = 0x47455420",  # HTTP GET: indirect loads, MSH, shifts
    "ip and ip[2:2] % 7 = 3", "ip[8] ^ 0xff > 200", "ip6 and tcp port 443",
    "src net 192.168.0.0/16 or dst portrange 1000-2000",
]

pytestmark = pytest.mark.skipif(shutil.which("tcpdump") is None, reason="tcpdump not installed")


def frames_of(path: Path, linktypes=None):
    # copies: a reader reuses its buffers two batches on, and these batches are kept
    return [dataclasses.replace(b, data=b.data.copy(), offset=b.offset.copy(), caplen=b.caplen.copy(),
                                wirelen=b.wirelen.copy())
            for b in iter_batches(str(path), linktypes=linktypes)]


def a_host(path: Path) -> str:
    """An IPv4 address seen in the capture (the first packet's source), for host filters."""
    out = subprocess.run(["tcpdump", "-nn", "-r", str(path), "-c", "20", "ip"], capture_output=True, text=True).stdout
    m = re.search(r" IP (\d+\.\d+\.\d+\.\d+)", out)
    return m.group(1) if m else "10.1.2.3"


def tcpdump_selection(path: Path, expr: str, tmp: Path):
    """(ts, frame bytes) of the packets tcpdump writes for `expr`, or None if it refuses."""
    out = tmp / "sel.pcap"
    run = subprocess.run(["tcpdump", "-r", str(path), "-w", str(out), expr], capture_output=True, text=True)
    if run.returncode != 0:
        return None
    return [(t, f) for b in frames_of(out) for t, f in frame_list(b)]


def frame_list(batch):
    return [(int(batch.ts[i]), batch.data[batch.offset[i]:batch.offset[i] + batch.caplen[i]].tobytes())
            for i in range(len(batch))]


def our_selection(batches, expr: str):
    chosen = []
    programs = {}
    for b in batches:
        keep = np.zeros(len(b), dtype=bool)
        for lt in np.unique(b.linktype).tolist():
            if lt not in programs:
                programs[lt] = compile_bpf(expr, lt)
            rows = np.nonzero(b.linktype == lt)[0]
            keep[rows] = bpf_match(programs[lt], b.data, b.offset[rows], b.caplen[rows], b.wirelen[rows])
        chosen += [fr for fr, k in zip(frame_list(b), keep.tolist()) if k]
    return chosen


def test_agrees_with_tcpdump(tmp_path):
    runs = agree = matched = 0
    lines = []
    for path, what in CAPTURES:
        if not path.is_file():
            continue
        batches = frames_of(path)
        host = a_host(path)
        for template in FILTERS:
            expr = template.format(host=host)
            theirs = tcpdump_selection(path, expr, tmp_path)
            try:
                ours = our_selection(batches, expr)
            except WiretrailError:
                ours = None
            runs += 1
            same = ours == theirs
            agree += same
            matched += len(ours or [])
            if not same:
                lines.append(f"  {path.name} ({what}) {expr!r}: ours {None if ours is None else len(ours)}, "
                             f"tcpdump {None if theirs is None else len(theirs)}")
    print(f"\nbpf: {agree}/{runs} (capture, filter) runs select exactly tcpdump's packets "
          f"({matched} packets matched in all)")
    print("\n".join(lines))
    assert runs >= 200 and agree == runs


def test_bad_filter_is_one_line():
    with pytest.raises(WiretrailError, match=r"^bad filter 'tcp port foo': .+") as info:
        compile_bpf("tcp port foo", 1)
    assert "\n" not in str(info.value)
    with pytest.raises(WiretrailError, match="bad filter"):
        compile_bpf("tcp and and", 1)


def test_out_of_bounds_load_rejects():
    prog = compile_bpf("tcp", 1)
    data = np.zeros(10, dtype=np.uint8)  # shorter than an Ethernet header
    got = bpf_match(prog, data, np.array([0], np.int64), np.array([10], np.int32), np.array([60], np.int32))
    assert not got[0]
    accept_all = compile_bpf("", 1)
    assert bpf_match(accept_all, data, np.array([0, 5], np.int64), np.array([5, 5], np.int32),
                     np.array([5, 5], np.int32)).all()


def test_hand_written_programs():
    """ALU and jump operations the compiler rarely emits: NEG, XOR, MOD, JSET X, TAX/TXA, ST/LDX MEM."""
    def run(insns, frame=bytes(range(64))):
        """The program's return value (bpf_match only keeps whether it is non-zero)."""
        prog = np.array(insns, dtype=np.uint32)
        data = np.frombuffer(frame, dtype=np.uint8)
        value = int(_run(prog, data, 0, len(frame), len(frame), np.zeros(16, dtype=np.int64)))
        matched = bpf_match(prog, data, np.array([0], np.int64), np.array([len(frame)], np.int32),
                            np.array([len(frame)], np.int32))[0]
        assert matched == (value != 0)
        return value

    LD_IMM, LDX_IMM, NEG, XOR_K, MOD_K, TAX, TXA = 0x00, 0x01, 0x84, 0xA4, 0x94, 0x07, 0x87
    JEQ_K, JSET_X, RET_K, RET_A, ST, LDX_MEM, LD_H_IND = 0x15, 0x4D, 0x06, 0x16, 0x02, 0x61, 0x48
    # A = -5 -> 0xfffffffb; ^ 0xfffffff0 -> 0xb; % 4 -> 3; == 3 -> accept
    assert run([(LD_IMM, 0, 0, 5), (NEG, 0, 0, 0), (XOR_K, 0, 0, 0xFFFFFFF0), (MOD_K, 0, 0, 4),
                (JEQ_K, 0, 1, 3), (RET_K, 0, 0, 1), (RET_K, 0, 0, 0)]) == 1
    # M[2] = 6; X = M[2]; A = P[X+2 : 2] = 0x0809; TAX/TXA round trip; JSET X
    assert run([(LD_IMM, 0, 0, 6), (ST, 0, 0, 2), (LDX_MEM, 0, 0, 2), (LD_H_IND, 0, 0, 2), (TAX, 0, 0, 0),
                (TXA, 0, 0, 0), (JSET_X, 0, 1, 0), (RET_A, 0, 0, 0), (RET_K, 0, 0, 0)]) == 0x0809
    # MOD by zero rejects
    assert run([(LD_IMM, 0, 0, 5), (MOD_K, 0, 0, 0), (RET_K, 0, 0, 1)]) == 0
