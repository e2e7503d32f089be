"""FTP control channel: the `ftp` table (Zeek's ftp.log), one row per command and its reply.

Client commands and server replies are read as lines from the two reassembled directions
(up to the first gap). The server's greeting is logged as command `<init>`; every command
is paired with the server's next final reply (1xx preliminary replies are read for the file
size, "(N bytes)"), multi-line replies ("NNN-" ... "NNN ") count once and their last line
is the message. Commands without a reply at the end of the capture are logged with a null
reply. Like Zeek, `user` is "<unknown>" until USER, file commands (RETR, STOR, STOU, APPE)
log an ftp:// URL built from the working directory, and the data channel comes from
PORT/EPRT (active) and 227/229 replies to PASV/EPSV (passive).

The password is never stored: `password` reads "<hidden>" once PASS was seen, and a
credentials row (USER/PASS) carries it, hashed. After AUTH TLS/SSL is accepted (234) the
channel is TLS: parsing stops.
"""

from __future__ import annotations

import ipaddress
import re

import pyarrow as pa

from wiretrail.app._lines import MAX_LINE, next_line, text, usable
from wiretrail.app.base import SESSION_COLUMNS, Stream
from wiretrail.app.credentials import credential

TABLE = "ftp"
SCHEMA = pa.schema([
    *SESSION_COLUMNS,
    ("user", pa.string()),
    ("password", pa.string()),             # "<hidden>" once PASS was seen (credentials table has it)
    ("command", pa.string()),
    ("arg", pa.string()),
    ("mime_type", pa.string()),            # data channels are not read: null
    ("file_size", pa.int64()),
    ("reply_code", pa.int32()),
    ("reply_msg", pa.string()),
    ("data_channel_passive", pa.bool_()),
    ("data_channel_orig_h", pa.string()),
    ("data_channel_resp_h", pa.string()),
    ("data_channel_resp_p", pa.int32()),
    ("fuid", pa.string()),
    ("malformed", pa.bool_()),
    # as Suricata logs a command: its argument as sent ("<hidden>" for PASS), cut at its line
    # limit; every line of every reply to it (1xx ones too), text and code apart
    ("command_data", pa.string()),
    ("command_truncated", pa.bool_()),
    ("replies", pa.list_(pa.string())),
    ("reply_codes", pa.list_(pa.string())),
    ("reply_truncated", pa.bool_()),
])
SURICATA_MAX_LINE = 4096  # Suricata's ftp max-line-length: longer commands and replies are cut
PORTS = {21}
NDPI = {"FTP_CONTROL"}
# STARTTLS / STLS / AUTH TLS switch the stream to TLS: the stage also runs these on it
UPGRADES_TO = ("tls", "x509")

FILE_CMDS = {"RETR", "STOR", "STOU", "APPE"}
_SIZE = re.compile(rb"\((\d+) bytes\)")
_PASV = re.compile(rb"(\d+),(\d+),(\d+),(\d+),(\d+),(\d+)")
_EPSV = re.compile(rb"\((.)\1\1(\d+)\1\)")
_PWD = re.compile(rb'"((?:[^"]|"")*)"')
MAX_ROWS = 100_000


def _line(line: bytes) -> tuple[str | None, str, bool]:
    """A reply line as Suricata keeps it: (code, text after the code, cut at its limit)."""
    cut = len(line) > SURICATA_MAX_LINE
    line = line[:SURICATA_MAX_LINE]
    if len(line) >= 3 and line[:3].isdigit() and line[3:4] in (b" ", b"-", b""):
        return text(line[:3]), text(line[4:]), cut
    return None, text(line), cut


