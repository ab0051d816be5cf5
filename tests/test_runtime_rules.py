"""Algorithm rules driven in one process: MARINA-P's invariants, GD equivalence, state round trip."""
from __future__ import annotations

import pytest
import torch

from common.config import RunConfig
from common.wire.message import decode_message
from runtime.setup import RunSetup
from runtime import protocol
from runtime.server_core import ServerCore
from runtime.engine import Engine, run_inproc
from runtime.metrics import MetricsWriter
from runtime.worker_core import WorkerCore


def drive(config: RunConfig):
    """Yield (t, server_core, worker_cores, down_frames) after each round of the in-process engine."""
    engine = Engine(config)
    try:
        for t, downs in engine.rounds():
            yield t, engine.server, engine.workers, downs
    finally:
        engine.close()


@pytest.mark.parametrize("d,n", [(60, 6), (50, 7), (5, 12)])
def test_marina_p_permk_keeps_mean_of_w_equal_to_x(d, n):
    config = RunConfig(algorithm="marina-p", downlink="permk", workers=n, rounds=60, dtype="float64",
                       problem=f"quadratic:d={d},la2=4,lb2=400", lr="theory")
    synced = compressed = 0
    for t, server, workers, downs in drive(config):
        w_mean = torch.stack([w.rule.x for w in workers]).mean(0)
        assert torch.allclose(w_mean, server.rule.x, rtol=0, atol=1e-12), f"round {t}"
        body = protocol.parse(downs[0]).body
        if decode_message(body).meta["sync"]:
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
        body = protocol.parse(downs[0]).body
        if decode_message(body).meta["sync"]:
            assert all(4 * d <= b < 4 * d + 120 for b in down)
        else:
            assert all(4 * d // n <= b < 4 * d // n + 120 for b in down)  # d/n float32 values, no indices
        assert down == [protocol.size(f) for f in downs]


def test_rule_state_round_trips():
    config = RunConfig(algorithm="marina-p", workers=3, rounds=5, problem="quadratic:d=20", lr="0.1")
    run = drive(config)
    for _, server, workers, _ in run:
        pass
    state = server.rule.state_dict()
    wstate = workers[1].rule.state_dict()
    fresh = RunSetup.build(config)
    s2 = fresh.server_rule()
    s2.load_state_dict(state)
    assert torch.equal(s2.x, server.rule.x) and s2.p == server.rule.p
    w2 = fresh.worker_rule(1, torch.device("cpu"))
    w2.load_state_dict(wstate)
    assert torch.equal(w2.x, workers[1].rule.x)


def test_inproc_engine_writes_the_metrics_file(tmp_path):
    path = tmp_path / "m.jsonl"
    run_inproc(RunConfig(algorithm="gd", workers=3, rounds=7, problem="quadratic:d=30"), str(path), progress=False)
    from runtime.metrics import read_metrics

    recs = read_metrics(str(path))
    assert recs[0]["event"] == "start" and recs[0]["dim"] == 30 and recs[0]["workers"] == 3
    rounds = [r for r in recs if r["event"] == "round"]
    assert [r["round"] for r in rounds] == list(range(7))
    for r in rounds:
        assert len(r["bytes_up"]) == 3 and len(r["bytes_down"]) == 3
        assert {"time_s", "loss", "grad_norm_sq", "compute_s", "compress_s", "comm_s", "round_s"} <= set(r)
    assert rounds[-1]["cum_bytes_up"] == sum(sum(r["bytes_up"]) for r in rounds)
    assert recs[-1]["event"] == "end" and len(recs[-1]["model_sha256"]) == 64


def test_divergence_is_reported_clearly():
    with pytest.raises(RuntimeError, match="diverged"):
        run_inproc(RunConfig(algorithm="gd", workers=2, rounds=400, problem="quadratic:d=10", lr="100"), None, progress=False)


def test_malformed_uplink_names_the_worker():
    setup = RunSetup.build(RunConfig(algorithm="gd", workers=2, rounds=1, problem="quadratic:d=10"))
    server = ServerCore(setup, MetricsWriter(None))
    good = WorkerCore(setup, 0, torch.device("cpu")).uplink(0)
    bad = list(good)
    bad[-1] = bad[-1][:-3]
    from runtime.server_core import RunFailed

    with pytest.raises(RunFailed, match="worker 1"):
        server.round(0, [protocol.parse(good), protocol.parse(bad)])
    assert torch.equal(server.rule.x, setup.x0.float())  # the state is untouched


def test_bad_configs_are_rejected():
    with pytest.raises(ValueError, match="unknown algorithm"):
        RunSetup.build(RunConfig(algorithm="nope"))
    with pytest.raises(ValueError, match="uncompressed"):
        RunSetup.build(RunConfig(algorithm="gd", uplink="topk:k=2"))
    with pytest.raises(ValueError, match="lr"):
        RunConfig(lr="fast")
    with pytest.raises(ValueError, match="too large"):
        RunSetup.build(RunConfig(problem="quadratic:la2=1000,lb2=1", workers=5))
