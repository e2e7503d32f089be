"""SMTP: the `smtp` table (Zeek's smtp.log), one row per mail transaction.

The client stream is read as units that each take the server's next reply (replies are
paired in order, which is what pipelining guarantees): a command line, a SASL response
line, a DATA body (when DATA got 354, or when the server side is missing) up to the lone
".", a BDAT chunk of its announced size. Transactions follow Zeek: a row is written when
the reply to the end of a message arrives (the transaction count goes up), when MAIL FROM
starts a new one, and at the end of the session, but only once the client did something
that counts (MAIL, RCPT, STARTTLS). Headers of the top-level entity fill date, from, to,
cc, reply_to, msg_id, in_reply_to, subject, x_originating_ip, received and user_agent;
each Received header's address extends `path`. MIME part file names go to `attachments`,
URLs (scheme://...) in the decoded text parts to `urls`; `message_sent` says a body went.

AUTH PLAIN and AUTH LOGIN responses are base64-decoded into credentials rows (the password
never reaches this table; `user` keeps the login). A STARTTLS answered 220 sets `tls` and
ends cleartext parsing.
"""

from __future__ import annotations

import ipaddress
import re

import pyarrow as pa

from wiretrail.app._lines import (addresses, attachments, headers, next_line, sasl_login, split_head, text,
                                  text_parts, until_dot, urls, usable)
from wiretrail.app.base import SESSION_COLUMNS, Stream, guarded

TABLE = "smtp"
SCHEMA = pa.schema([
    *SESSION_COLUMNS,
    ("trans_depth", pa.int32()),
    ("helo", pa.string()),
    ("mailfrom", pa.string()),
    ("rcptto", pa.list_(pa.string())),
    ("mailfrom_param", pa.string()),          # MAIL FROM's parameter as sent, up to a space (Suricata's
    ("rcptto_params", pa.list_(pa.string())),  # mail_from), and each RCPT TO's (its rcpt_to)
    ("date", pa.string()),
    ("from", pa.string()),
    ("to", pa.list_(pa.string())),
    ("cc", pa.list_(pa.string())),
    ("reply_to", pa.string()),
    ("msg_id", pa.string()),
    ("in_reply_to", pa.string()),
    ("subject", pa.string()),
    ("x_originating_ip", pa.string()),
    ("first_received", pa.string()),
    ("second_received", pa.string()),
    ("last_reply", pa.string()),
    ("path", pa.list_(pa.string())),
    ("user_agent", pa.string()),
    ("tls", pa.bool_()),
    ("fuids", pa.list_(pa.string())),        # files are not extracted: null
    ("attachments", pa.list_(pa.string())),  # MIME part file names
    ("message_sent", pa.bool_()),            # a message body went (DATA accepted, or BDAT LAST)
    ("urls", pa.list_(pa.string())),         # scheme://... in the message's decoded text parts, in order
    ("user", pa.string()),                   # AUTH login name, if any
    ("malformed", pa.bool_()),
    ("packet", pa.int64()),                  # capture packet number Suricata logs the transaction on
                                             # (EVE pcap_cnt): the ACK of the reply ending its message
])
PORTS = {25, 587, 2525}
NDPI = {"SMTP"}
# STARTTLS / STLS / AUTH TLS switch the stream to TLS: the stage also runs these on it
UPGRADES_TO = ("tls", "x509")

_EMAIL = re.compile(r'[^<>",;\s:]+@[^<>",;\s]+')
_IPV4 = re.compile(r"(?<![\d.])(\d{1,3}(?:\.\d{1,3}){3})(?![\d.])")
_IPV6 = re.compile(r"(?i)\[(?:IPv6:)?([0-9a-f:.]*:[0-9a-f:.]+)\]")
MAX_UNITS = 100_000


def replies(data: bytes, ts_of) -> list[tuple[int | None, str, int, int]]:
    """Server replies: (code, "code message" of the last line, ts, offset after it); a multi-line
    reply counts once. A line that is not a reply is a reply with code None."""
    out = []
    pos = 0
    while len(out) < MAX_UNITS:
        r = next_line(data, pos)
        if r is None:
            break
        line, nxt, complete = r
        start = pos
        pos = nxt
        code = line[:3]
        if len(line) >= 3 and code.isdigit():
            last = line
            while last[3:4] == b"-":
                r = next_line(data, pos)
                if r is None or not r[0][:3].isdigit():
                    break
                last, pos, _ = r
            msg = text(last[4:].strip())
            out.append((int(code), f"{int(code)} {msg}" if msg else str(int(code)), ts_of(start), pos))
        elif line.strip():
            out.append((None, text(line.strip()), ts_of(start), pos))
        if not complete:
            break
    return out


