"""TLS handshakes: the `tls` table (Zeek's ssl.log) with JA3, JA3S and JA4.

Input is a session's two reassembled byte streams. Per direction the record layer is
walked up to the first gap (records split across segments are whole here; a handshake
message may span records, and one record may carry several messages). TLS that starts
inside another protocol (STARTTLS in SMTP, IMAP, XMPP, FTP AUTH TLS) is found by looking
for the first record that opens with a ClientHello (client side) or a ServerHello
(server side).

What is read: ClientHello (SNI, ALPN, groups, point formats, signature algorithms,
supported_versions; JA3 and JA4), ServerHello and HelloRetryRequest (negotiated version
incl. supported_versions, cipher, key_share group, pre_shared_key; JA3S), Certificate
(TLS 1.2 and earlier, both sides: SHA-256 fingerprints, leaf subject/issuer),
ServerKeyExchange (named curve), ChangeCipherSpec, plaintext Alerts and encrypted records.

`established` follows Zeek: before TLS 1.3, both sides sent ChangeCipherSpec and an
encrypted record followed the later of the two; in TLS 1.3, application-data records were
seen from both sides after the ServerHello.

Nothing raises: a broken record or message sets `malformed` and keeps what was read.
"""

from __future__ import annotations

import hashlib
import struct
from hashlib import sha256
from dataclasses import dataclass, field

import pyarrow as pa

from wiretrail.app.base import SESSION_COLUMNS, Direction, Stream
from wiretrail.app.x509 import leaf_names

TABLE = "tls"
SCHEMA = pa.schema([
    *SESSION_COLUMNS,
    ("version", pa.string()),              # negotiated: TLSv10 .. TLSv13, SSLv3, TLSv13-draftNN
    ("cipher", pa.string()),               # IANA name as Zeek prints it
    ("curve", pa.string()),
    ("server_name", pa.string()),          # SNI
    ("resumed", pa.bool_()),
    ("last_alert", pa.string()),
    ("next_protocol", pa.string()),        # ALPN protocol chosen by the server
    ("established", pa.bool_()),
    ("alpn", pa.list_(pa.string())),       # ALPN protocols offered by the client
    ("client_version", pa.string()),       # ClientHello legacy version
    ("server_version", pa.string()),       # ServerHello legacy version (TLSv13 there: a draft before 16)
    ("ja3", pa.string()),
    ("ja3s", pa.string()),
    ("ja4", pa.string()),
    ("cert_chain_fps", pa.list_(pa.string())),
    ("client_cert_chain_fps", pa.list_(pa.string())),
    ("subject", pa.string()),              # server leaf certificate
    ("issuer", pa.string()),
    ("client_subject", pa.string()),
    ("client_issuer", pa.string()),
    ("validation_status", pa.string()),    # not validated: always null
    ("malformed", pa.bool_()),
    ("packet", pa.int64()),                # capture packet number Suricata logs the handshake on
                                           # (EVE pcap_cnt): the ACK of the bytes that complete it
])
PORTS = {443, 465, 563, 585, 614, 636, 853, 989, 990, 992, 993, 994, 995, 3269, 5061, 5223,
         5349, 6697, 8443, 8883}
NDPI = {"TLS", "DTLS"}
# The handshake, certificates and the first encrypted records fit well within this: the
# rest of a TLS stream is ciphertext no parser reads, so the stage keeps no more of it.
STREAM_DEPTH = 64 << 10

# ---- registries ------------------------------------------------------------------------------


def _version_name(v: int) -> str:
    names = {0x0002: "SSLv2", 0x0300: "SSLv3", 0x0301: "TLSv10", 0x0302: "TLSv11", 0x0303: "TLSv12",
             0x0304: "TLSv13", 0xFEFF: "DTLSv10", 0xFEFD: "DTLSv12", 0xFEFC: "DTLSv13"}
    if v in names:
        return names[v]
    if v >> 8 == 0x7F:
        return "TLSv13-draft%d" % (v & 0xFF)
    if v >> 8 == 0x7E:  # Google's experimental TLS 1.3 variants
        return "TLSv13-draft%d" % (v & 0xFF)
    if v >> 8 == 0xFB:  # Facebook's TLS 1.3 drafts
        return "TLSv13-draft%d-fb" % (v & 0xFF)
    return "unknown-%d" % v


