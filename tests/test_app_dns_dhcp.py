"""DNS and DHCP protocol records: unit cases, fuzzing, and agreement with Zeek's dns.log/dhcp.log.

The corpus comparison runs each Zeek test's trace through capture -> decode -> flow table
(tests/_app_harness.py) and the modules' state objects, then matches rows with Zeek's by
(orig_h, orig_p, resp_h, resp_p, trans_id, query) (Zeek's ts are masked in the
baselines), falling back to the key without the query. Datagrams with a bad UDP
checksum are dropped when the Zeek test ran without -C, as Zeek does.
"""

from __future__ import annotations

import random
import struct

import pyarrow as pa
import pytest

from _app_harness import (ZEEK, Closed, events_of, manifest_tests, read_zeek_log, run_sessions, run_tracker,
                          tcp_streams, zeek_vector)
from wiretrail.app import dhcp, dns
from wiretrail.app.base import Datagram, Direction, Stream

import numpy as np

# ---- message builders ------------------------------------------------------------------------


def qname(name: str) -> bytes:
    out = b""
    for label in name.split("."):
        if label:
            out += bytes([len(label)]) + label.encode()
    return out + b"\0"


def rr(name: bytes, rtype: int, rdata: bytes, ttl: int = 300, rclass: int = 1) -> bytes:
    return name + struct.pack(">HHIH", rtype, rclass, ttl, len(rdata)) + rdata


def msg(tid=0x1234, flags=0x0100, qd=(), an=(), ns=(), ar=(), counts=None) -> bytes:
    c = counts or (len(qd), len(an), len(ns), len(ar))
    body = b"".join(qd) + b"".join(an) + b"".join(ns) + b"".join(ar)
    return struct.pack(">HHHHHH", tid, flags, *c) + body


def question(name="www.example.com", qtype=1, qclass=1) -> bytes:
    return qname(name) + struct.pack(">HH", qtype, qclass)


PTR_Q = b"\xc0\x0c"  # pointer to the question name


def dgram(payload: bytes, ts: int = 1_000_000_000, from_orig=True, uid="Cx", orig=("10.0.0.1", 40000),
          resp=("10.0.0.53", 53)) -> Datagram:
    return Datagram(uid=uid, ts=ts, payload=payload, from_orig=from_orig, orig_h=orig[0], orig_p=orig[1],
                    resp_h=resp[0], resp_p=resp[1])


def table_of(rows, schema):
    return pa.Table.from_pylist(rows, schema=schema)


# ---- DNS: parsing and answers ------------------------------------------------------------------

def test_answers_formatted_as_zeek():
    q = question("Mail.Example.COM", 15)
    an = [
        rr(PTR_Q, 15, struct.pack(">H", 10) + qname("mx1.example.com")),
        rr(PTR_Q, 5, qname("alias.example.net"), ttl=60),
        rr(PTR_Q, 1, bytes([192, 0, 2, 7])),
        rr(PTR_Q, 28, bytes.fromhex("20010db8000000000000000000000001")),
        rr(PTR_Q, 16, b"\x05hello\x03a,b"),
        rr(PTR_Q, 12, qname("host.example.org")),
        rr(PTR_Q, 2, qname("ns1.example.org")),
        rr(PTR_Q, 6, qname("ns.example.org") + qname("admin.example.org") + bytes(20)),
        rr(PTR_Q, 33, struct.pack(">HHH", 1, 2, 5060) + qname("sip.example.org")),
        rr(PTR_Q, 99, b"\x03v=1"),
        rr(PTR_Q, 4242, b"\x01\x02"),
        rr(PTR_Q, 13, b"\x01a\x01b"),  # HINFO: no answer text in Zeek
    ]
    s = dns.DnsSession("C1", "10.0.0.1", 40000, "10.0.0.53", 53)
    assert s.add(dgram(msg(qd=[q]))) == []
    rows = s.add(dgram(msg(flags=0x8580, qd=[q], an=an), ts=1_000_500_000, from_orig=False))
    assert len(rows) == 1
    r = rows[0]
    assert r["query"] == "mail.example.com" and r["qtype_name"] == "MX" and r["qclass_name"] == "C_INTERNET"
    assert r["answers"] == ["mx1.example.com", "alias.example.net", "192.0.2.7", "2001:db8::1", "TXT 5 hello TXT 3 a,b",
                            "host.example.org", "ns1.example.org", "ns.example.org", "sip.example.org", "SPF 3 v=1",
                            "<unknown type=4242>"]
    assert r["TTLs"][:2] == [300.0, 60.0]
    assert r["rtt"] == 500_000 and r["AA"] and r["RD"] and r["RA"] and not r["TC"]
    assert r["rcode_name"] == "NOERROR" and not r["malformed"] and r["flags_raw"] == 0x8580
    table_of(rows, dns.SCHEMA)


