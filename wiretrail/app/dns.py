"""DNS (and NetBIOS name service, mDNS, LLMNR) records, as Zeek's dns.log has them.

One row per query/response transaction. A message is parsed on its own
(`parse_message`); `DnsSession` pairs the messages of one session the way Zeek's
`base/protocols/dns/main.zeek` does:

- a query waits for a response with the same transaction id (first in, first out per id);
  a response that finds no query waits for a query the same way;
- a row is ready once it has seen a query and a response; what is still waiting when the
  session ends comes out of `close()` (queries first, then lone responses);
- to a multicast address (mDNS, LLMNR) nothing is paired: every message is its own row;
- `ts` is the time of the transaction's first message; `rtt` is set by the first answer
  record of the response (no answer records: no rtt, AA and RA stay false, as in Zeek);
- `query`/`qtype`/`qclass`/`RD`/`TC`/`Z` come from the query; a lone response takes
  `query` from its first answer's owner name; `rcode` and `rejected` from the response;
- `answers`/`TTLs` list the answer section only, each record written as Zeek writes it
  (addresses, names, "TXT <len> <text>", "RRSIG <type> <signer>", "<unknown type=N>", ...).

Only standard queries, NOTIFY and dynamic UPDATE are tracked (Zeek's opcodes 0, 4, 5);
a message with another opcode (or shorter than a header) gives a `malformed` row of its
own. A message that breaks part way (bad name pointer, record past the end, absurd
counts...) keeps what was parsed before the break and sets `malformed`; the parser
never raises.

`flags_raw` is the 16-bit flags word of the response (of the query if no response).
Names and strings are text with bytes outside printable ASCII written as \\xNN, as in
Zeek's logs; names are lower-cased.
"""

from __future__ import annotations

import functools
import ipaddress
import struct
from collections import deque
from dataclasses import dataclass, field
from socket import inet_ntoa
from typing import NamedTuple

import numpy as np
import pyarrow as pa

from wiretrail import arrow_compute as ac
from wiretrail.app import dns_kernel as K
from wiretrail.app.base import (Datagram, DatagramBatch, Endpoints, Records, Stream, escaped_text, ipv4_mapped,
                                 ranges)

TABLE = "dns"
PORTS = {53, 137, 5353, 5355}
NDPI = {"DNS", "MDNS", "LLMNR", "NetBIOS"}

# a record's data as Suricata logs it: `rdata` text, or for SOA, SRV and SSHFP their fields
_SOA = pa.struct([("mname", pa.string()), ("rname", pa.string()), ("serial", pa.int64()), ("refresh", pa.int64()),
                  ("retry", pa.int64()), ("expire", pa.int64()), ("minimum", pa.int64())])
_SRV = pa.struct([("priority", pa.int64()), ("weight", pa.int64()), ("port", pa.int64()), ("name", pa.string())])
_SSHFP = pa.struct([("algo", pa.int64()), ("type", pa.int64()), ("fingerprint", pa.string())])
_RECORDS = pa.list_(pa.struct([("rrname", pa.string()), ("rrtype", pa.string()), ("ttl", pa.int64()),
                                ("rdata", pa.string()), ("soa", _SOA), ("srv", _SRV), ("sshfp", _SSHFP)]))

SCHEMA = pa.schema([
    ("ts", pa.timestamp("ns")),
    ("uid", pa.string()),
    ("orig_h", pa.string()),
    ("orig_p", pa.uint16()),
    ("resp_h", pa.string()),
    ("resp_p", pa.uint16()),
    ("proto", pa.string()),
    ("trans_id", pa.uint16()),
    ("rtt", pa.int64()),               # ns from the query to the first answer record; null if none
    ("query", pa.string()),
    ("qclass", pa.uint16()),
    ("qclass_name", pa.string()),
    ("qtype", pa.uint16()),
    ("qtype_name", pa.string()),
    ("rcode", pa.uint16()),
    ("rcode_name", pa.string()),
    ("AA", pa.bool_()),
    ("TC", pa.bool_()),
    ("RD", pa.bool_()),
    ("RA", pa.bool_()),
    ("Z", pa.uint8()),
    ("answers", pa.list_(pa.string())),
    ("TTLs", pa.list_(pa.float64())),
    ("rejected", pa.bool_()),
    ("opcode", pa.uint8()),
    ("opcode_name", pa.string()),
    ("malformed", pa.bool_()),
    ("flags_raw", pa.uint16()),
    # for Suricata's EVE (one event per message) and for analysts: each message on its own
    ("query_flags", pa.uint16()),
    ("response_flags", pa.uint16()),
    ("response_ts", pa.timestamp("ns")),
    ("query_packet", pa.int64()),      # packet number in its capture file (1-based), null if unknown
    ("response_packet", pa.int64()),
    ("query_original", pa.string()),   # the query name as sent (Zeek lower-cases `query`)
    ("answer_records", _RECORDS),      # answers as sent: owner name, type, TTL, data (TXT: per string)
    ("authority_records", _RECORDS),
])

# ---- Zeek's name tables (base/protocols/dns/consts.zeek) ------------------------------------

QTYPE_NAMES = {
    1: "A", 2: "NS", 3: "MD", 4: "MF", 5: "CNAME", 6: "SOA", 7: "MB", 8: "MG", 9: "MR", 10: "NULL",
    11: "WKS", 12: "PTR", 13: "HINFO", 14: "MINFO", 15: "MX", 16: "TXT", 17: "RP", 18: "AFSDB",
    19: "X25", 20: "ISDN", 21: "RT", 22: "NSAP", 23: "NSAP-PTR", 24: "SIG", 25: "KEY", 26: "PX",
    27: "GPOS", 28: "AAAA", 29: "LOC", 30: "NXT", 31: "EID", 32: "NIMLOC", 33: "SRV", 34: "ATMA",
    35: "NAPTR", 36: "KX", 37: "CERT", 38: "A6", 39: "DNAME", 40: "SINK", 41: "OPT", 42: "APL",
    43: "DS", 44: "SSHFP", 45: "IPSECKEY", 46: "RRSIG", 47: "NSEC", 48: "DNSKEY", 49: "DHCID",
    50: "NSEC3", 51: "NSEC3PARAM", 52: "TLSA", 53: "SMIMEA", 55: "HIP", 56: "NINFO", 57: "RKEY",
    58: "TALINK", 59: "CDS", 60: "CDNSKEY", 61: "OPENPGPKEY", 62: "CSYNC", 63: "ZONEMD",
    64: "SVCB", 65: "HTTPS", 99: "SPF", 100: "UINFO", 101: "UID", 102: "GID", 103: "UNSPEC",
    104: "NID", 105: "L32", 106: "L64", 107: "LP", 108: "EUI48", 109: "EUI64", 249: "TKEY",
    250: "TSIG", 251: "IXFR", 252: "AXFR", 253: "MAILB", 254: "MAILA", 255: "*", 256: "URI",
    257: "CAA", 32768: "TA", 32769: "DLV", 65281: "WINS", 65282: "WINS-R", 65422: "XPF",
    65521: "INTEGRITY",
}

RCODE_NAMES = {
    0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP", 5: "REFUSED",
    6: "YXDOMAIN", 7: "YXRRSET", 8: "NXRRSet", 9: "NOTAUTH", 10: "NOTZONE",
    11: "unassigned-11", 12: "unassigned-12", 13: "unassigned-13", 14: "unassigned-14",
    15: "unassigned-15", 16: "BADVERS", 17: "BADKEY", 18: "BADTIME", 19: "BADMODE",
    20: "BADNAME", 21: "BADALG", 22: "BADTRUNC", 23: "BADCOOKIE", 3842: "BADSIG",
}

QCLASS_NAMES = {1: "C_INTERNET", 2: "C_CSNET", 3: "C_CHAOS", 4: "C_HESIOD", 254: "C_NONE", 255: "C_ANY"}

OPCODE_NAMES = {0: "query", 1: "iquery", 2: "server-status", 4: "notify", 5: "dynamic-update", 6: "dso"}
NETBIOS_OPCODE_NAMES = {0: "netbios-query", 5: "netbios-registration", 6: "netbios-release",
                        7: "netbios-wack", 8: "netbios-refresh"}


# (the name for a number not in a table is made only when asked for: these run per message)
def qtype_name(n: int) -> str:
    return QTYPE_NAMES.get(n) or f"query-{n}"


def rcode_name(n: int) -> str:
    return RCODE_NAMES.get(n) or f"rcode-{n}"


def qclass_name(n: int) -> str:
    return QCLASS_NAMES.get(n) or f"qclass-{n}"


def opcode_name(n: int, netbios: bool = False) -> str:
    if netbios:
        return NETBIOS_OPCODE_NAMES.get(n) or f"netbios-opcode-{n}"
    return OPCODE_NAMES.get(n) or f"opcode-{n}"


# ---- limits (Zeek's defaults) ---------------------------------------------------------------
MAX_QUERIES = 25            # dns_max_queries: more questions than this is not DNS
MAX_COMPRESSION_DEPTH = 20  # dns_max_compression_chain_depth
MAX_NAME = 512              # bytes of text a name may take (Zeek's name buffer)
MAX_PENDING_MSGS = 50       # DNS::max_pending_msgs (per transaction id)
MAX_PENDING_IDS = 50        # DNS::max_pending_query_ids

TRACKED_OPCODES = (0, 4, 5)
_TRACKED_OPCODE = np.isin(np.arange(16), TRACKED_OPCODES)  # by opcode (4 bits): a lookup per batch
NETBIOS_PORT = 137

# answer-section kinds (Zeek's DNS_ANS, DNS_PREREQUISITES, DNS_UPDATES)
ANS, PREREQ, UPDATE = 1, 5, 6

def _lossy(b: bytes) -> str:
    """Bytes as Suricata's string_from_bytes writes them: valid UTF-8 as is, each byte of an
    invalid sequence as \\xNN."""
    out, i, n = [], 0, len(b)
    while i < n:
        try:
            out.append(b[i:].decode("utf-8"))
            break
        except UnicodeDecodeError as err:
            out.append(b[i:i + err.start].decode("utf-8"))
            bad = b[i + err.start:i + err.end]
            out.append("".join(f"\\x{c:02x}" for c in bad))
            i += err.end
    return "".join(out)


def _ip6(b: bytes) -> str:
    a = ipaddress.IPv6Address(b)
    m = a.ipv4_mapped
    if m is not None:
        return f"::ffff:{m}"
    return str(a)


class _Bad(Exception):
    """Internal: the message breaks here (never leaves this module)."""


class Answer(NamedTuple):
    """One record: names as sent."""

    name: str        # owner name
    rtype: int
    rclass: int
    ttl: int
    kind: int        # ANS, PREREQ or UPDATE; 0 in the authority section
    reply: str | None  # Zeek's answer string; "" counts for AA/RA/rtt but adds no answer; None: no event
    txt: list[str] | None = None  # a TXT record's strings, each on its own (Suricata's answers)
    detail: dict | None = None    # Suricata's fields for a record: {"soa": {...}}, {"srv": ...}, {"sshfp": ...},
                                  # or {"rdata": text} where its text differs from Zeek's (NULL)
    # (owner, reply) as Zeek's lower-cased reading has them, once a name in the message had
    # capitals; None: the same as `name` and `reply`
    lower: tuple[str, str | None] | None = None