def _build_ciphers() -> dict[int, str]:
    c: dict[int, str] = {}
    kx6 = ["RSA", "DH_DSS", "DH_RSA", "DHE_DSS", "DHE_RSA", "DH_anon"]
    simple = {
        0x0000: "TLS_NULL_WITH_NULL_NULL", 0x0001: "TLS_RSA_WITH_NULL_MD5", 0x0002: "TLS_RSA_WITH_NULL_SHA",
        0x0003: "TLS_RSA_EXPORT_WITH_RC4_40_MD5", 0x0004: "TLS_RSA_WITH_RC4_128_MD5",
        0x0005: "TLS_RSA_WITH_RC4_128_SHA", 0x0006: "TLS_RSA_EXPORT_WITH_RC2_CBC_40_MD5",
        0x0007: "TLS_RSA_WITH_IDEA_CBC_SHA", 0x0008: "TLS_RSA_EXPORT_WITH_DES40_CBC_SHA",
        0x0009: "TLS_RSA_WITH_DES_CBC_SHA", 0x000A: "TLS_RSA_WITH_3DES_EDE_CBC_SHA",
        0x0017: "TLS_DH_anon_EXPORT_WITH_RC4_40_MD5", 0x0018: "TLS_DH_anon_WITH_RC4_128_MD5",
        0x0019: "TLS_DH_anon_EXPORT_WITH_DES40_CBC_SHA", 0x001A: "TLS_DH_anon_WITH_DES_CBC_SHA",
        0x001B: "TLS_DH_anon_WITH_3DES_EDE_CBC_SHA",
        0x001E: "TLS_KRB5_WITH_DES_CBC_SHA", 0x001F: "TLS_KRB5_WITH_3DES_EDE_CBC_SHA",
        0x0020: "TLS_KRB5_WITH_RC4_128_SHA", 0x0021: "TLS_KRB5_WITH_IDEA_CBC_SHA",
        0x0022: "TLS_KRB5_WITH_DES_CBC_MD5", 0x0023: "TLS_KRB5_WITH_3DES_EDE_CBC_MD5",
        0x0024: "TLS_KRB5_WITH_RC4_128_MD5", 0x0025: "TLS_KRB5_WITH_IDEA_CBC_MD5",
        0x0026: "TLS_KRB5_EXPORT_WITH_DES_CBC_40_SHA", 0x0027: "TLS_KRB5_EXPORT_WITH_RC2_CBC_40_SHA",
        0x0028: "TLS_KRB5_EXPORT_WITH_RC4_40_SHA", 0x0029: "TLS_KRB5_EXPORT_WITH_DES_CBC_40_MD5",
        0x002A: "TLS_KRB5_EXPORT_WITH_RC2_CBC_40_MD5", 0x002B: "TLS_KRB5_EXPORT_WITH_RC4_40_MD5",
        0x002C: "TLS_PSK_WITH_NULL_SHA", 0x002D: "TLS_DHE_PSK_WITH_NULL_SHA", 0x002E: "TLS_RSA_PSK_WITH_NULL_SHA",
        0x003B: "TLS_RSA_WITH_NULL_SHA256", 0x003C: "TLS_RSA_WITH_AES_128_CBC_SHA256",
        0x003D: "TLS_RSA_WITH_AES_256_CBC_SHA256", 0x003E: "TLS_DH_DSS_WITH_AES_128_CBC_SHA256",
        0x003F: "TLS_DH_RSA_WITH_AES_128_CBC_SHA256", 0x0040: "TLS_DHE_DSS_WITH_AES_128_CBC_SHA256",
        0x0067: "TLS_DHE_RSA_WITH_AES_128_CBC_SHA256", 0x0068: "TLS_DH_DSS_WITH_AES_256_CBC_SHA256",
        0x0069: "TLS_DH_RSA_WITH_AES_256_CBC_SHA256", 0x006A: "TLS_DHE_DSS_WITH_AES_256_CBC_SHA256",
        0x006B: "TLS_DHE_RSA_WITH_AES_256_CBC_SHA256", 0x006C: "TLS_DH_anon_WITH_AES_128_CBC_SHA256",
        0x006D: "TLS_DH_anon_WITH_AES_256_CBC_SHA256",
        0x00FF: "TLS_EMPTY_RENEGOTIATION_INFO_SCSV", 0x5600: "TLS_FALLBACK_SCSV",
        0x1301: "TLS_AES_128_GCM_SHA256", 0x1302: "TLS_AES_256_GCM_SHA384",
        0x1303: "TLS_CHACHA20_POLY1305_SHA256", 0x1304: "TLS_AES_128_CCM_SHA256",
        0x1305: "TLS_AES_128_CCM_8_SHA256",
        0xC01A: "TLS_SRP_SHA_WITH_3DES_EDE_CBC_SHA", 0xC01B: "TLS_SRP_SHA_RSA_WITH_3DES_EDE_CBC_SHA",
        0xC01C: "TLS_SRP_SHA_DSS_WITH_3DES_EDE_CBC_SHA", 0xC01D: "TLS_SRP_SHA_WITH_AES_128_CBC_SHA",
        0xC01E: "TLS_SRP_SHA_RSA_WITH_AES_128_CBC_SHA", 0xC01F: "TLS_SRP_SHA_DSS_WITH_AES_128_CBC_SHA",
        0xC020: "TLS_SRP_SHA_WITH_AES_256_CBC_SHA", 0xC021: "TLS_SRP_SHA_RSA_WITH_AES_256_CBC_SHA",
        0xC022: "TLS_SRP_SHA_DSS_WITH_AES_256_CBC_SHA",
        0xC072: "TLS_ECDHE_ECDSA_WITH_CAMELLIA_128_CBC_SHA256", 0xC073: "TLS_ECDHE_ECDSA_WITH_CAMELLIA_256_CBC_SHA384",
        0xC074: "TLS_ECDH_ECDSA_WITH_CAMELLIA_128_CBC_SHA256", 0xC075: "TLS_ECDH_ECDSA_WITH_CAMELLIA_256_CBC_SHA384",
        0xC076: "TLS_ECDHE_RSA_WITH_CAMELLIA_128_CBC_SHA256", 0xC077: "TLS_ECDHE_RSA_WITH_CAMELLIA_256_CBC_SHA384",
        0xC078: "TLS_ECDH_RSA_WITH_CAMELLIA_128_CBC_SHA256", 0xC079: "TLS_ECDH_RSA_WITH_CAMELLIA_256_CBC_SHA384",
        0xCC13: "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256_OLD",
        0xCC14: "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256_OLD",
        0xCC15: "TLS_DHE_RSA_WITH_CHACHA20_POLY1305_SHA256_OLD",
        0xCCA8: "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256",
        0xCCA9: "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256",
        0xCCAA: "TLS_DHE_RSA_WITH_CHACHA20_POLY1305_SHA256", 0xCCAB: "TLS_PSK_WITH_CHACHA20_POLY1305_SHA256",
        0xCCAC: "TLS_ECDHE_PSK_WITH_CHACHA20_POLY1305_SHA256",
        0xCCAD: "TLS_DHE_PSK_WITH_CHACHA20_POLY1305_SHA256",
        0xCCAE: "TLS_RSA_PSK_WITH_CHACHA20_POLY1305_SHA256",
        0xD001: "TLS_ECDHE_PSK_WITH_AES_128_GCM_SHA256", 0xD002: "TLS_ECDHE_PSK_WITH_AES_256_GCM_SHA384",
        0xD003: "TLS_ECDHE_PSK_WITH_AES_128_CCM_8_SHA256", 0xD005: "TLS_ECDHE_PSK_WITH_AES_128_CCM_SHA256",
    }
    c.update(simple)
    # 0x000B..0x0016: DH/DHE with DSS/RSA, export DES40, DES, 3DES
    for i, kx in enumerate(["DH_DSS", "DH_RSA", "DHE_DSS", "DHE_RSA"]):
        c[0x000B + 3 * i] = f"TLS_{kx}_EXPORT_WITH_DES40_CBC_SHA"
        c[0x000C + 3 * i] = f"TLS_{kx}_WITH_DES_CBC_SHA"
        c[0x000D + 3 * i] = f"TLS_{kx}_WITH_3DES_EDE_CBC_SHA"
    for i, kx in enumerate(kx6):
        c[0x002F + i] = f"TLS_{kx}_WITH_AES_128_CBC_SHA"
        c[0x0035 + i] = f"TLS_{kx}_WITH_AES_256_CBC_SHA"
        c[0x0041 + i] = f"TLS_{kx}_WITH_CAMELLIA_128_CBC_SHA"
        c[0x0084 + i] = f"TLS_{kx}_WITH_CAMELLIA_256_CBC_SHA"
        c[0x0096 + i] = f"TLS_{kx}_WITH_SEED_CBC_SHA"
        c[0x00BA + i] = f"TLS_{kx}_WITH_CAMELLIA_128_CBC_SHA256"
        c[0x00C0 + i] = f"TLS_{kx}_WITH_CAMELLIA_256_CBC_SHA256"
    for i, kx in enumerate(["RSA", "DHE_RSA", "DH_RSA", "DHE_DSS", "DH_DSS", "DH_anon"]):
        c[0x009C + 2 * i] = f"TLS_{kx}_WITH_AES_128_GCM_SHA256"
        c[0x009D + 2 * i] = f"TLS_{kx}_WITH_AES_256_GCM_SHA384"
    for i, kx in enumerate(["PSK", "DHE_PSK", "RSA_PSK"]):
        c[0x008A + 4 * i] = f"TLS_{kx}_WITH_RC4_128_SHA"
        c[0x008B + 4 * i] = f"TLS_{kx}_WITH_3DES_EDE_CBC_SHA"
        c[0x008C + 4 * i] = f"TLS_{kx}_WITH_AES_128_CBC_SHA"
        c[0x008D + 4 * i] = f"TLS_{kx}_WITH_AES_256_CBC_SHA"
        c[0x00A8 + 2 * i] = f"TLS_{kx}_WITH_AES_128_GCM_SHA256"
        c[0x00A9 + 2 * i] = f"TLS_{kx}_WITH_AES_256_GCM_SHA384"
        c[0x00AE + 4 * i] = f"TLS_{kx}_WITH_AES_128_CBC_SHA256"
        c[0x00AF + 4 * i] = f"TLS_{kx}_WITH_AES_256_CBC_SHA384"
        c[0x00B0 + 4 * i] = f"TLS_{kx}_WITH_NULL_SHA256"
        c[0x00B1 + 4 * i] = f"TLS_{kx}_WITH_NULL_SHA384"
    for i, kx in enumerate(["ECDH_ECDSA", "ECDHE_ECDSA", "ECDH_RSA", "ECDHE_RSA", "ECDH_anon"]):
        base = 0xC001 + 5 * i
        for j, enc in enumerate(["NULL_SHA", "RC4_128_SHA", "3DES_EDE_CBC_SHA", "AES_128_CBC_SHA",
                                 "AES_256_CBC_SHA"]):
            c[base + j] = f"TLS_{kx}_WITH_{enc}"
    for i, kx in enumerate(["ECDHE_ECDSA", "ECDH_ECDSA", "ECDHE_RSA", "ECDH_RSA"]):
        c[0xC023 + 2 * i] = f"TLS_{kx}_WITH_AES_128_CBC_SHA256"
        c[0xC024 + 2 * i] = f"TLS_{kx}_WITH_AES_256_CBC_SHA384"
        c[0xC02B + 2 * i] = f"TLS_{kx}_WITH_AES_128_GCM_SHA256"
        c[0xC02C + 2 * i] = f"TLS_{kx}_WITH_AES_256_GCM_SHA384"
    for j, enc in enumerate(["RC4_128_SHA", "3DES_EDE_CBC_SHA", "AES_128_CBC_SHA", "AES_256_CBC_SHA",
                             "AES_128_CBC_SHA256", "AES_256_CBC_SHA384", "NULL_SHA", "NULL_SHA256",
                             "NULL_SHA384"]):
        c[0xC033 + j] = f"TLS_ECDHE_PSK_WITH_{enc}"
    for j, (kx, enc) in enumerate([(k, e) for k in ["RSA", "DHE_RSA"] for e in ["AES_128_CCM", "AES_256_CCM"]]
                                  + [(k, e) for k in ["RSA", "DHE_RSA"] for e in ["AES_128_CCM_8", "AES_256_CCM_8"]]):
        c[0xC09C + j] = f"TLS_{kx}_WITH_{enc}"
    for j, name in enumerate(["TLS_PSK_WITH_AES_128_CCM", "TLS_PSK_WITH_AES_256_CCM",
                              "TLS_DHE_PSK_WITH_AES_128_CCM", "TLS_DHE_PSK_WITH_AES_256_CCM",
                              "TLS_PSK_WITH_AES_128_CCM_8", "TLS_PSK_WITH_AES_256_CCM_8",
                              "TLS_PSK_DHE_WITH_AES_128_CCM_8", "TLS_PSK_DHE_WITH_AES_256_CCM_8",
                              "TLS_ECDHE_ECDSA_WITH_AES_128_CCM", "TLS_ECDHE_ECDSA_WITH_AES_256_CCM",
                              "TLS_ECDHE_ECDSA_WITH_AES_128_CCM_8", "TLS_ECDHE_ECDSA_WITH_AES_256_CCM_8"]):
        c[0xC0A4 + j] = name
    # ARIA (RFC 6209): CBC then GCM ranges
    aria_cbc = ["RSA", "DH_DSS", "DH_RSA", "DHE_DSS", "DHE_RSA", "DH_anon", "ECDHE_ECDSA", "ECDH_ECDSA",
                "ECDHE_RSA", "ECDH_RSA"]
    for i, kx in enumerate(aria_cbc):
        c[0xC03C + 2 * i] = f"TLS_{kx}_WITH_ARIA_128_CBC_SHA256"
        c[0xC03D + 2 * i] = f"TLS_{kx}_WITH_ARIA_256_CBC_SHA384"
        c[0xC050 + 2 * i] = f"TLS_{kx}_WITH_ARIA_128_GCM_SHA256"
        c[0xC051 + 2 * i] = f"TLS_{kx}_WITH_ARIA_256_GCM_SHA384"
    return c


