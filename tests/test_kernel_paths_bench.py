"""``benchmarks/bench_kernel_paths.py`` runs: each of its rows asserts that the two paths it times give
the same result, so a kernel whose arguments changed under it fails here rather than in a user's hands."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from common.compressors import cpu_kernels

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not cpu_kernels.available(), reason="numba is not installed")
def test_the_kernel_paths_benchmark_runs_and_its_paths_agree():
    out = subprocess.run([sys.executable, "benchmarks/bench_kernel_paths.py", "--dim", "1e4", "--threads", "1",
                          "--repeats", "1"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith("| ")]
    assert any("levels counted in registers" in row for row in rows)
    assert any(row.startswith("| dequantize") for row in rows)
