"""Shared helpers for the line-based protocols (ftp, smtp, pop3, imap): lines of a
reassembled direction up to its first gap, base64 and SASL decoding, and the header and
attachment summary of an RFC 5322 message. Everything works on bytes with find/split;
nothing raises."""

from __future__ import annotations

import base64
import quopri
import binascii
import re

from wiretrail.app.base import Direction

MAX_LINE = 1 << 16       # a "line" longer than this is cut (and flagged by the caller)


def usable(d: Direction) -> bytes:
    """The bytes of a direction before its first gap (parsing stops there)."""
    return d.data[:d.contiguous_end()]


def next_line(data: bytes, pos: int) -> tuple[bytes, int, bool] | None:
    """(line without CRLF, offset after it, complete) from `pos`, or None at the end.
    An unterminated tail is returned with complete=False."""
    n = len(data)
    if pos >= n:
        return None
    e = data.find(b"\n", pos)
    if e < 0:
        return data[pos:pos + MAX_LINE], n, False
    line = data[pos:e]
    if line.endswith(b"\r"):
        line = line[:-1]
    return line[:MAX_LINE], e + 1, True


def text(b: bytes) -> str:
    return b.decode("utf-8", "backslashreplace")


def b64(s: bytes | str) -> bytes | None:
    if isinstance(s, str):
        s = s.encode("ascii", "ignore")
    s = s.strip()
    if not s or s == b"=" or s == b"*":
        return b"" if s in (b"", b"=") else None
    try:
        return base64.b64decode(s + b"=" * (-len(s) % 4), validate=False)
    except (binascii.Error, ValueError):
        return None


def sasl_plain(blob: bytes | None) -> tuple[str | None, bytes | None]:
    """authzid NUL authcid NUL passwd -> (user, password)."""
    if blob is None:
        return None, None
    parts = blob.split(b"\x00")
    if len(parts) >= 3:
        user = parts[1] or parts[0]
        return text(user), parts[2]
    if len(parts) == 2:
        return text(parts[0]), parts[1]
    return None, None


def sasl_login(protocol: str, verb: str, mech: str, responses: list[bytes], ts: int):
    """(user, credentials row) of a SASL PLAIN or LOGIN exchange (SMTP/POP3 AUTH, IMAP
    AUTHENTICATE) from the client's base64 responses; (None, None) when there is no user."""
    from wiretrail.app.credentials import credential

    if mech == "PLAIN" and responses:
        user, pw = sasl_plain(b64(responses[0]))
        if user is not None:
            return user, credential(ts, protocol, f"{verb} PLAIN", user, pw)
    elif mech == "LOGIN" and responses:
        u = b64(responses[0])
        if u is not None:
            user = text(u)
            return user, credential(ts, protocol, f"{verb} LOGIN", user,
                                    b64(responses[1]) if len(responses) > 1 else None)
    return None, None


def until_dot(data: bytes, pos: int) -> tuple[bytes, int, bool]:
    """A dot-terminated block (SMTP DATA, POP3 multi-line) from `pos`: (body with the
    dot-stuffing undone, offset after the terminating line, complete)."""
    if data.startswith(b".\r\n", pos) or data.startswith(b".\n", pos):
        return b"", pos + (3 if data[pos + 1:pos + 2] == b"\r" else 2), True
    e = data.find(b"\n.\r\n", pos)
    e2 = data.find(b"\n.\n", pos)
    if e < 0 or (0 <= e2 < e):
        if e2 < 0:
            body = data[pos:]
            return body.replace(b"\n..", b"\n."), len(data), False
        return data[pos:e2 + 1].replace(b"\n..", b"\n."), e2 + 3, True
    return data[pos:e + 1].replace(b"\n..", b"\n."), e + 4, True


# ---- RFC 5322 / MIME ---------------------------------------------------------------------------

_PARAM = re.compile(rb'(?i)(?:^|;)\s*(file)?name\*?(?:\*\d+\*?)?\s*=\s*("([^"]*)"|[^;\s]*)')


def headers(block: bytes) -> list[tuple[str, str]]:
    """Header fields of a header block (unfolded): [(NAME upper-cased, value)]."""
    out: list[tuple[str, str]] = []
    for raw in block.split(b"\n"):
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        if not raw:
            continue
        if raw[:1] in (b" ", b"\t"):
            if out:
                name, value = out[-1]
                out[-1] = (name, value + text(raw))
            continue
        name, sep, value = raw.partition(b":")
        if not sep or not name or b" " in name.strip():
            continue
        out.append((text(name.strip()).upper(), text(value.strip())))
    return out


def split_head(msg: bytes) -> tuple[bytes, bytes]:
    """(header block, body) of a message."""
    e = msg.find(b"\n\r\n")
    e2 = msg.find(b"\n\n")
    if e < 0 or (0 <= e2 < e):
        if e2 < 0:
            return msg, b""
        return msg[:e2 + 1], msg[e2 + 2:]
    return msg[:e + 1], msg[e + 3:]


def _filename(hs: list[tuple[str, str]]) -> str | None:
    found = {}
    for name, value in hs:
        if name in ("CONTENT-DISPOSITION", "CONTENT-TYPE"):
            for m in _PARAM.finditer(value.encode("utf-8", "surrogateescape")):
                v = m.group(3) if m.group(3) is not None else m.group(2)
                key = (name == "CONTENT-DISPOSITION", bool(m.group(1)))
                found.setdefault(key, []).append(text(v))
    for key in ((True, True), (False, False), (True, False), (False, True)):
        if key in found:
            return "".join(found[key])
    return None