CIPHERS = _build_ciphers()

GROUPS = {i + 1: n for i, n in enumerate(
    "sect163k1 sect163r1 sect163r2 sect193r1 sect193r2 sect233k1 sect233r1 sect239k1 sect283k1 "
    "sect283r1 sect409k1 sect409r1 sect571k1 sect571r1 secp160k1 secp160r1 secp160r2 secp192k1 "
    "secp192r1 secp224k1 secp224r1 secp256k1 secp256r1 secp384r1 secp521r1 brainpoolP256r1 "
    "brainpoolP384r1 brainpoolP512r1 x25519 x448".split())}
GROUPS.update({256: "ffdhe2048", 257: "ffdhe3072", 258: "ffdhe4096", 259: "ffdhe6144", 260: "ffdhe8192",
               0x001F: "brainpoolP256r1tls13", 0x0020: "brainpoolP384r1tls13", 0x0021: "brainpoolP512r1tls13",
               0x0200: "MLKEM512", 0x0201: "MLKEM768", 0x0202: "MLKEM1024",
               0x11EB: "SecP256r1MLKEM768", 0x11EC: "X25519MLKEM768", 0x11ED: "SecP384r1MLKEM1024",
               0x6399: "X25519Kyber768Draft00", 0x639A: "SecP256r1Kyber768Draft00",
               0xFF01: "arbitrary_explicit_prime_curves", 0xFF02: "arbitrary_explicit_char2_curves"})

