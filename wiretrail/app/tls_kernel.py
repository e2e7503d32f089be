"""The byte work of app/tls.py in numba: records, handshake messages, hellos, certificate lists.

`handshake` reads both directions of a session in one call: per direction it finds the
start of TLS, walks the record layer up to the first gap, joins the handshake records'
bodies and frames the messages in them; it parses the ClientHello, the ServerHello and
HelloRetryRequest, the Certificate lists and the ServerKeyExchange curve, and notes what
`established`, the row's time and its log packet depend on. app/tls.py makes the row from
what it returns. `client_hello` and `server_hello` parse one hello body: `handshake` calls
them, and app/tls.py calls them for hellos found elsewhere (QUIC's CRYPTO frames).

Results are int64 arrays: a fixed header (the offsets below) then variable-length lists.
Byte strings (session ids, SNI, ALPN values, certificates) are (start, end) positions in the
buffer their message was read from (for `handshake`, the joined handshake bytes it returns).
Each call returns as few arrays as it can: making one for Python costs about a microsecond.
What malformed input does (where a read stops, what it keeps, what sets `malformed`) is what
app/tls.py's parser did in Python before.
"""

from __future__ import annotations

import numpy as np

from wiretrail.bytes_kernels import be16, be24
from wiretrail.jit import kernel

CT_CCS, CT_ALERT, CT_HANDSHAKE, CT_APPDATA, CT_HEARTBEAT = 20, 21, 22, 23, 24
MAX_RECORD = (1 << 14) + 2048
SCAN_LIMIT = 1 << 16       # how far into a stream to look for the start of TLS (STARTTLS)
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


@kernel
def client_hello(b, start, end):
    """A ClientHello body b[start:end] (after the 4-byte handshake header): see CH_*."""
    n = end - start
    out = np.zeros(CH_VALUES + 2 * n + 2, dtype=np.int64)
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


@kernel
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
def _valid_header(d, p):
    return (p + 5 <= d.shape[0] and CT_CCS <= d[p] <= CT_HEARTBEAT and d[p + 1] == 3 and d[p + 2] <= 4
            and be16(d, p + 3) <= MAX_RECORD)


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
            if not (CT_CCS <= ct <= CT_HEARTBEAT and d[p + 1] == 3 and d[p + 2] <= 4 and ln <= MAX_RECORD):
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
                if encrypted >= 4:
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
    """Copy the bodies of the first n handshake records of d to buf[base:]."""
    for i in range(n):
        buf[base + at[i]:base + at[i + 1]] = d[handshakes[i] + 5:handshakes[i] + 5 + at[i + 1] - at[i]]


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


@kernel
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
    out = np.full(CERTS + cert_room + ch.shape[0] + sh.shape[0] + hrr.shape[0], -1, dtype=np.int64)
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
