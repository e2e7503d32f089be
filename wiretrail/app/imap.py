"""IMAP: the `imap` table, one row per tagged client command and its tagged completion.

Client commands are read with their literals ({n} and {n+}: the n bytes after the line
belong to the command, and the line goes on after them). Server responses are read in
order: untagged lines (with their literals) accumulate until a tagged completion, which
is matched to its command by tag; a FETCH's message literals (BODY[...], RFC822...) give
the row the subject, from, to and attachment names of the first message. AUTHENTICATE's
SASL responses are the client lines that follow it.

Credentials: LOGIN "user" "pass", AUTHENTICATE PLAIN and AUTHENTICATE LOGIN go to the
credentials table; `arg` never holds a password. A STARTTLS answered OK ends cleartext
parsing (`tls` set on it).
"""

from __future__ import annotations

import re

import pyarrow as pa

from wiretrail.app._lines import message_summary, next_line, sasl_login, text, usable
from wiretrail.app.base import SESSION_COLUMNS, Stream, guarded
from wiretrail.app.credentials import credential

TABLE = "imap"
SCHEMA = pa.schema([
    *SESSION_COLUMNS,
    ("user", pa.string()),
    ("tag", pa.string()),
    ("command", pa.string()),              # "<init>" for the greeting; UID FETCH etc. as two words
    ("arg", pa.string()),
    ("status", pa.string()),               # OK, NO, BAD (tagged completion)
    ("reply_msg", pa.string()),
    ("mailbox", pa.string()),              # SELECT/EXAMINE
    ("tls", pa.bool_()),                   # STARTTLS accepted
    ("mail_from", pa.string()),            # of a message fetched
    ("mail_to", pa.list_(pa.string())),
    ("mail_subject", pa.string()),
    ("attachments", pa.list_(pa.string())),
    ("malformed", pa.bool_()),
])
PORTS = {143}
NDPI = {"IMAP"}
# STARTTLS / STLS / AUTH TLS switch the stream to TLS: the stage also runs these on it
UPGRADES_TO = ("tls", "x509")

MAX_ROWS = 100_000
MAX_LITERAL = 64 << 20
_LIT = re.compile(rb"\{(\d{1,10})\+?\}$")
_TOKEN = re.compile(rb'"((?:[^"\\]|\\.)*)"|\x00(\d+)\x00|(\S+)')


def _read(data: bytes, pos: int) -> tuple[bytes, list[bytes], int, bool] | None:
    """One logical line from `pos`: (text with literals replaced by \\0i\\0, literals,
    next offset, complete)."""
    parts: list[bytes] = []
    lits: list[bytes] = []
    while True:
        r = next_line(data, pos)
        if r is None:
            return (b"".join(parts), lits, pos, False) if parts else None
        line, pos, complete = r
        m = _LIT.search(line)
        if not m or not complete or len(lits) >= 1000:
            parts.append(line)
            return b"".join(parts), lits, pos, complete
        n = int(m.group(1))
        if n > MAX_LITERAL:
            parts.append(line)
            return b"".join(parts), lits, pos, False
        parts.append(line[:m.start()] + b"\x00%d\x00" % len(lits))
        lits.append(data[pos:pos + n])
        pos += n
        if pos > len(data):
            return b"".join(parts), lits, len(data), False


def _args(rest: bytes, lits: list[bytes]) -> list[bytes]:
    out = []
    for m in _TOKEN.finditer(rest):
        if m.group(1) is not None:
            out.append(re.sub(rb"\\(.)", rb"\1", m.group(1)))
        elif m.group(2) is not None:
            i = int(m.group(2))
            out.append(lits[i] if i < len(lits) else b"")
        else:
            out.append(m.group(3))
    return out


