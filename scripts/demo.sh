#!/usr/bin/env bash
# The main job end to end: install, make a sample capture with Wiretrail's own generator,
# ingest it into a fresh store, and show what was found.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
wt=.venv/bin/wiretrail
store=demo-data
rm -rf "$store" && mkdir -p "$store"

$wt sample "$store/sample.pcap" --sessions 3000
$wt ingest --store "$store/store" --no-progress "$store/sample.pcap"

echo; echo "== sessions by protocol and Zeek conn_state"
$wt sql --store "$store/store" "SELECT proto, conn_state, count(*) AS sessions, sum(orig_pkts + resp_pkts) AS packets
    FROM sessions GROUP BY ALL ORDER BY sessions DESC"
echo; echo "== top talkers by bytes"
$wt sql --store "$store/store" "SELECT orig_h, count(*) AS sessions, sum(orig_ip_bytes + resp_ip_bytes) AS bytes
    FROM sessions GROUP BY orig_h ORDER BY bytes DESC LIMIT 5"
echo; echo "== applications (nDPI) and their sessions"
$wt sql --store "$store/store" "SELECT app, category, count(*) AS sessions FROM sessions GROUP BY ALL ORDER BY sessions DESC LIMIT 8"
echo; echo "== the most asked DNS names, and HTTP requests by host"
$wt sql --store "$store/store" "SELECT query, qtype_name, count(*) AS n FROM dns GROUP BY ALL ORDER BY n DESC LIMIT 5"
$wt sql --store "$store/store" "SELECT host, method, count(*) AS n, sum(response_body_len) AS bytes FROM http GROUP BY ALL ORDER BY n DESC LIMIT 5"
echo; echo "== sessions per link"
$wt sql --store "$store/store" "SELECT link, vlan, count(*) AS sessions FROM sessions GROUP BY ALL ORDER BY ALL"

uid=$($wt sql --store "$store/store" --format csv \
      "SELECT uid FROM sessions WHERE proto = 'tcp' AND conn_state = 'SF' ORDER BY orig_pkts + resp_pkts DESC LIMIT 1" | tail -1)
echo; echo "== the packets of the busiest complete TCP session ($uid)"
$wt extract --store "$store/store" --session "$uid" -o "$store/session.pcap"
tcpdump -nn -r "$store/session.pcap" 2>/dev/null | head -20

$wt export --store "$store/store" --format zeek --out "$store/zeek"
$wt export --store "$store/store" --format eve --out "$store/eve"
echo; echo "== first lines of the Zeek-format conn.log and dns.log, and of Suricata-format eve.json"
head -1 "$store/zeek/conn.log"
head -1 "$store/zeek/dns.log"
head -1 "$store/eve/eve.json"
