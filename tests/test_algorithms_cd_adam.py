"""CD-Adam and the AMSGrad family (spec/cd-adam.md): replica agreement, the identity reduction, 1-bit
Adam's stages, the nonconvex logistic problem and its data readers; and every method of issue 6 over
real processes with its bytes per direction."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from common.config import RunConfig
from common.problems import build_problem
from runtime.engine import run_inproc
from tests.procs import finish, records, start
from tests.test_runtime_rules import drive

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


def test_nonconvex_logistic_gradient_and_constants():
    p = build_problem("nonconvex-logistic:dataset=digits,lam=0.1", 20, seed=2)
    assert p.dim == 64 and p.A.shape == (20, 1797 // 20, 64)
    x = torch.randn(64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    # the workers' full local gradients average to the server's exact gradient
    g = sum(p.oracle(i, torch.device("cpu"), torch.float64)(x, 0)[1] for i in range(20)) / 20
    assert p.evaluate(x)["grad_norm_sq"] == pytest.approx(float(g @ g), rel=1e-10)
    # finite differences of the loss
    h = 1e-6
    e = torch.zeros(64, dtype=torch.float64)
    e[5] = 1.0
    fd = (p.evaluate(x + h * e)["loss"] - p.evaluate(x - h * e)["loss"]) / (2 * h)
    assert fd == pytest.approx(float(g[5]), rel=1e-5, abs=1e-8)
    assert p.constants["L"] <= p.constants["L_max"] and p.constants["L"] > 0.2  # 2 lam from the regulariser


def test_libsvm_reader_and_missing_file(tmp_path):
    path = tmp_path / "Tiny.svm"  # upper case: the path is not lower-cased
    rng = np.random.default_rng(0)
    lines = []
    for j in range(41):
        feats = " ".join(f"{k + 1}:{rng.normal():.4f}" for k in range(5) if rng.random() < 0.7)
        lines.append(f"{1 if j % 2 else 0} {feats}")
    path.write_text("\n".join(lines) + "\n")
    p = build_problem(f"nonconvex-logistic:dataset=libsvm,path={path},features=6", 4, seed=0)
    assert p.dim == 6 and p.A.shape == (4, 10, 6) and set(np.unique(p.y)) == {-1.0, 1.0}
    server = run_inproc(RunConfig(algorithm="cd-adam", workers=4, rounds=5, lr="0.01",
                                  problem=f"nonconvex-logistic:dataset=libsvm,path={path}"), None, progress=False)
    assert math.isfinite(server.last["grad_norm_sq"])
    missing = tmp_path / "no_such_file"
    with pytest.raises(ValueError, match="no_such_file"):
        build_problem(f"nonconvex-logistic:dataset=libsvm,path={missing}", 4)


# -- every method of issue 6 over real processes: 20 rounds, 3 workers, bytes per direction ------

D = 64  # least-squares:d=64 for all; each payload is checked against what the method must send
DENSE, SIGN, RAND1 = 4 * D, D // 8, 4
METHODS = {
    # name: (run options, core bytes up, core bytes down) -- core = values/bits, headers excluded
    "neolithic": (["--algorithm", "neolithic:r=4", "--uplink", "randk:k=1,scaled=false", "--downlink", "randk:k=2,scaled=false"], 4 * RAND1, 4 * 2 * RAND1),
    "mem-sgd": (["--algorithm", "mem-sgd", "--uplink", "randk:k=1,scaled=false"], RAND1, DENSE),
    "double-squeeze": (["--algorithm", "double-squeeze", "--uplink", "randk:k=1,scaled=false", "--downlink", "randk:k=2,scaled=false"], RAND1, 2 * RAND1),
    "ef21-sgd": (["--algorithm", "ef21-sgd", "--uplink", "randk:k=1,scaled=false"], RAND1, DENSE),
    "psgd": (["--algorithm", "psgd"], DENSE, DENSE),
    "cd-adam": (["--algorithm", "cd-adam"], SIGN, SIGN),
    "amsgrad": (["--algorithm", "amsgrad"], DENSE, DENSE),
    "amsgrad-naive": (["--algorithm", "amsgrad-naive"], SIGN, SIGN),
    "amsgrad-ef": (["--algorithm", "amsgrad-ef"], SIGN, SIGN),
    "onebit-adam": (["--algorithm", "onebit-adam:warmup=5"], SIGN, SIGN),
}
PARALLEL = 3
PAYLOADS = {"neolithic": 4}  # payloads in one message (R FCC rounds), else 1


@pytest.fixture(scope="module")
def procs_runs(tmp_path_factory):
    """Run the ten launches, at most PARALLEL at a time (the host is small and shared: a few overlap
    their start-up, too many starve each other past the join timeout)."""
    out = tmp_path_factory.mktemp("procs")
    pending = list(METHODS.items())
    running, results = {}, {}
    while pending or running:
        while pending and len(running) < PARALLEL:
            name, (opts, _, _) = pending.pop(0)
            path = out / f"{name}.jsonl"
            args = ["launch", "--engine", "procs", "--workers", "3", "--device", "cpu", "--rounds", "20", "--lr", "0.01",
                    "--problem", f"least-squares:d={D},m=50", "--metrics", str(path), *opts]
            running[name] = (start(args), path)
        name = next(iter(running))
        proc, path = running.pop(name)
        code, _, err = finish(proc, 600)
        results[name] = (code, err, path)
    return results


@pytest.mark.parametrize("name", list(METHODS))
def test_method_runs_over_processes_and_sends_what_it_should(procs_runs, name):
    code, err, path = procs_runs[name]
    assert code == 0, err[-2000:]
    recs = records(path)
    rounds = [r for r in recs if r["event"] == "round"]
    assert len(rounds) == 20 and recs[-1]["event"] == "end"
    _, up_core, down_core = METHODS[name]
    slack = 90 + 32 * PAYLOADS.get(name, 1)  # protocol header, envelope, one payload header each
    for r in rounds:
        if name == "onebit-adam" and r["round"] < 5:
            up, down = DENSE, DENSE  # uncompressed warm-up
        else:
            up, down = up_core, down_core
        assert all(up <= b <= up + slack for b in r["bytes_up"]), (r["round"], r["bytes_up"], up)
        assert all(down <= b <= down + slack for b in r["bytes_down"]), (r["round"], r["bytes_down"], down)
        assert math.isfinite(r["grad_norm_sq"])
    if name == "neolithic":
        assert all(r["comm_rounds"] == 4 for r in rounds)
    if name == "cd-adam":  # about d/8 + a few tens of bytes each way per worker
        assert max(rounds[-1]["bytes_up"]) <= D // 8 + 80 and max(rounds[-1]["bytes_down"]) <= D // 8 + 50
