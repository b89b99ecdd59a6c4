"""glibc's allocator tuned for the commands' array workloads.

By default glibc serves blocks between 128 kB and 32 MB from fresh ``mmap`` pages and returns them to
the kernel when freed, so every temporary array of that size pays one page fault per 4 kB page when it
is first written (about 1.3 ms for a (500, 1000) float64 temporary on the 2-core machines measured,
several times the arithmetic done on it). Raising the mmap and trim thresholds keeps freed blocks in the
heap for the next temporary: the default ``validate`` takes 4.5 times fewer page faults and 10-20 % less
wall time (benchmarks/README.md). The array commands (``main.ARRAY_COMMANDS``) apply it to their process
with ``mallopt`` and, through the environment, to the worker processes a study starts. Values the user
set in the environment are kept; other C libraries are left alone.
"""

from __future__ import annotations

import ctypes
import os
import sys

#: glibc's largest accepted mmap threshold on 64-bit (HEAP_MAX_SIZE / 2); larger blocks still use mmap
#: (numpy asks for transparent huge pages on those, which fault in quickly)
MMAP_THRESHOLD = 32 * 2**20
#: free memory kept at the top of the heap before it is returned to the kernel
TRIM_THRESHOLD = 2**30

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def tune_allocator() -> bool:
    """Raise glibc's mmap and trim thresholds for this process and its children; ``False`` when the C
    library is not glibc (nothing changed)."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None)
    if not hasattr(libc, "gnu_get_libc_version"):
        return False
    for env, param, value in (("MALLOC_MMAP_THRESHOLD_", _M_MMAP_THRESHOLD, MMAP_THRESHOLD),
                              ("MALLOC_TRIM_THRESHOLD_", _M_TRIM_THRESHOLD, TRIM_THRESHOLD)):
        if env in os.environ:  # glibc read the user's value when this process started
            continue
        os.environ[env] = str(value)
        libc.mallopt(param, value)
    return True