def test_malformed_messages_flagged():
    base = msg(qd=[question()])
    # compression loop: a pointer to itself
    loop = struct.pack(">HHHHHH", 1, 0x0100, 1, 0, 0, 0) + b"\xc0\x0c" + b"\x00\x01\x00\x01"
    # pointer past the end of the message
    oob = struct.pack(">HHHHHH", 1, 0x0100, 1, 0, 0, 0) + b"\x03www\xc3\xff" + b"\x00\x01\x00\x01"
    # two pointers that point at each other (backwards only: the second is refused)
    ping = struct.pack(">HHHHHH", 1, 0x8180, 1, 1, 0, 0) + b"\xc0\x12\x00\x01\x00\x01" + b"\xc0\x0c\x00\x01\x00\x01"
    truncated = base[:-3]
    absurd = struct.pack(">HHHHHH", 1, 0x0100, 4000, 0, 0, 0) + base[12:]
    many_answers = struct.pack(">HHHHHH", 1, 0x8180, 1, 65535, 0, 0) + base[12:] + rr(PTR_Q, 1, b"\1\2\3\4")
    bad_a = msg(flags=0x8180, qd=[question()], an=[rr(PTR_Q, 1, b"\1\2\3")])
    label_past_end = struct.pack(">HHHHHH", 1, 0x0100, 1, 0, 0, 0) + b"\x3fabc"
    for buf in (loop, oob, ping, truncated, absurd, many_answers, bad_a, label_past_end, b"", b"\x00" * 11):
        m = dns.parse_message(buf)
        assert m.malformed, buf
        rows = dns.parse_datagram(dgram(buf))
        assert len(rows) == 1 and rows[0]["malformed"]
        table_of(rows, dns.SCHEMA)
    m = dns.parse_message(many_answers)
    assert [a.reply for a in m.answers] == ["1.2.3.4"]  # what came before the break is kept
    assert not dns.parse_message(base).malformed


def test_pairing_as_zeek():
    q1 = msg(tid=7, qd=[question("a.example")])
    r1 = msg(tid=7, flags=0x8180, qd=[question("a.example")], an=[rr(PTR_Q, 1, b"\x01\x01\x01\x01")])
    q2 = msg(tid=8, qd=[question("b.example", 28)])
    lone = msg(tid=9, flags=0x8183, qd=[question("c.example")], ns=[rr(b"\0", 6, qname("x") + qname("y") + bytes(20))])
    s = dns.DnsSession("C1", "10.0.0.1", 40000, "10.0.0.53", 53)
    assert s.add(dgram(q1, ts=10)) == []
    assert s.add(dgram(q2, ts=11)) == []
    assert s.add(dgram(q1, ts=12)) == []           # a retransmission: another pending query
    rows = s.add(dgram(r1, ts=20, from_orig=False))
    assert len(rows) == 1 and rows[0]["ts"] == 10 and rows[0]["rtt"] == 10 and rows[0]["answers"] == ["1.1.1.1"]
    assert s.add(dgram(lone, ts=30, from_orig=False)) == []
    rest = s.close()
    assert [(r["trans_id"], r.get("query"), r.get("rcode_name")) for r in rest] == [
        (7, "a.example", None), (8, "b.example", None), (9, None, "NXDOMAIN")]
    # a response with no answer records: no rtt, AA/RA stay false (Zeek sets them per answer)
    s = dns.DnsSession("C2", "10.0.0.1", 40001, "10.0.0.53", 53)
    s.add(dgram(q2, ts=10))
    (row,) = s.add(dgram(msg(tid=8, flags=0x8583, qd=[question("b.example", 28)],
                             ns=[rr(b"\0", 6, qname("x") + qname("y") + bytes(20))]), ts=15, from_orig=False))
    assert row["rtt"] is None and not row["AA"] and not row["RA"] and row["rcode_name"] == "NXDOMAIN"
    # multicast: nothing paired, each message its own row
    s = dns.DnsSession("C3", "192.168.0.2", 5353, "224.0.0.251", 5353)
    assert len(s.add(dgram(msg(tid=0, flags=0, qd=[question("h.local")]), resp=("224.0.0.251", 5353)))) == 1
    assert s.close() == []
    # first message a response sent by the originator: roles flipped (Zeek's DNS analyzer)
    s = dns.DnsSession("C4", "10.0.0.53", 53, "10.0.0.1", 40000)
    s.add(dgram(r1, from_orig=True))
    (row,) = s.close()
    assert (row["orig_h"], row["orig_p"], row["resp_h"], row["resp_p"]) == ("10.0.0.1", 40000, "10.0.0.53", 53)
    # unknown opcode: a flagged row of its own
    (row,) = dns.DnsSession("C5", "a", 1, "b", 53).add(dgram(msg(flags=0x1000, qd=[question()])))
    assert row["malformed"] and row["opcode"] == 2


