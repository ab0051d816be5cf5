"""Distributed SGD with biased compressors (Beznosikov, Horvath, Richtarik, Safaryan 2023,
spec/biased-compression.md) and EF21, driven in one process round by round: error feedback's virtual
iterate and output averages, the counterexamples of section 2 for DCGD, and EF21's states and its
hand-written recursion."""
from __future__ import annotations

import math

import pytest
import torch

from common.config import RunConfig
from runtime.setup import RunSetup
from tests.inproc import drive, xs

QUAD = "quadratic:d=40,la2=4,lb2=400"


# --- error feedback (Beznosikov et al. Alg. 1) ---------------------------------------------------

@pytest.mark.parametrize("uplink", ["topk:k=2", "randk:k=3,scaled=false", "topk:k=4+natural"])
def test_ef_virtual_iterate_follows_sgd(uplink):
    """x~ = x - mean(e_i) satisfies x~^{k+1} = x~^k - eta mean(g_i^k) (eq. 46)."""
    eta = 0.01
    config = RunConfig(algorithm="ef-sgd", uplink=uplink, workers=4, rounds=40, dtype="float64", problem=QUAD, lr=str(eta))
    prev = RunSetup.build(config).x0.clone()  # x~^0 = x^0 (e^0 = 0)
    for t, server, workers, _ in drive(config):
        virt = server.rule.x - torch.stack([w.rule.e for w in workers]).mean(0)
        expect = prev - eta * torch.stack([w.rule.g for w in workers]).mean(0)
        assert torch.allclose(virt, expect, rtol=0, atol=1e-12), f"round {t}"
        prev = virt


def test_ef_output_average_is_the_uniform_mean_of_iterates():
    config = RunConfig(algorithm="ef-sgd:average=uniform", workers=3, rounds=15, dtype="float64", problem=QUAD, lr="0.01")
    seen = [RunSetup.build(config).x0.double()]
    for _, server, _, _ in drive(config):
        seen.append(server.rule.x.clone())
        assert torch.allclose(server.rule.model, torch.stack(seen).mean(0), atol=1e-12)


def test_ef_exp_average_weights_do_not_overflow():
    from common.algorithms.ef_sgd import average_weight

    q = 1.0 / (1.0 - 0.05)
    lams = [average_weight("exp", k, q) for k in (1, 10, 10_000, 10**7)]
    assert all(0 < x <= 1 and math.isfinite(x) for x in lams)
    assert lams[-1] == pytest.approx(1 - 1 / q)


# --- the counterexamples of section 2 ----------------------------------------------------------

def test_dcgd_top1_diverges_exactly_on_example1_while_ef_converges():
    eta, x0 = 0.02, torch.ones(3, dtype=torch.float64)
    config = RunConfig(algorithm="dcgd", uplink="topk:k=1", workers=3, rounds=60, dtype="float64", problem="biased-example1", lr=str(eta))
    for k, x in enumerate(xs(config), start=1):
        assert torch.allclose(x, (1 + 11 * eta / 6) ** k * x0, rtol=1e-12, atol=0), f"round {k}"
    ef = RunConfig(algorithm="ef-sgd", uplink="topk:k=1", workers=3, rounds=600, dtype="float64", problem="biased-example1", lr=str(eta))
    assert float(xs(ef)[-1].norm()) < 1e-6


def test_dcgd_top1_is_stuck_on_example3():
    config = RunConfig(algorithm="dcgd", uplink="topk:k=1", workers=3, rounds=10, dtype="float64", problem="biased-example3", lr="0.1")
    assert all(torch.equal(x, torch.zeros(2, dtype=torch.float64)) for x in xs(config))


# --- EF21 ---------------------------------------------------------------------------------------

def test_ef21_state_agrees_on_both_sides_with_a_compressed_downlink():
    config = RunConfig(algorithm="ef21", uplink="topk:k=4", downlink="topk:k=6", workers=4, rounds=30, dtype="float64", problem=QUAD, lr="0.01")
    for t, server, workers, _ in drive(config):
        assert torch.allclose(server.rule.g, torch.stack([w.rule.g_i for w in workers]).mean(0), atol=1e-12)
        assert all(torch.equal(w.rule.g_down, server.rule.g_down) and torch.equal(w.rule.x, server.rule.x) for w in workers)


def test_ef21_with_identity_downlink_is_plain_ef21():
    """x^{t+1} = x^t - gamma g^t with g^t = mean(g_i^t), g_i^{t+1} = g_i^t + C(grad f_i(x^{t+1}) - g_i^t)."""
    gamma = 0.01
    config = RunConfig(algorithm="ef21", uplink="topk:k=3", workers=3, rounds=25, dtype="float64", problem=QUAD, lr=str(gamma))
    setup = RunSetup.build(config)
    x = setup.x0.clone()
    oracles = [setup.problem.oracle(i, torch.device("cpu"), torch.float64) for i in range(3)]
    from common.compressors import build

    top = build("topk:k=3", setup.dim)
    gi = [oracles[i](x, 0)[1] for i in range(3)]
    for t, server, _, _ in drive(config):
        if t > 0:
            gi = [g + top.decompress(top.compress(oracles[i](x, t)[1] - g)) for i, g in enumerate(gi)]
        x = x - gamma * torch.stack(gi).mean(0)
        assert torch.allclose(server.rule.x, x, rtol=1e-10, atol=1e-12), f"round {t}"
