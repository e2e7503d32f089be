"""Batch decoding: a FrameBatch in, PacketColumns (see wiretrail.batch) out.

`decode` runs one numba kernel (wiretrail.decode.kernel) over the whole batch; IP
fragments are put back together by wiretrail.decode.fragments.FragmentReassembler.
"""

from __future__ import annotations

import numpy as np

from wiretrail.batch import FrameBatch, unset_columns
from wiretrail.decode.kernel import KNOWN_ETHERTYPE, decode_kernel

__all__ = ["decode"]


def decode(batch: FrameBatch, udp_tunnels: bool = True) -> dict[str, np.ndarray]:
    """Decode L2-L4 of every frame of `batch`; one row per frame, offsets from the frame start.
    `udp_tunnels=False` leaves VXLAN, GENEVE, Teredo, AYIYA, GTP and GRE-in-UDP closed: the
    outer UDP datagram is the packet (the tunnel's own session)."""
    n = len(batch)
    c = unset_columns(n)
    if n == 0:
        return c
    data = np.ascontiguousarray(batch.data, dtype=np.uint8)
    decode_kernel(data, np.ascontiguousarray(batch.offset, dtype=np.int64),
                  np.ascontiguousarray(batch.caplen, dtype=np.int32),
                  np.ascontiguousarray(batch.wirelen, dtype=np.int32),
                  np.ascontiguousarray(batch.linktype, dtype=np.uint16), KNOWN_ETHERTYPE,
                  c["ethertype"], c["vlan"], c["inner_vlan"], c["tunnel"], c["ip_ver"], c["proto"],
                  c["src_hi"], c["src_lo"], c["dst_hi"], c["dst_lo"], c["sport"], c["dport"],
                  c["tcp_flags"], c["tcp_seq"], c["tcp_ack"], c["tcp_win"], c["tcp_wscale"], c["tcp_mss"],
                  c["ttl"], c["l3_off"], c["l4_off"], c["pl_off"], c["pl_len"], c["ip_len"],
                  c["frag"], c["frag_id"], c["frag_off"], c["anomaly"], c["src_mac"], c["dst_mac"],
                  udp_tunnels)
    return c
