"""SSH handshakes: the `ssh` table (Zeek's ssh.log) with HASSH.

Per direction: optional lines before the identification string (servers may send some),
the "SSH-x.y-software" line, then (SSH2) the cleartext binary packets up to NEWKEYS. Read:
both KEXINITs (the negotiated algorithms as Zeek finds them: the client's first choice the
server also offers; HASSH = md5 of "kex;enc;mac;cmp" of the client's lists, HASSH-server
likewise for the server's) and the server's host key from the KEXDH/ECDH reply (msg 31) or
the DH-GEX reply (msg 33), fingerprinted as OpenSSH prints it (SHA256:base64).

`auth_success` follows Zeek's size heuristic over the encrypted segments (the first server
segment after the client's first encrypted one is SERVICE_ACCEPT; a segment 16 bytes
smaller later is USERAUTH_SUCCESS; segments the size of the first failure are further
failures); it is not attempted with compression on, as in Zeek. SSH1 sessions get the
banners and the version only. Nothing raises: a broken packet sets `malformed`.
"""

from __future__ import annotations

import base64
import hashlib

import numpy as np
import pyarrow as pa

from wiretrail.app._lines import text, usable
from wiretrail.app.base import SESSION_COLUMNS, Direction, Stream

TABLE = "ssh"
SCHEMA = pa.schema([
    *SESSION_COLUMNS,
    ("version", pa.int32()),               # 1 or 2, null when undetermined (one side missing)
    ("auth_success", pa.bool_()),          # Zeek's heuristic; null when undecided
    ("auth_attempts", pa.int32()),
    ("client", pa.string()),               # identification strings
    ("server", pa.string()),
    ("cipher_alg", pa.string()),
    ("mac_alg", pa.string()),
    ("compression_alg", pa.string()),
    ("kex_alg", pa.string()),
    ("host_key_alg", pa.string()),
    ("host_key", pa.string()),             # SHA256:<base64> of the server's host key blob
    ("hassh", pa.string()),
    ("hassh_server", pa.string()),
    ("hassh_algorithms", pa.string()),
    ("hassh_server_algorithms", pa.string()),
    ("malformed", pa.bool_()),
])
PORTS = {22}
NDPI = {"SSH"}

COMPRESSION = {"zlib", "zlib@openssh.com"}
MAX_PREBANNER = 8192
MAX_PACKET = 256 * 1024


class _Side:
    def __init__(self):
        self.banner: str | None = None
        self.banner_off = 0
        self.kexinit: list[list[str]] | None = None
        self.packets: list[tuple[int, bytes]] = []   # (msg type, payload) before NEWKEYS
        self.enc_start: int | None = None            # stream offset where encryption starts
        self.malformed = False


def _banner(data: bytes, side: _Side, server: bool) -> int | None:
    """Offset after the identification line, or None if there is none."""
    pos = 0
    limit = min(len(data), MAX_PREBANNER)
    while pos < limit:
        e = data.find(b"\n", pos, pos + 1024)
        if data.startswith(b"SSH-", pos):
            line = data[pos:e if e >= 0 else min(len(data), pos + 255)]
            side.banner = text(line.rstrip(b"\r").rstrip(b"\x00"))
            side.banner_off = pos
            return e + 1 if e >= 0 else len(data)
        if e < 0 or not server:
            return None
        pos = e + 1
    return None


def _name_lists(p: bytes, off: int, n: int) -> tuple[list[list[str]], bool]:
    out = []
    for _ in range(n):
        if off + 4 > len(p):
            return out, False
        ln = int.from_bytes(p[off:off + 4], "big")
        off += 4
        if off + ln > len(p):
            return out, False
        s = p[off:off + ln]
        off += ln
        out.append([text(x) for x in s.split(b",")] if s else [])
    return out, True


def _packets(data: bytes, pos: int, side: _Side) -> None:
    """Cleartext SSH2 binary packets from `pos` up to and including NEWKEYS."""
    n = len(data)
    while pos + 5 <= n and len(side.packets) < 64:
        plen = int.from_bytes(data[pos:pos + 4], "big")
        pad = data[pos + 4]
        if plen < 5 or plen > MAX_PACKET or pad >= plen:
            side.malformed = True
            return
        if pos + 4 + plen > n:
            return  # cut by the end of capture (or a gap)
        payload = data[pos + 5:pos + 4 + plen - pad]
        pos += 4 + plen
        if not payload:
            side.malformed = True
            return
        mt = payload[0]
        side.packets.append((mt, payload))
        if mt == 20 and side.kexinit is None:
            lists, ok = _name_lists(payload, 17, 10)
            if ok:
                side.kexinit = lists
            else:
                side.malformed = True
        elif mt == 21:
            side.enc_start = pos
            return


def _find(client: list[str], server: list[str]) -> str:
    ss = set(server)
    for a in client:
        if a in ss:
            return a
    return "Algorithm negotiation failed"


def _bidir(c: list[list[str]], s: list[list[str]], i: int) -> str:
    c2s, s2c = _find(c[i], s[i]), _find(c[i + 1], s[i + 1])
    return c2s if c2s == s2c else f"To server: {c2s}, to client: {s2c}"


def _hassh(k: list[list[str]], server: bool) -> tuple[str, str]:
    j = 1 if server else 0
    algs = ";".join(",".join(k[i]) for i in (0, 2 + j, 4 + j, 6 + j))
    return hashlib.md5(algs.encode()).hexdigest(), algs