ALERTS = {0: "close_notify", 10: "unexpected_message", 20: "bad_record_mac", 21: "decryption_failed",
          22: "record_overflow", 30: "decompression_failure", 40: "handshake_failure", 41: "no_certificate",
          42: "bad_certificate", 43: "unsupported_certificate", 44: "certificate_revoked",
          45: "certificate_expired", 46: "certificate_unknown", 47: "illegal_parameter", 48: "unknown_ca",
          49: "access_denied", 50: "decode_error", 51: "decrypt_error", 60: "export_restriction",
          70: "protocol_version", 71: "insufficient_security", 80: "internal_error",
          86: "inappropriate_fallback", 90: "user_canceled", 100: "no_renegotiation",
          109: "missing_extension", 110: "unsupported_extension", 111: "certificate_unobtainable",
          112: "unrecognized_name", 113: "bad_certificate_status_response",
          114: "bad_certificate_hash_value", 115: "unknown_psk_identity", 116: "certificate_required",
          120: "no_application_protocol", 121: "ech_required"}

# SHA-256("HelloRetryRequest"): the ServerHello random of a HelloRetryRequest (RFC 8446 4.1.3).
HRR_RANDOM = bytes.fromhex("cf21ad74e59a6111be1d8c021e65b891c2a211167abb8c5e079e09e2c8a8339c")

CT_CCS, CT_ALERT, CT_HANDSHAKE, CT_APPDATA, CT_HEARTBEAT = 20, 21, 22, 23, 24
MAX_RECORD = (1 << 14) + 2048
SCAN_LIMIT = 1 << 16       # how far into a stream to look for the start of TLS (STARTTLS)
MAX_HANDSHAKE = 1 << 20    # handshake bytes kept per direction


def is_grease(v: int) -> bool:
    return (v & 0x0F0F) == 0x0A0A and (v >> 8) == (v & 0xFF)


# The 16 GREASE values (RFC 8701), for set lookups in the fingerprint loops.
GREASE = frozenset(v for v in range(0x10000) if is_grease(v))


# ---- ClientHello / ServerHello ----------------------------------------------------------------


class _Bad(Exception):
    """A message that does not parse."""


_U16_PAIR = struct.Struct(">HH").unpack_from  # an extension header: type, length


def _vec(b: bytes, p: int, end: int, width: int) -> tuple[int, int]:
    """(start, stop) of the vector at b[p:] whose length is the big-endian `width`-byte (1 or
    2) field there; _Bad if it does not fit before `end`. The hellos are read with this and
    positions by hand: a reader object per field cost more than the rest of the parse."""
    if p + width > end:
        raise _Bad("length")
    ln = b[p] if width == 1 else (b[p] << 8) | b[p + 1]
    p += width
    if p + ln > end:
        raise _Bad("vector")
    return p, p + ln


def _extensions(b: bytes, p: int, end: int):
    """(type, start, stop) of each extension in b[p:end]; _Bad at one that does not fit."""
    while p < end:
        if p + 4 > end:
            raise _Bad("extension header")
        et, ln = _U16_PAIR(b, p)
        p += 4
        if p + ln > end:
            raise _Bad("extension body")
        yield et, p, p + ln
        p += ln


@dataclass
class ClientHello:
    version: int = 0
    session_id: bytes = b""
    ciphers: list[int] = field(default_factory=list)
    extensions: list[int] = field(default_factory=list)      # in order, GREASE included
    sni: str | None = None
    alpn: list[bytes] = field(default_factory=list)
    groups: list[int] = field(default_factory=list)
    point_formats: list[int] = field(default_factory=list)
    sig_algs: list[int] = field(default_factory=list)
    supported_versions: list[int] = field(default_factory=list)
    malformed: bool = False


@dataclass
class ServerHello:
    version: int = 0
    session_id: bytes = b""
    cipher: int | None = None
    extensions: list[int] = field(default_factory=list)
    selected_version: int | None = None
    key_share_group: int | None = None
    psk: bool = False
    alpn: bytes | None = None
    hrr: bool = False
    malformed: bool = False


