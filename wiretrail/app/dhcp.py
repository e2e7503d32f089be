"""DHCP records, as Zeek's dhcp.log has them.

Zeek groups the messages of one DHCP exchange by transaction id (xid), across sessions
(a DISCOVER broadcast from 0.0.0.0 and a unicast REQUEST are different sessions), so the
state is one `DhcpTracker` for the whole stage, not one per session. As in Zeek's
`base/protocols/dhcp/main.zeek`, an exchange is written when it has been quiet for 5 s
(checked 10 s after it started and every 5 s after), when it has run 30 s, when it has
gathered 10 session uids or 50 message types, or at `close()`. `emit_on_reply=True`
writes an exchange at once when a server's ACK or NAK arrives instead (not Zeek's rule:
a NAK then REQUEST/ACK makes two rows).

Per message: a client message (sent by the session's originator, from 0.0.0.0 or port 68
or to port 67) gives client_addr (its source, unless 0.0.0.0/broadcast), host_name,
client_fqdn, mac (client identifier option of hardware type 1, else chaddr),
requested_addr; a server message gives server_addr (only with an address handed out),
assigned_addr (yiaddr), mac (chaddr, if none yet), domain, lease_time. Both add to
msg_types and uids; `duration` runs from the first message to the last.

A message without the DHCP magic cookie (plain BOOTP or not DHCP at all) or cut short
gives a `malformed` row of its own; the parser never raises.
"""

from __future__ import annotations

import socket
import struct

import pyarrow as pa

from wiretrail.app.base import Datagram, escaped_text

TABLE = "dhcp"
PORTS = {67, 68, 4011}
NDPI = {"DHCP"}

SCHEMA = pa.schema([
    ("ts", pa.timestamp("ns")),
    ("uid", pa.string()),              # the session of the exchange's first message
    ("uids", pa.list_(pa.string())),   # every session that carried one of its messages
    ("xid", pa.uint32()),
    ("client_addr", pa.string()),
    ("server_addr", pa.string()),
    ("mac", pa.string()),
    ("host_name", pa.string()),
    ("client_fqdn", pa.string()),
    ("domain", pa.string()),
    ("requested_addr", pa.string()),
    ("assigned_addr", pa.string()),
    ("lease_time", pa.float64()),      # seconds
    ("client_message", pa.string()),
    ("server_message", pa.string()),
    ("msg_types", pa.list_(pa.string())),
    ("duration", pa.int64()),          # ns, first to last message
    ("vendor_class", pa.string()),
    ("requested_options", pa.list_(pa.uint8())),
    ("malformed", pa.bool_()),
])

MESSAGE_TYPES = {
    1: "DISCOVER", 2: "OFFER", 3: "REQUEST", 4: "DECLINE", 5: "ACK", 6: "NAK", 7: "RELEASE",
    8: "INFORM", 9: "FORCERENEW", 10: "LEASEQUERY", 11: "LEASEUNASSIGNED", 12: "LEASEUNKNOWN",
    13: "LEASEACTIVE", 14: "BULKLEASEQUERY", 15: "LEASEQUERYDONE", 16: "ACTIVELEASEQUERY",
    17: "LEASEQUERYSTATUS", 18: "TLS",
}

COOKIE = 0x63825363
NS = 1_000_000_000
IDLE = 5 * NS              # quiet this long: the exchange is over
FIRST_CHECK = 10 * NS      # Zeek's join_data &create_expire
RECHECK = 5 * NS
MAX_WATCH = 30 * NS        # DHCP::max_txid_watch_time
MAX_UIDS = 10              # DHCP::max_uids_per_log_entry
MAX_MSG_TYPES = 50         # DHCP::max_msg_types_per_log_entry
MAX_TRACKED = 100_000      # DHCP::max_tracked_transactions
_NEVER = 1 << 63           # past any packet time (ns)

_BLANK = dict.fromkeys(SCHEMA.names)
def message_type_name(n: int) -> str:
    return MESSAGE_TYPES.get(n, f"unknown-message-type-{n}")


def fmt_mac(b: bytes) -> str:
    """Zeek's fmt_mac: six bytes as aa:bb:..., eight if the last two of eight are not zero."""
    if len(b) < 6:
        return ""
    if len(b) >= 8 and (b[6] or b[7]):
        return b[:8].hex(":")
    return b[:6].hex(":")


