"""The application stage: identification, reassembly and protocol records, per batch.

Per batch (numpy decides which rows matter, Python runs per selected packet or group):
- nDPI gets the first packets of every session not identified yet (`app.ndpi`);
- UDP payloads on a datagram protocol's ports go to that protocol's per-session parser;
- TCP payloads go to the reassembler while their session is unidentified, on a stream
  protocol's port, or identified as one; a session identified as something no module
  parses is dropped from the reassembler at once (only the sessions that need it pay).
When sessions close (`close`), their streams are rebuilt and parsed, and the sessions come
back with `app`, `category`, `service` and `port_mismatch` filled, together with the
records of every protocol table, each row carrying its session's uid and 5-tuple.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from wiretrail import arrow_compute as ac
from wiretrail.app.base import (Datagram, DatagramBatch, Endpoints, JoinedStreams, Records, Stream,
                                address_texts)
from wiretrail.app.reassembly import Reassembler
from wiretrail.app.session_rows import SessionRows
from wiretrail.app.stage_kernel import BY_PORT, UNDECIDED, UNWANTED, WANTED, tcp_candidates, wanted_streams
from wiretrail.batch import FRAG_NONE

# The protocol modules, by name under wiretrail/app/: adding a protocol is one line here.
PROTOCOLS = ("dns", "dhcp", "tls", "x509", "quic", "http", "ssh", "ftp", "smtp", "pop3", "imap", "smb", "icmp",
             "telnet", "socks")

# Parsers that return nothing unless the stream is theirs (HTTP start lines, TLS records).
SELF_DETECTING = ("http", "tls", "x509", "ssh")

# nDPI master protocol -> Zeek's `service` name (conn.log), for the protocols Zeek names.
ZEEK_SERVICE = {
    "DNS": "dns", "MDNS": "dns", "LLMNR": "dns", "NetBIOS": "dns", "HTTP": "http", "HTTP_Proxy": "http",
    "TLS": "ssl", "QUIC": "quic", "DTLS": "dtls", "SSH": "ssh", "FTP_CONTROL": "ftp", "FTP_DATA": "ftp-data",
    "SMTP": "smtp", "SMTPS": "smtp,ssl", "POP3": "pop3", "POPS": "pop3,ssl", "IMAP": "imap",
    "IMAPS": "imap,ssl", "FTPS": "ftp,ssl", "SMBv1": "smb", "SMBv23": "smb", "DHCP": "dhcp",
    "HTTP_Connect": "http", "HTTP2": "http2", "TFTP": "tftp",
    "DHCPV6": "dhcpv6", "NTP": "ntp", "SNMP": "snmp", "SIP": "sip", "RDP": "rdp", "Kerberos": "krb",
    "LDAP": "ldap", "MySQL": "mysql", "RADIUS": "radius", "Syslog": "syslog", "IRC": "irc",
    "DCE_RPC": "dce_rpc", "Telnet": "telnet", "SOCKS": "socks", "MQTT": "mqtt", "Modbus": "modbus",
    "DNP3": "dnp3", "VNC": "vnc", "RTP": "rtp", "STUN": "stun", "BitTorrent": "bittorrent",
}


@dataclass(frozen=True, eq=False)  # hashable by identity: modules key the per-table row lists
class _Module:
    name: str
    table: str
    schema: pa.Schema
    ports: np.ndarray
    ndpi: frozenset
    mod: object
    datagram: bool  # parse_datagram, new_session or new_tracker
    stream: bool    # parse_stream


def load_modules(names=PROTOCOLS) -> list[_Module]:
    """The protocol modules present (a protocol not written yet is simply absent)."""
    out = []
    for name in names:
        try:
            mod = importlib.import_module(f"wiretrail.app.{name}")
        except ModuleNotFoundError as err:
            if err.name == f"wiretrail.app.{name}":
                continue
            raise
        if not hasattr(mod, "SCHEMA"):
            continue
        stream = hasattr(mod, "parse_stream")
        datagram = any(hasattr(mod, f) for f in ("parse_datagram", "new_session", "new_tracker"))
        if stream or datagram:
            out.append(_Module(name, getattr(mod, "TABLE", name), mod.SCHEMA,
                               np.array(sorted(getattr(mod, "PORTS", ())), dtype=np.int64),
                               frozenset(getattr(mod, "NDPI", ())), mod, datagram, stream))
    return out


class AppStage:
    def __init__(self, identify: bool = True, depth: int = 1 << 20, memcap: int = 256 << 20,
                 modules: list[_Module] | None = None):
        self.modules = load_modules() if modules is None else modules
        self.datagram_modules = [m for m in self.modules if m.datagram]
        self.trackers = {m.name: m.mod.new_tracker() for m in self.datagram_modules if hasattr(m.mod, "new_tracker")}
        self.tracker_rows: list[tuple[_Module, dict]] = []  # rows of cross-session trackers
        self.stream_modules = [m for m in self.modules if m.stream]
        # Per port, a bit per stream module (in stream_modules' order) that reads it: a closing
        # session's parsers by port are looked up by indexing, and sessions are grouped by the
        # set, a few groups per close where grouping by port met thousands (port scans).
        # Nonzero where some module reads the port: stream_port_table.
        if len(self.stream_modules) > 62:
            raise ValueError("more stream modules than the port masks have bits")
        self._port_tables: dict[_Module, np.ndarray] = {}
        self.stream_port_masks = np.zeros(1 << 16, dtype=np.int64)
        for i, m in enumerate(self.stream_modules):
            self.stream_port_masks[self._port_table(m)] |= 1 << i
        self.stream_port_table = self.stream_port_masks != 0
        self._parsers_by_mask: dict[int, tuple[_Module, ...]] = {}
        self.reasm = Reassembler(depth=depth, memcap=memcap)
        self.dgram_state: dict[_Module, dict[int, object]] = {m: {} for m in self.datagram_modules}  # module -> sid -> parser session
        self.rows: dict[int, list[tuple[_Module, dict]]] = {}   # sid -> finished rows
        self.held: list[tuple[_Module, Records]] = []          # finished rows as columns, by sid
        # per live session, a row of columns (nDPI's flow and label, app.ndpi; `stream_code`:
        # what _streams does with its TCP packets once nDPI has decided it, WANTED, UNWANTED or
        # BY_PORT; `has`: what the stage holds of it, _HAS_* bits); released when it closes
        self.session_rows = SessionRows()
        self.session_rows.add_column("stream_code", np.int8, UNDECIDED)
        self.session_rows.add_column("has", np.int32, 0)
        # a bit of `has` per module whose datagram state closes in one call (close_sessions)
        self._batch_bits = {m: _HAS_BATCH << i for i, m in
                            enumerate(m for m in self.datagram_modules if hasattr(m.mod, "close_sessions"))}
        self._label_codes: dict[int, tuple[int, int, bool]] = {}  # nDPI label id -> (code, depth, cut)
        self._parsers_by_label_id: dict[int, tuple] = {}        # nDPI label id -> its stream parsers
        self._label_columns_of: tuple[int, tuple] = (0, ())
        self.tuples: dict[int, tuple] = {}                      # sid -> uid and 5-tuple (datagram sessions)
        self._parsers_by_label: dict[str, tuple] = {}
        self._label_names_module: dict[_Module, np.ndarray] = {}
        self.parser_errors = 0
        self.bad_rows: dict[str, int] = {}  # rows dropped per table: a value that did not fit its column
        self._first_packet = 0
        self.ndpi = self.ndpi_state = None
        self.identify_error: str | None = None
        if identify:
            try:
                from wiretrail.app.ndpi import Identifier, NdpiState

                self.ndpi = Identifier(labels_only=True)
                self.ndpi_state = NdpiState(self.ndpi, rows=self.session_rows)
            except Exception as err:  # no nDPI here: records still come, from ports
                self.identify_error = f"protocol identification off: {str(err).splitlines()[0]}"

    # ---- per batch ----------------------------------------------------------------------------
    def process(self, batch, cols: dict, sid: np.ndarray, is_orig: np.ndarray, seq: np.ndarray,
                row: np.ndarray, first_packet: int = 0) -> None:
        """`sid`, `is_orig`, `seq` and `row` are FlowTable.update's (the stage keeps its state per
        session at the session's row there). `first_packet`: the capture-file packet number of
        the batch's first frame (1-based), 0 if the frames are not the file's own (reassembled
        datagrams)."""
        if len(sid) == 0:
            return
        self._first_packet = first_packet
        if self.ndpi is not None:
            from wiretrail.app.ndpi import classify_batch

            classify_batch(self.ndpi, self.ndpi_state, batch, cols, sid, is_orig, seq, row)
        self._datagrams(batch, cols, sid, is_orig, row)
        self._streams(batch, cols, sid, is_orig, row)

    def identify(self, batch, cols: dict, sid: np.ndarray, is_orig: np.ndarray, seq: np.ndarray,
                 row: np.ndarray) -> None:
        """nDPI only (no protocol records): the outer packets of a UDP tunnel's own session."""
        if self.ndpi is not None and len(sid):
            from wiretrail.app.ndpi import classify_batch

            classify_batch(self.ndpi, self.ndpi_state, batch, cols, sid, is_orig, seq, row)

    def _datagrams(self, batch, cols, sid, is_orig, row) -> None:
        if not self.datagram_modules:
            return
        udp = np.flatnonzero((cols["proto"] == 17) & (sid >= 0) & (cols["pl_off"] >= 0))
        sport, dport = cols["sport"][udp], cols["dport"][udp]
        # each datagram's nDPI label (-1: not decided): a module reads its protocol on any port
        label = None
        if self.ndpi_state is not None and len(udp):
            at = self.session_rows.holding(sid[udp], row[udp])  # none: nDPI never saw the session
            label = np.where(at >= 0, self.session_rows.col["ndpi_label"][at], -1)
        for m in self.datagram_modules:
            ip_protos = getattr(m.mod, "IP_PROTOS", None)
            if ip_protos:  # a whole IP protocol (ICMP): the L4 message from its header on
                # (a comparison per protocol: np.isin cost 25 times as much on a batch's column)
                ours = (sid >= 0) & (cols["l4_off"] >= 0) & (cols["frag"] == FRAG_NONE)
                ours &= np.logical_or.reduce([cols["proto"] == p for p in ip_protos])
                rows = np.flatnonzero(ours)
                self._datagram_rows(m, batch, cols, sid, is_orig, row, rows, whole_l4=True)
                continue
            if not len(udp):
                continue
            on_port = self._port_table(m)
            wanted = on_port[sport] | on_port[dport]
            if label is not None:
                named = self._labels_naming(m)
                wanted |= named[np.maximum(label, 0)] & (label >= 0)
            self._datagram_rows(m, batch, cols, sid, is_orig, row, udp[wanted])

    def _labels_naming(self, m: _Module) -> np.ndarray:
        """A boolean per nDPI label id so far: the label names a protocol module m reads."""
        labels = self.ndpi_state.labels  # only ever appended to (a label's id is its index)
        got = self._label_names_module.get(m)
        have = 0 if got is None else len(got)
        if have < len(labels):  # the labels met since: theirs added to the ones already known
            new = np.array([bool(set(x.app.split(".")) & m.ndpi) for x in labels[have:]], dtype=bool)
            got = self._label_names_module[m] = new if got is None else np.concatenate([got, new])
        return got

    def _port_table(self, m: _Module) -> np.ndarray:
        """65536 booleans, True at module m's ports: a packet's ports are looked up by indexing."""
        table = self._port_tables.get(m)
        if table is None:
            table = self._port_tables[m] = np.zeros(1 << 16, dtype=bool)
            table[m.ports[(m.ports >= 0) & (m.ports < 1 << 16)]] = True
        return table

    def _flag(self, sids: np.ndarray, bits: int) -> None:
        """Mark what the stage now holds of sessions `sids` (_HAS_* bits), rows already attached
        (a module's rows come by session id)."""
        at = self.session_rows.find(sids)
        self.session_rows.col["has"][at[at >= 0]] |= bits

    def _make_tuples(self, cols, sid, is_orig, row, rows: np.ndarray, bits: int) -> None:
        """(uid, orig_h, orig_p, resp_h, resp_p) of every session of `rows` that has none yet,
        made for all of them at once, from each one's first row here; and `bits` marked on them
        all (what the caller is about to keep of them)."""
        at = self.session_rows.attach(sid[rows], row[rows])
        has = self.session_rows.col["has"]
        new = (has[at] & _HAS_TUPLE) == 0
        has[at] |= bits | _HAS_TUPLE
        if not new.any():
            return
        from wiretrail.sessions.flowtable import uids_of

        picked = np.flatnonzero(new)
        r = rows[picked[self.session_rows.firsts(at[picked])]]
        sessions = sid[r]
        ends = _endpoints(cols, is_orig, r)
        tuples = self.tuples
        for s, uid, oh, op, rh, rp in zip(sessions.tolist(), uids_of(sessions).to_pylist(),
                                          address_texts(ends.orig_hi, ends.orig_lo), ends.orig_p.tolist(),
                                          address_texts(ends.resp_hi, ends.resp_lo), ends.resp_p.tolist()):
            tuples[s] = (uid, oh, op, rh, rp)

    def _datagram_rows(self, m: _Module, batch, cols, sid, is_orig, row, rows: np.ndarray,
                       whole_l4: bool = False) -> None:
        """Feed the datagrams `rows` of a batch to module m: where each payload lies is worked out
        for all rows at once with numpy; Python runs once per datagram only to call the parser."""
        if len(rows) == 0:
            return
        i64 = np.int64
        base = batch.offset[rows].astype(i64)
        l3, l4 = cols["l3_off"][rows].astype(i64), cols["l4_off"][rows].astype(i64)
        ip_len = cols["ip_len"][rows].astype(i64)
        pl_off, pl_len = cols["pl_off"][rows].astype(i64), cols["pl_len"][rows].astype(i64)
        l4_len = ip_len - (l4 - l3)  # what the IP header says the L4 part holds
        if whole_l4:
            start = base + l4
            end = np.where(pl_off >= 0, base + pl_off + pl_len,
                           np.minimum(base + batch.caplen[rows].astype(i64), base + l3 + ip_len))
            want = l4_len
        else:
            start = base + pl_off
            end = start + pl_len
            want = l4_len - 8
        end = np.maximum(start, end)
        wanted = getattr(m.mod, "datagram_filter", None)
        if wanted is not None:  # the module says from first bytes which datagrams it reads at all
            first = np.where(end > start, batch.data[np.minimum(start, len(batch.data) - 1)], -1).astype(np.int16)
            keep = wanted(first, is_orig[rows])
            if not keep.all():
                rows, start, end, want = rows[keep], start[keep], end[keep], want[keep]
                if not len(rows):
                    return
        tracker = self.trackers.get(m.name)
        per_session = hasattr(m.mod, "new_session")
        batch_bit = self._batch_bits.get(m, 0)
        if per_session and tracker is None and hasattr(m.mod, "add_datagrams"):
            # columns in, columns out: the sessions' ends as numbers (DatagramBatch.ends), no tuples
            at = self.session_rows.attach(sid[rows], row[rows])
            self.session_rows.col["has"][at] |= batch_bit or _HAS_STATE
            self._datagram_batch(m, batch, cols, sid, is_orig, rows, start, end, want)
            return
        # what the stage will hold of these sessions (trackers' rows carry their own uids)
        self._make_tuples(cols, sid, is_orig, row, rows, 0 if tracker is not None else
                          batch_bit if batch_bit and per_session else _HAS_STATE if per_session else _HAS_ROWS)
        data = memoryview(batch.data)
        ports = (zip(cols["sport"][rows].tolist(), cols["dport"][rows].tolist()) if whole_l4
                 else [None] * len(rows))
        first_packet = self._first_packet
        tuples = self.tuples
        states = self.dgram_state[m]
        for r, s, from_orig, a, b, w, ts, icmp_ports in zip(rows.tolist(), sid[rows].tolist(),
                                                           is_orig[rows].tolist(), start.tolist(), end.tolist(),
                                                           want.tolist(), batch.ts[rows].tolist(), ports):
            payload = data[a:b].tobytes()
            uid, o_h, o_p, r_h, r_p = tuples[s]
            if whole_l4:  # ICMP: the message's own type and code, not the session's
                o_p, r_p = icmp_ports
            d = Datagram(uid=uid, ts=ts, payload=payload, from_orig=from_orig, orig_h=o_h,
                         orig_p=o_p, resp_h=r_h, resp_p=r_p, truncated=w > len(payload),
                         packet=first_packet + r if first_packet else 0)
            try:
                if tracker is not None:  # rows carry their own uids: they need no session to close
                    self.tracker_rows.extend((m, row) for row in tracker.expire(ts) + tracker.add(d))
                    continue
                if per_session:
                    state = states.get(s)
                    if state is None:
                        state = states[s] = m.mod.new_session(d)
                    out = state.add(d)
                else:
                    out = m.mod.parse_datagram(d)
            except Exception:
                self.parser_errors += 1
                continue
            if out:
                self.rows.setdefault(s, []).extend((m, row) for row in out)

    def _datagram_batch(self, m: _Module, batch, cols, sid, is_orig, rows, start, end, want) -> None:
        """Module m's datagrams `rows` in one call (its `add_datagrams`), as columns."""
        first_packet = self._first_packet
        sids = sid[rows]
        b = DatagramBatch(data=batch.data, start=start, end=end, sid=sids, from_orig=is_orig[rows],
                          ts=batch.ts[rows], packet=(first_packet + rows) if first_packet else np.zeros(len(rows), np.int64),
                          truncated=want > end - start, ends=_endpoints(cols, is_orig, rows))
        try:
            out, errors = m.mod.add_datagrams(self.dgram_state[m], b)
        except Exception:
            self.parser_errors += 1
            return
        self.parser_errors += errors
        if isinstance(out, Records):  # columns, held until their sessions close
            if out.table.num_rows:
                self.held.append((m, out))
            return
        rows_of = self.rows
        for s, row in out:
            held = rows_of.get(s)
            if held is None:
                held = rows_of[s] = []
            held.append((m, row))
        if out:
            self._flag(np.fromiter((s for s, _ in out), dtype=np.int64, count=len(out)), _HAS_ROWS)

    def _streams(self, batch, cols, sid, is_orig, row) -> None:
        if not self.stream_modules:
            return
        # payloads, SYNs (a direction's base) and ACKs (what the other side has received: where
        # Suricata logs what those bytes complete), and whether a module reads their ports
        n = len(sid)
        cand, on_port = np.empty(n, dtype=np.int64), np.empty(n, dtype=np.bool_)
        m = tcp_candidates(cols["proto"], sid, cols["pl_len"], cols["tcp_flags"], cols["sport"], cols["dport"],
                           self.stream_port_table, cand, on_port)
        if m == 0:
            return
        cand, on_port = cand[:m], on_port[:m]
        srow = self.session_rows.attach(sid[cand], row[cand])
        code_col = self.session_rows.col["stream_code"]
        if self.ndpi_state is not None:
            # judged once per session, the first time it sends TCP after nDPI has decided it (by
            # its label: a judgement per distinct label), not per packet
            label = self.session_rows.col["ndpi_label"][srow]
            newly = (code_col[srow] == UNDECIDED) & (label >= 0)
            if newly.any():
                at = np.flatnonzero(newly)
                first = at[self.session_rows.firsts(srow[at])]
                self._judge(sid[cand[first]], srow[first], label[first])
        # wanted by nDPI's label; else by port or for lack of a label, unless the label says no;
        # a session has a stream once it sent a payload or a SYN (ACKs alone keep nothing)
        rows = np.empty(m, dtype=np.int64)
        k = wanted_streams(cand, on_port, srow, code_col, self.ndpi_state is not None, cols["pl_len"],
                           cols["tcp_flags"], self.session_rows.col["has"], _HAS_STREAM, rows)
        if k:
            self.reasm.add(batch, cols, rows[:k], sid, is_orig, self._first_packet)

    def _judge(self, sids: np.ndarray, rows: np.ndarray, labels: np.ndarray) -> None:
        """Whether sessions' streams are kept, now that nDPI has labelled them: wanted by a
        parser (capped at the depth its protocols read), not wanted (labelled as something no
        module parses: what was kept is dropped), or left to their port (nDPI could not name
        them)."""
        distinct, which = np.unique(labels, return_inverse=True)
        judged = np.array([self._label_code(int(label)) for label in distinct.tolist()], dtype=np.int64)[which]
        code, depth, cut = judged[:, 0].astype(np.int8), judged[:, 1], judged[:, 2] != 0
        self.session_rows.col["stream_code"][rows] = code
        limited = (code == WANTED) & (depth < self.reasm.depth)
        if limited.any():
            self.reasm.limit_many(sids[limited], depth[limited])
        if cut.any():
            self.reasm.cut_after_handshake(sids[cut])
        dropped = code == UNWANTED
        if dropped.any():
            self.reasm.drop_many(sids[dropped])
            self.session_rows.col["has"][rows[dropped]] &= ~_HAS_STREAM

    def _label_code(self, label: int) -> tuple[int, int, bool]:
        """(WANTED, UNWANTED or BY_PORT; the stream depth its parsers read; whether they all read
        only a TLS handshake) for nDPI label id `label`."""
        got = self._label_codes.get(label)
        if got is None:
            app = self.ndpi_state.labels[label].app
            parsers = self._stream_parsers(app)
            if parsers:
                # a protocol that reads only a stream's start (TLS: the handshake) caps its depth
                got = (WANTED, max(getattr(m.mod, "STREAM_DEPTH", self.reasm.depth) for m in parsers),
                       all(getattr(m.mod, "HANDSHAKE_ONLY", False) for m in parsers))
            elif app not in ("", "Unknown"):
                got = (UNWANTED, 0, False)
            else:
                got = (BY_PORT, 0, False)
            self._label_codes[label] = got
        return got

    def _label_parsers(self, label: int) -> tuple[_Module, ...]:
        """The stream parsers nDPI label id `label` names (none: the port decides)."""
        got = self._parsers_by_label_id.get(label)
        if got is None:
            got = self._parsers_by_label_id[label] = self._stream_parsers(self.ndpi_state.labels[label].app)
        return got

    def _label_columns(self) -> tuple[pa.Array, pa.Array, pa.Array, pa.Array]:
        """app, category, port_mismatch and Zeek service of every nDPI label id so far."""
        labels = self.ndpi_state.labels
        made, columns = self._label_columns_of
        if made != len(labels):
            columns = (pa.array([x.app for x in labels], pa.string()),
                       pa.array([x.category for x in labels], pa.string()),
                       pa.array([x.port_mismatch for x in labels], pa.bool_()),
                       pa.array([ZEEK_SERVICE.get(x.app.split(".")[0]) if x.app else None for x in labels],
                                pa.string()))
            self._label_columns_of = (len(labels), columns)
        return columns

    def _stream_parsers(self, app: str, resp_p: int = -1) -> tuple[_Module, ...]:
        """The stream modules for a session: by nDPI's label, else by the server port
        (several: x509 reads the same TLS stream as tls). Memoised by label; by port, the
        port's module set is (the port of a labelled session does not matter)."""
        parsers = self._parsers_by_label.get(app)
        if parsers is None:
            names = set(app.split(".")) if app else set()
            parsers = tuple(self._with_upgrades([m for m in self.stream_modules if names & m.ndpi]))
            if len(self._parsers_by_label) < 65536:
                self._parsers_by_label[app] = parsers
        if parsers:
            return parsers
        return self._parsers_of_mask(int(self.stream_port_masks[resp_p]) if 0 <= resp_p < 1 << 16 else 0)

    def _parsers_of_mask(self, bits: int) -> tuple[_Module, ...]:
        """The stream modules of a stream_port_masks value, with the ones they upgrade to."""
        parsers = self._parsers_by_mask.get(bits)
        if parsers is None:
            on = [m for i, m in enumerate(self.stream_modules) if bits >> i & 1]
            parsers = self._parsers_by_mask[bits] = tuple(self._with_upgrades(on))
        return parsers

    def _with_upgrades(self, parsers: list[_Module]) -> list[_Module]:
        """Protocols that can turn into another mid-stream (STARTTLS): that one reads it too."""
        upgrades = {u for m in parsers for u in getattr(m.mod, "UPGRADES_TO", ())}
        return parsers + [m for m in self.stream_modules if m.name in upgrades and m not in parsers]

    # ---- sessions closing ---------------------------------------------------------------------
    def close(self, sessions: pa.Table) -> tuple[pa.Table, dict[str, pa.Table]]:
        """Finish the closed `sessions`: their app columns filled, and every protocol table's
        rows for them."""
        if sessions.num_rows == 0:
            return sessions, {}
        sids = sessions.column("sid").to_numpy()
        labels = ids = None
        if self.ndpi_state is not None:
            ids = self.ndpi_state.finish_ids(sids)
            at = pa.array(ids)
            for name, column in zip(("app", "category", "port_mismatch", "service"), self._label_columns()):
                sessions = _set(sessions, name, ac.take(column, at))
            labels = self.ndpi_state.labels  # a session's app: labels[ids[k]].app, for those parsed below
        at = self.session_rows.find(sids)
        has = np.where(at >= 0, self.session_rows.col["has"][at], 0)
        self.session_rows.release(sids)
        sid_list = sids.tolist()
        for s in sids[(has & _HAS_TUPLE) != 0].tolist():
            self.tuples.pop(s, None)
        out = _Out()
        position = _positions(sids)
        if self.held:  # column rows of the closing sessions; the others wait for theirs
            waiting = []
            for m, rec in self.held:
                closing = np.isin(rec.index, sids)
                if closing.any():
                    closed = Records(ac.filter(rec.table, closing), rec.index[closing], rec.name)
                    self._add_by_sid(out, m, closed, position)
                if not closing.all():
                    waiting.append((m, Records(ac.filter(rec.table, ~closing), rec.index[~closing], rec.name)))
            self.held = waiting
        # datagram states that modules finish in one call per close
        for m, bit in self._batch_bits.items():
            states = self.dgram_state[m]
            have = np.flatnonzero(has & bit)
            if len(have):
                try:
                    self._add_by_sid(out, m, m.mod.close_sessions(states, sids[have]), position)
                except Exception:
                    self.parser_errors += 1
                    for s in sids[have].tolist():
                        states.pop(s, None)
        # Each closing session's stream parsers are worked out per distinct nDPI label, or per
        # server port where the label names none, with no Python per session: a stream no parser
        # reads is dropped; those whose parsers all read JoinedStreams (TLS and x509) are taken
        # after the loop below, many at a time; the others are rebuilt one by one in the loop.
        streamed = (has & _HAS_STREAM) != 0
        joined: dict[tuple[_Module, ...], list[np.ndarray]] = {}  # their parsers -> their positions
        if streamed.any():
            at_stream = np.flatnonzero(streamed)
            by_port = np.ones(len(at_stream), dtype=bool)
            groups = []  # (parsers, positions)
            if ids is not None:
                for label, on in zip(*_grouped(ids[at_stream])):
                    parsers = self._label_parsers(label)
                    if parsers:
                        by_port[on] = False
                        groups.append((parsers, at_stream[on]))
            if by_port.any():
                left = at_stream[by_port]
                port = _column(sessions, "resp_p")[left].astype(np.int64)
                mask = np.where((port >= 0) & (port < 1 << 16), self.stream_port_masks[port & 0xFFFF], 0)
                for bits, on in zip(*_grouped(mask)):
                    groups.append((self._parsers_of_mask(bits), left[on]))
            dropped = []
            for parsers, ks in groups:
                if not parsers:
                    dropped.append(ks)
                elif all(getattr(m.mod, "JOINED", False) for m in parsers):
                    joined.setdefault(parsers, []).append(ks)
                else:
                    continue
                streamed[ks] = False
            if dropped:  # no parser reads them: forgotten
                self.reasm.drop_many(sids[np.concatenate(dropped)])
        # The others with rows, a stream or per-session datagram state, one at a time
        needed = np.flatnonzero(((has & (_HAS_ROWS | _HAS_STATE)) != 0) | streamed).tolist()
        tuples = _tuples_at(sessions, needed)
        batched: dict[_Module, tuple[list[int], list[Stream]]] = {}  # parse_streams' work, run below
        # both directions of each of their streams, rebuilt as the loop reaches them
        one_at_a_time = [sid_list[k] for k in needed if streamed[k]]
        directions = self.reasm.take_many(one_at_a_time)
        one_by_one = [(m, states) for m, states in self.dgram_state.items() if m not in self._batch_bits]
        for k in needed:
            s = sid_list[k]
            rows = self.rows.pop(s, [])
            if has[k] & _HAS_STATE:
                for m, states in one_by_one:  # in module order, as the rows always came
                    state = states.pop(s, None)
                    if state is not None:
                        try:
                            rows.extend((m, row) for row in state.close())
                        except Exception:
                            self.parser_errors += 1
            if streamed[k]:
                app = labels[ids[k]].app if labels is not None else ""
                rows.extend(self._parse_stream(next(directions), k, tuples, app, batched))
            if rows:
                self._add_rows(out, k, rows, tuples)
        for m, (ks, streams) in batched.items():
            self._run_batch(out, m, ks, streams)
        for parsers, pieces in joined.items():
            ks = np.sort(np.concatenate(pieces))
            for first, piece in self.reasm.take_joined(sids[ks]):
                for m in parsers:
                    self._run_joined(out, m, ks[first:first + len(piece)], piece, sessions)
        for m, row in self.tracker_rows:
            out.row(m, _LAST, row)
        self.tracker_rows.clear()
        return sessions, self._tables(out, sessions)

    def finish(self) -> dict[str, pa.Table]:
        """Rows still held by cross-session trackers, at the end of input."""
        out = _Out()
        for name, tracker in self.trackers.items():
            m = next(m for m in self.datagram_modules if m.name == name)
            try:
                for row in tracker.close():
                    out.row(m, _LAST, row)
            except Exception:
                self.parser_errors += 1
        return self._tables(out, None)

    def _add_by_sid(self, out: _Out, m: _Module, got, position) -> None:
        """Rows of closing sessions keyed by session id ([(sid, row)] or Records) into `out`, by
        each session's position among the closed sessions (`position`: _positions')."""
        for piece in got if isinstance(got, list) and got and isinstance(got[0], Records) else [got]:
            if isinstance(piece, Records):
                out.records(m, piece.name, piece.table, position(np.asarray(piece.index, dtype=np.int64)))
            elif piece:
                ks = position(np.fromiter((s for s, _ in piece), dtype=np.int64, count=len(piece))).tolist()
                for k, (_, row) in zip(ks, piece):
                    out.row(m, k, row)

    @staticmethod
    def _add_rows(out: _Out, k: int, rows: list, tuples: dict) -> None:
        """Dict rows of the session at position k, their session columns filled from `tuples`."""
        fill = {name: tuples[name][k] for name in tuples}
        for m, row in rows:
            for name, value in fill.items():
                row.setdefault(name, value)
            out.row(m, k, row)

    def _run_joined(self, out: _Out, m: _Module, ks: np.ndarray, piece: JoinedStreams, sessions: pa.Table) -> None:
        """Module m's parse_streams over JoinedStreams of the sessions at positions `ks`; per
        session with parse_stream if the batch call fails (as _run_batch)."""
        try:
            got = m.mod.parse_streams(piece)
        except Exception:
            ks = ks.tolist()
            tuples = _tuples_at(sessions, ks)
            for i, k in enumerate(ks):
                stream = Stream(uid=tuples["uid"][k], orig_h=tuples["orig_h"][k], orig_p=tuples["orig_p"][k],
                                resp_h=tuples["resp_h"][k], resp_p=tuples["resp_p"][k],
                                orig=piece.direction(2 * i), resp=piece.direction(2 * i + 1))
                self._add_rows(out, k, self._run_parsers([m], stream, None), tuples)
            return
        out.records_at(m, got, ks)

    def _run_batch(self, out: _Out, m: _Module, ks: list[int], streams: list[Stream]) -> None:
        """Module m's parse_streams over the streams of one close; per stream with parse_stream
        if the batch call fails (a parser bug costs the rows of one session, not of the batch)."""
        try:
            got = m.mod.parse_streams(streams)
        except Exception:
            for k, stream in zip(ks, streams):
                for _, row in self._run_parsers([m], stream, None):
                    out.row(m, k, row)
            return
        out.records_at(m, got, ks)

    def _tables(self, out: _Out, sessions: pa.Table | None) -> dict[str, pa.Table]:
        """Rows to tables: a row with `_table` goes to that shared table (credentials); keys
        starting with `_` (such as a clear password) stay in memory and are never written.
        Records (column tables) get their session columns from `sessions`, and a table made of
        several pieces is put back in session order."""
        pieces: dict[str, list[tuple[pa.Table, np.ndarray]]] = {}
        by_table: dict[str, tuple[list[int], list[dict]]] = {}
        for m, (ks, rows) in out.rows.items():
            for k, row in zip(ks, rows):
                name = row.get("_table", m.table)
                if "_table" in row:  # only shared-table rows (credentials) carry `_` keys
                    row = {key: v for key, v in row.items() if not key.startswith("_")}
                got = by_table.get(name)
                if got is None:
                    got = by_table[name] = ([], [])
                got[0].append(k)
                got[1].append(row)
        schemas = self.tables()
        for name, (ks, rows) in by_table.items():
            schema = schemas.get(name)
            if schema is None:
                self.parser_errors += len(rows)
                continue
            table, ks = self._table_of(name, rows, ks, schema)
            if table is not None:
                pieces.setdefault(name, []).append((table, ks))
        for name, table, ks in out.tables:
            schema = schemas.get(name)
            if schema is None:
                self.parser_errors += table.num_rows
                continue
            try:
                have = set(table.column_names)  # (a property that builds its list at every use)
                for field in schema:  # columns a module leaves out are null (the session's: filled)
                    if field.name not in have:
                        table = table.append_column(field, pa.nulls(table.num_rows, field.type))
                table = table.select(schema.names)
                if not table.schema.equals(schema):  # (a cast of equal types is no free copy)
                    table = ac.cast_table(table, schema)
                table = _session_columns(table, sessions, ks)
            except Exception:  # a module's columns not as its schema says: a bug, its rows lost
                self.parser_errors += 1
                continue
            pieces.setdefault(name, []).append((table, ks))
        tables = {}
        for name, parts in pieces.items():
            if len(parts) == 1:
                tables[name] = parts[0][0]
                continue
            table = pa.concat_tables([t for t, _ in parts])
            ks = np.concatenate([k for _, k in parts])
            if (np.diff(ks) < 0).any():
                table = _reordered(table, np.argsort(ks, kind="stable"))
            tables[name] = table
        return tables

    def _table_of(self, name: str, rows: list[dict], ks: list[int], schema: pa.Schema):
        """Row dicts to a table (and their session positions); a row with a value that does not
        fit its column is dropped, the others kept."""
        try:
            return _table_of_rows(rows, schema), np.asarray(ks, dtype=np.int64)
        except Exception:
            good, kept = [], []
            for k, row in zip(ks, rows):
                try:
                    good.append(pa.Table.from_pylist([row], schema=schema))
                    kept.append(k)
                except Exception:
                    self.bad_rows[name] = self.bad_rows.get(name, 0) + 1
            if not good:
                return None, None
            return pa.concat_tables(good), np.asarray(kept, dtype=np.int64)

    def _parse_stream(self, directions: tuple | None, k: int, tuples: dict, app: str, batched: dict) -> list:
        if directions is None:  # no parser reads it
            return []
        orig, resp = directions
        parsers = self._stream_parsers(app, tuples["resp_p"][k])
        if not parsers or not (orig.data or resp.data):
            return []
        stream = Stream(uid=tuples["uid"][k], orig_h=tuples["orig_h"][k], orig_p=tuples["orig_p"][k],
                        resp_h=tuples["resp_h"][k], resp_p=tuples["resp_p"][k], orig=orig, resp=resp,
                        app="" if app == "Unknown" else app)
        out = self._run_parsers(parsers, stream, (k, batched))
        for _, row in list(out):  # a proxy (SOCKS) says where the connection it carries begins
            inner = row.get("_inner")
            if inner:
                orig_off, resp_off, port = inner
                carried = Stream(uid=stream.uid, orig_h=stream.orig_h, orig_p=stream.orig_p, resp_h=stream.resp_h,
                                 resp_p=stream.resp_p, orig=orig.after(orig_off), resp=resp.after(resp_off))
                by_port = self._stream_parsers("", port)
                inner = self._run_parsers(by_port, carried, None)
                if not inner:  # not what its port says (HTTP inside CONNECT to :443): the parsers
                    # that recognise their protocol by content try (others accept any text)
                    sniffers = [m for m in self.stream_modules if m.name in SELF_DETECTING and m not in by_port]
                    inner = self._run_parsers(sniffers, carried, None)
                out.extend(inner)
        return out

    def _run_parsers(self, parsers: tuple[_Module, ...] | list[_Module], stream: Stream,
                     batch: tuple[int, dict] | None) -> list:
        """The rows of `parsers` on `stream`; with `batch` (session position, work lists), a
        module with parse_streams is queued for one call per close instead."""
        out = []
        for m in parsers:
            if batch is not None and hasattr(m.mod, "parse_streams"):
                k, batched = batch
                work = batched.get(m)
                if work is None:
                    work = batched[m] = ([], [])
                work[0].append(k)
                work[1].append(stream)
                continue
            try:
                out.extend((m, row) for row in m.mod.parse_stream(stream))
            except Exception:
                self.parser_errors += 1
        return out

    def tables(self) -> dict[str, pa.Schema]:
        from wiretrail.app import credentials

        return {credentials.TABLE: credentials.SCHEMA, **{m.table: m.schema for m in self.modules}}


