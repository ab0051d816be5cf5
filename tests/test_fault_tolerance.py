"""Kill -9 any process of a run at a random round, start it again, and finish with the same model.

Each test starts a server and two workers with --checkpoint, waits for a random round, kills a
worker (started again with its original command) or the server (started again with --resume), and
checks: exit 0 everywhere, the metrics file reads as one run (rounds 0..T-1 once each), and
``model_sha256`` equals that of the uninterrupted run (in-process engine, CPU). The random round
and victim are in the failure message.
"""
from __future__ import annotations

import os
import random

import pytest

from experiments.fault_trials import reference_sha, trial

pytestmark = pytest.mark.procs

QUAD = "quadratic:d=40,la2=1,lb2=10"
CASES = {
    "ef21-topk-both": ["--algorithm", "ef21", "--uplink", "topk:ratio=0.1", "--downlink", "topk:ratio=0.2",
                       "--problem", QUAD, "--lr", "0.01", "--rounds", "120"],
    "marina-p-permk": ["--algorithm", "marina-p", "--downlink", "permk", "--problem", QUAD, "--lr", "0.01", "--rounds", "120"],
    "cd-adam-sign": ["--algorithm", "cd-adam", "--uplink", "sign", "--downlink", "sign", "--problem", QUAD,
                     "--lr", "0.001", "--rounds", "120"],
    "cnn-ef-sgd": ["--algorithm", "ef-sgd", "--uplink", "topk:ratio=0.1", "--problem", "cnn:dataset=digits,width=4,batch=16",
                   "--lr", "0.05", "--rounds", "40"],
}


@pytest.mark.parametrize("case, kind", [
    ("ef21-topk-both", "worker"), ("ef21-topk-both", "server"),
    ("marina-p-permk", "worker"), ("marina-p-permk", "server"),
    ("cd-adam-sign", "worker"), ("cd-adam-sign", "server"),
    ("cnn-ef-sgd", "worker"), ("cnn-ef-sgd", "server"),
])
def test_kill_minus_nine_and_restart_gives_the_same_model(case, kind):
    seed = int.from_bytes(os.urandom(4), "little")
    run_args = CASES[case]
    result = trial(kind, run_args, 3, reference_sha(run_args, 3, workers=2), random.Random(seed),
                   every=10, timeout=90, workers=2)
    assert result.ok, f"{case}, kill -9 {kind} at round {result.kill_round} (trial seed {seed}): {result.why}"
