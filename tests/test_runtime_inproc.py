"""The runtime in one process (``runtime.engine``): rule state round trips, the metrics file and its
cumulative byte counts, divergence, malformed and over-long messages, bad configurations. The
algorithms' own invariants, driven the same way, are in tests/test_algorithms_*.py."""
from __future__ import annotations

import pytest
import torch

from common.config import RunConfig
from common.oracle import gradient_entry, with_gradient
from common.wire import WireError
from runtime.setup import RunSetup
from runtime import protocol
from runtime.server_core import BadUplink, RunFailed, ServerCore
from runtime.engine import run_inproc
from runtime.metrics import MetricsWriter, read_metrics
from runtime.worker_core import WorkerCore
from tests.inproc import drive


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
    recs = read_metrics(str(path))
    assert recs[0]["event"] == "start" and recs[0]["dim"] == 30 and recs[0]["workers"] == 3
    rounds = [r for r in recs if r["event"] == "round"]
    assert [r["round"] for r in rounds] == list(range(7))
    for r in rounds:
        assert len(r["bytes_up"]) == 3 and len(r["bytes_down"]) == 3
        assert {"time_s", "loss", "grad_norm_sq", "compute_s", "compress_s", "comm_s", "round_s"} <= set(r)
    assert rounds[-1]["cum_bytes_up"] == sum(sum(r["bytes_up"]) for r in rounds)
    assert recs[-1]["event"] == "end" and len(recs[-1]["model_sha256"]) == 64


@pytest.mark.parametrize("algorithm,downlink", [("marina-p", "permk"), ("gd", None)], ids=["per-worker", "broadcast"])
def test_cumulative_bytes_are_running_sums_of_the_per_round_bytes(tmp_path, algorithm, downlink):
    """cum_bytes_up/down after round t = the sum over rounds <= t of every worker's bytes_up/down, and
    the end line repeats the totals. d = 62 over 4 workers: Perm-K blocks of 16 and 15 coordinates, so
    the workers' downlinks differ in size; a broadcast is counted once per worker."""
    n = 4
    path = tmp_path / "m.jsonl"
    options = {"downlink": downlink} if downlink else {}
    run_inproc(RunConfig(algorithm=algorithm, workers=n, rounds=25, problem="quadratic:d=62,la2=1,lb2=100", lr="theory", **options),
               str(path), progress=False)
    recs = read_metrics(str(path))
    rounds = [r for r in recs if r["event"] == "round"]
    assert len(rounds) == 25
    up = down = 0
    for r in rounds:
        assert len(r["bytes_up"]) == n and len(r["bytes_down"]) == n
        up, down = up + sum(r["bytes_up"]), down + sum(r["bytes_down"])
        assert (r["cum_bytes_up"], r["cum_bytes_down"]) == (up, down), f"round {r['round']}"
    assert recs[-1]["event"] == "end" and (recs[-1]["cum_bytes_up"], recs[-1]["cum_bytes_down"]) == (up, down)
    if downlink == "permk":
        assert any(len(set(r["bytes_down"])) > 1 for r in rounds)  # different sizes within a round
        assert len({sum(r["bytes_down"]) for r in rounds}) > 1  # synced (dense) and compressed rounds
    else:
        assert all(len(set(r["bytes_down"])) == 1 for r in rounds)


def test_divergence_is_reported_clearly():
    with pytest.raises(RuntimeError, match="diverged"):
        run_inproc(RunConfig(algorithm="gd", workers=2, rounds=400, problem="quadratic:d=10", lr="100"), None, progress=False)


def test_rules_use_the_gradient_only_entry_point_and_the_worker_times_it():
    """A rule's ``grad`` calls the oracle's ``gradient`` where it has one (no loss computed), and the
    worker's ``compute_s`` times that call; an oracle without one is called whole."""
    setup = RunSetup.build(RunConfig(algorithm="gd", workers=2, rounds=1, problem="quadratic:d=10"))
    worker = WorkerCore(setup, 0, torch.device("cpu"))
    calls = []
    whole, gradient = worker.rule.oracle, gradient_entry(worker.rule.oracle)
    assert gradient is not None  # WorkerCore's timed wrapper keeps the problem's entry point
    worker.rule.oracle = with_gradient(lambda x, step: (calls.append("whole"), whole(x, step))[1],
                                       lambda x, step: (calls.append("gradient"), gradient(x, step))[1])
    worker.uplink(0)
    assert calls == ["gradient"] and worker.compute_s > 0
    worker.rule.oracle = lambda x, step: (calls.append("whole"), whole(x, step))[1]
    worker.uplink(1)
    assert calls == ["gradient", "whole"]


