"""HTTP/1.x parsing against Zeek's http.log baselines and Arkime's session http fields;
synthetic pipelining, 1xx, chunked, gaps, CONNECT and credentials cases; a fuzz run that must
not raise."""

from __future__ import annotations

import base64
import io
import json
import random
import re
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from _tls_harness import load
from _zeek_logs import read_zeek_log
from _zeek_logs import unescape as _unescape
from wiretrail.app import http
from wiretrail.app.base import Direction, Stream

CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "corpus"
ZEEK = CORPUS / "zeek"
ARKIME = CORPUS / "arkime"

_cache: dict[str, list] = {}


def streams_of(path: Path) -> list[Stream]:
    key = str(path)
    if key not in _cache:
        _cache[key] = load(path)[0]
    return _cache[key]


def http_rows(s: Stream) -> list[dict]:
    return [r for r in http.parse_stream(s) if "_table" not in r]


def _ours_str(v):
    """Our strings as Zeek writes them: bytes, non-ASCII escaped then read back one char a byte."""
    if v is None:
        return None
    return _unescape(v.encode("utf-8", "replace").decode("latin-1"))


# ---------------------------------------------------------------------------------------------
# Zeek http.log

ZEEK_FIELDS = ["method", "host", "uri", "referrer", "version", "user_agent", "origin", "status_code", "status_msg",
               "info_code", "info_msg", "request_body_len", "response_body_len", "username", "proxied",
               "orig_filenames", "resp_filenames", "orig_mime_types", "resp_mime_types"]
INT_FIELDS = {"status_code", "info_code", "request_body_len", "response_body_len"}
LIST_FIELDS = {"proxied", "orig_filenames", "resp_filenames", "orig_mime_types", "resp_mime_types"}


def _zkey(r: dict) -> tuple:
    return (r["id.orig_h"], int(r["id.orig_p"]), r["id.resp_h"], int(r["id.resp_p"]), int(r["trans_depth"]))


MIME_FIELDS = {"orig_mime_types", "resp_mime_types"}


def _norm(f: str, zv, ov):
    if f in INT_FIELDS:
        return (None if zv is None else int(zv)), ov
    if f in LIST_FIELDS:
        return sorted(zv or []), sorted(_ours_str(x) for x in (ov or []))
    return zv, _ours_str(ov)


def zeek_comparison():
    m = json.loads((ZEEK / "manifest.json").read_text())
    total = matched = 0
    agree, compared = Counter(), Counter()
    misses = []
    for t in m:
        if "http" not in t["logs"]:
            continue
        base = read_zeek_log(ZEEK / t["logs"]["http"])
        ours = {}
        for s in streams_of(ZEEK / t["trace"]):
            for r in http_rows(s):
                ours[(r["orig_h"], r["orig_p"], r["resp_h"], r["resp_p"], r["trans_depth"])] = r
        for b in base:
            total += 1
            o = ours.get(_zkey(b))
            if o is None:
                misses.append((t["name"], "row", _zkey(b)))
                continue
            matched += 1
            for f in ZEEK_FIELDS:
                if f not in b:
                    continue
                zv, ov = _norm(f, b[f], o.get(f))
                if f in MIME_FIELDS and not (zv and ov):
                    continue  # Zeek sniffs the body, we read the header: compare where both have one
                compared[f] += 1
                if zv == ov:
                    agree[f] += 1
                else:
                    misses.append((t["name"], f, _zkey(b)[1], zv, ov))
    return total, matched, agree, compared, misses


def test_zeek_http_log():
    total, matched, agree, compared, misses = zeek_comparison()
    figures = ", ".join(f"{f} {agree[f]}/{compared[f]}" for f in ZEEK_FIELDS if compared[f])
    print(f"\nzeek http.log: {matched}/{total} rows matched; {figures}")
    for mm in misses:
        print("  differs:", mm)
    # measured 102/104: the 2 left are the empty trans_depth-2 rows Zeek logs after an
    # unfinished HTTP/0.9 request
    assert matched >= total - 2
    exact = [f for f in ZEEK_FIELDS if f not in MIME_FIELDS | {"resp_filenames", "response_body_len"}]
    for f in exact:
        assert agree[f] == compared[f], f
    # http-port-22: Zeek counts 2 more bytes in a body delimited by the connection's end
    assert agree["response_body_len"] >= compared["response_body_len"] - 1
    # the URI rule names 3 downloads (application/octet-stream, /100MB.bin) Zeek leaves unnamed
    assert agree["resp_filenames"] >= compared["resp_filenames"] - 3
    # both sniffed from the body (app.magic): measured 74/74 and 3/3 (54/61 and 1/3 when ours came
    # from Content-Type headers)
    exact_mime = [f for f in MIME_FIELDS if agree[f] == compared[f]]
    assert sorted(exact_mime) == sorted(MIME_FIELDS) and compared["resp_mime_types"] >= 70


