"""NTLMSSP messages (NEGOTIATE, CHALLENGE, AUTHENTICATE), wherever they are carried.

Not a protocol module (no table of its own): SMB session setups, DCE-RPC binds, HTTP
`Authorization: NTLM`/`Negotiate`, SMTP/IMAP/POP3 `AUTH NTLM`, LDAP SASL and TDS all carry
the same three messages, bare, base64-encoded or inside GSS-API/SPNEGO tokens. The fields
of a message are addressed relative to its "NTLMSSP\\0" signature, so the SPNEGO ASN.1
around it need not be walked: `find(blob)` locates the signature and parses from there.

    parse(msg)          -> dict or None   one message starting at its signature
    find(blob)          -> list[dict]     every message in a blob (security buffer, stream)
    find_base64(text)   -> list[dict]     messages in base64 tokens ("TlRMTVNTUAA...", also in
                                          SPNEGO "YII..." tokens) of a text protocol
    summary(msgs)       -> dict           user/domain/host (AUTHENTICATE), the server's names
                                          (CHALLENGE), as Zeek's ntlm.log

Dicts: type (1, 2, 3), flags, version ("10.0 build 19041 rev 15" as Suricata prints it)
and per type: 1: domain, host; 2: target_name, server_nb_computer_name,
server_nb_domain_name, server_dns_computer_name, server_dns_domain_name, server_tree_name;
3: user, domain, host, nt_response_len (24: NTLMv1, longer: NTLMv2). A field that points
outside the message is left out and `malformed` is set. Nothing raises.
"""

from __future__ import annotations

import base64
import binascii
import re
import struct

SIGNATURE = b"NTLMSSP\x00"
NEGOTIATE_UNICODE = 0x00000001
NEGOTIATE_VERSION = 0x02000000
_B64 = re.compile(rb"(?:TlRMTVNTUA|YI|oY)[A-Za-z0-9+/]{8,}={0,2}")


def _text(raw: bytes, unicode: bool) -> str:
    if unicode:
        return raw.decode("utf-16-le", "replace")
    return raw.decode("latin-1")


def _field(msg: bytes, at: int, unicode: bool | None, out: dict, name: str) -> bytes | None:
    if at + 8 > len(msg):
        return None
    ln, _, off = struct.unpack_from("<HHI", msg, at)
    if ln == 0:
        return b""
    if off + ln > len(msg) or off < 8:
        out["malformed"] = True
        return None
    raw = msg[off:off + ln]
    if unicode is not None:
        out[name] = _text(raw, unicode)
    return raw


def _version(msg: bytes, at: int) -> str | None:
    if at + 8 > len(msg):
        return None
    major, minor, build, rev = msg[at], msg[at + 1], struct.unpack_from("<H", msg, at + 2)[0], msg[at + 7]
    return f"{major}.{minor} build {build} rev {rev}"


_AV = {1: "server_nb_computer_name", 2: "server_nb_domain_name", 3: "server_dns_computer_name",
       4: "server_dns_domain_name", 5: "server_tree_name"}


def parse(msg: bytes) -> dict | None:
    """One NTLMSSP message starting at its signature (None if it is not one)."""
    try:
        return _parse(msg)
    except Exception:  # defensive: the parser must never raise
        return {"type": None, "malformed": True}


def _parse(msg: bytes) -> dict | None:
    if len(msg) < 12 or not msg.startswith(SIGNATURE):
        return None
    t = struct.unpack_from("<I", msg, 8)[0]
    out: dict = {"type": t, "malformed": False}
    if t == 1:
        if len(msg) < 16:
            out["malformed"] = True
            return out
        flags = out["flags"] = struct.unpack_from("<I", msg, 12)[0]
        # negotiate names are OEM strings
        _field(msg, 16, False, out, "domain")
        _field(msg, 24, False, out, "host")
        if flags & NEGOTIATE_VERSION:
            out["version"] = _version(msg, 32)
    elif t == 2:
        if len(msg) < 32:
            out["malformed"] = True
            return out
        flags = out["flags"] = struct.unpack_from("<I", msg, 20)[0]
        uni = bool(flags & NEGOTIATE_UNICODE)
        _field(msg, 12, uni, out, "target_name")
        out["challenge"] = msg[24:32].hex()
        info = _field(msg, 40, None, out, "")
        if info:
            p = 0
            while p + 4 <= len(info):
                av, ln = struct.unpack_from("<HH", info, p)
                if av == 0:
                    break
                if p + 4 + ln > len(info):
                    out["malformed"] = True
                    break
                if av in _AV:
                    out[_AV[av]] = info[p + 4:p + 4 + ln].decode("utf-16-le", "replace")
                p += 4 + ln
        if flags & NEGOTIATE_VERSION and len(msg) >= 56:
            out["version"] = _version(msg, 48)
    elif t == 3:
        if len(msg) < 52:
            out["malformed"] = True
            return out
        flags = struct.unpack_from("<I", msg, 60)[0] if len(msg) >= 64 else NEGOTIATE_UNICODE
        out["flags"] = flags
        uni = bool(flags & NEGOTIATE_UNICODE)
        nt = _field(msg, 20, None, out, "")
        out["nt_response_len"] = len(nt) if nt is not None else None
        _field(msg, 28, uni, out, "domain")
        _field(msg, 36, uni, out, "user")
        _field(msg, 44, uni, out, "host")
        if flags & NEGOTIATE_VERSION and len(msg) >= 72:
            # the version field is present only if the payload starts after it
            first = min([struct.unpack_from("<I", msg, a + 4)[0] for a in (12, 20, 28, 36, 44)
                         if struct.unpack_from("<H", msg, a)[0]] or [72])
            if first >= 72:
                out["version"] = _version(msg, 64)
    else:
        out["malformed"] = True
    return out


def find(blob: bytes, limit: int = 16) -> list[dict]:
    """Every NTLMSSP message in `blob` (at most `limit`)."""
    out = []
    try:
        i = blob.find(SIGNATURE)
        while i >= 0 and len(out) < limit:
            m = parse(blob[i:])
            if m is not None:
                out.append(m)
            i = blob.find(SIGNATURE, i + 8)
    except Exception:
        pass
    return out


def find_base64(text: bytes, limit: int = 16) -> list[dict]:
    """NTLMSSP messages in the base64 tokens of a text protocol (HTTP headers, SASL lines)."""
    out = []
    try:
        for m in _B64.finditer(text):
            tok = m.group(0)
            tok += b"=" * (-len(tok) % 4)
            try:
                raw = base64.b64decode(tok, validate=True)
            except (binascii.Error, ValueError):
                continue
            out += find(raw, limit - len(out))
            if len(out) >= limit:
                break
    except Exception:
        pass
    return out


def summary(msgs: list[dict]) -> dict:
    """Zeek ntlm.log-like fields from the messages of one exchange."""
    out: dict = {}
    for m in msgs:
        if m.get("type") == 3:
            for k in ("user", "domain", "host"):
                if m.get(k):
                    out.setdefault(k, m[k])
        elif m.get("type") == 2:
            for k in ("server_nb_computer_name", "server_dns_computer_name", "server_tree_name",
                      "target_name"):
                if m.get(k):
                    out.setdefault(k, m[k])
        if m.get("version"):
            out.setdefault("version", m["version"])
    return out
