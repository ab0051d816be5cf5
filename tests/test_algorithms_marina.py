"""MARINA-P, M3 and the baselines of Gruntkowska, Tyurin, Richtarik 2024 (spec/marina-p-m3.md), driven
in one process round by round: MARINA-P's invariant mean(w_i) = x with Perm-K and its GD equivalence,
the MARINA, M3 and EF21-P reductions and states, M3's theory defaults, and CORE's message sizes."""
from __future__ import annotations

import pytest
import torch

from common.config import RunConfig
from runtime.setup import RunSetup
from runtime import protocol
from tests.inproc import drive, xs

QUAD = "quadratic:d=40,la2=4,lb2=400"


# --- MARINA-P ------------------------------------------------------------------------------------

@pytest.mark.parametrize("d,n", [(60, 6), (50, 7), (5, 12)])
def test_marina_p_permk_keeps_mean_of_w_equal_to_x(d, n):
    config = RunConfig(algorithm="marina-p", downlink="permk", workers=n, rounds=60, dtype="float64",
                       problem=f"quadratic:d={d},la2=4,lb2=400", lr="theory")
    synced = compressed = 0
    for t, server, workers, downs in drive(config):
        w_mean = torch.stack([w.rule.x for w in workers]).mean(0)
        assert torch.allclose(w_mean, server.rule.x, rtol=0, atol=1e-12), f"round {t}"
        if workers[0].received.meta["sync"]:
            synced += 1
        else:
            compressed += 1
            assert len({bytes(b"".join(f)) for f in downs}) > 1, "Perm-K must send different messages"
    assert synced > 0 and compressed > 0


def test_marina_p_permk_follows_gd_on_a_homogeneous_quadratic():
    common = dict(workers=8, rounds=80, dtype="float64", problem="quadratic:d=64,la2=0,lb2=100", lr="0.1")
    gd = [s.rule.x.clone() for _, s, _, _ in drive(RunConfig(algorithm="gd", **common))]
    mp = [s.rule.x.clone() for _, s, _, _ in drive(RunConfig(algorithm="marina-p", downlink="permk", **common))]
    for t, (a, b) in enumerate(zip(gd, mp)):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12), f"round {t}: max diff {float((a - b).abs().max())}"


def test_marina_p_randk_breaks_the_invariant_as_theory_says():
    config = RunConfig(algorithm="marina-p", downlink="randk:ratio=0.25", workers=4, rounds=20, dtype="float64",
                       problem="quadratic:d=40,la2=0,lb2=100", lr="0.05")
    gaps = [float((torch.stack([w.rule.x for w in ws]).mean(0) - s.rule.x).abs().max()) for _, s, ws, _ in drive(config)]
    assert max(gaps) > 1e-6  # theta = omega/n > 0: mean w_i drifts from x between syncs


def test_downlink_bytes_match_the_method():
    d, n = 120, 4
    config = RunConfig(algorithm="marina-p", workers=n, rounds=30, problem=f"quadratic:d={d}", lr="theory")
    for t, server, workers, downs in drive(config):
        up = server.last["bytes_up"]
        down = server.last["bytes_down"]
        assert all(b >= 4 * d for b in up) and all(b < 4 * d + 120 for b in up)  # dense float32 gradient
        if workers[0].received.meta["sync"]:
            assert all(4 * d <= b < 4 * d + 120 for b in down)
        else:
            assert all(4 * d // n <= b < 4 * d // n + 120 for b in down)  # d/n float32 values, no indices
        assert down == [protocol.size(f) for f in downs]


# --- MARINA, M3, EF21-P, CORE ------------------------------------------------------------------

def test_marina_with_p_1_is_gd():
    common = dict(workers=5, rounds=40, dtype="float64", problem=QUAD, lr="0.02")
    for a, b in zip(xs(RunConfig(algorithm="gd", **common)), xs(RunConfig(algorithm="marina:p=1", **common))):
        assert torch.equal(a, b)


def test_m3_with_identity_uplink_and_beta_1_is_marina_p():
    """Same seed and coin key ("coin" for M3's c_P, MARINA-P's coin): the same trajectory."""
    common = dict(workers=6, rounds=60, dtype="float64", problem=QUAD, lr="0.01", downlink="permk")
    mp = xs(RunConfig(algorithm="marina-p", **common))
    m3, compressed = [], 0
    for _, server, workers, _ in drive(RunConfig(algorithm="m3:beta=1", uplink="identity", **common)):
        m3.append(server.rule.x.clone())
        compressed += not workers[0].received.meta["sync"]
    assert compressed > 0
    for t, (a, b) in enumerate(zip(mp, m3)):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12), f"round {t}"