def parse_client_hello(body: bytes) -> ClientHello:
    """A ClientHello message body (after the 4-byte handshake header). Never raises."""
    ch = ClientHello()
    b = body
    n = len(b)
    # a field that does not fit is _Bad; what was read before it stays
    try:
        if n < 2:
            raise _Bad("u16")
        ch.version = (b[0] << 8) | b[1]
        start, p = _vec(b, 34, n, 1)
        ch.session_id = b[start:p]
        start, end = _vec(b, p, n, 2)
        k = (end - start) // 2
        ch.ciphers = list(struct.unpack_from(f">{k}H", b, start)) if k else []
        if (end - start) & 1:  # an odd byte left over
            ch.malformed = True
        _, p = _vec(b, end, n, 1)  # compression methods
        if p == n:
            return ch
        p, end = _vec(b, p, n, 2)
        extensions = ch.extensions
        for et, start, stop in _extensions(b, p, end):
            extensions.append(et)
            if et in _CLIENT_EXTS_READ:
                try:
                    _client_ext(ch, et, b, start, stop)
                except _Bad:
                    ch.malformed = True
    except _Bad:
        ch.malformed = True
    return ch


_CLIENT_EXTS_READ = frozenset((0, 16, 10, 11, 13, 43))  # the types _client_ext reads


def _client_ext(ch: ClientHello, et: int, b: bytes, p: int, end: int) -> None:
    """Read extension `et` of a ClientHello, its data b[p:end]; _Bad where it breaks (what was
    read before stays)."""
    if et == 10 or et == 13 or et == 43:  # supported_groups, signature_algorithms, supported_versions
        p, stop = _vec(b, p, end, 1 if et == 43 else 2)
        k = (stop - p) // 2  # 16-bit values; an odd last byte is ignored
        values = struct.unpack_from(f">{k}H", b, p) if k else ()
        (ch.groups if et == 10 else ch.sig_algs if et == 13 else ch.supported_versions).extend(values)
    elif et == 0 or et == 16:  # server_name, ALPN: a list with a 16-bit length
        p, end = _vec(b, p, end, 2)
        while p < end:
            if et == 0:
                nt = b[p]
                start, p = _vec(b, p + 1, end, 2)
                if nt == 0 and ch.sni is None:
                    ch.sni = b[start:p].decode("utf-8", "backslashreplace")
            else:
                start, p = _vec(b, p, end, 1)
                ch.alpn.append(b[start:p])
    elif et == 11:  # ec_point_formats: bytes with an 8-bit length
        p, stop = _vec(b, p, end, 1)
        ch.point_formats.extend(b[p:stop])


def parse_server_hello(body: bytes) -> ServerHello:
    """A ServerHello (or HelloRetryRequest) message body. Never raises."""
    sh = ServerHello()
    b = body
    n = len(b)
    # read by hand as in parse_client_hello
    try:
        if n < 2:
            raise _Bad("u16")
        sh.version = version = (b[0] << 8) | b[1]
        if n < 34:
            raise _Bad("take")
        sh.hrr = b[2:34] == HRR_RANDOM
        if version >> 8 == 0x7F and (version & 0xFF) < 22:
            # TLS 1.3 drafts before 22: no session id, no compression
            if n < 36:
                raise _Bad("u16")
            sh.cipher = (b[34] << 8) | b[35]
            p = 36
        else:
            start, p = _vec(b, 34, n, 1)
            sh.session_id = b[start:p]
            if p + 2 > n:
                raise _Bad("u16")
            sh.cipher = (b[p] << 8) | b[p + 1]
            if p + 3 > n:  # compression
                raise _Bad("u8")
            p += 3
        if p == n:
            return sh
        p, end = _vec(b, p, n, 2)
        for et, start, stop in _extensions(b, p, end):
            sh.extensions.append(et)
            if et == 43 or et == 51:
                if stop - start >= 2:
                    v = (b[start] << 8) | b[start + 1]
                    if et == 43:
                        sh.selected_version = v
                    else:
                        sh.key_share_group = v
            elif et == 41:
                sh.psk = True
            elif et == 16:
                try:
                    p, stop = _vec(b, start, stop, 2)
                    if p < stop:
                        p, stop = _vec(b, p, stop, 1)
                        sh.alpn = b[p:stop]
                except _Bad:
                    sh.malformed = True
    except _Bad:
        sh.malformed = True
    return sh


# ---- fingerprints -------------------------------------------------------------------------------


def ja3_string(ch: ClientHello) -> str:
    def j(vals):
        return "-".join([str(v) for v in vals if v not in GREASE])
    return ",".join([str(ch.version), j(ch.ciphers), j(ch.extensions), j(ch.groups),
                     "-".join([str(v) for v in ch.point_formats])])


# Fingerprints by their inputs: the same client software sends the same hello over and over,
# so most sessions find theirs here. Bounded: emptied when full.
_FP_CACHE: dict[tuple, str] = {}
_FP_CACHE_MAX = 4096


def _cached(key: tuple, make) -> str:
    v = _FP_CACHE.get(key)
    if v is None:
        if len(_FP_CACHE) >= _FP_CACHE_MAX:
            _FP_CACHE.clear()
        v = _FP_CACHE[key] = make()
    return v


def ja3(ch: ClientHello) -> str:
    key = ("ja3", ch.version, tuple(ch.ciphers), tuple(ch.extensions), tuple(ch.groups), tuple(ch.point_formats))
    return _cached(key, lambda: hashlib.md5(ja3_string(ch).encode()).hexdigest())


def _ja3s(sh: ServerHello) -> str:
    s = ",".join([str(sh.version), str(sh.cipher if sh.cipher is not None else ""),
                  "-".join(str(v) for v in sh.extensions if not is_grease(v))])
    return hashlib.md5(s.encode()).hexdigest()


def ja3s(sh: ServerHello) -> str:
    return _cached(("ja3s", sh.version, sh.cipher, tuple(sh.extensions)), lambda: _ja3s(sh))


_JA4_VERSIONS = {0x0304: "13", 0x0303: "12", 0x0302: "11", 0x0301: "10", 0x0300: "s3", 0x0002: "s2",
                 0xFEFF: "d1", 0xFEFD: "d2", 0xFEFC: "d3"}


def _isalnum(b: int) -> bool:
    return 0x30 <= b <= 0x39 or 0x41 <= b <= 0x5A or 0x61 <= b <= 0x7A