def _replies(data: bytes, ts_of) -> tuple[list[tuple], bool]:
    """[(code or None, message, offset, ts, lines)], malformed; `lines` every line of the reply
    (_line). A line that is not a reply is a reply with code None (Zeek reports it as invalid)."""
    out: list[tuple] = []
    bad = False
    pos = 0
    while len(out) < MAX_ROWS:
        r = next_line(data, pos)
        if r is None:
            break
        line, nxt, complete = r
        start = pos
        pos = nxt
        code = line[:3]
        if len(line) >= 3 and code.isdigit() and (len(line) == 3 or line[3:4] in (b" ", b"-")):
            lines = [_line(line)]
            if line[3:4] == b"-":  # multi-line: up to "NNN " (or the end)
                last = line[4:]
                while True:
                    r = next_line(data, pos)
                    if r is None:
                        break
                    l2, n2, _ = r
                    pos = n2
                    lines.append(_line(l2))
                    if l2[:3] == code and l2[3:4] in (b" ", b""):
                        last = l2[4:]
                        break
                    if l2[:3] == code and l2[3:4] == b"-":
                        last = l2[4:]
                    else:
                        last = l2
                out.append((int(code), text(last.strip()), start, ts_of(start), lines))
            else:
                out.append((int(code), text(line[4:].strip()), start, ts_of(start), lines))
        elif line.strip():
            bad = True
            out.append((None, text(line.strip()), start, ts_of(start), [_line(line)]))
        if not complete:
            bad = bad or len(line) >= MAX_LINE
            break
    return out, bad


def _build_path(cwd: str, arg: str) -> str:
    path = arg if arg.startswith("/") else f"{cwd}/{arg}"
    # Zeek's compress_path: drop "/./", "//", "dir/../"
    while "/./" in path:
        path = path.replace("/./", "/")
    while "//" in path:
        path = path.replace("//", "/")
    parts: list[str] = []
    for p in path.split("/"):
        if p == ".." and parts and parts[-1] not in ("", ".", ".."):
            parts.pop()
        else:
            parts.append(p)
    return "/".join(parts)


def _url(resp_h: str, cwd: str, arg: str) -> str:
    p = _build_path(cwd, arg)
    if not p.startswith("/"):
        p = "/" + p
    host = f"[{resp_h}]" if ":" in resp_h else resp_h
    return f"ftp://{host}{p}"


def _port_arg(arg: bytes) -> tuple[str, int] | None:
    m = _PASV.search(arg)
    if not m:
        return None
    n = [int(x) for x in m.groups()]
    if any(x > 255 for x in n):
        return None
    return ".".join(map(str, n[:4])), n[4] * 256 + n[5]


def _eprt_arg(arg: bytes) -> tuple[str, int] | None:
    if len(arg) < 4:
        return None
    d = arg[:1]
    parts = arg.split(d)
    if len(parts) < 5:
        return None
    try:
        host = str(ipaddress.ip_address(text(parts[2])))
        port = int(parts[3])
    except ValueError:
        return None
    return (host, port) if 0 <= port < 65536 else None


def _suricata_replies(lines: list) -> dict:
    return {"replies": [t for _, t, _ in lines if t] or None,
            "reply_codes": [c for c, _, _ in lines if c] or None,
            "reply_truncated": any(cut for _, _, cut in lines)}


def parse_stream(s: Stream) -> list[dict]:
    try:
        return _parse(s)
    except Exception:  # a parser bug must cost this session's rows, never the ingest
        return [{"ts": s.orig.time_at(0) or s.resp.time_at(0), "uid": s.uid, "orig_h": s.orig_h,
                 "orig_p": s.orig_p, "resp_h": s.resp_h, "resp_p": s.resp_p, "malformed": True}]


