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

The bytes are read by numba kernels (app/tls_kernel.py): `parse_streams` hands the sessions of
a batch to one call, which walks both directions of each and returns what the rows need as
columns; this module makes the columns of the table from them with numpy and pyarrow, naming
each distinct version, cipher, curve and alert once, fingerprinting each distinct hello once and
reading each distinct certificate once. `parse_stream` (one session) is a batch of one.

Nothing raises: a broken record or message sets `malformed` and keeps what was read.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import weakref
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from wiretrail import arrow_compute as ac
from wiretrail.app.base import SESSION_COLUMNS, Direction, JoinedStreams, Records, Stream
from wiretrail.app.tls_kernel import (ALERT, AT_ALPN, AT_CERTS, AT_CIPHERS, AT_EXTENSIONS, AT_NEXT_PROTOCOL,
                                      AT_SERVER_EXTENSIONS, AT_SIG_ALGS, AT_SNI, AT_VERSIONS, CH_MALFORMED,
                                      CH_N_ALPN, CH_N_CIPHERS, CH_N_EXTENSIONS, CH_N_GROUPS, CH_N_POINT_FORMATS,
                                      CH_N_SIG_ALGS, CH_N_VERSIONS, CH_SESSION_ID, CH_SNI, CH_VALUES, CH_VERSION,
                                      CLIENT_CERTS, CLIENT_DONE_END, CLIENT_HELLO, ESTABLISHED, H_CLIENT_HELLO,
                                      H_CLIENT_VERSION, H_JA3, H_JA3S, H_JA4, H_HELLO, H_HELLO_CIPHER, H_HELLO_VERSION,
                                      H_KEY_SHARE_GROUP, H_N_ALPN, H_NEXT_PROTOCOL, H_NOT_ASCII, H_RESUMED,
                                      H_SNI, LOGGED, MALFORMED, NOT_ASCII_ALPN,
                                      NOT_ASCII_NEXT_PROTOCOL, NOT_ASCII_SNI, SERVER_APP_END, SERVER_CERT_END,
                                      SERVER_CERTS, SERVER_HELLO, SH_ALPN, SH_CIPHER, SH_HRR, SH_KEY_SHARE_GROUP,
                                      SH_MALFORMED, SH_N_EXTENSIONS, SH_PSK, SH_SELECTED_VERSION, SH_SESSION_ID,
                                      SH_VALUES, SH_VERSION, SKE_GROUP, TLS13, TS, VERSION, acked_packets,
                                      client_hello, handshake, handshakes,
                                      server_hello)
from wiretrail.app.x509 import _parse_cached, leaf_names

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
    # the hellos' lists as sent (GREASE values included; at most tls_kernel.MAX_HELLO_LIST each), names
    # as Zeek's ssl-log-ext where it has them: what Suricata's client/server_handshake log
    ("client_ciphers", pa.list_(pa.uint16())),
    ("ssl_client_exts", pa.list_(pa.uint16())),
    ("client_sig_algs", pa.list_(pa.uint16())),   # signature_algorithms: 16-bit schemes
    ("client_supported_versions", pa.list_(pa.uint16())),
    ("ssl_server_exts", pa.list_(pa.uint16())),
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
# Nothing past where tls_kernel's record walk stops (the fourth application-data record each
# way) is read: the reassembler, told so, keeps no more of a session only TLS parsers read.
HANDSHAKE_ONLY = True
JOINED = True  # parse_streams also reads JoinedStreams (app.base)

# ---- registries ------------------------------------------------------------------------------


_VERSIONS = {0x0002: "SSLv2", 0x0300: "SSLv3", 0x0301: "TLSv10", 0x0302: "TLSv11", 0x0303: "TLSv12",
             0x0304: "TLSv13", 0xFEFF: "DTLSv10", 0xFEFD: "DTLSv12", 0xFEFC: "DTLSv13"}


def _version_name(v: int) -> str:
    name = _VERSIONS.get(v)
    if name is not None:
        return name
    if v >> 8 == 0x7F:
        return "TLSv13-draft%d" % (v & 0xFF)
    if v >> 8 == 0x7E:  # Google's experimental TLS 1.3 variants
        return "TLSv13-draft%d" % (v & 0xFF)
    if v >> 8 == 0xFB:  # Facebook's TLS 1.3 drafts
        return "TLSv13-draft%d-fb" % (v & 0xFF)
    return "unknown-%d" % v


