"""QUIC Initial packets: decrypt the client's Initial (RFC 9001 section 5) to read its
TLS ClientHello: SNI, ALPN and the JA4 fingerprint (with `q`).

Keys come from the Destination Connection ID of the client's first Initial (HKDF-SHA256
with the version's salt; "client in", then "quic key"/"quic iv"/"quic hp", or the
"quicv2 ..." labels for QUIC v2); header protection is AES-128-ECB over a 16-byte sample,
the payload AES-128-GCM. CRYPTO frames are put back in offset order, so a ClientHello
spread over several Initial packets or datagrams (large post-quantum key shares) is read
once it is whole.

Versions: v1, v2 and the drafts (each draft range's salt), mvfst's; Google QUIC up to Q046
sends its client hello (CHLO, tag/value pairs: SNI, UAID...) in clear, read as it is; Google's
T050/T051 (TLS) and Q050 (CHLO) use Initial packets with salts of their own (those are in,
but no capture at hand exercises them).

`parse_initial(payload)` reads one UDP payload (coalesced packets included);
`parse_initials(payloads)` reads the first client datagrams of a session together.
`parse_datagram` is the protocol-module entry point (table `quic`, one row per session
whose ClientHello was read). Nothing raises: undecryptable input gives None / no row.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections import OrderedDict

import numpy as np
import pyarrow as pa

from wiretrail.app import tls
from wiretrail.app.base import SESSION_COLUMNS, Datagram

TABLE = "quic"
SCHEMA = pa.schema([
    *SESSION_COLUMNS,
    ("version", pa.string()),       # QUIC version: "1", "2", Google's ("Q046", "T051"), or hex
    ("client_initial_dcid", pa.string()),
    ("server_name", pa.string()),
    ("alpn", pa.list_(pa.string())),
    ("ja4", pa.string()),
    ("user_agent", pa.string()),    # Google QUIC's CHLO only (its UAID tag)
    ("malformed", pa.bool_()),
])
PORTS = {443, 80, 8443}
NDPI = {"QUIC"}

V1 = 0x00000001
V2 = 0x6B3343CF
Q050, T050, T051 = 0x51303530, 0x54303530, 0x54303531  # Google's QUIC over Initial packets
_SALT_V1 = bytes.fromhex("38762cf7f55934b34d179ae6a4c80cadccbb7f0a")
_SALT_V2 = bytes.fromhex("0dede3def700a6db819381be6e269dcbf9bd2ed9")
_SALT_GOOGLE = {Q050: bytes.fromhex("504574efd066fe2f9d945cfcdbd3a7f0d3b56b45"),
                T050: bytes.fromhex("7ff579e5acd072915580304c43a2367c60488310"),
                T051: bytes.fromhex("7a4edef4e7ccee5fa4506c19124fc8ccda6e033d")}
# the drafts' salts, by the last draft that used each (RFC 9001's history; Wireshark, nDPI)
_SALT_DRAFTS = ((22, bytes.fromhex("7fbcdb0e7c66bbe9193a96cd21519ebd7a02644a")),
                (28, bytes.fromhex("c3eef712c72ebb5a11a7d2432bb46365bef9f502")),
                (32, bytes.fromhex("afbfec289993d24c9e9786f19c6111e04390a899")),
                (34, _SALT_V1))
_MVFST_DRAFT = {0xFACEB001: 22, 0xFACEB002: 27, 0xFACEB00E: 27}  # Facebook's mvfst versions
_LABELS = {V2: ("quicv2 key", "quicv2 iv", "quicv2 hp")}
_INITIAL_TYPE = {V2: 1}  # long-header packet type of Initial (0 in v1 and drafts)


def _salt(version: int) -> bytes:
    """The Initial salt of a QUIC version (v1's for a version not known: a guess that costs
    only a failed decryption)."""
    if version == V2:
        return _SALT_V2
    if version in _SALT_GOOGLE:
        return _SALT_GOOGLE[version]
    draft = version & 0xFF if version >> 8 == 0xFF0000 else _MVFST_DRAFT.get(version)
    if draft:
        for last, salt in _SALT_DRAFTS:
            if draft <= last:
                return salt
    return _SALT_V1


def _hkdf_extract(salt: bytes, ikm: bytes) -> bytes:
    return hmac.new(salt, ikm, hashlib.sha256).digest()


def _hkdf_expand_label(secret: bytes, label: str, length: int) -> bytes:
    full = b"tls13 " + label.encode()
    info = length.to_bytes(2, "big") + bytes([len(full)]) + full + b"\x00"
    out, t, i = b"", b"", 1
    while len(out) < length:
        t = hmac.new(secret, t + info + bytes([i]), hashlib.sha256).digest()
        out += t
        i += 1
    return out[:length]


def initial_keys(dcid: bytes, version: int = V1, side: str = "client") -> tuple[bytes, bytes, bytes]:
    """(key, iv, hp) of the client's (or, side="server", the server's) Initial packets."""
    secret = _hkdf_expand_label(_hkdf_extract(_salt(version), dcid), f"{side} in", 32)
    lk, li, lh = _LABELS.get(version, ("quic key", "quic iv", "quic hp"))
    return (_hkdf_expand_label(secret, lk, 16), _hkdf_expand_label(secret, li, 12),
            _hkdf_expand_label(secret, lh, 16))


def _varint(b: bytes, p: int) -> tuple[int, int]:
    if p >= len(b):
        raise ValueError("varint")
    n = 1 << (b[p] >> 6)
    if p + n > len(b):
        raise ValueError("varint")
    v = b[p] & 0x3F
    for k in range(1, n):
        v = (v << 8) | b[p + k]
    return v, p + n


def _packets(payload: bytes):
    """(version, dcid, header bytes through the length field, pn offset, packet end) of the
    long-header Initial packets in one datagram."""
    p = 0
    while p + 7 <= len(payload):
        b0 = payload[p]
        if not b0 & 0x80:
            return  # short header: no more long-header packets
        version = int.from_bytes(payload[p + 1:p + 5], "big")
        if version == 0:
            return  # version negotiation
        q = p + 5
        dl = payload[q]
        dcid = payload[q + 1:q + 1 + dl]
        q += 1 + dl
        if q >= len(payload):
            return
        sl = payload[q]
        q += 1 + sl
        ptype = (b0 >> 4) & 3
        is_initial = ptype == _INITIAL_TYPE.get(version, 0)
        if is_initial:
            tl, q = _varint(payload, q)
            q += tl
        if ptype == (3 if version != V2 else 0):  # Retry: no length field, ends the datagram
            return
        ln, q = _varint(payload, q)
        end = q + ln
        if end > len(payload):
            return
        if is_initial and len(dcid) <= 20:
            yield version, bytes(dcid), p, q, end
        p = end


def _decrypt(payload: bytes, start: int, pn_off: int, end: int, keys) -> bytes | None:
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    key, iv, hp = keys
    if pn_off + 4 + 16 > end:
        return None
    sample = payload[pn_off + 4:pn_off + 20]
    enc = Cipher(algorithms.AES(hp), modes.ECB()).encryptor()
    mask = enc.update(sample) + enc.finalize()
    b0 = payload[start] ^ (mask[0] & 0x0F)
    pn_len = (b0 & 3) + 1
    pn_bytes = bytes(payload[pn_off + k] ^ mask[1 + k] for k in range(pn_len))
    header = bytes([b0]) + payload[start + 1:pn_off] + pn_bytes
    pn = int.from_bytes(pn_bytes, "big")
    nonce = (int.from_bytes(iv, "big") ^ pn).to_bytes(12, "big")
    try:
        return AESGCM(key).decrypt(nonce, payload[pn_off + pn_len:end], header)
    except Exception:
        return None


def _google_version(payload: bytes) -> str | None:
    """The version of a Google QUIC client packet whose handshake travels in clear ("Q043"
    and older: the public header with its version flag; "Q046": a long header), else None."""
    if len(payload) < 5:
        return None
    b0 = payload[0]
    if b0 & 0x80:
        at = 1
    elif b0 & 0x41 == 0x01:  # the version flag; 0x40 is set in IETF short headers, never here
        at = 9 if b0 & 0x08 else 1  # an 8-byte connection id first
    else:
        return None
    v = payload[at:at + 4]
    if len(v) == 4 and v[:1] == b"Q" and v[1:].isdigit() and int(v[1:]) <= 46:
        return v.decode()
    return None


def _chlo_tags(data: bytes) -> dict[bytes, bytes] | None:
    """The tag/value map of the first Google QUIC client hello ("CHLO") in `data`: after the
    message tag, a little-endian entry count and two bytes of padding, then per entry its
    4-byte tag and the end offset of its value (the values follow the entries). Values that
    run past the data (a hello cut short) are left out; None when no CHLO is there."""
    at = data.find(b"CHLO")
    if at < 0 or at + 8 > len(data):
        return None
    count = int.from_bytes(data[at + 4:at + 6], "little")
    values = at + 8 + 8 * count
    if count > 256 or values > len(data):
        return None
    tags, start = {}, 0
    for k in range(count):
        e = at + 8 + 8 * k
        end = int.from_bytes(data[e + 4:e + 8], "little")
        if end < start or values + end > len(data):
            break
        tags[data[e:e + 4]] = data[values + start:values + end]
        start = end
    return tags


def _chlo_row(tags: dict[bytes, bytes]) -> dict:
    def text(tag):
        v = tags.get(tag)
        return v.decode("utf-8", "backslashreplace") if v else None
    return {"complete": True, "server_name": text(b"SNI\x00"), "user_agent": text(b"UAID")}


_NOT_PADDING = re.compile(rb"[^\x00]")


def _crypto_frames(plain: bytes, out: dict[int, bytes]) -> None:
    p = 0
    n = len(plain)
    while p < n:
        ft = plain[p]
        p += 1
        if ft == 0x00:                        # PADDING: a run of them, to 1200 bytes, skipped at once
            more = _NOT_PADDING.search(plain, p)
            if more is None:
                return
            p = more.start()
            continue
        if ft == 0x01:                        # PING
            continue
        if ft in (0x02, 0x03):                # ACK
            _, p = _varint(plain, p)
            _, p = _varint(plain, p)
            cnt, p = _varint(plain, p)
            _, p = _varint(plain, p)
            for _ in range(cnt):
                _, p = _varint(plain, p)
                _, p = _varint(plain, p)
            if ft == 0x03:
                for _ in range(3):
                    _, p = _varint(plain, p)
        elif ft == 0x06:                      # CRYPTO
            off, p = _varint(plain, p)
            ln, p = _varint(plain, p)
            if p + ln > n:
                raise ValueError("crypto")
            out.setdefault(off, plain[p:p + ln])
            p += ln
        elif ft in (0x1C, 0x1D):              # CONNECTION_CLOSE
            return
        else:
            return  # not allowed in Initial packets: stop reading this packet


def _assemble(chunks: dict[int, bytes]) -> bytes:
    buf = bytearray()
    for off in sorted(chunks):
        c = chunks[off]
        if off > len(buf):
            break
        if off + len(c) > len(buf):
            buf += c[len(buf) - off:]
    return bytes(buf)


def parse_initials(payloads: list[bytes]) -> dict | None:
    """ClientHello facts from the client's first datagrams; None if none decrypts."""
    reader = _Initials()
    for payload in payloads:
        reader.add(payload)
    return reader.result()