def test_names_as_sent_and_lower_cased():
    """Zeek's fields lower-case names, Suricata's keep them as sent. A query gives query_original
    only if its datagram had capitals; one without leaves it to the response's question."""
    s = dns.DnsSession("C1", "10.0.0.1", 40000, "10.0.0.53", 53)
    s.add(dgram(msg(tid=1, qd=[question("WWW.Example.com")])))
    (row,) = s.add(dgram(msg(tid=1, flags=0x8180, qd=[question("www.example.com")],
                             an=[rr(PTR_Q, 5, qname("Alias.Example.NET"))]), ts=2_000_000_000, from_orig=False))
    assert row["query"] == "www.example.com" and row["query_original"] == "WWW.Example.com"
    assert row["answers"] == ["alias.example.net"]
    assert row["answer_records"] == [{"rrname": "www.example.com", "rrtype": "CNAME", "ttl": 300,
                                      "rdata": "Alias.Example.NET"}]
    s.add(dgram(msg(tid=2, qd=[question("www.example.com")])))
    (row,) = s.add(dgram(msg(tid=2, flags=0x8180, qd=[question("WWW.EXAMPLE.COM")]), from_orig=False))
    assert row["query"] == "www.example.com" and row["query_original"] == "WWW.EXAMPLE.COM"


def test_netbios_name_decoded():
    enc = "".join(chr(65 + (b >> 4)) + chr(65 + (b & 15)) for b in b"WORKGROUP      \x00")
    s = dns.DnsSession("C1", "10.0.0.1", 137, "10.0.0.255", 137)
    s.add(dgram(msg(flags=0x0110, qd=[question(enc, 33)]), orig=("10.0.0.1", 137), resp=("10.0.0.255", 137)))
    (row,) = s.close()
    assert row["query"] == "WORKGROUP" and row["qtype_name"] == "NBSTAT"


