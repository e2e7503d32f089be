"""A sample capture made by Wiretrail itself, with its ground truth.

Used by the README's end-to-end run and by tests that need known answers: every
session the generator writes is listed with its 5-tuple, the Zeek conn_state it must
get, and its packet counts. The traffic is a small office network over two hours:
web browsing with TCP handshakes, data and FIN teardown, DNS, ping, rejected
connections, a VLAN-tagged server segment, one fragmented UDP datagram, and a short
SYN scan. Per-packet Python is fine here: this is a generator, not the hot path.
"""

from __future__ import annotations

import random
import struct
from dataclasses import dataclass, field
from pathlib import Path

from wiretrail.errors import WiretrailError

START_NS = 1_714_557_600 * 1_000_000_000  # 2024-05-01 10:00:00 UTC
SPAN_NS = 2 * 3600 * 1_000_000_000


def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def _ip4(a: str) -> bytes:
    return bytes(int(x) for x in a.split("."))


def _mac(n: int) -> bytes:
    return bytes([0x02, 0x00, 0x5E, (n >> 16) & 0xFF, (n >> 8) & 0xFF, n & 0xFF])


@dataclass
class TruthSession:
    proto: str
    orig_h: str
    orig_p: int
    resp_h: str
    resp_p: int
    conn_state: str
    orig_pkts: int = 0
    resp_pkts: int = 0
    orig_bytes: int = 0
    resp_bytes: int = 0
    vlan: int | None = None
    frames: list[int] = field(default_factory=list)  # indices into the capture's frames


class _Builder:
    def __init__(self):
        self.frames: list[tuple[int, bytes]] = []
        self.ip_id = 1

    def ipv4(self, src: str, dst: str, proto: int, payload: bytes, *, frag: int = 0, ident=None) -> bytes:
        ident = self.ip_id if ident is None else ident
        self.ip_id = (self.ip_id + 1) & 0xFFFF
        hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), ident, frag, 64, proto, 0,
                          _ip4(src), _ip4(dst))
        hdr = hdr[:10] + struct.pack("!H", _csum(hdr)) + hdr[12:]
        return hdr + payload

    @staticmethod
    def l4_checksum(src: str, dst: str, proto: int, segment: bytes, csum_at: int) -> bytes:
        pseudo = _ip4(src) + _ip4(dst) + struct.pack("!BBH", 0, proto, len(segment))
        c = _csum(pseudo + segment)
        return segment[:csum_at] + struct.pack("!H", c) + segment[csum_at + 2:]

    def tcp(self, src, dst, sport, dport, seq, ack, flags, data=b"", win=64240) -> bytes:
        seg = struct.pack("!HHIIBBHHH", sport, dport, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF, 0x50, flags,
                          win, 0, 0) + data
        return self.ipv4(src, dst, 6, self.l4_checksum(src, dst, 6, seg, 16))

    def udp(self, src, dst, sport, dport, data) -> bytes:
        seg = struct.pack("!HHHH", sport, dport, 8 + len(data), 0) + data
        return self.ipv4(src, dst, 17, self.l4_checksum(src, dst, 17, seg, 6))

    def icmp_echo(self, src, dst, type_, ident, seq, data) -> bytes:
        msg = struct.pack("!BBHHH", type_, 0, 0, ident, seq) + data
        msg = msg[:2] + struct.pack("!H", _csum(msg)) + msg[4:]
        return self.ipv4(src, dst, 1, msg)

    def emit(self, ts: int, ip_packet: bytes, src_mac: int, dst_mac: int, vlan: int | None) -> int:
        if vlan is None:
            eth = _mac(dst_mac) + _mac(src_mac) + b"\x08\x00"
        else:
            eth = _mac(dst_mac) + _mac(src_mac) + struct.pack("!HHH", 0x8100, vlan, 0x0800)
        frame = eth + ip_packet
        if len(frame) < 60:
            frame += b"\0" * (60 - len(frame))  # Ethernet padding: must not count as payload
        self.frames.append((ts, frame))
        return len(self.frames) - 1


def _host(rng: random.Random, net: str) -> str:
    return f"{net}.{rng.randint(2, 250)}"