def _endpoints(cols: dict, is_orig: np.ndarray, rows: np.ndarray) -> Endpoints:
    """The session ends of packets `rows` (the decoder's source and destination, the way round
    is_orig says)."""
    orig = is_orig[rows]
    src_hi, src_lo = cols["src_hi"][rows].astype(np.uint64), cols["src_lo"][rows].astype(np.uint64)
    dst_hi, dst_lo = cols["dst_hi"][rows].astype(np.uint64), cols["dst_lo"][rows].astype(np.uint64)
    sport, dport = cols["sport"][rows].astype(np.int64), cols["dport"][rows].astype(np.int64)
    return Endpoints(orig_hi=np.where(orig, src_hi, dst_hi), orig_lo=np.where(orig, src_lo, dst_lo),
                     resp_hi=np.where(orig, dst_hi, src_hi), resp_lo=np.where(orig, dst_lo, src_lo),
                     orig_p=np.where(orig, sport, dport), resp_p=np.where(orig, dport, sport))


def _table_of_rows(rows: list[dict], schema: pa.Schema) -> pa.Table:
    """Row dicts to a table, converted in C++ as one struct array (keys not in the schema are
    ignored, missing ones are null): a fifth less than Table.from_pylist, which gathers each
    column from the dicts in Python (measured on the protocol tables of mix_small.pcap)."""
    struct = pa.array(rows, type=pa.struct(schema))
    return pa.Table.from_batches([pa.RecordBatch.from_struct_array(struct)], schema=schema)