def test_malformed_uplink_names_the_worker():
    setup = RunSetup.build(RunConfig(algorithm="gd", workers=2, rounds=1, problem="quadratic:d=10"))
    server = ServerCore(setup, MetricsWriter(None))
    _, good = WorkerCore(setup, 0, torch.device("cpu")).uplink(0)
    bad = list(good)
    bad[-1] = bad[-1][:-3]
    with pytest.raises(BadUplink, match="worker 1") as err:
        server.round(0, [protocol.parse(good), protocol.parse(bad)])
    assert err.value.rank == 1 and isinstance(err.value, RunFailed)  # the server counts worker 1 lost
    assert torch.equal(server.rule.x, setup.x0.float())  # the state is untouched


def test_the_server_decodes_each_uplink_as_it_arrives():
    """``accept`` decodes one worker's UP at once (a malformed one is refused there, naming the
    worker, and not kept); ``round`` then runs on what was accepted, and refuses to run without
    every worker's uplink of that round."""
    setup = RunSetup.build(RunConfig(algorithm="gd", workers=2, rounds=2, problem="quadratic:d=10"))
    server = ServerCore(setup, MetricsWriter(None))
    workers = [WorkerCore(setup, r, torch.device("cpu")) for r in range(2)]
    ups = [protocol.parse(w.uplink(0)[1]) for w in workers]
    server.accept(1, 0, ups[1])
    with pytest.raises(RunFailed, match=r"no uplink from worker\(s\) \[0\]"):
        server.round(0)
    server.accept(1, 0, ups[1])
    frames = list(workers[0].uplink(0)[1])
    bad = protocol.parse(frames[:-1] + [frames[-1][:-3]])  # its values cut short
    with pytest.raises(BadUplink, match="worker 0"):
        server.accept(0, 0, bad)
    with pytest.raises(BadUplink, match="expected UP for round 1"):
        server.accept(0, 1, ups[0])
    server.accept(0, 0, ups[0])
    downs = server.round(0)
    reference = ServerCore(setup, MetricsWriter(None)).round(0, ups)  # all at once: the same downlinks
    assert [[bytes(f) for f in d] for d in downs] == [[bytes(f) for f in d] for d in reference]
    assert server.pending["bytes_up"] == [u.nbytes for u in ups]


def test_the_servers_step_and_encodes_run_with_the_step_threads_and_the_same_downlinks(monkeypatch):
    """``step_threads``: the compiled passes' thread count while the rule steps and the downlinks are
    encoded (the workers wait then), torch's own count before and after, also where the step
    fails; the downlinks' bytes are those of a server without it (a compiled pass gives the same
    bits on any number of threads: GD's mean and step at d = MIN_CHUNK + 3 here). Models shorter
    than ``STEP_THREADS_FROM`` keep torch's count."""
    from common.compressors import cpu_kernels
    from runtime import server_core

    d = cpu_kernels.MIN_CHUNK + 3
    setup = RunSetup.build(RunConfig(algorithm="gd", workers=2, rounds=1, lr="0.1", problem=f"identity-quadratic:d={d}"))
    ups = [protocol.parse(WorkerCore(setup, r, torch.device("cpu")).uplink(0)[1]) for r in range(2)]
    assert ServerCore(setup, MetricsWriter(None), step_threads=3).step_threads is None  # d < STEP_THREADS_FROM
    monkeypatch.setattr(server_core, "STEP_THREADS_FROM", d)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        seen = []
        server = ServerCore(setup, MetricsWriter(None), step_threads=3)
        step = server.rule.step
        server.rule.step = lambda t, msgs: seen.append(cpu_kernels._threads()) or step(t, msgs)
        downs = server.round(0, ups)
        assert seen == [3] and cpu_kernels._threads() == 1
        reference = ServerCore(setup, MetricsWriter(None)).round(0, ups)
        assert [[bytes(f) for f in down] for down in downs] == [[bytes(f) for f in down] for down in reference]
        failing = ServerCore(setup, MetricsWriter(None), step_threads=3)
        failing.rule.step = lambda t, msgs: [None]  # one downlink for two workers
        with pytest.raises(RunFailed, match="returned 1 downlinks"):
            failing.round(0, ups)
        assert cpu_kernels._threads() == 1
    finally:
        torch.set_num_threads(before)


