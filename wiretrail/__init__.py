"""Wiretrail: keep every packet, turn traffic into sessions and records, find threats."""

import os as _os

# numpy's OpenBLAS otherwise starts a thread per core that spins after any BLAS call: nothing
# here multiplies matrices, and the spinning cost 6% of an ingest's CPU. Set before numpy loads.
_os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
# numpy asks for transparent huge pages on every array of 4 MB or more. Ingest makes many
# short-lived arrays sized for a whole batch and fills only part of them, and each 2 MB page
# touched is zeroed whole: without it a spine ingest of mix.pcap measured 0.03-0.07 CPU s less
# system time, memory as before.
_os.environ.setdefault("NUMPY_MADVISE_HUGEPAGE", "0")
# Arrow's C++ default pool, which the Parquet writer allocates from whatever pyarrow's Python
# default is set to, is mimalloc, which also asks for huge pages and zeroes each one whole:
# 0.07 CPU s of system time on a spine ingest of mix.pcap. jemalloc also hands freed memory
# back, keeping a long ingest's memory flat. Read once, when libarrow loads.
_os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "jemalloc")

__version__ = "0.1.0"
