"""The byte work of app/tls.py in numba: records, handshake messages, hellos, certificate lists.

`handshake` reads both directions of a session in one call: per direction it finds the
start of TLS, walks the record layer up to the first gap, joins the handshake records'
bodies and frames the messages in them; it parses the ClientHello, the ServerHello and
HelloRetryRequest, the Certificate lists and the ServerKeyExchange curve, and notes what
`established`, the row's time and its log packet depend on. `handshakes` runs it on many
sessions and returns what app/tls.py makes the rows of as columns (the hellos' lists and
texts, fingerprint keys and certificates numbered by content). `client_hello` and
`server_hello` parse one hello body: `handshake` calls them, and app/tls.py calls them for
hellos found elsewhere (QUIC's CRYPTO frames).

Results are int64 arrays: a fixed header (the offsets below) then variable-length lists.
Byte strings (session ids, SNI, ALPN values, certificates) are (start, end) positions in the
buffer their message was read from (for `handshake`, the joined handshake bytes it returns).
Each call returns as few arrays as it can: making one for Python costs about a microsecond.
What malformed input does (where a read stops, what it keeps, what sets `malformed`) is what
app/tls.py's parser did in Python before.
"""

from __future__ import annotations

import numpy as np

from wiretrail.bytes_kernels import be16, be24, memmove_intrinsic
from wiretrail.jit import kernel, numba_hook

CT_CCS, CT_ALERT, CT_HANDSHAKE, CT_APPDATA, CT_HEARTBEAT = 20, 21, 22, 23, 24
MAX_RECORD = (1 << 14) + 2048
SCAN_LIMIT = 1 << 16       # how far into a stream to look for the start of TLS (STARTTLS)
APP_RECORDS_READ = 4       # a direction's record layer is walked up to its 4th application-data record
MAX_HANDSHAKE = 1 << 20    # handshake bytes kept per direction

# SHA-256("HelloRetryRequest"): the ServerHello random of a HelloRetryRequest (RFC 8446 4.1.3).
HRR_RANDOM = bytes.fromhex("cf21ad74e59a6111be1d8c021e65b891c2a211167abb8c5e079e09e2c8a8339c")
_HRR_RANDOM = np.frombuffer(HRR_RANDOM, dtype=np.uint8)

# client_hello's result: header, then the lists in the order of their counts (ALPN values
# as (start, end) pairs). Positions not read are (0, 0), an SNI not seen (-1, -1).
CH_MALFORMED, CH_VERSION, CH_SESSION_ID, CH_SNI = 0, 1, 2, 4
CH_N_CIPHERS, CH_N_EXTENSIONS, CH_N_GROUPS, CH_N_POINT_FORMATS, CH_N_SIG_ALGS, CH_N_VERSIONS, CH_N_ALPN = range(6, 13)
CH_VALUES = 13

# server_hello's result: header (-1: not present), then the extension types.
(SH_MALFORMED, SH_VERSION, SH_SESSION_ID, SH_CIPHER, SH_SELECTED_VERSION, SH_KEY_SHARE_GROUP, SH_PSK,
 SH_ALPN, SH_HRR, SH_N_EXTENSIONS) = 0, 1, 2, 4, 5, 6, 7, 8, 10, 11
SH_VALUES = 12

# handshake's result. LOGGED: a row results (TLS found, and a hello or something malformed).
# TS: time of the first record (the earlier side's, 0 if none). VERSION: the negotiated
# version, -1 without a hello. ALERT: the alert code logged (-1: none). SKE_GROUP: the named
# curve of the first ServerKeyExchange (-1: none). SERVER_CERT_END: end of the record
# completing the server's Certificate message when its chain is not empty; SERVER_APP_END:
# end of the server's first application-data record; CLIENT_DONE_END: end of the client's
# first ChangeCipherSpec or application-data record, whichever came first (-1: none).
# SERVER_CERTS / CLIENT_CERTS: certificates in that side's Certificate message, -1 if it sent
# none; *_CERTS_TIME: the message's time. From CERTS on, each certificate as a (start, end)
# pair, the server's first (read only before TLS 1.3, when LOGGED). Then the fields of the
# ClientHello, ServerHello and HelloRetryRequest, each where the (start, end) pair at
# CLIENT_HELLO, SERVER_HELLO, RETRY_REQUEST says ((-1, -1): none).
(LOGGED, MALFORMED, TLS13, TS, VERSION, ALERT, SKE_GROUP, ESTABLISHED, SERVER_CERT_END, SERVER_APP_END,
 CLIENT_DONE_END, SERVER_CERTS, SERVER_CERTS_TIME, CLIENT_CERTS, CLIENT_CERTS_TIME) = range(15)
CLIENT_HELLO, SERVER_HELLO, RETRY_REQUEST = 15, 17, 19
CERTS = 21

# A hello's list longer than this (a real one has a few dozen values; a forged one can carry
# thousands) is stored cut, to keep rows small.
MAX_HELLO_LIST = 1024

# handshakes' header per session: handshake's result up to CLIENT_HELLO, then what the rows take
# from the hellos. H_CLIENT_HELLO: a ClientHello was read (H_CLIENT_VERSION: its version).
# H_HELLO: 1 a ServerHello, 2 only a HelloRetryRequest, 0 neither; H_HELLO_VERSION and
# H_HELLO_CIPHER are that hello's (-1: none). H_KEY_SHARE_GROUP: the ServerHello's (-1: none).
# H_RESUMED: as the `resumed` column. H_SNI, H_NEXT_PROTOCOL: present; H_N_ALPN: the client's
# ALPN values. H_JA3, H_JA4, H_JA3S: the number of the session's distinct fingerprint key (see
# handshakes; -1: no such hello). H_NOT_ASCII: bits NOT_ASCII_* set where a text has a byte
# above 0x7f.
(H_CLIENT_HELLO, H_CLIENT_VERSION, H_HELLO, H_HELLO_VERSION, H_HELLO_CIPHER, H_KEY_SHARE_GROUP, H_RESUMED, H_SNI,
 H_NEXT_PROTOCOL, H_N_ALPN, H_JA3, H_JA4, H_JA3S, H_NOT_ASCII) = range(CLIENT_HELLO, CLIENT_HELLO + 14)
N_HEAD = CLIENT_HELLO + 14
NOT_ASCII_SNI, NOT_ASCII_NEXT_PROTOCOL, NOT_ASCII_ALPN = 1, 2, 4

# handshakes' offsets: per row, where each session's values begin (n + 1 columns). The hello
# lists (as stored: at most MAX_HELLO_LIST values), the SNI and next-protocol bytes, the
# ALPN values (a count: their bytes are where the ALPN offsets say) and the certificates.
(AT_CIPHERS, AT_EXTENSIONS, AT_SIG_ALGS, AT_VERSIONS, AT_SERVER_EXTENSIONS, AT_SNI, AT_NEXT_PROTOCOL, AT_ALPN,
 AT_CERTS) = range(9)


