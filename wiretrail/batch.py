"""The columns that flow between stages.

A capture source yields `FrameBatch`es: every frame of the batch lives in one uint8
buffer, described by per-frame columns. The decoder turns a FrameBatch into
`PacketColumns` (one numpy array per field, one row per frame). Sessions add a session
number and direction per row. No stage builds a Python object per packet.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# Link-layer types (LINKTYPE_* numbers from the pcap/pcapng specifications).
LINKTYPE_NULL = 0
LINKTYPE_ETHERNET = 1
LINKTYPE_RAW_DLT12 = 12  # raw IP as written by some BSDs; treated as LINKTYPE_RAW
LINKTYPE_RAW_DLT14 = 14  # raw IP as written by some BSDs; treated as LINKTYPE_RAW
LINKTYPE_PPP = 9
LINKTYPE_PPP_HDLC = 50
LINKTYPE_PPP_ETHER = 51
LINKTYPE_RAW = 101
LINKTYPE_C_HDLC = 104
LINKTYPE_FRELAY = 107
LINKTYPE_LOOP = 108
LINKTYPE_LINUX_SLL = 113
LINKTYPE_IEEE802_11_RADIOTAP = 127
LINKTYPE_PPI = 192
LINKTYPE_IPV4 = 228
LINKTYPE_IPV6 = 229
LINKTYPE_NFLOG = 239
LINKTYPE_LINUX_SLL2 = 276

# Link types the decoder understands; a capture whose every interface is of another type is
# rejected by the reader with a one-line error.
DECODABLE_LINKTYPES = frozenset({
    LINKTYPE_NULL, LINKTYPE_ETHERNET, LINKTYPE_RAW_DLT12, LINKTYPE_RAW_DLT14, LINKTYPE_PPP,
    LINKTYPE_PPP_HDLC, LINKTYPE_PPP_ETHER, LINKTYPE_RAW, LINKTYPE_C_HDLC, LINKTYPE_LOOP,
    LINKTYPE_LINUX_SLL, LINKTYPE_IPV4, LINKTYPE_IPV6, LINKTYPE_LINUX_SLL2, LINKTYPE_FRELAY,
})

# Link types in the assigned range of the tcpdump.org registry (LINKTYPE_MATCHING_MAX is
# about 300). A capture of an assigned type the decoder does not read (radiotap, NFLOG, ...)
# is still stored, packet for packet, with no sessions; any other number is a broken file.
ASSIGNED_LINKTYPES = frozenset(range(300))

# Session ids: the top bits are the hour the session started (hours since the epoch), the
# low SID_HOUR_SHIFT bits the run's session number, permuted (sessions.flowtable: unique within
# a run, from a random start per run). A uid thus says which hour
# partitions of the store hold its session and packets (Arkime's session ids carry the date
# for the same reason), and a lookup never scans the whole store.
SID_HOUR_SHIFT = 43
SID_HASH_MASK = (1 << SID_HOUR_SHIFT) - 1
HOUR_NS = 3_600_000_000_000


def sid_hour(sid: int) -> int:
    """Hours since the epoch at which session `sid` started."""
    return int(sid) >> SID_HOUR_SHIFT


@dataclass
class Interface:
    """One capture interface of a source (a pcap file has one; a pcapng one per IDB)."""

    linktype: int
    snaplen: int = 262144
    name: str = ""  # pcapng if_name, or "" when the file does not say


@dataclass
class FrameBatch:
    """Raw frames of one batch, as read from a source.

    data     uint8[...]  all frames' bytes, back to back
    offset   int64[n]    start of frame i in `data`
    caplen   int32[n]    captured length of frame i
    wirelen  int32[n]    original length on the wire
    ts       int64[n]    capture time, integer nanoseconds since the Unix epoch
    iface    int16[n]    index into `interfaces`
    linktype uint16[n]   interfaces[iface[i]].linktype, denormalised for the decoder
    """

    data: np.ndarray
    offset: np.ndarray
    caplen: np.ndarray
    wirelen: np.ndarray
    ts: np.ndarray
    iface: np.ndarray
    linktype: np.ndarray
    interfaces: list[Interface] = field(default_factory=list)
    source: str = ""
    # Set by the pcap reader when every frame i is preceded in `data` by its record header in
    # little-endian pcap layout (data[offset[i] - 16:offset[i]]), with this many nanoseconds per
    # unit of the header's fraction field (1000: microsecond pcap, 1: nanosecond). The packet
    # store then writes runs of records as they are, with no re-layout.
    pcap_record_frac_ns: int = 0

    def __len__(self) -> int:
        return len(self.offset)


# PacketColumns: the decoder's output, one array per field, `n` rows (one per frame).
# Offsets are relative to the frame start (data[offset[i] + l3_off[i]] is the first IP byte).
# Addresses are 128-bit, split into two uint64; IPv4 is IPv4-mapped IPv6 (::ffff:a.b.c.d),
# so hi == 0 and lo == 0x0000_ffff_0000_0000 | ipv4.
PACKET_FIELDS: dict[str, type] = {
    "ethertype": np.uint16,   # innermost L3 ethertype (0x0800, 0x86dd, 0x0806, ...), 0 if none
    "vlan": np.uint16,        # outer 802.1Q VLAN id, VLAN_NONE if untagged
    "inner_vlan": np.uint16,  # inner (QinQ) VLAN id, VLAN_NONE if none
    "tunnel": np.uint8,       # TUNNEL_* of the outermost tunnel that was removed, 0 if none
    "ip_ver": np.uint8,       # 4, 6, or 0 (not IP)
    "proto": np.uint8,        # IP protocol of the innermost IP header (after extension headers)
    "src_hi": np.uint64, "src_lo": np.uint64,
    "dst_hi": np.uint64, "dst_lo": np.uint64,
    "sport": np.uint16,       # TCP/UDP source port; ICMP/ICMPv6: type
    "dport": np.uint16,       # TCP/UDP destination port; ICMP/ICMPv6: code
    "tcp_flags": np.uint8,
    "tcp_seq": np.uint32,
    "tcp_ack": np.uint32,
    "tcp_win": np.uint16,     # raw window field (unscaled)
    "tcp_wscale": np.int8,    # window scale option of a SYN, -1 if absent (the decoder fills -1)
    "tcp_mss": np.uint16,     # MSS option of a SYN, 0 if absent
    "ttl": np.uint8,          # IPv4 TTL / IPv6 hop limit
    "l3_off": np.int32,       # offset of the innermost IP header in the frame, -1 if none
    "l4_off": np.int32,       # offset of the L4 header, -1 if none
    "pl_off": np.int32,       # offset of the L4 payload, -1 if none
    "pl_len": np.int32,       # L4 payload length (bounded by IP length and caplen)
    "ip_len": np.int32,       # IP total length from the header (IPv6: 40 + payload length + ...)
    "frag": np.uint8,         # FRAG_* state of the innermost IP header
    "frag_id": np.uint32,     # IPv4 identification / IPv6 fragment identification
    "frag_off": np.uint32,    # fragment offset in bytes
    "anomaly": np.uint32,     # ANOM_* bits; a packet with bits set is still kept and counted
    # link-layer addresses of the outermost header that has them (Ethernet, Linux cooked
    # capture: source only, 802.11 data frames by their DS bits), 48 bits, 0 if none
    "src_mac": np.uint64,
    "dst_mac": np.uint64,
}

VLAN_NONE = 0xFFFF

TUNNEL_NONE = 0
TUNNEL_GRE = 1
TUNNEL_VXLAN = 2
TUNNEL_IPIP = 3       # IPv4/IPv6 in IPv4/IPv6 (incl. 6in4)
TUNNEL_MPLS = 4
TUNNEL_PPPOE = 5
TUNNEL_GENEVE = 6
TUNNEL_TEREDO = 7
TUNNEL_GTP = 8
TUNNEL_AYIYA = 9
TUNNEL_CAPWAP = 10    # CAPWAP data channel (wireless access points to their controller)
TUNNEL_NAMES = {
    TUNNEL_GRE: "GRE", TUNNEL_VXLAN: "VXLAN", TUNNEL_IPIP: "IP", TUNNEL_MPLS: "MPLS",
    TUNNEL_PPPOE: "PPPoE", TUNNEL_GENEVE: "GENEVE", TUNNEL_TEREDO: "Teredo", TUNNEL_GTP: "GTPv1",
    TUNNEL_AYIYA: "AYIYA", TUNNEL_CAPWAP: "CAPWAP",
}

FRAG_NONE = 0
FRAG_FIRST = 1        # offset 0, more fragments follow
FRAG_MORE = 2         # a later fragment (offset > 0)

# Anomaly bits (what Zeek would write to weird.log).
ANOM_TRUNCATED_L2 = 1 << 0
ANOM_TRUNCATED_IP = 1 << 1
ANOM_BAD_IP_HEADER = 1 << 2       # IHL < 5, version mismatch, ...
ANOM_IP_LEN_GT_FRAME = 1 << 3
ANOM_TRUNCATED_L4 = 1 << 4
ANOM_BAD_TCP_HEADER = 1 << 5      # data offset < 5
ANOM_UNKNOWN_LINKTYPE = 1 << 6
ANOM_UNKNOWN_ETHERTYPE = 1 << 7
ANOM_BAD_FRAGMENT = 1 << 8        # overlapping / oversize / timed out fragment
ANOM_TUNNEL_DEPTH = 1 << 9        # too many nested encapsulations
ANOM_CAPLEN_GT_WIRELEN = 1 << 10
ANOM_NAMES = {
    ANOM_TRUNCATED_L2: "truncated_link_header",
    ANOM_TRUNCATED_IP: "truncated_IP",
    ANOM_BAD_IP_HEADER: "bad_IP_header",
    ANOM_IP_LEN_GT_FRAME: "IP_len_gt_captured_len",
    ANOM_TRUNCATED_L4: "truncated_transport_header",
    ANOM_BAD_TCP_HEADER: "bad_TCP_header_len",
    ANOM_UNKNOWN_LINKTYPE: "unknown_link_type",
    ANOM_UNKNOWN_ETHERTYPE: "unknown_ethertype",
    ANOM_BAD_FRAGMENT: "bad_fragment",
    ANOM_TUNNEL_DEPTH: "tunnel_depth_exceeded",
    ANOM_CAPLEN_GT_WIRELEN: "caplen_gt_wirelen",
}

# TCP flag bits as in the header.
TCP_FIN, TCP_SYN, TCP_RST, TCP_PSH, TCP_ACK, TCP_URG = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20


def unset_columns(n: int) -> dict[str, np.ndarray]:
    """PacketColumns for n rows, their memory not set: for a decoder that writes every field of
    every row (decode_kernel writes empty_columns' defaults first, in the same pass, instead of
    numpy zeroing ~9 MB per batch in another)."""
    return {name: np.empty(n, dtype=dt) for name, dt in PACKET_FIELDS.items()}


def empty_columns(n: int) -> dict[str, np.ndarray]:
    """Allocate PacketColumns for n rows with 'absent' defaults."""
    cols = {name: np.zeros(n, dtype=dt) for name, dt in PACKET_FIELDS.items()}
    cols["vlan"][:] = VLAN_NONE
    cols["inner_vlan"][:] = VLAN_NONE
    for name in ("l3_off", "l4_off", "pl_off"):
        cols[name][:] = -1
    return cols