def test_one_parse_gives_both_readings():
    """One parse as sent carries Zeek's lower-cased reading too (DnsMessage.lowered, Answer.lower):
    lower-cased, it equals parse_message's lower-cased parse (with authorities)."""
    def name(s: bytes) -> bytes:
        return b"".join(bytes([len(x)]) + x for x in s.split(b".")) + b"\0"

    soa = name(b"NS1.Ex\x01.COM") + name(b"Host\xc3Master.ex.com") + struct.pack(">IIIII", 1, 2, 3, 4, 5)
    cases = [
        (msg(flags=0x8180, qd=[question("WWW.Example.COM", 16)],
             an=[rr(PTR_Q, 16, b"\x05HeLLo\x03\x00AB"), rr(PTR_Q, 5, name(b"Target.EXAMPLE")),
                 rr(PTR_Q, 33, struct.pack(">HHH", 1, 2, 3) + name(b"SRV.Host")),
                 rr(PTR_Q, 46, bytes(18) + name(b"Signer.ORG")), rr(PTR_Q, 47, name(b"Next.ORG")),
                 rr(PTR_Q, 35, struct.pack(">HH", 1, 2) + b"\x01U\x03E2U\x02!X" + name(b"Repl.NET"))],
             ns=[rr(PTR_Q, 6, soa)]), 53),
        (msg(flags=0x2800, qd=[question("Zone.EXAMPLE", 6)],
             an=[rr(name(b"Pre.Zone.EXAMPLE"), 255, b"", ttl=0, rclass=254)],
             ns=[rr(name(b"Upd.Zone.EXAMPLE"), 5, name(b"DEL:x.Example"), ttl=0),
                 rr(name(b"A.Zone.EXAMPLE"), 1, bytes(4), ttl=0)]), 53),
        (msg(flags=0x0110, qd=[question("FHEPFCELEHFCEPFFFACACACACACACAAA", 32)]), 137),
        (msg(flags=0x8180, qd=[question("lower.example")], an=[rr(PTR_Q, 16, b"\x03TXT")]), 53),
    ]
    for buf, port in cases:
        sent = dns.parse_message(buf, netbios=port == 137, resp_port=port, keep_case=True)
        low = dns.parse_message(buf, netbios=port == 137, resp_port=port, keep_authorities=True)
        assert sent.lowered == (buf != cases[-1][0]) and not sent.malformed and not low.malformed
        assert [q.lower() for q, _, _ in sent.questions] == [q for q, _, _ in low.questions]
        assert [a.lower or (a.name, a.reply) for a in sent.answers] == [(a.name, a.reply) for a in low.answers]
        if not sent.lowered:
            assert sent == low
    sent = dns.parse_message(cases[0][0], keep_case=True)
    low = dns.parse_message(cases[0][0], keep_authorities=True)
    assert [a.reply for a in sent.answers] == [
        "TXT 5 HeLLo TXT 3 \\x00AB", "Target.EXAMPLE", "SRV.Host", "RRSIG 0 Signer.ORG", "NSEC WWW.Example.COM Next.ORG",
        "NAPTR 1 2 U E2U !X Repl.NET"]
    assert [a.reply for a in low.answers] == [  # names lower-cased, the strings of TXT and NAPTR as sent
        "TXT 5 HeLLo TXT 3 \\x00AB", "target.example", "srv.host", "RRSIG 0 signer.org", "NSEC www.example.com next.org",
        "NAPTR 1 2 U E2U !X repl.net"]
    assert low.answers[0].txt == ["HeLLo", "\\x00AB"] and low.answers[2].detail["srv"]["name"] == "srv.host"
    assert sent.authorities[0].detail["soa"]["mname"] == "NS1.Ex\\x01.COM"
    assert low.authorities[0].detail["soa"]["rname"] == "host\\xc3master.ex.com"
    low = dns.parse_message(cases[1][0])
    sent = dns.parse_message(cases[1][0], keep_case=True)
    assert [a.reply for a in low.answers] == ["pre: NameNotInUse pre.zone.example", "del:x.example", "add: A a.zone.example 0.0.0.0"]
    assert [a.reply for a in sent.answers] == ["pre: NameNotInUse Pre.Zone.EXAMPLE", "add: DEL:x.Example",
                                                "add: A A.Zone.EXAMPLE 0.0.0.0"]


def test_dns_over_tcp():
    q = msg(tid=5, qd=[question("t.example")])
    r = msg(tid=5, flags=0x8180, qd=[question("t.example")], an=[rr(PTR_Q, 1, b"\x05\x06\x07\x08")])
    data = struct.pack(">H", len(q)) + q + struct.pack(">H", len(q)) + q[:-2]
    msgs = dns.parse_tcp_messages(data)
    assert len(msgs) == 2 and not msgs[0].malformed and msgs[1].malformed and msgs[1].offset == len(q) + 2
    st = Stream(uid="Ct", orig_h="10.0.0.1", orig_p=40000, resp_h="10.0.0.53", resp_p=53,
                orig=Direction(data=struct.pack(">H", len(q)) + q, ts_offsets=np.array([0]), ts=np.array([100])),
                resp=Direction(data=struct.pack(">H", len(r)) + r, ts_offsets=np.array([0]), ts=np.array([150])))
    (row,) = dns.parse_stream(st)
    assert row["proto"] == "tcp" and row["answers"] == ["5.6.7.8"] and row["rtt"] == 50
    table_of([row], dns.SCHEMA)