@dataclass(slots=True)
class DnsMessage:
    """One DNS message, parsed on its own."""

    trans_id: int = 0
    flags: int = 0
    qdcount: int = 0
    ancount: int = 0
    nscount: int = 0
    arcount: int = 0
    netbios: bool = False
    questions: list[tuple[str, int, int]] = field(default_factory=list)  # (name, qtype, qclass)
    answers: list[Answer] = field(default_factory=list)  # answer section (or prereq/update), parsed order
    malformed: bool = False
    short: bool = False   # fewer bytes than a header: nothing but `malformed`
    offset: int = 0       # where the message started in a TCP stream
    packet: int = 0       # packet number in the capture file (Datagram.packet), 0 if unknown
    authorities: list[Answer] = field(default_factory=list)  # authority section (when asked for)
    # a name had capitals: Zeek's fields need the names lower-cased (questions, Answer.lower)
    lowered: bool = field(default=False, repr=False, compare=False)
    # the datagram had ASCII capitals anywhere: only then does a query give `query_original`
    # (a query without them leaves it to the response's question)
    capitals: bool = field(default=False, repr=False, compare=False)

    @property
    def qr(self) -> bool:
        return bool(self.flags & 0x8000)

    @property
    def opcode(self) -> int:
        return (self.flags >> 11) & 0xF

    @property
    def AA(self) -> bool:
        return bool(self.flags & 0x0400)

    @property
    def TC(self) -> bool:
        return bool(self.flags & 0x0200)

    @property
    def RD(self) -> bool:
        return bool(self.flags & 0x0100)

    @property
    def RA(self) -> bool:
        return bool(self.flags & 0x0080)

    @property
    def Z(self) -> int:
        return (self.flags >> 4) & 0x7

    @property
    def rcode(self) -> int:
        return self.flags & 0xF

    @property
    def tracked(self) -> bool:
        return not self.short and self.opcode in TRACKED_OPCODES


class _Parser:
    """One message's names (read as sent) and record data."""

    __slots__ = ("buf", "n", "netbios", "weird", "lowered", "lreply", "owner", "lowner", "names", "txt", "detail",
                 "after_reply")

    def __init__(self, buf: bytes, netbios: bool):
        self.buf = buf
        self.n = len(buf)
        self.netbios = netbios
        self.weird = False
        self.lowered = False  # a name had capitals (DnsMessage.lowered)
        # `rdata` also gives its reply as the lower-cased reading writes it, once a name had
        # capitals (until then both read the same): `lreply` (None: the same as the reply).
        # `owner` is the record's owner name, `lowner` the same lower-cased.
        self.lreply: str | None = None
        self.owner = ""
        self.lowner = ""
        # names read so far, by where they start: (labels joined by dots, the length the name
        # counts against MAX_NAME, pointers followed, its text). Compression points most names
        # at one read before (answers at the question's name): such a pointer takes the whole rest.
        self.names: dict[int, tuple[bytes, int, int, str]] = {}
        # what `rdata` found besides its reply: a TXT record's strings, Suricata's fields, the
        # strings of a TXT record that broke part way (Zeek still reports them)
        self.txt: list[str] | None = None
        self.detail: dict | None = None
        self.after_reply: str | None = None

    # -- names --
    def name(self, pos: int) -> tuple[str, int]:
        """Name at `pos` -> (text as sent, without the trailing dot; position after it)."""
        buf = self.buf
        if pos + 1 < self.n and buf[pos] >= 0xC0:
            # most names are one pointer to a name read before: its text as it was, with
            # what the loop below would find (pointer depth within bounds, length already
            # checked when that name was read)
            target = ((buf[pos] & 0x3F) << 8) | buf[pos + 1]
            if target < pos:
                known = self.names.get(target)
                if known is not None and known[2] < MAX_COMPRESSION_DEPTH:
                    self.names[pos] = (known[0], known[1], known[2] + 1, known[3])
                    return known[3], pos + 2
        start = pos
        out: list[bytes] = []
        total = 0
        end = None
        depth = 0
        cut = False
        n = self.n
        while True:
            if pos >= n:
                raise _Bad("name past the end")
            ln = buf[pos]
            if ln == 0:
                pos += 1
                break
            if ln >= 0xC0:
                if pos + 1 >= n:
                    raise _Bad("pointer past the end")
                target = ((ln & 0x3F) << 8) | buf[pos + 1]
                if target >= pos:  # only backwards: no loops
                    raise _Bad("forward compression pointer")
                if end is None:
                    end = pos + 2
                depth += 1
                if depth > MAX_COMPRESSION_DEPTH:
                    self.weird = True  # Zeek ends the name here
                    cut = True
                    break
                known = self.names.get(target)
                if known is not None and depth + known[2] <= MAX_COMPRESSION_DEPTH:
                    # read before from there on, without error: only the limits over the whole
                    # name can differ (the depth is checked above, the length here)
                    suffix, length, pointers, _ = known
                    total += length
                    if total > MAX_NAME:
                        raise _Bad("name too long")
                    depth += pointers
                    if suffix:
                        out.append(suffix)
                    break
                pos = target
                continue
            after = pos + 1 + ln
            if after > n:
                raise _Bad("label past the end")
            if ln > 63 and not self.netbios:
                # 0x40/0x80: extended label types (obsolete); Zeek reads them as long labels
                raise _Bad("bad label type")
            total += ln + 1
            if total > MAX_NAME:
                raise _Bad("name too long")
            out.append(buf[pos + 1:after])
            pos = after
        joined = b".".join(out)
        if joined.isascii() and (text := joined.decode("ascii")).isprintable():
            if not self.lowered and not text.islower() and text.lower() != text:
                self.lowered = True
        else:
            # escaped_text writes ASCII letters as they are and its escapes in lower case: the
            # lower-cased text lower-cases exactly the name's ASCII capitals
            text = escaped_text(joined)
            if not self.lowered and text.lower() != text:
                self.lowered = True
        if not cut:
            self.names[start] = (joined, total, depth, text)
        return text, (end if end is not None else pos)

    def u16(self, pos: int) -> int:
        if pos + 2 > self.n:
            raise _Bad("short")
        return (self.buf[pos] << 8) | self.buf[pos + 1]

    def char_strings(self, pos: int, end: int) -> tuple[list[bytes], bool]:
        out, ok = [], True
        while pos < end:
            ln = self.buf[pos]
            if pos + 1 + ln > end:
                ok = False
                break
            out.append(self.buf[pos + 1:pos + 1 + ln])
            pos += 1 + ln
        return out, ok

    # -- records --
    def rdata(self, rtype: int, pos: int, rdlen: int, resp_port_netbios: bool, update: bool) -> str | None:
        """Zeek's reply string for one record (None: no reply event for that type)."""
        buf = self.buf
        end = pos + rdlen
        if rtype in (1, 28, 38):  # A, AAAA, A6: the address (in an update, with the owner's name)
            v4 = rtype == 1
            if rdlen != (4 if v4 else 16):
                raise _Bad("address record length")
            a = inet_ntoa(buf[pos:end]) if v4 else _ip6(buf[pos:end])
            if not update:
                return a
            if self.lowered:
                self.lreply = f"{qtype_name(rtype)} {self.lowner} {a}"
            return f"{qtype_name(rtype)} {self.owner} {a}"
        if rtype in (2, 5, 12):  # NS, CNAME, PTR
            return self._lower(self.name(pos)[0])
        if rtype == 6:  # SOA
            mname, p = self.name(pos)
            rname, p = self.name(p)
            if p + 20 > self.n:
                raise _Bad("SOA too short")
            serial, refresh, retry, expire, minimum = struct.unpack_from(">IIIII", buf, p)
            self.detail = {"soa": {"mname": mname, "rname": rname, "serial": serial, "refresh": refresh,
                                   "retry": retry, "expire": expire, "minimum": minimum}}
            return self._lower(mname)
        if rtype == 15:  # MX
            if rdlen < 2:
                raise _Bad("MX too short")
            return self._lower(self.name(pos + 2)[0])
        if rtype == 33:  # SRV (NBSTAT for NetBIOS: not parsed)
            if resp_port_netbios:
                return None
            if rdlen < 6:
                raise _Bad("SRV too short")
            target = self.name(pos + 6)[0]
            priority, weight, port = struct.unpack_from(">HHH", buf, pos)
            self.detail = {"srv": {"priority": priority, "weight": weight, "port": port, "name": target}}
            return self._lower(target)
        if rtype in (16, 99):  # TXT, SPF
            strs, ok = self.char_strings(pos, end)
            tag = "TXT" if rtype == 16 else "SPF"
            s = " ".join(f"{tag} {len(x)} {escaped_text(x)}" for x in strs)
            self.txt = [escaped_text(x) for x in strs]
            if not ok:
                self.after_reply = s
                raise _Bad("TXT string past rdata")
            return s
        if rtype == 11:  # WKS: an event with no text
            return ""
        if rtype == 35:  # NAPTR
            if rdlen < 5:
                raise _Bad("NAPTR too short")
            strs, p = [], pos + 4
            for _ in range(3):
                if p >= end or p + 1 + buf[p] > end:
                    raise _Bad("NAPTR string")
                strs.append(buf[p + 1:p + 1 + buf[p]])
                p += 1 + buf[p]
            repl, _ = self.name(p)
            order, pref = struct.unpack_from(">HH", buf, pos)
            tail = " ".join(x for x in (escaped_text(strs[2]), repl) if x)
            if self.lowered:
                ltail = " ".join(x for x in (escaped_text(strs[2]), repl.lower()) if x)
                self.lreply = f"NAPTR {order} {pref} {escaped_text(strs[0])} {escaped_text(strs[1])} {ltail}"
            return f"NAPTR {order} {pref} {escaped_text(strs[0])} {escaped_text(strs[1])} {tail}"
        if rtype == 46:  # RRSIG
            if rdlen < 18:
                raise _Bad("RRSIG too short")
            covered = self.u16(pos)
            signer, _ = self.name(pos + 18)
            if self.lowered:
                self.lreply = f"RRSIG {covered} {signer.lower() or '<Root>'}"
            return f"RRSIG {covered} {signer or '<Root>'}"
        if rtype == 48:  # DNSKEY
            if rdlen < 4:
                raise _Bad("DNSKEY too short")
            return f"DNSKEY {buf[pos + 3]}"
        if rtype == 47:  # NSEC
            nxt, _ = self.name(pos)
            if self.lowered:
                self.lreply = f"NSEC {self.lowner} {nxt.lower()}"
            return f"NSEC {self.owner} {nxt}"
        if rtype == 50:
            return "NSEC3"
        if rtype == 51:
            return "NSEC3PARAM"
        if rtype == 43:  # DS
            if rdlen < 4:
                raise _Bad("DS too short")
            return f"DS {buf[pos + 2]} {buf[pos + 3]}"
        if rtype == 65534:
            return "BIND9 signing signal"
        if rtype == 44:  # SSHFP
            if rdlen < 2:
                raise _Bad("SSHFP too short")
            rd = buf[pos:end]
            self.detail = {"sshfp": {"algo": rd[0], "type": rd[1], "fingerprint": ":".join(f"{b:02x}" for b in rd[2:])}}
            return "SSHFP: " + rd[2:].hex()
        if rtype == 29:  # LOC
            if rdlen != 16:
                raise _Bad("LOC length")
            return f"LOC:  {buf[pos + 1]} {buf[pos + 2]} {buf[pos + 3]}"
        if rtype in (13, 257, 64, 65, 41, 249, 250, 32):  # HINFO CAA SVCB HTTPS OPT TKEY TSIG NB: no answer text
            return None
        if rtype == 10:  # NULL: Suricata logs its bytes as text
            self.detail = {"rdata": _lossy(buf[pos:end])}
        return f"<unknown type={rtype}>"

    def _lower(self, name: str) -> str:
        """A reply that is one name: its lower-cased form noted for the lower-cased reading."""
        if self.lowered:
            self.lreply = name.lower()
        return name


