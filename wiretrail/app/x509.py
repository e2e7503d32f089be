"""X.509 certificates seen in TLS handshakes: the `x509` table (Zeek's x509.log).

DER is parsed with the `cryptography` package; names are printed as Zeek prints them
(OpenSSL's X509_NAME_print_ex with XN_FLAG_RFC2253: last RDN first, OpenSSL short
attribute names such as `emailAddress`, `street`, `postalCode`, RFC 2253 escapes, bytes
above 0x7f as `\\XX`). Fingerprints are SHA-256 (Zeek 6's default `fingerprint`), with
SHA-1 alongside.

The rows come from the certificates the TLS parser found in the sessions (`app.tls`):
`parse_streams` reuses that parse when it is called on the streams `app.tls` just read.
A certificate that `cryptography` cannot read still yields a row (fingerprints,
`malformed` set); nothing here raises.
"""

from __future__ import annotations

import functools
import hashlib
import warnings
from datetime import timezone

import pyarrow as pa

from wiretrail import arrow_compute as ac
from wiretrail.app.base import JoinedStreams, Records, Stream

TABLE = "x509"
SCHEMA = pa.schema([
    ("ts", pa.timestamp("ns")),
    ("uid", pa.string()),
    ("fingerprint", pa.string()),          # SHA-256 of the DER, hex
    ("version", pa.int32()),               # certificate.version (1..3)
    ("serial", pa.string()),               # upper-case hex, even length (OpenSSL BN_bn2hex)
    ("subject", pa.string()),
    ("issuer", pa.string()),
    ("not_valid_before", pa.timestamp("ns")),
    ("not_valid_after", pa.timestamp("ns")),
    ("key_alg", pa.string()),
    ("sig_alg", pa.string()),
    ("key_type", pa.string()),
    ("key_length", pa.int32()),
    ("exponent", pa.string()),
    ("curve", pa.string()),
    ("san_dns", pa.list_(pa.string())),
    ("san_uri", pa.list_(pa.string())),
    ("san_email", pa.list_(pa.string())),
    ("san_ip", pa.list_(pa.string())),
    ("basic_constraints_ca", pa.bool_()),
    ("basic_constraints_path_len", pa.int32()),
    ("host_cert", pa.bool_()),             # sent by the server
    ("client_cert", pa.bool_()),           # sent by the client
    ("self_signed", pa.bool_()),           # subject == issuer
    ("sha1", pa.string()),
    ("malformed", pa.bool_()),
])
# The sessions app.tls reads (run after it on the same Stream, the handshake is parsed once).
PORTS = {443, 465, 563, 585, 614, 636, 853, 989, 990, 992, 993, 994, 995, 3269, 5061, 5223,
         5349, 6697, 8443, 8883}
NDPI = {"TLS"}
# The handshake, certificates and the first encrypted records fit well within this: the
# rest of a TLS stream is ciphertext no parser reads, so the stage keeps no more of it.
STREAM_DEPTH = 64 << 10
# Nothing past where tls_kernel's record walk stops (the fourth application-data record each
# way) is read: the reassembler, told so, keeps no more of a session only TLS parsers read.
HANDSHAKE_ONLY = True
JOINED = True  # parse_streams also reads JoinedStreams (app.base)

# OpenSSL short names of name attributes (what X509_NAME_print_ex prints).
_ATTR = {
    "2.5.4.3": "CN", "2.5.4.6": "C", "2.5.4.7": "L", "2.5.4.8": "ST", "2.5.4.10": "O",
    "2.5.4.11": "OU", "2.5.4.9": "street", "2.5.4.17": "postalCode", "2.5.4.5": "serialNumber",
    "2.5.4.4": "SN", "2.5.4.42": "GN", "2.5.4.12": "title", "2.5.4.43": "initials",
    "2.5.4.44": "generationQualifier", "2.5.4.46": "dnQualifier", "2.5.4.65": "pseudonym",
    "2.5.4.41": "name", "2.5.4.13": "description", "2.5.4.15": "businessCategory",
    "2.5.4.16": "postalAddress", "2.5.4.18": "postOfficeBox", "2.5.4.97": "organizationIdentifier",
    "1.2.840.113549.1.9.1": "emailAddress", "1.2.840.113549.1.9.2": "unstructuredName",
    "0.9.2342.19200300.100.1.25": "DC", "0.9.2342.19200300.100.1.1": "UID",
    "1.3.6.1.4.1.311.60.2.1.1": "jurisdictionL", "1.3.6.1.4.1.311.60.2.1.2": "jurisdictionST",
    "1.3.6.1.4.1.311.60.2.1.3": "jurisdictionC",
}