def version_number(name: str | None) -> int | None:
    """The protocol version number a name of _version_name stands for (None if it names none)."""
    if not name:
        return None
    v = _VERSION_NUMBERS.get(name)
    if v is not None:
        return v
    if name.startswith("TLSv13-draft"):
        n = name[len("TLSv13-draft"):]
        fb = n.endswith("-fb")
        n = n[:-3] if fb else n
        return ((0xFB if fb else 0x7F) << 8 | int(n)) if n.isdigit() and int(n) < 256 else None
    if name.startswith("unknown-") and name[8:].isdigit():
        return int(name[8:])
    return None


_VERSION_NUMBERS = {v: k for k, v in _VERSIONS.items()}


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
_CIPHER_NUMBERS = {v: k for k, v in CIPHERS.items()}


def cipher_number(name: str | None) -> int | None:
    """The cipher suite number a `cipher` value names (None if it names none)."""
    if not name:
        return None
    v = _CIPHER_NUMBERS.get(name)
    if v is None and name.startswith("unknown-") and name[8:].isdigit():
        v = int(name[8:])
    return v

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

def is_grease(v: int) -> bool:
    return (v & 0x0F0F) == 0x0A0A and (v >> 8) == (v & 0xFF)


# The 16 GREASE values (RFC 8701), for set lookups in the fingerprint loops.
GREASE = frozenset(0x0A0A + 0x1010 * i for i in range(16))  # 0x0A0A, 0x1A1A, ... 0xFAFA: is_grease's


# ---- ClientHello / ServerHello ----------------------------------------------------------------


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


def _client_hello_of(f: list[int], b: bytes) -> ClientHello:
    """The ClientHello from client_hello's fields (tls_kernel.CH_*), positions into b."""
    p = CH_VALUES
    q = p + f[CH_N_CIPHERS]
    ciphers = f[p:q]
    p, q = q, q + f[CH_N_EXTENSIONS]
    extensions = f[p:q]
    p, q = q, q + f[CH_N_GROUPS]
    groups = f[p:q]
    p, q = q, q + f[CH_N_POINT_FORMATS]
    point_formats = f[p:q]
    p, q = q, q + f[CH_N_SIG_ALGS]
    sig_algs = f[p:q]
    p, q = q, q + f[CH_N_VERSIONS]
    versions = f[p:q]
    p = q
    sni = f[CH_SNI]
    return ClientHello(
        version=f[CH_VERSION], session_id=b[f[CH_SESSION_ID]:f[CH_SESSION_ID + 1]], ciphers=ciphers,
        extensions=extensions, sni=b[sni:f[CH_SNI + 1]].decode("utf-8", "backslashreplace") if sni >= 0 else None,
        alpn=[b[f[i]:f[i + 1]] for i in range(p, p + 2 * f[CH_N_ALPN], 2)], groups=groups,
        point_formats=point_formats, sig_algs=sig_algs, supported_versions=versions,
        malformed=f[CH_MALFORMED] != 0)


def _server_hello_of(f: list[int], b: bytes) -> ServerHello:
    """The ServerHello from server_hello's fields (tls_kernel.SH_*), positions into b."""
    cipher, selected, group, alpn = f[SH_CIPHER], f[SH_SELECTED_VERSION], f[SH_KEY_SHARE_GROUP], f[SH_ALPN]
    return ServerHello(
        version=f[SH_VERSION], session_id=b[f[SH_SESSION_ID]:f[SH_SESSION_ID + 1]],
        cipher=cipher if cipher >= 0 else None, extensions=f[SH_VALUES:SH_VALUES + f[SH_N_EXTENSIONS]],
        selected_version=selected if selected >= 0 else None, key_share_group=group if group >= 0 else None,
        psk=f[SH_PSK] != 0, alpn=b[alpn:f[SH_ALPN + 1]] if alpn >= 0 else None, hrr=f[SH_HRR] != 0,
        malformed=f[SH_MALFORMED] != 0)


def parse_client_hello(body: bytes) -> ClientHello:
    """A ClientHello message body (after the 4-byte handshake header). Never raises."""
    return _client_hello_of(client_hello(np.frombuffer(body, dtype=np.uint8), 0, len(body)).tolist(), body)


def parse_server_hello(body: bytes) -> ServerHello:
    """A ServerHello (or HelloRetryRequest) message body. Never raises."""
    return _server_hello_of(server_hello(np.frombuffer(body, dtype=np.uint8), 0, len(body)).tolist(), body)


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


# ---- the sessions ---------------------------------------------------------------------------