def ja4_parts(ch: ClientHello, transport: str = "t") -> tuple[str, str, str]:
    """(JA4_a, sorted cipher list, sorted extension list [+ '_' + signature algorithms])."""
    versions = [v for v in ch.supported_versions if not is_grease(v)]
    ver = max(versions) if versions else ch.version
    vs = _JA4_VERSIONS.get(ver, "00")
    ciphers = [v for v in ch.ciphers if not is_grease(v)]
    exts = [v for v in ch.extensions if not is_grease(v)]
    alpn = "00"
    if ch.alpn and ch.alpn[0]:
        a = ch.alpn[0]
        if _isalnum(a[0]) and _isalnum(a[-1]):
            alpn = chr(a[0]) + chr(a[-1])
        elif a[0] > 0x7F or a[-1] > 0x7F:
            alpn = "99"  # what the JA4 reference tools print for non-ASCII values
        else:  # the spec: first and last hex digit of the value
            h = a.hex()
            alpn = h[0] + h[-1]
    part_a = "%s%s%s%02d%02d%s" % (transport, vs, "d" if 0 in exts else "i", min(len(ciphers), 99),
                                   min(len(exts), 99), alpn)
    c = ",".join("%04x" % v for v in sorted(ciphers))
    e = ",".join("%04x" % v for v in sorted(v for v in exts if v not in (0x0000, 0x0010)))
    sigs = [v for v in ch.sig_algs if not is_grease(v)]
    if sigs:
        e += "_" + ",".join("%04x" % v for v in sigs)
    return part_a, c, e


def _h12(s: str) -> str:
    return hashlib.sha256(s.encode()).hexdigest()[:12] if s else "000000000000"


def _ja4(ch: ClientHello, transport: str) -> str:
    a, c, e = ja4_parts(ch, transport)
    return f"{a}_{_h12(c)}_{_h12(e)}"


def ja4(ch: ClientHello, transport: str = "t") -> str:
    key = ("ja4", transport, ch.version, tuple(ch.supported_versions), tuple(ch.ciphers), tuple(ch.extensions),
           ch.alpn[0] if ch.alpn else None, tuple(ch.sig_algs))
    return _cached(key, lambda: _ja4(ch, transport))


def ja4_raw(ch: ClientHello, transport: str = "t") -> str:
    a, c, e = ja4_parts(ch, transport)
    return f"{a}_{c}_{e}"


# ---- record layer -------------------------------------------------------------------------------


# A record is a plain tuple (content type, offset of its header in the direction's data, body):
# dozens per session. The body is kept only for the types that are read (handshake, alert);
# the others (ChangeCipherSpec, ciphertext) carry None.


class _Side:
    """One direction's records, and what the session analysis asks of them, noted in the one
    walk over them: the index of the first ChangeCipherSpec and of the first application-data
    record (-1: none), and the last 2-byte Alert before the ChangeCipherSpec (offset, body)."""
    __slots__ = ("records", "malformed", "found", "ccs", "app", "alert")

    def __init__(self) -> None:
        self.records: list[tuple[int, int, bytes | None]] = []
        self.malformed = False
        self.found = False
        self.ccs = -1
        self.app = -1
        self.alert: tuple[int, bytes] | None = None


_HEADER = struct.Struct(">BBBH").unpack_from  # record header: type, version major, minor, length


def _valid_header(d: bytes, p: int) -> bool:
    return (p + 5 <= len(d) and CT_CCS <= d[p] <= CT_HEARTBEAT and d[p + 1] == 3 and d[p + 2] <= 4
            and ((d[p + 3] << 8) | d[p + 4]) <= MAX_RECORD)


def _find_start(d: bytes, limit: int, hs_type: int) -> int:
    """Offset of the first record that opens a handshake with a message of hs_type, or -1."""
    if _valid_header(d, 0):
        return 0
    p = 0
    end = min(limit, SCAN_LIMIT)
    while True:
        p = d.find(b"\x16\x03", p, end)
        if p < 0:
            return -1
        if _valid_header(d, p) and p + 5 < len(d) and d[p + 5] == hs_type:
            return p
        p += 1


def _records(d: Direction, hs_type: int) -> _Side:
    side = _Side()
    data = d.data
    limit = len(data)
    for off, _n in d.gaps:
        if off < limit:
            limit = off
            break
    start = _find_start(data, limit, hs_type)
    if start < 0:
        return side
    side.found = True
    p = start
    encrypted_seen = 0
    ccs = app = -1
    records = side.records
    append = records.append
    header = _HEADER
    while p + 5 <= limit:
        ct, major, minor, ln = header(data, p)
        # a valid header (_valid_header, inline: this runs per record)
        if not (20 <= ct <= 24 and major == 3 and minor <= 4 and ln <= MAX_RECORD):
            # After ChangeCipherSpec the framing is the peers' business (GridFTP, for one,
            # drops TLS after the handshake); before it, a bad header is malformed TLS.
            if ccs < 0:
                side.malformed = True
            break
        e = p + 5 + ln
        if e > limit:
            break  # cut by a gap or the end of the stream
        # bodies are kept only for the types that are read (handshake, alert)
        if ct == 22:  # CT_HANDSHAKE
            append((22, p, data[p + 5:e]))
        elif ct == 23:  # CT_APPDATA
            if app < 0:
                app = len(records)
            append((23, p, None))
            encrypted_seen += 1
            if encrypted_seen >= 4:
                break  # the handshake is over; the rest is ciphertext
        elif ct == 20:  # CT_CCS
            if ccs < 0:
                ccs = len(records)
            append((20, p, None))
        elif ct == 21:  # CT_ALERT
            body = data[p + 5:e]
            if ccs < 0 and ln == 2:
                side.alert = (p, body)
            append((21, p, body))
        else:
            append((ct, p, None))
        p = e
    side.ccs = ccs
    side.app = app
    return side


