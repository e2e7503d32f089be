"""DNS and ICMP datagrams a batch at a time (dns.add_datagrams and close_sessions,
app/dns_kernel.py; icmp's, app/icmp_kernel.py) against the one-by-one path.

The batch path must give exactly what DnsSession.add and IcmpSession.add give datagram by
datagram: the DNS kernel's messages are compared with the Python parser's (`_parse`) field by
field, the rows of whole sessions split into batches in every way (and closed at every point)
with those of the one-by-one path, and the corpus's DNS and ICMP captures' tables with the
batch entry points and without them.
"""

from __future__ import annotations

import ipaddress
import random
import struct
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from test_app_dns_dhcp import PTR_Q, dgram, msg, qname, question, rr
from wiretrail.app import dns, icmp
from wiretrail.app.base import Datagram, DatagramBatch, Endpoints


def kernel_and_python(payloads, netbios=False, resp_nb=False):
    """(kernel's messages, Python's messages) for the payloads, read as one batch."""
    data = np.frombuffer(b"".join(payloads) or b"\0", dtype=np.uint8)
    lens = np.array([len(p) for p in payloads], dtype=np.int64)
    ends = np.cumsum(lens)
    starts = ends - lens
    nb = np.full(len(payloads), netbios or resp_nb, dtype=bool)
    rnb = np.full(len(payloads), resp_nb, dtype=bool)
    got, capitals, _ = dns.parse_batch(data, starts, ends, nb, rnb)
    want = []
    for p, caps in zip(payloads, capitals):
        m = dns._parse(p, netbios or resp_nb, 137 if resp_nb else 53, True)
        m.capitals = p.lower() != p
        assert caps == m.capitals
        want.append(m)
    return got, want


def assert_same_messages(payloads, netbios=False, resp_nb=False) -> int:
    """The kernel reads each payload as `_parse` does (or leaves it to it): how many it read."""
    got, want = kernel_and_python(payloads, netbios, resp_nb)
    read = 0
    for p, g, w in zip(payloads, got, want):
        if g is None:
            continue
        read += 1
        assert g == w, p
        assert (g.lowered, g.capitals) == (w.lowered, w.capitals), p
    return read


RESPONSE = msg(flags=0x8180, qd=[question("Mail.Example.COM", 15)], an=[
    rr(PTR_Q, 15, struct.pack(">H", 10) + qname("MX1.example.com")),
    rr(PTR_Q, 5, qname("alias.example.net"), ttl=60),
    rr(PTR_Q, 1, bytes([192, 0, 2, 7])),
    rr(PTR_Q, 28, bytes.fromhex("20010db8000000000000000000000001")),
    rr(PTR_Q, 28, bytes.fromhex("00000000000000000000ffff0a000001")),
    rr(PTR_Q, 12, qname("host.example.org")),
    rr(PTR_Q, 2, qname("ns1.example.org")),
    rr(PTR_Q, 6, qname("ns.example.org") + qname("admin.example.org") + bytes(range(20))),
    rr(PTR_Q, 33, struct.pack(">HHH", 1, 2, 5060) + qname("sip.example.org")),
    rr(PTR_Q, 4242, b"\x01\x02"),
    rr(PTR_Q, 11, b"\x01\x02\x03\x04\x06"),
    rr(PTR_Q, 13, b"\x01a\x01b"),
    rr(PTR_Q, 16, b"\x05hello\x00\x04A\xffb\x01"),   # TXT: strings as sent, one empty, bytes escaped
    rr(PTR_Q, 99, b"\x03v=1"),
], ns=[rr(b"\0", 6, qname("a.root") + qname("Hostmaster.root") + bytes(20)),
       rr(b"\0", 16, b"\x02ok"), rr(b"\0", 16, b"\x09cut")],  # a TXT cut short: dropped, not malformed
    ar=[rr(b"\0", 41, b""), rr(PTR_Q, 5, qname("extra.example"))])

# names with capitals and bytes outside printable ASCII; an empty answer record at the end
ODD_NAMES = msg(flags=0x8180, qd=[b"\x04W\x01W\xff\x07Example\x00" + struct.pack(">HH", 1, 1)],
                an=[rr(PTR_Q, 1, b"\x0a\x00\x00\x01"), rr(b"\x02a\x00", 41, b"")])


def test_kernel_reads_well_formed_messages_as_python_does():
    payloads = [msg(qd=[question()]), RESPONSE, ODD_NAMES,
                msg(flags=0x8183, qd=[question("nx.example")], ns=[rr(b"\0", 6, qname("x") + qname("Y") + bytes(20))]),
                msg(flags=0x2000, qd=[question()]),  # NOTIFY
                msg(flags=0x8180, qd=[question(), question("two.example", 28)])]
    assert assert_same_messages(payloads) == len(payloads)  # all read by the kernel, none left over
    m = kernel_and_python([RESPONSE])[0][0]
    assert [a.reply for a in m.answers][:5] == ["MX1.example.com", "alias.example.net", "192.0.2.7", "2001:db8::1",
                                                "::ffff:10.0.0.1"]
    assert m.answers[0].lower == ("mail.example.com", "mx1.example.com")
    assert m.authorities[0].detail["soa"]["rname"] == "Hostmaster.root"
    assert m.answers[7].detail["soa"]["serial"] == 0x00010203
    assert m.answers[12].reply == "TXT 5 hello TXT 0  TXT 4 A\\xffb\\x01" and m.answers[12].txt == ["hello", "", "A\\xffb\\x01"]
    assert m.answers[13].reply == "SPF 3 v=1" and not m.malformed
    assert [(a.rtype, a.reply, a.txt) for a in m.authorities[1:]] == [(16, "TXT 2 ok", None)]
    # a TXT answer cut short: Zeek reports the strings before the cut, Python writes that
    cut = msg(flags=0x8180, qd=[question()], an=[rr(PTR_Q, 16, b"\x02ok\x09cut")])
    got, want = kernel_and_python([cut])
    assert got[0] is None and want[0].malformed and want[0].answers[0].reply == "TXT 2 ok"