def test_dns_over_tcp_resumes_after_a_gap():
    """A query lost in the client's direction: the queries after the gap are read again from
    the first packet that starts a message (Suricata's dns-tcp-ts-gap); a packet after a gap
    that starts in the middle of a message is skipped."""
    def framed(m):
        return struct.pack(">H", len(m)) + m
    qs = [framed(msg(tid=t, qd=[question(f"q{t}.example")])) for t in range(4)]
    rs = [framed(msg(tid=t, flags=0x8180, qd=[question(f"q{t}.example")], an=[rr(PTR_Q, 1, b"\x05\x06\x07\x08")]))
          for t in range(4)]
    # the client's bytes: q0, then q1 missing, then half of q2's packet missing, then q3
    half = len(qs[2]) // 2
    orig = qs[0] + qs[2][half:] + qs[3]
    starts = [0, len(qs[0]), len(qs[0]) + len(qs[2]) - half]
    resp = b"".join(rs)
    rstarts = np.cumsum([0] + [len(r) for r in rs[:-1]])
    st = Stream(uid="Ct", orig_h="10.0.0.1", orig_p=40000, resp_h="10.0.0.53", resp_p=53,
                orig=Direction(data=orig, gaps=[(len(qs[0]), len(qs[1]) + half)], ts_offsets=np.array(starts),
                               ts=np.array([100, 300, 400])),
                resp=Direction(data=resp, ts_offsets=rstarts, ts=np.array([150, 250, 350, 450])))
    rows = dns.parse_stream(st)
    by_id = {r["trans_id"]: r for r in rows}
    assert sorted(by_id) == [0, 1, 2, 3] and len(rows) == 4
    assert [by_id[t]["query"] for t in range(4)] == [f"q{t}.example" for t in range(4)]  # 1, 2: from the reply
    assert by_id[0]["rtt"] == 50 and by_id[3]["rtt"] == 50 and by_id[1]["rtt"] is None and by_id[2]["rtt"] is None
    assert not any(r["malformed"] for r in rows)


def _mutations(rng: random.Random, seeds: list[bytes], n: int):
    for i in range(n):
        k = i % 4
        if k == 0:
            yield rng.randbytes(rng.randrange(0, 80))
        elif k == 1:  # a real header with random body
            yield rng.choice(seeds)[:12] + rng.randbytes(rng.randrange(0, 120))
        else:
            b = bytearray(rng.choice(seeds))
            for _ in range(rng.randrange(1, 6)):
                op = rng.randrange(4)
                if op == 0 and b:
                    b[rng.randrange(len(b))] = rng.randrange(256)
                elif op == 1 and b:
                    del b[rng.randrange(len(b)):]
                elif op == 2:
                    p = rng.randrange(len(b) + 1)
                    b[p:p] = rng.randbytes(rng.randrange(1, 8))
                elif b:
                    p = rng.randrange(len(b))
                    b[p:p + 2] = rng.choice([b"\xc0\x0c", b"\xc0\x00", b"\xff\xff", b"\x3f", b"\x00"])
            yield bytes(b)


def _dns_seeds() -> list[bytes]:
    q = question("www.example.com", 255)
    return [
        msg(qd=[q]),
        msg(flags=0x8180, qd=[q], an=[rr(PTR_Q, t, d) for t, d in (
            (1, b"\1\2\3\4"), (5, qname("a.b")), (16, b"\3abc"), (46, bytes(18) + qname("sig.example")),
            (43, b"\0\1\5\2abc"), (44, b"\1\2" + bytes(20)), (29, bytes(16)), (35, b"\0\1\0\2\1u\3sip\0\0"),
            (6, qname("m") + qname("r") + bytes(20)), (47, qname("n.example") + b"\0\1\x40"))]),
        msg(tid=3, flags=0x2800, qd=[qname("zone.example") + b"\0\6\0\1"],
            an=[rr(qname("h.zone.example"), 5, b"", ttl=0, rclass=254)],
            ns=[rr(qname("h.zone.example"), 28, b"", ttl=0, rclass=255), rr(PTR_Q, 1, b"\1\2\3\4")],
            counts=(1, 1, 2, 0)),
    ]


def test_fuzz_dns_never_raises():
    rng = random.Random(20240601)
    seeds = _dns_seeds()
    n_malformed = 0
    sess = dns.DnsSession("Cf", "10.0.0.1", 40000, "10.0.0.53", 53)
    nb = dns.DnsSession("Cn", "10.0.0.1", 137, "10.0.0.2", 137)
    rows = []
    for i, buf in enumerate(_mutations(rng, seeds, 10_000)):
        d = dgram(buf, ts=i, from_orig=bool(i & 1))
        n_malformed += dns.parse_message(buf).malformed
        rows += sess.add(d)
        nb.add(d)
        rows += dns.parse_datagram(d)
        if i % 50 == 0:
            dns.parse_tcp_messages(buf)
    rows += sess.close() + nb.close()
    table_of(rows, dns.SCHEMA)  # every row fits the schema
    print(f"dns fuzz: 10000 inputs, {n_malformed} malformed, {len(rows)} rows, no exception")
    assert 0 < n_malformed < 10_000