def _messages(records: list[tuple], stop: int) -> list[tuple[int, bytes, int, int]]:
    """Handshake messages (type, body, record start, end of the record holding its last byte)
    from the handshake records among records[:stop] (the buffer is cut at the direction's
    first ChangeCipherSpec when `stop` is its index: later handshake records are encrypted)."""
    bodies: list[bytes] = []
    starts: list[tuple[int, int]] = []  # (buffer offset, record start)
    size = 0
    for i in range(stop):
        ctype, start, body = records[i]
        if ctype == CT_HANDSHAKE:
            starts.append((size, start))
            bodies.append(body)
            size += len(body)
            if size > MAX_HANDSHAKE:
                break
    msgs = []
    p = 0
    if len(bodies) == 1:  # one record: every message is in it
        buf = bodies[0]
        n = len(buf)
        rs = starts[0][1]
        rend = rs + 5 + n
        while p + 4 <= n:
            e = p + 4 + ((buf[p + 1] << 16) | (buf[p + 2] << 8) | buf[p + 3])
            if e > n:
                break
            msgs.append((buf[p], buf[p + 4:e], rs, rend))
            p = e
        return msgs
    buf = b"".join(bodies)
    k = 0
    n = len(buf)
    while p + 4 <= n:
        mt = buf[p]
        ln = (buf[p + 1] << 16) | (buf[p + 2] << 8) | buf[p + 3]
        if p + 4 + ln > n:
            break
        while k + 1 < len(starts) and starts[k + 1][0] <= p:
            k += 1
        e = k  # the record holding the message's last byte
        while e + 1 < len(starts) and starts[e + 1][0] < p + 4 + ln:
            e += 1
        msgs.append((mt, buf[p + 4:p + 4 + ln], starts[k][1] if starts else 0,
                     starts[e][1] + 5 + len(bodies[e]) if starts else 0))
        p += 4 + ln
    return msgs


def _after_ccs(side: _Side, types: tuple[int, ...]) -> int:
    """Index of the first record after the side's first ChangeCipherSpec whose type is in
    `types`, -1 if none (or no ChangeCipherSpec)."""
    if side.ccs < 0:
        return -1
    records = side.records
    for i in range(side.ccs + 1, len(records)):
        if records[i][0] in types:
            return i
    return -1


def _cert_list(body: bytes, tls13: bool = False) -> tuple[list[bytes], bool]:
    """The DER certificates of a Certificate message, and whether it was malformed (what was
    read before the break is kept). Positions by hand, bounds checked as _vec checks them."""
    b = body
    n = len(b)
    out: list[bytes] = []
    p = 0
    if tls13:  # the request context: a u8 length
        if n < 1 or 1 + b[0] > n:
            return out, True
        p = 1 + b[0]
    if p + 3 > n:
        return out, True
    end = p + 3 + ((b[p] << 16) | (b[p + 1] << 8) | b[p + 2])
    if end > n:
        return out, True
    p += 3
    while p < end:
        if p + 3 > end:
            return out, True
        e = p + 3 + ((b[p] << 16) | (b[p + 1] << 8) | b[p + 2])
        if e > end:
            return out, True
        out.append(b[p + 3:e])
        p = e
        if tls13:  # the entry's extensions: a u16 length
            if p + 2 > end or p + 2 + ((b[p] << 8) | b[p + 1]) > end:
                return out, True
            p += 2 + ((b[p] << 8) | b[p + 1])
    return out, False


# ---- the session ----------------------------------------------------------------------------


@dataclass
class Analysis:
    row: dict | None
    certs: list[tuple[int, bytes, bool]]   # (ts, der, sent by the client)
    client_hello: ClientHello | None = None
    server_hello: ServerHello | None = None


_last: tuple[object, Analysis] | None = None


def analyze(s: Stream) -> Analysis:
    """Parse the TLS handshake of `s` (cached for the stream object last analysed)."""
    global _last
    if _last is not None and _last[0] is s:
        return _last[1]
    try:
        a = _analyze(s)
    except Exception:  # a parser bug must cost one row, not the session
        a = Analysis(_base_row(s, 0) | {"malformed": True}, [])
    _last = (s, a)
    return a


def _base_row(s: Stream, ts: int) -> dict:
    return {"ts": ts, "uid": s.uid, "orig_h": s.orig_h, "orig_p": s.orig_p, "resp_h": s.resp_h,
            "resp_p": s.resp_p, "validation_status": None}


def _server_hello(msgs: list, malformed: bool) -> tuple[ServerHello | None, ServerHello | None, bool]:
    """(ServerHello, HelloRetryRequest, malformed) from a direction's handshake messages: the
    first hello that is not the first HelloRetryRequest ends the search."""
    sh = hrr = None
    for mt, body, _st, _end in msgs:
        if mt == 2:
            h = parse_server_hello(body)
            malformed |= h.malformed
            if h.hrr and hrr is None:
                hrr = h
                continue
            sh = h
            break
    return sh, hrr, malformed


