"""Telnet logins and their credentials: nDPI's telnet capture, typed-by-character logins, fuzz."""

from __future__ import annotations

import json
import random
from io import StringIO
from pathlib import Path

import numpy as np
import pytest

from wiretrail.app import telnet
from wiretrail.app.base import Direction, Stream
from wiretrail.app.credentials import check
from wiretrail.ingest import IngestOptions, ingest
from wiretrail.query import run_sql

PCAP = Path(__file__).resolve().parents[1].parent / "shared" / "corpus" / "ndpi" / "pcap" / "telnet.pcap"


def sql(store, q):
    buf = StringIO()
    run_sql(store, q, "json", buf)
    return [json.loads(x) for x in buf.getvalue().splitlines()]


@pytest.mark.skipif(not PCAP.exists(), reason="corpus not found")
def test_login_in_ndpi_capture(tmp_path):
    ingest([PCAP], IngestOptions(store=tmp_path / "s"))
    rows = sql(tmp_path / "s", "SELECT user, password_seen, success, uid FROM telnet")
    creds = sql(tmp_path / "s", "SELECT user, password_hash, password_masked, weak, uid FROM credentials")
    assert rows == [{"user": "fake", "password_seen": True, "success": True, "uid": rows[0]["uid"]}]
    assert len(creds) == 1 and creds[0]["user"] == "fake" and creds[0]["uid"] == rows[0]["uid"]
    assert check("user", creds[0]["password_hash"]) and creds[0]["weak"]  # the capture's password, hashed


def stream(events: list[tuple[bool, bytes]]) -> Stream:
    """A session from (client?, bytes) packets, one per millisecond."""
    sides = {True: [], False: []}
    for k, (client, data) in enumerate(events):
        sides[client].append((k * 1_000_000, data))

    def direction(chunks):
        offs, ts, data = [], [], b""
        for t, d in chunks:
            offs.append(len(data))
            ts.append(t)
            data += d
        return Direction(data=data, ts_offsets=np.array(offs, dtype=np.int64), ts=np.array(ts, dtype=np.int64))
    return Stream(uid="Cx", orig_h="10.0.0.1", orig_p=40000, resp_h="10.0.0.2", resp_p=23,
                  orig=direction(sides[True]), resp=direction(sides[False]))


def test_typed_one_character_at_a_time_with_echo_and_backspace():
    ev = [(False, b"\xff\xfd\x18\xff\xfb\x01"), (True, b"\xff\xfc\x18"), (False, b"Ubuntu 22.04\r\nhost login: ")]
    for ch in b"rooX\x7ft\r":
        ev += [(True, bytes([ch])), (False, bytes([ch]) if ch >= 32 else b"\r\n")]
    ev += [(False, b"Password: ")]
    ev += [(True, bytes([ch])) for ch in b"S3cret!pw\r"]
    ev += [(False, b"\r\nLogin incorrect\r\nhost login: ")]
    rows = telnet.parse_stream(stream(ev))
    logins = [r for r in rows if "_table" not in r]
    creds = [r for r in rows if r.get("_table") == "credentials"]
    assert [r["user"] for r in logins] == ["root"] and logins[0]["success"] is False
    assert logins[0]["banner"] == "Ubuntu 22.04"
    assert creds[0]["_password"] == "S3cret!pw" and creds[0]["user"] == "root" and not creds[0]["weak"]


def test_fuzz_never_raises():
    rng = random.Random(3)
    base = [(False, b"login: "), (True, b"bob\r\n"), (False, b"Password: "), (True, b"pw\r\n"), (False, b"$ ")]
    for _ in range(2000):
        ev = [(c, bytes(rng.getrandbits(8) if rng.random() < 0.2 else b for b in d)) for c, d in base]
        if rng.random() < 0.3:
            rng.shuffle(ev)
        ev.append((rng.random() < 0.5, bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 40)))))
        rows = telnet.parse_stream(stream(ev))
        assert isinstance(rows, list)
        assert not any(r.get("malformed") for r in rows)  # the parser itself never failed
