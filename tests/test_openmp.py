"""``runtime.openmp``: torch's idle OpenMP threads stop spinning soon, in every psc process."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from runtime import openmp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# CPU time that the process spends while its main thread sleeps after each of 15 parallel torch
# operations: the OpenMP threads' spinning, and nothing else of note.
IDLE_PROBE = """
import resource, time
from runtime.openmp import short_openmp_spin
took = short_openmp_spin()
import torch
torch.set_num_threads(2)
x = torch.ones(1 << 22)


def cpu_s():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


for _ in range(3):
    x.add_(1)
spent = 0.0
for _ in range(15):
    x.add_(1)  # a parallel region, after which its threads wait for the next one
    before = cpu_s()
    time.sleep(0.03)
    spent += cpu_s() - before
print(int(took), spent)
"""


def _idle_cpu_s(env_change: dict) -> tuple[bool, float]:
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    env.update(env_change, PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-c", IDLE_PROBE], env=env, capture_output=True, text=True, timeout=120, check=True)
    took, spent = out.stdout.split()
    return took == "1", float(spent)


@pytest.mark.skipif((os.cpu_count() or 1) < 2 or "OpenMP" not in torch.__config__.parallel_info(),
                    reason="needs two cores and torch built with OpenMP")
def test_idle_openmp_threads_burn_a_fraction_of_the_cpu_time_of_the_default_spin():
    took, short = _idle_cpu_s({})
    kept, default = _idle_cpu_s({"GOMP_SPINCOUNT": "300000"})  # libgomp's own default, set by hand
    assert took and not kept
    assert short < default / 3, (short, default)


def test_a_count_or_a_wait_policy_that_the_user_chose_is_left_alone(monkeypatch):
    monkeypatch.delitem(sys.modules, "torch")  # as before torch is imported (restored afterwards)
    monkeypatch.setenv("GOMP_SPINCOUNT", "123")
    assert not openmp.short_openmp_spin() and os.environ["GOMP_SPINCOUNT"] == "123"
    monkeypatch.delenv("GOMP_SPINCOUNT")
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert not openmp.short_openmp_spin() and "GOMP_SPINCOUNT" not in os.environ
    monkeypatch.delenv("OMP_WAIT_POLICY")
    assert openmp.short_openmp_spin() and os.environ["GOMP_SPINCOUNT"] == str(openmp.SPIN_COUNT)


def test_once_torch_is_loaded_nothing_is_set(monkeypatch):
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert "torch" in sys.modules
    assert not openmp.short_openmp_spin() and "GOMP_SPINCOUNT" not in os.environ


def test_every_psc_command_sets_the_short_spin_before_it_runs(monkeypatch):
    from click.testing import CliRunner

    import psc.cli

    calls = []
    monkeypatch.setattr(psc.cli, "short_openmp_spin", lambda: calls.append("set") or True)
    result = CliRunner().invoke(psc.cli.main, ["-q", "list", "compressors"], catch_exceptions=False)
    assert result.exit_code == 0 and calls == ["set"]