def _analyze(s: Stream) -> Analysis:
    cs = _records(s.orig, 1)
    ss = _records(s.resp, 2)
    if not cs.found and not ss.found:
        return Analysis(None, [])
    malformed = cs.malformed or ss.malformed

    # Server first: the negotiated version decides whether post-CCS handshake records are plaintext.
    # The ServerHello is looked for in all handshake messages; those before the first CCS are a
    # prefix of them, so the search starts there and reads past the CCS only if it found no hello.
    srec, crec = ss.records, cs.records
    before_ccs = _messages(srec, ss.ccs if ss.ccs >= 0 else len(srec))
    smsgs_all = None if _after_ccs(ss, (CT_HANDSHAKE,)) >= 0 else before_ccs
    sh, hrr, malformed = _server_hello(before_ccs, malformed)
    if sh is None and smsgs_all is None:
        smsgs_all = _messages(srec, len(srec))
        sh, hrr, malformed = _server_hello(smsgs_all, malformed)
    ver_num = None
    if sh is not None:
        ver_num = sh.selected_version or sh.version
    elif hrr is not None:
        ver_num = hrr.selected_version or hrr.version
    tls13 = ver_num is not None and (ver_num == 0x0304 or ver_num >> 8 in (0x7F, 0x7E, 0xFB))
    if not tls13:
        smsgs = before_ccs
    else:
        if smsgs_all is None:
            smsgs_all = _messages(srec, len(srec))
        smsgs = smsgs_all
    cmsgs = _messages(crec, cs.ccs if cs.ccs >= 0 and not tls13 else len(crec))

    ch = None
    for mt, body, _st, _end in cmsgs:
        if mt == 1:
            ch = parse_client_hello(body)
            malformed |= ch.malformed
            break

    # time of the first record seen
    t_candidates = []
    if crec:
        t_candidates.append(s.orig.time_at(crec[0][1]))
    if srec:
        t_candidates.append(s.resp.time_at(srec[0][1]))
    ts = min((t for t in t_candidates if t), default=0)
    if ch is None and sh is None and hrr is None and not malformed:
        return Analysis(None, [])  # records, but no handshake seen: not logged (as Zeek)
    row = _base_row(s, ts)
    row["malformed"] = malformed

    if ch is not None:
        row["server_name"] = ch.sni
        row["alpn"] = [a.decode("utf-8", "backslashreplace") for a in ch.alpn] or None
        row["client_version"] = _version_name(ch.version)
        row["ja3"] = ja3(ch)
        row["ja4"] = ja4(ch, "t")
    hello = sh or hrr
    if hello is not None:
        row["version"] = _version_name(ver_num)
        row["server_version"] = _version_name(hello.version)
        row["cipher"] = CIPHERS.get(hello.cipher, "unknown-%d" % hello.cipher) if hello.cipher is not None else None
        if sh is not None:
            row["ja3s"] = ja3s(sh)
            if sh.alpn is not None:
                row["next_protocol"] = sh.alpn.decode("utf-8", "backslashreplace")
            if sh.key_share_group is not None:
                row["curve"] = GROUPS.get(sh.key_share_group, "unknown-%d" % sh.key_share_group)
            resumed = bool(sh.psk) if tls13 else False
            if not tls13 and ch is not None and ch.session_id and sh.session_id == ch.session_id:
                resumed = True
            row["resumed"] = resumed
        else:
            row["resumed"] = False
    else:
        row["resumed"] = False

    # certificates (plaintext only: TLS 1.2 and earlier) and the ServerKeyExchange curve
    certs: list[tuple[int, bytes, bool]] = []
    server_cert_end = None
    if not tls13:
        for msgs, side_dir, by_client, key in ((smsgs, s.resp, False, "cert_chain_fps"),
                                                (cmsgs, s.orig, True, "client_cert_chain_fps")):
            for mt, body, st, end in msgs:
                if mt == 11:
                    chain, bad = _cert_list(body)
                    malformed |= bad
                    row[key] = [sha256(c).hexdigest() for c in chain]
                    t = side_dir.time_at(st)
                    certs.extend((t, c, by_client) for c in chain)
                    if chain:
                        subj, iss = leaf_names(chain[0])
                        if by_client:
                            row["client_subject"], row["client_issuer"] = subj, iss
                        else:
                            row["subject"], row["issuer"] = subj, iss
                            server_cert_end = end
                    break
        if "cipher" in row and row["cipher"] and "ECDH" in row["cipher"]:
            for mt, body, _st, _end in smsgs:
                if mt == 12 and len(body) >= 3 and body[0] == 3:
                    g = (body[1] << 8) | body[2]
                    row["curve"] = GROUPS.get(g, "unknown-%d" % g)
                    break

    # alerts (plaintext only: an alert after its side's CCS is encrypted, not logged, as Zeek),
    # the server's last one if it sent any, and establishment
    alert = ss.alert or cs.alert
    if alert is not None:
        code = alert[1][1]
        row["last_alert"] = ALERTS.get(code, "unknown-%d" % code)
    had_hello = sh is not None or hrr is not None
    if tls13:
        # application data from both sides after the hello
        established = had_hello and cs.app >= 0 and ss.app >= 0
    else:
        # both sent ChangeCipherSpec, and a record followed (on its side) the later of the two
        established = False
        if cs.ccs >= 0 and ss.ccs >= 0:
            pc, ps = _after_ccs(cs, _POST_CCS), _after_ccs(ss, _POST_CCS)
            if pc >= 0 and ps >= 0:
                established = True
            elif pc >= 0 or ps >= 0:
                later = max(s.orig.time_at(crec[cs.ccs][1]), s.resp.time_at(srec[ss.ccs][1]))
                t = s.orig.time_at(crec[pc][1]) if pc >= 0 else s.resp.time_at(srec[ps][1])
                established = t >= later
    row["established"] = established
    row["malformed"] = malformed
    row["packet"] = _log_packet(s, cs, ss, server_cert_end, had_hello)
    return Analysis(row, certs, ch, sh)


# the records that show a side went on after its ChangeCipherSpec
_POST_CCS = (CT_HANDSHAKE, CT_APPDATA, CT_ALERT)


def _record_end(d: Direction, start: int) -> int:
    return start + 5 + ((d.data[start + 3] << 8) | d.data[start + 4])


def _log_packet(s: Stream, cs: _Side, ss: _Side, server_cert_end: int | None, had_hello: bool) -> int | None:
    """The packet Suricata logs the handshake on (its tls event's pcap_cnt): the one that
    acknowledged the bytes completing both sides' handshakes, as its TLS parser counts them:
    the server's certificate completes both; else the server is done at its first application
    data record, the client at its ChangeCipherSpec or first application data record. None
    when not both (Suricata logs it at the flow's end, on no packet of the capture)."""
    if server_cert_end is not None:
        return s.resp.acked_by(server_cert_end) or None
    if not had_hello or ss.app < 0:
        return None  # the server's application data counts only after a hello
    done = cs.app if cs.ccs < 0 else cs.ccs if cs.app < 0 else min(cs.ccs, cs.app)
    if done < 0:
        return None
    server = s.resp.acked_by(_record_end(s.resp, ss.records[ss.app][1]))
    if not server:
        return None
    client = s.orig.acked_by(_record_end(s.orig, cs.records[done][1]))
    return max(server, client) if client else None


def parse_stream(s: Stream) -> list[dict]:
    """One `tls` row for a session whose streams carry TLS; [] when neither side does."""
    a = analyze(s)
    return [a.row] if a.row is not None else []