def _lower_detail(d: dict | None) -> dict | None:
    """A record's Suricata fields with its names lower-cased (SOA, SRV); others as they are."""
    if d is None:
        return None
    if "soa" in d:
        soa = d["soa"]
        return {"soa": {**soa, "mname": soa["mname"].lower(), "rname": soa["rname"].lower()}}
    if "srv" in d:
        return {"srv": {**d["srv"], "name": d["srv"]["name"].lower()}}
    return d


_HEADER = struct.Struct(">HHHHHH")  # id, flags, qdcount, ancount, nscount, arcount
_QUESTION = struct.Struct(">HH")     # qtype, qclass
_RECORD = struct.Struct(">HHIH")     # rtype, rclass, ttl, rdlength


def parse_message(buf: bytes, *, netbios: bool = False, resp_port: int = 0, keep_case: bool = False,
                  keep_authorities: bool = False) -> DnsMessage:
    """Parse one DNS message. Never raises: a problem sets `malformed` and ends the parse.
    Names lower-cased (Zeek), or as sent with `keep_case` (Suricata), which also keeps the
    authority section's records (`keep_authorities` keeps them alone)."""
    m = _parse(buf, netbios, resp_port, keep_case or keep_authorities)
    return m if keep_case or not m.lowered else _lower_case(m)


def _lower_case(m: DnsMessage) -> DnsMessage:
    """The message with its names lower-cased, as Zeek reads it (and records' data as the
    lower-cased reading writes it: escapes in a name's text are lower case already, so only
    its ASCII capitals change)."""
    return DnsMessage(m.trans_id, m.flags, m.qdcount, m.ancount, m.nscount, m.arcount, m.netbios,
                      [(q.lower(), qt, qc) for q, qt, qc in m.questions],
                      [_lower_record(a) for a in m.answers], m.malformed, m.short, m.offset, m.packet,
                      [_lower_record(a) for a in m.authorities], True, m.capitals)


def _lower_record(a: Answer) -> Answer:
    if a.lower is None:
        return a
    name, reply = a.lower
    return a._replace(name=name, reply=reply, detail=_lower_detail(a.detail), lower=None)


def _parse(buf: bytes, netbios: bool, resp_port: int, authorities: bool) -> DnsMessage:
    """One message, names as sent, with the lower-cased reading alongside where it differs
    (DnsMessage.lowered, Answer.lower). `authorities`: keep the authority section's records.
    Nothing else in a parse depends on case: the name cache, limits and errors work on bytes."""
    n = len(buf)
    if n < 12:
        return DnsMessage(netbios=netbios, malformed=True, short=True)
    trans_id, flags, qdcount, ancount, nscount, arcount = _HEADER.unpack_from(buf)
    msg = DnsMessage(trans_id, flags, qdcount, ancount, nscount, arcount, netbios)
    opcode = (flags >> 11) & 0xF
    if opcode not in TRACKED_OPCODES and not netbios:
        msg.malformed = True  # not an opcode DNS analysis follows (Zeek: DNS_unknown_opcode)
        return msg
    if qdcount > MAX_QUERIES:
        msg.malformed = True
        return msg
    p = _Parser(buf, netbios or resp_port == NETBIOS_PORT)
    name = p.name
    resp_nb = resp_port == NETBIOS_PORT
    answers = msg.answers
    pos = 12
    update = opcode == 5 and not netbios
    try:
        if update:
            if qdcount != 1:
                raise _Bad("update zone count")
            _, pos = name(pos)
            ztype, zclass = p.u16(pos), p.u16(pos + 2)
            pos += 4
            if ztype != 6:
                raise _Bad("update zone not SOA")
            sections = ((ancount, PREREQ), (nscount, UPDATE), (arcount, 0))
        else:
            questions = msg.questions
            for _ in range(qdcount):
                text, pos = name(pos)
                if pos + 4 > n:
                    raise _Bad("question past the end")
                qt, qc = _QUESTION.unpack_from(buf, pos)
                pos += 4
                questions.append((text, qt, qc))
            zclass = 0
            sections = ((ancount, ANS), (nscount, 0), (arcount, 0))
        for section, (count, kind) in enumerate(sections) if ancount or nscount or arcount else ():
            for _ in range(count):
                owner, pos = name(pos)
                if pos + 10 > n:
                    raise _Bad("record header past the end")
                rtype, rclass, ttl, rdlen = _RECORD.unpack_from(buf, pos)
                pos += 10
                if pos + rdlen > n:
                    raise _Bad("rdata past the end")
                p.owner = owner
                # the owner lower-cased (no name so far had capitals: it has none)
                lowner = p.lowner = owner.lower() if p.lowered else owner
                reply: str | None = None
                lreply: str | None = None  # the reply lower-cased, if it differs
                if kind == PREREQ:
                    if ttl == 0 and ((rclass in (254, 255) and rdlen == 0) or rclass == zclass):
                        if rclass == 254 and rtype == 255:
                            head = "pre: NameNotInUse "
                        elif rclass == 255 and rtype == 255:
                            head = "pre: NameInUse "
                        elif rclass == 254:
                            head = f"pre: NoRRSet {qtype_name(rtype)} "
                        else:
                            head = f"pre: RRSetExists {qtype_name(rtype)} "
                        reply, lreply = head + owner, head + lowner
                    else:
                        p.weird = True
                elif kind == UPDATE and rclass == 255 and ttl == 0 and rdlen == 0:
                    if rtype == 255:
                        reply, lreply = "del: RRSet * " + owner, "del: RRSet * " + lowner
                    else:
                        reply = f"del: RRSet {qtype_name(rtype)}"
                elif kind == UPDATE and not ((rclass == 254 and ttl == 0) or rclass == zclass):
                    p.weird = True
                elif rdlen == 0:
                    # Zeek stops reading the answer section at an empty record with more data
                    # after it (DNS_zero_rdlength); legal (OPT, NULL...), so not malformed.
                    if kind == ANS and pos < n:
                        answers.append(Answer(owner, rtype, rclass, ttl, kind, None, None, None,
                                              (lowner, None) if p.lowered else None))
                        break
                elif kind:  # answer / update: only these sections make answer text
                    p.lreply = None
                    try:
                        reply = p.rdata(rtype, pos, rdlen, resp_nb, update and kind == UPDATE)
                    except _Bad:
                        if p.after_reply is not None:  # Zeek still reports the strings it read
                            answers.append(Answer(owner, rtype, rclass, ttl, kind, p.after_reply, None, None,
                                                  (lowner, p.after_reply) if p.lowered else None))
                        raise
                    lreply = p.lreply
                    if reply is not None and kind == UPDATE:
                        # (a name reply "DEL:..." as sent and "del:..." lower-cased: each as its reading has it)
                        if lreply is not None and not lreply.startswith("del:"):
                            lreply = "add: " + lreply
                        if not reply.startswith("del:"):
                            reply = "add: " + reply
                else:
                    # authority/additional: check names inside well-known records only
                    if rtype in (2, 5, 12):
                        name(pos)
                    if authorities and section == 1 and not update:
                        p.lreply = None
                        try:
                            areply = p.rdata(rtype, pos, rdlen, resp_nb, False)
                            msg.authorities.append(Answer(
                                owner, rtype, rclass, ttl, 0, areply, None, p.detail,
                                (lowner, areply if p.lreply is None else p.lreply) if p.lowered else None))
                        except _Bad:
                            pass
                if kind:
                    answers.append(Answer(owner, rtype, rclass, ttl, kind, reply,
                                          p.txt if rtype in (16, 99) else None, p.detail,
                                          (lowner, reply if lreply is None else lreply) if p.lowered else None))
                p.txt = None
                p.detail = None
                pos += rdlen
    except _Bad:
        msg.malformed = True
    except Exception:  # noqa: BLE001 - a parser bug must not cost the ingest
        msg.malformed = True
    if p.weird:
        msg.malformed = True
    msg.lowered = p.lowered
    return msg


def parse_batch(data: np.ndarray, starts: np.ndarray, ends: np.ndarray, netbios: np.ndarray,
                resp_nb: np.ndarray) -> tuple[list[DnsMessage | None], list[int], list[int]]:
    """The messages data[starts[j]:ends[j]] (netbios[j]: the session is NetBIOS name service;
    resp_nb[j]: the server port is 137), each as `_parse(payload, netbios[j], 137 if resp_nb[j]
    else 0, True)` gives it, read by one kernel call (app/dns_kernel.py) for the whole batch.
    Returns (messages, capitals, depends): a message is None where the kernel left it to
    `_parse`; capitals[j]: the payload has ASCII capitals (DnsMessage.capitals); depends[j]: the
    message reads differently with another resp_nb (it has an SRV/NBSTAT record).
    (The kernel's reading as DnsMessage objects, for comparing it with `_parse`: the batch path
    itself takes the kernel's arrays as they are, see add_datagrams.)"""
    msgs, questions, records, text, offsets = K.parse_messages(data, starts, ends, netbios, resp_nb)
    strings = pa.StringArray.from_buffers(len(offsets) - 1, pa.py_buffer(offsets), pa.py_buffer(text)).to_pylist()
    qrows = questions.tolist()
    rrows = records.tolist()
    nb_list = netbios.tolist()
    out: list[DnsMessage | None] = []
    capitals, depends = [], []
    for j, (status, tid, flags, qd, an, ns, ar, malformed, lowered, caps, dep, q0, nq, r0, nr) in enumerate(
            msgs.tolist()):
        capitals.append(bool(caps))
        depends.append(bool(dep))
        if status != K.OK:
            out.append(None)
            continue
        questions_j = [(strings[name], qt, qc) for name, qt, qc in qrows[q0:q0 + nq]]
        answers: list[Answer] = []
        authorities: list[Answer] = []
        for section, owner, rtype, rclass, ttl, kind, t1, t2, v0, v1, v2, v3, v4, rdata, low in rrows[r0:r0 + nr]:
            name = strings[owner]
            detail = txt = None
            if kind == K.K_NAME:
                reply = strings[t1]
                lreply = reply.lower()
            elif kind == K.K_ADDR4:
                reply = lreply = strings[t1]
            elif kind == K.K_NONE:
                reply = lreply = None
            elif kind == K.K_ADDR6:
                at = int(starts[j]) + rdata
                reply = lreply = _ip6(data[at:at + 16].tobytes())
            elif kind == K.K_SOA:
                reply = strings[t1]
                lreply = reply.lower()
                detail = {"soa": {"mname": reply, "rname": strings[t2], "serial": v0, "refresh": v1, "retry": v2,
                                  "expire": v3, "minimum": v4}}
            elif kind == K.K_SRV:
                reply = strings[t1]
                lreply = reply.lower()
                detail = {"srv": {"priority": v0, "weight": v1, "port": v2, "name": reply}}
            elif kind == K.K_TXT:
                reply = lreply = strings[t1]
                if section == 0:  # (an authority record keeps no strings of its own)
                    txt = strings[v0:v0 + v1]
            elif kind == K.K_EMPTY:
                reply = lreply = ""
            else:  # K_UNKNOWN
                reply = lreply = f"<unknown type={rtype}>"
            # (a name with no capitals reads the same lower-cased: `lower` is kept once one had them)
            answer = Answer(name, rtype, rclass, ttl, ANS if section == 0 else 0, reply, txt, detail,
                            (name.lower(), lreply) if low else None)
            (answers if section == 0 else authorities).append(answer)
        out.append(DnsMessage(tid, flags, qd, an, ns, ar, nb_list[j], questions_j, answers, bool(malformed), False,
                              0, 0, authorities, bool(lowered), bool(caps)))
    return out, capitals, depends


