"""glibc malloc settings for training loops, applied once per process (`tune_malloc: true`).

A training step allocates and frees the same large activation buffers every batch. With glibc's
defaults, blocks over the mmap threshold are mmap'ed and unmapped each time, and freed heap
memory is trimmed back to the OS, so every step faults tens of MB of fresh pages in again: on
a 2-core CPU, a third of a KD run's time went to the kernel. Disabling mmap for large blocks and
raising the trim threshold and top pad keeps that memory in the process for reuse (the
process's footprint stays at its peak instead of shrinking between steps). Measured with
scripts/bench.py; see the README.

This is the same as starting Python with `MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=...
MALLOC_TOP_PAD_=...`, done with `mallopt` so users need not set environment variables. It is
skipped where it does not apply or the user chose otherwise: not Linux/glibc, any MALLOC_*
tuning variable already set, or another allocator preloaded (jemalloc, tcmalloc).
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

log = logging.getLogger(__name__)

# mallopt parameter numbers, from glibc's malloc.h.
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_MAX = -4
# mallopt takes a C int: 2**31 - 1 (2 GiB) is the largest trim threshold it can set.
NEVER_TRIM = 2**31 - 1
TOP_PAD = 1 << 30


def glibc() -> ctypes.CDLL | None:
    """The process's C library when it is glibc, else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    return libc if hasattr(libc, "gnu_get_libc_version") else None  # absent from musl and others


def user_chose_allocator() -> str | None:
    """What the user set up themselves (a MALLOC_* variable or a preloaded allocator), if anything."""
    tuned = sorted(name for name in os.environ if name.startswith("MALLOC_") and name.endswith("_"))
    if tuned:
        return ", ".join(tuned)
    preload = os.environ.get("LD_PRELOAD", "")
    if any(name in preload for name in ("jemalloc", "tcmalloc", "mimalloc")):
        return f"LD_PRELOAD={preload}"
    return None


def tune_malloc() -> bool:
    """Keep freed memory in the process instead of returning it to the OS each step; True if applied."""
    chosen = user_chose_allocator()
    if chosen:
        log.debug("malloc left as configured by the environment (%s)", chosen)
        return False
    libc = glibc()
    if libc is None:
        return False
    applied = all(
        libc.mallopt(param, value) == 1
        for param, value in ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, NEVER_TRIM), (M_TOP_PAD, TOP_PAD))
    )
    log.debug("glibc malloc tuned for training (mmap off, no trimming): %s", applied)
    return applied
