"""Zeek logs and Suricata EVE from a store holding sessions and protocol records."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from wiretrail.cli import main
from wiretrail.sample import generate, write_pcap
from wiretrail.sessions.flowtable import uid_of
from wiretrail.store.metadata import open_db

CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "corpus"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    d = tmp_path_factory.mktemp("export")
    frames, truth = generate(sessions=300, seed=9)
    write_pcap(d / "s.pcap", frames)
    assert main(["ingest", "--no-progress", "--store", str(d / "store"), str(d / "s.pcap")]) == 0
    return d, truth


def lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_zeek_logs(store):
    d, truth = store
    assert main(["export", "--store", str(d / "store"), "--format", "zeek", "--out", str(d / "zeek")]) == 0
    conn = lines(d / "zeek" / "conn.log")
    dns = lines(d / "zeek" / "dns.log")
    assert len(conn) == len(truth)
    dns_sessions = {t.orig_p for t in truth if t.resp_p == 53}
    assert dns and {r["id.orig_p"] for r in dns} == dns_sessions
    conn_uids = {r["uid"] for r in conn}
    assert all(r["uid"] in conn_uids and r["id.resp_p"] == 53 and r["query"] for r in dns)
    assert all(isinstance(r["ts"], float) for r in dns)


def test_eve(store):
    d, truth = store
    assert main(["export", "--store", str(d / "store"), "--format", "eve", "--out", str(d / "eve")]) == 0
    events = lines(d / "eve" / "eve.json")
    kinds = Counter(e["event_type"] for e in events)
    assert kinds["flow"] == len(truth) and kinds["dns"] > 0
    flows = {e["flow_id"]: e for e in events if e["event_type"] == "flow"}
    for e in events:
        assert e["flow_id"] in flows  # every protocol event belongs to a flow event
        assert e["timestamp"].endswith("+0000") and e["proto"] in ("TCP", "UDP", "ICMP", "IPv6-ICMP")
        if e["event_type"] == "dns":
            f = flows[e["flow_id"]]
            ends = {(e["src_ip"], e["src_port"]), (e["dest_ip"], e["dest_port"])}
            assert ends == {(f["src_ip"], f["src_port"]), (f["dest_ip"], f["dest_port"])}
            # Suricata 8: a request goes client -> server, a response server -> client
            assert e["dns"]["type"] in ("request", "response")
            assert (e["dns"]["type"] == "request") == (e["src_ip"] == f["src_ip"])


def _text(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def test_link_layer_addresses(tmp_path):
    """conn.log's orig_l2_addr/resp_l2_addr (Zeek's names) are the first frame's addresses seen
    from the originator; EVE's ether: src_macs/dest_macs on flows, src_mac/dest_mac on protocol
    events, turned with the event's direction."""
    frames, truth = generate(sessions=300, seed=9)
    write_pcap(tmp_path / "s.pcap", frames)
    assert main(["ingest", "--no-progress", "--store", str(tmp_path / "store"), str(tmp_path / "s.pcap")]) == 0
    want = {}  # (orig_h, orig_p, resp_h, resp_p) -> (orig MAC, resp MAC) from each session's first frame
    for t in truth:
        if t.frames and t.proto != "icmp":
            first = frames[t.frames[0]][1]
            want[(t.orig_h, t.orig_p, t.resp_h, t.resp_p)] = (_text(first[6:12]), _text(first[0:6]))
    out = tmp_path / "out"
    assert main(["export", "--store", str(tmp_path / "store"), "--format", "zeek", "--out", str(out / "zeek")]) == 0
    conn = {r["uid"]: r for r in lines(out / "zeek" / "conn.log")
            if (r["id.orig_h"], r["id.orig_p"], r["id.resp_h"], r["id.resp_p"]) in want}
    assert len(conn) > 200
    macs = {uid: want[(r["id.orig_h"], r["id.orig_p"], r["id.resp_h"], r["id.resp_p"])] for uid, r in conn.items()}
    assert all((r["orig_l2_addr"], r["resp_l2_addr"]) == macs[uid] for uid, r in conn.items())
    assert main(["export", "--store", str(tmp_path / "store"), "--format", "eve", "--out", str(out / "eve")]) == 0
    events = lines(out / "eve" / "eve.json")
    assert all("ether" in e for e in events)
    flows = {e["flow_id"]: e for e in events if e["event_type"] == "flow" and uid_of(e["flow_id"]) in conn}
    assert len(flows) == len(conn)
    for fid, f in flows.items():
        o, r = macs[uid_of(fid)]
        assert f["ether"] == {"src_macs": [o], "dest_macs": [r]}
    dns = [e for e in events if e["event_type"] == "dns" and e["flow_id"] in flows]
    assert {e["dns"]["type"] for e in dns} == {"request", "response"}
    for e in dns:
        o, r = macs[uid_of(e["flow_id"])]
        assert (e["ether"]["src_mac"], e["ether"]["dest_mac"]) == ((o, r) if e["dns"]["type"] == "request" else (r, o))