# ---- DHCP --------------------------------------------------------------------------------------

def dhcp_msg(op=1, xid=0x1234, mtype=1, yiaddr="0.0.0.0", chaddr=b"\x00\x11\x22\x33\x44\x55", options=b"",
             cookie=dhcp.COOKIE) -> bytes:
    hdr = struct.pack(">BBBBIHH", op, 1, 6, 0, xid, 0, 0) + bytes(4)
    hdr += bytes(int(x) for x in yiaddr.split(".")) + bytes(8)
    hdr += chaddr.ljust(16, b"\0") + bytes(192) + struct.pack(">I", cookie)
    return hdr + bytes([53, 1, mtype]) + options + b"\xff"


def test_dhcp_exchange():
    t = dhcp.DhcpTracker()
    cli = dict(orig=("0.0.0.0", 68), resp=("255.255.255.255", 67))
    disc = dhcp_msg(options=b"\x0c\x04host" + b"\x37\x03\x01\x03\x06" + b"\x3c\x04MSFT" + b"\x32\x04\x0a\x00\x00\x05")
    offer = dhcp_msg(op=2, mtype=2, yiaddr="10.0.0.5", options=b"\x33\x04\x00\x00\x0e\x10\x0f\x07example")
    assert t.add(dgram(disc, ts=0, uid="Ca", **cli)) == []
    assert t.add(dgram(offer, ts=1000, from_orig=False, uid="Ca", **cli)) == []
    assert t.expire(3 * dhcp.NS) == []
    (row,) = t.expire(11 * dhcp.NS)
    assert row["msg_types"] == ["DISCOVER", "OFFER"] and row["mac"] == "00:11:22:33:44:55"
    assert row["host_name"] == "host" and row["requested_addr"] == "10.0.0.5" and row["assigned_addr"] == "10.0.0.5"
    assert row["lease_time"] == 3600.0 and row["domain"] == "example" and row["vendor_class"] == "MSFT"
    assert row["requested_options"] == [1, 3, 6] and row["duration"] == 1000 and row["client_addr"] == "10.0.0.5"
    table_of([row], dhcp.SCHEMA)
    # emit_on_reply: written at the ACK
    t = dhcp.DhcpTracker(emit_on_reply=True)
    t.add(dgram(dhcp_msg(mtype=3), uid="Cb", **cli))
    (row,) = t.add(dgram(dhcp_msg(op=2, mtype=5, yiaddr="10.0.0.6"), from_orig=False, uid="Cb", **cli))
    assert row["msg_types"] == ["REQUEST", "ACK"] and t.close() == []
    # BOOTP without the cookie, and short messages: malformed rows
    for buf in (dhcp_msg(cookie=0), b"\x01\x01", dhcp_msg()[:-1][:250] + b"\x0c\x40ab"):
        rows = dhcp.parse_datagram(dgram(buf, **cli))
        assert rows and rows[0]["malformed"], buf
        table_of(rows, dhcp.SCHEMA)


def test_fuzz_dhcp_never_raises():
    rng = random.Random(7)
    seeds = [dhcp_msg(options=b"\x0c\x04host\x3d\x07\x01\x00\x11\x22\x33\x44\x55\x51\x06\x00\x00\x00abc"),
             dhcp_msg(op=2, mtype=5, yiaddr="10.0.0.5", options=b"\x33\x04\x00\x00\x0e\x10\x38\x03err")]
    t = dhcp.DhcpTracker()
    rows = []
    for i, buf in enumerate(_mutations(rng, seeds, 10_000)):
        if i % 4 == 1:  # a real fixed header with random options
            buf = seeds[i % 2][:240] + rng.randbytes(rng.randrange(0, 60))
        d = dgram(buf, ts=i * 1000, from_orig=bool(i & 1), orig=("0.0.0.0", 68), resp=("255.255.255.255", 67))
        rows += t.expire(d.ts) + t.add(d) + dhcp.parse_datagram(d)
    rows += t.close()
    table_of(rows, dhcp.SCHEMA)
    print(f"dhcp fuzz: 10000 inputs, {len(rows)} rows, no exception")