# ---------------------------------------------------------------------------------------------
# Arkime sessions' http fields (sets per session)


def _pct(v: str) -> str:
    return re.sub(r"%([0-9A-Fa-f]{2})", lambda m: chr(int(m.group(1), 16)), v)


ARKIME_FIELDS = ["method", "host", "uri", "statuscode", "useragent", "user", "clientVersion", "serverVersion", "xffIp"]


def _ours_sets(rows: list[dict]) -> dict[str, set]:
    out = defaultdict(set)
    for r in rows:
        if r.get("method"):
            out["method"].add(r["method"])
        host = r.get("host")
        if host is not None:
            out["host"].add(host.lower())
        if r.get("uri") is not None:
            out["uri"].add(_ours_str(((host or "").lower() if r["uri"].startswith("/") or not host else "")
                                     + r["uri"]))
        for f in ("status_code", "info_code"):
            if r.get(f) is not None and r.get(f) != 0:
                out["statuscode"].add(r[f])
        if r.get("user_agent") is not None:
            out["useragent"].add(r["user_agent"])
        if r.get("username") is not None:
            out["user"].add(r["username"])
        if r.get("_request_version") and r.get("method"):
            out["clientVersion"].add(r["_request_version"])
        if r.get("version") and r.get("status_code"):
            out["serverVersion"].add(r["version"])
        if r.get("xff"):  # Arkime keeps the first address, normalised
            first = r["xff"].split(",")[0].strip()
            try:
                out["xffIp"].add(".".join(str(int(x)) for x in first.split(".")) if first.count(".") == 3 else first)
            except ValueError:
                out["xffIp"].add(first)
    return out


def _arkime_sets(h: dict) -> dict[str, set]:
    out = {}
    for f in ARKIME_FIELDS:
        if f in h:
            vals = h[f]
            if f == "uri":
                vals = [_pct(v) for v in vals]
            if f == "host":
                # Arkime adds the host without its port next to the Host header's value
                vals = [v.lower() for v in vals]
            out[f] = set(vals)
    return out


def arkime_comparison():
    m = json.loads((ARKIME / "manifest.json").read_text())
    total = matched = 0
    agree, compared = Counter(), Counter()
    misses = []
    for t in m:
        if "http" not in t["protocols"]:
            continue
        ours = defaultdict(list)
        for s in streams_of(ARKIME / t["pcap"]):
            ours[(s.orig_h, s.orig_p, s.resp_h, s.resp_p)] += http_rows(s)
        for sess in json.loads((ARKIME / t["test"]).read_text())["sessions3"]:
            b = sess["body"]
            if "http" not in b or b.get("ipProtocol") != 6:
                continue
            key = (b["source"]["ip"], b["source"]["port"], b["destination"]["ip"], b["destination"]["port"])
            if "method" not in b["http"] and "statuscode" not in b["http"]:
                continue  # a TLS session's http.host (SNI): not HTTP/1.x
            if "PRI" in b["http"].get("method", []):
                continue  # HTTP/2 prior knowledge: not HTTP/1.x
            total += 1
            rows = ours.get(key)
            if not rows:
                misses.append((t["pcap"], "session", key))
                continue
            matched += 1
            a, o = _arkime_sets(b["http"]), _ours_sets(rows)
            for f in ARKIME_FIELDS:
                if f not in a:
                    continue
                if f == "user" and "basic" not in b["http"].get("authType", []):
                    continue  # digest/NTLM users: http.log's username is basic auth only
                if f == "uri" and any(" " in u for u in o.get(f, ())) and \
                        {u.split(" ", 1)[0] for u in o[f]} == a[f]:
                    continue  # a space in the request target: Zeek's rule (ours) reads the URI up
                    # to " HTTP/", Arkime's stops at the space
                if f == "host":
                    ok = o.get(f, set()) <= a[f] and bool(o.get(f)) == bool(a[f])
                else:
                    ok = o.get(f, set()) == a[f]
                compared[f] += 1
                if ok:
                    agree[f] += 1
                else:
                    misses.append((t["pcap"], f, key[1], sorted(a[f], key=str), sorted(o.get(f, set()), key=str)))
    return total, matched, agree, compared, misses