def parse_tcp_messages(data: bytes) -> list[DnsMessage]:
    """DNS over TCP: messages of one direction's byte stream (2-byte length prefixes), names
    lower-cased (as parse_message reads them).

    Each message's `offset` is where its length prefix starts in `data` (for
    `Direction.time_at`). A length running past the end gives a malformed message with
    what there is."""
    out = []
    pos, n = 0, len(data)
    while pos + 2 <= n:
        ln = (data[pos] << 8) | data[pos + 1]
        body = data[pos + 2:pos + 2 + ln]
        m = parse_message(bytes(body))
        m.offset = pos
        if len(body) < ln:
            m.malformed = True
        out.append(m)
        if ln == 0:
            pos += 2
            continue
        pos += 2 + ln
    if 0 < n - pos < 2:
        m = DnsMessage(short=True, malformed=True, offset=pos)
        out.append(m)
    return out


# ---- transactions ---------------------------------------------------------------------------

@functools.lru_cache(maxsize=4096)  # a few hosts' names, asked over and over
def decode_netbios_name(name: str) -> str:
    """Zeek's decode_netbios_name: first-level decoding of a 32-letter NetBIOS name ("" if not one)."""
    if len(name) != 32:
        return ""
    s = name.upper()
    buf = []
    for i in range(16):
        c0, c1 = s[2 * i], s[2 * i + 1]
        if not ("A" <= c0 <= "P" and "A" <= c1 <= "P"):
            return ""
        b = ((ord(c0) - 65) << 4) + (ord(c1) - 65)
        if 32 <= b <= 126 or b < 3:  # isalnum || ispunct || ' ' || b < 3
            buf.append(b)
        else:
            break
    if len(buf) == 16:
        buf = buf[:15]
    while buf and buf[-1] in (0x20, 0):
        buf.pop()
    return escaped_text(bytes(buf))


@functools.lru_cache(maxsize=4096)  # per session, and sessions share their servers
def _is_multicast(h: str) -> bool:
    try:
        return ipaddress.ip_address(h).is_multicast
    except ValueError:
        return False


_BLANK = dict.fromkeys(SCHEMA.names)


def _records(answers) -> list[dict]:
    """Records as Suricata logs them: a TXT record's strings each on its own."""
    out = []
    for a in answers:
        if a.reply is None:
            continue
        rrtype = qtype_name(a.rtype)
        if a.detail is not None:  # SOA, SRV, SSHFP: their fields in place of the text; NULL: its bytes
            out.append({"rrname": a.name, "rrtype": rrtype, "ttl": a.ttl, **a.detail})
            continue
        for data in (a.txt if a.txt is not None else [a.reply]):
            out.append({"rrname": a.name, "rrtype": rrtype, "ttl": a.ttl, "rdata": data})
    return out


class _Info:
    """One transaction being built (Zeek's DNS::Info)."""

    __slots__ = ("row", "saw_query", "saw_reply")

    def __init__(self, template: dict, ts: int, trans_id: int):
        self.row = row = template.copy()
        row["ts"] = ts
        row["trans_id"] = trans_id
        self.saw_query = False
        self.saw_reply = False

    def apply(self, m: DnsMessage, ts: int, resp_p: int) -> None:
        r = self.row
        flags = m.flags
        opcode = (flags >> 11) & 0xF
        r["opcode"] = opcode
        r["opcode_name"] = opcode_name(opcode, m.netbios)
        if m.malformed:
            r["malformed"] = True
        f = message_fields(m, resp_p == NETBIOS_PORT)
        if not flags & 0x8000:  # a query
            if r["flags_raw"] is None:
                r["flags_raw"] = flags
            if r["query_flags"] is None:
                r["query_flags"] = flags
                r["query_packet"] = m.packet or None
                if m.capitals and f.question0 is not None:
                    r["query_original"] = f.question0
            if f.query is None:
                return
            r["RD"], r["TC"], r["Z"] = bool(flags & 0x0100), bool(flags & 0x0200), (flags >> 4) & 0x7
            r["qclass"], r["qclass_name"] = f.qclass, qclass_name(f.qclass)
            r["qtype"], r["qtype_name"] = f.qtype, f.qtype_name
            r["query"] = f.query
            return
        r["flags_raw"] = flags
        if r["response_flags"] is None:
            r["response_flags"] = flags
            r["response_ts"] = ts
            r["response_packet"] = m.packet or None
            r["answer_records"] = f.answer_records
            r["authority_records"] = f.authority_records
            if r["query_original"] is None and f.question0 is not None:
                r["query_original"] = f.question0
        rcode = flags & 0xF
        r["rcode"], r["rcode_name"] = rcode, rcode_name(rcode)
        if rcode != 0 and m.qdcount == 0:
            r["rejected"] = True
        if m.questions and m.ancount == 0 and m.nscount == 0 and m.arcount == 0:
            r["rejected"] = True  # Zeek's dns_rejected: a question and no records at all
        if f.reply_owner is not None:  # the first reply set these (the next ones would set the same again)
            if r["query"] is None:
                r["query"] = f.reply_owner
            r["AA"], r["RA"] = bool(flags & 0x0400), bool(flags & 0x0080)
            if r["rtt"] is None:
                rtt = ts - r["ts"]
                r["rtt"] = rtt if rtt != 0 else None
        if f.answers is not None:
            if r["answers"] is None:
                r["answers"], r["TTLs"] = [], []
            r["answers"] += f.answers
            r["TTLs"] += f.TTLs


class MessageFields(NamedTuple):
    """What one message gives the row of its transaction, whichever its place in it: the
    per-message half of Zeek's dns_request and dns_*_reply handlers, shared by DnsSession
    (through _Info.apply) and the batch path (for the messages its kernel leaves to Python;
    the kernel's own are made the same way in columns, by `_kernel_messages`)."""

    query: str | None          # the last question's name, lower-cased (NetBIOS: decoded); None: no question
    qtype: int | None
    qtype_name: str | None
    qclass: int | None
    question0: str | None      # the first question's name as sent
    reply_owner: str | None    # the owner of the first record with a reply, lower-cased; None: no reply
    answers: list[str] | None  # the replies with text, lower-cased reading; None: none
    TTLs: list[float] | None
    answer_records: list[dict]  # Suricata's: records as sent
    authority_records: list[dict]


def message_fields(m: DnsMessage, netbios_names: bool) -> MessageFields:
    """`m`'s part of a row; `netbios_names`: the session's server port is NetBIOS's (names
    are decoded, SRV queries are NBSTAT)."""
    query = qtype = qt_name = qclass = question0 = None
    if m.questions:
        question0 = m.questions[0][0]
        name, qtype, qclass = m.questions[-1]  # Zeek's dns_request, once per question: the last one stays
        query = name.lower()
        qt_name = qtype_name(qtype)
        if netbios_names:
            query = decode_netbios_name(query) or query
            if qtype == 33:
                qt_name = "NBSTAT"
    reply_owner = answers = ttls = None
    for a in m.answers:  # Zeek's do_reply, on the lower-cased reading
        reply = a.reply
        if reply is None:
            continue
        lower = a.lower
        if lower is not None:
            reply = lower[1]
        if reply_owner is None:
            reply_owner = a.name if lower is None else lower[0]
        if reply != "":
            if answers is None:
                answers, ttls = [], []
            answers.append(reply)
            ttls.append(float(a.ttl))
    return MessageFields(query, qtype, qt_name, qclass, question0, reply_owner, answers, ttls,
                         _records(a for a in m.answers if a.kind == ANS), _records(m.authorities))


