"""Process-level tuning shared by training, the service and the benchmarks.

glibc serves every allocation above its mmap threshold (at most 32 MiB) with fresh pages from
the kernel and returns them on free, so each large tensor costs page faults and zeroing on every
call. The ICA embedding of a batch (B x T x r x N floats: 40 MB at the paper's sizes, batch 50)
hits this on every forward and backward. Keeping such blocks in the heap measured 2.8x faster
for the embedding's forward and 3.5x for forward + backward (batch 50, one thread). The price is
that freed memory stays with the process (its peak). Training, `reproduce` and the benchmarks
use it; the server does not by default (ICASERVE_TUNE_MALLOC): under the soak benchmark's mixed
traffic it held about 500 MiB more, never returned it, and served no faster.

The threshold is 256 MiB, not more: blocks above it (occlusion's 1024-copy batches, ~800 MB on the
hidden-64 shipped model) still go back to the kernel. The raised thresholds also let a heap keep
the holes that long runs of differently sized large blocks leave: with 1 GiB, TSR on 6 sequences
of the shipped model in one call peaked at 4.9 GB (256 MiB: 2.6-8.4 GB over three runs, two at
once on the 2 cores; glibc's default 1.8 GB, but 282 s against 120 s), and `icaserve evaluate` with
every method was killed at 24 GB during TSR, with either threshold. So `release_free_memory` hands
the free pages back after each batch of explanations (training.evaluation.compute_saliency), and
evaluation runs TSR one sequence per call: the same 6 sequences then peaked at 1.5 GB in 130 s,
and the whole `icaserve evaluate --model middle-box-ica-lstm --write` at 2.9 GB in 376 s.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_tuned_libc: ctypes.CDLL | None = None  # glibc, once tune_malloc has applied (release_free_memory reuses it)


def tune_malloc(mmap_threshold: int = 256 << 20, trim_threshold: int = (1 << 31) - 1) -> bool:
    """Raise glibc's mmap and trim thresholds; True if applied (no-op off glibc or twice)."""
    global _tuned_libc
    if _tuned_libc is not None or not sys.platform.startswith("linux"):
        return _tuned_libc is not None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold) == 1
        ok = libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold) == 1 and ok
    except (OSError, AttributeError):  # musl or another libc: nothing to tune
        return False
    if ok:
        _tuned_libc = libc
    return ok


def release_free_memory() -> None:
    """Hand the heap's free pages back to the kernel (glibc's malloc_trim; a no-op when the heap
    was not tuned).

    With the thresholds raised, long runs of differently sized large blocks (TSR's masked copies,
    occlusion's windows) leave holes that the heap keeps; callers that finish one such unit of
    work (a batch of explanations) call this so the process holds its live set, not its history."""
    if _tuned_libc is not None:
        _tuned_libc.malloc_trim(0)