class _Initials:
    """The client's Initial packets of one session, read one datagram at a time: each is
    decrypted once, when it comes (parse_datagram used to decrypt every datagram kept so far
    again at each new one)."""

    def __init__(self, ts: int = 0):
        self.ts = ts          # the time of the session's first Initial datagram
        self.datagrams = 0    # datagrams added
        self.chunks: dict[int, bytes] = {}  # CRYPTO frames' bytes by offset
        self.first: tuple[int, bytes] | None = None  # (version, DCID) of the first Initial read
        self.keys: dict[tuple[int, bytes], tuple] = {}
        self.failed = False  # a datagram could not be read at all: no answer, as for all of them
        self.chlo: tuple[str, dict] | None = None  # Google QUIC's clear CHLO: (version, tags)

    def add(self, payload: bytes) -> None:
        self.datagrams += 1
        if self.failed:
            return
        try:
            self._add(bytes(payload))
        except Exception:
            self.failed = True

    def _add(self, payload: bytes) -> None:
        google = _google_version(payload)
        if google is not None:
            if self.chlo is None:
                tags = _chlo_tags(payload)
                if tags is not None:
                    self.chlo = (google, tags)
            return
        first = self.first
        for version, dcid, start, pn_off, end in _packets(payload):
            tried = [first[1]] if first and first[0] == version else []
            if dcid not in tried:
                tried.append(dcid)
            for cand in tried:
                k = self.keys.get((version, cand))
                if k is None:
                    k = self.keys[(version, cand)] = initial_keys(cand, version)
                plain = _decrypt(payload, start, pn_off, end, k)
                if plain is not None:
                    if first is None:
                        first = self.first = (version, cand)
                    try:
                        _crypto_frames(plain, self.chunks)
                    except ValueError:
                        pass
                    break

    def result(self) -> dict | None:
        if self.chlo is not None:
            return {"version": self.chlo[0], "dcid": None, **_chlo_row(self.chlo[1])}
        if self.failed or self.first is None:
            return None
        try:
            return self._result()
        except Exception:
            return None

    def _result(self) -> dict:
        first = self.first
        data = _assemble(self.chunks)
        out = {"version": _version_name(first[0]), "dcid": first[1].hex(),
               "complete": False}
        if first[0] == Q050:  # Google's handshake, not TLS, inside the Initial packets
            tags = _chlo_tags(data[:4096])
            if tags is not None:
                out.update(_chlo_row(tags))
            return out
        if len(data) >= 4 and data[0] == 1:
            ln = int.from_bytes(data[1:4], "big")
            if len(data) >= 4 + ln:
                ch = tls.parse_client_hello(data[4:4 + ln])
                out.update(complete=True, server_name=ch.sni,
                           alpn=[a.decode("utf-8", "backslashreplace") for a in ch.alpn] or None,
                           ja4=tls.ja4(ch, "q"), ja3=tls.ja3(ch), malformed=ch.malformed, client_hello=ch)
        return out