class DnsSession:
    """Pairs one session's DNS messages into transactions (rows), as Zeek does."""

    def __init__(self, uid: str, orig_h: str, orig_p: int, resp_h: str, resp_p: int, proto: str = "udp"):
        self.base = dict(uid=uid, orig_h=orig_h, orig_p=orig_p, resp_h=resp_h, resp_p=resp_p, proto=proto)
        self.template = dict(_BLANK, **self.base, AA=False, TC=False, RD=False, RA=False, Z=0, rejected=False,
                             malformed=False)  # a transaction's row before its messages
        self.resp_p = resp_p
        self.netbios = resp_p == NETBIOS_PORT or orig_p == NETBIOS_PORT
        self.multicast = _is_multicast(resp_h)
        self.pending_query: _Info | None = None
        self.pending_queries: dict[int, deque] = {}
        self.pending_replies: dict[int, deque] = {}
        self.first = True

    @classmethod
    def for_datagram(cls, d: Datagram) -> "DnsSession":
        return cls(d.uid, d.orig_h, d.orig_p, d.resp_h, d.resp_p, "udp")

    def add(self, d: Datagram) -> list[dict]:
        """Feed one datagram of the session; returns the rows it completes."""
        payload = d.payload
        # names as sent for Suricata's fields, with Zeek's lower-cased reading alongside
        m = _parse(payload, self.netbios, self.resp_p, True)
        m.capitals = payload.lower() != payload
        m.packet = d.packet
        if d.truncated:
            m.malformed = True
        return self.add_message(m, d.ts, d.from_orig)

    def _flip(self) -> None:
        b = self.base
        b["orig_h"], b["orig_p"], b["resp_h"], b["resp_p"] = b["resp_h"], b["resp_p"], b["orig_h"], b["orig_p"]
        self.template.update(b)
        self.resp_p = b["resp_p"]

    def add_message(self, m: DnsMessage, ts: int, from_orig: bool | None = None) -> list[dict]:
        """Feed one parsed message (from_orig: sent by the session's originator, if known).
        Its names go to Suricata's fields (query_original, answer_records, ...) as they are
        in `m`, and lower-cased to Zeek's."""
        out: list[dict] = []
        flags = m.flags
        is_query = not flags & 0x8000
        if self.first and not m.short:
            self.first = False
            if not is_query and from_orig and not self.multicast:
                # The first message is a response sent by the originator: the session's roles
                # are the wrong way round (Zeek's DNS analyzer flips the connection here).
                self._flip()
        if m.short or ((flags >> 11) & 0xF) not in TRACKED_OPCODES:
            # too short, or an opcode Zeek does not follow: a flagged row of its own
            r = self.template.copy()
            r["ts"] = ts
            r["malformed"] = True
            if not m.short:
                r.update(trans_id=m.trans_id, opcode=m.opcode, opcode_name=opcode_name(m.opcode, m.netbios),
                         flags_raw=flags)
            return [r]
        tid = m.trans_id
        if self.multicast:
            info = _Info(self.template, ts, tid)
            info.saw_query = info.saw_reply = True
        elif is_query:
            q = self.pending_replies.get(tid)
            if q:
                info = self._pop(self.pending_replies, tid)
            else:
                info = _Info(self.template, ts, tid)
                if self.pending_query is None:
                    self.pending_query = info
                else:
                    out += self._enqueue(self.pending_queries, tid, info)
        else:
            if self.pending_query is not None and self.pending_query.row["trans_id"] == tid:
                info = self.pending_query
                self.pending_query = None
                if self.pending_queries:
                    if self.pending_queries.get(tid):
                        self.pending_query = self._pop(self.pending_queries, tid)
                    else:
                        k = next(iter(self.pending_queries))
                        self.pending_query = self._pop(self.pending_queries, k)
            elif self.pending_queries.get(tid):
                info = self._pop(self.pending_queries, tid)
            else:
                info = _Info(self.template, ts, tid)
                out += self._enqueue(self.pending_replies, tid, info)
        info.apply(m, ts, self.resp_p)
        if is_query:
            info.saw_query = True
        else:
            info.saw_reply = True
        if info.saw_query and info.saw_reply:
            out.append(info.row)
            self._forget(info)
        return out

    def _forget(self, info: _Info) -> None:
        # A logged transaction may still sit in a queue only if it was put there and then
        # completed by a message of its own kind (Zeek logs it and drops c$dns).
        if self.pending_query is info:
            self.pending_query = None
        for table in (self.pending_queries, self.pending_replies):
            q = table.get(info.row["trans_id"])
            if q and info in q:
                q.remove(info)
                if not q:
                    del table[info.row["trans_id"]]

    @staticmethod
    def _pop(table: dict[int, deque], tid: int) -> _Info:
        q = table[tid]
        info = q.popleft()
        if not q:
            del table[tid]
        return info

    @staticmethod
    def _enqueue(table: dict[int, deque], tid: int, info: _Info) -> list[dict]:
        out = []
        if tid not in table:
            if len(table) > MAX_PENDING_IDS:
                for q in table.values():
                    out += [i.row for i in q]
                table.clear()
            table[tid] = deque()
        elif len(table[tid]) > MAX_PENDING_MSGS:
            out += [i.row for i in table[tid]]
            table[tid] = deque()
        table[tid].append(info)
        return out

    def close(self) -> list[dict]:
        """The session ended: rows of every transaction still waiting for its other half."""
        out = []
        if self.pending_query is not None:
            out.append(self.pending_query.row)
            self.pending_query = None
        for table in (self.pending_queries, self.pending_replies):
            for q in table.values():
                out += [i.row for i in q]
            table.clear()
        return out


# ---- the stage's batch path: a batch's datagrams to rows, as columns ------------------------
#
# add_datagrams reads a batch's messages with one kernel call (dns_kernel.parse_messages) and
# makes, with numpy, what each message gives its row (message_fields, as numbers: its texts
# are numbers in a pool of strings, its record lists runs of entries, `_Source`); messages
# the kernel leaves to `_parse` go through message_fields itself. A second kernel
# (dns_kernel.pair_messages) pairs the messages into transactions by DnsSession.add_message's
# rules. The rows wait in the session's DnsBook, as the numbers of their messages, until the
# session closes (the stage would hold them until then anyway); close_sessions then builds
# the closing sessions' rows in one go, by _Info.apply's rules in columns (`_transactions`):
# strings go from the kernel's text buffer to Arrow arrays by offsets and takes, with no
# Python object per message or row.

# per message: the book's `num` columns. Texts are numbers in the pool of its source (N_SOURCE),
# -1 for none: N_QUERY the query (lower-cased, decoded), N_Q0 the first question's name as sent,
# N_OWNER the first reply's owner (lower-cased; -1: no reply); N_ANS0/N_NANS its run of Zeek's
# answers in the source's `answers`, N_AREC0/N_NAREC and N_AUTH0/N_NAUTH its runs of
# answer_records and authority_records entries. N_FLIPPED: its session's roles were flipped
# when it came (its row takes them); N_NBSTAT: its qtype_name is NBSTAT.
(N_SID, N_TS, N_TID, N_FLAGS, N_SHORT, N_QD, N_AN, N_NS, N_AR, N_MALFORMED, N_CAPITALS, N_PACKET, N_FLIPPED,
 N_NETBIOS, N_QTYPE, N_QCLASS, N_NBSTAT, N_SOURCE, N_QUERY, N_Q0, N_OWNER, N_ANS0, N_NANS, N_AREC0, N_NAREC,
 N_AUTH0, N_NAUTH) = range(27)
N_FIELDS = 27
N_TEXTS = (N_QUERY, N_Q0, N_OWNER)
# the columns dns_kernel.message_texts gives, in its order
_FROM_KERNEL = [N_QTYPE, N_QCLASS, N_QUERY, N_Q0, N_OWNER, N_ANS0, N_NANS, N_AREC0, N_NAREC, N_AUTH0, N_NAUTH]
# a record list entry (Suricata's record, E_* columns) and a Zeek answer (A_* columns): dns_kernel's
from wiretrail.app.dns_kernel import (A_TEXT, A_TTL, E_FIELDS, E_KIND, E_RDATA, E_RRNAME, E_RRTYPE, E_T1,  # noqa: E402
                                      E_T2, E_TTL, E_V0, E_V1, E_V2, E_V3, E_V4, EK_PLAIN, EK_SOA, EK_SRV, EK_SSHFP)

E_STRINGS = (E_RRNAME, E_RRTYPE, E_RDATA, E_T1, E_T2)  # (in a source, E_RRTYPE is its name's number too)


@dataclass(slots=True)
class _Source:
    """The texts of some messages: strings (`pool`), record list entries (E_* columns) and Zeek
    answers (A_* columns), the messages referring to them by number."""

    pool: pa.Array
    entries: np.ndarray
    answers: np.ndarray