def _param(line: bytes, start: int) -> str:
    """A command's parameter as Suricata keeps it: after the "MAIL FROM:" / "RCPT TO:" prefix
    (`start` bytes) and any spaces, up to the next space."""
    return text(line[start:].lstrip(b" ").split(b" ", 1)[0])


def _ips(value: str) -> list[str]:
    out = []
    for m in _IPV4.finditer(value):
        try:
            out.append(str(ipaddress.IPv4Address(m.group(1))))
        except ValueError:
            pass
    for m in _IPV6.finditer(value):
        try:
            out.append(str(ipaddress.IPv6Address(m.group(1))))
        except ValueError:
            pass
    return out


class _Session:
    def __init__(self, s: Stream):
        self.s = s
        self.rows: list[dict] = []
        self.helo: str | None = None
        self.transferred = 0
        self.user: str | None = None
        self.tls = False
        self.rec = self._new(0)

    def _new(self, ts: int) -> dict:
        return {"ts": ts, "uid": self.s.uid, "orig_h": self.s.orig_h, "orig_p": self.s.orig_p,
                "resp_h": self.s.resp_h, "resp_p": self.s.resp_p, "trans_depth": self.transferred + 1,
                "helo": self.helo, "path": [self.s.resp_h, self.s.orig_h], "tls": False, "_active": False,
                "user": self.user}

    def flush(self, ts: int | None = None) -> None:
        if self.rec.pop("_active", False):
            self.rows.append(self.rec)
        self.rec = self._new(ts or 0)

    def activity(self, ts: int) -> None:
        if not self.rec.get("_active"):
            self.rec["_active"] = True
            if not self.rec["ts"]:
                self.rec["ts"] = ts

    def message(self, msg: bytes) -> None:
        hblock, body = split_head(msg)
        hs = headers(hblock)
        r = self.rec
        for name, value in hs:
            if name == "MESSAGE-ID":
                r["msg_id"] = value
            elif name == "RECEIVED":
                if r.get("first_received") is not None:
                    r["second_received"] = r["first_received"]
                r["first_received"] = value
                ips = _ips(value)
                if ips:
                    ip = ips[1] if len(ips) > 1 else ips[0]
                    if r["path"][-1] != ip and len(r["path"]) < 100:
                        r["path"].append(ip)
            elif name == "IN-REPLY-TO":
                r["in_reply_to"] = value
            elif name == "SUBJECT":
                r["subject"] = value
            elif name == "FROM":
                r["from"] = value
            elif name == "REPLY-TO":
                r["reply_to"] = value
            elif name == "DATE":
                r["date"] = value
            elif name in ("TO", "CC"):
                key = name.lower()
                lst = r.setdefault(key, [])
                for a in addresses(value):
                    if a not in lst:
                        lst.append(a)
            elif name == "X-ORIGINATING-IP":
                ips = _ips(value)
                if ips:
                    r["x_originating_ip"] = ips[0]
            elif name in ("X-MAILER", "USER-AGENT", "X-USER-AGENT"):
                r["user_agent"] = value
        names = attachments(hs, body)
        if names:
            r.setdefault("attachments", []).extend(names)
        r["message_sent"] = True
        found = urls(text_parts(hs, body))
        if found:
            r.setdefault("urls", []).extend(found)