def _version_name(version: int) -> str:
    """"1", "2", Google's as they read ("T051"), others in hex ("ff00001d": draft-29)."""
    if version in (V1, V2):
        return "1" if version == V1 else "2"
    raw = version.to_bytes(4, "big")
    if raw[:1] in (b"Q", b"T") and raw[1:].isdigit():
        return raw.decode()
    return "%08x" % version


def _version_number(name: str) -> int:
    """_version_name's inverse."""
    if name in ("1", "2"):
        return V1 if name == "1" else V2
    return int.from_bytes(name.encode(), "big") if name[:1] in "QT" else int(name, 16)


def parse_server_initials(payloads: list[bytes], dcid: bytes, version: int = V1) -> dict | None:
    """Negotiated version, cipher and key-share group from the server's Initial packets
    (keys from the client's first DCID, `dcid`); None if none decrypts."""
    try:
        keys = initial_keys(dcid, version, "server")
        chunks: dict[int, bytes] = {}
        ok = False
        for payload in payloads:
            payload = bytes(payload)
            for v, _dc, start, pn_off, end in _packets(payload):
                if v != version:
                    continue
                plain = _decrypt(payload, start, pn_off, end, keys)
                if plain is not None:
                    ok = True
                    try:
                        _crypto_frames(plain, chunks)
                    except ValueError:
                        pass
        if not ok:
            return None
        data = _assemble(chunks)
        if len(data) < 4 or data[0] != 2:
            return {}
        ln = int.from_bytes(data[1:4], "big")
        sh = tls.parse_server_hello(data[4:4 + ln])
        ver = sh.selected_version or sh.version
        return {"version": tls._version_name(ver),
                "cipher": tls.CIPHERS.get(sh.cipher, "unknown-%d" % sh.cipher) if sh.cipher is not None else None,
                "curve": tls.GROUPS.get(sh.key_share_group) if sh.key_share_group is not None else None,
                "next_protocol": sh.alpn.decode("utf-8", "backslashreplace") if sh.alpn else None,
                "ja3s": tls.ja3s(sh), "server_hello": sh}
    except Exception:
        return None


