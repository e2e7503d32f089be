"""SOCKS handshakes (socks table, credentials) and the connection they carry, on Arkime's captures."""

from __future__ import annotations

import json
from io import StringIO
from pathlib import Path

import pytest

from wiretrail.ingest import IngestOptions, ingest
from wiretrail.query import run_sql

ARKIME = Path(__file__).resolve().parents[1].parent / "shared" / "corpus" / "arkime"
pytestmark = pytest.mark.skipif(not ARKIME.is_dir(), reason="corpus not found")


def rows(tmp_path: Path, pcap: str, query: str) -> list[dict]:
    store = tmp_path / pcap
    if not store.exists():
        ingest([ARKIME / pcap], IngestOptions(store=store))
    buf = StringIO()
    run_sql(store, query, "json", buf)
    return [json.loads(x) for x in buf.getvalue().splitlines()]


def test_socks5_carries_http(tmp_path):
    socks = rows(tmp_path, "socks5-http-302.pcap", "SELECT uid, version, status, request_name, request_p FROM socks")
    assert [(r["version"], r["status"], r["request_name"], r["request_p"]) for r in socks] == \
        [(5, "succeeded", "www.google.com", 80)]
    http = rows(tmp_path, "socks5-http-302.pcap", "SELECT uid, host, status_code FROM http")
    assert [(r["uid"], r["status_code"]) for r in http] == [(socks[0]["uid"], 302)]


def test_socks4_carries_tls(tmp_path):
    socks = rows(tmp_path, "socks4-https.pcap", "SELECT uid, version, user, request_name, request_p FROM socks")
    assert len(socks) == 1 and socks[0]["version"] == 4 and socks[0]["request_p"] == 443
    tls = rows(tmp_path, "socks4-https.pcap", "SELECT uid, version FROM tls")
    certs = rows(tmp_path, "socks4-https.pcap", "SELECT uid, subject FROM x509")
    assert [r["uid"] for r in tls] == [socks[0]["uid"]] and tls[0]["version"]
    assert certs and {c["uid"] for c in certs} == {socks[0]["uid"]}


def test_socks5_login_is_a_credential(tmp_path):
    socks = rows(tmp_path, "socks-http-pass.pcap", "SELECT user, password, status FROM socks WHERE user IS NOT NULL")
    creds = rows(tmp_path, "socks-http-pass.pcap", "SELECT protocol, user, password_hash FROM credentials")
    assert socks and all(r["password"] == "<hidden>" for r in socks)
    assert {(c["protocol"], c["user"]) for c in creds} == {("socks", r["user"]) for r in socks}


SV = ARKIME.parent / "suricata-verify" / "tests" / "http-connect" / "http-connect-simple"


@pytest.mark.skipif(not SV.is_dir(), reason="corpus not found")
def test_http_connect_carries_http(tmp_path):
    store = tmp_path / "s"
    ingest(list(SV.glob("*.pcap")), IngestOptions(store=store))
    buf = StringIO()
    run_sql(store, "SELECT method, uri, status_code FROM http ORDER BY ts", "json", buf)
    got = [json.loads(x) for x in buf.getvalue().splitlines()]
    assert [(r["method"], r["status_code"]) for r in got] == [("CONNECT", 200), ("GET", 200)]
