"""The growing output of a reader: frame bytes back to back plus the per-frame columns.

A numba kernel appends records into these arrays and stops when the batch holds
`batch_bytes` of frame data (or its rows are full); `take()` hands them out as a
FrameBatch and switches to the other of two sets of arrays. A yielded batch therefore
stays valid while the next one is read, and is overwritten by the one after: consumers
copy what they keep (the pipeline keeps nothing of a batch past its processing).
Reusing the arrays matters: fresh 16 MiB arrays per batch cost more in page faults
than the parsing itself.
"""

from __future__ import annotations

import numpy as np

from wiretrail.batch import FrameBatch, Interface

# Kernel status codes shared by the pcap and pcapng kernels.
NEED_INPUT = 0   # the next record is not wholly in the buffer
BATCH_FULL = 1   # the output batch is full (or would overflow with the next record)
CORRUPT = 2      # a record header is invalid; `error` says which check failed
CONTROL = 3      # pcapng: a section header or interface block for Python to handle

# Small frames: the row capacity bounds a batch of tiny frames.
_MIN_FRAME_BYTES = 32


class FrameBuffer:
    def __init__(self, batch_bytes: int, slack_bytes: int = 1 << 16):
        self.batch_bytes = max(1, int(batch_bytes))
        self.data_capacity = self.batch_bytes + slack_bytes
        self.rows = max(64, self.batch_bytes // _MIN_FRAME_BYTES)
        self._sets = [self._new_set(), self._new_set()]
        self._current = 0
        self._use(0)

    def _new_set(self) -> dict[str, np.ndarray]:
        return {"data": np.empty(self.data_capacity, dtype=np.uint8),
                "offset": np.empty(self.rows, dtype=np.int64),
                "caplen": np.empty(self.rows, dtype=np.int32),
                "wirelen": np.empty(self.rows, dtype=np.int32),
                "ts": np.empty(self.rows, dtype=np.int64),
                "iface": np.zeros(self.rows, dtype=np.int16)}

    def _use(self, k: int) -> None:
        self._current = k
        arrays = self._sets[k]
        if len(arrays["data"]) < self.data_capacity:
            arrays["data"] = np.empty(self.data_capacity, dtype=np.uint8)
        self.data, self.offset, self.caplen = arrays["data"], arrays["offset"], arrays["caplen"]
        self.wirelen, self.ts, self.iface = arrays["wirelen"], arrays["ts"], arrays["iface"]
        self.n = 0
        self.fill = 0

    def grow_data(self, need: int) -> None:
        """Make room for one record larger than the free space of an empty batch."""
        self.data_capacity = max(need, 2 * self.data_capacity)
        self.data = self._sets[self._current]["data"] = np.empty(self.data_capacity, dtype=np.uint8)

    def take(self, interfaces: list[Interface], source: str) -> FrameBatch:
        n = self.n
        iface = self.iface[:n]
        linktypes = np.array([i.linktype for i in interfaces] or [0], dtype=np.uint16)
        batch = FrameBatch(
            data=self.data[:self.fill], offset=self.offset[:n], caplen=self.caplen[:n],
            wirelen=self.wirelen[:n], ts=self.ts[:n], iface=iface, linktype=linktypes[iface],
            interfaces=list(interfaces), source=source)
        self._use(1 - self._current)
        return batch