def session_summary(client: list[bytes], server: list[bytes]) -> dict | None:
    """ssl.log-style facts of a QUIC session from its first client and server datagrams."""
    c = parse_initials(client)
    if c is None:
        return None
    out = {k: c.get(k) for k in ("server_name", "alpn", "ja4", "ja3")}
    out["quic_version"] = c["version"]
    srv = None
    if server and c["dcid"] is not None:  # not Google's clear CHLO: the server's Initials have keys
        srv = parse_server_initials(server, bytes.fromhex(c["dcid"]), _version_number(c["version"]))
    if srv:
        out.update({k: v for k, v in srv.items() if k != "server_hello"})
    return out


def parse_initial(payload: bytes) -> dict | None:
    """SNI, ALPN, JA4 ('q') of the ClientHello in one client datagram; None if not a
    decryptable QUIC Initial. `complete` is False when the ClientHello continues in later
    datagrams (see parse_initials)."""
    return parse_initials([payload])


# ---- protocol-module entry point: per-datagram, with a small bounded per-session buffer ----
_pending: OrderedDict[str, _Initials] = OrderedDict()
_done: OrderedDict[str, bool] = OrderedDict()
_MAX_SESSIONS = 4096
_MAX_DATAGRAMS = 8


def _may_carry_hello(b0: int) -> bool:
    """A client datagram's first byte as datagram_filter judges it, for one datagram."""
    return bool(b0 & 0x80 or b0 & 0x41 == 0x01)


