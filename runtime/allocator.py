"""Large vectors without page faults: keep freed memory in the process for the next round.

glibc's malloc serves every block above its mmap threshold (at most 32 MiB) with a fresh ``mmap`` and
returns it with ``munmap`` when freed. A round at d = 1e7 allocates several 40 MB vectors (a gradient,
its payload, a received frame, the mean of the uplinks, the new model) and frees them again, so
every one of them is fresh memory whose 10,000 pages the kernel zeroes and maps on first touch: on
a 2-core host, a 40 MB ``x * a`` takes 22 ms with fresh pages and 4 ms without, and such faults were
most of a dense psc round at d = 1e7 (``benchmarks/overhead.py``).

``keep_freed_memory`` tells glibc to serve every block from its heap (``M_MMAP_MAX = 0``) and to
return free memory at the top of the heap to the system only beyond 1 GiB (``M_TRIM_THRESHOLD``):
the next round's vectors reuse the last round's pages. Measured on ``psc launch`` of GD at d = 1e7,
n = 2, 250 rounds, 2 cores: 0.21 s a round instead of 0.36, a quarter of the page faults (some remain:
a freed block is not always reusable by the next aligned request), and each process's resident
memory 0.8-1.1 GB instead of 0.7, steady over the run. So the cost is memory: a process keeps up to
1 GiB it no longer uses (plus what fragmentation holds) instead of returning it at once. CUDA and
pinned memory are not malloc's and are not affected.

Every thread also allocates from the main arena (``M_ARENA_MAX = 1``). ZeroMQ allocates each
received message in its I/O thread, whose own arena is made of heaps of at most 64 MiB: a 40 MB frame
took a heap of its own, and glibc unmaps a heap as soon as it is entirely free (whatever the trim
threshold), so every received frame at d = 1e7 was fresh memory again, faulted in by the first pass
over it, and its release cost a ``munmap``. In the main arena the frames reuse the heap like any
other vector. ``psc launch`` of GD at d = 1e7, n = 2, 40 rounds, 2 cores: 51-52 ms a round instead
of 74-76 (the worker's replacement of its model, which frees the last DOWN's frame, took 2.5 ms in
every other round and now 0.02 ms). The threads then share one arena's lock; besides the main
thread few allocate often (ZeroMQ's I/O thread, and the codec pool's threads, one output array a
piece), and three interleaved pairs of ``bench_compressors.py`` (Top-K, Perm-K) saw no slowdown.

Every ``psc`` command calls it at start-up; ``PSC_MALLOC=system`` leaves the allocator as it is. On a
C library without ``mallopt`` (musl, macOS) it does nothing and says so (returns False).
"""
from __future__ import annotations

import ctypes
import logging
import os

log = logging.getLogger("psc.allocator")

M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8  # glibc's malloc.h
TRIM_THRESHOLD = 1 << 30


def keep_freed_memory() -> bool:
    """Make glibc keep freed blocks for reuse (see module doc); True if it took effect."""
    if os.environ.get("PSC_MALLOC", "").lower() == "system":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this process runs on (no lookup, no subprocess)
    except (OSError, AttributeError):
        log.debug("no mallopt in this C library: the allocator is left as it is")
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return (bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
            and bool(mallopt(M_ARENA_MAX, 1)))