# OpenSSL long names of algorithm OIDs (Zeek logs these for key_alg and sig_alg).
_ALG = {
    "1.2.840.113549.1.1.1": "rsaEncryption",
    "1.2.840.113549.1.1.2": "md2WithRSAEncryption",
    "1.2.840.113549.1.1.3": "md4WithRSAEncryption",
    "1.2.840.113549.1.1.4": "md5WithRSAEncryption",
    "1.2.840.113549.1.1.5": "sha1WithRSAEncryption",
    "1.2.840.113549.1.1.10": "rsassaPss",
    "1.2.840.113549.1.1.11": "sha256WithRSAEncryption",
    "1.2.840.113549.1.1.12": "sha384WithRSAEncryption",
    "1.2.840.113549.1.1.13": "sha512WithRSAEncryption",
    "1.2.840.113549.1.1.14": "sha224WithRSAEncryption",
    "1.2.840.113549.1.3.1": "dhKeyAgreement",
    "1.2.840.10045.2.1": "id-ecPublicKey",
    "1.2.840.10045.4.1": "ecdsa-with-SHA1",
    "1.2.840.10045.4.3.1": "ecdsa-with-SHA224",
    "1.2.840.10045.4.3.2": "ecdsa-with-SHA256",
    "1.2.840.10045.4.3.3": "ecdsa-with-SHA384",
    "1.2.840.10045.4.3.4": "ecdsa-with-SHA512",
    "1.2.840.10040.4.1": "dsaEncryption",
    "1.2.840.10040.4.3": "dsaWithSHA1",
    "2.16.840.1.101.3.4.3.1": "dsa_with_SHA224",
    "2.16.840.1.101.3.4.3.2": "dsa_with_SHA256",
    "1.3.14.3.2.29": "sha1WithRSA",
    "1.3.101.110": "X25519", "1.3.101.111": "X448",
    "1.3.101.112": "ED25519", "1.3.101.113": "ED448",
    "2.16.840.1.101.3.4.3.17": "ML-DSA-44", "2.16.840.1.101.3.4.3.18": "ML-DSA-65",
    "2.16.840.1.101.3.4.3.19": "ML-DSA-87",
    "1.2.643.2.2.3": "GOST R 34.11-94 with GOST R 34.10-2001",
}

# cryptography curve names -> OpenSSL short names.
_CURVE = {"secp256r1": "prime256v1", "secp192r1": "prime192v1"}


def _esc(value: str, first: bool = True) -> str:
    """RFC 2253 escaping as OpenSSL's ASN1_STRFLGS_RFC2253 does it (UTF-8 bytes > 0x7f as \\XX)."""
    raw = value.encode("utf-8", "surrogateescape")
    out = []
    n = len(raw)
    for i, b in enumerate(raw):
        c = chr(b)
        if b > 0x7E or b < 0x20:
            out.append("\\%02X" % b)
        elif c in ',+"\\<>;':
            out.append("\\" + c)
        elif (i == 0 and c in "# ") or (i == n - 1 and c == " "):
            out.append("\\" + c)
        else:
            out.append(c)
    return "".join(out)


def format_name(name) -> str:
    """A cryptography `Name` as Zeek logs it: RDNs last to first, `short=value` joined by ','."""
    parts = []
    for rdn in reversed(list(name.rdns)):
        avas = []
        for attr in rdn:
            oid = attr.oid.dotted_string
            key = _ATTR.get(oid, oid)
            val = attr.value
            if isinstance(val, bytes):
                avas.append(f"{key}=#" + val.hex().upper())
            else:
                avas.append(f"{key}={_esc(str(val))}")
        parts.append("+".join(avas))
    return ",".join(parts)