# Four bytes as a dotted quad (inet_ntoa: a tenth of ipaddress's cost, 11 k calls on mix.pcap).
_ip4 = socket.inet_ntoa


class DhcpMessage:
    """One DHCP message, parsed on its own."""

    __slots__ = ("op", "xid", "ciaddr", "yiaddr", "siaddr", "giaddr", "chaddr", "m_type", "options",
                 "malformed", "dhcp")

    def __init__(self):
        self.op = 0
        self.xid = 0
        self.ciaddr = self.yiaddr = self.siaddr = self.giaddr = "0.0.0.0"
        self.chaddr = ""
        self.m_type = 0
        self.options: dict[int, bytes] = {}
        self.malformed = False
        self.dhcp = False   # header and magic cookie present


def parse_message(buf: bytes) -> DhcpMessage:
    """Parse a BOOTP/DHCP message. Never raises."""
    m = DhcpMessage()
    try:
        if len(buf) < 240:
            m.malformed = True
            if len(buf) >= 8:
                m.op = buf[0]
                m.xid = struct.unpack_from(">I", buf, 4)[0]
            return m
        m.op = buf[0]
        m.xid = struct.unpack_from(">I", buf, 4)[0]
        m.ciaddr, m.yiaddr, m.siaddr, m.giaddr = _ip4(buf[12:16]), _ip4(buf[16:20]), _ip4(buf[20:24]), _ip4(buf[24:28])
        m.chaddr = fmt_mac(buf[28:44])
        if struct.unpack_from(">I", buf, 236)[0] != COOKIE:
            m.malformed = True
            return m
        m.dhcp = True
        pos, n = 240, len(buf)
        ended = False
        options = m.options
        while pos < n:
            code = buf[pos]
            if code == 0:
                pos += 1
                continue
            if code == 255:
                ended = True
                break
            end = pos + 2 + buf[pos + 1] if pos + 1 < n else n + 1
            if end > n:
                m.malformed = True  # option runs past the end
                break
            val = buf[pos + 2:end]
            # repeated options are concatenated (RFC 3396); Zeek keeps the last one of most
            if code in options and (code == 55 or code == 81):
                val = options[code] + val
            options[code] = val
            pos = end
        if not ended:
            m.malformed = True
        t = m.options.get(53)
        if t is not None and len(t) == 1:
            m.m_type = t[0]
        elif t is not None:
            m.malformed = True
    except Exception:  # noqa: BLE001 - a parser bug must not cost the ingest
        m.malformed = True
    return m


class _Exchange:
    __slots__ = ("row", "first_ts", "last_ts", "next_check", "client_chaddr")

    def __init__(self, ts: int, uid: str, xid: int):
        self.row: dict = dict(_BLANK, ts=ts, uid=uid, uids=[uid], xid=xid, msg_types=[], duration=0, malformed=False)
        self.first_ts = ts
        self.last_ts = ts
        self.next_check = ts + FIRST_CHECK
        self.client_chaddr: str | None = None

    def finish(self) -> dict:
        r = self.row
        if r.get("mac") is None and self.client_chaddr:
            r["mac"] = self.client_chaddr
        return r


def _opt_text(m: DhcpMessage, code: int) -> str | None:
    v = m.options.get(code)
    return None if v is None else escaped_text(v)