# What the stage holds of a live session (bits of its `has` column): its uid and 5-tuple in
# `tuples`, dict rows in `rows`, reassembly state (a payload or a SYN kept), the state of a
# datagram parser closed one session at a time (`dgram_state`); from _HAS_BATCH up, one bit
# per module whose states close in one call.
_HAS_TUPLE, _HAS_ROWS, _HAS_STREAM, _HAS_STATE, _HAS_BATCH = 1, 2, 4, 8, 16

_LAST = 1 << 62  # the session position of rows that belong to no closing session (trackers')


class _Out:
    """What one close produces, before it becomes tables: dict rows per module with their
    sessions' positions, and column tables (Records) with theirs."""

    def __init__(self):
        self.rows: dict[_Module, tuple[list[int], list[dict]]] = {}
        self.tables: list[tuple[str, pa.Table, np.ndarray]] = []

    def row(self, m: _Module, k: int, row: dict) -> None:
        got = self.rows.get(m)
        if got is None:
            got = self.rows[m] = ([], [])
        got[0].append(k)
        got[1].append(row)

    def records(self, m: _Module, name: str | None, table: pa.Table, ks: np.ndarray) -> None:
        if table.num_rows:
            self.tables.append((name or m.table, table, ks))

    def records_at(self, m: _Module, got: Records | list[Records], ks: list[int]) -> None:
        """A batch call's Records (indexed by item), the items being the sessions at positions ks."""
        at = np.asarray(ks, dtype=np.int64)
        for part in got if isinstance(got, list) else [got]:
            self.records(m, part.name, part.table, at[np.asarray(part.index, dtype=np.int64)])