def _flow_merge_capture(path):
    """One TCP connection closed, then a FIN retransmitted 20 s later (Zeek: a new connection,
    more than 5 s after the close; Suricata: the same flow, within its 60 s closed timeout),
    another 80 s after that (past the timeout: a new flow for Suricata too), then a SYN on that
    port pair (a new flow: the old one is closed); a SYN retransmitted 8 s after the first
    (Zeek's 5 s attempt timeout; one Suricata flow); a UDP exchange resumed after 70 s (Zeek's
    60 s UDP timeout; within Suricata's 300 s established timeout) and again 301 s later."""
    from wiretrail.sample import _Builder

    b = _Builder()
    s = 1_700_000_000 * 10**9
    c, srv, cp, sp = "10.0.0.1", "10.0.0.2", 40000, 443
    C, S = 1, 2  # MAC addresses

    def to_srv(t, flags, seq, ack, data=b""):
        b.emit(s + int(t * 1e9), b.tcp(c, srv, cp, sp, seq, ack, flags, data), C, S, None)

    def to_cli(t, flags, seq, ack, data=b""):
        b.emit(s + int(t * 1e9), b.tcp(srv, c, sp, cp, seq, ack, flags, data), S, C, None)

    SYN, ACK, PSH, FIN = 0x02, 0x10, 0x08, 0x01
    to_srv(0.0, SYN, 100, 0)
    to_cli(0.1, SYN | ACK, 500, 101)
    to_srv(0.2, ACK, 101, 501)
    to_srv(0.3, PSH | ACK, 101, 501, b"x" * 10)
    to_cli(0.4, PSH | ACK, 501, 111, b"y" * 20)
    to_srv(0.5, FIN | ACK, 111, 521)
    to_cli(0.6, FIN | ACK, 521, 112)
    to_srv(0.7, ACK, 112, 522)
    to_cli(20.7, FIN | ACK, 521, 112)    # retransmitted: 20 s after the last packet
    to_cli(100.7, FIN | ACK, 521, 112)   # 80 s later: past Suricata's closed timeout
    to_srv(110.0, SYN, 9000, 0)          # a new connection on the same ports
    b.emit(s + 200 * 10**9, b.tcp(c, srv, 40001, 80, 7000, 0, SYN), C, S, None)
    b.emit(s + 208 * 10**9, b.tcp(c, srv, 40001, 80, 7000, 0, SYN), C, S, None)
    for t in (300.0, 300.1, 370.0, 370.1, 671.2):
        src, dst = (c, "10.0.0.3") if t in (300.0, 370.0, 671.2) else ("10.0.0.3", c)
        sport, dport = (5000, 9999) if src == c else (9999, 5000)
        b.emit(s + int(t * 1e9), b.udp(src, dst, sport, dport, b"z" * 8), C if src == c else S,
               S if src == c else C, None)
    write_pcap(path, b.frames)


