"""The `sessions` table: one row per closed session, Zeek conn.log names without `id.`."""

from __future__ import annotations

import pyarrow as pa

from wiretrail.batch import (
    TUNNEL_AYIYA, TUNNEL_CAPWAP, TUNNEL_GENEVE, TUNNEL_GTP, TUNNEL_NAMES, TUNNEL_TEREDO, TUNNEL_VXLAN,
)

SESSIONS_SCHEMA = pa.schema([
    ("uid", pa.string()),
    ("sid", pa.int64()),
    ("ts", pa.timestamp("ns")),
    ("last_ts", pa.timestamp("ns")),
    ("duration", pa.int64()),          # ns
    ("link", pa.string()),
    ("vlan", pa.int32()),              # null if untagged
    ("inner_vlan", pa.int32()),        # null if none
    ("tunnel", pa.string()),           # outermost tunnel removed by the decoder, null if none
    ("orig_h", pa.string()),
    ("orig_p", pa.int32()),
    ("resp_h", pa.string()),
    ("resp_p", pa.int32()),
    ("proto", pa.string()),            # tcp, udp, icmp (v4 and v6, as Zeek), unknown_transport
    ("ip_proto", pa.int32()),
    ("service", pa.string()),          # filled by a later stage
    ("orig_bytes", pa.int64()),
    ("resp_bytes", pa.int64()),
    ("missed_bytes", pa.int64()),
    ("orig_pkts", pa.int64()),
    ("orig_ip_bytes", pa.int64()),
    ("resp_pkts", pa.int64()),
    ("resp_ip_bytes", pa.int64()),
    ("conn_state", pa.string()),
    ("history", pa.string()),
    ("community_id", pa.string()),
    ("icmp_type", pa.int32()),         # null unless ICMP
    ("icmp_code", pa.int32()),
    ("rtt", pa.int64()),               # TCP handshake SYN -> ACK, ns; null if not seen
    ("retrans_orig", pa.int32()),
    ("retrans_resp", pa.int32()),
    ("ooo_orig", pa.int32()),
    ("ooo_resp", pa.int32()),
    ("zero_win_orig", pa.int32()),
    ("zero_win_resp", pa.int32()),
    ("anomalies", pa.uint32()),        # OR of the packets' ANOM_* bits
    ("orig_tcp_flags", pa.uint8()),    # OR of the TCP flags each side sent (null unless TCP)
    ("resp_tcp_flags", pa.uint8()),
    ("orig_wire_bytes", pa.int64()),   # frame bytes as captured on the wire, link layer included
    ("resp_wire_bytes", pa.int64()),
    ("close_reason", pa.string()),     # timeout (idle, active, finished, attempt) or shutdown (end of input)
    ("orig_l2_addr", pa.string()),     # link-layer (MAC) address of each side, "aa:bb:cc:dd:ee:ff", from the
    ("resp_l2_addr", pa.string()),     # first packet that had one (Zeek's mac-logging); null if unknown
    # filled by the application stage (null without it)
    ("app", pa.string()),              # nDPI's Master.App, e.g. TLS.YouTube, DNS, Unknown
    ("category", pa.string()),         # nDPI's category, e.g. Web, Network, Media
    ("port_mismatch", pa.bool_()),     # a well-known protocol on a port it does not belong to
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
