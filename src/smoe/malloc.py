"""Keep freed memory inside the process (glibc malloc settings), so that large CPU tensors
do not pay their page faults again on every step.

Why: glibc serves each allocation above ``M_MMAP_THRESHOLD`` (128 KB at start, raised by the
sizes freed, up to 32 MB) with a fresh ``mmap`` and unmaps it on free, and trims the heap's
free top once it exceeds ``M_TRIM_THRESHOLD``. So a training step's large temporaries (a 64 MB
logits chunk, 117 MB expert activations at 8192 rows of 3584) come back as fresh pages every
step, and each first touch is a page fault. On the shared 2-core VM of ``docs/benchmarks.md``
that costs ~0.4 ms per MB: allocating and filling two 64 MB tensors took 63 ms by default and
6 ms with the settings below; one MoE layer forward+backward at T = 512 (dim 1024, hidden 3584)
1004 ms against 671 ms, with half the process time spent in the kernel before.

``keep_freed_memory`` raises both thresholds: allocations up to ``threshold_bytes`` come from
the heap, and freed memory stays there for the next step. The price is that the process keeps
its peak memory until it exits, which a training or generation run reaches anyway. This holds
for the main thread's heap, where torch's CPU work allocates (CPU backward runs on the calling
thread); other threads' heaps are at most 64 MB, so their larger blocks stay mappings. glibc
builds that refuse an mmap threshold above 32 MB get 32 MB. The smoe
command calls it at start (``SMOE_KEEP_FREED_MEMORY=0`` turns it off); as a library smoe leaves
the process's allocator alone unless asked.
"""

from __future__ import annotations

import ctypes
import sys

M_TRIM_THRESHOLD = -1  # glibc's <malloc.h>
M_MMAP_THRESHOLD = -3
DEFAULT_THRESHOLD_BYTES = 1 << 30
_INT_MAX = (1 << 31) - 1


def _glibc_mallopt():
    """glibc's ``mallopt``, or None where the process's C library is not glibc."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)  # the C library this process already runs on
    except OSError:
        return None
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return None  # e.g. musl, whose mallopt is a stub
    mallopt = libc.mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt


def keep_freed_memory(threshold_bytes: int = DEFAULT_THRESHOLD_BYTES) -> bool:
    """Serve allocations up to ``threshold_bytes`` from the heap and never trim it below that
    much free memory. Returns whether glibc took both settings (False elsewhere: no change)."""
    if not 0 < threshold_bytes <= _INT_MAX:
        raise ValueError(
            f"keep_freed_memory: threshold_bytes must be in 1..{_INT_MAX}, got {threshold_bytes}"
        )
    mallopt = _glibc_mallopt()
    if mallopt is None:
        return False
    # Some glibc versions cap the mmap threshold at half their 64 MB heap size.
    if not (
        mallopt(M_MMAP_THRESHOLD, threshold_bytes)
        or mallopt(M_MMAP_THRESHOLD, min(threshold_bytes, 32 << 20))
    ):
        return False
    return bool(mallopt(M_TRIM_THRESHOLD, min(2 * threshold_bytes, _INT_MAX)))
