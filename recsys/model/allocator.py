"""Keep freed heap memory in the process while training on CPU (glibc only; elsewhere a no-op).

Why: glibc returns freed memory at the top of the heap to the kernel once more than M_TRIM_THRESHOLD
is free, and serves blocks above M_MMAP_THRESHOLD with fresh mmaps. Both thresholds start low
(128 KiB) and only grow as large blocks happen to be freed, so during a run's first epoch every
training step gives its [B, B + n_sample] score and gradient buffers back and faults them in again:
measured ~1,500 minor page faults and ~3.5 ms of kernel time per step at batch 32 / n_sample 2048,
the first-epoch slowdown of issue 17 (later epochs had fewer, not none). Fixed thresholds end that
for the whole process; the cost is that up to ``TRIM_BYTES`` of freed memory stays mapped.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import platform

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # glibc mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
TRIM_BYTES = 128 << 20  # free heap top kept before trimming
MMAP_BYTES = 32 << 20  # blocks below this come from the heap (glibc's own dynamic ceiling)
_done = False


def retain_freed_memory() -> bool:
    """Set the two glibc thresholds once per process; True when they are set (False: not glibc)."""
    global _done
    if _done:
        return True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        _done = bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_BYTES)) and bool(
            libc.mallopt(M_TRIM_THRESHOLD, TRIM_BYTES)
        )
    except (OSError, AttributeError):  # no usable libc: keep the defaults
        return False
    if not _done:
        log.debug("mallopt refused the heap thresholds; keeping glibc defaults")
    return _done