def test_trailing_frames_after_an_up_or_a_down_are_rejected():
    """An UP or a DOWN with a frame after the algorithm's message is malformed: the server names the
    worker and keeps its state; a worker refuses the DOWN and keeps its own."""
    setup = RunSetup.build(RunConfig(algorithm="gd", workers=2, rounds=1, problem="quadratic:d=10"))
    server = ServerCore(setup, MetricsWriter(None))
    workers = [WorkerCore(setup, r, torch.device("cpu")) for r in range(2)]
    ups = [w.uplink(0)[1] for w in workers]
    for extra in (b"", b"extra", ups[1][-1]):
        with pytest.raises(RunFailed, match="worker 1.*trailing"):
            server.round(0, [protocol.parse(ups[0]), protocol.parse(ups[1] + [extra])])
        assert torch.equal(server.rule.x, setup.x0.float())  # the state is untouched
    downs = server.round(0, [protocol.parse(up) for up in ups])
    before = workers[0].rule.x.clone()
    for extra in (b"", b"extra", downs[0][-1]):
        with pytest.raises(WireError, match="trailing"):
            workers[0].downlink(0, protocol.parse(downs[0] + [extra]))
        assert torch.equal(workers[0].rule.x, before)
    workers[0].downlink(0, protocol.parse(downs[0]))  # the DOWN as sent applies
    assert not torch.equal(workers[0].rule.x, before)


def test_bad_configs_are_rejected():
    with pytest.raises(ValueError, match="unknown algorithm"):
        RunSetup.build(RunConfig(algorithm="nope"))
    with pytest.raises(ValueError, match="uncompressed"):
        RunSetup.build(RunConfig(algorithm="gd", uplink="topk:k=2"))
    with pytest.raises(ValueError, match="lr"):
        RunConfig(lr="fast")
    with pytest.raises(ValueError, match="too large"):
        RunSetup.build(RunConfig(problem="quadratic:la2=1000,lb2=1", workers=5))


def test_eval_every_skips_the_evaluation_but_not_the_run(tmp_path):
    """--eval-every 4: loss and gradient norm after rounds 0, 4, 8 and the last; the same model."""
    digests = []
    for k in (1, 4):
        path = str(tmp_path / f"k{k}.jsonl")
        run_inproc(RunConfig(algorithm="ef21", workers=3, rounds=10, problem="quadratic:d=20", eval_every=k), path, progress=False)
        rounds = [r for r in read_metrics(path) if r["event"] == "round"]
        assert [r["round"] for r in rounds if "loss" in r] == ([*range(10)] if k == 1 else [0, 4, 8, 9])
        assert all("bytes_up" in r and "payload_bits_up" in r for r in rounds)
        digests.append(read_metrics(path)[-1]["model_sha256"])
    assert digests[0] == digests[1]
    with pytest.raises(ValueError, match="eval_every"):
        RunConfig(eval_every=0)


@pytest.mark.parametrize("algorithm, uplink", [("cd-adam", "sign"), ("ef21", "topk:ratio=0.1")])
def test_a_rule_that_settles_after_sending_steps_its_model_once_before_anything_reads_it(algorithm, uplink):
    """CD-Adam's mirrored AMSGrad step and EF21's server step wait until the downlinks are sent
    (``ServerRule.settle``): ``round`` leaves the model where it was, and ``record``, the checkpoint's
    snapshot or the next round runs the step exactly once; a rollback drops a pending one. The
    trajectory is the engine's, which settles in ``record``."""
    from runtime import checkpoint

    config = RunConfig(algorithm=algorithm, uplink=uplink, workers=2, rounds=3, problem="quadratic:d=40", lr="0.01")
    reference = [s.rule.model.clone() for _, s, _, _ in drive(config)]
    setup = RunSetup.build(config)
    server = ServerCore(setup, MetricsWriter(None))
    workers = [WorkerCore(setup, rank, torch.device("cpu")) for rank in range(2)]

    def exchange(t):
        downs = server.round(t, [protocol.parse(w.uplink(t)[1]) for w in workers])
        for w, frames in zip(workers, downs):
            w.downlink(t, protocol.parse(frames))

    start = server.rule.model.clone()
    exchange(0)
    assert server.defers and server.unsettled == 0 and torch.equal(server.rule.model, start)
    server.record()
    assert server.unsettled is None and torch.equal(server.rule.model, reference[0])
    server.record()  # once only
    assert torch.equal(server.rule.model, reference[0])
    assert all(torch.equal(w.rule.x, server.rule.model) for w in workers)  # the mirror is the workers' x
    exchange(1)
    snapshot = checkpoint.server_snapshot(server, 2)  # settles before it copies the state
    assert server.unsettled is None and torch.equal(server.rule.model, reference[1])
    exchange(2)  # the next round would settle it; a rollback drops it instead
    checkpoint.restore_server(server, snapshot)
    assert server.unsettled is None and torch.equal(server.rule.model, reference[1])
    server.record()
    assert torch.equal(server.rule.model, reference[1])


