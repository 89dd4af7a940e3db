"""glibc's allocator policy for CPU jobs: keep freed memory in the process instead of unmapping it.

A CPU job that streams frames (or training steps) frees and re-allocates the same large
activations every time. glibc serves blocks above its mmap threshold (which it raises to at most
32 MiB) with `mmap` and unmaps them on `free`, so every frame page-faults those pages in again:
the TTT3R heads' full-resolution maps are 50-100 MB each. `keep_freed_memory` turns that off
with `mallopt` (the same two parameters as the `MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=...`
environment variables): about 20 % of the embedded default's training step and 10 % of the
small backbone's frame on this workplace's 2-core CPU, at the same peak memory.

It is a process-wide policy (freed memory of the whole process stays with it), so library code
never sets it; the CPU apps do (`post3r_train`'s trainer: `trainer.cpu_keep_freed_memory`;
`bench-backbone`, `infer`, `eval-backbone`, `cache-teacher`). Other C libraries are left alone.
"""

from __future__ import annotations

import ctypes

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4
KEEP_BYTES = 2**31 - 1  # trim the heap only above 2 GiB of free memory at its top (int max)
# glibc's defaults once its dynamic threshold has risen to its 64-bit cap (any job whose
# activations exceed 32 MiB gets there in its first step): blocks above 32 MiB are mapped and
# unmapped on free, and the heap is trimmed above twice that.
GLIBC_MMAP_MAX = 65536
GLIBC_MMAP_THRESHOLD_CAP = 32 * 2**20


def _libc() -> ctypes.CDLL | None:
    """The C library the process runs on (its own symbols: found without the subprocess that
    `ctypes.util.find_library` starts), if it has glibc's `mallopt`."""
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return libc


def _mallopt(*settings: tuple[int, int]) -> bool:
    libc = _libc()
    if libc is None:
        return False
    return all([bool(libc.mallopt(parameter, value)) for parameter, value in settings])


def keep_freed_memory() -> bool:
    """Serve large blocks from the heap and keep freed ones for reuse (glibc `mallopt`).
    Returns whether the C library took both settings (False off glibc)."""
    return _mallopt((M_TRIM_THRESHOLD, KEEP_BYTES), (M_MMAP_MAX, 0))


def keep_freed_memory_for(device: object) -> bool:
    """`keep_freed_memory()` for a job on the CPU `device` (a torch.device or its name); a
    GPU job's tensors are not glibc's, so nothing is changed for it. Returns whether it was set."""
    return str(device).split(":")[0] == "cpu" and keep_freed_memory()


def unmap_freed_memory() -> bool:
    """glibc's default policy as it settles in a job with large activations: blocks above
    32 MiB mapped and unmapped on free, the heap trimmed above 64 MiB. The fixed threshold
    serves blocks just below 32 MiB from the heap even before glibc's own threshold would have
    risen that far, so it is, if anything, kinder than the default. For comparisons in one
    process against code that ran with the defaults. False off glibc."""
    return _mallopt(
        (M_MMAP_MAX, GLIBC_MMAP_MAX),
        (M_MMAP_THRESHOLD, GLIBC_MMAP_THRESHOLD_CAP),
        (M_TRIM_THRESHOLD, 2 * GLIBC_MMAP_THRESHOLD_CAP),
    )


def release_free_memory() -> None:
    """Hand the heap's free memory back to the OS now (glibc `malloc_trim`), e.g. so that the
    next measurement's peak resident memory does not count what an earlier one kept."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)