def test_eve_flows_merge_sessions_suricata_keeps_together(tmp_path):
    _flow_merge_capture(tmp_path / "m.pcap")
    assert main(["ingest", "--no-progress", "--store", str(tmp_path / "store"), str(tmp_path / "m.pcap")]) == 0
    assert main(["export", "--store", str(tmp_path / "store"), "--format", "zeek", "--out", str(tmp_path / "z")]) == 0
    conn = lines(tmp_path / "z" / "conn.log")
    # the sessions stay Zeek's: the late FINs and the attempt retransmission are connections of their own
    assert sum(1 for r in conn if 40000 in (r["id.orig_p"], r["id.resp_p"])) == 4
    assert sum(1 for r in conn if 40001 in (r["id.orig_p"], r["id.resp_p"])) == 2
    assert sum(1 for r in conn if r["proto"] == "udp") == 3
    assert main(["export", "--store", str(tmp_path / "store"), "--format", "eve", "--out", str(tmp_path / "e")]) == 0
    flows = sorted((e for e in lines(tmp_path / "e" / "eve.json") if e["event_type"] == "flow"),
                   key=lambda e: e["timestamp"])
    https = [f for f in flows if 40000 in (f["src_port"], f["dest_port"])]
    assert len(https) == 3
    first = https[0]
    assert (first["src_port"], first["dest_port"]) == (40000, 443)
    assert (first["flow"]["pkts_toserver"], first["flow"]["pkts_toclient"]) == (5, 4)
    assert first["flow"]["age"] == 20 and first["flow"]["end"].startswith("2023-11-14T22:13:40.7")
    assert first["flow"]["state"] == "closed" and first["tcp"]["tcp_flags_tc"] == "1b"
    assert https[1]["flow"]["pkts_toclient"] + https[1]["flow"]["pkts_toserver"] == 1
    assert https[2]["flow"]["pkts_toserver"] == 1 and https[2]["tcp"]["tcp_flags_ts"] == "02"
    attempt = [f for f in flows if 40001 in (f["src_port"], f["dest_port"])]
    assert len(attempt) == 1 and attempt[0]["flow"]["pkts_toserver"] == 2 and attempt[0]["flow"]["age"] == 8
    udp = [f for f in flows if f["proto"] == "UDP"]
    assert [(f["flow"]["pkts_toserver"], f["flow"]["pkts_toclient"]) for f in udp] == [(2, 2), (1, 0)]
    assert udp[0]["flow"]["state"] == "established" and udp[0]["flow"]["bytes_toserver"] == 2 * udp[1]["flow"]["bytes_toserver"]


def test_eve_options_from_suricata_config():
    """The settings of a suricata.yaml the export follows: dns requests/responses, SMTP URL
    extraction (schemes, whether the scheme is logged); what is not set keeps Suricata's default."""
    from wiretrail.export import eve

    default = eve.EveOptions.from_suricata_config(None)
    assert default == eve.EveOptions() and default.smtp_url_schemes == ("http",)
    for odd in ("text", ["a"], {"outputs": {"eve-log": 1}}, {"outputs": [{"eve-log": ["types"]}]},
                {"outputs": [{"eve-log": {"types": "dns"}}]}, {"app-layer": {"protocols": {"smtp": ["mime"]}}}):
        assert eve.EveOptions.from_suricata_config(odd) == default  # a file of another shape: defaults
    config = {"outputs": [{"eve-log": {"types": ["alert", {"dns": {"requests": "yes", "responses": "no"}}]}}],
              "app-layer": {"protocols": {"smtp": {"mime": {"extract-urls-schemes": ["http", "https", "ftp"],
                                                            "log-url-scheme": True}}}}}
    opts = eve.EveOptions.from_suricata_config(config)
    assert (opts.dns_requests, opts.dns_responses) == (True, False)
    assert opts.smtp_url_schemes == ("http", "https", "ftp") and opts.smtp_log_url_scheme

    # email.url: per scheme in the configured order, then written last first, as Suricata does
    row = {"ts_ns": 1, "uid": "CAAAAAAAAAAA", "tx_id": 0, "message_sent": True,
           "urls": ["http://a.example/", "ftp://f.example", "HTTPS://s.example", "http://b.example/x", "gopher://g"]}
    assert eve._smtp(row, opts)[0]["email"]["url"] == ["ftp://f.example", "HTTPS://s.example",
                                                       "http://b.example/x", "http://a.example/"]
    assert eve._smtp(row)[0]["email"] == {"status": "PARSE_DONE", "url": ["b.example/x", "a.example/"]}
    assert "email" not in eve._smtp({**row, "message_sent": False, "urls": None})[0]

    dns = {"ts_ns": 1, "uid": "CAAAAAAAAAAA", "query": "a.example", "query_flags": 0x0100,
           "response_flags": 0x8180, "response_ns": 2, "orig_p": 40000, "resp_p": 53}
    assert [e["dns"]["type"] for e in eve._dns(dns)] == ["request", "response"]
    assert [e["dns"]["type"] for e in eve._dns(dns, opts)] == ["request"]


