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
x = torch.ones(10**7)  # 40 MB: above glibc's largest mmap threshold
for _ in range(2):
    y = x * 2.0
    del y
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    y = x * 2.0
    del y
print(int(took), resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(malloc: str) -> tuple[bool, int]:
    env = {**os.environ, "PSC_MALLOC": malloc, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120, check=True)
    took, count = out.stdout.split()
    return took == "1", int(count)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_freed_vectors_are_reused_without_page_faults():
    """Ten 40 MB temporaries: with the setting they reuse one block (no fresh pages); with the
    system's default each is a fresh mmap (about 10,000 faults each, 20 with 2 MB huge pages)."""
    took, kept = faults("psc")
    assert took and kept < 50, kept
    took, system = faults("system")
    assert not took and system > 150, system