# ---- agreement with Zeek -----------------------------------------------------------------------

def _nz(v):
    return None if v in ("-", None) else v


def _zbool(v):
    return v == "T"


DNS_FIELDS = ["query", "qclass", "qtype_name", "rcode_name", "AA", "TC", "RD", "RA", "Z", "answers", "TTLs",
              "rejected", "rtt_set", "opcode_name"]


def _ours_dns_view(r: dict) -> dict:
    return {
        "query": r.get("query"), "qclass": r.get("qclass"), "qtype_name": r.get("qtype_name"),
        "rcode_name": r.get("rcode_name"), "AA": r["AA"], "TC": r["TC"], "RD": r["RD"], "RA": r["RA"],
        "Z": r["Z"], "answers": sorted(r.get("answers") or []), "TTLs": sorted(r.get("TTLs") or []),
        "rejected": r["rejected"], "rtt_set": r.get("rtt") is not None, "opcode_name": r.get("opcode_name"),
    }


def _zeek_dns_view(z: dict) -> dict:
    return {
        "query": _nz(z["query"]), "qclass": None if _nz(z["qclass"]) is None else int(z["qclass"]),
        "qtype_name": _nz(z["qtype_name"]), "rcode_name": _nz(z["rcode_name"]),
        "AA": _zbool(z["AA"]), "TC": _zbool(z["TC"]), "RD": _zbool(z["RD"]), "RA": _zbool(z["RA"]),
        "Z": int(z["Z"]), "answers": sorted(zeek_vector(z["answers"]) or []),
        "TTLs": sorted(float(x) for x in zeek_vector(z["TTLs"]) or []), "rejected": _zbool(z["rejected"]),
        "rtt_set": _nz(z["rtt"]) is not None, "opcode_name": _nz(z.get("opcode_name", "-")),
    }


def _match(ours: list[dict], theirs: list[dict], key_full, key_loose):
    """Pairs (our row, their row): first on the full key, then on the loose one; unmatched theirs."""
    free = list(range(len(ours)))
    pairs, left = [], []
    for pass_key in (key_full, key_loose):
        nxt = []
        for z in (theirs if pass_key is key_full else left):
            k = pass_key(z, True)
            for j in free:
                if pass_key(ours[j], False) == k:
                    pairs.append((ours[j], z))
                    free.remove(j)
                    break
            else:
                nxt.append(z)
        left = nxt
    return pairs, left


def _dns_key(full: bool):
    def k(r, zeek):
        if zeek:
            t = (r["id.orig_h"], int(r["id.orig_p"]), r["id.resp_h"], int(r["id.resp_p"]), int(r["trans_id"]))
            return t + ((_nz(r["query"]),) if full else ())
        t = (r["orig_h"], r["orig_p"], r["resp_h"], r["resp_p"], r.get("trans_id"))
        return t + ((r.get("query"),) if full else ())
    return k


def dns_rows_for(test: dict, *, by_tuple: bool = False) -> list[dict]:
    ev = events_of(ZEEK / test["trace"], dns.PORTS, tcp=True, verify_checksums=" -C " not in test["command"])
    if by_tuple:  # one state per 4-tuple (ignores how the flow table splits sessions, e.g. by VLAN)
        for e in ev:
            if isinstance(e, Datagram):
                a, b = (e.orig_h, e.orig_p), (e.resp_h, e.resp_p)
                e.uid = "T" + repr(min(a, b) + max(a, b))
        ev = [e for e in ev if not isinstance(e, Closed)]
    rows = run_sessions(ev, dns.DnsSession.for_datagram)
    for s in tcp_streams(ev):
        rows += dns.parse_stream(s)
    return rows