@numba_hook
def _define_intrinsics() -> None:
    """The memmove the kernels call (bytes_kernels.memmove_intrinsic), bound when numba compiles."""
    global _memmove
    _memmove = memmove_intrinsic()


@kernel(inline=True)
def _vec(b, p, end, width):
    """(start, stop) of the vector at b[p:] whose length is the big-endian `width`-byte (1 or 2)
    field there; stop is -1 when it does not fit before `end`."""
    if p + width > end:
        return p, -1
    ln = np.int64(b[p]) if width == 1 else be16(b, p)
    p += width
    if p + ln > end:
        return p, -1
    return p, p + ln


@kernel(allocates=True)
def client_hello(b, start, end):
    """A ClientHello body b[start:end] (after the 4-byte handshake header): see CH_*."""
    n = end - start
    out = np.empty(CH_VALUES + 2 * n + 2, dtype=np.int64)  # the values are written in order
    out[:CH_VALUES] = 0
    out[CH_SNI] = -1
    out[CH_SNI + 1] = -1
    if n < 2:
        out[CH_MALFORMED] = 1
        return out[:CH_VALUES]
    out[CH_VERSION] = be16(b, start)
    w = CH_VALUES
    a, p = _vec(b, start + 34, end, 1)
    if p < 0:
        out[CH_MALFORMED] = 1
        return out[:w]
    out[CH_SESSION_ID] = a
    out[CH_SESSION_ID + 1] = p
    a, p = _vec(b, p, end, 2)
    if p < 0:
        out[CH_MALFORMED] = 1
        return out[:w]
    k = (p - a) // 2
    for i in range(k):
        out[w + i] = be16(b, a + 2 * i)
    w += k
    out[CH_N_CIPHERS] = k
    if (p - a) & 1:  # an odd byte left over
        out[CH_MALFORMED] = 1
    _, p = _vec(b, p, end, 1)  # compression methods
    if p < 0:
        out[CH_MALFORMED] = 1
        return out[:w]
    if p == end:
        return out[:w]
    p, ext_end = _vec(b, p, end, 2)
    if ext_end < 0:
        out[CH_MALFORMED] = 1
        return out[:w]
    # the extensions' types in order (GREASE included), up to one that does not fit; their
    # bodies' positions kept for the lists below
    cap = (ext_end - p) // 4 + 1
    ext_start = np.empty(cap, dtype=np.int64)
    ext_stop = np.empty(cap, dtype=np.int64)
    count = 0
    while p < ext_end:
        if p + 4 > ext_end or p + 4 + be16(b, p + 2) > ext_end:
            out[CH_MALFORMED] = 1
            break
        out[w + count] = be16(b, p)
        ext_start[count] = p + 4
        ext_stop[count] = p + 4 + be16(b, p + 2)
        p = ext_stop[count]
        count += 1
    types = out[w:w + count].copy()
    w += count
    out[CH_N_EXTENSIONS] = count
    # supported_groups, ec_point_formats, signature_algorithms, supported_versions: their
    # values, extension by extension (a list that does not fit adds nothing; an odd last byte
    # of a 16-bit list is ignored)
    for et, field, width in ((10, CH_N_GROUPS, 2), (11, CH_N_POINT_FORMATS, 1), (13, CH_N_SIG_ALGS, 2),
                             (43, CH_N_VERSIONS, 1)):
        first = w
        for i in range(count):
            if types[i] != et:
                continue
            a, stop = _vec(b, ext_start[i], ext_stop[i], width)
            if stop < 0:
                out[CH_MALFORMED] = 1
                continue
            if et == 11:  # bytes
                for j in range(a, stop):
                    out[w] = b[j]
                    w += 1
            else:
                for j in range((stop - a) // 2):
                    out[w] = be16(b, a + 2 * j)
                    w += 1
        out[field] = w - first
    # server_name (the first host_name entry) and ALPN (every value): lists with a 16-bit
    # length; an entry that does not fit ends its extension, what came before it stays
    first = w
    for i in range(count):
        et = types[i]
        if et != 0 and et != 16:
            continue
        p, stop = _vec(b, ext_start[i], ext_stop[i], 2)
        if stop < 0:
            out[CH_MALFORMED] = 1
            continue
        while p < stop:
            if et == 0:
                name_type = b[p]
                a, p = _vec(b, p + 1, stop, 2)
                if p < 0:
                    out[CH_MALFORMED] = 1
                    break
                if name_type == 0 and out[CH_SNI] < 0:
                    out[CH_SNI] = a
                    out[CH_SNI + 1] = p
            else:
                a, p = _vec(b, p, stop, 1)
                if p < 0:
                    out[CH_MALFORMED] = 1
                    break
                out[w] = a
                out[w + 1] = p
                w += 2
    out[CH_N_ALPN] = (w - first) // 2
    return out[:w]


@kernel(allocates=True)
def server_hello(b, start, end):
    """A ServerHello (or HelloRetryRequest) body b[start:end]: see SH_*."""
    n = end - start
    out = np.zeros(SH_VALUES + n // 4 + 1, dtype=np.int64)
    out[SH_CIPHER:SH_PSK] = -1  # cipher, selected version, key share group: not seen
    out[SH_ALPN] = -1
    out[SH_ALPN + 1] = -1
    if n < 2:
        out[SH_MALFORMED] = 1
        return out[:SH_VALUES]
    version = be16(b, start)
    out[SH_VERSION] = version
    if n < 34:
        out[SH_MALFORMED] = 1
        return out[:SH_VALUES]
    hrr = True
    for i in range(32):
        if b[start + 2 + i] != _HRR_RANDOM[i]:
            hrr = False
            break
    out[SH_HRR] = hrr
    if version >> 8 == 0x7F and (version & 0xFF) < 22:
        # TLS 1.3 drafts before 22: no session id, no compression
        if n < 36:
            out[SH_MALFORMED] = 1
            return out[:SH_VALUES]
        out[SH_CIPHER] = be16(b, start + 34)
        p = start + 36
    else:
        a, p = _vec(b, start + 34, end, 1)
        if p < 0:
            out[SH_MALFORMED] = 1
            return out[:SH_VALUES]
        out[SH_SESSION_ID] = a
        out[SH_SESSION_ID + 1] = p
        if p + 2 > end:
            out[SH_MALFORMED] = 1
            return out[:SH_VALUES]
        out[SH_CIPHER] = be16(b, p)
        if p + 3 > end:  # compression
            out[SH_MALFORMED] = 1
            return out[:SH_VALUES]
        p += 3
    if p == end:
        return out[:SH_VALUES]
    p, ext_end = _vec(b, p, end, 2)
    if ext_end < 0:
        out[SH_MALFORMED] = 1
        return out[:SH_VALUES]
    w = SH_VALUES
    while p < ext_end:
        if p + 4 > ext_end or p + 4 + be16(b, p + 2) > ext_end:
            out[SH_MALFORMED] = 1
            break
        et = be16(b, p)
        a = p + 4
        stop = a + be16(b, p + 2)
        out[w] = et
        w += 1
        if et == 43 or et == 51:  # supported_versions, key_share: the first 16 bits
            if stop - a >= 2:
                out[SH_SELECTED_VERSION if et == 43 else SH_KEY_SHARE_GROUP] = be16(b, a)
        elif et == 41:  # pre_shared_key
            out[SH_PSK] = 1
        elif et == 16:  # ALPN: a list with a 16-bit length holding one value
            q, list_end = _vec(b, a, stop, 2)
            if list_end < 0:
                out[SH_MALFORMED] = 1
            elif q < list_end:
                q, value_end = _vec(b, q, list_end, 1)
                if value_end < 0:
                    out[SH_MALFORMED] = 1
                else:
                    out[SH_ALPN] = q
                    out[SH_ALPN + 1] = value_end
        p = stop
    out[SH_N_EXTENSIONS] = w - SH_VALUES
    return out[:w]


@kernel(inline=True)
def _valid_record(content_type, major, minor, length):
    """A record header TLS accepts (one rule for `_walk` and the record watcher, which must
    agree record for record)."""
    return CT_CCS <= content_type <= CT_HEARTBEAT and major == 3 and minor <= 4 and length <= MAX_RECORD


@kernel(inline=True)
def _valid_header(d, p):
    return p + 5 <= d.shape[0] and _valid_record(d[p], d[p + 1], d[p + 2], be16(d, p + 3))


@kernel(inline=True)
def _find_start(d, limit, hs_type):
    """Offset of the first record that opens a handshake with a message of hs_type, or -1
    (a valid record header at offset 0 is the start, whatever it holds)."""
    if _valid_header(d, 0):
        return 0
    end = min(limit, SCAN_LIMIT)
    for p in range(end - 1):
        if d[p] == CT_HANDSHAKE and d[p + 1] == 3 and _valid_header(d, p) and p + 5 < d.shape[0] \
                and d[p + 5] == hs_type:
            return p
    return -1


@kernel(inline=True)
def _walk(d, limit, hs_type):
    """One direction's record layer, d[:limit] (limit: the first gap). Returns (found,
    malformed, first record, first ChangeCipherSpec, its end, first application-data record,
    its end, first handshake/application-data/alert record after the ChangeCipherSpec, the
    code of the last 2-byte alert before it, handshake record offsets, their count, how many
    of them came before the ChangeCipherSpec); records by offset, -1: none."""
    first = ccs = ccs_end = app = app_end = post_ccs = alert = -1
    handshakes = np.empty(16, dtype=np.int64)
    n_hs = 0
    n_before_ccs = -1
    found = malformed = False
    p = _find_start(d, limit, hs_type)
    if p >= 0:
        found = True
        encrypted = 0
        while p + 5 <= limit:
            ct = d[p]
            ln = be16(d, p + 3)
            if not _valid_record(ct, d[p + 1], d[p + 2], ln):
                # After ChangeCipherSpec the framing is the peers' business (GridFTP, for one,
                # drops TLS after the handshake); before it, a bad header is malformed TLS.
                if ccs < 0:
                    malformed = True
                break
            e = p + 5 + ln
            if e > limit:
                break  # cut by a gap or the end of the stream
            if first < 0:
                first = p
            if ccs >= 0 and post_ccs < 0 and (ct == CT_HANDSHAKE or ct == CT_APPDATA or ct == CT_ALERT):
                post_ccs = p
            if ct == CT_HANDSHAKE:
                if n_hs == handshakes.shape[0]:
                    grown = np.empty(2 * n_hs, dtype=np.int64)
                    grown[:n_hs] = handshakes
                    handshakes = grown
                handshakes[n_hs] = p
                n_hs += 1
            elif ct == CT_APPDATA:
                if app < 0:
                    app = p
                    app_end = e
                encrypted += 1
                if encrypted >= APP_RECORDS_READ:
                    break  # the handshake is over; the rest is ciphertext
            elif ct == CT_CCS:
                if ccs < 0:
                    ccs = p
                    ccs_end = e
                    n_before_ccs = n_hs
            elif ct == CT_ALERT:
                if ccs < 0 and ln == 2:
                    alert = np.int64(d[p + 6])
            p = e
    if n_before_ccs < 0:
        n_before_ccs = n_hs
    return (found, malformed, first, ccs, ccs_end, app, app_end, post_ccs, alert, handshakes, n_hs,
            n_before_ccs)


# The record watcher: the reassembler (app/reassembly.py) runs it on each direction's bytes as
# they come in order, to learn where `_walk` will stop reading (the end of the 4th
# application-data record) before the rest arrives: a session whose parsers read only the
# handshake then keeps no more (Suricata, likewise, stops reassembling a TLS session once it
# is encrypted). Its state is N_WATCH int64 columns of the caller's side row, from column w:
# W_AT the stream offset of the next byte (-1: stopped: a gap, something that is not TLS at
# offset 0 or after, or the end found), W_HEADER the bytes of a record header read so far
# and W_HEADER_LEN their count, W_BODY the bytes left of the current record's body, W_TYPE its
# content type, W_APP the application-data records passed, W_END where `_walk` stops (-1: not
# known). It accepts what `_walk` accepts, record for record: where they would differ (no
# valid record at offset 0, where `_find_start` scans on) it stops and no end is known.
W_AT, W_HEADER, W_HEADER_LEN, W_BODY, W_TYPE, W_APP, W_END = range(7)
N_WATCH = 7


@kernel(inline=True)
def watch_reset(S, s, w):
    S[s, w + W_AT] = 0
    S[s, w + W_HEADER] = 0
    S[s, w + W_HEADER_LEN] = 0
    S[s, w + W_BODY] = 0
    S[s, w + W_TYPE] = 0
    S[s, w + W_APP] = 0
    S[s, w + W_END] = -1


@kernel(inline=True)
def watch_records(S, s, w, data, p, rel, n):
    """Advance the watcher of side row s over data[p:p + n], the bytes at stream offset rel
    kept for it (first copies: bytes before W_AT were seen already)."""
    at = S[s, w + W_AT]
    if at < 0:
        return
    if rel > at:  # a gap: what follows it is not walked
        S[s, w + W_AT] = -1
        return
    q = p + (at - rel)
    end = p + n
    if q >= end:  # a retransmission
        return
    header, header_len, body = S[s, w + W_HEADER], S[s, w + W_HEADER_LEN], S[s, w + W_BODY]
    record_type, app = S[s, w + W_TYPE], S[s, w + W_APP]
    while q < end:
        complete = False
        if body > 0:
            take = min(body, end - q)
            body -= take
            q += take
            complete = body == 0
        else:
            header |= np.int64(data[q]) << (8 * header_len)
            header_len += 1
            q += 1
            if header_len == 5:
                record_type = header & 0xFF
                length = ((header >> 24) & 0xFF) << 8 | ((header >> 32) & 0xFF)
                if not _valid_record(record_type, (header >> 8) & 0xFF, (header >> 16) & 0xFF, length):
                    S[s, w + W_AT] = -1
                    return
                header = header_len = 0
                body = length
                complete = body == 0
        if complete and record_type == CT_APPDATA:
            app += 1
            if app >= APP_RECORDS_READ:
                S[s, w + W_END] = rel + (q - p)
                S[s, w + W_AT] = -1
                return
    S[s, w + W_AT] = rel + n
    S[s, w + W_HEADER] = header
    S[s, w + W_HEADER_LEN] = header_len
    S[s, w + W_BODY] = body
    S[s, w + W_TYPE] = record_type
    S[s, w + W_APP] = app


@kernel(inline=True)
def _handshake_bytes(d, handshakes, n_hs, n_before_ccs):
    """How much of a direction's handshake records is read: the records up to the first that
    takes their bodies past MAX_HANDSHAKE. Returns (their count, where each one's body begins
    once the bodies are joined (one more entry: the total), the length of the part before the
    ChangeCipherSpec)."""
    total = 0
    n = 0
    while n < n_hs:
        total += be16(d, handshakes[n] + 3)
        n += 1
        if total > MAX_HANDSHAKE:
            break
    at = np.empty(n + 1, dtype=np.int64)
    pos = 0
    for i in range(n):
        at[i] = pos
        pos += be16(d, handshakes[i] + 3)
    at[n] = pos
    return n, at, at[min(n_before_ccs, n)]


@kernel(inline=True)
def _join(buf, base, d, handshakes, at, n):
    """Copy the bodies of the first n handshake records of d to buf[base:] (certificate chains
    are most of the bytes: memmoves, not numba's byte-by-byte slice copy)."""
    for i in range(n):
        _memmove(buf, base + at[i], d, handshakes[i] + 5, at[i + 1] - at[i])


@kernel(inline=True)
def _message(buf, p, n):
    """(type, body start, body end) of the handshake message at buf[p:n]; end -1 when it does
    not fit."""
    if p + 4 > n:
        return 0, p, -1
    e = p + 4 + be24(buf, p + 1)
    if e > n:
        return 0, p, -1
    return np.int64(buf[p]), p + 4, e


@kernel(inline=True)
def _find_message(buf, p, n, msg_type):
    """(body start, body end) of the first message of msg_type among those framed from buf[p]
    up to n; end -1 if none."""
    while True:
        mt, a, e = _message(buf, p, n)
        if e < 0 or mt == msg_type:
            return a, e
        p = e


@kernel(inline=True)
def _records_of(d, handshakes, at, n, header, end):
    """(offset of the record holding the joined bodies' byte `header`, end of the record holding
    byte end - 1): where a message whose header starts at `header` and whose body ends at `end`
    came from, of a direction whose first n handshake records were joined."""
    k = 0
    while k + 1 < n and at[k + 1] <= header:
        k += 1
    last = k
    while last + 1 < n and at[last + 1] < end:
        last += 1
    return handshakes[k], handshakes[last] + 5 + be16(d, handshakes[last] + 3)


@kernel(inline=True)
def _time_at(offsets, ts, offset):
    """Time of the packet that carried stream byte `offset` (as Direction.time_at)."""
    if ts.shape[0] == 0:
        return np.int64(0)
    lo, hi = 0, offsets.shape[0]
    while lo < hi:  # bisect_right
        mid = (lo + hi) // 2
        if offset < offsets[mid]:
            hi = mid
        else:
            lo = mid + 1
    return ts[min(max(lo - 1, 0), ts.shape[0] - 1)]  # within ts, whatever the arrays hold


@kernel(inline=True)
def _cert_list(buf, a, e, out, w):
    """The certificates of a Certificate body buf[a:e] (before TLS 1.3) as (start, end) pairs
    written to out[w:]: (count, new w, malformed); what was read before a break is kept."""
    if a + 3 > e:
        return 0, w, True
    end = a + 3 + be24(buf, a)
    if end > e:
        return 0, w, True
    p = a + 3
    count = 0
    while p < end:
        if p + 3 > end:
            return count, w, True
        q = p + 3 + be24(buf, p)
        if q > end:
            return count, w, True
        out[w] = p + 3
        out[w + 1] = q
        w += 2
        count += 1
        p = q
    return count, w, False


@kernel(inline=True)
def _append_fields(out, w, field, fields):
    """Put a hello's fields at out[w:], where out[field:field + 2] says; the new w."""
    if fields.shape[0]:
        out[field] = w
        out[w:w + fields.shape[0]] = fields
        w += fields.shape[0]
        out[field + 1] = w
    return w


@kernel(allocates=True)
def handshake(c_data, c_limit, c_offsets, c_ts, s_data, s_limit, s_offsets, s_ts):
    """Both directions of a session: the client's (c_) and the server's (s_) bytes, how far
    they go before their first gap, and their packet times (Direction.ts_offsets, .ts).
    Returns (the result described above, the handshake bytes read: the client's then the
    server's, which the result's positions index)."""
    (c_found, c_malformed, c_first, c_ccs, c_ccs_end, c_app, c_app_end, c_post_ccs, c_alert,
     c_handshakes, c_n_hs, c_n_before) = _walk(c_data, c_limit, 1)
    (s_found, s_malformed, s_first, s_ccs, s_ccs_end, s_app, s_app_end, s_post_ccs, s_alert,
     s_handshakes, s_n_hs, s_n_before) = _walk(s_data, s_limit, 2)
    c_n, c_at, c_before = _handshake_bytes(c_data, c_handshakes, c_n_hs, c_n_before)
    s_n, s_at, s_before = _handshake_bytes(s_data, s_handshakes, s_n_hs, s_n_before)
    s_base = c_at[c_n]  # the server's bytes follow the client's
    buf = np.empty(s_base + s_at[s_n], dtype=np.uint8)
    _join(buf, 0, c_data, c_handshakes, c_at, c_n)
    _join(buf, s_base, s_data, s_handshakes, s_at, s_n)
    malformed = c_malformed or s_malformed

    # The ServerHello: the first hello that is not the first HelloRetryRequest, among all the
    # server's handshake messages (past its ChangeCipherSpec too: the version the hello selects
    # decides which of the others are plaintext).
    sh = np.empty(0, dtype=np.int64)
    hrr = np.empty(0, dtype=np.int64)
    p = s_base
    while True:
        mt, a, e = _message(buf, p, buf.shape[0])
        if e < 0:
            break
        if mt == 2:
            hello = server_hello(buf, a, e)
            malformed |= hello[SH_MALFORMED] != 0
            if hello[SH_HRR] and hrr.shape[0] == 0:
                hrr = hello
            else:
                sh = hello
                break
        p = e
    hello = sh if sh.shape[0] else hrr
    version = -1
    if hello.shape[0]:
        version = hello[SH_SELECTED_VERSION] if hello[SH_SELECTED_VERSION] > 0 else hello[SH_VERSION]
    tls13 = version >= 0 and (version == 0x0304 or version >> 8 == 0x7F or version >> 8 == 0x7E
                              or version >> 8 == 0xFB)
    # before TLS 1.3 what follows a ChangeCipherSpec is encrypted
    c_end = s_base if tls13 else c_before
    s_end = buf.shape[0] if tls13 else s_base + s_before

    ch = np.empty(0, dtype=np.int64)
    a, e = _find_message(buf, 0, c_end, 1)
    if e >= 0:
        ch = client_hello(buf, a, e)
        malformed |= ch[CH_MALFORMED] != 0

    # where the certificates are (Certificate messages before TLS 1.3, of a logged session)
    logged = (c_found or s_found) and (ch.shape[0] > 0 or hello.shape[0] > 0 or malformed)
    s_cert_a = s_cert_e = c_cert_a = c_cert_e = -1
    if logged and not tls13:
        s_cert_a, s_cert_e = _find_message(buf, s_base, s_end, 11)
        c_cert_a, c_cert_e = _find_message(buf, 0, c_end, 11)
    cert_room = 2 * (max(s_cert_e - s_cert_a, 0) // 3 + max(c_cert_e - c_cert_a, 0) // 3)
    out = np.empty(CERTS + cert_room + ch.shape[0] + sh.shape[0] + hrr.shape[0], dtype=np.int64)
    out[:CERTS] = -1  # what follows is written in order
    w = CERTS
    if s_cert_e >= 0:
        count, w, bad = _cert_list(buf, s_cert_a, s_cert_e, out, w)
        malformed |= bad
        first_record, end_record = _records_of(s_data, s_handshakes, s_at, s_n, s_cert_a - 4 - s_base,
                                               s_cert_e - s_base)
        out[SERVER_CERTS] = count
        out[SERVER_CERTS_TIME] = _time_at(s_offsets, s_ts, first_record)
        if count:
            out[SERVER_CERT_END] = end_record
    if c_cert_e >= 0:
        count, w, bad = _cert_list(buf, c_cert_a, c_cert_e, out, w)
        malformed |= bad
        first_record, _ = _records_of(c_data, c_handshakes, c_at, c_n, c_cert_a - 4, c_cert_e)
        out[CLIENT_CERTS] = count
        out[CLIENT_CERTS_TIME] = _time_at(c_offsets, c_ts, first_record)
    if logged and not tls13:  # the first ServerKeyExchange for a named curve
        p = s_base
        while True:
            mt, a, e = _message(buf, p, s_end)
            if e < 0:
                break
            if mt == 12 and e - a >= 3 and buf[a] == 3:
                out[SKE_GROUP] = be16(buf, a + 1)
                break
            p = e
    w = _append_fields(out, w, CLIENT_HELLO, ch)
    w = _append_fields(out, w, SERVER_HELLO, sh)
    w = _append_fields(out, w, RETRY_REQUEST, hrr)

    ts = np.int64(0)
    if c_first >= 0:
        ts = _time_at(c_offsets, c_ts, c_first)
    if s_first >= 0:
        t = _time_at(s_offsets, s_ts, s_first)
        if t != 0 and (ts == 0 or t < ts):
            ts = t
    established = False
    if tls13:  # application data from both sides after the hello
        established = hello.shape[0] > 0 and c_app >= 0 and s_app >= 0
    elif c_ccs >= 0 and s_ccs >= 0:
        # both sent ChangeCipherSpec, and a record followed (on its side) the later of the two
        if c_post_ccs >= 0 and s_post_ccs >= 0:
            established = True
        elif c_post_ccs >= 0 or s_post_ccs >= 0:
            later = max(_time_at(c_offsets, c_ts, c_ccs), _time_at(s_offsets, s_ts, s_ccs))
            if c_post_ccs >= 0:
                established = _time_at(c_offsets, c_ts, c_post_ccs) >= later
            else:
                established = _time_at(s_offsets, s_ts, s_post_ccs) >= later

    out[LOGGED] = logged
    out[MALFORMED] = malformed
    out[TLS13] = tls13
    out[TS] = ts
    out[VERSION] = version
    out[ALERT] = s_alert if s_alert >= 0 else c_alert
    out[ESTABLISHED] = established
    out[SERVER_APP_END] = s_app_end
    out[CLIENT_DONE_END] = c_ccs_end if c_ccs >= 0 and (c_app < 0 or c_ccs < c_app) else c_app_end
    return out[:w], buf


@kernel(inline=True)
def _grown(a, used, need):
    """A copy of a's first `used` values with room for `need` more (twice as large at least)."""
    bigger = np.empty(max(2 * a.shape[0], used + need), dtype=a.dtype)
    bigger[:used] = a[:used]
    return bigger


# Outputs grow where they are written: `if w + k > a.shape[0]: a = _grown(a, w, k)`, so that
# the common case assigns no array (numba counts references on every array assignment, and
# that counting was a quarter of this kernel's time).


@kernel(inline=True)
def _copy(dst, w, src, a, k):
    """dst[w:w + k] = src[a:a + k], without the views a slice makes."""
    for j in range(k):
        dst[w + j] = src[a + j]


@kernel(inline=True)
def _high_bytes(b, a, e):
    """Whether b[a:e] has a byte above 0x7f."""
    high = 0
    for j in range(a, e):
        high |= b[j]
    return high > 0x7F


@kernel(inline=True)
def _is_grease(v):
    return (v & 0x0F0F) == 0x0A0A and (v >> 8) == (v & 0xFF)


@kernel(inline=True)
def _copy_non_grease(dst, w, src, a, k):
    """The values of src[a:a + k] that are not GREASE, appended to dst at w: their count."""
    n = 0
    for j in range(a, a + k):
        if not _is_grease(src[j]):
            dst[w + n] = src[j]
            n += 1
    return n


@kernel(inline=True)
def _sort(a, start, stop):
    """Sort a[start:stop] in place (insertion sort: the lists are short and mostly sorted)."""
    for j in range(start + 1, stop):
        v = a[j]
        k = j - 1
        while k >= start and a[k] > v:
            a[k + 1] = a[k]
            k -= 1
        a[k + 1] = v


_FNV_OFFSET = 0xCBF29CE484222325
_FNV_PRIME = 0x100000001B3


@kernel(inline=True)
def _hash(values, a, e):
    """A hash of values[a:e]: its length and at most 64 values at each end."""
    prime = np.uint64(_FNV_PRIME)
    h = (np.uint64(_FNV_OFFSET) ^ np.uint64(e - a)) * prime
    for j in range(a, min(e, a + 64)):
        h = (h ^ np.uint64(values[j])) * prime
    for j in range(max(a + 64, e - 64), e):
        h = (h ^ np.uint64(values[j])) * prime
    return h


@kernel(inline=True)
def _slot(h, size):
    return np.int64((h ^ (h >> np.uint64(32))) & np.uint64(size - 1))


@kernel(inline=True)
def _same(x, y):
    """x == y, arrays of one length: compared whole, not stopping early, which numba vectorises
    (equal is the common outcome: most certificates are seen many times)."""
    diff = 0
    for j in range(x.shape[0]):
        diff |= x[j] ^ y[j]
    return diff == 0


@kernel(inline=True)
def _find(values, a, e, h, store, ends, hashes, slots):
    """(the number of the stored sequence equal to values[a:e], or -1; the slot where it is or
    would go). Sequence k is store[ends[k]:ends[k + 1]], hashes[k] its hash; slots: an open
    addressing table of their numbers by hash (-1: free), never full."""
    size = slots.shape[0]
    slot = _slot(h, size)
    while slots[slot] >= 0:
        k = slots[slot]
        if hashes[k] == h and ends[k + 1] - ends[k] == e - a and _same(store[ends[k]:ends[k + 1]], values[a:e]):
            return k, slot
        slot = (slot + 1) & (size - 1)
    return -1, slot


@kernel(inline=True)
def _rehashed(hashes, n, size):
    """A slots table of `size` for the first n hashes."""
    slots = np.full(size, -1, dtype=np.int64)
    for k in range(n):
        slot = _slot(hashes[k], size)
        while slots[slot] >= 0:
            slot = (slot + 1) & (size - 1)
        slots[slot] = k
    return slots


@kernel(inline=True)
def _distinct(values, ends):
    """Number the sequences values[ends[k]:ends[k + 1]] by content: (each one's number, in order
    of first appearance; the first sequence of each number). Hashed on their length and at
    most 64 values at each end, compared whole where hashes meet."""
    m = ends.shape[0] - 1
    size = 16
    while size < 2 * m:
        size *= 2
    slots = np.full(size, -1, dtype=np.int64)
    hashes = np.empty(m, dtype=np.uint64)
    number = np.empty(m, dtype=np.int64)
    first = np.empty(m, dtype=np.int64)
    count = 0
    for i in range(m):
        a, e = ends[i], ends[i + 1]
        h = _hash(values, a, e)
        slot = _slot(h, size)
        k = -1
        while slots[slot] >= 0:
            f = first[slots[slot]]
            if hashes[slots[slot]] == h and ends[f + 1] - ends[f] == e - a \
                    and _same(values[ends[f]:ends[f + 1]], values[a:e]):
                k = slots[slot]
                break
            slot = (slot + 1) & (size - 1)
        if k < 0:
            k = count
            slots[slot] = k
            hashes[k] = h
            first[k] = i
            count += 1
        number[i] = k
    return number, first[:count]


@kernel(inline=True)
def _gather(values, ends, which):
    """The sequences values[ends[k]:ends[k + 1]] for k in `which`, end to end: (values, ends)."""
    out_ends = np.zeros(which.shape[0] + 1, dtype=np.int64)
    for j in range(which.shape[0]):
        out_ends[j + 1] = out_ends[j] + ends[which[j] + 1] - ends[which[j]]
    out = np.empty(out_ends[-1], dtype=values.dtype)
    for j in range(which.shape[0]):
        _copy(out, out_ends[j], values, ends[which[j]], out_ends[j + 1] - out_ends[j])
    return out, out_ends


@kernel(allocates=True)
def handshakes(data, data_at, limits, offsets, offsets_at, times, times_at):
    """handshake for many sessions in one call, and what their rows take from its results, as
    columns. Direction j (2i: session i's client, 2i + 1: its server) is data[data_at[j]:
    data_at[j + 1]], contiguous up to limits[j], its packet times offsets[offsets_at[j]:
    offsets_at[j + 1]] and times[times_at[j]:times_at[j + 1]] (Direction.ts_offsets, .ts).

    Returns (head: the H_* header per session, at: the AT_* offsets, the values of the client's
    ciphers, extensions, signature algorithms and supported versions and of the server's
    extensions, the SNI, next-protocol and ALPN bytes, the ALPN values' ends (a leading 0), the
    distinct JA3, JA4 and JA3S keys and the distinct certificates, each as (values, ends (a
    leading 0)), and per certificate its distinct number, its time and whether the client sent
    it). Certificates come per session, the server's first, as handshake's.

    A fingerprint key holds what the fingerprint is made of (GREASE values left out, JA4's
    sorted lists sorted), so that a hello rebuilt from the key has the session's fingerprint,
    and each distinct key is fingerprinted once: JA3: version, the counts then the values of
    ciphers, extensions, groups and point formats; JA4: version, the counts of supported
    versions, ciphers, extensions and signature algorithms, the first ALPN value's length (-1:
    none), the values (the first three lists sorted), that value's bytes; JA3S: version, cipher
    (-1: none), extensions."""
    n = (data_at.shape[0] - 1) // 2
    head = np.full((n, N_HEAD), -1, dtype=np.int64)
    at = np.zeros((AT_CERTS + 1, n + 1), dtype=np.int64)
    ciphers = np.empty(1024, dtype=np.uint16)
    extensions = np.empty(1024, dtype=np.uint16)
    sig_algs = np.empty(256, dtype=np.uint16)
    versions = np.empty(256, dtype=np.uint16)
    server_extensions = np.empty(256, dtype=np.uint16)
    w_ciphers = w_extensions = w_sig_algs = w_versions = w_server_extensions = 0
    sni = np.empty(1024, dtype=np.uint8)
    next_protocol = np.empty(256, dtype=np.uint8)
    alpn = np.empty(256, dtype=np.uint8)
    alpn_ends = np.zeros(64, dtype=np.int64)
    w_sni = w_next_protocol = w_alpn = n_alpn = 0
    # the fingerprint keys of every session, end to end (numbered by content after the loop)
    keys = np.empty(4096, dtype=np.int64)
    key_ends = np.zeros(64, dtype=np.int64)
    n_keys = 0
    # the distinct certificates, numbered as they are met
    der = np.empty(1 << 16, dtype=np.uint8)
    der_ends = np.zeros(64, dtype=np.int64)
    der_hashes = np.empty(64, dtype=np.uint64)
    der_slots = np.full(128, -1, dtype=np.int64)
    n_der = 0
    cert_group = np.empty(64, dtype=np.int64)
    cert_ts = np.empty(64, dtype=np.int64)
    cert_by_client = np.empty(64, dtype=np.int64)
    n_certs = 0
    for i in range(n):
        c, s = 2 * i, 2 * i + 1
        out, buf = handshake(data[data_at[c]:data_at[c + 1]], limits[c], offsets[offsets_at[c]:offsets_at[c + 1]],
                             times[times_at[c]:times_at[c + 1]], data[data_at[s]:data_at[s + 1]], limits[s],
                             offsets[offsets_at[s]:offsets_at[s + 1]], times[times_at[s]:times_at[s + 1]])
        for j in range(CLIENT_HELLO):
            head[i, j] = out[j]
        head[i, H_CLIENT_HELLO] = head[i, H_HELLO] = head[i, H_RESUMED] = head[i, H_SNI] = 0
        head[i, H_NEXT_PROTOCOL] = head[i, H_N_ALPN] = head[i, H_NOT_ASCII] = 0
        if out[LOGGED]:
            ch, sh = out[CLIENT_HELLO], out[SERVER_HELLO]  # where they are in out, -1: not read
            hello = sh if sh >= 0 else out[RETRY_REQUEST]
            if n_keys + 3 + 1 > key_ends.shape[0]:
                key_ends = _grown(key_ends, n_keys + 1, 3)
            if ch >= 0:
                head[i, H_CLIENT_HELLO] = 1
                head[i, H_CLIENT_VERSION] = out[ch + CH_VERSION]
                n_ciphers, n_extensions, n_groups = out[ch + CH_N_CIPHERS], out[ch + CH_N_EXTENSIONS], out[ch + CH_N_GROUPS]
                n_formats, n_sig_algs = out[ch + CH_N_POINT_FORMATS], out[ch + CH_N_SIG_ALGS]
                n_versions, n_values = out[ch + CH_N_VERSIONS], out[ch + CH_N_ALPN]
                p_ciphers = ch + CH_VALUES
                p_extensions = p_ciphers + n_ciphers
                p_groups = p_extensions + n_extensions
                p_formats = p_groups + n_groups
                p_sig_algs = p_formats + n_formats
                p_versions = p_sig_algs + n_sig_algs
                p_alpn = p_versions + n_versions
                k = min(n_ciphers, MAX_HELLO_LIST)
                if w_ciphers + k > ciphers.shape[0]:
                    ciphers = _grown(ciphers, w_ciphers, k)
                _copy(ciphers, w_ciphers, out, p_ciphers, k)
                w_ciphers += k
                k = min(n_extensions, MAX_HELLO_LIST)
                if w_extensions + k > extensions.shape[0]:
                    extensions = _grown(extensions, w_extensions, k)
                _copy(extensions, w_extensions, out, p_extensions, k)
                w_extensions += k
                k = min(n_sig_algs, MAX_HELLO_LIST)
                if w_sig_algs + k > sig_algs.shape[0]:
                    sig_algs = _grown(sig_algs, w_sig_algs, k)
                _copy(sig_algs, w_sig_algs, out, p_sig_algs, k)
                w_sig_algs += k
                k = min(n_versions, MAX_HELLO_LIST)
                if w_versions + k > versions.shape[0]:
                    versions = _grown(versions, w_versions, k)
                _copy(versions, w_versions, out, p_versions, k)
                w_versions += k
                a, e = out[ch + CH_SNI], out[ch + CH_SNI + 1]
                if a >= 0:
                    head[i, H_SNI] = 1
                    if w_sni + e - a > sni.shape[0]:
                        sni = _grown(sni, w_sni, e - a)
                    _copy(sni, w_sni, buf, a, e - a)
                    w_sni += e - a
                    if _high_bytes(buf, a, e):
                        head[i, H_NOT_ASCII] |= NOT_ASCII_SNI
                head[i, H_N_ALPN] = n_values
                if n_alpn + n_values + 1 > alpn_ends.shape[0]:
                    alpn_ends = _grown(alpn_ends, n_alpn + 1, n_values)
                for j in range(n_values):
                    a, e = out[p_alpn + 2 * j], out[p_alpn + 2 * j + 1]
                    if w_alpn + e - a > alpn.shape[0]:
                        alpn = _grown(alpn, w_alpn, e - a)
                    _copy(alpn, w_alpn, buf, a, e - a)
                    w_alpn += e - a
                    n_alpn += 1
                    alpn_ends[n_alpn] = w_alpn
                    if _high_bytes(buf, a, e):
                        head[i, H_NOT_ASCII] |= NOT_ASCII_ALPN
                first_alpn = out[p_alpn + 1] - out[p_alpn] if n_values else 0
                w = key_ends[n_keys]
                need = 2 * (6 + p_alpn - p_ciphers) + first_alpn
                if w + need > keys.shape[0]:
                    keys = _grown(keys, w, need)
                # JA3's key
                keys[w] = out[ch + CH_VERSION]
                p = w + 5
                for q, k, count_at in ((p_ciphers, n_ciphers, 1), (p_extensions, n_extensions, 2),
                                       (p_groups, n_groups, 3)):
                    keys[w + count_at] = _copy_non_grease(keys, p, out, q, k)
                    p += keys[w + count_at]
                keys[w + 4] = n_formats
                _copy(keys, p, out, p_formats, n_formats)
                head[i, H_JA3] = n_keys
                n_keys += 1
                key_ends[n_keys] = w = p + n_formats
                # JA4's
                keys[w] = out[ch + CH_VERSION]
                p = w + 6
                for q, k, count_at in ((p_versions, n_versions, 1), (p_ciphers, n_ciphers, 2),
                                       (p_extensions, n_extensions, 3), (p_sig_algs, n_sig_algs, 4)):
                    keys[w + count_at] = _copy_non_grease(keys, p, out, q, k)
                    if count_at < 4:
                        _sort(keys, p, p + keys[w + count_at])
                    p += keys[w + count_at]
                keys[w + 5] = -1
                if n_values:
                    keys[w + 5] = first_alpn
                    _copy(keys, p, buf, out[p_alpn], first_alpn)
                head[i, H_JA4] = n_keys
                n_keys += 1
                key_ends[n_keys] = p + first_alpn
            if hello >= 0:
                head[i, H_HELLO] = 1 if sh >= 0 else 2
                head[i, H_HELLO_VERSION] = out[hello + SH_VERSION]
                head[i, H_HELLO_CIPHER] = out[hello + SH_CIPHER]
                k = min(out[hello + SH_N_EXTENSIONS], MAX_HELLO_LIST)
                if w_server_extensions + k > server_extensions.shape[0]:
                    server_extensions = _grown(server_extensions, w_server_extensions, k)
                _copy(server_extensions, w_server_extensions, out, hello + SH_VALUES, k)
                w_server_extensions += k
                # JA3S's key: the ServerHello's, or a HelloRetryRequest's when no ServerHello came
                # (a ServerHello in form, which JA3S's tools, Zeek's ja3 script and nDPI read too)
                w = key_ends[n_keys]
                k = out[hello + SH_N_EXTENSIONS]
                if w + 2 + k > keys.shape[0]:
                    keys = _grown(keys, w, 2 + k)
                keys[w] = out[hello + SH_VERSION]
                keys[w + 1] = out[hello + SH_CIPHER]
                head[i, H_JA3S] = n_keys
                n_keys += 1
                key_ends[n_keys] = w + 2 + _copy_non_grease(keys, w + 2, out, hello + SH_VALUES, k)
            if sh >= 0:
                head[i, H_KEY_SHARE_GROUP] = out[sh + SH_KEY_SHARE_GROUP]
                a, e = out[sh + SH_ALPN], out[sh + SH_ALPN + 1]
                if a >= 0:
                    head[i, H_NEXT_PROTOCOL] = 1
                    if w_next_protocol + e - a > next_protocol.shape[0]:
                        next_protocol = _grown(next_protocol, w_next_protocol, e - a)
                    _copy(next_protocol, w_next_protocol, buf, a, e - a)
                    w_next_protocol += e - a
                    if _high_bytes(buf, a, e):
                        head[i, H_NOT_ASCII] |= NOT_ASCII_NEXT_PROTOCOL
                if out[TLS13]:
                    head[i, H_RESUMED] = out[sh + SH_PSK] != 0
                elif ch >= 0:  # the session id the client offered, taken back
                    a, e = out[ch + CH_SESSION_ID], out[ch + CH_SESSION_ID + 1]
                    b = out[sh + SH_SESSION_ID]
                    same = e > a and e - a == out[sh + SH_SESSION_ID + 1] - b
                    for j in range(e - a if same else 0):
                        if buf[a + j] != buf[b + j]:
                            same = False
                            break
                    head[i, H_RESUMED] = same
            p = CERTS
            for count_at in (SERVER_CERTS, CLIENT_CERTS):
                for _ in range(max(out[count_at], 0)):
                    a, e = out[p], out[p + 1]
                    p += 2
                    h = _hash(buf, a, e)
                    k, slot = _find(buf, a, e, h, der, der_ends, der_hashes, der_slots)
                    if k < 0:  # a certificate not met before
                        k = n_der
                        w = der_ends[k]
                        if w + e - a > der.shape[0]:
                            der = _grown(der, w, e - a)
                        if k + 2 > der_ends.shape[0]:
                            der_ends = _grown(der_ends, k + 1, 1)
                            der_hashes = _grown(der_hashes, k, 1)
                        _copy(der, w, buf, a, e - a)
                        der_ends[k + 1] = w + e - a
                        der_hashes[k] = h
                        der_slots[slot] = k
                        n_der += 1
                        if 2 * n_der > der_slots.shape[0]:  # kept at most half full
                            der_slots = _rehashed(der_hashes, n_der, 2 * der_slots.shape[0])
                    if n_certs + 1 > cert_group.shape[0]:
                        cert_group = _grown(cert_group, n_certs, 1)
                        cert_ts = _grown(cert_ts, n_certs, 1)
                        cert_by_client = _grown(cert_by_client, n_certs, 1)
                    cert_group[n_certs] = k
                    cert_ts[n_certs] = out[count_at + 1]
                    cert_by_client[n_certs] = count_at == CLIENT_CERTS
                    n_certs += 1
        at[AT_CIPHERS, i + 1] = w_ciphers
        at[AT_EXTENSIONS, i + 1] = w_extensions
        at[AT_SIG_ALGS, i + 1] = w_sig_algs
        at[AT_VERSIONS, i + 1] = w_versions
        at[AT_SERVER_EXTENSIONS, i + 1] = w_server_extensions
        at[AT_SNI, i + 1] = w_sni
        at[AT_NEXT_PROTOCOL, i + 1] = w_next_protocol
        at[AT_ALPN, i + 1] = n_alpn
        at[AT_CERTS, i + 1] = n_certs
    # the keys numbered by content, each kind on its own (JA3, JA4 and JA3S keys differ in shape)
    keys, key_ends = keys[:key_ends[n_keys]], key_ends[:n_keys + 1]
    number, first = _distinct(keys, key_ends)
    ja3, ja4, ja3s = head[:, H_JA3], head[:, H_JA4], head[:, H_JA3S]
    ja3_first, ja4_first, ja3s_first = _renumber(ja3, number, first), _renumber(ja4, number, first), \
        _renumber(ja3s, number, first)
    ja3_keys, ja3_ends = _gather(keys, key_ends, ja3_first)
    ja4_keys, ja4_ends = _gather(keys, key_ends, ja4_first)
    ja3s_keys, ja3s_ends = _gather(keys, key_ends, ja3s_first)
    return (head, at, ciphers[:w_ciphers], extensions[:w_extensions], sig_algs[:w_sig_algs], versions[:w_versions],
            server_extensions[:w_server_extensions], sni[:w_sni], next_protocol[:w_next_protocol], alpn[:w_alpn],
            alpn_ends[:n_alpn + 1], ja3_keys, ja3_ends, ja4_keys, ja4_ends, ja3s_keys, ja3s_ends, der[:der_ends[n_der]],
            der_ends[:n_der + 1], cert_group[:n_certs], cert_ts[:n_certs], cert_by_client[:n_certs])


@kernel(inline=True)
def _renumber(column, number, first):
    """column's key numbers (-1: none) made those of its distinct keys, in place: the keys (by
    number in the joined keys) that are first of their content, in the order now numbered."""
    mine = np.full(first.shape[0], -1, dtype=np.int64)  # a content's number in this column
    order = np.empty(first.shape[0], dtype=np.int64)
    count = 0
    for i in range(column.shape[0]):
        k = column[i]
        if k < 0:
            continue
        g = number[k]
        if mine[g] < 0:
            mine[g] = count
            order[count] = k
            count += 1
        column[i] = mine[g]
    return order[:count]


@kernel(allocates=True)
def acked_packets(reach, packets, ends, seq_ends):
    """Direction.acked_by for many queries: query q's ACKs (relative, in packet order) are
    reach[ends[q]:ends[q + 1]], and its answer the packet of the first of them at or past
    seq_ends[q] (the first to take the running maximum there), 0 if none."""
    out = np.zeros(seq_ends.shape[0], dtype=np.int64)
    for q in range(seq_ends.shape[0]):
        for j in range(ends[q], ends[q + 1]):
            if reach[j] >= seq_ends[q]:
                out[q] = packets[j]
                break
    return out