def datagram_filter(first_byte: np.ndarray, from_orig: np.ndarray) -> np.ndarray:
    """The datagrams parse_datagram reads, for the stage to pick before making them objects:
    the client's long-header packets (the first byte's top bit; -1: no payload), and Google
    QUIC's public headers that carry a version (the CHLO's packets). Most of a QUIC session
    is short-header packets, which carry nothing this module reads."""
    return from_orig & (first_byte >= 0) & (((first_byte & 0x80) != 0) | ((first_byte & 0x41) == 0x01))


def parse_datagram(d: Datagram) -> list[dict]:
    """One `quic` row per session, when the client's ClientHello has been read."""
    try:
        if not d.from_orig or d.uid in _done or not d.payload or not _may_carry_hello(d.payload[0]):
            return []
        reader = _pending.get(d.uid)
        if reader is None:
            reader = _pending[d.uid] = _Initials(d.ts)
        _pending.move_to_end(d.uid)
        reader.add(d.payload)
        while len(_pending) > _MAX_SESSIONS:
            _pending.popitem(last=False)
        info = reader.result()
        if info is None or not info["complete"]:
            if reader.datagrams >= _MAX_DATAGRAMS:
                _pending.pop(d.uid, None)
                _done[d.uid] = True
            return []
        _pending.pop(d.uid, None)
        _done[d.uid] = True
        while len(_done) > _MAX_SESSIONS:
            _done.popitem(last=False)
        return [{"ts": reader.ts, "uid": d.uid, "orig_h": d.orig_h, "orig_p": d.orig_p, "resp_h": d.resp_h,
                 "resp_p": d.resp_p, "version": info["version"], "client_initial_dcid": info["dcid"],
                 "server_name": info.get("server_name"), "alpn": info.get("alpn"), "ja4": info.get("ja4"),
                 "user_agent": info.get("user_agent"), "malformed": bool(info.get("malformed"))}]
    except Exception:
        return []
