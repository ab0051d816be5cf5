"""Idle OpenMP threads that give their cores back soon after torch's parallel operations.

torch's CPU wheels run their parallel operations on GNU OpenMP (libgomp). After a parallel region
libgomp's threads spin, waiting for the next one, for ``GOMP_SPINCOUNT`` iterations of a pause
instruction before they sleep: 300,000 by default, which is on the order of 10 ms on processors
whose pause takes about 140 cycles (Intel since Skylake). The compiled codecs run their pieces on a
pool of their own (``common.compressors.cpu_kernels``), so a compress that follows a torch
operation (a gradient, a norm, a copy) found every core held by spinning OpenMP threads: on 2 cores
with 2 torch threads, ternary quantization's compiled pass took 11.0-12.3 ms right after a
``torch.aminmax`` of the same vector, against 7.7-8.0 ms with a spin of 10,000 iterations, which is
about half a millisecond. ``OMP_WAIT_POLICY=PASSIVE`` (no spin at all) frees the cores too, but made the small
CNN's gradient slower (1.8-1.9 -> 2.2-2.9 ms on 2 threads: every operation then waits for its
threads to wake up); a short spin kept it at 1.8-2.0 ms.

``short_openmp_spin`` sets that short spin for this process and the processes it starts. It must
run before torch is imported: libgomp reads its environment once, when it is loaded. A count that
the user set (``GOMP_SPINCOUNT``) or a wait policy (``OMP_WAIT_POLICY``) is left alone. Other OpenMP
runtimes (Intel's, LLVM's) ignore the variable. With one torch thread (``psc launch`` gives each CPU
worker cores / N threads, so one on 2 cores with 2 workers) there is no team to spin and nothing
changes.
"""
from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger("psc.openmp")

SPIN_COUNT = 10_000  # about half a millisecond of spinning before an idle OpenMP thread sleeps


def short_openmp_spin() -> bool:
    """Set ``GOMP_SPINCOUNT`` for this process and its children (see the module doc); True if it was
    set now, False where the user chose a count or a wait policy, or torch is already loaded."""
    if "GOMP_SPINCOUNT" in os.environ or "OMP_WAIT_POLICY" in os.environ:
        return False
    if "torch" in sys.modules:
        log.debug("torch is already loaded: its OpenMP threads keep their spin count")
        return False
    os.environ["GOMP_SPINCOUNT"] = str(SPIN_COUNT)
    return True
