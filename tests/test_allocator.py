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


RECEIVED = """
import resource, zmq
from runtime.allocator import keep_freed_memory
took = keep_freed_memory()
ctx = zmq.Context()  # after the setting, as in every psc process: its I/O thread allocates what arrives
a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
port = a.bind_to_random_port("tcp://127.0.0.1")
b.connect(f"tcp://127.0.0.1:{port}")
payload = bytearray(40_000_000)


last = None


def round_like():  # a 40 MB frame arrives and is read; the one before it is dropped (a worker's model)
    global last
    a.send(payload, copy=False)
    frame = b.recv(copy=False)
    sum(memoryview(frame)[::4096])  # one touch a page, as a pass over the vector would
    last = frame


for _ in range(4):
    round_like()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    round_like()
print(int(took), resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
a.close(0), b.close(0), ctx.term()
"""


def faults(malloc: str, probe: str = PROBE) -> tuple[bool, int]:
    env = {**os.environ, "PSC_MALLOC": malloc, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120, check=True)
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


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_frames_that_zeromq_receives_in_its_own_thread_reuse_freed_memory_too():
    """ZeroMQ allocates a received message in its I/O thread. In that thread's own arena a 40 MB
    frame that arrives while the last one is still held took a heap of its own, unmapped once free,
    so every other frame faulted in about 10,000 fresh pages; in the main arena (``M_ARENA_MAX = 1``)
    the frames reuse freed memory."""
    took, kept = faults("psc", RECEIVED)
    assert took
    took, system = faults("system", RECEIVED)
    assert not took and system > 30_000, system  # ten frames of 40 MB, fresh each time
    assert kept < system / 4, (kept, system)