def test_kernel_malformed_and_truncated_as_python():
    base = msg(qd=[question()])
    cases = [
        b"", b"\x00" * 11,                                                            # shorter than a header
        struct.pack(">HHHHHH", 1, 0x0100, 1, 0, 0, 0) + b"\xc0\x0c\x00\x01\x00\x01",  # pointer to itself
        struct.pack(">HHHHHH", 1, 0x0100, 1, 0, 0, 0) + b"\x03www\xc3\xff\x00\x01\x00\x01",  # past the end
        struct.pack(">HHHHHH", 1, 0x8180, 1, 1, 0, 0) + b"\xc0\x12\x00\x01\x00\x01\xc0\x0c\x00\x01\x00\x01",
        struct.pack(">HHHHHH", 1, 0x0100, 4000, 0, 0, 0) + base[12:],               # absurd counts
        struct.pack(">HHHHHH", 1, 0x8180, 1, 65535, 0, 0) + base[12:] + rr(PTR_Q, 1, b"\1\2\3\4"),
        msg(flags=0x8180, qd=[question()], an=[rr(PTR_Q, 1, b"\1\2\3")]),          # A of 3 bytes
        msg(flags=0x8180, qd=[question()], an=[rr(PTR_Q, 15, b"\1")]),             # MX too short
        msg(flags=0x8180, qd=[question()], an=[rr(PTR_Q, 6, qname("a") + bytes(5))]),  # SOA too short
        msg(flags=0x8180, qd=[question()], ns=[rr(PTR_Q, 6, qname("a") + bytes(5))]),  # ... in authority: dropped
        msg(flags=0x8180, qd=[question()], ns=[rr(PTR_Q, 1, b"\1\2")]),
        msg(flags=0x8180, qd=[question()], ar=[rr(PTR_Q, 2, b"\x05ab")]),           # bad name in additional
        struct.pack(">HHHHHH", 1, 0x0100, 1, 0, 0, 0) + b"\x3fabc",                 # label past the end
        struct.pack(">HHHHHH", 1, 0x0100, 1, 0, 0, 0) + b"\x41" + b"a" * 65 + b"\x00\x00\x01\x00\x01",  # 0x40 label
        struct.pack(">HHHHHH", 1, 0x0100, 1, 0, 0, 0) + (b"\x3f" + b"a" * 63) * 9 + b"\x00\x00\x01\x00\x01",  # > 512
        msg(flags=0x1800, qd=[question()]),                                          # opcode 3: not followed
        base + b"\x00\x00\x00",                                                      # trailing bytes
    ]
    read = assert_same_messages(cases)
    got, want = kernel_and_python(cases)
    assert all(w.malformed for w in want[:10]) and not want[10].malformed and not want[-1].malformed
    assert got[0] is None and got[1] is None  # no header: Python's
    assert read >= len(cases) - 2
    # every cut of well-formed messages: truncated datagrams break at every possible place
    for full in (RESPONSE, ODD_NAMES):
        assert assert_same_messages([full[:k] for k in range(len(full) + 1)]) > len(full) // 2
    # NetBIOS name service allows long labels; its opcodes 6..8 are read (and rows flag them)
    long_label = struct.pack(">HHHHHH", 1, 0x0100, 1, 0, 0, 0) + b"\x50" + b"A" * 80 + b"\x00\x00\x20\x00\x01"
    assert assert_same_messages([long_label, msg(flags=0x3000, qd=[question()])], netbios=True) == 2
    assert not kernel_and_python([long_label], netbios=True)[0][0].malformed
    assert kernel_and_python([long_label])[0][0].malformed


def test_compression_pointer_chain_limit():
    """Pointers go backwards only (no loops); a chain of more than 20 of them cuts the name
    (Zeek's limit), a case the kernel leaves to Python, which flags the message."""
    for depth, kernel_reads in ((1, True), (20, True), (21, False), (24, False)):  # 25 questions at most
        # question 0 is "a"; question k's name is a pointer to question k-1's: the last name
        # goes through `depth` pointers to "a"
        first = b"\x01a\x00\x00\x01\x00\x01"
        chain, prev = b"", 12
        for _ in range(depth):
            here = 12 + len(first) + len(chain)
            chain += struct.pack(">H", 0xC000 | prev) + b"\x00\x01\x00\x01"
            prev = here
        payload = struct.pack(">HHHHHH", 1, 0x0100, depth + 1, 0, 0, 0) + first + chain
        got, want = kernel_and_python([payload])
        assert (got[0] is not None) == kernel_reads
        assert want[0].malformed == (not kernel_reads)
        if kernel_reads:
            assert got[0] == want[0] and [q[0] for q in got[0].questions] == ["a"] * (depth + 1)
        rows = batch_rows([dgram(payload)], [1])
        assert rows == rows_one_by_one([dgram(payload)])
        assert len(rows) == 1 and rows[0]["malformed"] == (not kernel_reads)


def test_kernel_fuzz_agrees_with_python():
    rng = random.Random(7)
    seeds = [RESPONSE, ODD_NAMES, msg(qd=[question()]),
             msg(flags=0x8183, qd=[question("nx.example")], ns=[rr(b"\0", 6, qname("x") + qname("y") + bytes(20))])]
    payloads = []
    for i in range(4000):
        b = bytearray(rng.choice(seeds))
        r = rng.random()
        if r < 0.5:
            for _ in range(rng.randrange(1, 4)):
                b[rng.randrange(len(b))] = rng.randrange(256)
        elif r < 0.7:
            b = b[:rng.randrange(len(b) + 1)]
        elif r < 0.9:
            k = rng.randrange(12, len(b) - 1)
            b[k], b[k + 1] = 0xC0 | rng.randrange(4), rng.randrange(256)  # a pointer somewhere
        else:
            b += rng.randbytes(rng.randrange(1, 40))
        payloads.append(bytes(b))
    for netbios in (False, True):
        read = assert_same_messages(payloads, netbios=netbios)
        assert read > len(payloads) // 2
    print(f"\ndns kernel fuzz: {len(payloads)} messages x 2, as the Python parser reads them")


