"""Wiretrail: keep every packet, turn traffic into sessions and records, find threats."""

import os as _os

# numpy's OpenBLAS otherwise starts a thread per core that spins after any BLAS call: nothing
# here multiplies matrices, and the spinning cost 6% of an ingest's CPU. Set before numpy loads.
_os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

__version__ = "0.1.0"