@dataclass
class Handshakes:
    """What tls_kernel.handshakes read of a list of streams, by name (see there)."""

    head: np.ndarray
    at: np.ndarray
    ciphers: np.ndarray
    extensions: np.ndarray
    sig_algs: np.ndarray
    versions: np.ndarray
    server_extensions: np.ndarray
    sni: np.ndarray
    next_protocol: np.ndarray
    alpn: np.ndarray
    alpn_ends: np.ndarray
    ja3_keys: np.ndarray
    ja3_key_ends: np.ndarray
    ja4_keys: np.ndarray
    ja4_key_ends: np.ndarray
    ja3s_keys: np.ndarray
    ja3s_key_ends: np.ndarray
    der: np.ndarray                # the distinct certificates
    der_ends: np.ndarray
    cert_group: np.ndarray         # per certificate seen: its distinct number
    cert_ts: np.ndarray
    cert_by_client: np.ndarray

    @functools.cached_property
    def distinct_certificates(self) -> list[bytes]:
        """The DER of each distinct certificate (cert_group numbers them): the same certificates
        come back in session after session (a site's chain, a CA), and each is looked at once."""
        ends = self.der_ends.tolist()
        der = self.der
        return [der[ends[k]:ends[k + 1]].tobytes() for k in range(len(ends) - 1)]

    def cert_sessions(self) -> np.ndarray:
        """The position in the streams read of each certificate's session."""
        return np.repeat(np.arange(len(self.head)), np.diff(self.at[AT_CERTS]))


# The streams last read (weakly: their bytes are the stage's to free) and what was read of them.
_read_last: tuple[list[weakref.ref], Handshakes] | None = None
# The streams last put client first, and how.
_client_first_last: tuple[list[weakref.ref], list[Stream] | JoinedStreams | None] | None = None


def _refs(streams: list[Stream] | JoinedStreams) -> list[weakref.ref]:
    """Weak references to what a call was given, to know the same streams again."""
    return [weakref.ref(s) for s in ([streams] if isinstance(streams, JoinedStreams) else streams)]


def _same(refs: list[weakref.ref] | None, streams: list[Stream] | JoinedStreams) -> bool:
    """Whether `streams` are what `refs` (_refs) were taken of."""
    items = [streams] if isinstance(streams, JoinedStreams) else streams
    return refs is not None and len(refs) == len(items) and all(r() is s for r, s in zip(refs, items))


def _is_client_hello(head: bytes) -> bool:
    """Whether bytes begin with a TLS handshake record whose first message is a ClientHello."""
    return len(head) >= 6 and head[0] == 0x16 and head[1] == 3 and head[5] == 1