def test_m3_defaults_follow_corollary_e2_and_the_theory_step_converges():
    d, n = 60, 6
    setup = RunSetup.build(RunConfig(algorithm="m3", workers=n, problem=f"quadratic:d={d},la2=1,lb2=100"))
    rule = setup.server_rule()
    assert setup.ctx.uplink_spec == f"randk:k={d // n}" and setup.ctx.downlink_spec == "permk"
    omega = n - 1.0  # Rand-K with K = d/n and Perm-K both have omega = n - 1
    assert rule.p_p == pytest.approx(1 / n) and rule.p_d == pytest.approx(1 / n)
    assert rule.beta == pytest.approx(min((n / (omega * omega * n)) ** (1 / 3), 1.0))
    config = RunConfig(algorithm="m3", workers=n, rounds=300, dtype="float64", problem=f"quadratic:d={d},la2=1,lb2=100", lr="theory")
    *_, (_, server, workers, _) = drive(config)
    first = setup.problem.evaluate(setup.x0)["grad_norm_sq"]
    assert server.last["grad_norm_sq"] < first


def test_ef21_p_keeps_w_identical_on_both_sides():
    config = RunConfig(algorithm="ef21-p", downlink="topk:k=4", workers=3, rounds=30, problem=QUAD, lr="0.01")
    for t, server, workers, _ in drive(config):
        assert all(torch.equal(w.rule.x, server.rule.w) for w in workers), f"round {t}"


def core_sizes(m, d=50):
    config = RunConfig(algorithm=f"core:m={m}", workers=3, rounds=4, problem=f"quadratic:d={d}", lr="theory")
    sizes = []
    for t, server, workers, downs in drive(config):
        assert all(torch.equal(w.rule.x, server.rule.x) for w in workers)
        assert workers[0].received.payloads["p"].to_dense().numel() == m
        sizes.append((server.last["bytes_up"], server.last["bytes_down"]))
    for up, down in sizes:
        assert all(4 * m <= b < 4 * m + 100 for b in up + down)
    return sizes


def test_core_sends_m_floats_each_way_and_4_bytes_more_per_direction():
    a, b = core_sizes(3), core_sizes(10)
    assert all(d2 - d1 == 28 for (_, d1s), (_, d2s) in zip(a, b) for d1, d2 in zip(d1s, d2s))
    assert all(u2 - u1 == 28 for (u1s, _), (u2s, _) in zip(a, b) for u1, u2 in zip(u1s, u2s))


def test_core_directions_are_the_same_on_cpu_and_cuda():
    from common.algorithms.core import directions

    setup = RunSetup.build(RunConfig(algorithm="core", workers=2, problem="quadratic:d=30"))
    cpu = directions(setup.ctx, 7, torch.device("cpu"), torch.float32)
    assert torch.equal(cpu, directions(setup.ctx, 7, torch.device("cpu"), torch.float32))
    assert not torch.equal(cpu, directions(setup.ctx, 8, torch.device("cpu"), torch.float32))
    if torch.cuda.is_available():
        assert torch.equal(cpu, directions(setup.ctx, 7, torch.device("cuda"), torch.float32).cpu())
