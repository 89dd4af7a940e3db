"""glibc's allocator for CPU training: keep freed memory in the process instead of unmapping it.

A CPU training step frees and re-allocates the same large activations every step. glibc serves
blocks above its mmap threshold (at most 32 MiB) with `mmap` and unmaps them on `free`, so every
step page-faults those pages in again: about 20 % of the embedded default's step on this
workplace's 2-core CPU (`MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=... uv run apps/bench-train
--threads 1`: 79 instead of 99 ms per step, the same peak memory). `mallopt` sets the same two
parameters from inside the process; other C libraries are left alone.
"""

from __future__ import annotations

import ctypes

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_MAX = -4
KEEP_BYTES = 2**31 - 1  # trim the heap only above 2 GiB of free memory at its top (int max)


def keep_freed_memory() -> bool:
    """Serve large blocks from the heap and keep freed ones for reuse (glibc `mallopt`).
    Returns whether the C library took both settings (False off glibc)."""
    try:
        # The process's own symbols: the C library it runs on, found without the subprocess
        # that `ctypes.util.find_library` starts.
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    trimmed = mallopt(M_TRIM_THRESHOLD, KEEP_BYTES)
    unmapped = mallopt(M_MMAP_MAX, 0)
    return bool(trimmed and unmapped)
