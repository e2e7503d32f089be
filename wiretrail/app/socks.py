"""SOCKS 4, 4a and 5 (Zeek's socks.log), and the stream carried after the handshake.

One row per session: the version, the user (SOCKS4's user id, SOCKS5's user/password login,
whose password goes to the credentials table only), the request (address or name, port),
the server's answer and the bound address. Once the proxy has granted the request, the
rest of both directions is the proxied connection: the row carries `_inner` (where it
starts in each direction, and the port asked for), and the stage parses it as a session
of its own protocol (HTTP through a SOCKS proxy gets its http rows).
"""

from __future__ import annotations

import ipaddress
import struct

import pyarrow as pa

from wiretrail.app.base import SESSION_COLUMNS, Stream, guarded
from wiretrail.app.credentials import credential

TABLE = "socks"
SCHEMA = pa.schema([
    *SESSION_COLUMNS,
    ("version", pa.int32()),
    ("user", pa.string()),
    ("password", pa.string()),       # "<hidden>" when one was sent (see credentials)
    ("status", pa.string()),
    ("request_host", pa.string()),
    ("request_name", pa.string()),
    ("request_p", pa.int32()),
    ("bound_host", pa.string()),
    ("bound_name", pa.string()),
    ("bound_p", pa.int32()),
    ("malformed", pa.bool_()),
])
PORTS = {1080}
NDPI = {"SOCKS"}

_STATUS4 = {0x5A: "succeeded", 0x5B: "general SOCKS server failure", 0x5C: "request failed: no identd",
            0x5D: "request failed: identd user mismatch"}
_STATUS5 = {0: "succeeded", 1: "general SOCKS server failure", 2: "connection not allowed by ruleset",
            3: "network unreachable", 4: "host unreachable", 5: "connection refused", 6: "TTL expired",
            7: "command not supported", 8: "address type not supported"}


class _Short(Exception):
    pass


def _cstring(b: bytes, pos: int) -> tuple[str, int]:
    end = b.find(b"\0", pos)
    if end < 0:
        raise _Short
    return b[pos:end].decode("latin-1"), end + 1


def _addr5(b: bytes, pos: int) -> tuple[str | None, str | None, int, int]:
    """SOCKS5 address + port at pos: (host, name, port, next position)."""
    if pos >= len(b):
        raise _Short
    atyp = b[pos]
    if atyp == 1:
        if pos + 7 > len(b):
            raise _Short
        host = str(ipaddress.IPv4Address(b[pos + 1:pos + 5]))
        return host, None, struct.unpack_from("!H", b, pos + 5)[0], pos + 7
    if atyp == 4:
        if pos + 19 > len(b):
            raise _Short
        host = ipaddress.IPv6Address(b[pos + 1:pos + 17]).compressed
        return host, None, struct.unpack_from("!H", b, pos + 17)[0], pos + 19
    if atyp == 3:
        if pos + 2 > len(b) or pos + 2 + b[pos + 1] + 2 > len(b):
            raise _Short
        n = b[pos + 1]
        name = b[pos + 2:pos + 2 + n].decode("latin-1")
        return None, name, struct.unpack_from("!H", b, pos + 2 + n)[0], pos + 2 + n + 2
    raise ValueError("address type")


def _parse(s: Stream) -> list[dict]:
    c, r = s.orig.data, s.resp.data
    if not c or c[0] not in (4, 5):
        return []
    row = {"ts": s.orig.time_at(0), "uid": s.uid, "version": c[0], "malformed": False}
    out = [row]
    try:
        if c[0] == 4:
            if len(c) < 9:
                raise _Short
            port = struct.unpack_from("!H", c, 2)[0]
            ip = c[4:8]
            user, pos = _cstring(c, 8)
            row.update(user=user or None, request_p=port)
            if ip[:3] == b"\0\0\0" and ip[3] != 0:  # SOCKS4a: the name follows
                row["request_name"], pos = _cstring(c, pos)
            else:
                row["request_host"] = str(ipaddress.IPv4Address(ip))
            if len(r) >= 8:
                row["status"] = _STATUS4.get(r[1], f"unknown ({r[1]})")
                row["bound_p"] = struct.unpack_from("!H", r, 2)[0]
                row["bound_host"] = str(ipaddress.IPv4Address(r[4:8]))
                if r[1] == 0x5A:
                    row["_inner"] = (pos, 8, port)
            return out
        # SOCKS 5: greeting, method choice, optional user/password, request, reply
        if len(c) < 2 or len(c) < 2 + c[1] or len(r) < 2:
            raise _Short
        cpos, rpos = 2 + c[1], 2
        method = r[1]
        if method == 2:  # RFC 1929 user/password
            if cpos + 2 > len(c):
                raise _Short
            ulen = c[cpos + 1]
            user = c[cpos + 2:cpos + 2 + ulen].decode("latin-1")
            plen_at = cpos + 2 + ulen
            if plen_at >= len(c):
                raise _Short
            plen = c[plen_at]
            password = c[plen_at + 1:plen_at + 1 + plen]
            cpos = plen_at + 1 + plen
            row.update(user=user, password="<hidden>")
            out.append(credential(row["ts"], "socks", "user/password", user, password))
            if rpos + 2 > len(r):
                raise _Short
            if r[rpos + 1] != 0:
                row["status"] = "authentication failed"
                return out
            rpos += 2
        elif method == 0xFF:
            row["status"] = "no acceptable methods"
            return out
        if cpos + 3 > len(c) or c[cpos] != 5:
            raise _Short
        host, name, port, cpos = _addr5(c, cpos + 3)
        row.update(request_host=host, request_name=name, request_p=port)
        if rpos + 3 > len(r) or r[rpos] != 5:
            raise _Short
        status = r[rpos + 1]
        row["status"] = _STATUS5.get(status, f"unknown ({status})")
        bhost, bname, bport, rpos = _addr5(r, rpos + 3)
        row.update(bound_host=bhost, bound_name=bname, bound_p=bport)
        if status == 0:
            row["_inner"] = (cpos, rpos, port)
    except _Short:
        pass  # the handshake was cut short (or missed): log what was seen
    except (ValueError, IndexError):
        row["malformed"] = True
    return out


parse_stream = guarded(_parse)
