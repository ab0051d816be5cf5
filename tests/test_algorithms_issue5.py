"""Issue 5: the MARINA-P/M3 family (m3, marina, ef21-p, ef21-p-dcgd, core) and the biased-compression
family (dcgd, ef-sgd, ef21): invariants in one process, and 20 rounds of each over real processes."""
from __future__ import annotations

import math

import pytest
import torch

from common.config import RunConfig
from common.wire.message import decode_message
from runtime.setup import RunSetup
from runtime import protocol
from tests.procs import finish, records, start
from tests.test_runtime_rules import drive

QUAD = "quadratic:d=40,la2=4,lb2=400"


def xs(config):
    return [s.rule.x.clone() for _, s, _, _ in drive(config)]


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
    for _, server, _, downs in drive(RunConfig(algorithm="m3:beta=1", uplink="identity", **common)):
        m3.append(server.rule.x.clone())
        compressed += not decode_message(protocol.parse(downs[0]).body).meta["sync"]
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


def core_sizes(m, d=50):
    config = RunConfig(algorithm=f"core:m={m}", workers=3, rounds=4, problem=f"quadratic:d={d}", lr="theory")
    sizes = []
    for t, server, workers, downs in drive(config):
        assert all(torch.equal(w.rule.x, server.rule.x) for w in workers)
        assert decode_message(protocol.parse(downs[0]).body).payloads["p"].to_dense().numel() == m
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


def test_problem_constants():
    from common.problems import build_problem

    ex1 = build_problem("biased-example1", 3)
    assert ex1.constants["L_max"] == pytest.approx(34.5)  # 2 ||a_i||^2 + 1/2
    x = torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64)
    assert torch.allclose(ex1.oracle(0, torch.device("cpu"), torch.float64)(x, 0)[1], 0.5 * torch.tensor([-11.0, 9.0, 9.0], dtype=torch.float64))
    q = build_problem("identity-quadratic:d=20", 50, seed=1)
    assert q.constants["L"] == pytest.approx(q.a.mean()) and q.constants["L_max"] == pytest.approx(q.a.max())
    assert q.constants["L_A"] == pytest.approx(math.sqrt(2) * abs(q.a - q.a.mean()).max())
    with pytest.raises(ValueError, match="3 workers"):
        build_problem("biased-example3", 4)


# --- 20 rounds over real processes, bytes per direction -----------------------------------------

D, N = 120, 3
K = D // N          # Rand-K default of m3/marina, Perm-K block
TOPK = 12           # ratio=0.1 of d = 120
OVER = 100          # protocol + envelope + payload headers
full, part, core_m = (4 * D, 4 * D + OVER), (4 * K, 4 * K + OVER), (40, 40 + OVER)
topk = (4 * TOPK, 4 * TOPK + TOPK + OVER)   # values + at most 7 index bits each
rand12 = (4 * TOPK, 4 * TOPK + OVER)        # randk:ratio=0.1, indices regenerated

METHODS = {  # name: (extra args, allowed uplink ranges, allowed downlink ranges, round-0 uplink)
    "dcgd": ([], [rand12], [full], None),
    "ef-sgd": ([], [topk], [full], None),
    "ef21": ([], [topk, full], [full], full),
    "ef21-p": ([], [full], [topk], None),
    "ef21-p-dcgd": (["--lr", "0.005"], [rand12], [topk], None),
    "marina": ([], [part, full], [full], full),
    "m3": ([], [part, full], [part, full], full),
    "core": ([], [core_m], [core_m], None),
}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_runs_over_real_processes(name, tmp_path):
    extra, up_ok, down_ok, first_up = METHODS[name]
    metrics = tmp_path / "run.jsonl"
    args = ["launch", "--engine", "procs", "--device", "cpu", "--workers", str(N), "--algorithm", name,
            "--problem", f"quadratic:d={D},la2=1,lb2=100", "--rounds", "20", "--metrics", str(metrics), *extra]
    code, _, err = finish(start(args), 180)
    assert code == 0, err[-2000:]
    rounds = [r for r in records(str(metrics)) if r["event"] == "round"]
    assert len(rounds) == 20
    inside = lambda b, ranges: any(lo <= b < hi for lo, hi in ranges)
    for r in rounds:
        assert all(inside(b, up_ok) for b in r["bytes_up"]), (r["round"], r["bytes_up"])
        assert all(inside(b, down_ok) for b in r["bytes_down"]), (r["round"], r["bytes_down"])
    if first_up:
        assert all(first_up[0] <= b < first_up[1] for b in rounds[0]["bytes_up"])
    if len(up_ok) > 1:  # the compressed rounds must occur
        assert any(b < up_ok[0][1] for r in rounds[1:] for b in r["bytes_up"])
    if len(down_ok) > 1:
        assert any(b < down_ok[0][1] for r in rounds for b in r["bytes_down"])
    assert math.isfinite(rounds[-1]["grad_norm_sq"])
