"""The byte work of app/dns.py in numba: every DNS message of a batch parsed in one call.

`parse_messages` reads the messages data[starts[j]:ends[j]] as app/dns.py's `_parse` reads
them (with the authority section kept, names as sent): the header, the questions, and the
answer and authority records whose data it knows how to read, with the same limits and the
same places where a malformed message stops. Text is written once, in the kernel: every name
(escaped as Zeek escapes it: bytes outside printable ASCII as \\xNN), every IPv4 answer and
TXT record goes to a string table, and the rows refer to strings by their number in it. app/dns.py turns those
into its DnsMessage objects.

A message the kernel does not read itself gets the status FALLBACK, and app/dns.py parses it
in Python: fewer bytes than a header, a dynamic update, a name cut by the compression depth
limit, an empty answer record before the end of the message, and records whose data it does
not format (NAPTR, RRSIG, NSEC, DNSKEY, DS, SSHFP, LOC, NULL, NSEC3, ...; a TXT answer
whose strings run past its data). These are rare; the common ones (A, AAAA, CNAME, PTR, NS,
MX, SOA, SRV, TXT, SPF, NetBIOS NB and NBSTAT, OPT, the types with no answer text, unknown
types) are read here.

Results (int64 arrays unless said):
- msgs[j, M_*]: one row per message;
- questions[k, Q_*]: the questions of message j are rows msgs[j, M_Q0] ... + msgs[j, M_NQ];
- records[k, R_*]: answer-section (R_SECTION 0) and authority-section (1) records that give an
  Answer, in parse order; message j's are rows msgs[j, M_R0] ... + msgs[j, M_NR];
- text (uint8) and text_offsets (int32): string i is text[text_offsets[i]:text_offsets[i + 1]].
"""

from __future__ import annotations

import numpy as np

from wiretrail.bytes_kernels import HEXDIGITS, be16, be32, put_decimal, put_escaped
from wiretrail.jit import kernel

MAX_QUERIES = 25            # as app/dns.py (Zeek's dns_max_queries)
MAX_COMPRESSION_DEPTH = 20  # dns_max_compression_chain_depth
MAX_NAME = 512              # bytes of labels a name may take
NAME_TEXT_MAX = 4 * MAX_NAME  # text of one name at most: every byte escaped, plus its dots

# message status
OK, FALLBACK = 0, 1
# msgs columns. MALFORMED: the parse stopped at a fault (or the opcode is not followed).
# LOWERED: a name had ASCII capitals; CAPITALS: the message had ASCII capitals anywhere.
# RESP_NB: a record's reading depended on whether the server port is NetBIOS's (SRV/NBSTAT).
(M_STATUS, M_ID, M_FLAGS, M_QD, M_AN, M_NS, M_AR, M_MALFORMED, M_LOWERED, M_CAPITALS, M_RESP_NB,
 M_Q0, M_NQ, M_R0, M_NR) = range(15)
M_FIELDS = 15
# questions columns: name (string number), qtype, qclass
Q_NAME, Q_TYPE, Q_CLASS = range(3)
Q_FIELDS = 3
# records columns. KIND: the reply's kind (below). TEXT1/TEXT2: string numbers (-1: none):
# NAME the name, ADDR4 the address, SOA mname and rname, SRV the target. V0..V4: SOA's serial,
# refresh, retry, expire, minimum; SRV's priority, weight, port. RDATA: where the record's data
# starts in the message (ADDR6: its 16 bytes). LOWERED: a name so far had capitals (the
# record's `lower` reading is kept).
(R_SECTION, R_OWNER, R_TYPE, R_CLASS, R_TTL, R_KIND, R_TEXT1, R_TEXT2, R_V0, R_V1, R_V2, R_V3, R_V4, R_RDATA,
 R_LOWERED) = range(15)
R_FIELDS = 15
# reply kinds: no reply event; an event with no text (WKS); an IPv4 / IPv6 address; a name
# (NS, CNAME, PTR, MX); SOA; SRV; "<unknown type=N>"; TXT or SPF (TEXT1 the reply, its strings'
# texts the V1 strings from number V0 on)
K_NONE, K_EMPTY, K_ADDR4, K_ADDR6, K_NAME, K_SOA, K_SRV, K_UNKNOWN, K_TXT = range(9)

# name reading outcomes
_NAME_OK, _NAME_BAD, _NAME_CUT = 0, 1, 2