# ---- the batch entry point against DnsSession.add ----------------------------------------------

def _as_kept(h: str) -> tuple[int, int]:
    """An address text as the flow table keeps it (IPv4 as ::ffff:a.b.c.d): (high, low) 64 bits."""
    a = ipaddress.ip_address(h)
    n = int(a) | (0xFFFF << 32) if a.version == 4 else int(a)
    return n >> 64, n & ((1 << 64) - 1)


def ends_of(datagrams: list[Datagram]) -> Endpoints:
    """Each datagram's session ends as the stage gives them (from its 5-tuple)."""
    o = np.array([_as_kept(d.orig_h) for d in datagrams], dtype=np.uint64).reshape(-1, 2)
    r = np.array([_as_kept(d.resp_h) for d in datagrams], dtype=np.uint64).reshape(-1, 2)
    return Endpoints(orig_hi=o[:, 0], orig_lo=o[:, 1], resp_hi=r[:, 0], resp_lo=r[:, 1],
                     orig_p=np.array([d.orig_p for d in datagrams], dtype=np.int64),
                     resp_p=np.array([d.resp_p for d in datagrams], dtype=np.int64))


def batch_of(datagrams: list[Datagram]) -> DatagramBatch:
    """Datagrams as the stage hands them over: columns over one buffer, sessions by uid."""
    sid_of: dict[str, int] = {}
    for d in datagrams:
        if d.uid not in sid_of:
            sid_of[d.uid] = len(sid_of) + 100
    pad = b"\xee" * 3  # bytes between payloads: a parse must not read past its own
    data = np.frombuffer(pad + b"".join(d.payload + pad for d in datagrams), dtype=np.uint8)
    lens = np.array([len(d.payload) for d in datagrams], dtype=np.int64)
    ends = np.cumsum(lens + len(pad))  # payload k is followed by its pad
    starts = ends - lens
    return DatagramBatch(data=data, start=starts, end=ends, sid=np.array([sid_of[d.uid] for d in datagrams]),
                         from_orig=np.array([d.from_orig for d in datagrams]),
                         ts=np.array([d.ts for d in datagrams], dtype=np.int64),
                         packet=np.array([d.packet for d in datagrams], dtype=np.int64),
                         truncated=np.array([d.truncated for d in datagrams]), ends=ends_of(datagrams))


def rows_one_by_one(datagrams: list[Datagram], mod=dns) -> list[dict]:
    """new_session, add per datagram, then close per session: the rows as the stage's table has them."""
    states, tuples, rows = {}, {}, []
    for d in datagrams:
        if d.uid not in states:
            states[d.uid] = mod.new_session(d)
            tuples[d.uid] = dict(uid=d.uid, orig_h=d.orig_h, orig_p=d.orig_p, resp_h=d.resp_h, resp_p=d.resp_p)
        rows += [(d.uid, r) for r in states[d.uid].add(d)]
    for uid, st in states.items():
        rows += [(uid, r) for r in st.close()]
    for uid, r in rows:  # the session's columns a row leaves out (ICMP's all): the stage's
        for name, value in tuples[uid].items():
            r.setdefault(name, value)
    return pylist(pa.Table.from_pylist([r for _, r in rows], schema=mod.SCHEMA))


def pylist(table: pa.Table) -> list[dict]:
    """A table's rows, times as ns integers."""
    for i, field in enumerate(table.schema):
        if pa.types.is_timestamp(field.type) or pa.types.is_duration(field.type):
            table = table.set_column(i, field.name, table.column(i).cast(pa.int64()))
    return table.to_pylist()


def records_rows(records, tuples: dict, mod=dns) -> list[dict]:
    """Records as the stage makes them rows: columns left out null, the session's columns
    where the module gave none."""
    if isinstance(records, list):
        assert records == []
        return []
    table = records.table
    for field in mod.SCHEMA:
        if field.name not in table.column_names:
            table = table.append_column(field, pa.nulls(table.num_rows, field.type))
    rows = pylist(table.select(mod.SCHEMA.names).cast(mod.SCHEMA))
    for row, s in zip(rows, records.index.tolist()):
        for name, value in zip(("uid", "orig_h", "orig_p", "resp_h", "resp_p"), tuples[s]):
            if row[name] is None:
                row[name] = value
    return rows


def batch_rows(datagrams: list[Datagram], sizes: list[int], mod=dns, closing: dict | None = None) -> list[dict]:
    """The datagrams in batches of the given sizes (sessions spanning batches), then closed:
    after batch closing[uid] for those it names (their rows first), at the end for the others."""
    sids = {d.uid: k + 100 for k, d in enumerate({d.uid: d for d in datagrams}.values())}
    tuples = {sids[d.uid]: (d.uid, d.orig_h, d.orig_p, d.resp_h, d.resp_p) for d in datagrams}
    states, rows, at = {}, [], 0
    for k, size in enumerate(sizes):
        chunk = datagrams[at:at + size]
        at += size
        if chunk:
            b = batch_of(chunk)
            # one numbering of sessions over all batches
            b.sid = np.array([sids[d.uid] for d in chunk])
            out, errors = mod.add_datagrams(states, b)
            assert errors == 0
            rows += records_rows(out, tuples, mod)
        done = sorted(sids[u] for u, after in (closing or {}).items() if after == k)
        if done:
            rows += records_rows(mod.close_sessions(states, np.array(done, dtype=np.int64)), tuples, mod)
    rows += records_rows(mod.close_sessions(states, np.array(sorted(states), dtype=np.int64)), tuples, mod)
    assert not states
    return rows


