"""NEOLITHIC and its baselines (spec/neolithic.md): Lemma 6, the R = 1 and identity reductions, FCC's
(1 - delta)^R contraction, replica agreement and the P2 check. The problems of section 3 are tested in
tests/test_problems.py."""
from __future__ import annotations

import pytest
import torch

from common.algorithms.neolithic import fcc
from common.compressors import build
from common.config import RunConfig
from common.problems import build_problem
from runtime.setup import RunSetup
from runtime.engine import run_inproc
from tests.inproc import drive

LS = "least-squares:d=12,m=40"


def test_lemma6_virtual_sequence_runs_uncompressed_sgd():
    """y = x - gamma (er + mean er_i) follows y - (gamma/n) sum_i g_hat_i exactly (App. B, Lemma 6)."""
    gamma, n = 0.05, 5
    config = RunConfig(algorithm="neolithic:r=3", uplink="randk:k=1,scaled=false", downlink="topk:k=2", workers=n,
                       rounds=40, dtype="float64", problem=LS, lr=str(gamma), seed=1)
    setup = RunSetup.build(config)
    y = setup.x0.double().clone()  # er = er_i = 0 at k = 0
    worst = 0.0
    for t, server, workers, _ in drive(config):
        y = y - gamma * torch.stack([w.rule.g_hat for w in workers]).mean(0)
        omega = server.rule.er + torch.stack([w.rule.er for w in workers]).mean(0)
        y_k = server.rule.x - gamma * omega
        worst = max(worst, float((y_k - y).abs().max() / (1 + y.abs().max())))
        assert all(torch.equal(w.rule.x, server.rule.x) for w in workers), f"round {t}: replicas differ"
    assert worst < 1e-12
    assert float(server.rule.er.abs().max()) > 0  # the downlink really compressed


def test_mem_sgd_virtual_sequence():
    """App. C.4: y = x - (1/n) sum e_i follows y - (gamma/n) sum_i g_i."""
    gamma, n = 0.05, 4
    config = RunConfig(algorithm="mem-sgd", uplink="randk:k=2,scaled=false", workers=n, rounds=30, dtype="float64",
                       problem=LS, lr=str(gamma))
    y = RunSetup.build(config).x0.double().clone()
    xs = []
    for t, server, workers, _ in drive(config):
        # the gradient of round t was taken at the previous x; recompute it with the same oracle step
        g = torch.stack([w.rule.oracle(xs[-1] if xs else RunSetup.build(config).x0.double(), t)[1] for w in workers]).mean(0)
        y = y - gamma * g
        xs.append(server.rule.x.clone())
        virtual = server.rule.x - torch.stack([w.rule.e for w in workers]).mean(0)
        assert torch.allclose(virtual, y, rtol=0, atol=1e-12), f"round {t}"


def test_neolithic_with_one_round_is_double_squeeze():
    common = dict(uplink="randk:k=2,scaled=false", downlink="topk:k=3", workers=4, rounds=30, dtype="float64",
                  problem=LS, lr="0.05", seed=2)
    neo = [s.rule.x.clone() for _, s, _, _ in drive(RunConfig(algorithm="neolithic:r=1", **common))]
    ds = [s.rule.x.clone() for _, s, _, _ in drive(RunConfig(algorithm="double-squeeze", **common))]
    for t, (a, b) in enumerate(zip(neo, ds)):
        assert torch.equal(a, b), f"round {t}: max diff {float((a - b).abs().max())}"


def test_neolithic_with_identity_is_psgd_with_r_times_the_batch():
    common = dict(workers=4, rounds=25, dtype="float64", problem=LS, lr="0.05", seed=3)
    neo = [s.rule.x.clone() for _, s, _, _ in drive(RunConfig(algorithm="neolithic:r=4", uplink="identity", downlink="identity", **common))]
    ps = [s.rule.x.clone() for _, s, _, _ in drive(RunConfig(algorithm="psgd:batch=4", **common))]
    for t, (a, b) in enumerate(zip(neo, ps)):
        assert torch.allclose(a, b, rtol=1e-13, atol=1e-13), f"round {t}"


