"""Telnet logins: the user typed at a login prompt, and the password as a credential.

Both directions are cut at the packets that carried them and merged in time order, telnet
option negotiation (IAC sequences) removed. A line the client sends after the server
asked for a login or user name is the user; the line after a password prompt is the
password (a `credentials` row: never stored in clear). Characters typed one per packet,
and the server's echo of them, are handled: the client's bytes make the line, up to CR/LF,
with backspace and delete applied. Whether the login worked is read from what the server
says next ("Last login", "Login incorrect", ...), when it says one of those.
"""

from __future__ import annotations

import re

import pyarrow as pa

from wiretrail.app.base import SESSION_COLUMNS, Direction, Stream, guarded
from wiretrail.app.credentials import credential

TABLE = "telnet"
SCHEMA = pa.schema([
    *SESSION_COLUMNS,
    ("user", pa.string()),
    ("password_seen", pa.bool_()),
    ("success", pa.bool_()),        # null when the server's answer says neither
    ("banner", pa.string()),        # the server's first line of text
    ("malformed", pa.bool_()),
])
PORTS = {23}
NDPI = {"Telnet"}

IAC, SB, SE = 255, 250, 240
_LOGIN = re.compile(rb"(login|username|user name|user)\s*:\s*$", re.I)
_PASSWORD = re.compile(rb"pass(word|code)?\s*:\s*$", re.I)
_OK = re.compile(rb"last login|welcome|[$#%>] ?$", re.I)
_FAIL = re.compile(rb"incorrect|failed|denied|invalid", re.I)
MAX_LINE = 256


def strip_iac(data: bytes) -> bytes:
    """Telnet data without option negotiation (IAC IAC is a literal 255)."""
    if IAC not in data:
        return data
    out = bytearray()
    i, n = 0, len(data)
    while i < n:
        b = data[i]
        if b != IAC:
            out.append(b)
            i += 1
        elif i + 1 < n and data[i + 1] == IAC:
            out.append(IAC)
            i += 2
        elif i + 1 < n and data[i + 1] == SB:
            end = data.find(bytes([IAC, SE]), i + 2)
            i = n if end < 0 else end + 2
        elif i + 1 < n and 251 <= data[i + 1] <= 254:
            i += 3
        else:
            i += 2
    return bytes(out)


def _chunks(d: Direction, from_client: bool) -> list[tuple[int, bool, bytes]]:
    cuts = [int(x) for x in d.ts_offsets] + [len(d.data)]
    return [(int(d.ts[k]), from_client, strip_iac(d.data[cuts[k]:cuts[k + 1]])) for k in range(len(cuts) - 1)]


def _typed(line: bytes) -> str:
    out = []
    for ch in line.decode("latin-1"):
        if ch in "\b\x7f":
            if out:
                out.pop()
        elif ch >= " ":
            out.append(ch)
    return "".join(out)


def _parse(s: Stream) -> list[dict]:
    events = sorted(_chunks(s.orig, True) + _chunks(s.resp, False), key=lambda e: e[0])
    if not events:
        return []
    rows: list[dict] = []
    banner = None
    expecting = None        # "user" or "password": what the client's next line is
    line, line_ts = b"", 0
    attempt: dict | None = None
    server_tail = b""       # the server's last text, to find prompts split over packets
    for ts, from_client, data in events:
        if not data:
            continue
        if not from_client:
            text = data.replace(b"\0", b"")
            if banner is None and text.strip():
                banner = text.strip().splitlines()[0][:200].decode("latin-1")
            server_tail = (server_tail + text)[-200:]
            if attempt is not None and attempt["success"] is None and attempt["password_seen"]:
                if _FAIL.search(text):
                    attempt["success"] = False
                elif _OK.search(text.strip()):
                    attempt["success"] = True
            lines = server_tail.splitlines()
            last = lines[-1] if lines else b""
            if _PASSWORD.search(last.rstrip()):
                expecting, line = "password", b""
            elif _LOGIN.search(last.rstrip()):
                expecting, line = "user", b""
            continue
        if expecting is None:
            continue
        if not line:
            line_ts = ts
        line += data
        if b"\r" in line or b"\n" in line or len(line) > MAX_LINE:
            value = _typed(re.split(rb"[\r\n]", line, maxsplit=1)[0])
            if expecting == "user":
                attempt = {"ts": line_ts, "uid": s.uid, "user": value, "password_seen": False, "success": None,
                           "malformed": False}
                rows.append(attempt)
            else:
                user = attempt["user"] if attempt else None
                if attempt is None:
                    attempt = {"ts": line_ts, "uid": s.uid, "user": None, "password_seen": False, "success": None,
                               "malformed": False}
                    rows.append(attempt)
                attempt["password_seen"] = True
                rows.append(credential(line_ts, "telnet", "login prompt", user, value))
            expecting, line, server_tail = None, b"", b""
    for r in rows:
        if r.get("_table") is None:
            r["banner"] = banner
    return rows


parse_stream = guarded(_parse)