def _parse(s: Stream) -> list[dict]:
    cdata, sdata = usable(s.orig), usable(s.resp)
    replies, rbad = _replies(sdata, s.resp.time_at)
    if not replies and not cdata:
        return []
    rows: list[dict] = []
    base = {"uid": s.uid, "orig_h": s.orig_h, "orig_p": s.orig_p, "resp_h": s.resp_h, "resp_p": s.resp_p}
    user = "<unknown>"
    password = None
    pending_user = None
    cwd = "."
    ri = 0
    tls = False
    if replies and (not cdata or replies[0][3] <= s.orig.time_at(0) or replies[0][0] in (120, 220, 421)):
        code, msg, _, ts, lines = replies[0]
        ri = 1
        rows.append(dict(base, ts=ts, user=user, command="<init>", reply_code=code, reply_msg=msg,
                         malformed=code is None or None, **_suricata_replies(lines)))
    pos = 0
    while len(rows) < MAX_ROWS and not tls:
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
        malformed = (not complete and len(line) >= MAX_LINE) or not cmd_b.isalpha() or None
        # the reply: preliminary 1xx ones first, then the final one
        size = None
        code = msg = None
        lines = []
        while ri < len(replies):
            c, m, _, _, ls = replies[ri]
            ri += 1
            lines.extend(ls)
            if c is not None and 100 <= c < 200:
                sm = _SIZE.search(m.encode("utf-8", "surrogateescape"))
                if sm:
                    size = int(sm.group(1))
                code, msg = c, m
                continue
            code, msg = c, m
            if c is None:
                malformed = True
            break
        row = dict(base, ts=ts, command=cmd, arg=arg or None, reply_code=code, reply_msg=msg,
                   malformed=malformed, **_suricata_replies(lines))
        if arg_b:  # Suricata: what follows the command and its space, cut at its line limit
            row["command_data"] = text(line[len(cmd_b) + 1:SURICATA_MAX_LINE])
            row["command_truncated"] = len(line) > SURICATA_MAX_LINE or (not complete and len(line) >= MAX_LINE)
        ok = code is not None and 200 <= code < 300
        if cmd == "USER":
            user = arg
            pending_user = arg
        elif cmd == "PASS":
            password = "<hidden>"
            row["arg"] = "<hidden>"
            if "command_data" in row:
                row["command_data"] = "<hidden>"
            rows.append(credential(ts, "ftp", "USER/PASS", pending_user if pending_user is not None else user,
                                   arg_b.strip()))
        elif cmd in FILE_CMDS and arg:
            row["arg"] = _url(s.resp_h, cwd, arg)
        elif cmd == "CWD" and ok and arg:
            cwd = _build_path(cwd, arg)
        elif cmd == "CDUP" and ok:
            cwd = cwd + "/.."
        elif cmd in ("PWD", "XPWD") and code == 257 and msg:
            pm = _PWD.search(msg.encode("utf-8", "surrogateescape"))
            if pm:
                cwd = text(pm.group(1).replace(b'""', b'"'))
        elif cmd == "SIZE" and code == 213 and msg and msg.strip().isdigit():
            size = int(msg.strip())
        elif cmd == "PORT" and ok:
            hp = _port_arg(arg_b)
            if hp:
                row.update(data_channel_passive=False, data_channel_orig_h=s.resp_h,
                           data_channel_resp_h=hp[0], data_channel_resp_p=hp[1])
        elif cmd == "EPRT" and ok:
            hp = _eprt_arg(arg_b.strip())
            if hp:
                row.update(data_channel_passive=False, data_channel_orig_h=s.resp_h,
                           data_channel_resp_h=hp[0], data_channel_resp_p=hp[1])
        elif cmd == "PASV" and code == 227 and msg:
            hp = _port_arg(msg.encode("utf-8", "surrogateescape"))
            if hp:
                row.update(data_channel_passive=True, data_channel_orig_h=s.orig_h,
                           data_channel_resp_h=hp[0], data_channel_resp_p=hp[1])
        elif cmd == "EPSV" and code == 229 and msg:
            em = _EPSV.search(msg.encode("utf-8", "surrogateescape"))
            if em and int(em.group(2)) < 65536:
                row.update(data_channel_passive=True, data_channel_orig_h=s.orig_h,
                           data_channel_resp_h=s.resp_h, data_channel_resp_p=int(em.group(2)))
        elif cmd == "AUTH" and code == 234:
            tls = True  # TLS from here on: the tls module reads it
        row["file_size"] = size
        row["user"] = user
        row["password"] = password
        rows.append(row)
    if rbad and rows and not any(r.get("malformed") for r in rows):
        rows[-1]["malformed"] = True
    return rows