def _starts_client_hello(data: np.ndarray, at: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """_is_client_hello of many sides at once (bytes data[at[j]:ends[j]])."""
    ok = ends - at >= 6
    head = np.zeros((len(at), 6), dtype=np.uint8)
    if ok.any():
        head[ok] = data[at[ok, None] + np.arange(6)]
    return ok & (head[:, 0] == 0x16) & (head[:, 1] == 3) & (head[:, 5] == 1)


def client_first(streams: list[Stream] | JoinedStreams) -> list[Stream] | JoinedStreams:
    """`streams` with the sides exchanged of each session whose responder sent the ClientHello
    (the SYN missed: the SYN-ACK's sender was taken for the originator, as Zeek does on ports
    it does not know), so that the client's side is read as the client's. The rows keep the
    session's own originator and responder. The same object when no session needs it (the
    last answer is kept: tls and x509 ask for the same streams one after the other)."""
    global _client_first_last
    last = _client_first_last
    if last is not None and _same(last[0], streams):
        return streams if last[1] is None else last[1]
    if isinstance(streams, JoinedStreams):
        j = streams
        sides = _starts_client_hello(j.data, j.data_at[:-1], j.data_at[1:])
        flip = np.flatnonzero(sides[1::2] & ~sides[0::2])
        out = j.swapped(flip) if len(flip) else j
    else:
        out = streams
        for k, s in enumerate(streams):
            if _is_client_hello(s.resp.data[:6]) and not _is_client_hello(s.orig.data[:6]):
                if out is streams:
                    out = list(streams)
                out[k] = dataclasses.replace(s, orig=s.resp, resp=s.orig)
    # the input itself is not held (its bytes are the stage's to free): None stands for it
    _client_first_last = (_refs(streams), None if out is streams else out)
    return out


def read_handshakes(streams: list[Stream] | JoinedStreams) -> Handshakes:
    """The handshakes of `streams` (client first: client_first), read by one kernel call. The
    last ones read are kept: x509 reads the same streams right after tls (the stage calls it
    with another list of them, or the same JoinedStreams)."""
    global _read_last
    streams = client_first(streams)
    last = _read_last
    if last is not None and _same(last[0], streams):
        return last[1]
    _read_last = None
    h = _read(streams)
    _read_last = (_refs(streams), h)
    return h


def _joined(arrays: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """int64 arrays end to end, and where each begins (one more: the end)."""
    at = np.zeros(len(arrays) + 1, dtype=np.int64)
    np.cumsum(list(map(len, arrays)), out=at[1:])
    # joined as bytes: half the time of np.concatenate on many small arrays
    try:
        joined = b"".join(arrays)
        if len(joined) == 8 * at[-1]:
            return np.frombuffer(joined, dtype=np.int64), at
    except (BufferError, TypeError):  # an array not contiguous
        pass
    return np.concatenate(arrays).astype(np.int64), at  # or not all int64


def _read(streams: list[Stream] | JoinedStreams) -> Handshakes:
    """handshakes on the streams: their directions (client, server, session by session) end to
    end, each one's bytes, first gap and packet times."""
    if isinstance(streams, JoinedStreams):  # already end to end
        j = streams
        return Handshakes(*handshakes(j.data, j.data_at, j.contiguous_ends(), j.ts_offsets, j.ts_at, j.ts, j.ts_at))
    sides = [d for s in streams for d in (s.orig, s.resp)]
    datas = [d.data for d in sides]
    data_at = np.zeros(len(sides) + 1, dtype=np.int64)
    np.cumsum(list(map(len, datas)), out=data_at[1:])
    limits = np.diff(data_at)
    for j, gaps in enumerate([d.gaps for d in sides]):
        if gaps:
            limits[j] = sides[j].contiguous_end()
    offsets, offsets_at = _joined([d.ts_offsets for d in sides])
    times, times_at = _joined([d.ts for d in sides])
    data = np.frombuffer(b"".join(datas), dtype=np.uint8)
    return Handshakes(*handshakes(data, data_at, limits, offsets, offsets_at, times, times_at))


def _validity(valid: np.ndarray) -> tuple[pa.Buffer | None, int]:
    """An Arrow validity bitmap and null count for `valid` (no bitmap when all are)."""
    if valid.all():
        return None, 0
    return pa.py_buffer(np.packbits(valid, bitorder="little")), len(valid) - int(np.count_nonzero(valid))


def _row_offsets(at: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Offsets of the rows' values from per-session offsets (sessions without a row have none)."""
    return np.append(at[rows], at[-1])


# The columns are made as specs that become an Arrow array (arrow(), for a batch's table) or give
# one row's value (value(k), for parse_stream's dict: a batch of one, made without Arrow).


class _Values:
    """Row k: values[k] (numbers or booleans), null where not valid."""

    def __init__(self, values: np.ndarray, valid: np.ndarray | None = None, type: pa.DataType | None = None):
        self.values, self.valid, self.type = values, valid, type

    def arrow(self) -> pa.Array:
        return pa.array(self.values, self.type, mask=None if self.valid is None else ~self.valid)

    def value(self, k: int):
        return None if self.valid is not None and not self.valid[k] else self.values[k].item()


class _Taken:
    """Row k: items[index[k]] (strings), null where not valid; `array`: items as Arrow, if made."""

    def __init__(self, items: list, index: np.ndarray, valid: np.ndarray | None = None,
                 array: pa.Array | None = None):
        self.items, self.index, self.valid, self.array = items, index, valid, array

    def arrow(self) -> pa.Array:
        if self.valid is not None and not self.valid.any():
            return pa.nulls(len(self.index), pa.string())
        items = self.array if self.array is not None else pa.array(self.items, pa.string())
        return ac.take(items, pa.array(self.index, mask=None if self.valid is None else ~self.valid))

    def value(self, k: int):
        return None if self.valid is not None and not self.valid[k] else self.items[self.index[k]]


class _Texts:
    """Row k: text[offsets[k]:offsets[k + 1]] decoded as UTF-8 with invalid bytes as \\xNN
    escapes (as bytes.decode(..., "backslashreplace")), null where not `valid`. Bytes that are
    all ASCII (ascii_only) are their own text in Arrow; others are decoded in Python."""

    def __init__(self, text: np.ndarray, offsets: np.ndarray, valid: np.ndarray, ascii_only: bool):
        self.text, self.offsets, self.valid, self.ascii_only = text, offsets, valid, ascii_only

    def arrow(self) -> pa.Array:
        n = len(self.valid)
        bitmap, nulls = _validity(self.valid)
        buffers = [bitmap, pa.py_buffer(self.offsets.astype(np.int32)), pa.py_buffer(self.text)]
        if self.ascii_only:
            return pa.Array.from_buffers(pa.string(), n, buffers, null_count=nulls)
        raw = pa.Array.from_buffers(pa.binary(), n, buffers, null_count=nulls).to_pylist()
        return pa.array([None if b is None else b.decode("utf-8", "backslashreplace") for b in raw], pa.string())

    def value(self, k: int):
        if not self.valid[k]:
            return None
        return self.text[self.offsets[k]:self.offsets[k + 1]].tobytes().decode("utf-8", "backslashreplace")


class _Lists:
    """Row k: the items offsets[k] to offsets[k + 1] of `items` (a numpy array of numbers, or a
    column), null where not valid."""

    def __init__(self, items, offsets: np.ndarray, valid: np.ndarray):
        self.items, self.offsets, self.valid = items, offsets, valid

    def arrow(self) -> pa.Array:
        items = pa.array(self.items) if isinstance(self.items, np.ndarray) else self.items.arrow()
        bitmap, nulls = _validity(self.valid)
        return pa.Array.from_buffers(pa.list_(items.type), len(self.valid),
                                     [bitmap, pa.py_buffer(self.offsets.astype(np.int32))], null_count=nulls,
                                     children=[items])

    def value(self, k: int):
        if not self.valid[k]:
            return None
        a, b = int(self.offsets[k]), int(self.offsets[k + 1])
        if isinstance(self.items, np.ndarray):
            return self.items[a:b].tolist()
        return [self.items.value(j) for j in range(a, b)]


class _Names:
    """The names of 16-bit protocol numbers (versions, ciphers, groups, alerts), each made once
    by name_of and kept, as an Arrow array the rows take from."""

    def __init__(self, name_of):
        self.name_of = name_of
        self.index = np.full(1 << 16, -1, dtype=np.int64)
        self.names: list[str] = []
        self.array = pa.array([], pa.string())

    def column(self, values: np.ndarray, valid: np.ndarray) -> _Taken:
        """name_of(v) for each valid value (all in 0..65535), null elsewhere."""
        numbers = values[valid]
        index = self.index[numbers]
        if (index < 0).any():
            for v in np.unique(numbers[index < 0]).tolist():
                self.index[v] = len(self.names)
                self.names.append(self.name_of(v))
            self.array = pa.array(self.names, pa.string())
            index = self.index[numbers]
        at = np.zeros(len(values), dtype=np.int64)
        at[valid] = index
        return _Taken(self.names, at, valid, self.array)


_VERSION_NAMES = _Names(_version_name)
_CIPHER_NAMES = _Names(lambda c: CIPHERS.get(c, "unknown-%d" % c))
_GROUP_NAMES = _Names(lambda g: GROUPS.get(g, "unknown-%d" % g))
_ALERT_NAMES = _Names(lambda a: ALERTS.get(a, "unknown-%d" % a))
# The ECDH cipher suites: after one of them the ServerKeyExchange names the curve.
_ECDH = np.zeros(1 << 16, dtype=bool)
_ECDH[[c for c, name in CIPHERS.items() if "ECDH" in name]] = True


def _fingerprints(keys: np.ndarray, ends: np.ndarray, which: np.ndarray, of) -> _Taken:
    """Per row, the fingerprint `of` makes of the distinct key numbered which[k] (null where it
    is -1). Each distinct key is fingerprinted once, and kept (by its bytes) for later batches:
    the same client software sends the same hello over and over."""
    ends = ends.tolist()
    raw = keys.tobytes()
    prints = []
    for a, b in zip(ends, ends[1:]):
        prints.append(_cached((of, raw[8 * a:8 * b]), lambda: of(keys[a:b].tolist())))
    has = which >= 0
    return _Taken(prints, np.where(has, which, 0), has)


def _lists_of(key: list, counts: list) -> list[list]:
    """The lists that follow the header of a fingerprint key, by their counts."""
    out, p = [], len(key) - sum(counts)
    for c in counts:
        out.append(key[p:p + c])
        p += c
    return out


def _ja3_of_key(key: list) -> str:
    ciphers, extensions, groups, point_formats = _lists_of(key[:5 + sum(key[1:5])], key[1:5])
    return ja3(ClientHello(version=key[0], ciphers=ciphers, extensions=extensions, groups=groups,
                           point_formats=point_formats))


def _ja4_of_key(key: list) -> str:
    counts, first_alpn = key[1:5], key[5]
    versions, ciphers, extensions, sig_algs = _lists_of(key[:6 + sum(counts)], counts)
    alpn = [bytes(key[6 + sum(counts):])] if first_alpn >= 0 else []
    return ja4(ClientHello(version=key[0], supported_versions=versions, ciphers=ciphers, extensions=extensions,
                           sig_algs=sig_algs, alpn=alpn), "t")


def _ja3s_of_key(key: list) -> str:
    return ja3s(ServerHello(version=key[0], cipher=key[1] if key[1] >= 0 else None, extensions=key[2:]))


def _packets(streams: list[Stream], rows: np.ndarray, head: np.ndarray) -> _Values:
    """The packet Suricata logs each row's handshake on (its tls event's pcap_cnt): the one that
    acknowledged the bytes completing both sides' handshakes, as its TLS parser counts them:
    the server's certificate completes both; else the server is done at its first application
    data record (counted only after a hello), the client at its ChangeCipherSpec or first
    application data record. Null when not both (Suricata logs it at the flow's end, on no
    packet of the capture)."""
    cert_end, app_end, done_end = head[:, SERVER_CERT_END], head[:, SERVER_APP_END], head[:, CLIENT_DONE_END]
    by_cert = cert_end >= 0
    by_data = ~by_cert & (head[:, H_HELLO] > 0) & (app_end >= 0) & (done_end >= 0)
    server_q = np.flatnonzero(by_cert | by_data)
    client_q = np.flatnonzero(by_data)
    ends = np.concatenate([np.where(by_cert, cert_end, app_end)[server_q], done_end[client_q]])
    if isinstance(streams, JoinedStreams):  # sides by number: 2i the originator's, 2i + 1 the responder's
        acked = _acked_joined(streams, np.concatenate([2 * rows[server_q] + 1, 2 * rows[client_q]]), ends)
    else:
        sides = ([streams[i].resp for i in rows[server_q].tolist()]
                 + [streams[i].orig for i in rows[client_q].tolist()])
        acked = acked_by_many(sides, ends)
    packet = np.zeros(len(rows), dtype=np.int64)
    packet[server_q] = acked[:len(server_q)]
    server, client = packet[client_q], acked[len(server_q):]
    packet[client_q] = np.where((server > 0) & (client > 0), np.maximum(server, client), 0)
    return _Values(packet, packet > 0)


def acked_by_many(sides: list[Direction], ends: np.ndarray) -> np.ndarray:
    """Direction.acked_by(end) of each (direction, end) pair, in one kernel call."""
    sides, ends = list(sides), np.array(ends, dtype=np.int64)
    origins = [d._ack_origin for d in sides]
    if any(origins):
        for q, origin in enumerate(origins):
            while origin is not None:  # a part of another direction (Direction.after)
                sides[q], offset = origin
                ends[q] += offset
                origin = sides[q]._ack_origin
    acks = [d.acks for d in sides]
    gaps = [d.gaps for d in sides]
    if any(gaps):  # in sequence numbers: the bytes of the gaps before `end` count too
        for q, side_gaps in enumerate(gaps):
            if side_gaps:
                end = ends[q]
                ends[q] = end + sum(n for o, n in side_gaps if o < end)
    reach = [r for a in acks for r, _ in a]
    if not reach:
        return np.zeros(len(sides), dtype=np.int64)
    packets = [p for a in acks for _, p in a]
    # where each query's ACKs begin: their arrays' first element
    arrays_at = np.zeros(len(acks) + 1, dtype=np.int64)
    np.cumsum(list(map(len, acks)), out=arrays_at[1:])
    reach, reach_at = _joined(reach)
    packets, _ = _joined(packets)
    got = acked_packets(reach, packets, reach_at[arrays_at], ends)
    got[ends <= 0] = 0
    return got


def _acked_joined(j: JoinedStreams, sides: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """acked_by_many for sides of JoinedStreams (by number)."""
    seq_ends = j.seq_ends(sides, ends)
    first, count = j.ack_at[sides], j.ack_at[sides + 1] - j.ack_at[sides]
    bounds = np.zeros(len(sides) + 1, dtype=np.int64)
    np.cumsum(count, out=bounds[1:])
    picked = np.repeat(first - bounds[:-1], count) + np.arange(bounds[-1], dtype=np.int64)
    got = acked_packets(j.ack_rel[picked], j.ack_pkt[picked], bounds, seq_ends)
    got[np.asarray(ends) <= 0] = 0
    return got


def _certificate_columns(h: Handshakes, rows: np.ndarray, head: np.ndarray) -> dict:
    """cert_chain_fps, subject, issuer and their client_ twins (certificates are read before
    TLS 1.3 only: null after it, as without a Certificate message)."""
    ders = h.distinct_certificates
    names = [leaf_names(d) for d in ders]
    fps = [_parse_cached(d)["fingerprint"] for d in ders]
    subjects, issuers = [s for s, _ in names], [i for _, i in names]
    by_client = h.cert_by_client.astype(bool)
    out = {}
    for count_at, prefix, side in ((SERVER_CERTS, "", ~by_client), (CLIENT_CERTS, "client_", by_client)):
        count = head[:, count_at]
        chain = h.cert_group[side]  # the side's certificates, row by row
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(np.maximum(count, 0), out=offsets[1:])
        out[prefix + "cert_chain_fps"] = _Lists(_Taken(fps, chain), offsets, count >= 0)
        # the leaf: the chain's first certificate
        has = count > 0
        leaf = np.zeros(len(rows), dtype=np.int64)
        leaf[has] = chain[offsets[:-1][has]]
        out[prefix + "subject"] = _Taken(subjects, leaf, has)
        out[prefix + "issuer"] = _Taken(issuers, leaf, has)
    return out


# The columns parse_streams makes (the session's are the stage's; validation_status is null).
_COLUMNS = pa.schema([f for f in SCHEMA if f.name not in ("uid", "orig_h", "orig_p", "resp_h", "resp_p",
                                                            "validation_status")])


def _tls_columns(h: Handshakes, streams: list[Stream]) -> tuple[dict, np.ndarray]:
    """The `tls` columns (but the session's) of the handshakes read of `streams`, and the
    position in `streams` of each row's session."""
    rows = np.flatnonzero(h.head[:, LOGGED] != 0)
    head = h.head[rows]
    at = h.at
    has_client = head[:, H_CLIENT_HELLO] != 0
    has_hello = head[:, H_HELLO] > 0
    not_ascii = int(np.bitwise_or.reduce(head[:, H_NOT_ASCII])) if len(rows) else 0
    cipher = head[:, H_HELLO_CIPHER]
    has_cipher = has_hello & (cipher >= 0)
    # the curve: the ServerHello's key share group, or (before TLS 1.3, an ECDH cipher) the
    # ServerKeyExchange's named curve
    ske = head[:, SKE_GROUP]
    from_ske = (head[:, TLS13] == 0) & (ske >= 0) & has_cipher & _ECDH[np.where(has_cipher, cipher, 0)]
    group = np.where(from_ske, ske, head[:, H_KEY_SHARE_GROUP])
    alert = head[:, ALERT]
    alpn = _Texts(h.alpn, h.alpn_ends, np.ones(len(h.alpn_ends) - 1, dtype=bool), not not_ascii & NOT_ASCII_ALPN)
    cols = {
        "ts": _Values(head[:, TS], None, pa.timestamp("ns")),
        "version": _VERSION_NAMES.column(head[:, VERSION], has_hello),
        "cipher": _CIPHER_NAMES.column(cipher, has_cipher),
        "curve": _GROUP_NAMES.column(group, group >= 0),
        "server_name": _Texts(h.sni, _row_offsets(at[AT_SNI], rows), head[:, H_SNI] != 0,
                              not not_ascii & NOT_ASCII_SNI),
        "resumed": _Values(head[:, H_RESUMED] != 0),
        "last_alert": _ALERT_NAMES.column(alert, alert >= 0),
        "next_protocol": _Texts(h.next_protocol, _row_offsets(at[AT_NEXT_PROTOCOL], rows),
                                head[:, H_NEXT_PROTOCOL] != 0, not not_ascii & NOT_ASCII_NEXT_PROTOCOL),
        "established": _Values(head[:, ESTABLISHED] != 0),
        "alpn": _Lists(alpn, _row_offsets(at[AT_ALPN], rows), head[:, H_N_ALPN] > 0),
        "client_version": _VERSION_NAMES.column(head[:, H_CLIENT_VERSION], has_client),
        "server_version": _VERSION_NAMES.column(head[:, H_HELLO_VERSION], has_hello),
        "ja3": _fingerprints(h.ja3_keys, h.ja3_key_ends, head[:, H_JA3], _ja3_of_key),
        "ja3s": _fingerprints(h.ja3s_keys, h.ja3s_key_ends, head[:, H_JA3S], _ja3s_of_key),
        "ja4": _fingerprints(h.ja4_keys, h.ja4_key_ends, head[:, H_JA4], _ja4_of_key),
        "malformed": _Values(head[:, MALFORMED] != 0),
        "packet": _packets(streams, rows, head),
    }
    for name, values, offsets, valid in (
            ("client_ciphers", h.ciphers, AT_CIPHERS, has_client),
            ("ssl_client_exts", h.extensions, AT_EXTENSIONS, has_client),
            ("client_sig_algs", h.sig_algs, AT_SIG_ALGS, has_client),
            ("client_supported_versions", h.versions, AT_VERSIONS, has_client),
            ("ssl_server_exts", h.server_extensions, AT_SERVER_EXTENSIONS, has_hello)):
        cols[name] = _Lists(values, _row_offsets(at[offsets], rows), valid)
    cols.update(_certificate_columns(h, rows, head))
    return cols, rows


def parse_streams(streams: list[Stream]) -> Records:
    """The `tls` rows of many sessions (one per session whose streams carry TLS), as columns."""
    cols, rows = _tls_columns(read_handshakes(streams), client_first(streams))
    return Records(pa.Table.from_arrays([cols[f.name].arrow() for f in _COLUMNS], schema=_COLUMNS), rows)


def dicts(table: pa.Table) -> list[dict]:
    """A table's rows as dicts, times as integer nanoseconds (as rows are made)."""
    for i, f in enumerate(table.schema):
        if pa.types.is_timestamp(f.type):
            table = table.set_column(i, f.name, ac.cast(table.column(i), pa.int64()))
    return table.to_pylist()


@dataclass
class Analysis:
    row: dict | None
    certs: list[tuple[int, bytes, bool]]   # (ts, der, sent by the client)
    stream: Stream | None = field(default=None, repr=False)

    @functools.cached_property
    def _hellos(self) -> tuple[ClientHello | None, ServerHello | None]:
        s = self.stream
        if s is None:
            return None, None
        orig, resp = s.orig, s.resp
        result, handshake_bytes = handshake(
            np.frombuffer(orig.data, dtype=np.uint8), orig.contiguous_end(), orig.ts_offsets, orig.ts,
            np.frombuffer(resp.data, dtype=np.uint8), resp.contiguous_end(), resp.ts_offsets, resp.ts)
        f = result.tolist()
        b = handshake_bytes.tobytes()
        at = f[CLIENT_HELLO]
        ch = _client_hello_of(f[at:f[CLIENT_HELLO + 1]], b) if at >= 0 else None
        at = f[SERVER_HELLO]
        sh = _server_hello_of(f[at:f[SERVER_HELLO + 1]], b) if at >= 0 else None
        return ch, sh

    @property
    def client_hello(self) -> ClientHello | None:
        return self._hellos[0]

    @property
    def server_hello(self) -> ServerHello | None:
        """The ServerHello (not a HelloRetryRequest before it)."""
        return self._hellos[1]


_last: tuple[object, Analysis] | None = None


def analyze(s: Stream) -> Analysis:
    """The TLS handshake of one session: its row, certificates and hellos, as parse_streams
    reads them (cached for the stream object last analysed)."""
    global _last
    if _last is not None and _last[0] is s:
        return _last[1]
    try:
        h = read_handshakes([s])
        client = client_first([s])[0]  # what read_handshakes read (its answer kept)
        cols, rows = _tls_columns(h, [client])
        if len(rows):
            row = _base_row(s, 0) | {name: column.value(0) for name, column in cols.items()}
            ders = h.distinct_certificates
            certs = [(t, ders[g], c) for t, g, c in zip(h.cert_ts.tolist(), h.cert_group.tolist(),
                                                         h.cert_by_client.astype(bool).tolist())]
            a = Analysis(row, certs, client)
        else:  # no TLS, or records but no handshake seen: not logged (as Zeek)
            a = Analysis(None, [])
    except Exception:  # a parser bug must cost one row, not the session
        a = Analysis(_base_row(s, 0) | {"malformed": True}, [])
    _last = (s, a)
    return a


def _base_row(s: Stream, ts: int) -> dict:
    return {"ts": ts, "uid": s.uid, "orig_h": s.orig_h, "orig_p": s.orig_p, "resp_h": s.resp_h,
            "resp_p": s.resp_p, "validation_status": None}


def parse_stream(s: Stream) -> list[dict]:
    """One `tls` row for a session whose streams carry TLS; [] when neither side does."""
    a = analyze(s)
    return [a.row] if a.row is not None else []
