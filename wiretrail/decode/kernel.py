"""The batch decoder kernel: link layer, VLAN/MPLS/PPPoE, tunnels, IPv4/IPv6, L4 headers.

One numba function walks every frame of a batch as a small state machine (link layer ->
ethertype -> IP -> tunnel -> ... -> L4) and writes one row of every PacketColumns array.
Every read is checked against the frame's captured end: a truncated or garbage frame sets
anomaly bits and stops, it never reads past the frame.

Link-layer addresses come from the outermost link header that has them: a tunnel's inner
Ethernet header (VXLAN, GENEVE, GRE, PBB, FabricPath, CAPWAP) leaves them as they were.

Tunnels: the innermost IP header and its L4 header are kept; the IP columns are rewritten
each time an inner IP header is accepted, so a tunnel whose inner header turns out to be
unusable leaves the outer packet's values in place.
"""

from __future__ import annotations

import numpy as np

from wiretrail.batch import (
    ANOM_BAD_IP_HEADER, ANOM_BAD_TCP_HEADER, ANOM_CAPLEN_GT_WIRELEN, ANOM_IP_LEN_GT_FRAME,
    ANOM_TRUNCATED_IP, ANOM_TRUNCATED_L2, ANOM_TRUNCATED_L4, ANOM_TUNNEL_DEPTH,
    ANOM_UNKNOWN_ETHERTYPE, ANOM_UNKNOWN_LINKTYPE, FRAG_FIRST, FRAG_MORE, TUNNEL_AYIYA, TUNNEL_GENEVE,
    TUNNEL_CAPWAP, TUNNEL_GRE, TUNNEL_GTP, TUNNEL_IPIP, TUNNEL_MPLS, TUNNEL_PPPOE, TUNNEL_TEREDO, TUNNEL_VXLAN,
    VLAN_NONE,
)
from wiretrail.bytes_kernels import be16, be32, prefetch_intrinsic
from wiretrail.jit import kernel, numba_hook

# Encapsulations removed before the packet is given up with ANOM_TUNNEL_DEPTH (MPLS and
# PPPoE count as one each, like GRE, VXLAN, GENEVE, IP-in-IP and Teredo).
MAX_TUNNEL_DEPTH = 4

VXLAN_PORT = 4789
VXLAN_GPE_PORT = 4790  # VXLAN Generic Protocol Extension: a next-protocol byte, IP or NSH inside
GENEVE_PORT = 6081
TEREDO_PORT = 3544
GRE_UDP_PORT = 4754   # GRE-in-UDP, RFC 8086
GTP_U_PORT = 2152     # GTPv1 user plane (mobile networks)
AYIYA_PORT = 5072     # AYIYA (SixXS IPv6 tunnels)
CAPWAP_DATA_PORT = 5247  # CAPWAP data channel (RFC 5415): the frames a wireless AP forwards

# Parser states
_S_DONE = 0
_S_ETH = 1      # Ethernet header at pos
_S_ET = 2       # ethertype `et` known, its payload at pos (VLAN tags are read here)
_S_IP = 3       # IP, version from the first nibble
_S_IP4 = 4
_S_IP6 = 5
_S_PPP = 6      # PPP protocol field at pos (optionally behind ff 03)
_S_MPLS = 7     # MPLS label stack at pos
_S_GRE = 8
_S_WLAN = 9     # IEEE 802.11 MAC header at pos

IPV4_MAPPED = np.uint64(0x0000FFFF00000000)

# Frames are this many rows ahead when their first two cache lines are prefetched: a batch is
# larger than the caches, and a frame's first read otherwise waits on memory (a third of the
# kernel's time went to that one load).
PREFETCH_ROWS = 16

_prefetch = None


@numba_hook
def _define_intrinsics() -> None:
    global _prefetch
    _prefetch = prefetch_intrinsic()


# Ethernet II types that are known not to carry IP: no ANOM_UNKNOWN_ETHERTYPE for them.
_KNOWN_NON_IP_ETHERTYPES = (
    0x0806, 0x8035, 0x0842, 0x22F0, 0x22F3, 0x6002, 0x6003, 0x6004, 0x809B, 0x80F3, 0x8137,
    0x8808, 0x8809, 0x8819, 0x8863, 0x886D, 0x8870, 0x887B, 0x888E, 0x8892, 0x889A, 0x88A2,
    0x88A4, 0x88AB, 0x88B5, 0x88B6, 0x88B7, 0x88B8, 0x88B9, 0x88BA, 0x88BF, 0x88CC, 0x88CD,
    0x88DC, 0x88E1, 0x88E3, 0x88E5, 0x88F5, 0x88F7, 0x88F8, 0x88FB, 0x8902, 0x8906, 0x8914,
    0x8915, 0x891D, 0x892F, 0x893A, 0x893F, 0x8940, 0x9000, 0xCAFE, 0x2000, 0x4242,
)
KNOWN_ETHERTYPE = np.zeros(65536, dtype=np.uint8)
KNOWN_ETHERTYPE[list(_KNOWN_NON_IP_ETHERTYPES)] = 1


@kernel(inline=True)
def _u64(d, p):
    return (np.uint64(be32(d, p)) << np.uint64(32)) | np.uint64(be32(d, p + 4))