def _parse(s: Stream) -> list[dict]:
    cdata, sdata = usable(s.orig), usable(s.resp)
    coff = soff = 0
    if cdata[:8].upper() == b"CONNECT " and sdata[:5] == b"HTTP/":  # through an HTTP proxy
        e1, e2 = cdata.find(b"\r\n\r\n"), sdata.find(b"\r\n\r\n")
        if e1 > 0 and e2 > 0:
            coff, soff = e1 + 4, e2 + 4
            cdata, sdata = cdata[coff:], sdata[soff:]
    reps = replies(sdata, lambda o: s.resp.time_at(o + soff))
    if not cdata and not reps:
        return []
    st = _Session(s)
    creds: list[dict] = []
    ri = 0
    one_side = not reps
    malformed = False

    last_end = 0  # offset after the last reply read (in sdata)

    def reply() -> int | None:
        nonlocal ri, malformed, last_end
        if ri >= len(reps):
            return None
        code, msg, _, end = reps[ri]
        ri += 1
        last_end = end
        if code is None:
            malformed = True
        st.rec["last_reply"] = msg
        return code

    if reps and (not cdata or reps[0][2] <= s.orig.time_at(coff) or reps[0][0] in (220, 421, 554)):
        reply()  # the greeting
    pos = 0
    units = 0
    while units < MAX_UNITS:
        r = next_line(cdata, pos)
        if r is None:
            break
        units += 1
        line, nxt, complete = r
        ts = s.orig.time_at(pos + coff)
        pos = nxt
        if not complete and not line.strip():
            break
        cmd_b, _, arg_b = line.strip().partition(b" ")
        cmd = text(cmd_b).upper()
        arg = text(arg_b.strip())
        if cmd in ("HELO", "EHLO"):
            code = reply()
            if arg and (code is None or 200 <= code < 300):  # a rejected EHLO keeps the earlier name
                st.helo = arg
                st.rec["helo"] = arg
        elif cmd == "MAIL" and arg[:5].upper() == "FROM:":
            st.flush(ts)
            st.activity(ts)
            m = _EMAIL.search(arg)
            if m:
                st.rec["mailfrom"] = m.group(0)
            st.rec["mailfrom_param"] = _param(line, 10)
            reply()
        elif cmd == "RCPT" and arg[:3].upper() == "TO:":
            st.activity(ts)
            params = st.rec.setdefault("rcptto_params", [])
            if len(params) < 1000:
                params.append(_param(line, 8))
            lst = st.rec.setdefault("rcptto", [])
            for m in _EMAIL.finditer(arg):
                a = re.sub(r"ORCPT=rfc822;?", "", m.group(0))
                if a not in lst and len(lst) < 1000:
                    lst.append(a)
            reply()
        elif cmd == "DATA":
            code = reply()
            if code == 354 or (code is None and one_side):
                body, pos, done = until_dot(cdata, pos)
                st.message(body)
                if not done:
                    break
                code = reply()
                if code is not None:
                    st.transferred += 1
                    st.rec["packet"] = s.resp.acked_by(last_end + soff) or None
                    st.flush(s.orig.time_at(pos + coff))
        elif cmd == "BDAT":
            parts = arg.split()
            if parts and parts[0].isdigit():
                n = int(parts[0])
                chunk = cdata[pos:pos + n]
                pos += n
                st.rec.setdefault("_bdat", []).append(chunk)
                code = reply()
                if len(parts) > 1 and parts[1].upper() == "LAST":
                    st.message(b"".join(st.rec.pop("_bdat", [])))
                    if code is not None:
                        st.transferred += 1
                        st.rec["packet"] = s.resp.acked_by(last_end + soff) or None
                        st.flush(s.orig.time_at(pos + coff))
            else:
                reply()
        elif cmd == "AUTH":
            mech, _, ir = arg.partition(" ")
            mech = mech.upper()
            ir = ir.strip()
            code = reply()
            responses: list[bytes] = [ir.encode()] if ir and ir != "=" else []
            need = {"PLAIN": 1, "LOGIN": 2}.get(mech, 0)
            while code == 334 or (code is None and one_side and len(responses) < need):
                r2 = next_line(cdata, pos)
                if r2 is None:
                    break
                resp_line, pos, _ = r2
                if resp_line.strip() == b"*":
                    code = reply()
                    break
                responses.append(resp_line.strip())
                code = reply()
                if code is None and len(responses) >= need:
                    break
            user, cred = sasl_login("smtp", "AUTH", mech, responses, ts)
            if user is not None:
                st.user = st.rec["user"] = user
                creds.append(cred)
        elif cmd == "STARTTLS":
            code = reply()
            if code == 220 or (code is None and one_side):
                st.rec["tls"] = True
                st.activity(ts)
                break  # TLS from here on: the tls module reads it
        else:
            reply()
        if not complete:
            break
    st.rec.pop("_bdat", None)
    st.flush()
    for r in st.rows:
        if r["ts"] == 0:
            r["ts"] = s.orig.time_at(0)
    if malformed and st.rows:
        st.rows[-1]["malformed"] = True
    for c in creds:
        c.setdefault("uid", s.uid)
    return st.rows + creds


parse_stream = guarded(_parse)
