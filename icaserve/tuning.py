"""Process-level tuning shared by training, the service and the benchmarks.

glibc serves every allocation above its mmap threshold (at most 32 MiB) with fresh pages from
the kernel and returns them on free, so each large tensor costs page faults and zeroing on every
call. The ICA embedding of a batch (B x T x r x N floats: 40 MB at the paper's sizes, batch 50)
hits this on every forward and backward. Keeping such blocks in the heap measured 2.8x faster
for the embedding's forward and 3.5x for forward + backward (batch 50, one thread). The price is
that freed memory stays with the process (its peak). Training, `reproduce` and the benchmarks
use it; the server does not by default (ICASERVE_TUNE_MALLOC): under the soak benchmark's mixed
traffic it held about 500 MiB more, never returned it, and served no faster.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_done = False


def tune_malloc(mmap_threshold: int = 1 << 30, trim_threshold: int = (1 << 31) - 1) -> bool:
    """Raise glibc's mmap and trim thresholds; True if applied (no-op off glibc or twice)."""
    global _done
    if _done or not sys.platform.startswith("linux"):
        return _done
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold) == 1
        ok = libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold) == 1 and ok
    except (OSError, AttributeError):  # musl or another libc: nothing to tune
        return False
    _done = ok
    return ok
