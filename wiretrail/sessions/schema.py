"""The `sessions` table: one row per closed session, Zeek conn.log names without `id.`."""

from __future__ import annotations

import pyarrow as pa

from wiretrail.batch import (
    TUNNEL_AYIYA, TUNNEL_CAPWAP, TUNNEL_GENEVE, TUNNEL_GTP, TUNNEL_NAMES, TUNNEL_TEREDO, TUNNEL_VXLAN,
)

def _always(name: str, type: pa.DataType) -> pa.Field:
    """A column every session has a value in, declared not null: Parquet then writes no
    definition levels for it (15% of writing the sessions parts of mix.pcap)."""
    return pa.field(name, type, nullable=False)


SESSIONS_SCHEMA = pa.schema([
    _always("uid", pa.string()),
    _always("sid", pa.int64()),
    _always("ts", pa.timestamp("ns")),
    _always("last_ts", pa.timestamp("ns")),
    _always("duration", pa.int64()),          # ns
    _always("link", pa.string()),
    ("vlan", pa.int32()),                     # null if untagged
    ("inner_vlan", pa.int32()),               # null if none
    ("tunnel", pa.string()),                  # outermost tunnel removed by the decoder, null if none
    _always("orig_h", pa.string()),
    _always("orig_p", pa.int32()),
    _always("resp_h", pa.string()),
    _always("resp_p", pa.int32()),
    _always("proto", pa.string()),            # tcp, udp, icmp (v4 and v6, as Zeek), unknown_transport
    _always("ip_proto", pa.int32()),
    ("service", pa.string()),                 # filled by a later stage
    _always("orig_bytes", pa.int64()),
    _always("resp_bytes", pa.int64()),
    _always("missed_bytes", pa.int64()),
    _always("orig_pkts", pa.int64()),
    _always("orig_ip_bytes", pa.int64()),
    _always("resp_pkts", pa.int64()),
    _always("resp_ip_bytes", pa.int64()),
    _always("conn_state", pa.string()),
    ("history", pa.string()),
    ("community_id", pa.string()),
    ("icmp_type", pa.int32()),                # null unless ICMP
    ("icmp_code", pa.int32()),
    ("rtt", pa.int64()),                      # TCP handshake SYN -> ACK, ns; null if not seen
    _always("retrans_orig", pa.int32()),
    _always("retrans_resp", pa.int32()),
    _always("ooo_orig", pa.int32()),
    _always("ooo_resp", pa.int32()),
    _always("zero_win_orig", pa.int32()),
    _always("zero_win_resp", pa.int32()),
    _always("anomalies", pa.uint32()),        # OR of the packets' ANOM_* bits
    ("orig_tcp_flags", pa.uint8()),           # OR of the TCP flags each side sent (null unless TCP)
    ("resp_tcp_flags", pa.uint8()),
    _always("orig_wire_bytes", pa.int64()),   # frame bytes as captured on the wire, link layer included
    _always("resp_wire_bytes", pa.int64()),
    _always("close_reason", pa.string()),     # timeout (idle, active, finished, attempt) or shutdown (end of input)
    ("orig_l2_addr", pa.string()),            # link-layer (MAC) address of each side, "aa:bb:cc:dd:ee:ff", from the
    ("resp_l2_addr", pa.string()),            # first packet that had one (Zeek's mac-logging); null if unknown
    # filled by the application stage (null without it)
    ("app", pa.string()),                     # nDPI's Master.App, e.g. TLS.YouTube, DNS, Unknown
    ("category", pa.string()),                # nDPI's category, e.g. Web, Network, Media
    ("port_mismatch", pa.bool_()),            # a well-known protocol on a port it does not belong to
])


# Flows as nDPI's ndpiReader (4.2, Debian 12) counts them ("Unique flows"), over the sessions
# table: one flow per IP protocol, innermost VLAN and unordered address:port pair (ports 0
# unless TCP/UDP), never split in time (reading a file, ndpiReader times no flow out). It opens
# MPLS, PPPoE and IP-in-IP but no UDP tunnel (GTP, CAPWAP only with -t; Teredo, VXLAN never): the
# sessions inside those are not flows to it, their outer UDP sessions are. Sessions follow
# Zeek instead (idle and active timeouts, a new connection on a SYN after a close), so a
# capture has more sessions than flows; this sets the two side by side (tests, bench).
_NOT_OPENED_BY_NDPIREADER = ", ".join(f"'{TUNNEL_NAMES[t]}'" for t in (
    TUNNEL_VXLAN, TUNNEL_GENEVE, TUNNEL_TEREDO, TUNNEL_GTP, TUNNEL_AYIYA, TUNNEL_CAPWAP))
NDPI_FLOW_COUNT_SQL = f"""
SELECT count(DISTINCT (ip_proto, coalesce(inner_vlan, vlan, 0), least(a, b), greatest(a, b))) AS flows
FROM (SELECT ip_proto, vlan, inner_vlan,
             orig_h || '|' || CASE WHEN ip_proto IN (6, 17) THEN orig_p ELSE 0 END AS a,
             resp_h || '|' || CASE WHEN ip_proto IN (6, 17) THEN resp_p ELSE 0 END AS b
      FROM sessions
      WHERE tunnel IS NULL OR tunnel NOT IN ({_NOT_OPENED_BY_NDPIREADER}))
"""
