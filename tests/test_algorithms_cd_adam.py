"""CD-Adam and the AMSGrad family (spec/cd-adam.md): replica agreement, the identity reduction, 1-bit
Adam's stages, and CD-Adam against naive compression. Its problem (nonconvex logistic regression) is
tested in tests/test_problems.py; its runs over real processes in tests/test_algorithms_procs.py."""
from __future__ import annotations

import pytest
import torch

from common.config import RunConfig
from common.problems import build_problem
from runtime.engine import run_inproc
from tests.inproc import drive

NL = "nonconvex-logistic:dataset=breast_cancer"


def test_cd_adam_keeps_every_replica_bit_identical():
    config = RunConfig(algorithm="cd-adam", workers=5, rounds=40, dtype="float64", problem=NL, lr="0.01")
    for t, server, workers, _ in drive(config):
        s = server.rule
        for w in workers:
            for name in ("g_tilde", "x", "m", "v", "v_hat"):
                assert torch.equal(getattr(w.rule, name), getattr(s, name)), f"round {t}: {name} of worker {w.rank}"
        mean_g_hat = torch.stack([w.rule.g_hat for w in workers]).mean(0)
        assert torch.allclose(s.g_hat, mean_g_hat, rtol=0, atol=1e-12), f"round {t}"
    assert float((s.g_tilde - s.g_hat).abs().max()) > 0  # the downlink really compressed


def test_cd_adam_keeps_replicas_in_float32_too():
    config = RunConfig(algorithm="cd-adam", workers=3, rounds=15, problem=NL, lr="0.01")
    for t, server, workers, _ in drive(config):
        assert all(torch.equal(w.rule.x, server.rule.x) and torch.equal(w.rule.g_tilde, server.rule.g_tilde) for w in workers)


def test_cd_adam_with_identity_is_amsgrad_without_bias_correction():
    common = dict(workers=4, rounds=40, dtype="float64", problem=NL, lr="0.01", seed=1)
    cd = [s.rule.x.clone() for _, s, _, _ in drive(RunConfig(algorithm="cd-adam", uplink="identity", downlink="identity", **common))]
    ams = [s.rule.x.clone() for _, s, _, _ in drive(RunConfig(algorithm="amsgrad", **common))]
    for t, (a, b) in enumerate(zip(cd, ams)):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12), f"round {t}"


def test_amsgrad_matches_a_hand_written_single_node_update():
    """n = 1: x_{t+1} = x_t - a m_t / sqrt(v_hat_t + nu), no bias correction (Alg. 1 lines 13-16)."""
    config = RunConfig(algorithm="amsgrad:beta1=0.8,beta2=0.95,nu=1e-6", workers=1, rounds=10, dtype="float64", problem=NL, lr="0.02")
    p = build_problem(NL, 1)
    oracle = p.oracle(0, torch.device("cpu"), torch.float64)
    x = p.initial_point()
    m = v = v_hat = torch.zeros_like(x)
    for t, server, _, _ in drive(config):
        g = oracle(x, t)[1]
        m = 0.8 * m + 0.2 * g
        v = 0.95 * v + 0.05 * g * g
        v_hat = torch.maximum(v_hat, v)
        x = x - 0.02 * m / torch.sqrt(v_hat + 1e-6)
        assert torch.allclose(server.rule.x, x, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("algorithm", ["amsgrad-naive", "amsgrad-ef", "onebit-adam:warmup=5"])
def test_compressed_baselines_keep_the_server_model_equal_to_the_workers(algorithm):
    config = RunConfig(algorithm=algorithm, workers=3, rounds=12, problem=NL, lr="0.01")
    for t, server, workers, _ in drive(config):
        assert all(torch.equal(w.rule.x, server.rule.x) for w in workers), f"round {t}"


def test_onebit_adam_freezes_the_variance_after_warm_up():
    config = RunConfig(algorithm="onebit-adam:warmup=4", workers=3, rounds=10, problem=NL, lr="0.01")
    seen = []
    for t, server, _, _ in drive(config):
        seen.append((server.rule.v.clone(), server.last["bytes_up"][0], server.last["bytes_down"][0]))
    d = build_problem(NL, 3).dim
    assert all(up > 4 * d and down > 4 * d for _, up, down in seen[:4])  # warm-up: full precision
    assert all(up < d // 8 + 80 and down < d // 8 + 50 for _, up, down in seen[4:])  # then 1 bit a coordinate
    assert all(torch.equal(v, seen[3][0]) for v, _, _ in seen[4:])


def test_cd_adam_beats_naive_compression():
    common = dict(workers=20, rounds=300, problem=NL, lr="0.01")
    cd = run_inproc(RunConfig(algorithm="cd-adam", **common), None, progress=False).last["grad_norm_sq"]
    naive = run_inproc(RunConfig(algorithm="amsgrad-naive", **common), None, progress=False).last["grad_norm_sq"]
    assert cd < naive