# ---- a minimal DER walker (for what cryptography refuses: unknown key types) ----------------
def _tlv(buf: bytes, pos: int):
    """(tag, value start, value end) of the DER element at pos; raises ValueError."""
    if pos + 2 > len(buf):
        raise ValueError("short")
    tag = buf[pos]
    ln = buf[pos + 1]
    p = pos + 2
    if ln & 0x80:
        k = ln & 0x7F
        if k == 0 or k > 4 or p + k > len(buf):
            raise ValueError("length")
        ln = int.from_bytes(buf[p:p + k], "big")
        p += k
    if p + ln > len(buf):
        raise ValueError("overrun")
    return tag, p, p + ln


def _spki(der: bytes):
    """(algorithm OID text, public key bit-string length in bytes) from the DER certificate."""
    _, s, _ = _tlv(der, 0)              # Certificate
    _, p, tbs_end = _tlv(der, s)        # tbsCertificate
    tag, _, e = _tlv(der, p)
    if tag == 0xA0:                     # [0] version
        p = e
        tag, _, e = _tlv(der, p)
    for _ in range(5):                  # serial, signature, issuer, validity, subject
        _, _, e = _tlv(der, p)
        p = e
    _, s, e = _tlv(der, p)              # SubjectPublicKeyInfo
    _, a, ae = _tlv(der, s)             # AlgorithmIdentifier
    _, o, oe = _tlv(der, a)
    oid = _oid_text(der[o:oe])
    _, b, be = _tlv(der, ae)            # BIT STRING
    return oid, max(be - b - 1, 0)