@kernel(inline=True)
def _gpe_next(v):
    """VXLAN-GPE's and NSH's next protocol (one registry: 1 IPv4, 2 IPv6, 3 Ethernet, 4 NSH,
    5 MPLS) as the ethertype to go on with; 1: an Ethernet header; 0: not followed."""
    if v == 1:
        return 0x0800
    if v == 2:
        return 0x86DD
    if v == 3:
        return 1
    if v == 4:
        return 0x894F
    if v == 5:
        return 0x8847
    return 0


@kernel(inline=True)
def _erspan3_len(d, p):
    """Length of the ERSPAN type III header at p (12 bytes known to be there): 12, + 8 when
    its last bit says the optional platform sub-header follows."""
    return 12 + 8 * (np.int64(d[p + 11]) & 1)


@kernel(inline=True)
def _mac(d, p):
    """The 48-bit MAC address at p, as an integer (first byte most significant)."""
    q = np.uint64(p)  # an unsigned index: no negative-index wraparound check per byte
    v = np.uint64(0)
    for k in range(6):
        v = (v << np.uint64(8)) | np.uint64(d[q + np.uint64(k)])
    return v


@kernel(inline=True)
def _clear_l4(i, sport, dport, tcp_flags, tcp_seq, tcp_ack, tcp_win, tcp_mss, tcp_wscale, l4_off, pl_off, pl_len,
              frag, frag_id, frag_off):
    """Row i's transport fields and its IP fragment fields as absent: at the row's start (the
    columns come uninitialised) and when an inner IP header replaces an outer one."""
    sport[i] = 0
    dport[i] = 0
    tcp_flags[i] = 0
    tcp_seq[i] = 0
    tcp_ack[i] = 0
    tcp_win[i] = 0
    tcp_mss[i] = 0
    tcp_wscale[i] = -1
    l4_off[i] = -1
    pl_off[i] = -1
    pl_len[i] = 0
    frag[i] = 0
    frag_id[i] = 0
    frag_off[i] = 0