@kernel(inline=True)
def _name(b, s, n, pos, netbios, text, tw, hexdigits):
    """The name at message offset `pos` of the message b[s:s + n], its text written at text[tw:]
    (room for NAME_TEXT_MAX bytes is the caller's to make). Returns (outcome, the position after
    the name, the end of its text, whether it had ASCII capitals). Follows app/dns.py's
    _Parser.name: pointers only backwards, at most MAX_COMPRESSION_DEPTH of them (more: CUT),
    labels over 63 bytes only for NetBIOS, at most MAX_NAME bytes of labels."""
    total = 0
    end = -1
    depth = 0
    caps = False
    first = True
    while True:
        if pos >= n:
            return _NAME_BAD, pos, tw, caps
        ln = np.int64(b[s + pos])
        if ln == 0:
            pos += 1
            break
        if ln >= 0xC0:
            if pos + 1 >= n:
                return _NAME_BAD, pos, tw, caps
            target = ((ln & 0x3F) << 8) | np.int64(b[s + pos + 1])
            if target >= pos:
                return _NAME_BAD, pos, tw, caps
            if end < 0:
                end = pos + 2
            depth += 1
            if depth > MAX_COMPRESSION_DEPTH:
                return _NAME_CUT, pos, tw, caps
            pos = target
            continue
        after = pos + 1 + ln
        if after > n:
            return _NAME_BAD, pos, tw, caps
        if ln > 63 and not netbios:
            return _NAME_BAD, pos, tw, caps
        total += ln + 1
        if total > MAX_NAME:
            return _NAME_BAD, pos, tw, caps
        if not first:
            text[tw] = 46  # '.'
            tw += 1
        first = False
        tw, label_caps = put_escaped(b, s + pos + 1, s + after, text, tw, hexdigits)
        caps = caps or label_caps
        pos = after
    return _NAME_OK, (end if end >= 0 else pos), tw, caps


@kernel(inline=True)
def _dotted_quad(b, p, text, tw):
    for k in range(4):
        if k:
            text[tw] = 46  # '.'
            tw += 1
        tw = put_decimal(np.int64(b[p + k]), text, tw)
    return tw


@kernel(inline=True)
def _room(text, tw, need):
    """`text`, or a copy twice as large when fewer than `need` bytes are free after tw."""
    if tw + need <= len(text):
        return text
    bigger = np.empty(2 * len(text) + need, dtype=np.uint8)
    bigger[:tw] = text[:tw]
    return bigger


