"""``runtime.allocator``: large temporaries reuse freed pages instead of faulting in fresh ones."""
from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROBE = """
import resource, torch
from runtime.allocator import keep_freed_memory
took = keep_freed_memory()
x, b = torch.ones(10**7), torch.ones(10**7)  # 40 MB each: above glibc's largest mmap threshold


def round_like():  # two 40 MB temporaries, freed again, as in a round at d = 1e7
    y = x * 2.0
    z = y + b
    del y, z


for _ in range(8):  # the heap settles into its steady state
    round_like()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    round_like()
print(int(took), resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(malloc: str) -> tuple[bool, int]:
    env = {**os.environ, "PSC_MALLOC": malloc, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120, check=True)
    took, count = out.stdout.split()
    return took == "1", int(count)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_freed_vectors_are_reused_without_page_faults():
    """Twenty 40 MB temporaries in ten round-like steps: with the setting they reuse freed blocks (no
    fresh pages once the heap has settled, but for an occasional block); with the system's default each is a fresh mmap (about
    10,000 faults each, 20 with 2 MB huge pages)."""
    took, kept = faults("psc")
    assert took
    took, system = faults("system")
    assert not took and system > 300, system
    assert kept < system / 4, (kept, system)  # now and then one block is not reusable: 10,000 faults