def _apply(ex: _Exchange, m: DhcpMessage, d: Datagram) -> None:
    r = ex.row
    r["duration"] = d.ts - ex.first_ts
    if d.uid not in r["uids"]:
        r["uids"].append(d.uid)
    r["msg_types"].append(message_type_name(m.m_type))
    r["malformed"] = r["malformed"] or m.malformed or d.truncated
    ex.last_ts = d.ts
    # Zeek: is_orig && (orig_h == 0.0.0.0 || orig_p == 68 || resp_p == 67)
    is_client = d.from_orig and (d.orig_h == "0.0.0.0" or d.orig_p == 68 or d.resp_p == 67)
    o = m.options
    msg = _opt_text(m, 56)
    if msg is not None:
        r["client_message" if is_client else "server_message"] = msg
    if is_client:
        if d.orig_h not in ("0.0.0.0", "255.255.255.255"):
            r["client_addr"] = d.orig_h
        if 12 in o:
            r["host_name"] = escaped_text(o[12])
        if 81 in o and len(o[81]) >= 3:
            r["client_fqdn"] = escaped_text(o[81][3:])
        cid = o.get(61)
        if cid and cid[0] == 1:
            r["mac"] = fmt_mac(cid[1:])
        else:
            ex.client_chaddr = m.chaddr
        if 50 in o and len(o[50]) == 4:
            r["requested_addr"] = _ip4(o[50])
        if 60 in o:
            r["vendor_class"] = escaped_text(o[60])
        if 55 in o:
            r["requested_options"] = list(o[55])
    else:
        if m.yiaddr != "0.0.0.0":
            r["server_addr"] = d.orig_h if d.from_orig else d.resp_h
            r["assigned_addr"] = m.yiaddr
        if m.chaddr and r.get("mac") is None:
            r["mac"] = m.chaddr
        if r.get("client_addr") is None and r.get("assigned_addr") is not None:
            r["client_addr"] = r["assigned_addr"]
        if 15 in o:
            r["domain"] = escaped_text(o[15])
        if 51 in o and len(o[51]) == 4:
            r["lease_time"] = float(struct.unpack(">I", o[51])[0])


class DhcpTracker:
    """DHCP exchanges of one stage (all sessions), keyed by transaction id."""

    def __init__(self, *, emit_on_reply: bool = False):
        self.emit_on_reply = emit_on_reply
        self.live: dict[int, _Exchange] = {}   # insertion ordered: oldest first
        # no exchange is checked before this time (at most the earliest next_check): expire()
        # called for every datagram walks the exchanges only when one may be due
        self.next_due = _NEVER

    def add(self, d: Datagram) -> list[dict]:
        """Feed one datagram; returns the rows it completes (call `expire(d.ts)` first)."""
        m = parse_message(d.payload)
        if not m.dhcp:
            return [dict(_BLANK, ts=d.ts, uid=d.uid, uids=[d.uid], xid=m.xid if len(d.payload) >= 8 else None,
                         msg_types=[], duration=0, malformed=True,
                         mac=m.chaddr or None)]
        out: list[dict] = []
        ex = self.live.get(m.xid)
        if ex is None:
            if len(self.live) >= MAX_TRACKED:
                old = next(iter(self.live))
                out.append(self.live.pop(old).finish())
            ex = self.live[m.xid] = _Exchange(d.ts, d.uid, m.xid)
            self.next_due = min(self.next_due, ex.next_check)
        _apply(ex, m, d)
        r = ex.row
        if (len(r["uids"]) >= MAX_UIDS or len(r["msg_types"]) >= MAX_MSG_TYPES
                or (self.emit_on_reply and m.m_type in (5, 6) and not d.from_orig)):
            out.append(self.live.pop(m.xid).finish())
        return out

    def expire(self, now: int) -> list[dict]:
        """Rows of the exchanges over by `now` (Zeek's join_data expiration)."""
        if now < self.next_due:
            return []
        out = []
        for xid in list(self.live):
            ex = self.live[xid]
            while ex.next_check <= now:
                t = ex.next_check
                if t - ex.last_ts > IDLE or t - ex.first_ts > MAX_WATCH:
                    out.append(self.live.pop(xid).finish())
                    break
                ex.next_check += RECHECK
        self.next_due = min((ex.next_check for ex in self.live.values()), default=_NEVER)
        return out

    def close(self) -> list[dict]:
        out = [ex.finish() for ex in self.live.values()]
        self.live.clear()
        return out


def parse_datagram(d: Datagram) -> list[dict]:
    """One datagram on its own: the row its message would give as a one-message exchange."""
    try:
        t = DhcpTracker()
        return t.add(d) + t.close()
    except Exception:  # noqa: BLE001
        return [dict(_BLANK, ts=d.ts, uid=d.uid, uids=[d.uid], malformed=True)]


def new_tracker() -> DhcpTracker:
    """The application stage's state for all sessions (see app.base)."""
    return DhcpTracker()