def _version(client: str | None, server: str | None) -> int | None:
    """Zeek's set_version."""
    if not client or not server or len(client) <= 4 or len(server) <= 4:
        return None
    c, s = client[4], server[4]
    c199 = client[5:8] == ".99"
    s199 = server[5:8] == ".99"
    if c == "1" and s == "2":
        return 2 if c199 else None
    if c == "2" and s == "1":
        return 2 if s199 else None
    if c == "1" and s == "1":
        return 2 if (s199 and c199) else 1
    if c == "2" and s == "2":
        return 2
    return None


def _segments(d: Direction, start: int) -> list[tuple[int, int]]:
    """(ts, length) of the packets' new bytes at or after stream offset `start` (a packet
    straddling `start` counts with its part after it)."""
    data_len = len(usable(d))
    if start >= data_len or len(d.ts_offsets) == 0:
        return []
    offs = d.ts_offsets
    ends = np.append(offs[1:], data_len)
    out = []
    i0 = max(int(np.searchsorted(offs, start, side="right")) - 1, 0)
    for i in range(i0, min(len(offs), i0 + 4096)):
        a, b = max(int(offs[i]), start), min(int(ends[i]), data_len)
        if b > a:
            out.append((int(d.ts[i]), b - a))
    return out


def _auth(s: Stream, c: _Side, sv: _Side) -> tuple[bool | None, int]:
    """Zeek's ProcessEncrypted heuristic over the encrypted segments of both sides."""
    if c.enc_start is None and sv.enc_start is None:
        return None, 0
    segs = [(ts, 0, ln) for ts, ln in (_segments(s.orig, c.enc_start) if c.enc_start is not None else [])]
    segs += [(ts, 1, ln) for ts, ln in (_segments(s.resp, sv.enc_start) if sv.enc_start is not None else [])]
    segs.sort()
    saw_client = False
    accept = failure = 0
    skipped = False
    result: bool | None = None
    attempts = 0
    for _, from_server, ln in segs:
        if not from_server:
            saw_client = True
            continue
        if not saw_client:
            continue
        if not accept:
            accept = ln
            continue
        if not failure and ln + 16 == accept:
            return True, attempts + 1
        if not failure:
            if not skipped and ln - accept > 256:
                skipped = True
                continue
            failure = ln
            continue
        if ln == failure:
            result = False
            attempts += 1
            continue
        if ln - accept == -16:
            return True, attempts + 1
    return result, attempts


def parse_stream(s: Stream) -> list[dict]:
    try:
        return _parse(s)
    except Exception:  # a parser bug costs this session's row, never the ingest
        return [{"ts": s.orig.time_at(0) or s.resp.time_at(0), "uid": s.uid, "orig_h": s.orig_h,
                 "orig_p": s.orig_p, "resp_h": s.resp_h, "resp_p": s.resp_p, "malformed": True}]


def _parse(s: Stream) -> list[dict]:
    c, sv = _Side(), _Side()
    cdata, sdata = usable(s.orig), usable(s.resp)
    cpos = _banner(cdata, c, False)
    spos = _banner(sdata, sv, True)
    if c.banner is None and sv.banner is None:
        return []
    version = _version(c.banner, sv.banner)
    ssh2 = lambda b: b is not None and (b.startswith("SSH-2.") or b.startswith("SSH-1.99"))  # noqa: E731
    if cpos is not None and ssh2(c.banner) and version != 1:
        _packets(cdata, cpos, c)
    if spos is not None and ssh2(sv.banner) and version != 1:
        _packets(sdata, spos, sv)
    ts = min([t for t in (s.orig.time_at(c.banner_off) if c.banner else 0,
                          s.resp.time_at(sv.banner_off) if sv.banner else 0) if t] or [0])
    row = {"ts": ts, "uid": s.uid, "orig_h": s.orig_h, "orig_p": s.orig_p, "resp_h": s.resp_h,
           "resp_p": s.resp_p, "version": version, "client": c.banner, "server": sv.banner,
           "malformed": (c.malformed or sv.malformed) or None, "auth_attempts": 0}
    if c.kexinit:
        row["hassh"], row["hassh_algorithms"] = _hassh(c.kexinit, False)
    if sv.kexinit:
        row["hassh_server"], row["hassh_server_algorithms"] = _hassh(sv.kexinit, True)
    if c.kexinit and sv.kexinit:
        ck, sk = c.kexinit, sv.kexinit
        row["cipher_alg"] = _bidir(ck, sk, 2)
        row["mac_alg"] = _bidir(ck, sk, 4)
        row["compression_alg"] = _bidir(ck, sk, 6)
        row["kex_alg"] = _find(ck[0], sk[0])
        row["host_key_alg"] = _find(ck[1], sk[1])
        kex = row["kex_alg"]
        want = 33 if "group-exchange" in kex else (None if kex.startswith("gss") else 31)
        for mt, p in sv.packets:
            if mt == want and len(p) >= 5:
                ln = int.from_bytes(p[1:5], "big")
                blob = p[5:5 + ln]
                if ln and len(blob) == ln:
                    digest = base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
                    row["host_key"] = "SHA256:" + digest
                break
        if version == 2 and row["compression_alg"] not in COMPRESSION:
            row["auth_success"], row["auth_attempts"] = _auth(s, c, sv)
    return [row]
