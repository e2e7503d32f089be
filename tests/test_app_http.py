"""HTTP/1.x parsing against Zeek's http.log baselines and Arkime's session http fields;
synthetic pipelining, 1xx, chunked, gaps, CONNECT and credentials cases; a fuzz run that must
not raise."""

from __future__ import annotations

import base64
import json
import random
import re
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest

from _tls_harness import load
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


def _unescape(v: str) -> str:
    return re.sub(r"\\x([0-9a-fA-F]{2})", lambda m: chr(int(m.group(1), 16)), v)


def _ours_str(v):
    """Our strings as Zeek writes them: bytes, non-ASCII escaped then read back one char a byte."""
    if v is None:
        return None
    return _unescape(v.encode("utf-8", "replace").decode("latin-1"))


def read_zeek_log(path: Path) -> list[dict]:
    fields, types, rows = [], [], []
    for line in path.read_text().splitlines():
        if line.startswith("#fields"):
            fields = line.split("\t")[1:]
        elif line.startswith("#types"):
            types = line.split("\t")[1:]
        elif line and not line.startswith("#"):
            row = {}
            for f, t, v in zip(fields, types, line.split("\t")):
                if v == "-":
                    row[f] = None
                elif t.startswith(("vector", "set")):
                    row[f] = [] if v == "(empty)" else [_unescape(x) for x in v.split(",")]
                elif v == "(empty)":
                    row[f] = ""
                else:
                    row[f] = _unescape(v)
            rows.append(row)
    return rows


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
    # 9 rows are inside AYIYA/Teredo/GTP/GRE-over-UDP tunnels the decoder does not open; 2 are
    # the empty trans_depth-2 rows Zeek logs after an unfinished HTTP/0.9 request
    assert matched >= total - 11
    exact = [f for f in ZEEK_FIELDS if f not in MIME_FIELDS | {"resp_filenames", "response_body_len"}]
    for f in exact:
        assert agree[f] == compared[f], f
    # http-port-22: Zeek counts 2 more bytes in a body delimited by the connection's end
    assert agree["response_body_len"] >= compared["response_body_len"] - 1
    # the URI rule names 3 downloads (application/octet-stream, /100MB.bin) Zeek leaves unnamed
    assert agree["resp_filenames"] >= compared["resp_filenames"] - 3
    # Zeek's sniffed types vs the Content-Type header, where both exist
    assert agree["resp_mime_types"] >= compared["resp_mime_types"] - 7
    assert agree["orig_mime_types"] >= compared["orig_mime_types"] - 2


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
    # unmatched: 7 sessions are HTTP inside SOCKS (the stream starts with the SOCKS handshake),
    # 1 is 802.11/radiotap and 1 GRE/ERSPAN/VXLAN, which the decoder does not open
    assert matched >= total - 9
    for f in ARKIME_FIELDS:
        assert agree[f] == compared[f], f
