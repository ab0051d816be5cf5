"""Neural networks on a CUDA GPU (skipped without one): the oracle's tensors stay on the device,
compression happens there, and three worker processes share one GPU for a few rounds of CD-Adam and
of EF-SGD with Top-K on the small CNN."""
from __future__ import annotations

import pytest
import torch

from common.algorithms import ALGORITHMS
from common.config import RunConfig
from runtime.engine import Engine
from tests.procs import finish, records, start

pytestmark = pytest.mark.cuda

PROBLEM = "cnn:dataset=digits,width=16,batch=32"
RUNS = {
    "cd-adam": dict(algorithm="cd-adam", uplink="sign", downlink="sign", lr="0.003"),
    "ef-sgd": dict(algorithm="ef-sgd", uplink="topk:ratio=0.05", downlink=None, lr="0.1"),
}


def needs(name: str) -> None:
    if name not in ALGORITHMS:
        pytest.skip(f"algorithm {name} is not installed")


def test_oracle_runs_on_the_gpu_and_matches_the_cpu():
    from common.problems import build_problem

    p = build_problem("resnet20:dataset=digits,batch=8", 3, seed=0)
    x = p.initial_point().float()
    cuda = torch.device("cuda", 0)
    # cuDNN convolves float32 in TF32 by default (10-bit mantissas): the comparison is of the oracle's
    # function, so it runs the GPU in full float32 here
    matmul_tf32 = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True, allow_tf32=False):
            loss_g, g_g = p.oracle(1, cuda, torch.float32)(x.to(cuda), 4)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul_tf32
    loss_c, g_c = p.oracle(1, torch.device("cpu"), torch.float32)(x, 4)
    assert loss_g.device.type == "cuda" and g_g.device.type == "cuda"
    err = float((g_g.cpu() - g_c).abs().max())
    assert torch.allclose(g_g.cpu(), g_c, rtol=1e-3, atol=1e-4), f"largest gradient difference {err:.3g}"
    assert abs(float(loss_g) - float(loss_c)) < 1e-4, (float(loss_g), float(loss_c))


@pytest.mark.parametrize("name", sorted(RUNS))
def test_compression_happens_on_the_gpu_inproc(name):
    needs(name)
    run = RUNS[name]
    config = RunConfig(problem=PROBLEM, workers=3, rounds=3, seed=0, **run)
    engine = Engine(config, device="cuda:0")
    server, workers, setup = engine.server, engine.workers, engine.setup
    server.begin()
    for t in range(3):
        rule = workers[0].rule
        g = rule.grad(rule.x, t)
        assert g.device.type == "cuda"
        payload = setup.ctx.uplink.compress(g, worker=0, step=t)
        assert payload.to_dense().device.type == "cuda"
        engine.exchange(t)
        assert all(w.rule.x.device.type == "cuda" for w in workers)
    # the worker's iterate is the server's x^k (EF-SGD's server model is the eq. 20 average of the x^k)
    assert torch.allclose(workers[0].rule.x.cpu(), server.rule.x.cpu().to(workers[0].rule.x.dtype), atol=1e-5)


@pytest.mark.procs
@pytest.mark.parametrize("name", sorted(RUNS))
def test_three_worker_processes_share_one_gpu(tmp_path, name):
    needs(name)
    run = RUNS[name]
    metrics = tmp_path / f"{name}.jsonl"
    args = ["launch", "--workers", "3", "--device", "cuda:0", "--engine", "procs", "--rounds", "5",
            "--problem", PROBLEM, "--algorithm", run["algorithm"], "--lr", run["lr"], "--metrics", str(metrics)]
    if run["uplink"]:
        args += ["--uplink", run["uplink"]]
    if run["downlink"]:
        args += ["--downlink", run["downlink"]]
    code, out, err = finish(start(args), 300)
    assert code == 0, err[-3000:]
    rounds = [r for r in records(metrics) if r["event"] == "round"]
    assert len(rounds) == 5
    dim = records(metrics)[0]["dim"]
    assert all(0.0 <= r["test_accuracy"] <= 1.0 for r in rounds)
    assert sum(rounds[-1]["bytes_up"]) / 5 < 3 * 4 * dim / 4  # compressed uplinks: well under float32
    print(f"{name}: rounds {[round(r['round_s'], 4) for r in rounds]} s, compute {[round(r['compute_s'], 4) for r in rounds]} s")