@pytest.mark.parametrize("algorithm,uplink,state", [("cd-adam", "sign", "g_hat"), ("ef21", "topk:ratio=0.1", "g_i"),
                                                     ("ef21-sgd", "natural", "g_i")])
def test_a_worker_s_markov_state_moves_after_its_uplink_is_sent_and_before_anything_reads_it(algorithm, uplink, state):
    """h += c waits until the UP is sent (``WorkerRule.settle``): ``uplink`` leaves the state where it
    was, ``settle`` moves it exactly once without touching the message on its way, and the downlink,
    the next uplink or a checkpoint's ``state_dict`` settle first; a rollback drops a pending one.
    The trajectory (server and workers) is the engine's, whichever runs the settle."""
    from runtime import checkpoint

    config = RunConfig(algorithm=algorithm, uplink=uplink, workers=2, rounds=3, problem="quadratic:d=40", lr="0.01")
    reference = [([w.rule.state_dict()[state] for w in ws], s.model_digest()) for _, s, ws, _ in drive(config)]
    setup = RunSetup.build(config)
    server = ServerCore(setup, MetricsWriter(None))
    workers = [WorkerCore(setup, rank, torch.device("cpu")) for rank in range(2)]
    before = [getattr(w.rule, state).clone() for w in workers]
    sent = [w.uplink(0)[1] for w in workers]
    copies = [[bytes(f) for f in frames] for frames in sent]
    assert all(w.unsettled is not None and torch.equal(getattr(w.rule, state), b) for w, b in zip(workers, before))
    workers[0].settle()
    workers[0].settle()  # once only
    assert workers[0].unsettled is None and torch.equal(getattr(workers[0].rule, state), reference[0][0][0])
    assert [bytes(f) for f in sent[0]] == copies[0]  # the frames ZeroMQ may still be sending are untouched
    downs = server.round(0, [protocol.parse(frames) for frames in sent])
    for w, frames in zip(workers, downs):
        w.downlink(0, protocol.parse(frames))  # worker 1 settles here
    server.record()
    assert all(torch.equal(getattr(w.rule, state), r) for w, r in zip(workers, reference[0][0]))
    assert server.model_digest() == reference[0][1]
    for w in workers:
        w.uplink(1)
    saved = [checkpoint.pack_state(w.state_dict()) for w in workers]  # settles before it copies the state
    assert all(w.unsettled is None for w in workers)
    assert all(torch.equal(getattr(w.rule, state), r) for w, r in zip(workers, reference[1][0]))
    workers[0].restore(checkpoint.unpack_state(saved[0], torch.device("cpu")))
    workers[0].uplink(1)
    workers[0].restore(checkpoint.unpack_state(saved[0], torch.device("cpu")))  # drops the pending step
    assert workers[0].unsettled is None and torch.equal(getattr(workers[0].rule, state), reference[1][0][0])


def test_a_rule_without_settle_checks_its_model_before_the_downlinks_are_encoded():
    setup = RunSetup.build(RunConfig(algorithm="gd", workers=2, rounds=1, problem="quadratic:d=10", lr="1e300"))
    server = ServerCore(setup, MetricsWriter(None))
    assert not server.defers
    ups = [protocol.parse(WorkerCore(setup, r, torch.device("cpu")).uplink(0)[1]) for r in range(2)]
    with pytest.raises(RunFailed, match="no longer finite"):
        server.round(0, ups)