def by_session(rows: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in rows:
        out.setdefault(r["uid"], []).append(r)
    return out


def random_batches(rng: random.Random, datagrams: list[Datagram], biggest: int = 200):
    """Batch sizes at random, and each session closed after a random batch from its last one on."""
    sizes = []
    while sum(sizes) < len(datagrams):
        sizes.append(rng.randrange(1, biggest))
    last, at = {}, 0
    for k, size in enumerate(sizes):
        for d in datagrams[at:at + size]:
            last[d.uid] = k
        at += size
    closing = {u: rng.randrange(k, len(sizes) + 1) for u, k in last.items()}
    return sizes, closing


def conversation() -> list[Datagram]:
    """Several sessions interleaved: pairing, retransmissions, lone responses, a flipped
    session, multicast, NetBIOS (NBSTAT read by the server port), malformed messages."""
    q1 = msg(tid=7, qd=[question("A.example")])
    r1 = msg(tid=7, flags=0x8180, qd=[question("a.example")], an=[rr(PTR_Q, 1, b"\x01\x01\x01\x01")])
    q2 = msg(tid=8, qd=[question("b.example", 28)])
    r2 = msg(tid=8, flags=0x8180, qd=[question("b.example", 28)],
             an=[rr(PTR_Q, 28, bytes.fromhex("20010db8000000000000000000000002"))])
    lone = msg(tid=9, flags=0x8183, qd=[question("c.example")], ns=[rr(b"\0", 6, qname("x") + qname("y") + bytes(20))])
    enc = "".join(chr(65 + (b >> 4)) + chr(65 + (b & 15)) for b in b"WORKGROUP      \x00")
    nbq = msg(tid=3, flags=0x0010, qd=[question(enc, 33)])
    nbr = msg(tid=3, flags=0x8400, qd=[], an=[rr(qname(enc), 33, b"\x01" + b"HOST" + b" " * 14 + bytes(47))])
    srv = msg(tid=4, flags=0x8400, an=[rr(qname("_sip._udp.x"), 33, struct.pack(">HHH", 1, 2, 5060) + qname("sip.x"))])
    mdns = msg(tid=0, flags=0x8400, an=[rr(qname("h.local"), 1, b"\xc0\xa8\x00\x02")])
    a, b = ("10.0.0.1", 40000), ("10.0.0.53", 53)
    nb_c, nb_s = ("10.0.0.1", 137), ("10.0.0.9", 137)
    txt = msg(tid=11, flags=0x8180, qd=[question("t.example", 16)], an=[rr(PTR_Q, 16, b"\x05hello")])
    # names that are the root's: replies (AA, RA, rtt) with no answer text
    root = msg(tid=12, flags=0x8580, qd=[question("r.example", 5)],
               an=[rr(PTR_Q, 5, b"\0"), rr(PTR_Q, 33, struct.pack(">HHH", 1, 2, 3) + b"\0"),
                   rr(PTR_Q, 6, b"\0\0" + bytes(20))])
    return [
        dgram(q1, ts=10, uid="C1", orig=a, resp=b),
        dgram(q2, ts=11, uid="C1", orig=a, resp=b),
        dgram(mdns, ts=11, uid="C3", orig=("192.168.0.2", 5353), resp=("224.0.0.251", 5353)),
        dgram(q1, ts=12, uid="C1", orig=a, resp=b),                       # a retransmission
        dgram(nbq, ts=12, uid="C4", orig=nb_c, resp=nb_s),
        dgram(r1, ts=13, uid="C2", from_orig=True, orig=b, resp=a),       # response first: flipped
        dgram(nbr, ts=14, uid="C4", from_orig=False, orig=nb_c, resp=nb_s),
        dgram(r1, ts=20, uid="C1", from_orig=False, orig=a, resp=b),
        dgram(b"\x00\x07\x81", ts=21, uid="C1", from_orig=False, orig=a, resp=b),   # short
        dgram(mdns, ts=21, uid="C3", orig=("192.168.0.2", 5353), resp=("224.0.0.251", 5353)),
        dgram(msg(tid=5, flags=0x1800, qd=[question()]), ts=22, uid="C1", orig=a, resp=b),  # opcode 3
        dgram(r2, ts=23, uid="C1", from_orig=False, orig=a, resp=b),
        dgram(lone, ts=30, uid="C1", from_orig=False, orig=a, resp=b),
        # a NetBIOS session whose first message is the server's, sent by the originator:
        # it flips, and its SRV/NBSTAT record reads by the server port after the flip
        dgram(srv, ts=31, uid="C5", from_orig=True, orig=nb_s, resp=("10.0.0.7", 40001)),
        dgram(srv, ts=32, uid="C5", from_orig=True, orig=nb_s, resp=("10.0.0.7", 40001)),
        dgram(txt, ts=33, uid="C2", from_orig=False, orig=b, resp=a),     # TXT: read in Python
        dgram(RESPONSE[:40], ts=34, uid="C2", from_orig=False, orig=b, resp=a),
        dgram(msg(tid=12, qd=[question("r.example", 5)]), ts=35, uid="C6", orig=a, resp=b),
        dgram(root, ts=36, uid="C6", from_orig=False, orig=a, resp=b),
    ]


def test_batches_pair_as_one_by_one():
    datagrams = conversation()
    datagrams[-1].truncated = True
    datagrams[3].packet = 77
    want = rows_one_by_one(datagrams)
    # what the one-by-one path gives, in short (so a change in both at once still shows)
    assert len(want) == 15
    assert [(r["answers"], r["AA"], r["rtt"]) for r in want if r["uid"] == "C6"] == [(None, True, 1)]
    paired = [r for r in want if r["uid"] == "C1" and r["trans_id"] == 7]
    assert paired[0]["rtt"] == 10 and paired[0]["answers"] == ["1.1.1.1"] and paired[0]["query_original"] == "A.example"
    assert sum(r["uid"] == "C3" for r in want) == 2                      # multicast: one row per message
    assert any(r["uid"] == "C4" and r["query"] == "WORKGROUP" and r["qtype_name"] == "NBSTAT" for r in want)
    assert [r["malformed"] for r in want if r["uid"] == "C1"].count(True) == 2
    assert any(r["uid"] == "C2" and r["malformed"] for r in want)           # the truncated one
    n = len(datagrams)
    for sizes in ([n], [1] * n, [2] * n, [3] * n, [5, n], [n - 1, 1], [7, 1, 1, n]):
        assert batch_rows(datagrams, sizes) == want, sizes


def test_batch_fuzz_pairs_as_one_by_one():
    """Random sessions of random (often broken) messages, in random batches."""
    rng = random.Random(11)
    seeds = [m for m in (d.payload for d in conversation())] + [RESPONSE, ODD_NAMES]
    datagrams = []
    for i in range(1500):
        uid = f"C{rng.randrange(40)}"
        k = int(uid[1:])
        server = ("224.0.0.251", 5353) if k % 10 == 0 else (("10.0.1.1", 137) if k % 7 == 0 else ("10.0.1.1", 53))
        client = ("10.0.0.%d" % k, 137 if k % 7 == 0 else 30000 + k)
        b = bytearray(rng.choice(seeds))
        if rng.random() < 0.3 and b:
            b[rng.randrange(len(b))] = rng.randrange(256)
        if rng.random() < 0.5 and len(b) > 2:
            b[0:2] = rng.choice([b"\x00\x07", b"\x00\x08", b"\x00\x03"])
        datagrams.append(dgram(bytes(b), ts=i, uid=uid, from_orig=rng.random() < 0.5, orig=client, resp=server))
    want = rows_one_by_one(datagrams)
    assert len(want) > 300
    sizes = []
    while sum(sizes) < len(datagrams):
        sizes.append(rng.randrange(1, 200))
    assert batch_rows(datagrams, sizes) == want


def test_batch_closes_sessions_at_any_point(monkeypatch):
    """Sessions closed between batches, in any order, the book compacting its messages often:
    each session's rows as one by one."""
    monkeypatch.setattr(dns, "COMPACT_AFTER", 5)
    rng = random.Random(12)
    seeds = [m for m in (d.payload for d in conversation())] + [RESPONSE, ODD_NAMES]
    datagrams = []
    for i in range(2500):
        k = rng.randrange(60)
        uid = f"C{k}"
        server = ("224.0.0.251", 5353) if k % 10 == 0 else (("10.0.1.1", 137) if k % 7 == 0 else ("10.0.1.1", 53))
        client = ("10.0.0.%d" % k, 137 if k % 7 == 0 else 30000 + k)
        b = bytearray(rng.choice(seeds))
        if rng.random() < 0.2 and b:
            b[rng.randrange(len(b))] = rng.randrange(256)
        if len(b) > 2:
            b[0:2] = struct.pack(">H", rng.randrange(6))
        datagrams.append(dgram(bytes(b), ts=i, uid=uid, from_orig=rng.random() < 0.5, orig=client, resp=server))
    want = by_session(rows_one_by_one(datagrams))
    for trial in range(3):
        sizes, closing = random_batches(rng, datagrams)
        assert by_session(batch_rows(datagrams, sizes, closing=closing)) == want
    print(f"\ndns batch path, sessions closed at random: {sum(map(len, want.values()))} rows as one by one")


def test_pending_queues_overflow_as_one_by_one():
    """More ids waiting than Zeek keeps (DNS::max_pending_query_ids), more messages of one id
    than it keeps (max_pending_msgs), in the queues of queries and of lone responses."""
    a, b = ("10.0.0.1", 40000), ("10.0.0.53", 53)
    q = lambda tid, name="x.example": msg(tid=tid, qd=[question(name)])  # noqa: E731
    r = lambda tid: msg(tid=tid, flags=0x8180, qd=[question("x.example")],  # noqa: E731
                        an=[rr(PTR_Q, 1, bytes([10, 0, 0, tid & 0xFF]))])
    sent = [(q(1), True)]                                      # the pending query
    sent += [(q(100 + k), True) for k in range(70)]            # 70 ids queued: flushed past 50
    sent += [(q(7), True) for _ in range(60)]                  # one id 60 times: flushed past 50
    sent += [(r(100 + k), False) for k in range(0, 70, 3)]     # some answered
    sent += [(r(1), False), (r(7), False)]                     # the pending query, then the next one in its place
    sent += [(r(500 + k), False) for k in range(60)]           # lone responses: queued, flushed
    sent += [(r(900), False) for _ in range(55)]
    sent += [(q(500 + k), True) for k in range(0, 60, 7)] + [(q(900), True)]
    datagrams = [dgram(p, ts=i, uid="C1", from_orig=fo, orig=a, resp=b) for i, (p, fo) in enumerate(sent)]
    want = rows_one_by_one(datagrams)
    assert len(want) > 150
    n = len(datagrams)
    for sizes in ([n], [1] * n, [7] * n, [60, 60, 60, n], [n // 2, n]):
        assert batch_rows(datagrams, sizes) == want, sizes


# ---- ICMP: the batch path against IcmpSession ---------------------------------------------------

def icmp_message(t: int, code: int = 0, rest: bytes = b"\0\0\0\0", body: bytes = b"") -> bytes:
    return bytes([t, code, 0, 0]) + rest + body


def echo(t: int, ident: int, seq: int, data: bytes = b"abcdefgh" * 4) -> bytes:
    return icmp_message(t, 0, struct.pack(">HH", ident, seq), data)


def v4_quote(proto: int = 17, sp: int = 5353, dp: int = 53, frag: int = 0, ihl: int = 5) -> bytes:
    ip = bytes([0x40 | ihl, 0, 0, 40]) + struct.pack(">HH", 1, frag) + bytes([64, proto, 0, 0, 10, 0, 0, 1,
                                                                             10, 0, 0, 2])
    return ip + bytes(4 * max(ihl - 5, 0)) + struct.pack(">HHHH", sp, dp, 20, 0)


def v6_quote(proto: int = 6, sp: int = 443, dp: int = 50000, ext: bytes = b"", first: int | None = None) -> bytes:
    src = bytes.fromhex("20010db8000000000000000000000001")
    dst = bytes.fromhex("20010db80000000000000000000000ff")
    ip = bytes([0x60, 0, 0, 0]) + struct.pack(">H", 20 + len(ext)) + bytes([proto if first is None else first, 57])
    return ip + src + dst + ext + struct.pack(">HHII", sp, dp, 0, 0)


def icmp_conversation() -> list[Datagram]:
    """ICMP and ICMPv6 sessions: echo exchanges (answered, repeated, unanswered, lone replies,
    the same host at both ends), errors quoting IPv4 and IPv6 packets (extension headers, later
    fragments), neighbour discovery, redirects, messages too short for their type."""
    a4 = ("10.0.0.1", 8), ("10.0.0.2", 0)
    a6 = ("2001:db8::1", 128), ("2001:db8::2", 129)
    self4 = ("127.0.0.1", 8), ("127.0.0.1", 0)
    out = []

    def add(payload, uid, hosts, fo=True, truncated=False):
        d = dgram(payload, ts=len(out) * 10, uid=uid, from_orig=fo, orig=hosts[0], resp=hosts[1])
        d.truncated = truncated
        out.append(d)

    hop = bytes([44, 0]) + bytes(6)                                   # hop-by-hop, then a fragment header
    add(echo(8, 7, 1), "I1", a4)
    add(echo(8, 7, 2), "I1", a4)
    add(echo(0, 7, 1, b"abcdefgh" * 4), "I1", a4, fo=False)          # answered, same data
    add(echo(8, 7, 2, b"x" * 20), "I1", a4)                           # repeated: the first stays unanswered
    add(echo(0, 7, 2, b"y" * 20), "I1", a4, fo=False)                 # answered, other data
    add(echo(0, 9, 9), "I1", a4, fo=False)                            # a reply with no request
    add(echo(8, 7, 3, b"z" * 4), "I1", a4)                            # never answered
    add(echo(8, 7, 4), "I1", a4)
    add(echo(0, 7, 4), "I1", a4, fo=False, truncated=True)            # answered by a truncated reply
    add(icmp_message(3, 3, body=v4_quote()), "I2", a4)
    add(icmp_message(3, 4, b"\0\0\x05\xdc", v4_quote(6, 40000, 443)), "I2", a4)
    add(icmp_message(3, 4, b"\0\0\0\0", v4_quote(1, 8, 0)), "I2", a4)                # mtu 0: none
    add(icmp_message(11, 0, body=v4_quote(frag=0x20)), "I2", a4)                      # a later fragment
    add(icmp_message(11, 1, body=v4_quote(ihl=4)), "I2", a4)                          # header length < 20
    add(icmp_message(5, 1, bytes([192, 168, 1, 1]), v4_quote(47)), "I2", a4)         # redirect: gateway
    add(icmp_message(3, 1, body=b"\x55" + bytes(30)), "I2", a4)                       # not an IP packet
    add(icmp_message(12, 9, body=v4_quote()[:10]), "I2", a4)                          # a quote too short
    add(icmp_message(13, 0, b"\0\x01\0\x02", bytes(12)), "I2", a4)                   # timestamp: echo fields
    add(icmp_message(99, 5), "I2", a4)
    add(b"\x08", "I2", a4)
    add(b"\x08\x00\x00", "I2", a4)
    add(b"\x08\x00\x00\x00\x00\x07", "I2", a4)
    add(b"", "I2", a4)
    add(echo(128, 1, 1), "I3", a6)
    add(echo(129, 1, 1), "I3", a6, fo=False)
    add(echo(160, 2, 2), "I3", a6)
    add(icmp_message(1, 4, body=v6_quote(17, 5000, 53)), "I3", a6)
    add(icmp_message(2, 0, b"\0\0\x05\x00", v6_quote()), "I3", a6)                   # packet too big: mtu
    add(icmp_message(3, 0, body=v6_quote(ext=hop + bytes([6, 0, 0, 0, 0, 0, 0, 0]), first=0)), "I3", a6)
    add(icmp_message(4, 1, body=v6_quote(ext=bytes([17, 0, 0, 8, 0, 0, 0, 0]), first=44)), "I3", a6)  # later fragment
    add(icmp_message(1, 0, body=v6_quote(ext=bytes([60, 0]) + bytes(6) + bytes([58, 1]) + bytes(6), first=43)),
        "I3", a6)
    add(icmp_message(1, 0, body=v6_quote()[:30]), "I3", a6)                           # too short for its header
    add(icmp_message(135, 0, body=bytes.fromhex("fe800000000000000000000000000001")), "I3", a6)
    add(icmp_message(136, 0, body=bytes(10)), "I3", a6)                               # too short for a target
    target = bytes.fromhex("fe800000000000000000000000000002") + bytes.fromhex("20010db8000000000000000000000009")
    add(icmp_message(137, 0, body=target + bytes([2, 1]) + bytes(6) + bytes([4, 8]) + bytes(6) + v6_quote()[:56]),
        "I3", a6)
    add(icmp_message(137, 0, body=target + bytes([1, 0]) + bytes(6)), "I3", a6)       # an option of length 0
    add(icmp_message(137, 0, body=target[:20]), "I3", a6)                             # too short
    add(icmp_message(143, 0, body=bytes(20)), "I3", a6)
    add(echo(8, 5, 5), "I4", self4)                                   # the same host at both ends
    add(echo(8, 5, 5), "I4", self4, fo=False)
    add(echo(0, 5, 5), "I4", self4)
    return out


def test_icmp_batches_as_one_by_one():
    datagrams = icmp_conversation()
    want = rows_one_by_one(datagrams, icmp)
    # what the one-by-one path gives, in short (so a change in both at once still shows)
    assert len(want) == 36
    answered = [r for r in want if r["replied"]]
    assert [(r["echo_seq"], r["reply_differs"]) for r in answered if r["uid"] == "I1"] == [(1, False), (2, True),
                                                                                          (4, None)]
    assert {r["inner_proto"] for r in want} >= {"udp", "tcp", "icmp", "gre", "icmp6"}
    assert any(r["gateway"] == "fe80::2" and r["inner_orig_p"] == 443 for r in want)
    n = len(datagrams)
    for sizes in ([n], [1] * n, [2] * n, [3] * n, [5, n], [n - 1, 1], [7, 1, 1, n]):
        assert batch_rows(datagrams, sizes, icmp) == want, sizes


def test_icmp_batch_fuzz_as_one_by_one(monkeypatch):
    """Mutated messages in random sessions (IPv4 and IPv6), few requests allowed to wait, batches
    and closes at random, the book compacting often: each session's rows as one by one."""
    monkeypatch.setattr(icmp, "MAX_PENDING", 3)
    monkeypatch.setattr(icmp, "COMPACT_AFTER", 5)
    from test_app_smb_icmp import _mutate
    rng = random.Random(59)
    seeds = [d.payload for d in icmp_conversation()]
    datagrams = []
    for i in range(4000):
        k = rng.randrange(30)
        hosts = ((f"2001:db8::{k}", 128), ("2001:db8::ff", 129)) if k % 2 else ((f"10.0.0.{k}", 8), ("10.0.0.99", 0))
        p = rng.choice(seeds)
        if rng.random() < 0.5:
            p = _mutate(rng, p)
        elif len(p) >= 8 and rng.random() < 0.7:  # an echo message of a few ids and sequence numbers
            p = bytes([rng.choice((8, 0, 128, 129)), 0, 0, 0]) + struct.pack(">HH", rng.randrange(2),
                                                                             rng.randrange(6)) + p[8:]
        d = dgram(p, ts=i * 10 + rng.randrange(-5, 5), uid=f"I{k}", from_orig=rng.random() < 0.5, orig=hosts[0],
                  resp=hosts[1])
        d.truncated = rng.random() < 0.05
        datagrams.append(d)
    want = by_session(rows_one_by_one(datagrams, icmp))
    for trial in range(3):
        sizes, closing = random_batches(rng, datagrams, 300)
        assert by_session(batch_rows(datagrams, sizes, icmp, closing)) == want
    print(f"\nicmp batch path fuzz: {sum(map(len, want.values()))} rows as one by one")


def test_icmp_entropies_are_the_same_floats():
    """The batch path's payload entropies are entropy()'s float64s, to the last bit: numpy's
    terms, added up as numpy's sum adds them (up to 256 of them: blocks and halvings)."""
    rng = np.random.default_rng(5)
    payloads = [bytes([7]) * 9, bytes(range(256)), bytes(range(256)) * 3 + bytes(range(200))]
    for _ in range(3000):
        n = int(rng.integers(1, 3000))
        alphabet = int(rng.integers(1, 257))
        payloads.append(rng.integers(0, alphabet, n, dtype=np.uint8).tobytes())
    data = np.frombuffer(b"".join(payloads), dtype=np.uint8)
    length = np.array([len(p) for p in payloads], dtype=np.int64)
    got = icmp._entropies(data, np.cumsum(length) - length, length)
    want = np.array([icmp.entropy(p) for p in payloads])
    assert (got.view(np.int64) == want.view(np.int64)).all()
    assert str(got[0]) == "-0.0"  # one byte value: -(0.0), as entropy() has it


# ---- through the stage: the corpus's tables with the batch entry points and without ------------

CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "corpus"


def _corpus_captures() -> list[Path]:
    """The corpus's captures with DNS or ICMP in them, by each folder's manifest: Zeek's traces
    with a dns.log, suricata-verify's tests with dns events, Arkime's and nDPI's captures with
    DNS (mDNS, LLMNR, NetBIOS) or ICMP sessions, and the scenarios of DNS tunnels, floods
    (DNS amplification, ICMP), ICMP tunnels and port scans (unreachables)."""
    import json

    out: set[Path] = set()

    def manifest(folder: str) -> list:
        path = CORPUS / folder / "manifest.json"
        return json.loads(path.read_text()) if path.exists() else []

    out |= {CORPUS / "zeek" / t["trace"] for t in manifest("zeek") if "dns" in t["logs"]}
    out |= {CORPUS / "suricata-verify" / t["pcap"] for t in manifest("suricata-verify")
            if t.get("pcap") and "dns" in (t.get("event_types") or [])}
    out |= {CORPUS / "arkime" / t["pcap"] for t in manifest("arkime") if {"dns", "icmp"} & set(t["protocols"])}
    out |= {CORPUS / "ndpi" / t["pcap"] for t in manifest("ndpi")
            if {"DNS", "MDNS", "LLMNR", "NetBIOS", "ICMP", "ICMPV6"} & set(t["protocols"])}
    for scenario in ("dns_tunnel", "dos_flood", "icmp_tunnel", "port_scan"):
        out |= set((CORPUS / "scenarios" / scenario).glob("*.pcap*"))
    return sorted(p for p in out if p.exists())


def _stored_rows(store: Path, table: str) -> list[str]:
    """A table's rows in the order they are stored (parts in name order), uids aside."""
    rows = []
    for f in sorted(store.glob(f"tables/{table}/**/*.parquet")):
        for r in pylist(pq.read_table(f)):
            r.pop("uid")
            rows.append(repr(sorted(r.items())))
    return rows


def _table_rows(store: Path, table: str) -> list[str]:
    """A table's rows, uids aside, sorted (as a multiset)."""
    return sorted(_stored_rows(store, table))


def test_corpus_batch_path_gives_the_same_tables(tmp_path, monkeypatch):
    """Every DNS and ICMP capture of the corpus ingested with the batch entry points
    (add_datagrams, close_sessions) and with the stage's one-datagram-at-a-time path: the same
    dns and icmp tables (uids aside)."""
    from wiretrail.cli import main

    captures = _corpus_captures()
    if not captures:
        pytest.skip("no corpus")
    got: dict[str, dict] = {"batch": {}, "single": {}}
    for path in ("batch", "single"):
        if path == "single":
            for mod in (dns, icmp):
                monkeypatch.delattr(mod, "add_datagrams")
                monkeypatch.delattr(mod, "close_sessions")
        for k, capture in enumerate(captures):
            store = tmp_path / f"{path}{k}"
            assert main(["ingest", "--no-progress", "--store", str(store), str(capture)]) in (0, 1)
            got[path][capture] = {t: _table_rows(store, t) for t in ("dns", "icmp")}
    counts = {"dns": 0, "icmp": 0}
    for capture in captures:
        for t in counts:
            assert got["batch"][capture][t] == got["single"][capture][t], (capture, t)
            counts[t] += len(got["batch"][capture][t])
    print(f"\nbatch vs one datagram at a time on {len(captures)} corpus captures: dns {counts['dns']} rows, "
          f"icmp {counts['icmp']} rows compared, all equal")
    assert counts["dns"] > 1000 and counts["icmp"] > 1000


def test_same_capture_same_row_order(tmp_path):
    """The same capture ingested again gives its dns and icmp rows in the same order. Session
    ids (and uids) are random from one run to the next; rows ordered by them were not (the
    waiting queries of a close, NetBIOS broadcasts above all, came in another order each time)."""
    from wiretrail.cli import main

    captures = _corpus_captures()
    if not captures:
        pytest.skip("no corpus")
    rows = 0
    for k, capture in enumerate(captures):
        runs = []
        for run in range(3):
            store = tmp_path / f"{k}-{run}"
            assert main(["ingest", "--no-progress", "--store", str(store), str(capture)]) in (0, 1)
            runs.append({t: _stored_rows(store, t) for t in ("dns", "icmp")})
        assert runs[0] == runs[1] == runs[2], capture.name
        rows += len(runs[0]["dns"]) + len(runs[0]["icmp"])
    print(f"\n{len(captures)} captures ingested three times each: {rows} dns and icmp rows, same order each time")
    assert rows > 1000


def _book_is_empty(mod, book) -> bool:
    if mod is dns:
        return len(book.sids) == len(book.e_sid) == len(book.done) == 0
    return not book.hosts and not book.messages and not book.pending and len(book.done) == 0


@pytest.mark.parametrize("mod", [dns, icmp], ids=["dns", "icmp"])
def test_failed_close_forgets_its_sessions(monkeypatch, mod):
    """A bug while making a close's rows (here: the row builder raising) costs those sessions
    their rows, not memory: the book forgets them all the same, and later sessions are
    unaffected."""
    talk = conversation() if mod is dns else icmp_conversation()
    first = talk[0].uid
    datagrams = [dgram(d.payload, ts=i, uid=u, from_orig=d.from_orig, orig=(d.orig_h, d.orig_p),
                       resp=(d.resp_h, d.resp_p)) for u in ("C1", "C2") for i, d in enumerate(talk) if d.uid == first]
    sids = {"C1": 101, "C2": 102}
    states = {}
    b = batch_of(datagrams)
    b.sid = np.array([sids[d.uid] for d in datagrams])
    _, errors = mod.add_datagrams(states, b)
    assert errors == 0 and set(states) == {101, 102}
    book = states[101]

    def broken(*args):
        raise RuntimeError("a parser bug")

    owner, name = (dns, "_transactions") if mod is dns else (icmp.IcmpBook, "_rows")
    real = getattr(owner, name)
    monkeypatch.setattr(owner, name, broken)
    with pytest.raises(RuntimeError):
        mod.close_sessions(states, np.array([101], dtype=np.int64))
    monkeypatch.setattr(owner, name, real)
    got = mod.close_sessions(states, np.array([102], dtype=np.int64))
    assert got.table.num_rows > 0 and set(got.index.tolist()) == {102}
    assert not states and _book_is_empty(mod, book)


def test_endpoints_multicast_and_texts_as_ipaddress_reads_them():
    """DNS's multicast flag from the numbers the flow table keeps, against ipaddress on the
    texts; and the texts as the sessions table writes them."""
    rng = random.Random(5)
    texts = []
    for _ in range(3000):
        kind = rng.randrange(4)
        if kind == 0:
            texts.append(str(ipaddress.IPv4Address(rng.getrandbits(32))))
        elif kind == 1:  # around the multicast range's edges
            texts.append(str(ipaddress.IPv4Address(rng.choice([0xDF, 0xE0, 0xEF, 0xF0]) << 24 | rng.getrandbits(24))))
        elif kind == 2:
            texts.append(str(ipaddress.IPv6Address(rng.getrandbits(128))))
        else:
            texts.append(str(ipaddress.IPv6Address(rng.choice([0xFE, 0xFF, 0x00]) << 120 | rng.getrandbits(120))))
    kept = np.array([_as_kept(t) for t in texts], dtype=np.uint64).reshape(-1, 2)
    zeros = np.zeros(len(texts), dtype=np.int64)
    ends = Endpoints(orig_hi=kept[:, 0], orig_lo=kept[:, 1], resp_hi=kept[:, 0], resp_lo=kept[:, 1],
                     orig_p=zeros, resp_p=zeros)
    every = np.arange(len(texts))
    want = [ipaddress.ip_address(t).is_multicast for t in texts]
    assert ends.resp_multicast(every).tolist() == want
    assert ends.texts(every)[1] == [str(ipaddress.ip_address(t)) for t in texts]
    print(f"\nendpoints: {len(texts)} addresses, {sum(want)} multicast, flags and texts as ipaddress has them")