def test_arkime_http_fields():
    total, matched, agree, compared, misses = arkime_comparison()
    figures = ", ".join(f"{f} {agree[f]}/{compared[f]}" for f in ARKIME_FIELDS if compared[f])
    print(f"\narkime http: {matched}/{total} sessions matched; {figures}")
    for mm in misses:
        print("  differs:", mm)
    # unmatched: 7 sessions are HTTP inside SOCKS (the stream starts with the SOCKS handshake;
    # this test runs the http module alone, the stage hands it what follows the handshake)
    assert matched >= total - 7
    for f in ARKIME_FIELDS:
        assert agree[f] == compared[f], f


# ---------------------------------------------------------------------------------------------
# Synthetic cases

T0 = 1_700_000_000_000_000_000


def _dir(data: bytes, gaps=(), times=None) -> Direction:
    """times: [(offset, ns after T0)]"""
    times = times or [(0, 0)]
    return Direction(data=data, gaps=list(gaps), ts_offsets=np.array([o for o, _ in times], dtype=np.int64),
                     ts=np.array([T0 + t for _, t in times], dtype=np.int64))


def _stream(orig: bytes, resp: bytes, ogaps=(), rgaps=(), otimes=None, rtimes=None, port=80) -> Stream:
    return Stream(uid="Chttp", orig_h="10.0.0.1", orig_p=40000, resp_h="10.0.0.2", resp_p=port,
                  orig=_dir(orig, ogaps, otimes), resp=_dir(resp, rgaps, rtimes))


def _split(rows):
    return [r for r in rows if "_table" not in r], [r for r in rows if r.get("_table") == "credentials"]


def test_pipelining_head_304_204_and_chunked():
    orig = (b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nHEAD /b HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET /c HTTP/1.1\r\nHost: x\r\nIf-None-Match: 1\r\n\r\nPOST /d HTTP/1.1\r\nHost: x\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n3;ext=1\r\nabc\r\n0\r\nX-Trailer: 1\r\n\r\n"
            b"DELETE /e HTTP/1.1\r\nHost: x\r\n\r\n")
    resp = (b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\nContent-Type: text/plain\r\n\r\nabcd"
            b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n"          # HEAD: no body despite the length
            b"HTTP/1.1 304 Not Modified\r\nContent-Length: 50\r\n\r\n"
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nwxyz\r\n10\r\n0123456789abcdef\r\n0\r\n\r\n"
            b"HTTP/1.1 204\r\n\r\n")
    rows, creds = _split(http.parse_stream(_stream(orig, resp)))
    assert not creds
    assert [(r["trans_depth"], r["method"], r["uri"], r["status_code"]) for r in rows] == [
        (1, "GET", "/a", 200), (2, "HEAD", "/b", 200), (3, "GET", "/c", 304), (4, "POST", "/d", 200),
        (5, "DELETE", "/e", 204)]
    assert [r["response_body_len"] for r in rows] == [4, 0, 0, 20, 0]
    assert rows[3]["request_body_len"] == 8 and rows[3]["request_chunked"] and rows[3]["response_chunked"]
    assert rows[4]["status_msg"] == "<empty>"
    # "abcd" is too short to be called text (Zeek's plain-text signature wants 10 characters)
    assert rows[0]["response_content_type"] == "text/plain" and rows[0].get("resp_mime_types") is None
    assert rows[3]["resp_mime_types"] == ["text/plain"]  # de-chunked: "wxyz0123456789abcdef"
    assert not any(r["malformed"] for r in rows)


def test_100_continue_and_response_without_request():
    orig = b"POST /up HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\nabc"
    resp = (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 102 Processing\r\n\r\n"
            b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok"
            b"HTTP/1.1 500 Oops\r\nContent-Length: 0\r\n\r\n")
    rows = http.parse_stream(_stream(orig, resp))
    assert len(rows) == 2
    assert (rows[0]["info_code"], rows[0]["info_msg"], rows[0]["status_code"]) == (102, "Processing", 201)
    assert rows[0]["request_body_len"] == 3 and rows[0]["response_body_len"] == 2
    assert rows[1].get("method") is None and rows[1]["status_code"] == 500 and rows[1]["trans_depth"] == 2