def test_eve_leaves_to_suricata_what_it_parses():
    """Suricata probes its DNS parser on port 53 only and has none for mDNS, LLMNR or NetBIOS
    names: no dns events for those, and their flows (any flow whose payload no Suricata
    parser took, UDP as TCP) are app_proto `failed`; a flow without payload has none."""
    from wiretrail.export import eve

    dns = {"ts_ns": 1, "uid": "CAAAAAAAAAAA", "query": "a.local", "query_flags": 0, "response_flags": 0x8400,
           "response_ns": 2, "orig_p": 5353, "resp_p": 5353}
    assert eve._dns(dns) == [] and len(eve._dns({**dns, "resp_p": 53})) == 2
    flow = {"proto": "udp", "orig_bytes": 50, "resp_bytes": 0}
    assert eve._app_proto({**flow, "app": "MDNS"}) == "failed"
    assert eve._app_proto({**flow, "app": "NetBIOS"}) == "failed"
    assert eve._app_proto({**flow, "app": "DNS"}) == "dns" and eve._app_proto({**flow, "parsed": "dns"}) == "dns"
    assert eve._app_proto({**flow, "orig_bytes": 0}) is None
    assert eve._app_proto({**flow, "proto": "icmp"}) is None


def test_export_eve_with_a_suricata_config(store, tmp_path, capsys):
    """`--suricata-config FILE`: the export follows the file's eve-log settings; a file that is
    missing, unreadable or not YAML is one line on stderr and exit status 1."""
    d, _ = store
    config = tmp_path / "suricata.yaml"
    config.write_text("%YAML 1.1\n---\noutputs:\n  - eve-log:\n      types:\n        - dns:\n"
                      "            responses: no\n")
    out = tmp_path / "eve"
    assert main(["export", "--store", str(d / "store"), "--format", "eve", "--out", str(out),
                 "--suricata-config", str(config)]) == 0
    dns = [e for e in lines(out / "eve.json") if e["event_type"] == "dns"]
    assert dns and {e["dns"]["type"] for e in dns} == {"request"}
    capsys.readouterr()
    for bad in (tmp_path / "missing.yaml", tmp_path):  # absent; a directory cannot be read as a file
        assert main(["export", "--store", str(d / "store"), "--format", "eve", "--out", str(out),
                     "--suricata-config", str(bad)]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"wiretrail: cannot read {bad}") and err.count("\n") == 1
    config.write_text("outputs: [eve-log\n")
    assert main(["export", "--store", str(d / "store"), "--format", "eve", "--out", str(out),
                 "--suricata-config", str(config)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"wiretrail: {config} is not YAML") and err.count("\n") == 1


def test_eve_tls_fields_and_handshakes():
    """eve-log tls `extended` / `custom` choose the fields; client_handshake and server_handshake
    as Suricata 8 writes them: GREASE values left out, the client's version raised by its first
    supported_versions entry, the server's as its ServerHello says, its cipher as a number."""
    from wiretrail.export import eve

    def tls_config(settings):
        return eve.EveOptions.from_suricata_config({"outputs": [{"eve-log": {"types": [{"tls": settings}]}}]})

    row = {"ts_ns": 1, "uid": "CAAAAAAAAAAA", "server_name": "a.example", "ja3": "0" * 32,
           "client_version": "TLSv12", "client_supported_versions": [0x0A0A, 0x0304, 0x0303],
           "client_ciphers": [0x1A1A, 0x1301, 0xC02F], "ssl_client_exts": [0x2A2A, 0, 43],
           "client_sig_algs": [0x0403], "server_version": "TLSv12", "version": "TLSv13",
           "cipher": "TLS_AES_128_GCM_SHA256", "ssl_server_exts": [43, 51]}
    default = eve._tls(row)[0]["tls"]
    assert default["sni"] == "a.example" and "client_handshake" not in default
    custom = eve._tls(row, tls_config({"enabled": "yes", "custom": ["client_handshake", "server_handshake",
                                                                      "sni"]}))[0]["tls"]
    assert custom == {"sni": "a.example",
                      "client_handshake": {"version": "TLS 1.3", "ciphers": [0x1301, 0xC02F], "exts": [0, 43],
                                           "sig_algs": [0x0403]},
                      "server_handshake": {"version": "TLS 1.2", "cipher": 0x1301, "exts": [43, 51]}}
    basic = eve._tls(row, tls_config({"extended": "no"}))[0]["tls"]
    assert "sni" not in basic and "ja3" not in basic
    assert tls_config({"extended": "yes"}) == eve.EveOptions()
    no_hello = eve._tls({"ts_ns": 1, "uid": "CAAAAAAAAAAA"}, tls_config({"custom": ["client_handshake"]}))[0]
    assert "tls" not in no_hello or "client_handshake" not in no_hello["tls"]


def test_eve_http_dump_all_headers():
    """dump-all-headers: the headers as Suricata's libhtp keeps them: one entry per name (the
    first's case and place), repeats joined with ", " except Content-Length, C-string cuts."""
    from wiretrail.export import eve

    def http_config(value):
        return eve.EveOptions.from_suricata_config(
            {"outputs": [{"eve-log": {"types": [{"http": {"dump-all-headers": value}}]}}]})

    sent = [("Host", "a"), ("Cookie", "a=1"), ("cookie", "b=2"), ("Content-Length", "5"), ("content-length", "6"),
            ("X-Nul", "left\x00right"), ("X-Long", "é" * 2000)]
    row = {"ts_ns": 1, "uid": "CAAAAAAAAAAA", "method": "GET", "request_headers": [{"name": n, "value": v}
                                                                                  for n, v in sent],
           "response_headers": [{"name": "Server", "value": "s"}]}
    assert "request_headers" not in eve._http(row)[0]["http"]
    both = eve._http(row, http_config("both"))[0]["http"]
    assert both["request_headers"] == [{"name": "Host", "value": "a"}, {"name": "Cookie", "value": "a=1, b=2"},
                                       {"name": "Content-Length", "value": "5"}, {"name": "X-Nul", "value": "left"},
                                       {"name": "X-Long", "value": "é" * 1023}]  # 2047 bytes cut to whole characters
    assert both["response_headers"] == [{"name": "Server", "value": "s"}]
    request_only = eve._http(row, http_config("request"))[0]["http"]
    assert "request_headers" in request_only and "response_headers" not in request_only
    assert (http_config("response").http_request_headers, http_config("response").http_response_headers) == (False, True)


def test_eve_smb_pipe_io_only_with_dcerpc(tmp_path):
    """Suricata makes no transaction of a READ or WRITE on a named pipe whose data is not DCE/RPC
    (rust/src/smb/smb2.rs: "non-DCERPC pipe: skip"): psexec's own pipe traffic is in the smb
    table and not in EVE, while the DCE/RPC writes to svcctl are in both."""
    pcap = CORPUS / "suricata-verify" / "tests" / "smb2-07" / "20171220_smb_psexec_add_user.pcap"
    if not pcap.exists():
        pytest.skip("corpus not found")
    store = str(tmp_path / "store")
    assert main(["ingest", "--no-progress", "--store", store, str(pcap)]) == 0
    db = open_db(tmp_path / "store")
    pipe_io = "FROM smb WHERE command IN ('READ', 'WRITE') AND share_type = 'PIPE'"
    plain = {n for (n,) in db.execute(f"SELECT DISTINCT name {pipe_io} AND dcerpc_request IS NULL").fetchall()}
    rpc = db.execute(f"SELECT count(*) {pipe_io} AND dcerpc_request IS NOT NULL").fetchone()[0]
    assert plain and rpc  # both kinds are stored
    assert main(["export", "--store", store, "--format", "eve", "--out", str(tmp_path / "e")]) == 0
    io = [e["smb"] for e in lines(tmp_path / "e" / "eve.json") if e["event_type"] == "smb"
          and e["smb"]["command"] in ("SMB2_COMMAND_READ", "SMB2_COMMAND_WRITE")]
    assert sum("dcerpc" in x for x in io) == rpc
    assert not [x for x in io if x.get("filename") in plain and "dcerpc" not in x]