def _parse(s: Stream) -> list[dict]:
    cdata, sdata = usable(s.orig), usable(s.resp)
    if not cdata and not sdata:
        return []
    if sdata[:1] not in (b"*", b"+", b"") or cdata[:1] == b"\x16":
        return []  # not IMAP
    base = {"uid": s.uid, "orig_h": s.orig_h, "orig_p": s.orig_p, "resp_h": s.resp_h, "resp_p": s.resp_p}
    creds: list[dict] = []
    cmds: list[dict] = []
    by_tag: dict[str, list[dict]] = {}
    user: str | None = None
    starttls_tag = None
    pos = 0
    while len(cmds) < MAX_ROWS:
        r = _read(cdata, pos)
        if r is None:
            break
        line, lits, nxt, complete = r
        ts = s.orig.time_at(pos)
        pos = nxt
        if not line.strip():
            continue
        tag_b, _, rest = line.strip().partition(b" ")
        cmd_b, _, rest = rest.partition(b" ")
        cmd = text(cmd_b).upper()
        if cmd == "UID":
            sub, _, rest = rest.partition(b" ")
            cmd = "UID " + text(sub).upper()
        args = _args(rest, lits)
        row = dict(base, ts=ts, tag=text(tag_b), command=cmd, arg=text(rest.replace(b"\x00", b"")) or None,
                   malformed=(not cmd_b.isalpha()) or None)
        if cmd == "LOGIN" and len(args) >= 2:
            user = text(args[0])
            row["arg"] = user + " <hidden>"
            creds.append(credential(ts, "imap", "LOGIN", user, args[1]))
        elif cmd == "AUTHENTICATE" and args:
            mech = text(args[0]).upper()
            row["arg"] = mech
            responses = [args[1]] if len(args) > 1 and args[1] != b"=" else []
            need = {"PLAIN": 1, "LOGIN": 2}.get(mech, 0)
            while len(responses) < need:
                r2 = next_line(cdata, pos)
                if r2 is None or b" " in r2[0].strip() or r2[0].strip() == b"*":
                    break
                responses.append(r2[0].strip())
                pos = r2[1]
            u, cred = sasl_login("imap", "AUTHENTICATE", mech, responses, ts)
            if u is not None:
                user = u
                creds.append(cred)
        elif cmd in ("SELECT", "EXAMINE") and args:
            row["mailbox"] = text(args[0])
        row["user"] = user
        cmds.append(row)
        by_tag.setdefault(row["tag"], []).append(row)
        if cmd == "STARTTLS":
            starttls_tag = row["tag"]
            break
        if not complete:
            break
    # the server: untagged data up to each tagged completion
    rows: list[dict] = []
    spos = 0
    bodies: list[bytes] = []
    first = True
    while True:
        r = _read(sdata, spos)
        if r is None:
            break
        line, lits, spos, complete = r
        if first:
            first = False
            if line.startswith(b"* "):
                st_b = line[2:].split(b" ", 1)
                rows.append(dict(base, ts=s.resp.time_at(0), command="<init>", status=text(st_b[0]).upper(),
                                 reply_msg=text(st_b[1]).strip() if len(st_b) > 1 else None))
                continue
        if line.startswith(b"* ") or line.startswith(b"+"):
            if lits and (b"BODY[" in line.upper() or b"RFC822" in line.upper()):
                bodies.extend(lit for lit in lits if b":" in lit[:4096])
            continue
        tag_b, _, rest = line.partition(b" ")
        st_b, _, msg = rest.partition(b" ")
        pending = by_tag.get(text(tag_b))
        if pending:
            row = pending.pop(0)
            row.update(status=text(st_b).upper(), reply_msg=text(msg.strip()) or None)
            if bodies and row["command"] in ("FETCH", "UID FETCH"):
                m = message_summary(bodies[0])
                row.update(mail_from=m.get("from"), mail_to=m.get("to"), mail_subject=m.get("subject"),
                           attachments=m.get("attachments") or None)
            if row["tag"] == starttls_tag and row["status"] == "OK":
                row["tls"] = True
                break
        bodies = []
        if not complete:
            break
    if starttls_tag is not None and not sdata:
        cmds[-1]["tls"] = True
    for c in creds:
        c.setdefault("uid", s.uid)
    return rows + cmds + creds


parse_stream = guarded(_parse)