def generate(sessions: int = 2000, seed: int = 1) -> tuple[list[tuple[int, bytes]], list[TruthSession]]:
    """Frames (ts_ns, bytes) in time order, and the sessions they make."""
    rng = random.Random(seed)
    b = _Builder()
    truth: list[TruthSession] = []
    servers = [f"93.184.{rng.randint(0, 255)}.{rng.randint(1, 254)}" for _ in range(40)]
    vlan_servers = [f"10.20.0.{i}" for i in range(10, 20)]
    used_ports: set[tuple[str, int]] = set()
    used_icmp: set[tuple[str, str]] = set()

    def ephemeral(client: str) -> int:
        while True:
            p = rng.randint(32768, 60999)
            if (client, p) not in used_ports:
                used_ports.add((client, p))
                return p

    def add(ts, pkt, orig: bool, s: TruthSession, client_mac, server_mac, payload_len):
        idx = b.emit(ts, pkt, client_mac if orig else server_mac, server_mac if orig else client_mac, s.vlan)
        s.frames.append(idx)
        if orig:
            s.orig_pkts += 1
            s.orig_bytes += payload_len
        else:
            s.resp_pkts += 1
            s.resp_bytes += payload_len

    starts = sorted(rng.randrange(0, SPAN_NS - 120 * 10**9) for _ in range(sessions))
    events = []  # (ts, builder-closure) generated per session then sorted by time
    for n, t0 in enumerate(starts):
        t = START_NS + t0
        kind = rng.random()
        client = _host(rng, "192.168.1")
        cmac, smac = 100 + int(client.rsplit(".", 1)[1]), 1
        if kind < 0.55:  # web session, possibly on the VLAN segment
            vlan = 20 if rng.random() < 0.2 else None
            server = rng.choice(vlan_servers if vlan else servers)
            cport, sport = ephemeral(client), rng.choice([80, 443, 8080])
            s = TruthSession("tcp", client, cport, server, sport, "SF", vlan=vlan)
            isn_c, isn_s = rng.getrandbits(32), rng.getrandbits(32)
            rtt = rng.randint(1, 80) * 1_000_000
            req = b"GET /" + bytes(rng.choice(b"abcdefgh") for _ in range(rng.randint(1, 30))) + b" HTTP/1.1\r\nHost: example\r\n\r\n"
            body = [bytes([65 + (i % 26)]) * rng.randint(100, 1300) for i in range(rng.randint(1, 6))]
            head = (f"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                    f"Content-Length: {sum(map(len, body))}\r\n\r\n").encode()
            resp_chunks = [head + body[0], *body[1:]]  # a real response: header, then the body
            seq_c, seq_s = isn_c + 1, isn_s + 1
            plan = [(0, True, b.tcp(client, server, cport, sport, isn_c, 0, 0x02), 0),
                    (rtt, False, b.tcp(server, client, sport, cport, isn_s, seq_c, 0x12), 0),
                    (rtt * 2, True, b.tcp(client, server, cport, sport, seq_c, seq_s, 0x10), 0),
                    (rtt * 2 + 1000, True, b.tcp(client, server, cport, sport, seq_c, seq_s, 0x18, req), len(req))]
            seq_c += len(req)
            dt = rtt * 3
            for chunk in resp_chunks:
                plan.append((dt, False, b.tcp(server, client, sport, cport, seq_s, seq_c, 0x18, chunk), len(chunk)))
                seq_s += len(chunk)
                dt += 200_000
            plan.append((dt + rtt, True, b.tcp(client, server, cport, sport, seq_c, seq_s, 0x10), 0))
            plan.append((dt + rtt + 1000, True, b.tcp(client, server, cport, sport, seq_c, seq_s, 0x11), 0))
            plan.append((dt + 2 * rtt, False, b.tcp(server, client, sport, cport, seq_s, seq_c + 1, 0x11), 0))
            plan.append((dt + 3 * rtt, True, b.tcp(client, server, cport, sport, seq_c + 1, seq_s + 1, 0x10), 0))
        elif kind < 0.85:  # DNS query and answer
            server = "192.168.1.1"
            cport = ephemeral(client)
            s = TruthSession("udp", client, cport, server, 53, "SF")
            qid = rng.getrandbits(16)
            name = b"".join(bytes([len(p)]) + p for p in (b"host%d" % n, b"example", b"com")) + b"\0"
            query = struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + name + b"\0\x01\0\x01"
            answer = (struct.pack("!HHHHHH", qid, 0x8180, 1, 1, 0, 0) + name + b"\0\x01\0\x01"
                      + b"\xc0\x0c\0\x01\0\x01\0\0\x0e\x10\0\x04" + _ip4(rng.choice(servers)))
            rtt = rng.randint(1, 30) * 1_000_000
            plan = [(0, True, b.udp(client, server, cport, 53, query), len(query)),
                    (rtt, False, b.udp(server, client, 53, cport, answer), len(answer))]
        elif kind < 0.93:  # ping: echo request/reply pairs
            server = rng.choice(servers)
            tries = 0
            while (client, server) in used_icmp:  # ICMP has no ports: one ping session per pair
                tries += 1
                server = (rng.choice(servers) if tries < 50
                          else f"198.51.{rng.randint(0, 255)}.{rng.randint(1, 254)}")
            used_icmp.add((client, server))
            ident = rng.getrandbits(16)
            s = TruthSession("icmp", client, 8, server, 0, "OTH")
            plan = []
            for i in range(rng.randint(1, 4)):
                data = bytes(range(48))
                plan.append((i * 1_000_000_000, True, b.icmp_echo(client, server, 8, ident, i, data), len(data)))
                plan.append((i * 1_000_000_000 + 5_000_000, False, b.icmp_echo(server, client, 0, ident, i, data), len(data)))
        else:  # connection refused
            server = rng.choice(servers)
            cport = ephemeral(client)
            s = TruthSession("tcp", client, cport, server, 25, "REJ")
            isn = rng.getrandbits(32)
            plan = [(0, True, b.tcp(client, server, cport, 25, isn, 0, 0x02), 0),
                    (3_000_000, False, b.tcp(server, client, 25, cport, 0, isn + 1, 0x14, win=0), 0)]
        truth.append(s)
        for dt, orig, pkt, plen in plan:
            events.append((t + dt, len(events), pkt, orig, s, cmac, smac, plen))

    # One fragmented UDP datagram (a 3,000-byte syslog burst) and a 50-port SYN scan.
    t = START_NS + SPAN_NS // 2
    src, dst = "192.168.1.77", "10.20.0.5"
    s = TruthSession("udp", src, 40514, dst, 514, "S0")
    data = bytes(i & 0xFF for i in range(3000))
    seg = struct.pack("!HHHH", 40514, 514, 8 + len(data), 0) + data
    seg = b.l4_checksum(src, dst, 17, seg, 6)
    ident = 0x4242
    for k, off in enumerate(range(0, len(seg), 1480)):
        part = seg[off: off + 1480]
        more = 0x2000 if off + 1480 < len(seg) else 0
        events.append((t + k * 1000, len(events), b.ipv4(src, dst, 17, part, frag=more | (off // 8), ident=ident),
                       True, s, 177, 1, 0))
    s.orig_pkts, s.orig_bytes = 1, len(data)  # Zeek counts the reassembled datagram once
    s.frames = []
    truth.append(s)
    frag_truth = s
    scanner, target = "203.0.113.66", "192.168.1.10"
    for i, port in enumerate(range(1, 51)):
        s = TruthSession("tcp", scanner, 50000, target, port, "REJ")
        events.append((t + 10**9 + i * 100_000, len(events), b.tcp(scanner, target, 50000, port, 1000, 0, 0x02), True, s, 66, 10, 0))
        events.append((t + 10**9 + i * 100_000 + 50_000, len(events), b.tcp(target, scanner, port, 50000, 0, 1001, 0x14, win=0), False, s, 66, 10, 0))
        truth.append(s)

    events.sort(key=lambda e: (e[0], e[1]))
    for ts, _, pkt, orig, s, cmac, smac, plen in events:
        if s is frag_truth:
            s.frames.append(b.emit(ts, pkt, cmac, smac, None))
            continue
        add(ts, pkt, orig, s, cmac, smac, plen)
    return b.frames, truth


def write_pcap(path: Path, frames: list[tuple[int, bytes]], nanosecond: bool = False) -> None:
    magic = 0xA1B23C4D if nanosecond else 0xA1B2C3D4
    with open(path, "wb") as f:
        f.write(struct.pack("<IHHiIII", magic, 2, 4, 0, 0, 262144, 1))
        for ts, frame in frames:
            sec, frac = divmod(ts, 1_000_000_000)
            if not nanosecond:
                frac //= 1000
            f.write(struct.pack("<IIII", sec, frac, len(frame), len(frame)))
            f.write(frame)


def write_sample(out: Path, sessions: int = 2000, seed: int = 1) -> int:
    frames, _ = generate(sessions, seed)
    try:
        write_pcap(Path(out), frames)
    except OSError as err:
        raise WiretrailError(f"cannot write {out}: {err.strerror}") from None
    return len(frames)