@kernel
def decode_kernel(data, offset, caplen, wirelen, linktype, known_et,
                  ethertype, vlan, inner_vlan, tunnel, ip_ver, proto,
                  src_hi, src_lo, dst_hi, dst_lo, sport, dport,
                  tcp_flags, tcp_seq, tcp_ack, tcp_win, tcp_wscale, tcp_mss, ttl,
                  l3_off, l4_off, pl_off, pl_len, ip_len, frag, frag_id, frag_off, anomaly, src_mac, dst_mac,
                  udp_tunnels):
    n = offset.shape[0]
    dlen = np.int64(data.shape[0])
    for i in range(n):
        if i + PREFETCH_ROWS < n:
            ahead = np.int64(offset[i + PREFETCH_ROWS])
            _prefetch(data, ahead)
            _prefetch(data, ahead + 64)
        base = np.int64(offset[i])
        cap = np.int64(caplen[i])
        anom = np.int64(0)
        if cap > np.int64(wirelen[i]):
            anom |= ANOM_CAPLEN_GT_WIRELEN
        if cap < 0:
            cap = 0
        end = base + cap
        if base < 0 or base > dlen:
            end = base = 0
        elif end > dlen:
            end = dlen
        # every field of the row first holds its "absent" value (batch.empty_columns'): the
        # columns come uninitialised, and what the headers below set overwrites these
        ethertype[i] = 0
        vlan[i] = VLAN_NONE
        inner_vlan[i] = VLAN_NONE
        ip_ver[i] = 0
        proto[i] = 0
        src_hi[i] = 0
        src_lo[i] = 0
        dst_hi[i] = 0
        dst_lo[i] = 0
        ttl[i] = 0
        l3_off[i] = -1
        ip_len[i] = 0
        _clear_l4(i, sport, dport, tcp_flags, tcp_seq, tcp_ack, tcp_win, tcp_mss, tcp_wscale, l4_off, pl_off,
                  pl_len, frag, frag_id, frag_off)
        src_mac[i] = 0
        dst_mac[i] = 0
        gre_end = end
        pos = base
        et = np.int64(0)
        state = _S_DONE
        depth = 0
        tun = 0
        vlan_depth = -1       # tunnel depth at which the `vlan` value was seen
        committed_ip = False  # an IP header has been accepted (columns hold its values)
        ip_commits = 0        # IP headers accepted so far
        udp_mark = -1         # ip_commits when the last UDP tunnel was opened (-1: none)
        udp_prev_tun = 0      # `tun` before it
        from_capwap = False   # the 802.11 frame came out of CAPWAP
        mac_done = False      # src_mac/dst_mac hold the outermost link-layer addresses
        lt = np.int64(linktype[i])

        # ---- link layer -----------------------------------------------------------------
        if lt == 1:
            state = _S_ETH
        elif lt == 113:  # Linux cooked v1: 16 bytes, protocol in the last two
            if end - pos < 16:
                anom |= ANOM_TRUNCATED_L2
            else:
                if be16(data, pos + 4) == 6:  # the sender's link-layer address (no destination)
                    src_mac[i] = _mac(data, pos + 6)
                    mac_done = True
                et = be16(data, pos + 14)
                pos += 16
                state = _S_ET
        elif lt == 276:  # Linux cooked v2: 20 bytes, protocol first
            if end - pos < 20:
                anom |= ANOM_TRUNCATED_L2
            else:
                if data[pos + 11] == 6:  # the sender's link-layer address (no destination)
                    src_mac[i] = _mac(data, pos + 12)
                    mac_done = True
                et = be16(data, pos)
                pos += 20
                state = _S_ET
        elif lt == 101 or lt == 12 or lt == 14:
            state = _S_IP
        elif lt == 228:
            state = _S_IP4
        elif lt == 229:
            state = _S_IP6
        elif lt == 0 or lt == 108:
            if end - pos < 4:
                anom |= ANOM_TRUNCATED_L2
            else:
                if lt == 108:
                    af = be32(data, pos)
                else:
                    # host byte order of the writer: either order, the family is small
                    af = (np.int64(data[pos]) | (np.int64(data[pos + 1]) << 8)
                          | (np.int64(data[pos + 2]) << 16) | (np.int64(data[pos + 3]) << 24))
                    if af > 0xFFFF:
                        af = be32(data, pos)
                pos += 4
                if af == 2:
                    state = _S_IP4
                elif af == 24 or af == 28 or af == 30 or af == 10:
                    state = _S_IP6
                else:
                    # some writers put an ethertype in the last two bytes (as Wireshark accepts)
                    et = be16(data, pos - 2)
                    if et == 0x0800 or et == 0x86DD:
                        state = _S_ET
        elif lt == 105:  # IEEE 802.11
            state = _S_WLAN
        elif lt == 127 or lt == 192:
            # radiotap, PPI: a radio header whose length is its bytes 2-3 (little-endian); PPI
            # also says what follows (its DLT, bytes 4-7)
            if end - pos < 8:
                anom |= ANOM_TRUNCATED_L2
            else:
                hlen = np.int64(data[pos + 2]) | (np.int64(data[pos + 3]) << 8)
                inner_lt = np.int64(105)
                if lt == 192:
                    inner_lt = (np.int64(data[pos + 4]) | (np.int64(data[pos + 5]) << 8)
                                | (np.int64(data[pos + 6]) << 16) | (np.int64(data[pos + 7]) << 24))
                if hlen < 8 or end - pos < hlen:
                    anom |= ANOM_TRUNCATED_L2
                elif inner_lt == 105:
                    pos += hlen
                    state = _S_WLAN
                elif inner_lt == 1:
                    pos += hlen
                    state = _S_ETH
                else:
                    anom |= ANOM_UNKNOWN_LINKTYPE
        elif lt == 9 or lt == 50:
            state = _S_PPP
        elif lt == 51:  # PPPoE session header without Ethernet
            if end - pos < 6:
                anom |= ANOM_TRUNCATED_L2
            else:
                pos += 6
                tun = TUNNEL_PPPOE
                depth = 1
                state = _S_PPP
        elif lt == 104 or lt == 107:
            # Cisco HDLC, and Frame Relay as Cisco encapsulates it: 2 bytes of address, then an
            # ethertype; Frame Relay as RFC 2427 does: the UI control (03), then an NLPID (CC
            # IPv4, 8E IPv6; 00 80 and a SNAP header with an ethertype)
            if end - pos < 4:
                anom |= ANOM_TRUNCATED_L2
            elif lt == 104 or data[pos + 2] != 0x03:
                et = be16(data, pos + 2)
                pos += 4
                state = _S_ET
            elif data[pos + 3] == 0xCC or data[pos + 3] == 0x8E:
                et = 0x0800 if data[pos + 3] == 0xCC else 0x86DD
                pos += 4
                state = _S_ET
            elif end - pos >= 10 and data[pos + 3] == 0 and data[pos + 4] == 0x80 and data[pos + 5] == 0 \
                    and data[pos + 6] == 0 and data[pos + 7] == 0:
                et = be16(data, pos + 8)
                pos += 10
                state = _S_ET
            else:
                anom |= ANOM_UNKNOWN_ETHERTYPE
        elif lt == 239:  # NFLOG: family, version, resource id, then TLVs; type 9 = payload
            if end - pos < 4:
                anom |= ANOM_TRUNCATED_L2
            else:
                fam = np.int64(data[pos])
                p = pos + 4
                while p + 4 <= end:
                    tlen = np.int64(data[p]) | (np.int64(data[p + 1]) << 8)
                    ttype = np.int64(data[p + 2]) | (np.int64(data[p + 3]) << 8)
                    if tlen < 4:
                        break
                    if ttype == 9:
                        pos = p + 4
                        if fam == 2:
                            state = _S_IP4
                        elif fam == 10:
                            state = _S_IP6
                        else:
                            state = _S_IP
                        break
                    p += (tlen + 3) & ~np.int64(3)
        else:
            anom |= ANOM_UNKNOWN_LINKTYPE

        # ---- the layers ---------------------------------------------------------------------
        steps = 0
        while state != _S_DONE:
            steps += 1
            if steps > 64:  # defensive: no input loops, but never spin
                break
            if state == _S_ETH:
                if end - pos < 14:
                    anom |= ANOM_TRUNCATED_L2
                    break
                if not mac_done:  # the outermost Ethernet header: a tunnel's inner one does not count
                    dst_mac[i] = _mac(data, pos)
                    src_mac[i] = _mac(data, pos + 6)
                    mac_done = True
                et = be16(data, pos + 12)
                pos += 14
                state = _S_ET
            elif state == _S_WLAN:
                # IEEE 802.11: only data frames that carry a body in clear, whole (not a
                # fragment, not an A-MSDU), with LLC/SNAP and an ethertype, are followed
                if end - pos < 24:
                    anom |= ANOM_TRUNCATED_L2
                    break
                fc0 = np.int64(data[pos])
                fc1 = np.int64(data[pos + 1])
                frag_at = pos + 22  # sequence control, little-endian: fragment number in the low bits
                if from_capwap and fc0 & 3 != 0 and fc1 & 3 == 0:
                    # Cisco access points send the 16-bit header fields byte-swapped (what
                    # Wireshark's CAPWAP "swap frame control" setting undoes): version bits
                    # must be 0
                    fc0, fc1 = fc1, fc0
                    frag_at = pos + 23
                sub = fc0 >> 4
                if not mac_done and (fc0 >> 2) & 3 == 2:
                    # a data frame's addresses by its To DS / From DS bits: addr1 at pos + 4,
                    # addr2 at + 10, addr3 at + 16, addr4 (both bits) at + 24
                    ds = fc1 & 3
                    if ds == 0:
                        dst_mac[i] = _mac(data, pos + 4)
                        src_mac[i] = _mac(data, pos + 10)
                    elif ds == 1:
                        dst_mac[i] = _mac(data, pos + 16)
                        src_mac[i] = _mac(data, pos + 10)
                    elif ds == 2:
                        dst_mac[i] = _mac(data, pos + 4)
                        src_mac[i] = _mac(data, pos + 16)
                    elif end - pos >= 30:
                        dst_mac[i] = _mac(data, pos + 16)
                        src_mac[i] = _mac(data, pos + 24)
                    mac_done = True
                if (fc0 >> 2) & 3 != 2 or fc1 & 0x40 or sub & 0x4:
                    break  # management/control, protected (encrypted), or no body (null data)
                if fc1 & 0x04 or (np.int64(data[frag_at]) & 0x0F) != 0:
                    break  # a fragment
                hl = 24
                if fc1 & 3 == 3:
                    hl += 6  # four addresses (wireless distribution system)
                if sub & 0x8:  # QoS data: QoS control, and HT control when "order" is set
                    if end - pos < hl + 2:
                        anom |= ANOM_TRUNCATED_L2
                        break
                    if data[pos + hl] & 0x80:
                        break  # A-MSDU: several subframes
                    hl += 2
                    if fc1 & 0x80:
                        hl += 4
                pos += hl
                if end - pos >= 8 and data[pos] == 0xAA and data[pos + 1] == 0xAA and data[pos + 2] == 0x03:
                    et = be16(data, pos + 6)
                    pos += 8
                    state = _S_ET
                else:
                    break
            elif state == _S_ET:
                if et == 0x8100 or et == 0x88A8 or et == 0x9100:
                    if end - pos < 4:
                        anom |= ANOM_TRUNCATED_L2
                        break
                    vid = be16(data, pos) & 0xFFF
                    if vlan_depth < 0:
                        vlan[i] = vid
                        vlan_depth = depth
                    elif vlan_depth == depth and inner_vlan[i] == VLAN_NONE:
                        inner_vlan[i] = vid
                    et = be16(data, pos + 2)
                    pos += 4
                elif et == 0x0800:
                    state = _S_IP4
                elif et == 0x86DD:
                    state = _S_IP6
                elif et == 0x8847 or et == 0x8848:
                    if depth >= MAX_TUNNEL_DEPTH:
                        anom |= ANOM_TUNNEL_DEPTH
                        break
                    depth += 1
                    if tun == 0:
                        tun = TUNNEL_MPLS
                    state = _S_MPLS
                elif et == 0x8864:
                    if end - pos < 6:
                        anom |= ANOM_TRUNCATED_L2
                        break
                    if depth >= MAX_TUNNEL_DEPTH:
                        anom |= ANOM_TUNNEL_DEPTH
                        break
                    depth += 1
                    if tun == 0:
                        tun = TUNNEL_PPPOE
                    pos += 6
                    state = _S_PPP
                elif et == 0x894F:
                    # NSH (RFC 8300, service function chaining): its length (4-byte words, base
                    # header included) is skipped; its next protocol is IPv4, IPv6, Ethernet, NSH
                    # or MPLS, as VXLAN-GPE numbers them
                    if end - pos < 8:
                        anom |= ANOM_TRUNCATED_L2
                        break
                    nsh_len = np.int64(data[pos + 1] & 0x3F) * 4
                    nxt = _gpe_next(np.int64(data[pos + 3]))
                    if (data[pos] >> 6) != 0 or nsh_len < 8 or end - pos < nsh_len or nxt == 0:
                        if not committed_ip:
                            ethertype[i] = et
                        break
                    if depth >= MAX_TUNNEL_DEPTH:
                        anom |= ANOM_TUNNEL_DEPTH
                        break
                    depth += 1
                    pos += nsh_len
                    if nxt == 1:
                        state = _S_ETH
                    else:
                        et = nxt
                elif et == 0x88BE or et == 0x22EB:
                    # ERSPAN with no GRE around it (Wireshark and Arkime read it on these
                    # ethertypes too): type II's 8-byte header, type III's 12 (+ 8 with the
                    # optional sub-header), then the mirrored Ethernet frame
                    hl = 8 if et == 0x88BE else 12
                    if end - pos < hl:
                        anom |= ANOM_TRUNCATED_L2
                        break
                    if et == 0x22EB:
                        hl = _erspan3_len(data, pos)
                    if depth >= MAX_TUNNEL_DEPTH:
                        anom |= ANOM_TUNNEL_DEPTH
                        break
                    depth += 1
                    pos += hl
                    state = _S_ETH
                elif et == 0x8909:
                    # Cisco MetaData (TrustSec SGT tag): version, length, option type/length, the
                    # 16-bit group tag, then the ethertype it tags
                    if end - pos < 8:
                        anom |= ANOM_TRUNCATED_L2
                        break
                    et = be16(data, pos + 6)
                    pos += 8
                elif et == 0x88E7:  # 802.1ah PBB: I-TAG, then the customer Ethernet header
                    if end - pos < 4:
                        anom |= ANOM_TRUNCATED_L2
                        break
                    pos += 4
                    state = _S_ETH
                elif et == 0x8903:  # Cisco FabricPath: FTAG/TTL, then the inner Ethernet header
                    if end - pos < 2:
                        anom |= ANOM_TRUNCATED_L2
                        break
                    pos += 2
                    state = _S_ETH
                elif et <= 1500:
                    # 802.3 length: only LLC/SNAP with an ethertype is followed
                    if end - pos >= 8 and data[pos] == 0xAA and data[pos + 1] == 0xAA and data[pos + 2] == 0x03:
                        et = be16(data, pos + 6)
                        pos += 8
                    else:
                        break
                else:
                    if not committed_ip:
                        ethertype[i] = et
                    if known_et[et] == 0:
                        anom |= ANOM_UNKNOWN_ETHERTYPE
                    break
            elif state == _S_PPP:
                if end - pos < 2:
                    anom |= ANOM_TRUNCATED_L2
                    break
                if data[pos] == 0xFF and data[pos + 1] == 0x03:
                    pos += 2
                    if end - pos < 1:
                        anom |= ANOM_TRUNCATED_L2
                        break
                if data[pos] & 1:  # protocol field compression: one byte
                    pp = np.int64(data[pos])
                    pos += 1
                else:
                    if end - pos < 2:
                        anom |= ANOM_TRUNCATED_L2
                        break
                    pp = be16(data, pos)
                    pos += 2
                if pp == 0x21:
                    state = _S_IP4
                elif pp == 0x57:
                    state = _S_IP6
                elif pp == 0x281 or pp == 0x283:
                    state = _S_MPLS
                else:
                    break
            elif state == _S_MPLS:
                bottom = False
                for _ in range(16):
                    if end - pos < 4:
                        break
                    bottom = (data[pos + 2] & 1) != 0
                    pos += 4
                    if bottom:
                        break
                if not bottom:
                    anom |= ANOM_TRUNCATED_L2
                    break
                if end - pos < 1:
                    anom |= ANOM_TRUNCATED_L2
                    break
                nib = data[pos] >> 4
                if nib == 4:
                    state = _S_IP4
                elif nib == 6:
                    state = _S_IP6
                elif nib == 0:  # pseudowire control word, then Ethernet
                    pos += 4
                    state = _S_ETH
                else:
                    break
            elif state == _S_IP:
                if end - pos < 1:
                    anom |= ANOM_TRUNCATED_IP
                    break
                nib = data[pos] >> 4
                if nib == 4:
                    state = _S_IP4
                elif nib == 6:
                    state = _S_IP6
                else:
                    anom |= ANOM_BAD_IP_HEADER
                    break
            elif state == _S_IP4 or state == _S_IP6:
                # ---- IP header ----
                if state == _S_IP4:
                    if end - pos < 20:
                        anom |= ANOM_TRUNCATED_IP
                        break
                    vhl = np.int64(data[pos])
                    ihl = (vhl & 15) * 4
                    if (vhl >> 4) != 4 or ihl < 20:
                        anom |= ANOM_BAD_IP_HEADER
                        break
                    if end - pos < ihl:
                        anom |= ANOM_TRUNCATED_IP
                        break
                    tot = be16(data, pos + 2)
                    if tot == 0:
                        tot = end - pos  # TCP segmentation offload leaves 0: use what was captured
                    elif tot < ihl:
                        anom |= ANOM_BAD_IP_HEADER
                        break
                    fw = be16(data, pos + 6)
                    fo = (fw & 0x1FFF) * 8
                    mf = (fw >> 13) & 1
                    nxt = np.int64(data[pos + 9])
                    shi = np.uint64(0)
                    slo = IPV4_MAPPED | np.uint64(be32(data, pos + 12))
                    dhi = np.uint64(0)
                    dlo = IPV4_MAPPED | np.uint64(be32(data, pos + 16))
                    hop = data[pos + 8]
                    fid = be32(data, pos + 4) >> 16
                    ver = 4
                    ipend = pos + tot
                    p = pos + ihl
                else:
                    if end - pos < 40:
                        anom |= ANOM_TRUNCATED_IP
                        break
                    if (data[pos] >> 4) != 6:
                        anom |= ANOM_BAD_IP_HEADER
                        break
                    plen = be16(data, pos + 4)
                    tot = 40 + plen
                    nxt = np.int64(data[pos + 6])
                    if plen == 0 and nxt == 0:
                        tot = end - pos  # jumbogram (length in hop-by-hop): use what was captured
                    hop = data[pos + 7]
                    shi = _u64(data, pos + 8)
                    slo = _u64(data, pos + 16)
                    dhi = _u64(data, pos + 24)
                    dlo = _u64(data, pos + 32)
                    fo = 0
                    mf = 0
                    fid = 0
                    ver = 6
                    ipend = pos + tot
                    p = pos + 40
                # accept this header: it replaces whatever an outer layer left
                committed_ip = True
                ip_commits += 1
                ethertype[i] = 0x0800 if ver == 4 else 0x86DD
                ip_ver[i] = ver
                src_hi[i] = shi
                src_lo[i] = slo
                dst_hi[i] = dhi
                dst_lo[i] = dlo
                ttl[i] = hop
                l3_off[i] = pos - base
                ip_len[i] = tot
                _clear_l4(i, sport, dport, tcp_flags, tcp_seq, tcp_ack, tcp_win, tcp_mss, tcp_wscale, l4_off, pl_off,
                          pl_len, frag, frag_id, frag_off)
                if ipend > end:
                    anom |= ANOM_IP_LEN_GT_FRAME
                    ipend = end
                truncated_ext = False
                if ver == 6:
                    # extension headers
                    for _ in range(16):
                        if nxt == 0 or nxt == 43 or nxt == 60 or nxt == 135 or nxt == 51:
                            if ipend - p < 2:
                                truncated_ext = True
                                break
                            if nxt == 51:
                                hl = (np.int64(data[p + 1]) + 2) * 4
                            else:
                                hl = (np.int64(data[p + 1]) + 1) * 8
                            nxt = np.int64(data[p])
                            p += hl
                            if p > ipend:
                                truncated_ext = True
                                break
                        elif nxt == 44:
                            if ipend - p < 8:
                                truncated_ext = True
                                break
                            fw = be16(data, p + 2)
                            fo = fw & 0xFFF8
                            mf = fw & 1
                            fid = be32(data, p + 4)
                            nxt = np.int64(data[p])
                            p += 8
                            if fo > 0:
                                break  # the rest of the chain is in the first fragment
                        else:
                            break
                proto[i] = nxt
                if fo > 0:
                    frag[i] = FRAG_MORE
                elif mf:
                    frag[i] = FRAG_FIRST
                frag_id[i] = fid
                frag_off[i] = fo
                if truncated_ext:
                    anom |= ANOM_TRUNCATED_IP
                    break
                if fo > 0:
                    break  # a later fragment: no L4 header here
                not_frag = mf == 0
                # ---- IP-level tunnels ----
                if (nxt == 4 or nxt == 41) and not_frag:
                    if depth >= MAX_TUNNEL_DEPTH:
                        anom |= ANOM_TUNNEL_DEPTH
                        break
                    depth += 1
                    if tun == 0:
                        tun = TUNNEL_IPIP
                    pos = p
                    state = _S_IP4 if nxt == 4 else _S_IP6
                    continue
                if nxt == 47 and not_frag:
                    l4_off[i] = p - base
                    pl_off[i] = p - base
                    pl_len[i] = max(ipend - p, 0)
                    pos = p
                    state = _S_GRE
                    # GRE runs with the IP end as its limit
                    gre_end = ipend
                    continue
                # ---- L4 ----
                lim = ipend
                if nxt == 6:
                    if lim - p < 20:
                        anom |= ANOM_TRUNCATED_L4
                        if lim - p >= 4:
                            sport[i] = be16(data, p)
                            dport[i] = be16(data, p + 2)
                        break
                    sport[i] = be16(data, p)
                    dport[i] = be16(data, p + 2)
                    tcp_seq[i] = be32(data, p + 4)
                    tcp_ack[i] = be32(data, p + 8)
                    doff = (np.int64(data[p + 12]) >> 4) * 4
                    fl = data[p + 13]
                    tcp_flags[i] = fl
                    tcp_win[i] = be16(data, p + 14)
                    l4_off[i] = p - base
                    if doff < 20:
                        anom |= ANOM_BAD_TCP_HEADER
                        break
                    if lim - p < doff:
                        anom |= ANOM_TRUNCATED_L4
                        break
                    if fl & 2:
                        # options on SYN only: MSS (2) and window scale (3)
                        q = p + 20
                        oend = p + doff
                        while q < oend:
                            kind = data[q]
                            if kind == 0:
                                break
                            if kind == 1:
                                q += 1
                                continue
                            if q + 1 >= oend:
                                break
                            olen = np.int64(data[q + 1])
                            if olen < 2 or q + olen > oend:
                                break
                            if kind == 2 and olen == 4:
                                tcp_mss[i] = be16(data, q + 2)
                            elif kind == 3 and olen == 3:
                                tcp_wscale[i] = min(np.int64(data[q + 2]), 127)
                            q += olen
                    pl_off[i] = p + doff - base
                    pl_len[i] = lim - p - doff
                    break
                if nxt == 17:
                    if lim - p < 8:
                        anom |= ANOM_TRUNCATED_L4
                        if lim - p >= 4:
                            sport[i] = be16(data, p)
                            dport[i] = be16(data, p + 2)
                        break
                    sp = be16(data, p)
                    dp = be16(data, p + 2)
                    sport[i] = sp
                    dport[i] = dp
                    l4_off[i] = p - base
                    pl_off[i] = p + 8 - base
                    pl_len[i] = lim - p - 8
                    q = p + 8
                    # ---- UDP tunnels (only when the datagram is whole, and when asked) ----
                    if not not_frag or not udp_tunnels:
                        break
                    udp_mark = ip_commits
                    udp_prev_tun = tun
                    # VXLAN: 8 bytes (the I flag set), then Ethernet. VXLAN-GPE: flags (version 0),
                    # reserved, next protocol (IPv4, IPv6, Ethernet, NSH or MPLS: read whatever
                    # the P flag says, as Wireshark, tcpdump and Arkime read it), VNI.
                    nxt = 0
                    if dp == VXLAN_PORT and lim - q >= 8 + 14 and (data[q] & 0x08) != 0:
                        nxt = 1
                    elif dp == VXLAN_GPE_PORT and lim - q >= 8 and (data[q] & 0x30) == 0:
                        nxt = _gpe_next(np.int64(data[q + 3]))
                    if nxt != 0:
                        if depth >= MAX_TUNNEL_DEPTH:
                            anom |= ANOM_TUNNEL_DEPTH
                            break
                        depth += 1
                        if tun == 0:
                            tun = TUNNEL_VXLAN
                        pos = q + 8
                        if nxt == 1:
                            state = _S_ETH
                        else:
                            et = nxt
                            state = _S_ET
                        continue
                    if dp == GENEVE_PORT and lim - q >= 8:
                        optlen = (np.int64(data[q]) & 0x3F) * 4
                        gp = be16(data, q + 2)
                        if (data[q] >> 6) == 0 and lim - q >= 8 + optlen and (
                                gp == 0x6558 or gp == 0x0800 or gp == 0x86DD):
                            if depth >= MAX_TUNNEL_DEPTH:
                                anom |= ANOM_TUNNEL_DEPTH
                                break
                            depth += 1
                            if tun == 0:
                                tun = TUNNEL_GENEVE
                            pos = q + 8 + optlen
                            if gp == 0x6558:
                                state = _S_ETH
                            else:
                                et = gp
                                state = _S_ET
                            continue
                    if dp == GRE_UDP_PORT and lim - q >= 4 and (be16(data, q) & 0x0007) == 0:
                        # GRE-in-UDP (RFC 8086): a GRE header right after UDP
                        pos = q
                        state = _S_GRE
                        gre_end = lim
                        continue
                    if (dp == GTP_U_PORT or sp == GTP_U_PORT) and lim - q >= 12 and (data[q] >> 5) == 1 \
                            and (data[q] & 0x10) != 0 and data[q + 1] == 0xFF:
                        # GTPv1-U G-PDU: 8 bytes, 4 more if E/S/PN, then extension headers
                        t = q + 8
                        if data[q] & 0x07:
                            t += 4
                            nxt_ext = data[t - 1] if data[q] & 0x04 else 0
                            while nxt_ext != 0 and t < lim:
                                elen = np.int64(data[t]) * 4
                                if elen == 0 or t + elen > lim:
                                    t = lim
                                    break
                                nxt_ext = data[t + elen - 1]
                                t += elen
                        if lim - t >= 20 and ((data[t] >> 4) == 4 or (data[t] >> 4) == 6):
                            if depth >= MAX_TUNNEL_DEPTH:
                                anom |= ANOM_TUNNEL_DEPTH
                                break
                            depth += 1
                            if tun == 0:
                                tun = TUNNEL_GTP
                            pos = t
                            state = _S_IP
                            continue
                    if (dp == AYIYA_PORT or sp == AYIYA_PORT) and lim - q >= 8 and (data[q + 2] & 0x0F) == 1 \
                            and (data[q + 3] == 4 or data[q + 3] == 41):
                        # AYIYA forward: 8 bytes, the identity (2^n bytes), the signature (4n bytes)
                        t = q + 8 + (np.int64(1) << (np.int64(data[q]) >> 4)) + (np.int64(data[q + 1]) >> 4) * 4
                        if lim - t >= 20:
                            if depth >= MAX_TUNNEL_DEPTH:
                                anom |= ANOM_TUNNEL_DEPTH
                                break
                            depth += 1
                            if tun == 0:
                                tun = TUNNEL_AYIYA
                            pos = t
                            state = _S_IP4 if data[q + 3] == 4 else _S_IP6
                            continue
                    if (dp == CAPWAP_DATA_PORT or sp == CAPWAP_DATA_PORT) and lim - q >= 8 and data[q] == 0:
                        # CAPWAP data (preamble 0: no DTLS): HLEN words of header, then an
                        # 802.11 frame (T flag, wireless binding 1) or an 802.3 one; fragments
                        # are not followed
                        hlen = (np.int64(data[q + 1]) >> 3) * 4
                        native = (data[q + 2] & 1) != 0
                        wbid = (np.int64(data[q + 2]) >> 1) & 0x1F
                        if hlen >= 8 and lim - q > hlen and (data[q + 3] & 0x80) == 0 and (not native or wbid == 1):
                            if depth >= MAX_TUNNEL_DEPTH:
                                anom |= ANOM_TUNNEL_DEPTH
                                break
                            depth += 1
                            if tun == 0:
                                tun = TUNNEL_CAPWAP
                            pos = q + hlen
                            from_capwap = native
                            state = _S_WLAN if native else _S_ETH
                            continue
                    if lim - q >= 40:
                        # Teredo: optional authentication and origin indication, then IPv6. On
                        # port 3544; elsewhere (a relay talks from any port) only when an address
                        # is in the Teredo prefix 2001:0::/32, so random UDP payloads stay UDP.
                        t = q
                        if be16(data, t) == 0x0001 and lim - t >= 4:
                            t += 4 + np.int64(data[t + 2]) + np.int64(data[t + 3]) + 9
                        if lim - t >= 8 and be16(data, t) == 0x0000:
                            t += 8
                        on_port = dp == TEREDO_PORT or sp == TEREDO_PORT
                        if lim - t >= 40 and (data[t] >> 4) == 6 and 40 + be16(data, t + 4) == lim - t and (
                                on_port or be16(data, t + 8) == 0x2001 and be16(data, t + 10) == 0
                                or be16(data, t + 24) == 0x2001 and be16(data, t + 26) == 0):
                            if depth >= MAX_TUNNEL_DEPTH:
                                anom |= ANOM_TUNNEL_DEPTH
                                break
                            depth += 1
                            if tun == 0:
                                tun = TUNNEL_TEREDO
                            pos = t
                            state = _S_IP6
                            continue
                    break
                if nxt == 1 or nxt == 58:
                    if lim - p < 4:
                        anom |= ANOM_TRUNCATED_L4
                        break
                    sport[i] = data[p]
                    dport[i] = data[p + 1]
                    l4_off[i] = p - base
                    if lim - p >= 8:
                        pl_off[i] = p + 8 - base
                        pl_len[i] = lim - p - 8
                    break
                if nxt == 132:
                    if lim - p < 12:
                        anom |= ANOM_TRUNCATED_L4
                        break
                    sport[i] = be16(data, p)
                    dport[i] = be16(data, p + 2)
                    l4_off[i] = p - base
                    pl_off[i] = p + 12 - base
                    pl_len[i] = lim - p - 12
                    break
                # another protocol: its header is the payload as far as we know
                if p <= lim:
                    l4_off[i] = p - base
                    pl_off[i] = p - base
                    pl_len[i] = lim - p
                break
            elif state == _S_GRE:
                lim = gre_end
                if lim - pos < 4:
                    break
                gf = be16(data, pos)
                gp = be16(data, pos + 2)
                gver = gf & 7
                hl = 4
                if gver == 0:
                    if gf & 0x4000:  # source routing: not followed
                        break
                    if gf & 0x8000:
                        hl += 4
                    if gf & 0x2000:
                        hl += 4
                    if gf & 0x1000:
                        hl += 4
                elif gver == 1:  # enhanced GRE (PPTP): key is always present
                    if gp != 0x880B or (gf & 0x2000) == 0:
                        break
                    hl += 4
                    if gf & 0x1000:
                        hl += 4
                    if gf & 0x0080:
                        hl += 4
                else:
                    break
                q = pos + hl
                if lim - q < 1:
                    break  # no payload (e.g. a PPTP acknowledgement)
                nstate = _S_DONE
                if gp == 0x0800:
                    nstate = _S_IP4
                elif gp == 0x86DD:
                    nstate = _S_IP6
                elif gp == 0x6558:
                    nstate = _S_ETH
                elif gp == 0x8847 or gp == 0x8848:
                    nstate = _S_MPLS
                elif gp == 0x880B:  # PPP: PPTP's enhanced GRE, and plain GRE as some routers send it
                    nstate = _S_PPP
                elif gp == 0x88BE:
                    # ERSPAN type I has no sequence number and no header; type II an 8-byte header
                    if gf & 0x1000:
                        q += 8
                    nstate = _S_ETH
                elif gp == 0x22EB:
                    # ERSPAN type III: 12 bytes, + 8 when the optional sub-header flag is set
                    if lim - q < 12:
                        break
                    q += _erspan3_len(data, q)
                    nstate = _S_ETH
                if nstate == _S_DONE:
                    break
                if depth >= MAX_TUNNEL_DEPTH:
                    anom |= ANOM_TUNNEL_DEPTH
                    break
                depth += 1
                if tun == 0:
                    tun = TUNNEL_GRE
                pos = q
                state = nstate
            else:
                break
        if ip_commits == udp_mark:
            # a UDP tunnel held no IP packet (an ARP, an 802.11 management frame...): the
            # packet is the tunnel's own UDP datagram, counted once, in the tunnel's session
            tun = udp_prev_tun
        tunnel[i] = tun
        anomaly[i] = anom
