"""Per-packet comparison of wiretrail.decode with tshark on a capture file.

tshark lists every occurrence of a field (outer and inner IP of a tunnel, the IP header
quoted in an ICMP error) comma-separated; the packet's own innermost header is the last
IP layer before any ICMP layer in frame.protocols, and the ports are those of the first
TCP/UDP layer after it.
"""

from __future__ import annotations

import ipaddress
import subprocess

import numpy as np

from wiretrail.batch import VLAN_NONE

FIELDS = ["frame.protocols", "ip.src", "ip.dst", "ip.proto", "ipv6.src", "ipv6.dst",
          "tcp.srcport", "tcp.dstport", "udp.srcport", "udp.dstport", "tcp.flags", "tcp.seq_raw",
          "tcp.ack_raw", "vlan.id", "icmp.type", "icmp.code", "icmpv6.type", "icmpv6.code",
          "eth.src", "eth.dst", "sll.src.eth", "wlan.fc.type", "wlan.sa", "wlan.da"]
LAYER_PROTO = {"tcp": 6, "udp": 17, "icmp": 1, "icmpv6": 58, "sctp": 132, "gre": 47, "esp": 50,
               "ipv6.nonxt": 59, "ospf": 89, "igmp": 2, "pim": 103, "vrrp": 112, "l2tp": 115}


def tshark_rows(path) -> list[dict]:
    cmd = ["tshark", "-n", "-r", str(path), "-o", "ip.defragment:FALSE", "-o", "ipv6.defragment:FALSE",
           "-T", "fields", "-E", "separator=/t", "-E", "occurrence=a", "-E", "aggregator=,"]
    for f in FIELDS:
        cmd += ["-e", f]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300).stdout
    rows = []
    for line in out.splitlines():
        vals = line.split("\t")
        vals += [""] * (len(FIELDS) - len(vals))
        rows.append({f: (v.split(",") if v else []) for f, v in zip(FIELDS, vals)})
    return rows


def expected(row: dict):
    """(ip_ver, src, dst, proto, sport, dport, flags, seq, ack) of tshark's innermost header, or None."""
    layers = row["frame.protocols"][0].split(":") if row["frame.protocols"] else []
    stop = len(layers)
    for k, name in enumerate(layers):
        if name in ("icmp", "icmpv6"):
            stop = k
            break
    ip_at = [k for k in range(stop) if layers[k] in ("ip", "ipv6")]
    if not ip_at:
        return None
    k = ip_at[-1]
    name = layers[k]
    occ = sum(1 for j in range(k) if layers[j] == name)
    if name == "ip":
        ver, src, dst = 4, row["ip.src"], row["ip.dst"]
        proto = int(row["ip.proto"][occ]) if occ < len(row["ip.proto"]) else None
    else:
        ver, src, dst = 6, row["ipv6.src"], row["ipv6.dst"]
        nxt = [x for x in layers[k + 1:] if not x.startswith("ipv6.")]
        proto = LAYER_PROTO.get(nxt[0]) if nxt else None
    if occ >= len(src) or occ >= len(dst):
        return None
    sport = dport = flags = seq = ack = None
    nxt = layers[k + 1:]
    for j, lname in enumerate(nxt):
        if lname.startswith("ipv6."):
            continue
        if lname in ("tcp", "udp"):
            o = sum(1 for x in layers[:k + 1 + j] if x == lname)
            if o < len(row[f"{lname}.srcport"]):
                sport, dport = int(row[f"{lname}.srcport"][o]), int(row[f"{lname}.dstport"][o])
            if lname == "tcp" and o < len(row["tcp.flags"]):
                flags = int(row["tcp.flags"][o], 16) & 0xFF
                seq = int(row["tcp.seq_raw"][o])
                ack = int(row["tcp.ack_raw"][o])
        elif lname in ("icmp", "icmpv6") and row[f"{lname}.type"]:
            sport, dport = int(row[f"{lname}.type"][0]), int(row[f"{lname}.code"][0])
        break
    return ver, src[occ], dst[occ], proto, sport, dport, flags, seq, ack


def _mac(text: str) -> int:
    return int(text.replace(":", ""), 16)


def expected_macs(row: dict) -> tuple[int, int]:
    """(source, destination) MAC of the outermost link header that has them, as integers (0: none):
    Ethernet, Linux cooked capture (source only), 802.11 data frames (wlan.sa/da by the DS bits)."""
    layers = row["frame.protocols"][0].split(":") if row["frame.protocols"] else []
    for name in layers:
        if name == "eth" and row["eth.src"]:
            return _mac(row["eth.src"][0]), _mac(row["eth.dst"][0])
        if name == "sll":
            if row["sll.src.eth"]:
                return _mac(row["sll.src.eth"][0]), 0
            continue
        if name == "wlan":
            if row["wlan.fc.type"] and int(row["wlan.fc.type"][0], 0) == 2 and row["wlan.sa"] and row["wlan.da"]:
                return _mac(row["wlan.sa"][0]), _mac(row["wlan.da"][0])
            return 0, 0
    return 0, 0


def addr(hi: int, lo: int, ver: int) -> str:
    if ver == 4:
        return str(ipaddress.IPv4Address(lo & 0xFFFFFFFF))
    return str(ipaddress.IPv6Address((hi << 64) | lo))


def compare(path, cols: dict[str, np.ndarray]) -> dict:
    """Counts of packets and of agreement per aspect between decode columns and tshark."""
    rows = tshark_rows(path)
    res = {"packets": 0, "tuple_ok": 0, "tcp": 0, "tcp_ok": 0, "vlan_ok": 0, "mac_ok": 0, "bad": []}
    n = min(len(rows), len(cols["ip_ver"]))
    if len(rows) != len(cols["ip_ver"]):
        res["bad"].append(("count", len(rows), len(cols["ip_ver"])))
    c = {k: v.tolist() for k, v in cols.items()}
    for i in range(n):
        res["packets"] += 1
        exp = expected(rows[i])
        if exp is None:
            ok = c["ip_ver"][i] == 0
            got = (c["ip_ver"][i],)
        else:
            ver, src, dst, proto, sport, dport, flags, seq, ack = exp
            v = c["ip_ver"][i]
            got = (v, addr(c["src_hi"][i], c["src_lo"][i], v) if v else "",
                   addr(c["dst_hi"][i], c["dst_lo"][i], v) if v else "", c["proto"][i], c["sport"][i], c["dport"][i])
            ok = (v == ver and got[1] == src and got[2] == dst
                  and (proto is None or proto == c["proto"][i])
                  and (sport is None or (sport == c["sport"][i] and dport == c["dport"][i]))
                  and (sport is not None or c["l4_off"][i] < 0 or c["proto"][i] not in (6, 17, 1, 58)))
            if flags is not None:
                res["tcp"] += 1
                if (flags == c["tcp_flags"][i] and seq == c["tcp_seq"][i] and ack == c["tcp_ack"][i]):
                    res["tcp_ok"] += 1
        res["tuple_ok"] += ok
        if not ok and len(res["bad"]) < 5:
            res["bad"].append((i + 1, exp, got))
        tv = int(rows[i]["vlan.id"][0]) if rows[i]["vlan.id"] else VLAN_NONE
        res["vlan_ok"] += tv == c["vlan"][i]
        res["mac_ok"] += expected_macs(rows[i]) == (c["src_mac"][i], c["dst_mac"][i])
    return res