@pytest.mark.parametrize("R", [1, 2, 4])
def test_fcc_with_fresh_randomness_reaches_the_r_round_contraction(R):
    """Lemma 2 with equality for unscaled Rand-K: E||v^(R) - v*||^2 = (1 - k/d)^R ||v*||^2."""
    d, k, trials = 20, 3, 4000
    c = build(f"randk:k={k},scaled=false", d, 1, seed=7)
    v_star = torch.randn(d, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ratios = []
    for t in range(trials):
        payloads, v = fcc(v_star, c, R, 0, t)
        assert len(payloads) == R
        ratios.append(float(((v - v_star) ** 2).sum() / (v_star ** 2).sum()))
    mean = sum(ratios) / trials
    assert abs(mean - (1 - k / d) ** R) < 0.04 * (1 - k / d) ** R + 0.005


def test_fcc_reusing_randomness_makes_no_progress_and_topk_fcc_is_top_rk():
    """Pitfall P1: the same mask every round leaves the error at (1 - k/d); FCC of Top-K = Top-(Rk)."""
    d, k, R = 20, 3, 4
    v_star = torch.randn(d, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    c = build(f"randk:k={k},scaled=false", d, 1, seed=7)
    v = torch.zeros_like(v_star)
    for _ in range(R):
        v = v + c.compress(v_star - v, worker=0, step=5).to_dense()
    assert torch.equal(v, c.compress(v_star, worker=0, step=5).to_dense())
    _, v_top = fcc(v_star, build(f"topk:k={k}", d), R, 0, 0)
    assert torch.equal(v_top, build(f"topk:k={R * k}", d).compress(v_star).to_dense())


def test_unscaled_unbiased_compressor_is_refused_and_scaled_one_accepted():
    base = dict(algorithm="neolithic", workers=2, problem=LS, lr="0.05", rounds=2)
    with pytest.raises(ValueError, match=r"1/\(1\+omega\)"):
        RunSetup.build(RunConfig(uplink="randk:k=1", **base))
    with pytest.raises(ValueError, match="downlink"):
        RunSetup.build(RunConfig(uplink="randk:k=1,scaled=false", downlink="randk:k=3", **base))
    RunSetup.build(RunConfig(uplink=f"randk:k=1+scale:lambda={1 / 12}", **base))  # omega = 11


def test_comm_rounds_metric_and_bytes_per_fcc_round():
    """Each FCC round adds one payload: one float32 value (Rand-1, indices regenerated) and its header."""
    last = {}
    for R in (1, 3):
        server = run_inproc(RunConfig(algorithm=f"neolithic:r={R}", uplink="randk:k=1,scaled=false", downlink="randk:k=1,scaled=false",
                                      workers=3, rounds=3, problem=LS, lr="0.05"), None, progress=False)
        assert server.last["comm_rounds"] == R
        last[R] = server.last
    for side in ("bytes_up", "bytes_down"):
        extra = last[3][side][0] - last[1][side][0]
        assert 2 * 4 <= extra <= 2 * 32, (side, extra)


def test_neolithic_converges_on_logistic_regression():
    """Rand-1 without scaling and a constant step reach a noise floor: over seeds 0-5 the squared
    gradient norm after 400 rounds is 2-7% of its start (and no lower after 1000), so the bound is
    a tenth."""
    server = run_inproc(RunConfig(algorithm="neolithic:r=4", uplink="randk:k=1,scaled=false", workers=8, rounds=400,
                                  problem="logistic:d=10,m=100", lr="0.5"), None, progress=False)
    start = build_problem("logistic:d=10,m=100", 8).evaluate(build_problem("logistic:d=10,m=100", 8).initial_point())
    assert server.last["grad_norm_sq"] < 0.1 * start["grad_norm_sq"]