def _positions(sids: np.ndarray):
    """A function from session ids to their positions in `sids` (the closed sessions, in the
    sessions table's order): `sids` sorted once for all the modules' rows of a close."""
    order = np.argsort(sids, kind="stable")
    return lambda of: order[np.searchsorted(sids, of, sorter=order)]


def _grouped(values: np.ndarray) -> tuple[list, list[np.ndarray]]:
    """The distinct values (ascending) and, for each, the positions where it occurs, in order:
    one sort, where a mask per distinct value cost a pass over all of them each (a close of
    mix.pcap meets 2,077 server ports of port scans among 3,595 sessions)."""
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    cuts = np.flatnonzero(ordered[1:] != ordered[:-1]) + 1
    firsts = np.concatenate([[0], cuts]) if len(values) else cuts
    return ordered[firsts].tolist(), np.split(order, cuts)


def _column(table: pa.Table, name: str, null=0) -> np.ndarray:
    """A column of numbers as numpy, nulls as `null`."""
    column = table.column(name)
    if column.null_count:
        column = ac.fill_null(column, null)
    return column.chunk(0).to_numpy() if column.num_chunks == 1 else column.to_numpy()


def _tuples_at(sessions: pa.Table, ks: list[int]) -> dict[str, dict[int, object]]:
    """uid and 5-tuple of the sessions at positions `ks`, as Python values: column -> k -> value."""
    picked = ac.take(sessions.select(["uid", "orig_h", "orig_p", "resp_h", "resp_p"]), pa.array(ks, pa.int64()))
    return {name: dict(zip(ks, values)) for name, values in picked.to_pydict().items()}