def _oid_text(v: bytes) -> str:
    if not v:
        return ""
    arcs = [v[0] // 40 if v[0] < 80 else 2, v[0] % 40 if v[0] < 80 else v[0] - 80]
    x = 0
    for b in v[1:]:
        x = (x << 7) | (b & 0x7F)
        if not b & 0x80:
            arcs.append(x)
            x = 0
    return ".".join(map(str, arcs))


# Nanosecond timestamps end in April 2262; certificates valid "until 9999" exist (RFC 5280
# even says 99991231235959Z means no expiry): such dates are kept as the last one that fits.
_NS_MAX_SECONDS = (2**63 - 1) // 1_000_000_000


def _ns(dt) -> int:
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    seconds = max(-_NS_MAX_SECONDS, min(int(dt.timestamp()), _NS_MAX_SECONDS))
    return seconds * 1_000_000_000


def _load(der: bytes):
    from cryptography import x509
    with warnings.catch_warnings():
        # non-positive serial numbers (RFC 5280 says no; real certificates have them)
        warnings.simplefilter("ignore")
        return x509.load_der_x509_certificate(der)


def parse_certificate(der: bytes) -> dict:
    """Zeek x509.log fields of one DER certificate (no ts/uid). Never raises."""
    return dict(_parse_cached(der))


# The same certificates come back in session after session (a site's chain, a CA): parsing
# each once cut a mix.pcap ingest's certificate work from about 5 s to a few tenths.
@functools.lru_cache(maxsize=4096)
def _parse_cached(der: bytes) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _parse_certificate(der)


def _parse_certificate(der: bytes) -> dict:
    row: dict = {"fingerprint": hashlib.sha256(der).hexdigest(), "sha1": hashlib.sha1(der).hexdigest(),
                 "malformed": False}
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives.asymmetric import dsa, ec, rsa
    except ImportError:  # pragma: no cover - the package is a dependency
        row["malformed"] = None
        return row
    try:
        cert = _load(der)
    except Exception:
        row["malformed"] = True
        return row
    bad = False

    def guard(fn):
        nonlocal bad
        try:
            return fn()
        except Exception:
            bad = True
            return None

    row["version"] = guard(lambda: cert.version.value + 1)

    def serial():
        v = cert.serial_number
        neg = v < 0
        h = "%X" % abs(v)
        if len(h) % 2:
            h = "0" + h
        return ("-" if neg else "") + h
    row["serial"] = guard(serial)
    row["subject"] = guard(lambda: format_name(cert.subject))
    row["issuer"] = guard(lambda: format_name(cert.issuer))
    row["not_valid_before"] = guard(lambda: _ns(cert.not_valid_before_utc))
    row["not_valid_after"] = guard(lambda: _ns(cert.not_valid_after_utc))
    sig_oid = guard(lambda: cert.signature_algorithm_oid.dotted_string)
    if sig_oid:
        row["sig_alg"] = _ALG.get(sig_oid, sig_oid)
    try:
        key_oid, key_bytes = _spki(der)
    except ValueError:
        key_oid, key_bytes = None, 0
        bad = True
    if key_oid:
        row["key_alg"] = _ALG.get(key_oid, key_oid)
    try:
        key = cert.public_key()
    except Exception:
        key = None
    if isinstance(key, rsa.RSAPublicKey):
        row["key_type"] = "rsa"
        row["key_length"] = key.key_size
        row["exponent"] = str(key.public_numbers().e)
    elif isinstance(key, ec.EllipticCurvePublicKey):
        row["key_type"] = "ecdsa"
        row["key_length"] = key.curve.key_size
        row["curve"] = _CURVE.get(key.curve.name, key.curve.name)
    elif isinstance(key, dsa.DSAPublicKey):
        row["key_type"] = "dsa"
        row["key_length"] = key.key_size
    elif key_oid:
        name = _ALG.get(key_oid, key_oid)
        row["key_type"] = {"dhKeyAgreement": "dh"}.get(name, name)
        row["key_length"] = key_bytes * 8 if key_bytes else None
    try:
        exts = cert.extensions
    except Exception:
        exts = None
        bad = True
    if exts is not None:
        try:
            san = exts.get_extension_for_class(x509.SubjectAlternativeName).value
            dns = san.get_values_for_type(x509.DNSName)
            uri = san.get_values_for_type(x509.UniformResourceIdentifier)
            email = san.get_values_for_type(x509.RFC822Name)
            ips = [str(i) for i in san.get_values_for_type(x509.IPAddress)]
            row["san_dns"] = dns or None
            row["san_uri"] = uri or None
            row["san_email"] = email or None
            row["san_ip"] = ips or None
        except x509.ExtensionNotFound:
            pass
        except Exception:
            bad = True
        try:
            bc = exts.get_extension_for_class(x509.BasicConstraints).value
            row["basic_constraints_ca"] = bool(bc.ca)
            row["basic_constraints_path_len"] = bc.path_length
        except x509.ExtensionNotFound:
            pass
        except Exception:
            bad = True
    row["self_signed"] = guard(lambda: cert.subject.public_bytes() == cert.issuer.public_bytes())
    row["malformed"] = bad
    return row


def leaf_names(der: bytes) -> tuple[str | None, str | None]:
    """(subject, issuer) of a certificate as Zeek prints them; (None, None) if unreadable."""
    row = _parse_cached(der)
    if row.get("malformed") and row.get("subject") is None:
        return None, None
    return row.get("subject"), row.get("issuer")


def parse_streams(streams: list[Stream] | JoinedStreams) -> Records:
    """x509 rows for the certificates in the TLS handshakes of many sessions (see app.tls), as
    columns: each distinct certificate parsed once."""
    from wiretrail.app import tls

    h = tls.read_handshakes(streams)
    parsed = [_parse_cached(der) for der in h.distinct_certificates]
    distinct = pa.Table.from_batches([pa.RecordBatch.from_struct_array(pa.array(parsed, type=_CERTIFICATE))])
    table = ac.take(distinct, pa.array(h.cert_group, pa.int64()))
    for name, values in _sightings(h).items():
        table = table.append_column(SCHEMA.field(name), pa.array(values, SCHEMA.field(name).type))
    return Records(table, h.cert_sessions())


def _sightings(h) -> dict:
    """The columns of each certificate's sighting (ts, host_cert, client_cert), as numpy arrays."""
    by_client = h.cert_by_client.astype(bool)
    return {"ts": h.cert_ts, "host_cert": ~by_client, "client_cert": by_client}


# The columns of a certificate itself (what _parse_certificate makes).
_CERTIFICATE = pa.struct([f for f in SCHEMA if f.name not in ("ts", "uid", "host_cert", "client_cert")])


def parse_stream(s: Stream) -> list[dict]:
    """x509 rows for the certificates in the TLS handshake of `s` (see app.tls): those of
    parse_streams([s]), made without Arrow."""
    from wiretrail.app import tls

    try:
        h = tls.read_handshakes([s])
        parsed = [_parse_cached(der) for der in h.distinct_certificates]
        sightings = {name: values.tolist() for name, values in _sightings(h).items()}
        return [dict(parsed[g], uid=s.uid, **{name: values[i] for name, values in sightings.items()})
                for i, g in enumerate(h.cert_group.tolist())]
    except Exception:
        return []