def test_status_that_is_not_a_number():
    """Kept as sent for Suricata's status_string; Zeek's fields as Zeek writes them."""
    from wiretrail.export.eve import _http

    rows = http.parse_stream(_stream(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n",
                                     b"HTTP/1.1 2XX OK\r\nContent-Length: 2\r\n\r\nok"))
    assert (rows[0]["status_code"], rows[0]["status_msg"], rows[0]["status_string"]) == (0, "<empty>", "2XX")
    assert rows[0]["malformed"]
    event = _http({**rows[0], "uid": "C0000000001A", "ts_ns": 0})[0]["http"]
    assert event["status_string"] == "2XX" and "status" not in event
    ok = http.parse_stream(_stream(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n", b"HTTP/1.1 200 OK\r\n\r\n"))
    assert ok[0]["status_code"] == 200 and ok[0].get("status_string") is None


def test_body_until_close_http09_and_inflated_length():
    import gzip
    import zlib
    payload = b"x" * 5000
    gz = gzip.compress(payload)
    raw_deflate = zlib.compressobj(6, zlib.DEFLATED, -15)
    rd = raw_deflate.compress(payload) + raw_deflate.flush()
    orig = b"GET /1 HTTP/1.1\r\n\r\nGET /2 HTTP/1.1\r\n\r\nGET /3 HTTP/1.0\r\n\r\n"
    resp = (b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n" % len(gz) + gz
            + b"HTTP/1.1 200 OK\r\nContent-Encoding: deflate\r\nContent-Length: %d\r\n\r\n" % len(rd) + rd
            + b"HTTP/1.0 200 OK\r\n\r\nuntil the end\r\n")
    rows = http.parse_stream(_stream(orig, resp))
    assert [r["response_body_len"] for r in rows] == [5000, 5000, 15]
    assert rows[0]["response_content_encoding"] == "gzip"
    rows = http.parse_stream(_stream(b"GET /old.html\r\n", b"<html>hi</html>\n"))
    assert [(r["method"], r["uri"], r["version"], r["status_code"], r["status_msg"], r["response_body_len"])
            for r in rows] == [("GET", "/old.html", "0.9", 0, "<empty>", 16)]


def test_connect_and_upgrade_stop_the_parse():
    orig = b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\nProxy-Connection: keep-alive\r\n\r\n\x16\x03\x01garbage"
    resp = b"HTTP/1.1 200 Connection established\r\n\r\n\x16\x03\x03more garbage GET / HTTP/1.1\r\n\r\n"
    [row] = http.parse_stream(_stream(orig, resp, port=3128))
    assert row["method"] == "CONNECT" and row["uri"] == "example.com:443" and row["status_code"] == 200
    assert row["proxied"] == ["PROXY-CONNECTION -> keep-alive"] and row["response_body_len"] == 0
    # a refused CONNECT: the client carries on with plain requests
    orig = b"CONNECT a:443 HTTP/1.1\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n"
    resp = b"HTTP/1.1 407 Auth\r\nContent-Length: 0\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
    rows = http.parse_stream(_stream(orig, resp))
    assert [(r["method"], r["status_code"]) for r in rows] == [("CONNECT", 407), ("GET", 200)]
    orig = b"GET /chat HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n\x81\x85abcdefghi"
    resp = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n\x81\x05hello"
    [row] = http.parse_stream(_stream(orig, resp))
    assert row["status_code"] == 101 and row.get("info_code") is None


def test_gaps_in_body_counted_and_header_gap_resyncs():
    body = b"B" * 1000
    resp_full = b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + body + b"HTTP/1.1 404 NF\r\nContent-Length: 2\r\n\r\nno"
    hl = resp_full.index(b"B")
    # 300 body bytes never seen: counted as body, the next response still found
    resp = resp_full[:hl + 100] + resp_full[hl + 400:]
    orig = b"GET /a HTTP/1.1\r\n\r\nGET /b HTTP/1.1\r\n\r\n"
    rows = http.parse_stream(_stream(orig, resp, rgaps=[(hl + 100, 300)]))
    assert [(r["uri"], r["status_code"], r["response_body_len"], r["gap_bytes"]) for r in rows] == [
        ("/a", 200, 1000, 300), ("/b", 404, 2, 0)]
    # a gap inside the second request's headers: that request is flagged, the third is found again
    orig = (b"GET /1 HTTP/1.1\r\nHost: h\r\n\r\nGET /2 HTTP/1.1\r\nHost: h\r\nCookie: a=1\r\n\r\n"
            b"GET /3 HTTP/1.1\r\nHost: h\r\n\r\n")
    cut = orig.index(b"Cookie")
    o2 = orig[:cut] + orig[cut + 10:]
    resp = b"".join(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n%d" % i for i in (1, 2, 3))
    r0 = resp.index(b"HTTP", 1)
    r1 = resp.index(b"HTTP", r0 + 1)
    rows = http.parse_stream(_stream(o2, resp, ogaps=[(cut, 10)],
                                     otimes=[(0, 0), (orig.index(b"GET /2"), 20), (orig.index(b"GET /3") - 10, 40)],
                                     rtimes=[(0, 10), (r0, 30), (r1, 50)]))
    assert [(r["uri"], r["status_code"]) for r in rows] == [("/1", 200), ("/2", 200), ("/3", 200)]
    assert rows[1]["malformed"] and not rows[2]["malformed"]


def test_message_right_after_a_gap_that_ended_a_body():
    """A body that ends inside a gap, the gap running on past it: the next message, starting
    where the gap ends, is still read (Suricata's http-gap-whole-body), on either side."""
    resp_full = b"".join(b"HTTP/1.0 200 OK\r\nContent-Length: 12\r\n\r\n" + b"%012d" % i + b"\r\n" for i in (1, 2, 3))
    hl = resp_full.index(b"000000000001")
    resp = resp_full[:hl] + resp_full[hl + 14:]  # the first body and the CRLF after it never seen
    orig = b"GET /1 HTTP/1.0\r\n\r\nGET /2 HTTP/1.0\r\n\r\nGET /3 HTTP/1.0\r\n\r\n"
    rows = http.parse_stream(_stream(orig, resp, rgaps=[(hl, 14)], otimes=[(0, 0), (19, 20), (38, 40)],
                                     rtimes=[(0, 10), (hl, 30), (resp.index(b"HTTP", hl + 1), 50)]))
    assert [(r["uri"], r["status_code"], r["response_body_len"], r["gap_bytes"]) for r in rows] == [
        ("/1", 200, 12, 12), ("/2", 200, 12, 0), ("/3", 200, 12, 0)]
    body = b"x=1&y=2"
    orig_full = b"".join(b"POST /%d HTTP/1.1\r\nContent-Length: 7\r\n\r\n" % i + body + b"\r\n" for i in (1, 2))
    cut = orig_full.index(body)
    orig = orig_full[:cut] + orig_full[cut + 9:]
    resp = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n" * 2
    rows = http.parse_stream(_stream(orig, resp, ogaps=[(cut, 9)], otimes=[(0, 0), (cut, 20)],
                                     rtimes=[(0, 10), (len(resp) // 2, 30)]))
    assert [(r["uri"], r["status_code"], r["request_body_len"]) for r in rows] == [("/1", 200, 7), ("/2", 200, 7)]


def test_basic_auth_and_login_form_credentials():
    auth = base64.b64encode(b"alice:s3cr:et").decode()
    orig = (b"GET /private HTTP/1.1\r\nHost: h\r\nAuthorization: Basic " + auth.encode() + b"\r\n"
            b"X-Forwarded-For: 192.0.2.7, 10.0.0.9\r\nVia: 1.1 proxy\r\n\r\n")
    body = b"login=bob&password=hunter2&remember=1"
    orig += (b"POST /login HTTP/1.1\r\nHost: h\r\nContent-Type: application/x-www-form-urlencoded\r\n"
             b"Content-Length: %d\r\n\r\n" % len(body) + body)
    resp = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\nHTTP/1.1 302 Found\r\nContent-Length: 0\r\n\r\n"
    rows, creds = _split(http.parse_stream(_stream(orig, resp)))
    assert rows[0]["username"] == "alice" and rows[0]["xff"] == "192.0.2.7, 10.0.0.9"
    assert rows[0]["proxied"] == ["X-FORWARDED-FOR -> 192.0.2.7, 10.0.0.9", "VIA -> 1.1 proxy"]
    assert [(c["mechanism"], c["user"], c["_password"]) for c in creds] == [
        ("basic auth", "alice", "s3cr:et"), ("form field password", "bob", "hunter2")]
    assert all(c["protocol"] == "http" and c["password_hash"].startswith("sha256$") for c in creds)


def test_filenames_mime_and_uri_decoding():
    orig = b"GET /dl/setup%20v2.exe?x=%41 HTTP/1.1\r\nHost: h\r\n\r\nGET /r HTTP/1.1\r\n\r\n"
    resp = (b"HTTP/1.1 200 OK\r\nContent-Type: application/x-msdownload\r\nContent-Length: 2\r\n\r\nMZ"
            b"HTTP/1.1 200 OK\r\nContent-Type: text/csv; charset=utf-8\r\n"
            b"Content-Disposition: attachment; filename=\"report.csv\"\r\nContent-Length: 3\r\n\r\na,b")
    rows = http.parse_stream(_stream(orig, resp))
    assert rows[0]["uri"] == "/dl/setup v2.exe?x=A"
    assert rows[0]["resp_filenames"] == ["setup v2.exe"] and rows[0]["resp_mime_types"] == ["application/x-dosexec"]
    assert rows[0]["response_content_type"] == "application/x-msdownload"
    assert rows[1]["resp_filenames"] == ["report.csv"] and rows[1].get("resp_mime_types") is None
    assert rows[1]["response_content_type"] == "text/csv"


def test_mime_types_are_sniffed_from_the_decoded_body():
    import gzip

    page = b"<!-- generated -->\n<!DOCTYPE html><html><body>hi</body></html>"
    packed = gzip.compress(page)
    form = (b"--XyZ\r\nContent-Disposition: form-data; name=\"f\"; filename=\"a.gif\"\r\n"
            b"Content-Type: text/plain\r\n\r\nGIF89a\x01\x00\x01\x00\x00\x00\x00;\r\n--XyZ--\r\n")
    orig = (b"GET /img HTTP/1.1\r\nHost: h\r\n\r\nGET /page HTTP/1.1\r\nHost: h\r\n\r\n"
            b"POST /up HTTP/1.1\r\nHost: h\r\nContent-Type: multipart/form-data; boundary=XyZ\r\n"
            b"Content-Length: %d\r\n\r\n" % len(form) + form)
    gif = b"GIF89a\x10\x00\x10\x00\x80\x00\x00" + bytes(20)
    resp = (b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: %d\r\n\r\n" % len(gif) + gif
            + b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Encoding: gzip\r\n"
            b"Content-Length: %d\r\n\r\n" % len(packed) + packed
            + b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    rows = http.parse_stream(_stream(orig, resp))
    assert rows[0]["resp_mime_types"] == ["image/gif"] and rows[0]["response_content_type"] == "image/png"
    assert rows[1]["resp_mime_types"] == ["text/html"] and rows[1]["response_body_len"] == len(page)
    assert rows[2]["orig_filenames"] == ["a.gif"] and rows[2]["orig_mime_types"] == ["image/gif"]
    assert rows[2]["request_content_type"] == "multipart/form-data"


def test_magic_names_and_pathological_starts():
    from wiretrail.app.magic import HEAD_BYTES, sniff

    assert sniff(b"<?xml version='1.0'?>\n<!DOCTYPE html>\n<html>") == "text/html"  # HTML beats XML
    assert sniff(b"<?xml version='1.0'?><svg/>") == "application/xml"
    assert sniff(b"<svg xmlns='http://www.w3.org/2000/svg'/>") == "text/plain"  # Zeek has no SVG signature
    assert sniff(b'\xef\xbb\xbf {"name": "x"}') == "text/json" and sniff(b"[1, 2]") == "text/json"
    assert sniff(b"\x7fELF\x02\x01") == "application/x-executable" and sniff(b"\x00\x01\x02") is None
    assert sniff(b"") is None and sniff(None) is None and sniff(b"123456789") is None
    # long runs of blanks or unclosed comments before markup: the patterns cannot backtrack
    # into them (a nested-quantifier version took minutes on these)
    assert sniff(b" " * HEAD_BYTES) == "text/plain" and sniff(b"<!--" * (HEAD_BYTES // 4)) == "text/plain"
    assert sniff(b"\n" * (HEAD_BYTES - 7) + b"<html>") == "text/html"


def test_not_http_gives_no_rows():
    assert http.parse_stream(_stream(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc", b"\x16\x03\x03")) == []
    assert http.parse_stream(_stream(b"SSH-2.0-OpenSSH_9.0\r\n", b"SSH-2.0-x\r\n")) == []
    assert http.parse_stream(_stream(b"", b"")) == []


# ---------------------------------------------------------------------------------------------
# Fuzz


def _seeds() -> list[tuple[bytes, bytes]]:
    seeds = []
    for name in ("http/100-continue.pcap", "http/pipelined-requests.pcap", "http/x-gzip.pcap",
                 "http/connect-with-smtp.pcap", "http/multipart-form-data.pcap", "http/methods.pcap"):
        p = ZEEK / "traces" / name
        if p.exists():
            for s in streams_of(p)[:6]:
                if s.orig.data or s.resp.data:
                    seeds.append((s.orig.data[:5000], s.resp.data[:5000]))
    seeds.append((b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Type: multipart/form-data; boundary=zz\r\n\r\n"
                  b"20\r\n--zz\r\nContent-Disposition: form-data; name=\"f\"; filename=\"a\"\r\n\r\n0\r\n\r\n",
                  b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: 10\r\n\r\n\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03"))
    return seeds


def _mutate(rng: random.Random, b: bytes) -> bytes:
    b = bytearray(b)
    for _ in range(rng.randint(1, 8)):
        op = rng.random()
        if not b:
            b += rng.randbytes(rng.randint(1, 64))
        elif op < 0.35:
            b[rng.randrange(len(b))] = rng.randrange(256)
        elif op < 0.5:
            del b[rng.randrange(len(b)):]
        elif op < 0.65:
            i = rng.randrange(len(b))
            b[i:i] = rng.choice([rng.randbytes(rng.randint(1, 16)), b"\r\n", b"\r\n\r\n", b"HTTP/1.1 ", b": ",
                                 b"Content-Length: 99999\r\n", b"Transfer-Encoding: chunked\r\n", b"ffffffff\r\n",
                                 b"-5\r\n", b"GET / HTTP/1.1\r\n"])
        elif op < 0.8:
            i = rng.randrange(len(b))
            del b[i:i + rng.randint(1, 32)]
        else:
            i = rng.randrange(len(b))
            b[i:i + 1] = rng.choice([b"\n", b"\r", b" ", b"\x00", b"%", b":", b"0"])
    return bytes(b)


def _gaps(rng: random.Random, n: int) -> list[tuple[int, int]]:
    if n == 0 or rng.random() < 0.6:
        return []
    offs = sorted(rng.sample(range(n), min(n, rng.randint(1, 3))))
    return [(o, rng.randint(1, 5000)) for o in offs]


def test_fuzz_never_raises():
    rng = random.Random(4321)
    seeds = _seeds()
    names = set(http.SCHEMA.names)
    flagged = 0
    for i in range(5000):
        o, r = rng.choice(seeds)
        if i % 3 != 1:
            o = _mutate(rng, o)
        if i % 3 != 0:
            r = _mutate(rng, r)
        s = _stream(o, r, ogaps=_gaps(rng, len(o)), rgaps=_gaps(rng, len(r)))
        rows, _ = _split(http._Parser(s).run() if http._looks_like_http(s) else [])  # no guard: bugs surface
        for row in rows:
            assert {k for k in row if not k.startswith("_")} <= names
            flagged += bool(row["malformed"])
    print(f"\nfuzz: 5000 mutated HTTP sessions (gaps in 2 of 5), no exception; {flagged} rows flagged malformed")


# ---------------------------------------------------------------------------------------------
# The real pipeline: ingest, then SQL


def _sql(store, query):
    from wiretrail.query import run_sql
    buf = io.StringIO()
    run_sql(store, query, "json", buf)
    return [json.loads(line) for line in buf.getvalue().splitlines() if line.strip()]


def test_pipeline_http_and_credentials_tables(tmp_path):
    from wiretrail.ingest import IngestOptions, ingest
    traces = [ZEEK / "traces/http/pipelined-requests.pcap", ZEEK / "traces/http/basic-auth-with-colon.pcap",
              ZEEK / "traces/http/100-continue.pcap", ARKIME / "80211http.pcap", ARKIME / "arkime_synthetic.pcap"]
    store = tmp_path / "store"
    ingest(traces, IngestOptions(store=store))
    rows = _sql(store, "select orig_p, trans_depth, method, uri, status_code, response_body_len, username, info_code "
                       "from http where orig_p in (1673, 43090, 54102) order by orig_p, trans_depth")
    assert [(r["orig_p"], r["trans_depth"], r["status_code"]) for r in rows] == (
        [(1673, i, 200) for i in range(1, 6)] + [(43090, 1, 200), (54102, 1, 200)])
    assert [r["response_body_len"] for r in rows[:5]] == [2675, 21421, 94, 2349, 27579]
    assert rows[5]["username"] == "test" and rows[6]["info_code"] == 100
    c = _sql(store, "select mechanism, \"user\", password_length from credentials where protocol = 'http' "
                    "order by mechanism, \"user\"")
    assert {"mechanism": "basic auth", "user": "test", "password_length": 4} in c
    assert {"mechanism": "basic auth", "user": "username", "password_length": 8} in c
    assert {"mechanism": "json field password", "user": "testuser", "password_length": 8} in c
    print(f"\npipeline: {len(_sql(store, 'select uid from http'))} http rows, credentials {c}")


def test_speed_1000_transactions():
    import time
    hdr = b"Host: www.example.com\r\nUser-Agent: Mozilla/5.0 Firefox/120.0\r\nAccept: */*\r\nCookie: a=1; b=2\r\n"
    orig = b"".join(b"GET /item/%d?q=1 HTTP/1.1\r\n" % i + hdr + b"\r\n" for i in range(1000))
    resp = b"".join(b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: 8000\r\n\r\n" + b"x" * 8000
                    for _ in range(500))
    resp += b"".join(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                     + b"".join(b"400\r\n" + b"y" * 1024 + b"\r\n" for _ in range(8)) + b"0\r\n\r\n" for _ in range(500))
    s = _stream(orig, resp)
    t = time.perf_counter()
    rows = http.parse_stream(s)
    dt = time.perf_counter() - t
    assert len(rows) == 1000 and rows[-1]["response_body_len"] == 8192 and rows[0]["response_body_len"] == 8000
    print(f"\nspeed: 1000 transactions ({(len(orig) + len(resp)) >> 20} MiB) in {dt * 1000:.0f} ms")
    assert dt < 2.0  # measured ~35 ms on one core


def test_headers_kept_as_sent_and_bounded():
    orig = (b"GET / HTTP/1.1\r\nHOST: x\r\nX-Forwarded-For: 1.2.3.4\r\nAccept:  a/b \r\n"
            b"X-Long: one\r\n  two\r\nCookie: a=1\r\ncookie: b=2\r\n\r\n")
    many = b"".join(b"H%d: %s\r\n" % (i, b"v" * (5000 if i == 0 else 1)) for i in range(200))
    resp = b"HTTP/1.1 200 OK\r\n" + b"N" * 300 + b": n\r\n" + many + b"Content-Length: 0\r\n\r\n"
    row = http.parse_stream(_stream(orig, resp))[0]
    assert row["request_headers"] == [("HOST", "x"), ("X-Forwarded-For", "1.2.3.4"), ("Accept", "a/b"),
                                      ("X-Long", "one two"), ("Cookie", "a=1"), ("cookie", "b=2")]
    assert row["host"] == "x" and row["proxied"] == ["X-FORWARDED-FOR -> 1.2.3.4"]
    got = row["response_headers"]
    assert len(got) == http.MAX_HEADERS and got[0] == ("N" * http.MAX_HEADER_NAME, "n")
    assert got[1] == ("H0", "v" * http.MAX_HEADER_VALUE) and got[-1] == (f"H{http.MAX_HEADERS - 2}", "v")


def _tshark_header_lines(pcap: Path) -> Counter:
    """Every header line tshark reads in HTTP messages, as (client port, direction, line)."""
    import subprocess

    cmd = ["tshark", "-n", "-r", str(pcap), "-Y", "http.request or http.response", "-T", "fields",
           "-E", "separator=/t", "-E", "occurrence=a", "-E", "aggregator=\x1f", "-e", "tcp.srcport",
           "-e", "tcp.dstport", "-e", "http.request", "-e", "http.request.line", "-e", "http.response.line"]
    out = Counter()
    for line in subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout.splitlines():
        sport, dport, is_request, req_lines, resp_lines = (line.split("\t") + [""] * 5)[:5]
        port, lines = (int(sport), req_lines) if is_request else (int(dport), resp_lines)
        for h in filter(None, lines.split("\x1f")):
            name, _, value = h.removesuffix("\\n").removesuffix("\\r").partition(":")  # tshark escapes the CRLF
            out[port, bool(is_request), f"{name.strip()}: {value.strip()}"] += 1
    return out


def test_headers_against_tshark():
    """Each stored header, written back as a line, is one tshark read, in the messages both read."""
    import shutil

    if shutil.which("tshark") is None:
        return
    same = total = 0
    for pcap in sorted((ZEEK / "traces" / "http").glob("*.pcap")):
        theirs = _tshark_header_lines(pcap)
        ours = Counter()
        for s in streams_of(pcap):
            for r in http_rows(s):
                for key, is_request in (("request_headers", True), ("response_headers", False)):
                    for name, value in r.get(key) or []:
                        ours[s.orig_p, is_request, f"{name}: {value}"] += 1
        # messages both read (methods.pcap's odd methods, for one, are not HTTP to the parser)
        read = {(port, is_request) for port, is_request, _ in ours}
        theirs = Counter({k: n for k, n in theirs.items() if k[:2] in read})
        total += sum(theirs.values())
        same += sum((ours & theirs).values())
        if ours != theirs:
            print(f"  {pcap.name}: tshark only {list((theirs - ours).items())[:3]}, "
                  f"ours only {list((ours - theirs).items())[:3]}")
    print(f"\nhttp header lines vs tshark: {same}/{total} equal")
    assert total >= 200 and same == total
