"""HTTP/1.x transactions as Zeek's http.log: one row per request/response pair.

Both reassembled directions are cut into messages (start line, header block, body) with bytes
methods and regular expressions only; bodies are skipped by length arithmetic (Content-Length,
chunk sizes, or the rest of the stream), never walked byte by byte.

Semantics follow Zeek's HTTP analyzer and base/protocols/http scripts:
- requests and final responses pair in order (pipelining); a 1xx other than 101 fills
  info_code/info_msg and the request keeps waiting; a response with no request is logged
  with the request fields null; a request with no response is logged too;
- `version` is the response's, null without a response (Zeek sets it in http_reply only; the
  request's version rides along in memory as `_request_version`); a request line without
  "HTTP/" is HTTP/0.9, whose response has no status line: the whole rest of the stream is its
  body, status_code 0, status_msg "<empty>" and version "0.9";
- a request line is parsed like Zeek's ParseRequest: a token method, whitespace, then the
  URI runs up to the whitespace before the first "HTTP/"; `uri` is logged percent-decoded
  (Zeek logs the unescaped URI); an empty reason phrase is logged as "<empty>";
- no body after HEAD, 1xx, 204 and 304; CONNECT answered 2xx and 101 Switching Protocols end
  the parse of both directions (what follows is a tunnel); other bodies are delimited by
  Transfer-Encoding: chunked, Content-Length, or (responses) the end of the stream;
- body lengths count what Zeek counts: the de-chunked entity after content decoding -- Zeek
  inflates gzip/x-gzip/deflate bodies and counts the inflated bytes (its x-gzip and
  missing-zlib-header baselines show this), so we inflate to count too (zlib, streamed,
  nothing kept, counting stops at 64 MiB); a body with a gap or one that does not inflate
  counts its de-chunked wire length;
- missing bytes (reassembly gaps) inside a body are counted as body bytes and in
  `gap_bytes`; a gap inside a start line, header block or chunk header loses the message
  framing: parsing resumes at the next request line (or status line) after the gap, the
  message is flagged `malformed`, and from then on responses pair with requests by time
  (the latest unanswered request sent no later than the response) instead of by order;
- mime types are sniffed from the first bytes of each body (de-chunked and inflated), as
  Zeek's file analysis does (app.magic: it says text/plain where a header says
  application/x-javascript, image/gif where a server called a GIF image/png); for
  multipart/form-data requests each file part is sniffed. The Content-Type headers' media
  types (lower-cased) are kept apart, in request_content_type and response_content_type;
- filenames: a Content-Disposition `filename` (or `filename*`) from the message headers or,
  for multipart requests, from its parts; failing that, for a response whose Content-Type is
  file-like (application/* other than the web-page types json, javascript, xml, form data...)
  the last path segment of the request URI when it has an extension. Zeek only uses
  Content-Disposition, so the second rule adds names Zeek leaves out;
- proxied: Zeek's proxy headers (Forwarded, X-Forwarded-For, X-Forwarded-From, Client-IP,
  Via, XRoxy-Connection, Proxy-Connection) as "NAME -> value".

Credentials: `Authorization: Basic` (and `Proxy-Authorization: Basic`) gives `username` and a
`credential(ts, "http", "basic auth", user, password)` row (the password is split at the first
colon, as Zeek does); a urlencoded POST body with a password-like field (pass, password, passwd,
pwd, ...) gives a `credential(ts, "http", "form field <name>", user, password)` row, the user
from a user-like field (user, username, login, email, ...); a JSON request body (an object
with such string members) gives "json field <name>" the same way.

Nothing raises: malformed input sets `malformed` and keeps what was read.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import zlib
from bisect import bisect_left
from urllib.parse import parse_qsl

import pyarrow as pa

from wiretrail.app.base import SESSION_COLUMNS, Direction, Stream
from wiretrail.app.credentials import credential
from wiretrail.app.magic import HEAD_BYTES, sniff

TABLE = "http"
# ts: the request's time (the response's when there is no request)
HEADERS_TYPE = pa.list_(pa.struct([("name", pa.string()), ("value", pa.string())]))
# Bounds of the stored header lists: a real message has a few dozen headers; the cuts are at
# what Suricata's EVE logs of a name and a value (255 and 2047 bytes) with room to spare.
MAX_HEADERS = 128
MAX_HEADER_NAME = 256
MAX_HEADER_VALUE = 4096

SCHEMA = pa.schema([
    *SESSION_COLUMNS,
    ("trans_depth", pa.int32()),                # 1, 2, ... per transaction in the session
    ("method", pa.string()),
    ("host", pa.string()),
    ("uri", pa.string()),                       # percent-decoded, as Zeek logs it
    ("referrer", pa.string()),
    ("version", pa.string()),                   # the response's ("0.9" for a 0.9 exchange), as Zeek
    ("user_agent", pa.string()),
    ("origin", pa.string()),
    ("request_body_len", pa.int64()),
    ("response_body_len", pa.int64()),
    ("status_code", pa.int32()),
    ("status_msg", pa.string()),
    ("status_string", pa.string()),             # the status as sent when it is not a number (Suricata's)
    ("info_code", pa.int32()),                  # last 1xx before the final response
    ("info_msg", pa.string()),
    ("tags", pa.list_(pa.string())),
    ("username", pa.string()),                  # basic auth user
    ("proxied", pa.list_(pa.string())),         # "HEADER -> value" for proxy headers
    ("orig_filenames", pa.list_(pa.string())),
    ("resp_filenames", pa.list_(pa.string())),
    ("orig_mime_types", pa.list_(pa.string())),  # sniffed from the body's first bytes, as Zeek (app.magic)
    ("resp_mime_types", pa.list_(pa.string())),
    ("request_content_type", pa.string()),      # the Content-Type header's media type, lower-cased
    ("response_content_type", pa.string()),
    ("xff", pa.string()),                       # X-Forwarded-For
    ("request_content_encoding", pa.string()),
    ("response_content_encoding", pa.string()),
    ("response_transfer_encoding", pa.string()),
    ("request_chunked", pa.bool_()),
    ("response_chunked", pa.bool_()),
    ("malformed", pa.bool_()),
    ("gap_bytes", pa.int64()),                  # bytes missing from this transaction's messages
    # every header of each message as sent (names' case and order kept, repeats apart; folded
    # lines joined), the first MAX_HEADERS, names and values cut at MAX_HEADER_NAME / _VALUE
    ("request_headers", HEADERS_TYPE),
    ("response_headers", HEADERS_TYPE),
])
PORTS = {80, 81, 591, 3128, 5985, 8000, 8008, 8080, 8081, 8088, 8118, 8888, 8880, 9080}
NDPI = {"HTTP", "HTTP_Proxy", "HTTP_Connect"}

INFLATE_CAP = 64 << 20     # stop counting inflated bytes past this (decompression bombs)
FORM_BODY_MAX = 64 << 10   # login forms are small: larger bodies are not searched for credentials

KNOWN_METHODS = frozenset(b"""GET POST HEAD PUT DELETE OPTIONS TRACE CONNECT PATCH PROPFIND PROPPATCH
MKCOL COPY MOVE LOCK UNLOCK SEARCH REPORT MKACTIVITY CHECKOUT MERGE NOTIFY SUBSCRIBE UNSUBSCRIBE
M-SEARCH PURGE LINK UNLINK BPROPFIND BCOPY BDELETE BMOVE POLL RPC_IN_DATA RPC_OUT_DATA
CCM_POST VERSION-CONTROL BASELINE-CONTROL ACL ORDERPATCH MKWORKSPACE UPDATE LABEL""".split())

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z{}]+")
_URICHARS = re.compile(rb"[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=%]*")
_HDR_END = re.compile(rb"\n\r?\n")
_VERSION = re.compile(rb"\s*(\d{1,3})\.?(\d{0,3})")
_REQ_SYNC = re.compile(rb"(?:^|\n)([A-Z][A-Za-z0-9_\-]{0,23}[ \t]+[^\s]+[ \t]+HTTP/\d\.\d\r?\n)")
_RESP_SYNC = re.compile(rb"(?:^|\n)(HTTP/\d\.\d[ \t]+\d{3}\b)")
# the same start lines where a gap ends (the bytes before them are missing, not a line end)
_STARTS_AT = {_REQ_SYNC: re.compile(_REQ_SYNC.pattern.removeprefix(rb"(?:^|\n)")),
              _RESP_SYNC: re.compile(_RESP_SYNC.pattern.removeprefix(rb"(?:^|\n)"))}
_CRLFS = re.compile(rb"[\r\n]+")
_PCT = re.compile(rb"%([0-9A-Fa-f]{2})")
_CD_FILENAME = re.compile(r"""filename\*?\s*=\s*(?:[\w!#$&+.^`|~-]*'[^']*')?("([^"]*)"|[^;\s]+)""", re.I)
_BOUNDARY = re.compile(r"""boundary\s*=\s*("([^"]+)"|[^;\s]+)""", re.I)
_PASS_FIELD = re.compile(r"(?i)(pass|pwd|passwd|password|passcode|pword|secret|pin)$|^(pass|pwd)")
_USER_FIELD = re.compile(r"(?i)(user|usr|login|email|e-mail|mail|uname|account|acct|userid|username|name|uid|logon)$"
                         r"|^(user|login|email|uname|log)")

PROXY_HEADERS = ("forwarded", "x-forwarded-for", "x-forwarded-from", "client-ip", "via", "xroxy-connection",
                 "proxy-connection")
_PROXY_SET = frozenset(PROXY_HEADERS)
_WEB_APP_TYPES = frozenset(("json", "javascript", "x-javascript", "ecmascript", "xml", "xhtml+xml",
                            "x-www-form-urlencoded", "soap+xml", "rss+xml", "atom+xml", "ld+json",
                            "ocsp-request", "ocsp-response", "grpc", "x-protobuf", "csp-report",
                            "dns-message", "problem+json", "manifest+json", "vnd.api+json"))


def _s(b: bytes | None) -> str | None:
    if b is None:
        return None
    return b.decode("utf-8", "backslashreplace")


def _parse_version(b: bytes) -> str | None:
    m = _VERSION.match(b)
    if not m:
        return None
    return f"{int(m.group(1))}.{int(m.group(2) or b'0')}"


# what nearly every start line says, read once here (a match and an f-string cost a microsecond,
# two or three times per session)
_COMMON_VERSIONS = {v: _parse_version(v) for v in (b"1.1", b"1.0")}


def _version(b: bytes) -> str | None:
    v = _COMMON_VERSIONS.get(b)
    return v if v is not None else _parse_version(b)


def _unescape_uri(b: bytes) -> bytes:
    if b"%" not in b:
        return b
    return _PCT.sub(lambda m: bytes([int(m.group(1), 16)]), b)


def _media_type(ct: str | None) -> str | None:
    if not ct:
        return None
    t = ct.split(";", 1)[0].strip().lower()
    return t or None


# ---- one direction, with its gaps ---------------------------------------------------------------


class _Dir:
    def __init__(self, d: Direction):
        self.data = d.data
        self.n = len(d.data)
        if d.gaps:
            gaps = sorted((int(o), int(m)) for o, m in d.gaps if m > 0)
            self.goff = [o for o, _ in gaps]
            self.gsize = [m for _, m in gaps]
        else:  # most directions: nothing to sort
            self.goff, self.gsize = [], []
        self.d = d
        # the gap a parser went past to a message starting right after it: it no longer breaks
        # anything at that offset (-1: none)
        self.crossed = -1

    def time_at(self, pos: int) -> int:
        try:
            return self.d.time_at(pos)
        except Exception:
            return 0

    def gap_in(self, a: int, b: int) -> bool:
        """A gap strictly inside data[a:b] (bytes missing between two bytes of the range)."""
        if not self.goff:
            return False
        i = bisect_left(self.goff, a + 1)
        return i < len(self.goff) and self.goff[i] < b

    def gap_at(self, pos: int) -> bool:
        if not self.goff or pos == self.crossed:
            return False
        i = bisect_left(self.goff, pos)
        return i < len(self.goff) and self.goff[i] == pos

    def next_gap_after(self, pos: int) -> int:
        i = bisect_left(self.goff, pos)
        return self.goff[i] if i < len(self.goff) else -1

    def advance(self, pos: int, n: int) -> tuple[int, int, int, bool]:
        """Consume n stream bytes from data offset pos, gaps included. Returns (new pos,
        bytes consumed, of which missing, ended inside a gap)."""
        missing = taken = 0
        i = bisect_left(self.goff, pos) if self.goff else 0
        while True:
            if i < len(self.goff) and self.goff[i] - pos < n:
                g = self.goff[i]
                step = g - pos
                n -= step
                taken += step
                pos = g
                m = self.gsize[i]
                if m > n:
                    return pos, taken + n, missing + n, True
                n -= m
                taken += m
                missing += m
                i += 1
            else:
                step = min(n, self.n - pos)
                return pos + step, taken + step, missing, False

    def remaining(self, pos: int) -> tuple[int, int]:
        """Stream bytes from pos to the end of the data (gaps included) and the missing part."""
        i = bisect_left(self.goff, pos) if self.goff else 0
        missing = sum(self.gsize[i:]) if self.goff else 0
        return (self.n - pos) + missing, missing


# ---- messages -------------------------------------------------------------------------------------


class _Msg:
    __slots__ = ("start", "_ts", "_dir", "line", "headers", "hlist", "body_len", "wire_len", "gap", "chunked",
                 "malformed", "method", "uri", "version", "code", "reason", "status_text", "pieces", "complete",
                 "v09", "resynced", "tunnel_from", "head", "head_done", "hfit")

    def __init__(self, start: int, ts: int | None, d: _Dir | None = None):
        self.start = start
        self._ts = ts     # None: d.time_at(start), looked up when first asked for (see ts)
        self._dir = d
        self.tunnel_from = None
        self.headers: dict[str, str] = {}
        self.hlist: list[tuple[str, str]] = []
        self.body_len = 0
        self.wire_len = 0
        self.gap = 0
        self.chunked = False
        self.malformed = False
        self.method = self.uri = self.version = self.reason = self.status_text = None
        self.code = None
        self.pieces: list[bytes] | None = None
        self.head = b""  # the body's first bytes (magic.HEAD_BYTES at most), de-chunked, up to a gap
        self.head_done = False
        self.complete = True
        self.v09 = False
        self.resynced = False
        self.hfit = False  # hlist known to be within MAX_HEADERS, MAX_HEADER_NAME and MAX_HEADER_VALUE

    @property
    def ts(self) -> int:
        """The time of the packet that carried the message's first byte. Looked up lazily: a
        response's is only read when it has no request or pairing goes by time, and the first
        lookup in a direction costs the most (Direction.time_at builds its lists)."""
        if self._ts is None:
            self._ts = self._dir.time_at(self.start)
        return self._ts


# A header line whose name is a token right before the colon (MAX_HEADER_NAME at most: a longer
# one takes the loop), and everything after the colon ("." stops only at \n, and sre runs
# through it much faster than through a character class).
_HDR_LINE = re.compile(rf"(?m)^([!#$%&'*+\-.^_`|~0-9A-Za-z{{}}]{{1,{MAX_HEADER_NAME}}}):(.*)")
_BLANKS = " \t\r\n\x0b\x0c"  # what bytes.strip() strips


def _parse_headers(block: bytes, m: _Msg) -> None:
    # Fast path (nearly every message): an ASCII block whose every line is a plain "Name: value"
    # is read by one findall on the block decoded once, instead of a split, partition, strip,
    # token check and two decodes per line (the loop took a third of parse_stream's time).
    # ASCII decodes the same as _s's UTF-8, and str.strip(_BLANKS) strips what bytes.strip()
    # does (the loop's one CR cut is inside that). A match starts at a line's start and stops at
    # its end, so as many matches as lines means every line is a plain one; anything else
    # (folding, a bad or empty line, blanks before the colon, non-ASCII bytes) takes the loop,
    # which is what defines the result.
    if block.isascii():
        text = block.decode("ascii")
        found = _HDR_LINE.findall(text)
        if len(found) == text.count("\n") + 1:
            hlist, headers = m.hlist, m.headers
            for k, v in found:
                v = v.strip(_BLANKS)
                hlist.append((k, v))
                headers[k.lower()] = v
            # names are bounded by the pattern and no value is longer than the block: the row
            # can store hlist as it is without measuring every header (see _stored_headers)
            m.hfit = len(hlist) <= MAX_HEADERS and len(text) <= MAX_HEADER_VALUE
            return
    _parse_header_lines(block, m)


def _parse_header_lines(block: bytes, m: _Msg) -> None:
    """_parse_headers line by line: any header block, folded lines and bad ones included."""
    name = None
    for raw in block.split(b"\n"):
        line = raw[:-1] if raw.endswith(b"\r") else raw
        if not line:
            continue
        if line[:1] in (b" ", b"\t"):
            if name is not None:  # obsolete line folding
                k, v = m.hlist[-1]
                v = v + " " + _s(line.strip())
                m.hlist[-1] = (k, v)
                m.headers[name] = v
            continue
        k, sep, v = line.partition(b":")
        if not sep or not k or not _TOKEN.fullmatch(k.strip()):
            m.malformed = True
            name = None
            continue
        sent = _s(k.strip())
        name = sent.lower()
        val = _s(v.strip())
        m.hlist.append((sent, val))
        m.headers[name] = val


def _request_line(line: bytes, m: _Msg) -> bool:
    t = _TOKEN.match(line)
    if not t:
        return False
    e = t.end()
    if e >= len(line) or line[e] not in b" \t":
        return False
    rest = line[e:].lstrip(b" \t").rstrip(b" \t")
    if not rest:
        return False
    m.method = _s(t.group(0))
    p = _URICHARS.match(rest).end()
    if p >= len(rest):
        if rest.startswith(b"HTTP/"):
            uri, ver = b"", rest[5:]
        else:
            uri, ver = rest, None
    else:
        i = rest.find(b"HTTP/", p)
        if i < 0:
            uri, ver = rest, None
        else:
            uri, ver = rest[:i].rstrip(b" \t"), rest[i + 5:]
    if ver is None:
        m.version, m.v09 = "0.9", True
    else:
        m.version = _version(ver)
        if m.version is None:
            m.malformed = True
    m.uri = _s(_unescape_uri(uri))
    return True


def _status_line(line: bytes, m: _Msg) -> bool:
    if not line.startswith(b"HTTP/"):
        return False
    parts = line[5:].split(None, 2)
    if not parts:
        return False
    m.version = _version(parts[0])
    if len(parts) < 2 or not parts[1][:3].isdigit():
        m.malformed = True
        m.code = 0
        m.reason = "<empty>"
        if len(parts) >= 2:
            m.status_text = _s(parts[1])  # as sent ("2XX"): Suricata's status_string
        return True
    m.code = int(parts[1][:3])
    reason = parts[2].strip() if len(parts) > 2 else b""
    m.reason = _s(reason) if reason else "<empty>"
    return True


def _read_head(d: _Dir, pos: int, is_req: bool) -> tuple[_Msg | None, int, bool]:
    """Start line and headers at pos. Returns (message or None, position after the header
    block, framing lost by a gap)."""
    data = d.data
    m = _Msg(pos, None, d)
    hm = _HDR_END.search(data, pos)
    nl = data.find(b"\n", pos)
    if nl < 0:
        first_end = head_end = body = d.n
        m.complete = False
    else:
        first_end = nl
        if hm is None:
            head_end = body = d.n
            m.complete = False
        else:
            head_end, body = hm.start(), hm.end()
    line = data[pos:first_end]
    if line.endswith(b"\r"):
        line = line[:-1]
    ok = _request_line(line, m) if is_req else _status_line(line, m)
    if not ok:
        return None, pos, False
    if is_req and m.v09 and (hm is None or d.gap_in(pos, hm.start())):
        # HTTP/0.9: a lone request line; headers only when a blank line ends them soon after
        body = first_end + 1 if nl >= 0 else d.n
        return m, body, False
    if d.gap_in(pos, min(body, d.n)):
        m.malformed = True
        return m, body, True
    if head_end > first_end:
        _parse_headers(data[first_end + 1:head_end], m)
    return m, body, False


def _read_body(d: _Dir, pos: int, m: _Msg, n: int | None, chunked: bool, keep: bool) -> tuple[int, bool]:
    """Skip a body at pos: n bytes, chunked, or (n None) to the end. Returns (new pos, framing
    lost). `keep` collects the body pieces (for inflating or form parsing) when no gap."""
    data = d.data
    pieces = [] if keep else None
    if chunked:
        m.chunked = True
        while True:
            if pos >= d.n:
                m.complete = False
                break
            if d.gap_at(pos):
                m.malformed = True
                return pos, True
            nl = data.find(b"\n", pos, pos + 1024)
            if nl < 0 or d.gap_in(pos, nl + 1):
                m.malformed = True
                if nl < 0 and d.n - pos < 1024:
                    m.complete = False
                    return d.n, False
                return pos, True
            size_s = data[pos:nl].split(b";", 1)[0].strip()
            try:
                size = int(size_s, 16)
            except ValueError:
                m.malformed = True
                return pos, True
            pos = nl + 1
            if size == 0:  # trailers up to an empty line
                while pos < d.n:
                    nl = data.find(b"\n", pos)
                    if nl < 0:
                        pos = d.n
                        break
                    empty = data[pos:nl].strip() == b""
                    pos = nl + 1
                    if empty:
                        break
                break
            if size < 0:
                m.malformed = True
                return pos, True
            new, taken, missing, lost = d.advance(pos, size)
            _grow_head(m, data, pos, new, missing)
            if pieces is not None:
                if missing:
                    pieces = None
                else:
                    pieces.append(data[pos:new])
            m.wire_len += taken
            m.gap += missing
            pos = new
            if lost:
                m.malformed = True
                return pos, True
            if taken < size:
                m.complete = False
                break
            if data.startswith(b"\r\n", pos):
                pos += 2
            elif data.startswith(b"\n", pos):
                pos += 1
            elif pos < d.n:
                m.malformed = True
    elif n is None:
        total, missing = d.remaining(pos)
        _grow_head(m, data, pos, d.n, missing)
        if pieces is not None and not missing:
            pieces.append(data[pos:])
        else:
            pieces = None
        m.wire_len, m.gap = total, missing
        pos = d.n
    elif n > 0:
        new, taken, missing, lost = d.advance(pos, n)
        _grow_head(m, data, pos, new, missing)
        if pieces is not None and not missing:
            pieces.append(data[pos:new])
        else:
            pieces = None
        m.wire_len, m.gap = taken, missing
        if taken < n:
            m.complete = False
        pos = new
        if lost:  # the body is whole (its missing bytes counted), what follows it is not
            m.body_len = m.wire_len
            return pos, True
    m.body_len = m.wire_len
    m.pieces = pieces
    return pos, False


def _grow_head(m: _Msg, data: bytes, start: int, end: int, missing: int) -> None:
    """Add body bytes data[start:end] to m.head. A piece with missing bytes ends it: where in
    the piece they were missing is not known, so what follows is not the file's next bytes."""
    if m.head_done:
        return
    if missing:
        m.head_done = True
        return
    room = HEAD_BYTES - len(m.head)
    m.head += data[start:start + min(end - start, room)]
    m.head_done = len(m.head) >= HEAD_BYTES


def _inflate(pieces: list[bytes], enc: str) -> tuple[int, bytes] | None:
    """(inflated length, its first HEAD_BYTES) of a gzip or deflate body; None if it does not
    inflate at all. Deflate is tried with a zlib header, then raw (servers send both)."""
    wbits = 47 if "gzip" in enc else 15
    for attempt in (wbits, -15) if wbits == 15 else (wbits,):
        d = zlib.decompressobj(attempt)
        total, head = 0, b""
        try:
            for p in pieces:
                buf = p
                while buf:
                    out = d.decompress(buf, 1 << 20)
                    total += len(out)
                    if len(head) < HEAD_BYTES:
                        head += out[:HEAD_BYTES - len(head)]
                    if total > INFLATE_CAP or d.eof:
                        return total, head
                    buf = d.unconsumed_tail
            out = d.flush()
            return total + len(out), (head + out)[:HEAD_BYTES]
        except zlib.error:
            if total:
                return total, head
    return None


def _content_decoded(m: _Msg) -> None:
    """An encoded body's length and first bytes as inflated (Zeek counts and sniffs those)."""
    enc = (m.headers.get("content-encoding") or "").lower()
    if m.pieces and m.wire_len and ("gzip" in enc or "deflate" in enc):
        inflated = _inflate(m.pieces, enc)
        if inflated is not None:
            m.body_len, m.head = inflated


def _body_kind(m: _Msg) -> tuple[bool, int | None]:
    te = (m.headers.get("transfer-encoding") or "").lower()
    if "chunked" in te:
        return True, None
    cl = m.headers.get("content-length")
    if cl is not None:
        try:
            n = int(cl.split(",")[0].strip())
            if n >= 0:
                return False, n
        except ValueError:
            pass
        m.malformed = True
    return False, -1


def _keep_body(m: _Msg, is_req: bool) -> bool:
    enc = (m.headers.get("content-encoding") or "").lower()
    if "gzip" in enc or "deflate" in enc:
        return True
    if is_req:
        ct = (m.headers.get("content-type") or "").lower()
        return ct.startswith(("application/x-www-form-urlencoded", "multipart/form-data", "application/json"))
    return False


# ---- the session ----------------------------------------------------------------------------------


class _Parser:
    def __init__(self, s: Stream):
        self.s = s
        self.o = _Dir(s.orig)
        self.r = _Dir(s.resp)
        self.reqs: list[_Msg] = []
        self.opos = 0
        self.odone = False
        self.oblocked = False       # the last request may open a tunnel: wait for its response
        self.by_time = False        # a request-side resync: pair responses by time
        self.tunnel = None          # (client offset, server offset, port) after a granted CONNECT

    # requests
    def _next_request(self, d, pos: int) -> None:
        """Carry on at the next thing that looks like a request after `pos` (bytes were lost
        before it), or stop reading the client's side."""
        nxt = self._resync(d, pos, _REQ_SYNC)
        if nxt < 0:
            self.odone = True
        else:
            self.opos = nxt

    def _resync(self, d: _Dir, pos: int, rx: re.Pattern, gap: bool = True) -> int:
        """Where the next message starts after framing was lost at pos: the first start line
        after the gap that broke it (the first gap at or after pos; with gap=False, after pos
        itself). Beyond pos, or at it when a start line begins right where the gap at pos
        ends (a body that ended inside the gap: the gap is then crossed), or -1."""
        g = d.next_gap_after(pos) if gap else -1
        if g >= 0 and g != d.crossed and _STARTS_AT[rx].match(d.data, g):
            d.crossed = g
            return g
        frm = g if g >= 0 else pos
        mm = rx.search(d.data, frm + 1)
        if mm is None or mm.start(1) <= pos:
            return -1
        return mm.start(1)

    def next_request(self) -> bool:
        if self.odone or self.oblocked:
            return False
        d = self.o
        while True:
            pos = self.opos
            if pos >= d.n:
                self.odone = True
                return False
            resynced = False
            if pos > 0 and d.gap_at(pos):
                resynced = True
            elif d.data[pos:pos + 1] in (b"\r", b"\n"):  # stray line ends between messages
                self.opos = _CRLFS.match(d.data, pos).end()
                continue
            m = None
            if not resynced:
                m, body, lost = _read_head(d, pos, True)
                if m is None:
                    resynced = True
                elif lost:
                    self.reqs.append(m)
                    self.by_time = True
                    self._next_request(d, pos)
                    return True
            if resynced:
                nxt = (self._resync(d, pos, _REQ_SYNC, d.gap_at(pos)) if pos > 0 or d.gap_at(pos)
                       else self._first_sync(d))
                if nxt < 0 or (nxt <= pos and nxt != d.crossed):
                    self.odone = True
                    self.bad_orig = True
                    return False
                self.by_time = True
                self.bad_orig = True
                self.opos = nxt
                continue
            break
        if m.v09:
            self.opos = body
            self.reqs.append(m)
            self.odone = True  # the response runs to the end: nothing more to pair
            return True
        chunked, n = _body_kind(m)
        if m.method == "CONNECT" or "upgrade" in m.headers:
            n = 0 if not chunked and n == -1 else n
        elif n == -1:
            n = 0
        pos, lost = _read_body(d, body, m, n, chunked, _keep_body(m, True))
        _content_decoded(m)
        self.reqs.append(m)
        if lost:
            self.by_time = True
            self._next_request(d, pos)
        else:
            self.opos = pos
        if m.method == "CONNECT" or "upgrade" in m.headers:
            self.oblocked = True
            m.tunnel_from = self.opos  # where the client's side of a granted tunnel begins
        return True

    def _first_sync(self, d: _Dir) -> int:
        mm = _REQ_SYNC.search(d.data)
        return -1 if mm is None else mm.start(1)

    def request(self, k: int) -> _Msg | None:
        while len(self.reqs) <= k and self.next_request():
            pass
        return self.reqs[k] if k < len(self.reqs) else None

    def run(self) -> list[dict]:
        self.bad_orig = False
        d = self.r
        pairs: list[list] = []   # [request index or None, response, infos]
        answered = 0             # requests paired so far (in order)
        infos: list[tuple[int, str]] = []
        pos = 0
        rdone = False
        while not rdone and pos < d.n:
            if d.data[pos:pos + 1] in (b"\r", b"\n"):
                pos += 1
                continue
            if pos > 0 and d.gap_at(pos):
                nxt = self._resync(d, pos, _RESP_SYNC)
                if nxt < 0:
                    break
                pos = nxt
                self.by_time = True
                continue
            # the request this response answers
            k = answered
            req = self.request(k)
            if req is not None and req.v09:
                m = _Msg(pos, None, d)
                m.code, m.reason, m.version = 0, "<empty>", "0.9"
                _read_body(d, pos, m, None, False, False)
                pairs.append([k, m, infos])
                answered += 1
                break
            m, body, lost = _read_head(d, pos, False)
            if m is None:
                nxt = self._resync(d, pos, _RESP_SYNC, False) if pos > 0 else self._resp_first_sync(d)
                if nxt < 0 or nxt <= pos:
                    break
                pos = nxt
                self.by_time = True
                continue
            if self.by_time:
                # the latest unanswered request sent no later than the response
                req = None
                j = answered
                while True:
                    cand = self.request(j)
                    if cand is None or cand.ts > m.ts:
                        break
                    req, j = cand, j + 1
                if req is not None:
                    answered = j - 1
            k = answered if req is not None else None
            if lost:
                pairs.append([k, m, infos])
                infos = []
                if k is not None:
                    answered += 1
                nxt = self._resync(d, pos, _RESP_SYNC)
                if nxt < 0:
                    break
                pos = nxt
                continue
            code = m.code or 0
            method = req.method if req is not None else None
            if 100 <= code < 200 and code != 101:
                infos = infos + [(code, m.reason)]
                pos = body
                continue
            tunnel = (method == "CONNECT" and 200 <= code < 300) or code == 101
            if method == "HEAD" or code in (204, 304) or 100 <= code < 200 or tunnel:
                npos = body
                lost2 = False
            else:
                chunked, n = _body_kind(m)
                npos, lost2 = _read_body(d, body, m, None if n == -1 else n, chunked, _keep_body(m, False))
                _content_decoded(m)
            pairs.append([k, m, infos])
            infos = []
            if k is not None:
                answered += 1
                if self.oblocked and k == len(self.reqs) - 1:
                    if tunnel:
                        self.odone = True
                    self.oblocked = False
            if tunnel:
                rdone = True
                self.odone = True
                if req is not None and method == "CONNECT":
                    port = req.uri.rsplit(":", 1)[-1] if req.uri else ""
                    if port.isdigit() and getattr(req, "tunnel_from", None) is not None:
                        # the proxied connection, for the stage to parse as its own protocol
                        self.tunnel = (req.tunnel_from, npos, int(port))
                break
            if lost2:
                nxt = self._resync(d, npos, _RESP_SYNC)
                if nxt < 0:
                    break
                self.by_time = True
                pos = nxt
                continue
            pos = npos
        if infos:  # 1xx with no final response
            pairs.append([answered if self.request(answered) is not None else None, None, infos])
            if pairs[-1][0] is not None:
                answered += 1
        # requests never answered
        self.oblocked = False
        while self.next_request():
            pass
        paired = {p[0] for p in pairs if p[0] is not None}
        for i in range(len(self.reqs)):
            if i not in paired:
                pairs.append([i, None, []])
        pairs.sort(key=lambda p: (p[0] if p[0] is not None else 1 << 60,
                                  p[1].start if p[1] is not None else 0))
        # responses without a request go where their time puts them
        with_req = [p for p in pairs if p[0] is not None]
        no_req = [p for p in pairs if p[0] is None]
        merged = with_req
        for p in no_req:
            t = p[1].ts
            i = 0
            while i < len(merged) and _pair_ts(self, merged[i]) <= t:
                i += 1
            merged.insert(i, p)
        rows = []
        for depth, (k, resp, inf) in enumerate(merged, 1):
            rows.extend(self._row(depth, self.reqs[k] if k is not None else None, resp, inf))
        if self.tunnel is not None:
            connect = [r for r in rows if r.get("method") == "CONNECT"]
            if connect:
                connect[-1]["_inner"] = self.tunnel
        return rows

    def _resp_first_sync(self, d: _Dir) -> int:
        mm = _RESP_SYNC.search(d.data)
        return -1 if mm is None else mm.start(1)

    def _row(self, depth: int, req: _Msg | None, resp: _Msg | None, infos) -> list[dict]:
        s = self.s
        out = []
        ts = req.ts if req is not None else (resp.ts if resp is not None else 0)
        row = {"ts": ts, "uid": s.uid, "orig_h": s.orig_h, "orig_p": s.orig_p, "resp_h": s.resp_h,
               "resp_p": s.resp_p, "trans_depth": depth, "tags": [], "request_body_len": 0,
               "response_body_len": 0, "malformed": False, "gap_bytes": 0, "proxied": None}
        if req is None and self.bad_orig:
            row["malformed"] = True
        # the fields one by one rather than by row.update(**fields): no keyword dict built per row
        if req is not None:
            h = req.headers
            row["method"] = req.method
            row["uri"] = req.uri
            row["_request_version"] = req.version
            row["host"] = h.get("host")
            row["referrer"] = h.get("referer")
            row["user_agent"] = h.get("user-agent")
            row["origin"] = h.get("origin")
            row["request_body_len"] = req.body_len
            row["xff"] = h.get("x-forwarded-for")
            row["request_content_encoding"] = h.get("content-encoding")
            row["request_chunked"] = req.chunked
            row["request_content_type"] = _media_type(h.get("content-type"))
            row["malformed"] = row["malformed"] or req.malformed
            row["gap_bytes"] += req.gap
            row["request_headers"] = _stored_headers(req.hlist, req.hfit)
            # headers' keys are the lower-cased names of hlist: most requests have no proxy
            # header, and one set operation says so without lower-casing every name again
            if not _PROXY_SET.isdisjoint(h):
                row["proxied"] = [f"{k.upper()} -> {v}" for k, v in req.hlist if k.lower() in _PROXY_SET] or None
            if req.body_len:
                names, types = _entity_files(req, True, None)
                row["orig_filenames"] = names or None
                row["orig_mime_types"] = types or None
            for hk in ("authorization", "proxy-authorization"):
                auth = h.get(hk)
                if auth and auth[:6].lower() == "basic ":
                    user, pw = _basic(auth[6:])
                    if user is not None:
                        if hk == "authorization" or row.get("username") is None:
                            row["username"] = user
                        out.append(credential(ts, "http", "basic auth", user, pw))
            if req.pieces and req.method == "POST":
                out.extend(_form_credentials(req, ts))
        if resp is not None:
            h = resp.headers
            row["version"] = resp.version
            row["status_code"] = resp.code
            row["status_msg"] = resp.reason
            row["status_string"] = resp.status_text
            row["response_body_len"] = resp.body_len
            row["response_content_encoding"] = h.get("content-encoding")
            row["response_transfer_encoding"] = h.get("transfer-encoding")
            row["response_chunked"] = resp.chunked
            row["response_content_type"] = _media_type(h.get("content-type"))
            row["malformed"] = row["malformed"] or resp.malformed
            row["gap_bytes"] += resp.gap
            row["response_headers"] = _stored_headers(resp.hlist, resp.hfit)
            if resp.body_len:
                names, types = _entity_files(resp, False, req)
                row["resp_filenames"] = names or None
                row["resp_mime_types"] = types or None
        if infos:
            row["info_code"], row["info_msg"] = infos[-1]
        out.insert(0, row)
        return out


def _stored_headers(hlist: list[tuple[str, str]], fit: bool = False) -> list[tuple[str, str]] | None:
    """A message's headers for its row (name, value pairs: Arrow takes tuples for its structs);
    `fit`: already known to be within the bounds."""
    if not hlist:
        return None
    if fit:
        return hlist
    if len(hlist) <= MAX_HEADERS and all(len(k) <= MAX_HEADER_NAME and len(v) <= MAX_HEADER_VALUE
                                         for k, v in hlist):
        return hlist
    return [(k[:MAX_HEADER_NAME], v[:MAX_HEADER_VALUE]) for k, v in hlist[:MAX_HEADERS]]


def _pair_ts(p: _Parser, pair) -> int:
    k, resp, _ = pair
    if k is not None:
        return p.reqs[k].ts
    return resp.ts if resp is not None else 0


def _basic(b64: str) -> tuple[str | None, str | None]:
    try:
        raw = base64.b64decode(b64.strip() + "==", validate=False)
    except (binascii.Error, ValueError):
        return None, None
    user, sep, pw = raw.partition(b":")
    if not sep:
        return _s(raw), None
    return _s(user), _s(pw)


def _filename_of(cd: str | None) -> str | None:
    if not cd:
        return None
    m = _CD_FILENAME.search(cd)
    if not m:
        return None
    v = m.group(2) if m.group(2) is not None else m.group(1)
    if "%" in v and "*" in cd[m.start():m.start() + 10]:
        try:
            from urllib.parse import unquote
            v = unquote(v)
        except Exception:
            pass
    return v or None


def _entity_files(m: _Msg, is_req: bool, req: _Msg | None) -> tuple[list[str], list[str]]:
    h = m.headers
    names, types = [], []
    ct = h.get("content-type")
    mt = _media_type(ct)
    if is_req and mt == "multipart/form-data" and m.pieces:
        bm = _BOUNDARY.search(ct or "")
        if bm:
            boundary = (bm.group(2) or bm.group(1)).encode("latin-1", "replace")
            body = b"".join(m.pieces)[:1 << 20]
            for part in body.split(b"--" + boundary)[1:]:
                he = _HDR_END.search(part)
                if part.startswith(b"--") or he is None:
                    continue
                pm = _Msg(0, 0)
                _parse_headers(part[:he.start()], pm)
                fn = _filename_of(pm.headers.get("content-disposition"))
                if fn:
                    names.append(fn)
                # the part's content from its header block's end to the next boundary
                pt = sniff(part[he.end():he.end() + HEAD_BYTES]) if fn is not None else None
                if pt:
                    types.append(pt)
            if names or types:
                return names, types
    fn = _filename_of(h.get("content-disposition"))
    if fn:
        names.append(fn)
    elif not is_req and req is not None and req.uri and mt and mt.startswith("application/") \
            and mt.split("/", 1)[1] not in _WEB_APP_TYPES:
        last = req.uri.split("?", 1)[0].rsplit("/", 1)[-1]
        if "." in last.strip("."):
            names.append(last)
    sniffed = sniff(m.head)
    if sniffed:
        types.append(sniffed)
    return names, types


def _form_credentials(req: _Msg, ts: int) -> list[dict]:
    ct = (req.headers.get("content-type") or "").lower()
    if req.wire_len > FORM_BODY_MAX:
        return []
    body = b"".join(req.pieces or [])
    kind = "form"
    if ct.startswith("application/x-www-form-urlencoded"):
        try:
            fields = parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True, max_num_fields=200)
        except ValueError:
            return []
    elif ct.startswith("application/json") or ct.endswith("+json"):
        try:
            doc = json.loads(body)
        except (ValueError, RecursionError):
            return []
        if not isinstance(doc, dict):
            return []
        fields = [(k, v) for k, v in doc.items() if isinstance(v, str)]
        kind = "json"
    else:
        return []
    pw = [(k, v) for k, v in fields if _PASS_FIELD.search(k.strip()) and not _USER_FIELD.search(k.strip())]
    if not pw:
        return []
    user = next((v for k, v in fields if _USER_FIELD.search(k.strip()) and not _PASS_FIELD.search(k.strip())),
                None)
    return [credential(ts, "http", f"{kind} field {k}", user, v) for k, v in pw if v]


def _looks_like_http(s: Stream) -> bool:
    # empty lines before a start line are allowed (RFC 9112 2.2): look past them
    o, r = s.orig.data[:8192].lstrip(b"\r\n"), s.resp.data[:64].lstrip(b"\r\n")
    if r.startswith(b"HTTP/"):
        return True
    nl = o.find(b"\n", 0, 8192)
    line = o[:nl if nl >= 0 else 8192].rstrip(b"\r")
    t = _TOKEN.match(line)
    if not t or t.end() >= len(line) or line[t.end()] not in b" \t":
        return False
    return b" HTTP/" in line or b"\tHTTP/" in line or t.group(0).upper() in KNOWN_METHODS


def parse_stream(s: Stream) -> list[dict]:
    """The http rows of a session (plus credentials rows), [] when it is not HTTP."""
    try:
        if not _looks_like_http(s):
            return []
        p = _Parser(s)
        return p.run()
    except Exception:  # a parser bug must not lose the session silently: flag it
        return [{"ts": 0, "uid": s.uid, "orig_h": s.orig_h, "orig_p": s.orig_p, "resp_h": s.resp_h,
                 "resp_p": s.resp_p, "trans_depth": 1, "malformed": True}]