@kernel(allocates=True)
def parse_messages(data, starts, ends, netbios, resp_nb):
    """The messages data[starts[j]:ends[j]]; netbios[j]: its session is NetBIOS name service
    (either port 137), resp_nb[j]: its server port is 137 (SRV records are then NBSTAT, not read).
    Returns (msgs, questions, records, text, text_offsets): see the module's docstring."""
    m = len(starts)
    msgs = np.zeros((m, M_FIELDS), dtype=np.int64)
    questions = np.zeros((max(16, m), Q_FIELDS), dtype=np.int64)
    records = np.zeros((max(16, 2 * m), R_FIELDS), dtype=np.int64)
    text = np.empty(max(4096, 64 * m + 2 * NAME_TEXT_MAX), dtype=np.uint8)
    text_offsets = np.zeros(max(64, 4 * m) + 1, dtype=np.int32)
    hexdigits = HEXDIGITS
    nq = 0
    nr = 0
    ns_ = 0   # strings made
    tw = 0    # text bytes used
    for j in range(m):
        s = starts[j]
        n = ends[j] - s
        msg = msgs[j]
        msg[M_Q0] = nq
        msg[M_R0] = nr
        caps_any = False
        for i in range(s, s + n):
            if 0x41 <= data[i] <= 0x5A:
                caps_any = True
                break
        msg[M_CAPITALS] = caps_any
        if n < 12:
            msg[M_STATUS] = FALLBACK
            continue
        msg[M_ID] = be16(data, s)
        flags = be16(data, s + 2)
        msg[M_FLAGS] = flags
        qdcount = be16(data, s + 4)
        ancount = be16(data, s + 6)
        nscount = be16(data, s + 8)
        arcount = be16(data, s + 10)
        msg[M_QD] = qdcount
        msg[M_AN] = ancount
        msg[M_NS] = nscount
        msg[M_AR] = arcount
        nb = netbios[j]
        labels_nb = nb or resp_nb[j]  # long labels are NetBIOS's (app/dns.py's _Parser.netbios)
        opcode = (flags >> 11) & 0xF
        if not (opcode == 0 or opcode == 4 or opcode == 5) and not nb:
            msg[M_MALFORMED] = 1  # an opcode DNS analysis does not follow
            continue
        if qdcount > MAX_QUERIES:
            msg[M_MALFORMED] = 1
            continue
        if opcode == 5 and not nb:  # dynamic update: read in Python
            msg[M_STATUS] = FALLBACK
            continue
        # room for this message's strings and rows: names of at most NAME_TEXT_MAX bytes, one
        # string per name, a name per 2 bytes of message at most
        need_strings = ns_ + 2 * n + 4  # names, TXT strings and their replies
        if need_strings + 1 > len(text_offsets):
            bigger = np.zeros(2 * need_strings + 1, dtype=np.int32)
            bigger[:ns_ + 1] = text_offsets[:ns_ + 1]
            text_offsets = bigger
        if nq + qdcount > len(questions):
            bigger_q = np.zeros((2 * (nq + qdcount), Q_FIELDS), dtype=np.int64)
            bigger_q[:nq] = questions[:nq]
            questions = bigger_q
        if nr + n // 11 + 1 > len(records):  # a record takes 11 bytes at least
            bigger_r = np.zeros((2 * (nr + n // 11 + 1), R_FIELDS), dtype=np.int64)
            bigger_r[:nr] = records[:nr]
            records = bigger_r
        lowered = False
        status = OK
        malformed = False
        pos = 12
        q0 = nq
        r0 = nr
        s0 = ns_
        tw0 = tw
        for _ in range(qdcount):
            text = _room(text, tw, NAME_TEXT_MAX + 8)
            outcome, pos, tw2, caps = _name(data, s, n, pos, labels_nb, text, tw, hexdigits)
            if outcome == _NAME_CUT:
                status = FALLBACK
                break
            if outcome == _NAME_BAD:
                malformed = True
                break
            lowered = lowered or caps
            tw = tw2
            ns_ += 1
            text_offsets[ns_] = tw
            if pos + 4 > n:
                malformed = True
                break
            questions[nq, Q_NAME] = ns_ - 1
            questions[nq, Q_TYPE] = be16(data, s + pos)
            questions[nq, Q_CLASS] = be16(data, s + pos + 2)
            nq += 1
            pos += 4
        if status == OK and not malformed and (ancount or nscount or arcount):
            for section in range(3):
                count = ancount if section == 0 else (nscount if section == 1 else arcount)
                for _ in range(count):
                    text = _room(text, tw, 3 * NAME_TEXT_MAX + 64)
                    outcome, pos, tw2, caps = _name(data, s, n, pos, labels_nb, text, tw, hexdigits)
                    if outcome == _NAME_CUT:
                        status = FALLBACK
                        break
                    if outcome == _NAME_BAD:
                        malformed = True
                        break
                    lowered = lowered or caps
                    tw = tw2
                    ns_ += 1
                    text_offsets[ns_] = tw
                    owner = ns_ - 1
                    if pos + 10 > n:
                        malformed = True
                        break
                    rtype = be16(data, s + pos)
                    rclass = be16(data, s + pos + 2)
                    ttl = be32(data, s + pos + 4)
                    rdlen = be16(data, s + pos + 8)
                    pos += 10
                    if pos + rdlen > n:
                        malformed = True
                        break
                    if section == 2 or (rdlen == 0 and section == 1):
                        # additional records (and empty authority ones): only the names inside
                        # NS, CNAME and PTR are checked
                        if rdlen != 0 and (rtype == 2 or rtype == 5 or rtype == 12):
                            outcome, _p, _tw, caps = _name(data, s, n, pos, labels_nb, text, tw, hexdigits)
                            if outcome == _NAME_CUT:
                                status = FALLBACK
                                break
                            if outcome == _NAME_BAD:
                                malformed = True
                                break
                            lowered = lowered or caps
                        pos += rdlen
                        continue
                    if rdlen == 0:  # an empty answer record
                        if pos < n:  # Zeek stops the answer section here: read in Python
                            status = FALLBACK
                            break
                        kind = K_NONE
                        t1 = -1
                        t2 = -1
                        rec = records[nr]
                        rec[R_SECTION] = 0
                        rec[R_OWNER] = owner
                        rec[R_TYPE] = rtype
                        rec[R_CLASS] = rclass
                        rec[R_TTL] = ttl
                        rec[R_KIND] = K_NONE
                        rec[R_TEXT1] = -1
                        rec[R_TEXT2] = -1
                        rec[R_RDATA] = pos
                        rec[R_LOWERED] = lowered
                        nr += 1
                        continue
                    if section == 1 and (rtype == 2 or rtype == 5 or rtype == 12):
                        # an authority record's name is checked before its data is read
                        outcome, _p, _tw, caps = _name(data, s, n, pos, labels_nb, text, tw, hexdigits)
                        if outcome == _NAME_CUT:
                            status = FALLBACK
                            break
                        if outcome == _NAME_BAD:
                            malformed = True
                            break
                        lowered = lowered or caps
                    # the record's data (app/dns.py's _Parser.rdata); a fault in it ends the
                    # message in the answer section, and drops only the record in the authority one
                    bad = False
                    kind = K_UNKNOWN
                    t1 = -1
                    t2 = -1
                    v0 = v1 = v2 = v3 = v4 = 0
                    if rtype == 1:
                        if rdlen != 4:
                            bad = True
                        else:
                            kind = K_ADDR4
                            tw = _dotted_quad(data, s + pos, text, tw)
                            ns_ += 1
                            text_offsets[ns_] = tw
                            t1 = ns_ - 1
                    elif rtype == 28 or rtype == 38:
                        if rdlen != 16:
                            bad = True
                        else:
                            kind = K_ADDR6
                    elif rtype == 2 or rtype == 5 or rtype == 12 or rtype == 15 or rtype == 6 or rtype == 33:
                        if rtype == 33 and resp_nb[j]:
                            kind = K_NONE  # NBSTAT: not read
                            msg[M_RESP_NB] = 1
                        elif rtype == 15 and rdlen < 2:
                            bad = True
                        elif rtype == 33 and rdlen < 6:
                            bad = True
                            msg[M_RESP_NB] = 1
                        else:
                            if rtype == 33:
                                msg[M_RESP_NB] = 1
                            at = pos + 2 if rtype == 15 else (pos + 6 if rtype == 33 else pos)
                            outcome, p2, tw2, caps = _name(data, s, n, at, labels_nb, text, tw, hexdigits)
                            if outcome == _NAME_CUT:
                                status = FALLBACK
                                break
                            if outcome == _NAME_BAD:
                                bad = True
                            else:
                                lowered = lowered or caps
                                tw = tw2
                                ns_ += 1
                                text_offsets[ns_] = tw
                                t1 = ns_ - 1
                                kind = K_NAME
                                if rtype == 33:
                                    kind = K_SRV
                                    v0 = be16(data, s + pos)
                                    v1 = be16(data, s + pos + 2)
                                    v2 = be16(data, s + pos + 4)
                                elif rtype == 6:
                                    outcome, p2, tw2, caps = _name(data, s, n, p2, labels_nb, text, tw, hexdigits)
                                    if outcome == _NAME_CUT:
                                        status = FALLBACK
                                        break
                                    if outcome == _NAME_BAD:
                                        bad = True
                                    else:
                                        lowered = lowered or caps
                                        tw = tw2
                                        ns_ += 1
                                        text_offsets[ns_] = tw
                                        t2 = ns_ - 1
                                        if p2 + 20 > n:
                                            bad = True
                                        else:
                                            kind = K_SOA
                                            v0 = be32(data, s + p2)
                                            v1 = be32(data, s + p2 + 4)
                                            v2 = be32(data, s + p2 + 8)
                                            v3 = be32(data, s + p2 + 12)
                                            v4 = be32(data, s + p2 + 16)
                    elif rtype == 16 or rtype == 99:  # TXT, SPF: "TXT <len> <text>" per string
                        text = _room(text, tw, 17 * rdlen + 64)
                        # the reply first (string t1), then each string's text (v0: the first, v1: how many)
                        complete = True
                        p = pos
                        while p < pos + rdlen:
                            if p + 1 + np.int64(data[s + p]) > pos + rdlen:
                                complete = False
                                break
                            p += 1 + np.int64(data[s + p])
                        if not complete:
                            if section == 0:  # Zeek still reports the strings read: Python's to write
                                status = FALLBACK
                                break
                            bad = True
                        else:
                            kind = K_TXT
                            p = pos
                            while p < pos + rdlen:
                                ln = np.int64(data[s + p])
                                if p > pos:
                                    text[tw] = 32
                                    tw += 1
                                if rtype == 16:
                                    text[tw] = 84  # TXT
                                    text[tw + 1] = 88
                                    text[tw + 2] = 84
                                else:
                                    text[tw] = 83  # SPF
                                    text[tw + 1] = 80
                                    text[tw + 2] = 70
                                text[tw + 3] = 32
                                tw = put_decimal(ln, text, tw + 4)
                                text[tw] = 32
                                tw, _caps = put_escaped(data, s + p + 1, s + p + 1 + ln, text, tw + 1, hexdigits)
                                p += 1 + ln
                            ns_ += 1
                            text_offsets[ns_] = tw
                            t1 = ns_ - 1
                            v0 = ns_
                            p = pos
                            while p < pos + rdlen:
                                ln = np.int64(data[s + p])
                                tw, _caps = put_escaped(data, s + p + 1, s + p + 1 + ln, text, tw, hexdigits)
                                ns_ += 1
                                text_offsets[ns_] = tw
                                v1 += 1
                                p += 1 + ln
                    elif rtype == 11:
                        kind = K_EMPTY
                    elif (rtype == 13 or rtype == 257 or rtype == 64 or rtype == 65 or rtype == 41 or rtype == 249
                          or rtype == 250 or rtype == 32):
                        kind = K_NONE
                    elif (rtype == 35 or rtype == 46 or rtype == 48 or rtype == 47
                          or rtype == 50 or rtype == 51 or rtype == 43 or rtype == 65534 or rtype == 44
                          or rtype == 29 or rtype == 10):
                        status = FALLBACK  # data formatted in Python
                        break
                    if bad:
                        if section == 0:
                            malformed = True
                            break
                        pos += rdlen
                        continue
                    rec = records[nr]
                    rec[R_SECTION] = section
                    rec[R_OWNER] = owner
                    rec[R_TYPE] = rtype
                    rec[R_CLASS] = rclass
                    rec[R_TTL] = ttl
                    rec[R_KIND] = kind
                    rec[R_TEXT1] = t1
                    rec[R_TEXT2] = t2
                    rec[R_V0] = v0
                    rec[R_V1] = v1
                    rec[R_V2] = v2
                    rec[R_V3] = v3
                    rec[R_V4] = v4
                    rec[R_RDATA] = pos
                    rec[R_LOWERED] = lowered
                    nr += 1
                    pos += rdlen
                if status != OK or malformed:
                    break
        if status != OK:  # what this message wrote is dropped: Python reads it
            nq = q0
            nr = r0
            ns_ = s0
            tw = tw0
            msg[M_STATUS] = status
            msg[M_RESP_NB] = 0
            continue
        msg[M_MALFORMED] = malformed
        msg[M_LOWERED] = lowered
        msg[M_NQ] = nq - q0
        msg[M_NR] = nr - r0
    return msgs, questions[:nq], records[:nr], text[:tw], text_offsets[:ns_ + 1]


# ---- pairing messages into transactions -----------------------------------------------------
#
# `pair_messages` pairs the messages of a batch into transactions as app/dns.py's
# DnsSession.add_message does one message at a time (Zeek's base/protocols/dns/main.zeek):
# per session one pending query, then queues per transaction id of further queries and of
# lone responses, each queue first in first out and the ids in the order they were first
# queued. Sessions span batches: what is still pending after a batch comes back as entries
# and is handed in again with the session's next messages.

# message kinds
KIND_SKIP, KIND_OWN, KIND_QUERY, KIND_RESPONSE = -1, 0, 1, 2
# where a pending message waits: the session's pending query, the queries' queues, the
# responses' queues (DnsSession.pending_query, pending_queries, pending_replies)
T_PENDING, T_QUERIES, T_REPLIES = 0, 1, 2
MAX_PENDING_MSGS = 50       # as app/dns.py (Zeek's DNS::max_pending_msgs)
MAX_PENDING_IDS = 50        # DNS::max_pending_query_ids


@kernel(inline=True)
def _find(head, nxt, table, etid, s, which, tid):
    """The first (oldest) entry of session s waiting in `which` with transaction id `tid`, or -1."""
    e = head[s]
    while e >= 0:
        if table[e] == which and etid[e] == tid:
            return e
        e = nxt[e]
    return -1


@kernel(inline=True)
def _unlink(head, tail, nxt, prv, nkeys, table, etid, s, e):
    """Entry e out of session s's list; its id's queue is gone when e was its last entry."""
    if prv[e] >= 0:
        nxt[prv[e]] = nxt[e]
    else:
        head[s] = nxt[e]
    if nxt[e] >= 0:
        prv[nxt[e]] = prv[e]
    else:
        tail[s] = prv[e]
    nxt[e] = -1
    prv[e] = -1
    if _find(head, nxt, table, etid, s, table[e], etid[e]) < 0:
        nkeys[s, table[e]] -= 1


@kernel(inline=True)
def _append(head, tail, nxt, prv, s, e):
    prv[e] = tail[s]
    nxt[e] = -1
    if tail[s] >= 0:
        nxt[tail[s]] = e
    else:
        head[s] = e
    tail[s] = e


@kernel(allocates=True)
def pair_messages(sess, kind, tid, multicast, e_sess, e_table, e_keyseq, e_seq, e_tid, clock):
    """Pair a batch's messages (in capture order) into transactions.

    Messages are numbered after the pending ones handed in: pending entry i is message i, the
    batch's message j is message len(e_sess) + j. Per batch message: sess[j] its session (an
    index into `multicast`, which says the session's messages are each a transaction of its
    own), kind[j] (KIND_*: KIND_OWN, a message that is a malformed row of its own; KIND_SKIP,
    one left out), tid[j] its transaction id. Per pending entry i: its session, table (T_*),
    the order of its id among the ids queued (keyseq) and its own (seq), its transaction id.
    `clock` numbers what is queued from here on (larger than every keyseq and seq so far).

    Returns (row_q, row_r, row_first, row_sess, out_sess, out_table, out_keyseq, out_seq,
    out_tid, out_msg, clock): the transactions completed, in the order DnsSession.add_message
    returns them (the query's message, the response's, -1 where it has none; the first of
    them, whose time and id the row takes; its session; a row of its own has neither query
    nor response), then what is still pending (its message out_msg), and the clock after."""
    c = len(e_sess)
    m = len(sess)
    n_sess = len(multicast)
    cap = c + m
    table = np.empty(cap, dtype=np.int64)
    keyseq = np.empty(cap, dtype=np.int64)
    seq = np.empty(cap, dtype=np.int64)
    etid = np.empty(cap, dtype=np.int64)
    msg = np.empty(cap, dtype=np.int64)
    nxt = np.full(cap, -1, dtype=np.int64)
    prv = np.full(cap, -1, dtype=np.int64)
    head = np.full(n_sess, -1, dtype=np.int64)
    tail = np.full(n_sess, -1, dtype=np.int64)
    pending = np.full(n_sess, -1, dtype=np.int64)
    nkeys = np.zeros((n_sess, 3), dtype=np.int64)  # how many ids have a queue, per table
    row_q = np.empty(cap, dtype=np.int64)
    row_r = np.empty(cap, dtype=np.int64)
    row_first = np.empty(cap, dtype=np.int64)
    row_sess = np.empty(cap, dtype=np.int64)
    flush = np.empty(cap, dtype=np.int64)
    nrows = 0
    ne = 0
    # the pending entries, in the order they were queued (a session's list keeps that order)
    for i in np.argsort(e_seq):
        s = e_sess[i]
        e = ne
        ne += 1
        table[e] = e_table[i]
        keyseq[e] = e_keyseq[i]
        seq[e] = e_seq[i]
        etid[e] = e_tid[i]
        msg[e] = i
        if table[e] == T_PENDING:
            pending[s] = e
        else:
            if _find(head, nxt, table, etid, s, table[e], etid[e]) < 0:
                nkeys[s, table[e]] += 1
            _append(head, tail, nxt, prv, s, e)
    for j in range(m):
        k = kind[j]
        if k == KIND_SKIP:
            continue
        s = sess[j]
        t = tid[j]
        mj = c + j
        if k == KIND_OWN or multicast[s]:
            row_q[nrows] = mj if k == KIND_QUERY else -1
            row_r[nrows] = mj if k == KIND_RESPONSE else -1
            row_first[nrows] = mj
            row_sess[nrows] = s
            nrows += 1
            continue
        done = -1  # the entry this message completes
        which = -1  # else the table it waits in
        if k == KIND_QUERY:
            done = _find(head, nxt, table, etid, s, T_REPLIES, t)
            if done >= 0:
                _unlink(head, tail, nxt, prv, nkeys, table, etid, s, done)
            elif pending[s] < 0:
                which = T_PENDING
            else:
                which = T_QUERIES
        else:
            p = pending[s]
            if p >= 0 and etid[p] == t:
                done = p
                pending[s] = -1
                if nkeys[s, T_QUERIES] > 0:
                    # the next query waits in its place: one with this id, else the oldest id's
                    e = _find(head, nxt, table, etid, s, T_QUERIES, t)
                    if e < 0:
                        e = head[s]
                        best = -1
                        while e >= 0:
                            if table[e] == T_QUERIES and (best < 0 or keyseq[e] < keyseq[best]):
                                best = e
                            e = nxt[e]
                        e = best
                    _unlink(head, tail, nxt, prv, nkeys, table, etid, s, e)
                    table[e] = T_PENDING
                    pending[s] = e
            else:
                done = _find(head, nxt, table, etid, s, T_QUERIES, t)
                if done >= 0:
                    _unlink(head, tail, nxt, prv, nkeys, table, etid, s, done)
                else:
                    which = T_REPLIES
        if done >= 0:
            first = msg[done]
            row_q[nrows] = mj if k == KIND_QUERY else first
            row_r[nrows] = first if k == KIND_QUERY else mj
            row_first[nrows] = first
            row_sess[nrows] = s
            nrows += 1
            continue
        e = ne
        ne += 1
        table[e] = which
        etid[e] = t
        msg[e] = mj
        seq[e] = clock
        clock += 1
        if which == T_PENDING:
            pending[s] = e
            keyseq[e] = 0
            continue
        # a queue (DnsSession._enqueue): a new id when too many ids wait empties the table,
        # too many messages of one id empty its queue; what they held are rows now
        same = _find(head, nxt, table, etid, s, which, t)
        nflush = 0
        if same < 0:
            keyseq[e] = clock
            clock += 1
            if nkeys[s, which] > MAX_PENDING_IDS:
                x = head[s]
                while x >= 0:
                    if table[x] == which:
                        flush[nflush] = x
                        nflush += 1
                    x = nxt[x]
                # in the order of the ids' queues, each queue oldest first
                order = np.argsort(keyseq[flush[:nflush]], kind="mergesort")
                flushed = flush[:nflush][order]
                for x in flushed:
                    _unlink(head, tail, nxt, prv, nkeys, table, etid, s, x)
                flush[:nflush] = flushed
            nkeys[s, which] += 1
        else:
            keyseq[e] = keyseq[same]
            x = same
            count = 0
            while x >= 0:
                if table[x] == which and etid[x] == t:
                    flush[count] = x
                    count += 1
                x = nxt[x]
            if count > MAX_PENDING_MSGS:
                nflush = count
                for i in range(nflush):
                    x = flush[i]
                    # the id keeps its place: its queue is emptied, not removed
                    if prv[x] >= 0:
                        nxt[prv[x]] = nxt[x]
                    else:
                        head[s] = nxt[x]
                    if nxt[x] >= 0:
                        prv[nxt[x]] = prv[x]
                    else:
                        tail[s] = prv[x]
        for i in range(nflush):
            x = flush[i]
            row_q[nrows] = msg[x] if which == T_QUERIES else -1
            row_r[nrows] = msg[x] if which == T_REPLIES else -1
            row_first[nrows] = msg[x]
            row_sess[nrows] = s
            nrows += 1
        _append(head, tail, nxt, prv, s, e)
    # what still waits: each session's pending query, then its lists
    out_sess = np.empty(ne, dtype=np.int64)
    out_table = np.empty(ne, dtype=np.int64)
    out_keyseq = np.empty(ne, dtype=np.int64)
    out_seq = np.empty(ne, dtype=np.int64)
    out_tid = np.empty(ne, dtype=np.int64)
    out_msg = np.empty(ne, dtype=np.int64)
    n_out = 0
    for s in range(n_sess):
        e = pending[s] if pending[s] >= 0 else head[s]
        while e >= 0:
            out_sess[n_out] = s
            out_table[n_out] = table[e]
            out_keyseq[n_out] = keyseq[e]
            out_seq[n_out] = seq[e]
            out_tid[n_out] = etid[e]
            out_msg[n_out] = msg[e]
            n_out += 1
            e = head[s] if e == pending[s] else nxt[e]
    return (row_q[:nrows], row_r[:nrows], row_first[:nrows], row_sess[:nrows], out_sess[:n_out], out_table[:n_out],
            out_keyseq[:n_out], out_seq[:n_out], out_tid[:n_out], out_msg[:n_out], clock)


# ---- what each message gives its row --------------------------------------------------------
#
# `message_texts` turns parse_messages' results into what app/dns.py's message_fields makes of
# each message, as numbers: its texts are numbers in a pool of strings laid out as
#   [the n strings as sent | the same n lower-cased | one per record (its IPv6 address or
#    "<unknown type=N>", made in app/dns.py) | ""]
# and its record lists runs of entries (Suricata's records: a TXT answer's strings each one).

# per message: the last question's type, class and name (lower-cased), the first one's name as
# sent, the first reply's owner (lower-cased; -1: no reply), its runs of answers, of
# answer_records entries and of authority_records entries
(MT_QTYPE, MT_QCLASS, MT_QUERY, MT_Q0, MT_OWNER, MT_ANS0, MT_NANS, MT_AREC0, MT_NAREC, MT_AUTH0, MT_NAUTH) = range(11)
MT_FIELDS = 11
# a record list entry: E_RRNAME, E_RDATA and E_T1/E_T2 strings (SOA's mname and rname, SRV's
# name, SSHFP's fingerprint), E_RRTYPE the type (a number here: app/dns.py makes it its name),
# E_V0.. E_V4 numbers (SOA's serial .. minimum; SRV's priority, weight, port; SSHFP's algorithm
# and type)
(E_RRNAME, E_RRTYPE, E_TTL, E_RDATA, E_KIND, E_T1, E_T2, E_V0, E_V1, E_V2, E_V3, E_V4) = range(12)
E_FIELDS = 12
EK_PLAIN, EK_SOA, EK_SRV, EK_SSHFP = range(4)
# a Zeek answer: its text and TTL
A_TEXT, A_TTL = range(2)


@kernel(allocates=True)
def message_texts(msgs, questions, records, text_offsets):
    """What each message read by parse_messages gives its row (see above): returns (fields
    (MT_*), answers (A_*), entries (E_*)), texts as numbers in the pool laid out above."""
    m = len(msgs)
    n_str = len(text_offsets) - 1
    n_rec = len(records)
    extra = 2 * n_str          # record r's own text: extra + r
    empty = 2 * n_str + n_rec  # ""
    fields = np.full((m, MT_FIELDS), -1, dtype=np.int64)
    answers = np.zeros((n_rec, 2), dtype=np.int64)
    entries = np.zeros((n_rec + n_str, E_FIELDS), dtype=np.int64)
    na = 0
    ne = 0
    for j in range(m):
        f = fields[j]
        nq = msgs[j, M_NQ]
        q0 = msgs[j, M_Q0]
        f[MT_QTYPE] = 0
        f[MT_QCLASS] = 0
        if nq > 0:  # Zeek's dns_request runs per question: the last one's stay
            f[MT_QTYPE] = questions[q0 + nq - 1, Q_TYPE]
            f[MT_QCLASS] = questions[q0 + nq - 1, Q_CLASS]
            f[MT_QUERY] = n_str + questions[q0 + nq - 1, Q_NAME]
            f[MT_Q0] = questions[q0, Q_NAME]
        f[MT_ANS0] = na
        f[MT_AREC0] = ne
        f[MT_AUTH0] = ne
        r0 = msgs[j, M_R0]
        for r in range(r0, r0 + msgs[j, M_NR]):
            rec = records[r]
            kind = rec[R_KIND]
            if kind == K_NONE:  # no reply: in no list
                continue
            t1 = rec[R_TEXT1]
            as_name = kind == K_NAME or kind == K_SOA or kind == K_SRV
            # its data as sent (Suricata's rdata; -1: none, SOA and SRV have their fields)
            if kind == K_ADDR6 or kind == K_UNKNOWN:
                sent = extra + r
            elif kind == K_EMPTY:
                sent = empty
            elif kind == K_SOA or kind == K_SRV:
                sent = -1
            else:
                sent = t1
            section = rec[R_SECTION]
            if section == 0:
                if f[MT_OWNER] < 0:
                    f[MT_OWNER] = n_str + rec[R_OWNER]
                # Zeek's answers: the replies with text (not WKS's, nor a name that is the root's)
                if kind != K_EMPTY and not (as_name and text_offsets[t1 + 1] == text_offsets[t1]):
                    answers[na, A_TEXT] = n_str + t1 if as_name else sent
                    answers[na, A_TTL] = rec[R_TTL]
                    na += 1
                f[MT_AUTH0] = ne + (rec[R_V1] if kind == K_TXT else 1)
            # its entries: a TXT answer's strings (V1 of them from V0) each one
            count = rec[R_V1] if kind == K_TXT and section == 0 else 1
            for k in range(count):
                e = entries[ne]
                e[E_RRNAME] = rec[R_OWNER]
                e[E_RRTYPE] = rec[R_TYPE]
                e[E_TTL] = rec[R_TTL]
                e[E_RDATA] = rec[R_V0] + k if kind == K_TXT and section == 0 else sent
                e[E_KIND] = EK_SOA if kind == K_SOA else (EK_SRV if kind == K_SRV else EK_PLAIN)
                e[E_T1] = t1
                e[E_T2] = rec[R_TEXT2]
                e[E_V0] = rec[R_V0]
                e[E_V1] = rec[R_V1]
                e[E_V2] = rec[R_V2]
                e[E_V3] = rec[R_V3]
                e[E_V4] = rec[R_V4]
                ne += 1
        f[MT_NANS] = na - f[MT_ANS0]
        f[MT_NAREC] = f[MT_AUTH0] - f[MT_AREC0]
        f[MT_NAUTH] = ne - f[MT_AUTH0]
    return fields, answers[:na], entries[:ne]
