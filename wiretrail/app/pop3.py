"""POP3: the `pop3` table, one row per client command and its reply.

Client lines are commands; each takes the server's next reply, which is multi-line (up to
the lone ".") when the command is RETR, TOP, CAPA, or LIST/UIDL without an argument, or
AUTH without a mechanism, and the status was +OK. SASL exchanges (AUTH PLAIN, AUTH LOGIN)
read the client's base64 lines after each "+ " continuation. A message retrieved by RETR
or TOP gives the row its subject, from, to and attachment names.

Credentials: USER/PASS, AUTH PLAIN and AUTH LOGIN go to the credentials table with the
password; APOP gives the user only (its digest is no password). `arg` never holds a
password ("<hidden>"). An STLS answered +OK ends cleartext parsing (`tls` set on it).
"""

from __future__ import annotations

import pyarrow as pa

from wiretrail.app._lines import message_summary, next_line, sasl_login, text, until_dot, usable
from wiretrail.app.base import SESSION_COLUMNS, Stream, guarded
from wiretrail.app.credentials import credential

TABLE = "pop3"
SCHEMA = pa.schema([
    *SESSION_COLUMNS,
    ("user", pa.string()),
    ("command", pa.string()),              # "<init>" for the greeting
    ("arg", pa.string()),
    ("status", pa.string()),               # +OK, -ERR
    ("reply_msg", pa.string()),
    ("tls", pa.bool_()),                   # STLS accepted
    ("mail_from", pa.string()),            # of a message retrieved (RETR, TOP)
    ("mail_to", pa.list_(pa.string())),
    ("mail_subject", pa.string()),
    ("attachments", pa.list_(pa.string())),
    ("malformed", pa.bool_()),
])
PORTS = {110}
NDPI = {"POP3"}
# STARTTLS / STLS / AUTH TLS switch the stream to TLS: the stage also runs these on it
UPGRADES_TO = ("tls", "x509")

MAX_ROWS = 100_000


def _parse(s: Stream) -> list[dict]:
    cdata, sdata = usable(s.orig), usable(s.resp)
    if not cdata and not sdata:
        return []
    if not (sdata[:1] in (b"+", b"-", b"") and cdata[:1] not in (b"\x16",)):
        return []  # not POP3 (TLS from the first byte, or something else)
    base = {"uid": s.uid, "orig_h": s.orig_h, "orig_p": s.orig_p, "resp_h": s.resp_h, "resp_p": s.resp_p}
    rows: list[dict] = []
    creds: list[dict] = []
    spos = 0
    user: str | None = None

    def reply(multi: bool = False) -> tuple[str | None, str | None, bytes | None]:
        nonlocal spos
        r = next_line(sdata, spos)
        if r is None:
            return None, None, None
        line, spos, _ = r
        st, _, msg = line.partition(b" ")
        status = text(st) if st in (b"+OK", b"-ERR", b"+") else None
        body = None
        if multi and status == "+OK":
            body, spos, _ = until_dot(sdata, spos)
        return status, text(msg.strip()) if status else text(line.strip()), body

    if sdata:
        st, msg, _ = reply()
        rows.append(dict(base, ts=s.resp.time_at(0), command="<init>", status=st, reply_msg=msg,
                         malformed=(st is None) or None))
    pos = 0
    while len(rows) < MAX_ROWS:
        r = next_line(cdata, pos)
        if r is None:
            break
        line, nxt, complete = r
        ts = s.orig.time_at(pos)
        pos = nxt
        if not line.strip():
            continue
        cmd_b, _, arg_b = line.strip().partition(b" ")
        cmd = text(cmd_b).upper()
        arg = text(arg_b.strip())
        args = arg.split()
        multi = cmd in ("RETR", "TOP", "CAPA") or (cmd in ("LIST", "UIDL") and not args) or (cmd == "AUTH" and not args)
        st, msg, body = reply(multi)
        row = dict(base, ts=ts, command=cmd, arg=arg or None, status=st, reply_msg=msg,
                   malformed=(not cmd_b.isalpha() or (sdata and st is None and msg is not None)) or None)
        if cmd == "USER":
            user = arg
        elif cmd == "PASS":
            row["arg"] = "<hidden>"
            creds.append(credential(ts, "pop3", "USER/PASS", user, arg_b.strip()))
        elif cmd == "APOP" and args:
            user = args[0]
            row["arg"] = args[0] + " <hidden>"
            creds.append(credential(ts, "pop3", "APOP", user, None))
        elif cmd == "AUTH" and args:
            mech = args[0].upper()
            responses = [args[1].encode()] if len(args) > 1 and args[1] != "=" else []
            need = {"PLAIN": 1, "LOGIN": 2}.get(mech, 0)
            while st == "+" or (st is None and not sdata and len(responses) < need):
                r2 = next_line(cdata, pos)
                if r2 is None:
                    break
                resp_line, pos, _ = r2
                if resp_line.strip() == b"*":
                    st, msg, _ = reply()
                    break
                responses.append(resp_line.strip())
                st, msg, _ = reply()
            row.update(arg=mech, status=st, reply_msg=msg)
            u, cred = sasl_login("pop3", "AUTH", mech, responses, ts)
            if u is not None:
                user = u
                creds.append(cred)
        elif cmd in ("RETR", "TOP") and body:
            m = message_summary(body)
            row.update(mail_from=m.get("from"), mail_to=m.get("to"), mail_subject=m.get("subject"),
                       attachments=m.get("attachments") or None)
        row["user"] = user
        if cmd in ("STLS", "STARTTLS") and (st == "+OK" or not sdata):
            row["tls"] = True
            rows.append(row)
            break
        rows.append(row)
        if not complete:
            break
    for c in creds:
        c.setdefault("uid", s.uid)
    return rows + creds


parse_stream = guarded(_parse)