def compare_dns(by_tuple: bool = False):
    tests = manifest_tests("dns")
    total = matched = 0
    agree = {f: 0 for f in DNS_FIELDS}
    misses = []
    for t in tests:
        theirs = read_zeek_log(ZEEK / t["logs"]["dns"])
        ours = dns_rows_for(t, by_tuple=by_tuple)
        pairs, left = _match(ours, theirs, _dns_key(True), _dns_key(False))
        total += len(theirs)
        matched += len(pairs)
        misses += [(t["name"], "unmatched", z.get("query")) for z in left]
        for o, z in pairs:
            ov, zv = _ours_dns_view(o), _zeek_dns_view(z)
            for f in DNS_FIELDS:
                if ov[f] == zv[f]:
                    agree[f] += 1
                else:
                    misses.append((t["name"], f, ov[f], zv[f]))
    return total, matched, agree, misses


def _report(log: str, total: int, matched: int, agree: dict, misses: list) -> str:
    parts = ", ".join(f"{f} {n}/{matched}" for f, n in agree.items())
    line = f"zeek {log}: {matched}/{total} rows matched; {parts}"
    print(line)
    for m in misses:
        print("   ", *[str(x)[:120] for x in m])
    return line


def test_zeek_dns_log_agreement():
    if not (ZEEK / "manifest.json").exists():
        pytest.skip("Zeek corpus not present")
    total, matched, agree, misses = compare_dns()
    _report("dns.log", total, matched, agree, misses)
    # Measured 2026-08: 36/38 matched (the 2 rows of core.tunnels.gre-over-udp: GRE over UDP
    # port 4754 is not decoded yet); loc and sshfp put query and response on two VLANs, which
    # the flow table keys apart (Zeek does not), so their rows split: see the 4-tuple figure.
    assert matched >= 36
    for f in DNS_FIELDS:
        assert agree[f] >= matched - 3, (f, agree[f], matched)
    # The same with one DNS state per 4-tuple: isolates the DNS module from session keying.
    total, matched, agree, misses = compare_dns(by_tuple=True)
    _report("dns.log (state per 4-tuple)", total, matched, agree, misses)
    assert matched >= 36
    for f in DNS_FIELDS:
        assert agree[f] == matched, (f, agree[f], matched)


DHCP_FIELDS = ["mac", "host_name", "client_fqdn", "domain", "client_addr", "server_addr", "requested_addr",
               "assigned_addr", "lease_time", "client_message", "server_message", "msg_types", "duration", "n_uids"]


def _ours_dhcp_view(r):
    v = {f: r.get(f) for f in DHCP_FIELDS}
    v["duration"] = round((r.get("duration") or 0) / 1e9, 6)
    v["n_uids"] = len(r.get("uids") or [])
    return v


def _zeek_dhcp_view(z):
    v = {f: _nz(z.get(f)) for f in DHCP_FIELDS}
    v["lease_time"] = None if v["lease_time"] is None else float(v["lease_time"])
    v["msg_types"] = zeek_vector(z["msg_types"]) or []
    v["duration"] = round(float(z["duration"]), 6)
    v["n_uids"] = len(zeek_vector(z["uids"]) or [])
    return v


def test_zeek_dhcp_log_agreement():
    if not (ZEEK / "manifest.json").exists():
        pytest.skip("Zeek corpus not present")
    total = matched = 0
    agree = {f: 0 for f in DHCP_FIELDS}
    misses = []

    def key(full):
        def k(r, zeek):
            types = zeek_vector(r["msg_types"]) if zeek else r["msg_types"]
            mac = _nz(r["mac"]) if zeek else r.get("mac")
            return (mac, tuple(types or ())) if full else (mac,)
        return k

    for t in manifest_tests("dhcp"):
        theirs = read_zeek_log(ZEEK / t["logs"]["dhcp"])
        ev = events_of(ZEEK / t["trace"], dhcp.PORTS, verify_checksums=" -C " not in t["command"])
        ours = run_tracker(ev, dhcp.DhcpTracker())
        table_of(ours, dhcp.SCHEMA)
        pairs, left = _match(ours, theirs, key(True), key(False))
        total += len(theirs)
        matched += len(pairs)
        misses += [(t["name"], "unmatched", z.get("msg_types")) for z in left]
        for o, z in pairs:
            ov, zv = _ours_dhcp_view(o), _zeek_dhcp_view(z)
            for f in DHCP_FIELDS:
                if ov[f] == zv[f]:
                    agree[f] += 1
                else:
                    misses.append((t["name"], f, ov[f], zv[f]))
    _report("dhcp.log", total, matched, agree, misses)
    # Measured 2026-08: 6/6 rows, every field.
    assert matched == total
    for f in DHCP_FIELDS:
        assert agree[f] == matched, f