def _session_columns(table: pa.Table, sessions: pa.Table | None, ks: np.ndarray) -> pa.Table:
    """`table` with the nulls of its session columns (those of base.SESSION_COLUMNS it has, ts
    aside) taken from the sessions at positions `ks` (a module's own values stay: DNS gives
    those of a session whose roles Zeek flips)."""
    if sessions is None:
        return table
    names = [name for name in ("uid", "orig_h", "orig_p", "resp_h", "resp_p") if table.schema.get_field_index(name) >= 0]
    if not names:
        return table
    picked = ac.take(sessions.select(names), pa.array(ks))  # one take for all of them
    for name in names:
        i = table.schema.get_field_index(name)
        field = table.schema.field(i)
        column = picked.column(name)
        if column.type != field.type:
            column = ac.cast(column, field.type)
        if table.column(i).null_count < table.num_rows:
            column = ac.coalesce(table.column(i), column)
        table = table.set_column(i, field, column)
    return table


def _reordered(table: pa.Table, order: np.ndarray) -> pa.Table:
    """`table`'s rows in `order`. The pieces of a protocol table come each in session order (a
    few dict rows, and a module's columns), so the merged order is mostly runs of rows already
    in place: those are sliced, which copies nothing (the store copies each hour's rows once
    anyway when it writes them), where a take gathered every column, the TLS table's lists
    included (1.4 ms a close on mix.pcap). Many short runs: one take."""
    if len(order) == 0:
        return table
    cuts = np.flatnonzero(np.diff(order) != 1) + 1
    if len(cuts) > 64:
        return ac.take(table, pa.array(order))
    starts = [0, *cuts.tolist()]
    stops = [*cuts.tolist(), len(order)]
    return pa.concat_tables([table.slice(int(order[a]), b - a) for a, b in zip(starts, stops)])


def _set(table: pa.Table, name: str, values: pa.Array) -> pa.Table:
    i = table.schema.get_field_index(name)
    if i < 0:
        return table.append_column(name, values)
    field = table.schema.field(i)
    return table.set_column(i, field, values if values.type == field.type else ac.cast(values, field.type))