class _Names:
    """name(code) for arrays of codes, each name made once (module-wide: names are fixed)."""

    def __init__(self, name, size: int):
        self.name = name
        self.index = np.full(size, -1, dtype=np.int64)
        self.names: list[str] = []
        self.array = pa.array([], pa.string())

    def at(self, codes: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
        """Where the codes' names are in `array` (made for those not seen before)."""
        at = self.index[codes]
        new = at < 0 if valid is None else (at < 0) & valid
        if new.any():
            for code in np.unique(codes[new]).tolist():
                self.index[code] = len(self.names)
                self.names.append(self.name(code))
            self.array = pa.array(self.names, pa.string())
            at = self.index[codes]
        return at

    def of(self, codes: np.ndarray, valid: np.ndarray | None = None) -> pa.Array:
        at = self.at(codes, valid)  # (first: it may make `array` anew)
        return _take(self.array, at, valid)


# qtype_name, with 65536 + n for NBSTAT's; opcode_name with 16 + n for NetBIOS's
_QTYPE_NAMES = _Names(lambda n: "NBSTAT" if n >= 65536 else qtype_name(n), 1 << 17)
_QCLASS_NAMES = _Names(qclass_name, 1 << 16)
_RCODE_NAMES = _Names(rcode_name, 1 << 16)
_OPCODE_NAMES = _Names(lambda n: opcode_name(n & 0xF, n >= 16), 32)


# (Arrow arrays are made from numpy arrays, or from lists with their type given: pa.array infers
# a list's type by trying to import pandas and dateutil, tens of microseconds a call without them)


def _take(values, at: np.ndarray, valid: np.ndarray | None = None):
    """values[at] (an Arrow array), null where not `valid`."""
    if valid is None:
        return ac.take(values, pa.array(at, pa.int64()))
    if len(values) == 0 or not valid.any():
        return pa.nulls(len(at), values.type)
    return ac.take(values, pa.array(np.where(valid, at, 0), pa.int64(), mask=~valid))


_NUMPY_TYPES = {pa.uint8(): np.uint8, pa.uint16(): np.uint16, pa.int64(): np.int64}


def _numbers(v: np.ndarray, valid: np.ndarray, type: pa.DataType) -> pa.Array:
    if pa.types.is_timestamp(type):
        return pa.array(np.where(valid, v, 0), pa.int64(), mask=~valid).view(type)
    return pa.array(np.where(valid, v, 0).astype(_NUMPY_TYPES[type]), type, mask=~valid)


def _constant(text: bytes, n: int) -> pa.Array:
    """n times the same string (pa.repeat of a scalar tries to import pandas on every call)."""
    return pa.StringArray.from_buffers(n, pa.py_buffer(np.arange(0, len(text) * n + 1, len(text), dtype=np.int32)),
                                       pa.py_buffer(text * n))


def _offsets(count: np.ndarray, start: int = 0) -> pa.Array:
    out = np.full(len(count) + 1, start, dtype=np.int32)
    np.cumsum(count, out=out[1:])
    out[1:] += start
    return pa.array(out)


def _among(values: np.ndarray, sorted_ids: np.ndarray) -> np.ndarray:
    """values[i] in sorted_ids, for each i (np.isin without its sorting of both)."""
    if not len(sorted_ids):
        return np.zeros(len(values), dtype=bool)
    return sorted_ids[np.minimum(np.searchsorted(sorted_ids, values), len(sorted_ids) - 1)] == values


def _ip6_texts(data: np.ndarray, at: np.ndarray) -> pa.Array:
    """The IPv6 addresses at data[at[i]:at[i] + 16] as `_ip6` writes them."""
    from wiretrail.sessions.flowtable import addr_texts

    halves = np.ascontiguousarray(data[at[:, None] + np.arange(16)]).view(">u8").astype(np.uint64)
    hi, lo = halves[:, 0], halves[:, 1]
    mapped = ipv4_mapped(hi, lo)
    texts = addr_texts(hi, lo, mapped)  # a mapped address's IPv4 part as a dotted quad
    if mapped.any():
        texts = ac.if_else(pa.array(mapped), ac.binary_join_element_wise("::ffff:", texts, ""), texts)
    return texts


def _kernel_messages(data: np.ndarray, starts: np.ndarray, parsed: tuple, netbios_names: np.ndarray,
                     num: np.ndarray) -> _Source:
    """message_fields of the messages parse_messages read (`parsed`, its results) into their
    rows of `num` (N_TID .. N_CAPITALS from the header, N_QTYPE ..), and their texts' source
    (dns_kernel.message_texts' numbers, with the strings they number). The messages the kernel
    left to Python are the caller's."""
    msgs, questions, records, text, offsets = parsed
    strings = pa.StringArray.from_buffers(len(offsets) - 1, pa.py_buffer(offsets), pa.py_buffer(text))
    n_str, n_rec = len(strings), len(records)
    for to, frm in ((N_TID, K.M_ID), (N_FLAGS, K.M_FLAGS), (N_QD, K.M_QD), (N_AN, K.M_AN), (N_NS, K.M_NS),
                    (N_AR, K.M_AR), (N_MALFORMED, K.M_MALFORMED), (N_CAPITALS, K.M_CAPITALS)):
        num[:, to] = msgs[:, frm]
    fields, answers, entries = K.message_texts(msgs, questions, records, offsets)
    num[:, _FROM_KERNEL] = fields
    # the pool: the strings as sent, the same lower-cased (Zeek's reading: the text is ASCII,
    # other bytes escaped in lower case already), "", the texts of records message_texts
    # leaves to this (IPv6 addresses, "<unknown type=N>"), the types' names, decoded NetBIOS names
    pool = [strings, ac.ascii_lower(strings), pa.array([""], pa.string())]
    end = 2 * n_str + 1
    own = np.full(n_rec + 1, 2 * n_str, dtype=np.int64)  # record r's text, at own[r]; "" at own[n_rec]
    kind = records[:, K.R_KIND]
    at = np.flatnonzero(kind == K.K_ADDR6)
    if len(at):
        rec_msg = np.repeat(np.arange(len(msgs)), msgs[:, K.M_NR])
        pool.append(_ip6_texts(data, starts[rec_msg[at]] + records[at, K.R_RDATA]))
        own[at] = end + np.arange(len(at))
        end += len(at)
    at = np.flatnonzero(kind == K.K_UNKNOWN)
    if len(at):
        distinct, which = np.unique(records[at, K.R_TYPE], return_inverse=True)
        pool.append(pa.array([f"<unknown type={t}>" for t in distinct.tolist()], pa.string()))
        own[at] = end + which.reshape(-1)
        end += len(distinct)
    for texts in (answers[:, A_TEXT], entries[:, E_RDATA]):  # message_texts' numbers past the strings
        theirs = texts >= 2 * n_str
        texts[theirs] = own[texts[theirs] - 2 * n_str]
    if len(entries):
        entries[:, E_RRTYPE] = end + _QTYPE_NAMES.at(entries[:, E_RRTYPE])
        pool.append(_QTYPE_NAMES.array)
        end += len(_QTYPE_NAMES.array)
    nb = np.flatnonzero((num[:, N_QUERY] >= 0) & netbios_names)
    if len(nb):  # NetBIOS names: decoded, once per distinct name
        names = ac.dictionary_encode(ac.take(pool[1], pa.array(num[nb, N_QUERY] - n_str)))
        pool.append(pa.array([decode_netbios_name(n) or n for n in names.dictionary.to_pylist()], pa.string()))
        num[nb, N_QUERY] = end + names.indices.to_numpy()
        num[nb, N_NBSTAT] = num[nb, N_QTYPE] == 33
    return _Source(pa.concat_arrays(pool), entries, answers)


def _python_messages(left: np.ndarray, data: np.ndarray, starts: np.ndarray, ends: np.ndarray, netbios: np.ndarray,
                     resp_nb: np.ndarray, netbios_names: np.ndarray, num: np.ndarray) -> tuple[_Source, list]:
    """The messages `left` (those the kernel left to Python) read by `_parse` and
    message_fields into their rows of `num`, with their texts' source; and those that failed
    (a parser bug: lost)."""
    pool: list[str] = []
    entries: list[list[int]] = []
    answers: list[tuple[int, int]] = []
    failed = []

    def text(s: str | None) -> int:
        if s is None:
            return -1
        pool.append(s)
        return len(pool) - 1

    for j in left.tolist():
        try:
            payload = data[starts[j]:ends[j]].tobytes()
            m = _parse(payload, bool(netbios[j]), NETBIOS_PORT if resp_nb[j] else 0, True)
            f = message_fields(m, bool(netbios_names[j]))
        except Exception:  # noqa: BLE001 - as the stage's guard around add(): this message is lost
            failed.append(j)
            continue
        row = num[j]
        row[[N_TID, N_FLAGS, N_QD, N_AN, N_NS, N_AR]] = (m.trans_id, m.flags, m.qdcount, m.ancount, m.nscount,
                                                         m.arcount)
        row[N_MALFORMED] = m.malformed
        row[N_CAPITALS] = payload.lower() != payload
        row[N_QTYPE] = f.qtype or 0
        row[N_QCLASS] = f.qclass or 0
        row[N_NBSTAT] = f.qtype_name == "NBSTAT"
        row[N_QUERY], row[N_Q0], row[N_OWNER] = text(f.query), text(f.question0), text(f.reply_owner)
        row[N_ANS0], row[N_NANS] = len(answers), len(f.answers or ())
        answers += [(text(a), int(t)) for a, t in zip(f.answers or (), f.TTLs or ())]
        for first, count, records in ((N_AREC0, N_NAREC, f.answer_records),
                                      (N_AUTH0, N_NAUTH, f.authority_records)):
            row[first], row[count] = len(entries), len(records)
            for r in records:
                e = [text(r["rrname"]), text(r["rrtype"]), r["ttl"], text(r.get("rdata")), EK_PLAIN, -1, -1, 0, 0,
                     0, 0, 0]
                if r.get("soa") is not None:
                    soa = r["soa"]
                    e[E_KIND], e[E_T1], e[E_T2] = EK_SOA, text(soa["mname"]), text(soa["rname"])
                    e[E_V0:] = soa["serial"], soa["refresh"], soa["retry"], soa["expire"], soa["minimum"]
                elif r.get("srv") is not None:
                    srv = r["srv"]
                    e[E_KIND], e[E_T1] = EK_SRV, text(srv["name"])
                    e[E_V0:E_V2 + 1] = srv["priority"], srv["weight"], srv["port"]
                elif r.get("sshfp") is not None:
                    sshfp = r["sshfp"]
                    e[E_KIND], e[E_T1] = EK_SSHFP, text(sshfp["fingerprint"])
                    e[E_V0:E_V1 + 1] = sshfp["algo"], sshfp["type"]
                entries.append(e)
    source = _Source(pa.array(pool, pa.string()), np.array(entries, dtype=np.int64).reshape(-1, E_FIELDS),
                     np.array(answers, dtype=np.int64).reshape(-1, 2))
    return source, failed


def _own_texts(source: _Source, num: np.ndarray) -> tuple[np.ndarray, _Source]:
    """The messages `num` of `source` with a source of their own texts only (renumbered)."""
    num = num.copy()
    entries = source.entries[np.concatenate([ranges(num[:, N_AREC0], num[:, N_NAREC]),
                                             ranges(num[:, N_AUTH0], num[:, N_NAUTH])])]
    answers = source.answers[ranges(num[:, N_ANS0], num[:, N_NANS])]
    strings = np.unique(np.concatenate([num[:, f] for f in N_TEXTS] + [answers[:, A_TEXT]] +
                                       [entries[:, f] for f in E_STRINGS]))
    strings = strings[strings >= 0]
    renumber = lambda v: np.where(v >= 0, np.searchsorted(strings, v), -1)  # noqa: E731
    for f in N_TEXTS:
        num[:, f] = renumber(num[:, f])
    for f in E_STRINGS:
        entries[:, f] = renumber(entries[:, f])
    answers[:, A_TEXT] = renumber(answers[:, A_TEXT])
    num[:, N_ANS0] = np.cumsum(num[:, N_NANS]) - num[:, N_NANS]
    num[:, N_AREC0] = np.cumsum(num[:, N_NAREC]) - num[:, N_NAREC]
    num[:, N_AUTH0] = np.cumsum(num[:, N_NAUTH]) - num[:, N_NAUTH] + int(num[:, N_NAREC].sum())
    return num, _Source(ac.take(source.pool, pa.array(strings, pa.int64())), entries, answers)


def _texts(sources: dict, num: np.ndarray) -> tuple[np.ndarray, _Source]:
    """The messages `num` with their texts in one source: the one they share, or their
    sources joined (copying them is cheaper than picking out the texts of these messages)."""
    ids = np.unique(num[:, N_SOURCE])
    if len(ids) == 1:
        return num, sources[int(ids[0])]
    parts = [sources[i] for i in ids.tolist()]
    sizes = np.array([[len(p.pool), len(p.entries), len(p.answers)] for p in parts], dtype=np.int64)
    base = np.cumsum(sizes, axis=0) - sizes
    entries = [p.entries.copy() for p in parts]
    answers = [p.answers.copy() for p in parts]
    for k in range(len(parts)):
        for f in E_STRINGS:
            entries[k][:, f] = np.where(entries[k][:, f] >= 0, entries[k][:, f] + base[k, 0], -1)
        answers[k][:, A_TEXT] += base[k, 0]
    num = num.copy()
    at = base[np.searchsorted(ids, num[:, N_SOURCE])]
    for f in N_TEXTS:
        num[:, f] = np.where(num[:, f] >= 0, num[:, f] + at[:, 0], -1)
    num[:, N_AREC0] += at[:, 1]
    num[:, N_AUTH0] += at[:, 1]
    num[:, N_ANS0] += at[:, 2]
    return num, _Source(pa.concat_arrays([p.pool for p in parts]), np.concatenate(entries), np.concatenate(answers))


def _record_lists(source: _Source, num: np.ndarray, valid: np.ndarray) -> list[pa.Array]:
    """answer_records and authority_records of the messages `num` of `source`, null where not
    `valid`: one array of entries that both lists' offsets point into."""
    lists = []
    runs = []
    done = 0
    for first, count in ((N_AREC0, N_NAREC), (N_AUTH0, N_NAUTH)):
        n = np.where(valid, num[:, count], 0)
        runs.append(ranges(num[:, first], n))
        lists.append((n, done))
        done += int(n.sum())
    e = source.entries[np.concatenate(runs)]
    pool = source.pool
    kind = e[:, E_KIND]
    soa, srv, sshfp = kind == EK_SOA, kind == EK_SRV, kind == EK_SSHFP
    v = [pa.array(e[:, f]) for f in (E_V0, E_V1, E_V2, E_V3, E_V4)]
    t1 = e[:, E_T1]

    def fields(type: pa.DataType, which: np.ndarray, children) -> pa.Array:  # (mostly none: not made then)
        if not which.any():
            return pa.nulls(len(which), type)
        return ac.with_nulls(pa.StructArray.from_arrays(children(), fields=list(type)), ~which)

    items = pa.StructArray.from_arrays([
        _take(pool, e[:, E_RRNAME]), _take(pool, e[:, E_RRTYPE]), pa.array(e[:, E_TTL]),
        _take(pool, e[:, E_RDATA], e[:, E_RDATA] >= 0),
        fields(_SOA, soa, lambda: [_take(pool, t1, soa), _take(pool, e[:, E_T2], soa)] + v),
        fields(_SRV, srv, lambda: v[:3] + [_take(pool, t1, srv)]),
        fields(_SSHFP, sshfp, lambda: v[:2] + [_take(pool, t1, sshfp)]),
    ], fields=list(_RECORDS.value_type))
    return [ac.list_array(_offsets(n, start), items, ~valid, _RECORDS) for n, start in lists]


def _transactions(num: np.ndarray, sources: dict, q: np.ndarray, r: np.ndarray,
                  first: np.ndarray) -> dict[str, pa.Array]:
    """The dns columns (all but the session's) of transactions made of the messages `num`: row
    i of its query q[i] and its response r[i] (-1: none; neither: the malformed row of message
    first[i] alone), first[i] the one that came first. _Info.apply's rules, in columns."""
    n = len(first)
    hq, hr = q >= 0, r >= 0
    own = ~hq & ~hr
    F = num[first]
    both, texts = _texts(sources, num[np.concatenate([np.where(hq, q, first), np.where(hr, r, first)])])
    Q, R = both[:n], both[n:]
    L = num[np.where(hq & hr, np.where(first == q, r, q), first)]  # the message applied last
    header = ~own | (F[:, N_SHORT] == 0)
    opcode = (L[:, N_FLAGS] >> 11) & 0xF
    question = hq & (Q[:, N_QUERY] >= 0)
    replied = hr & (R[:, N_OWNER] >= 0)
    rcode = R[:, N_FLAGS] & 0xF
    rtt = R[:, N_TS] - F[:, N_TS]
    query = np.where(question, Q[:, N_QUERY], np.where(replied, R[:, N_OWNER], -1))
    original = np.where(question & (Q[:, N_CAPITALS] == 1), Q[:, N_Q0], np.where(hr, R[:, N_Q0], -1))
    count = np.where(hr, R[:, N_NANS], 0)
    answers = texts.answers[ranges(R[:, N_ANS0], count)]
    offsets, none = _offsets(count), count == 0
    answer_records, authority_records = _record_lists(texts, R, hr)
    bools = lambda v: pa.array(v, pa.bool_())  # noqa: E731
    return {
        "ts": pa.array(F[:, N_TS]).view(pa.timestamp("ns")),
        "proto": _constant(b"udp", n),
        "trans_id": _numbers(F[:, N_TID], header, pa.uint16()),
        "rtt": _numbers(rtt, replied & (rtt != 0), pa.int64()),
        "query": _take(texts.pool, query, query >= 0),
        "qclass": _numbers(Q[:, N_QCLASS], question, pa.uint16()),
        "qclass_name": _QCLASS_NAMES.of(Q[:, N_QCLASS], question),
        "qtype": _numbers(Q[:, N_QTYPE], question, pa.uint16()),
        "qtype_name": _QTYPE_NAMES.of(Q[:, N_QTYPE] + (Q[:, N_NBSTAT] << 16), question),
        "rcode": _numbers(rcode, hr, pa.uint16()),
        "rcode_name": _RCODE_NAMES.of(rcode, hr),
        "AA": bools(replied & ((R[:, N_FLAGS] & 0x0400) != 0)),
        "TC": bools(question & ((Q[:, N_FLAGS] & 0x0200) != 0)),
        "RD": bools(question & ((Q[:, N_FLAGS] & 0x0100) != 0)),
        "RA": bools(replied & ((R[:, N_FLAGS] & 0x0080) != 0)),
        "Z": pa.array(np.where(question, (Q[:, N_FLAGS] >> 4) & 0x7, 0).astype(np.uint8)),
        "answers": ac.list_array(offsets, _take(texts.pool, answers[:, A_TEXT]), none),
        "TTLs": ac.list_array(offsets, pa.array(answers[:, A_TTL].astype(np.float64)), none),
        "rejected": bools(hr & (((rcode != 0) & (R[:, N_QD] == 0)) | (
            (R[:, N_Q0] >= 0) & (R[:, N_AN] == 0) & (R[:, N_NS] == 0) & (R[:, N_AR] == 0)))),
        "opcode": _numbers(opcode, header, pa.uint8()),
        "opcode_name": _OPCODE_NAMES.of(opcode + 16 * L[:, N_NETBIOS], header),
        "malformed": bools(own | (hq & (Q[:, N_MALFORMED] == 1)) | (hr & (R[:, N_MALFORMED] == 1))),
        "flags_raw": _numbers(np.where(own, F[:, N_FLAGS], np.where(hr, R[:, N_FLAGS], Q[:, N_FLAGS])), header,
                              pa.uint16()),
        "query_flags": _numbers(Q[:, N_FLAGS], hq, pa.uint16()),
        "response_flags": _numbers(R[:, N_FLAGS], hr, pa.uint16()),
        "response_ts": _numbers(R[:, N_TS], hr, pa.timestamp("ns")),
        "query_packet": _numbers(Q[:, N_PACKET], hq & (Q[:, N_PACKET] != 0), pa.int64()),
        "response_packet": _numbers(R[:, N_PACKET], hr & (R[:, N_PACKET] != 0), pa.int64()),
        "query_original": _take(texts.pool, original, original >= 0),
        "answer_records": answer_records,
        "authority_records": authority_records,
    }


COMPACT_AFTER = 4096  # messages of closed sessions the book keeps at most (unless as many live ones)
# per session in the book: first message seen, roles flipped, multicast, NetBIOS, the ports as the
# stage gave them, its messages in the book
B_SEEN, B_FLIPPED, B_MULTICAST, B_NETBIOS, B_ORIG_P, B_RESP_P, B_MESSAGES = range(7)
B_FIELDS = 7
# a finished transaction waiting for its session to close: its session, query, response, first message
D_SID, D_Q, D_R, D_FIRST = range(4)


class DnsBook:
    """The batch path's state of every DNS session at once, as columns: in the stage's `states`
    each DNS session's value is this one object. Per session (by sid, sorted): what DnsSession
    keeps of it (`state`, B_* columns). The messages of the open sessions (`num`, N_* columns,
    and their texts' `sources`); the transactions finished (`done`, D_* columns, in the order
    they finished); the messages pending (queries waiting for their responses, lone
    responses): where each waits (dns_kernel.T_*), the order of its transaction id among those
    queued and its own, as pair_messages hands them back."""

    def __init__(self):
        self.sids = np.zeros(0, dtype=np.int64)
        self.state = np.zeros((0, B_FIELDS), dtype=np.int64)
        self.flipped: dict[int, tuple] = {}  # sid -> (orig_h, orig_p, resp_h, resp_p) of a flipped session
        self.num = np.zeros((1024, N_FIELDS), dtype=np.int64)
        self.n = 0       # messages in `num`
        self.dead = 0    # ... of closed sessions
        self.sources: dict[int, _Source] = {}
        self.next_source = 0
        self.done = np.zeros((0, 4), dtype=np.int64)
        self.e_sid = np.zeros(0, dtype=np.int64)
        self.e_table = np.zeros(0, dtype=np.int64)
        self.e_keyseq = np.zeros(0, dtype=np.int64)
        self.e_seq = np.zeros(0, dtype=np.int64)
        self.e_msg = np.zeros(0, dtype=np.int64)
        self.clock = 0

    def source(self, source: _Source) -> int:
        self.sources[self.next_source] = source
        self.next_source += 1
        return self.next_source - 1

    def append(self, num: np.ndarray) -> int:
        """Messages in; returns the number of the first."""
        if self.n + len(num) > len(self.num):
            bigger = np.zeros((2 * (self.n + len(num)), N_FIELDS), dtype=np.int64)
            bigger[:self.n] = self.num[:self.n]
            self.num = bigger
        self.num[self.n:self.n + len(num)] = num
        self.n += len(num)
        return self.n - len(num)

    def sessions(self, sids: np.ndarray, first: np.ndarray, ends: Endpoints, states: dict) -> np.ndarray:
        """Where the sessions `sids` (sorted, distinct) are in `state`, new ones added (and put
        in `states`) with their ports and multicast flag from `ends` at their datagram `first`."""
        at = np.searchsorted(self.sids, sids)
        known = at < len(self.sids)
        known[known] = self.sids[at[known]] == sids[known]
        if not known.all():
            new = sids[~known].tolist()
            rows = np.zeros((len(new), B_FIELDS), dtype=np.int64)
            j = first[~known]
            rows[:, B_MULTICAST] = ends.resp_multicast(j)
            rows[:, B_ORIG_P] = ends.orig_p[j]
            rows[:, B_RESP_P] = ends.resp_p[j]
            rows[:, B_NETBIOS] = (rows[:, B_ORIG_P] == NETBIOS_PORT) | (rows[:, B_RESP_P] == NETBIOS_PORT)
            all_sids = np.concatenate([self.sids, sids[~known]])
            order = np.argsort(all_sids, kind="stable")
            self.sids, self.state = all_sids[order], np.concatenate([self.state, rows])[order]
            states.update(dict.fromkeys(new, self))
            at = np.searchsorted(self.sids, sids)
        return at

    def close(self, sids: np.ndarray) -> Records | list:
        """The rows of the sessions `sids`: their finished transactions, then what they still
        have waiting (DnsSession.close: the pending query, then the queues of queries, then
        those of responses, each in the order of its ids); and the sessions forgotten."""
        sids = np.sort(sids)
        done = _among(self.done[:, D_SID], sids)
        closing = _among(self.e_sid, sids)
        try:
            return self._rows(done, closing)
        finally:  # the sessions are forgotten even when making their rows failed (a bug): no leak
            self._forget(sids, done, closing)

    def _rows(self, done: np.ndarray, closing: np.ndarray) -> Records | list:
        """close's rows: the finished transactions `done` (in the order they finished), then the
        waiting entries `closing`, each session's together, the sessions in the order of their
        first message, as sessions closed one by one give them. (Not in session id order: ids
        are random from one run to the next, and the same capture gave its rows in another
        order each time.)"""
        at = np.flatnonzero(closing)
        keyseq = np.where(self.e_table == K.T_PENDING, 0, self.e_keyseq)
        at = at[np.lexsort((self.e_seq[at], keyseq[at], self.e_table[at], self._first_messages(self.e_sid[at])))]
        msg, table = self.e_msg[at], self.e_table[at]
        rows = np.concatenate([self.done[done], np.stack([self.e_sid[at], np.where(table != K.T_REPLIES, msg, -1),
                                                          np.where(table == K.T_REPLIES, msg, -1), msg], axis=1)])
        if not len(rows):
            return []
        num = self.num[:self.n]
        first = rows[:, D_FIRST]
        cols = _transactions(num, self.sources, rows[:, D_Q], rows[:, D_R], first)
        flipped = num[first, N_FLIPPED] == 1
        if flipped.any():  # a flipped session's roles, in its rows made after the flip (the others: the stage's)
            which, at = np.unique(rows[flipped, D_SID], return_inverse=True)
            where = np.zeros(len(rows), dtype=np.int64)
            where[flipped] = at.reshape(-1)
            tuples = list(zip(*(self.flipped[s] for s in which.tolist())))
            for k, (name, type) in enumerate((("orig_h", pa.string()), ("orig_p", pa.uint16()),
                                              ("resp_h", pa.string()), ("resp_p", pa.uint16()))):
                cols[name] = _take(pa.array(tuples[k], type), where, flipped)
        return Records(pa.table(cols), rows[:, D_SID].copy())

    def _first_messages(self, sids: np.ndarray) -> np.ndarray:
        """For each of `sids` (sessions with messages), the number of its first message: a
        session's messages are kept until it closes, and numbered in the order they came."""
        of = self.num[:self.n, N_SID]
        distinct = np.unique(sids)
        mine = np.flatnonzero(_among(of, distinct))
        _, first = np.unique(of[mine], return_index=True)  # (ascending: the first is the least)
        return mine[first][np.searchsorted(distinct, sids)]

    def _forget(self, sids: np.ndarray, done: np.ndarray, closing: np.ndarray) -> None:
        """Drop closed sessions `sids`: their finished transactions `done`, waiting entries
        `closing`, their state; their messages are dead (compacted away when many)."""
        self.done = self.done[~done]
        keep = np.flatnonzero(~closing)
        self.e_sid, self.e_table, self.e_keyseq, self.e_seq, self.e_msg = (
            self.e_sid[keep], self.e_table[keep], self.e_keyseq[keep], self.e_seq[keep], self.e_msg[keep])
        gone = _among(self.sids, sids)
        if gone.any():
            for s in self.sids[gone & (self.state[:, B_FLIPPED] == 1)].tolist():
                self.flipped.pop(s, None)
            self.dead += int(self.state[gone, B_MESSAGES].sum())
            self.sids, self.state = self.sids[~gone], self.state[~gone]
        if self.dead > max(self.n - self.dead, COMPACT_AFTER):
            self.compact()

    def compact(self) -> None:
        """The messages of closed sessions dropped, those left with their texts in one source
        of their own (a long session keeps no other session's texts)."""
        live = np.flatnonzero(_among(self.num[:self.n, N_SID], self.sids))
        renumber = np.full(self.n + 1, -1, dtype=np.int64)  # (-1 stays -1: the last one)
        renumber[live] = np.arange(len(live))
        num = self.num[live]
        if len(live):
            num, source = _texts(self.sources, num)
            num, source = _own_texts(source, num)
            self.sources = {}
            num[:, N_SOURCE] = self.source(source)
        else:
            self.sources = {}
        self.num = np.zeros((max(1024, 2 * len(live)), N_FIELDS), dtype=np.int64)
        self.n = self.dead = 0
        self.append(num)
        self.done[:, D_Q:] = renumber[self.done[:, D_Q:]]
        self.e_msg = renumber[self.e_msg]


def _book_of(states: dict) -> DnsBook:
    book = next(iter(states.values()), None)
    return book if isinstance(book, DnsBook) else DnsBook()


def add_datagrams(states: dict, b: DatagramBatch) -> tuple[list, int]:
    """The stage's batch entry point: a batch's DNS datagrams paired into transactions, as
    DnsSession.add would pair them one by one (see the section's comment); their rows come from
    close_sessions. `states` is this module's {sid: state}, where every DNS session's state is
    the one DnsBook. Returns ([], parser errors)."""
    m = len(b.sid)
    if m == 0:
        return [], 0
    book = _book_of(states)
    sessions, first, sess = np.unique(b.sid, return_index=True, return_inverse=True)
    sess = sess.reshape(-1)
    rows_of = book.sessions(sessions, first, b.ends, states)
    info = book.state[rows_of]  # (a copy: the sessions as they were before this batch)
    data = b.data
    starts = np.ascontiguousarray(b.start, dtype=np.int64)
    ends = np.ascontiguousarray(b.end, dtype=np.int64)
    short = ends - starts < 12
    tid = np.zeros(m, dtype=np.int64)
    flags = np.zeros(m, dtype=np.int64)
    if not short.all():
        s0 = starts[~short]
        tid[~short] = (data[s0].astype(np.int64) << 8) | data[s0 + 1]
        flags[~short] = (data[s0 + 2].astype(np.int64) << 8) | data[s0 + 3]
    opcode = (flags >> 11) & 0xF
    response = (flags & 0x8000) != 0
    kind = np.where(short | ~_TRACKED_OPCODE[opcode], K.KIND_OWN,
                    np.where(response, K.KIND_RESPONSE, K.KIND_QUERY))
    # A session whose first message (with a header) is a response sent by its originator has its
    # roles the wrong way round: DnsSession flips them there (the message itself was parsed before).
    multicast = info[:, B_MULTICAST] == 1
    flip_at = np.full(len(sessions), m)
    unseen = np.flatnonzero(~short & (info[sess, B_SEEN] == 0))
    if len(unseen):
        seen, at = np.unique(sess[unseen], return_index=True)
        j = unseen[at]
        flips = response[j] & b.from_orig[j] & ~multicast[seen]
        flip_at[seen[flips]] = j[flips]
        rows = rows_of[seen]
        book.state[rows, B_SEEN] = 1
        book.state[rows[flips], B_FLIPPED] = 1
        if flips.any():
            at = j[flips]
            orig_h, resp_h = b.ends.texts(at)
            for s, oh, op, rh, rp in zip(sessions[seen[flips]].tolist(), orig_h, b.ends.orig_p[at].tolist(),
                                         resp_h, b.ends.resp_p[at].tolist()):
                book.flipped[s] = (rh, rp, oh, op)
    j = np.arange(m)
    was = info[sess, B_FLIPPED] == 1
    flipped = was | (j >= flip_at[sess])
    orig_p, resp_p = info[sess, B_ORIG_P], info[sess, B_RESP_P]
    resp_nb = np.where(was | (j > flip_at[sess]), orig_p, resp_p) == NETBIOS_PORT  # the server port when parsed
    names_nb = np.where(flipped, orig_p, resp_p) == NETBIOS_PORT                    # ... when applied
    netbios = info[sess, B_NETBIOS] == 1
    try:
        parsed = K.parse_messages(data, starts, ends, netbios, resp_nb)
    except Exception:  # noqa: BLE001 - a kernel bug must not cost the batch: Python reads them all
        parsed = (np.full((m, K.M_FIELDS), K.FALLBACK, dtype=np.int64), np.zeros((0, K.Q_FIELDS), dtype=np.int64),
                  np.zeros((0, K.R_FIELDS), dtype=np.int64), np.zeros(0, dtype=np.uint8), np.zeros(1, dtype=np.int32))
    num = np.zeros((m, N_FIELDS), dtype=np.int64)
    num[:, N_SOURCE] = book.source(_kernel_messages(data, starts, parsed, names_nb, num))
    num[:, N_SID] = b.sid
    num[:, N_TS] = b.ts
    num[:, N_SHORT] = short
    num[:, N_PACKET] = b.packet
    num[:, N_FLIPPED] = flipped
    num[:, N_NETBIOS] = netbios
    num[:, N_TID] = tid  # (the header's, also for messages left to Python)
    num[:, N_FLAGS] = flags
    left = np.flatnonzero((parsed[0][:, K.M_STATUS] != K.OK) & (kind != K.KIND_OWN))
    errors = 0
    if len(left):
        source, failed = _python_messages(left, data, starts, ends, netbios, resp_nb, names_nb, num)
        num[left, N_SOURCE] = book.source(source)
        kind[failed] = K.KIND_SKIP
        errors = len(failed)
    num[:, N_MALFORMED] |= b.truncated
    base = book.append(num)
    book.state[rows_of, B_MESSAGES] += np.bincount(sess, minlength=len(sessions))
    # pair them, with the messages still pending in these sessions: the kernel numbers the
    # pending ones of these sessions (`held`) first, then the batch's
    held = np.flatnonzero(_among(book.e_sid, sessions))
    e_msg = book.e_msg[held]
    (q, r, first, row_sess, o_sess, o_table, o_keyseq, o_seq, _, o_msg, book.clock) = K.pair_messages(
        sess.astype(np.int64), kind.astype(np.int64), tid, multicast, np.searchsorted(sessions, book.e_sid[held]),
        book.e_table[held], book.e_keyseq[held], book.e_seq[held], book.num[e_msg, N_TID], book.clock)
    renumber = np.concatenate([e_msg, base + j, [-1]])  # (-1 stays -1: the last one)
    book.done = np.concatenate([book.done, np.stack([sessions[row_sess], renumber[q], renumber[r], renumber[first]],
                                                    axis=1)])
    keep = np.ones(len(book.e_sid), dtype=bool)
    keep[held] = False
    book.e_sid = np.concatenate([book.e_sid[keep], sessions[o_sess]])
    book.e_table = np.concatenate([book.e_table[keep], o_table])
    book.e_keyseq = np.concatenate([book.e_keyseq[keep], o_keyseq])
    book.e_seq = np.concatenate([book.e_seq[keep], o_seq])
    book.e_msg = np.concatenate([book.e_msg[keep], renumber[o_msg]])
    return [], errors


def close_sessions(states: dict, sids: np.ndarray) -> Records | list:
    """The stage's batch close: the rows of the sessions `sids` (DnsSession's rows from add and
    close, in that order), their states popped from `states`."""
    book = None
    for s in sids.tolist():
        state = states.pop(s, None)
        if state is not None:
            book = state
    if not isinstance(book, DnsBook):
        return []
    return book.close(np.asarray(sids, dtype=np.int64))


def parse_datagram(d: Datagram) -> list[dict]:
    """One datagram on its own (no pairing): the row Zeek would log for it if it stayed alone."""
    try:
        s = DnsSession.for_datagram(d)
        s.multicast = True  # every message its own row
        return s.add(d)
    except Exception:  # noqa: BLE001
        return [dict(_BLANK, uid=d.uid, ts=d.ts, orig_h=d.orig_h, orig_p=d.orig_p, resp_h=d.resp_h,
                     resp_p=d.resp_p, proto="udp", malformed=True)]


def _starts_message(data: bytes, pos: int, end: int) -> bool:
    """A DNS-over-TCP message seems to start at pos (Suricata's probe): its length prefix
    covers a header; a whole message parses, and one cut short by `end` has a header whose
    record counts fit in the length."""
    if pos + 2 + _HEADER.size > end:
        return False
    ln = (data[pos] << 8) | data[pos + 1]
    if ln < _HEADER.size:
        return False
    if pos + 2 + ln <= end:
        return not parse_message(bytes(data[pos + 2:pos + 2 + ln])).malformed
    _, _, qd, an, ns, ar = _HEADER.unpack_from(data, pos + 2)
    return 2 * (qd + an + ns + ar) <= ln


def _runs_between_gaps(d) -> list[tuple[int, bytes]]:
    """(data offset, bytes) of a direction's stretches whose length prefixes can be followed:
    up to the first gap, then after each gap from the first packet that starts a message (as
    Suricata, which after a gap resumes on data that probes as DNS, and drops what does not)."""
    data = d.data
    gaps = sorted(off for off, n in (d.gaps or []) if n > 0)
    if not gaps:
        return [(0, data)]
    runs = [(0, data[:gaps[0]])]
    packet_starts = sorted(set(int(o) for o in d.ts_offsets))
    for g, end in zip(gaps, gaps[1:] + [len(data)]):
        for pos in [g] + [b for b in packet_starts if g < b < end]:
            if _starts_message(data, pos, end):
                runs.append((pos, data[pos:end]))
                break
    return runs


def parse_stream(s: Stream) -> list[dict]:
    """DNS over TCP: both directions' messages in time order, paired into transactions."""
    names = set(s.app.split(".")) if s.app else set()
    if names & {"NetBIOS", "SMBv1", "SMBv23"} and not names & {"DNS", "MDNS", "LLMNR"}:
        return []  # NetBIOS over TCP is its session service (SMB), not name service messages
    sess = DnsSession(s.uid, s.orig_h, s.orig_p, s.resp_h, s.resp_p, "tcp")
    msgs = []
    for k, d in enumerate((s.orig, s.resp)):
        for start, data in _runs_between_gaps(d):
            for m in parse_tcp_messages(data):
                m.offset += start
                msgs.append((d.time_at(m.offset), k, m))
    msgs.sort(key=lambda t: (t[0], t[1]))
    rows = []
    for ts, k, m in msgs:
        rows += sess.add_message(m, ts, k == 0)
    rows += sess.close()
    return rows


def new_session(d: Datagram) -> DnsSession:
    """The application stage's per-session state (see app.base)."""
    return DnsSession.for_datagram(d)
