"""A worker's C heap: freed memory kept for reuse instead of handed back page by page.

glibc serves an allocation above its *mmap threshold* with a fresh mapping, and gives the
top of its heap back to the system once more than its *trim threshold* is free. Both start
small (128 KiB) and adapt, but a worker that makes one large array per item and frees a
batch of them at once (eight 1 MiB NumPy arrays, say) frees more than the adapted trim
threshold: the heap shrinks, and the next batch faults every page in again (256 page
faults per MiB, and the kernel zeroes each page). Measured on W6 split over two process
pools: half of the producing worker's time went there, and the worker's CPU per item fell
from 1.3 to 0.6 ms with the heap kept.

:func:`keep_freed_heap` fixes both thresholds in the worker: allocations below half the
kept size come from the heap, and the heap gives its free top back to the system only once
more than the kept size is free there (then all of it). A worker's resident memory can so
stay up to that much above what its live objects use, per heap: glibc gives each thread
that allocates concurrently a heap ("arena") of its own, so a node running 8 threads may
hold several times the kept size (measured: 360 MiB per worker for 8 threads each freeing
40 MiB, against 150-290 MiB with glibc's own thresholds). It never grows beyond what the
worker once used at its peak.
"""

from __future__ import annotations

import ctypes
import platform
from collections.abc import Callable
from typing import Any

#: bytes of freed heap a process pool's worker keeps for reuse (``ProcessPool(heap_keep=)``)
HEAP_KEEP = 64 << 20

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_MAX = 32 << 20  # glibc refuses more on 64-bit systems (HEAP_MAX_SIZE / 2)


def keep_freed_heap(nbytes: int) -> bool:
    """Let this process keep up to ``nbytes`` of freed heap for reuse.

    Returns whether it took effect: only with glibc (``mallopt``); elsewhere nothing
    changes. Allocations below ``min(nbytes / 2, 32 MiB)`` then come from the heap.
    """
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    mmap_at = max(128 << 10, min(nbytes // 2, _MMAP_THRESHOLD_MAX))
    return bool(mallopt(_M_MMAP_THRESHOLD, mmap_at)) and bool(
        mallopt(_M_TRIM_THRESHOLD, min(nbytes, 2**31 - 1))
    )


def prepare_worker(heap_keep: int | None, initializer: Callable[[], Any] | None) -> None:
    """Set up a new worker process: its heap (``heap_keep`` bytes, None: the C library's
    own behaviour), then the user's ``initializer``."""
    if heap_keep is not None:
        keep_freed_heap(heap_keep)
    if initializer is not None:
        initializer()
