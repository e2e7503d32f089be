"""UDP tunnels as sessions of their own.

A packet inside VXLAN, GENEVE, Teredo, AYIYA, GTP or GRE-in-UDP belongs to its inner session
(the decoder opens the tunnel) and also to the tunnel's own UDP session, as Zeek logs both
in conn.log. GRE and IP-in-IP have no transport session of their own.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from wiretrail.batch import FrameBatch
from wiretrail.decode import decode


def tunnel_sessions(flows, batch: FrameBatch, cols: dict, link: np.ndarray,
                    identify=None) -> tuple[np.ndarray, np.ndarray]:
    """Count the tunneled packets of `batch` in their tunnels' sessions of `flows` (a FlowTable).
    `identify(batch, cols, sid, is_orig, seq, row)`, when given, sees those outer UDP packets (e.g.
    AppStage.identify: nDPI names the tunnel's own session: Teredo, VXLAN, GTP...).

    Returns (rows of the batch, their tunnel session ids)."""
    rows = np.flatnonzero(cols["tunnel"] != 0)
    if len(rows) == 0:
        return rows, np.zeros(0, dtype=np.int64)
    sub = replace(batch, offset=batch.offset[rows], caplen=batch.caplen[rows], wirelen=batch.wirelen[rows],
                  ts=batch.ts[rows], iface=batch.iface[rows], linktype=batch.linktype[rows])
    outer = decode(sub, udp_tunnels=False)
    udp = np.flatnonzero((outer["proto"] == 17) & (outer["tunnel"] == 0))
    if len(udp) == 0:
        return rows[:0], np.zeros(0, dtype=np.int64)
    outer = {k: v[udp] for k, v in outer.items()}
    rows = rows[udp]
    sid, is_orig, seq, _, row = flows.update(outer, batch.ts[rows], batch.wirelen[rows], link[rows])
    if identify is not None:
        identify(replace(sub, offset=sub.offset[udp], caplen=sub.caplen[udp], wirelen=sub.wirelen[udp],
                         ts=sub.ts[udp], iface=sub.iface[udp], linktype=sub.linktype[udp]),
                 outer, sid, is_orig, seq, row)
    return rows, sid