_BOUNDARY = re.compile(rb'(?i)boundary\s*=\s*("([^"]*)"|[^;\s]+)')


def attachments(head: list[tuple[str, str]], body: bytes, depth: int = 0) -> list[str]:
    """File names of the MIME parts of a message (Content-Disposition filename= or
    Content-Type name=), nested multiparts and message/rfc822 parts included."""
    out: list[str] = []
    if depth > 8:
        return out
    ctype = next((v for n, v in head if n == "CONTENT-TYPE"), "")
    m = _BOUNDARY.search(ctype.encode("utf-8", "surrogateescape"))
    if not m:
        return out
    boundary = m.group(2) if m.group(2) is not None else m.group(1)
    if not boundary:
        return out
    delim = b"--" + boundary
    pieces = body.split(delim)
    for piece in pieces[1:]:
        if piece.startswith(b"--"):
            break
        if piece.startswith(b"\r\n"):
            piece = piece[2:]
        elif piece.startswith(b"\n"):
            piece = piece[1:]
        hblock, pbody = split_head(piece)
        hs = headers(hblock)
        name = _filename(hs)
        if name:
            out.append(name)
        pct = next((v for n, v in hs if n == "CONTENT-TYPE"), "").lower()
        if pct.startswith("multipart/"):
            out.extend(attachments(hs, pbody, depth + 1))
        elif pct.startswith("message/rfc822"):
            h2, b2 = split_head(pbody)
            out.extend(attachments(headers(h2), b2, depth + 1))
    return out


_TEXT_TYPES = ("text/plain", "text/html", "message/")
# where a URL ends, as Suricata's MIME decoder ends it (mime_smtp_finish_url), and at line ends
_URL = re.compile(rb"(?i)[a-z][a-z0-9+.-]*://[^ \"'<>\]\t\r\n]*")
MAX_URLS = 1000


def _decoded(hs: list[tuple[str, str]], body: bytes) -> bytes:
    encoding = next((v for n, v in hs if n == "CONTENT-TRANSFER-ENCODING"), "").strip().lower()
    if encoding == "base64":
        return b64(b"".join(body.split())) or b""
    if encoding == "quoted-printable":
        return quopri.decodestring(body)
    return body


def text_parts(head: list[tuple[str, str]], body: bytes, depth: int = 0) -> list[bytes]:
    """The decoded bodies of a message's text parts (text/plain, text/html, message/*; a part
    with no Content-Type is text/plain), base64 and quoted-printable undone, attachments (parts
    with a file name) left out: what Suricata's MIME decoder looks for URLs in."""
    ctype = next((v for n, v in head if n == "CONTENT-TYPE"), "text/plain").strip().lower()
    if ctype.startswith("multipart/") and depth <= 8:
        m = _BOUNDARY.search(next(v for n, v in head if n == "CONTENT-TYPE").encode("utf-8", "surrogateescape"))
        boundary = (m.group(2) if m.group(2) is not None else m.group(1)) if m else None
        if not boundary:
            return []
        out: list[bytes] = []
        for piece in body.split(b"--" + boundary)[1:]:
            if piece.startswith(b"--"):
                break
            hblock, pbody = split_head(piece[2:] if piece.startswith(b"\r\n") else piece.lstrip(b"\n"))
            out.extend(text_parts(headers(hblock), pbody, depth + 1))
        return out
    if _filename(head) or not (ctype.startswith(_TEXT_TYPES) or not ctype):
        return []
    return [_decoded(head, body)]


def urls(parts: list[bytes]) -> list[str]:
    """Every scheme://... in the text parts, in the order they come."""
    out: list[str] = []
    for part in parts:
        for m in _URL.finditer(part):
            if len(out) >= MAX_URLS:
                return out
            out.append(text(m.group(0)))
    return out


def addresses(value: str) -> list[str]:
    """A To/Cc header split at commas outside quotes and angle brackets."""
    out, cur, quote, angle = [], [], False, 0
    for part in re.split(r'(["<>,])', value):
        if part == '"':
            quote = not quote
        elif part == "<" and not quote:
            angle += 1
        elif part == ">" and not quote:
            angle = max(0, angle - 1)
        elif part == "," and not quote and not angle:
            s = "".join(cur).strip()
            if s:
                out.append(s)
            cur = []
            continue
        cur.append(part)
    s = "".join(cur).strip()
    if s:
        out.append(s)
    return out


def message_summary(msg: bytes) -> dict:
    """Top-level headers of interest and attachment names of one message."""
    hblock, body = split_head(msg)
    hs = headers(hblock)
    out: dict = {"_headers": hs}
    for name, value in hs:
        if name == "SUBJECT" and "subject" not in out:
            out["subject"] = value
        elif name == "FROM" and "from" not in out:
            out["from"] = value
        elif name == "TO":
            out.setdefault("to", []).extend(addresses(value))
        elif name == "CC":
            out.setdefault("cc", []).extend(addresses(value))
    out["attachments"] = attachments(hs, body)
    return out
