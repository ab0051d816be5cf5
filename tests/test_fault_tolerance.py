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
import time

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


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as fh:
            return [int(p) for p in fh.read().split()]
    except OSError:
        return []


# Kills come at a random round below 140; the run goes on well past that (a round takes about 3 ms
# here, and the test sees the rounds every 0.1 s), so that the kill lands in a running launch: with
# 150 rounds a kill drawn near 140 could arrive after the run had ended, and nothing was restarted.
LAUNCH_ROUNDS = 400
LAUNCH = CASES["ef21-topk-both"][:-1] + [str(LAUNCH_ROUNDS)]


def _launch(tmp_path, *extra):
    from tests.procs import start

    return start(["launch", "--workers", "2", "--device", "cpu", "--seed", "3", *LAUNCH, "--metrics", str(tmp_path / "run.jsonl"),
                  "--checkpoint-every", "10", "--timeout", "20", "--heartbeat", "0.2", "-q", *extra])


def _check_run(tmp_path, code, err):
    from tests.procs import records

    assert code == 0, err[-3000:]
    got = records(str(tmp_path / "run.jsonl"))
    assert [r["round"] for r in got if r["event"] == "round"] == list(range(LAUNCH_ROUNDS))
    assert got[-1]["event"] == "end" and got[-1]["model_sha256"] == reference_sha(LAUNCH, 3, workers=2)
    # The workers' states travel at each checkpoint: 2 workers x (x, g_i, g_down) x 40 float32 at least;
    # other rounds carry only telemetry and heartbeats.
    control = {r["round"]: r["control_bytes"] for r in got if r["event"] == "round"}
    assert control[25] < 2 * 3 * 40 * 4 <= control[20]


def test_launch_restarts_a_worker_killed_with_minus_nine(tmp_path):
    import signal

    from tests.procs import finish, kill_all, wait_for_rounds

    launch = _launch(tmp_path, "--checkpoint", str(tmp_path / "ck"))
    try:
        wait_for_rounds(str(tmp_path / "run.jsonl"), random.randrange(5, 140), 60)
        victim = random.choice(_children(launch.pid))
        os.kill(victim, signal.SIGKILL)
        code, _, err = finish(launch, 90)
    finally:
        kill_all([launch])
    assert "starting it again (restart 1 of 3)" in err
    _check_run(tmp_path, code, err)


def test_launch_resume_after_the_whole_launch_was_killed(tmp_path):
    import signal

    from tests.procs import finish, kill_all, wait_for_rounds

    launch = _launch(tmp_path, "--checkpoint", str(tmp_path / "ck"))
    try:
        wait_for_rounds(str(tmp_path / "run.jsonl"), random.randrange(12, 140), 60)
        children = _children(launch.pid)
        launch.send_signal(signal.SIGKILL)
        for pid in children:
            os.kill(pid, signal.SIGKILL)
        launch.communicate()
        again = _launch(tmp_path, "--resume", str(tmp_path / "ck"))
        code, _, err = finish(again, 90)
    finally:
        kill_all([launch])
    _check_run(tmp_path, code, err)


def test_a_worker_that_sends_a_malformed_uplink_is_disconnected_and_replaced(tmp_path):
    """A registered peer whose uplink cannot be decoded is told why (STOP), loses its rank, and the
    run rolls back; an honest worker takes the rank and the model is that of an unattacked run."""
    import zmq

    from runtime import protocol
    from runtime.setup import RunSetup
    from runtime.worker_core import WorkerCore
    from common.config import RunConfig
    from tests.procs import finish, free_port, kill_all, records, register_by_hand, start

    import torch

    run = ["--algorithm", "ef21", "--problem", "quadratic:d=40", "--lr", "0.01", "--rounds", "30"]
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    metrics = str(tmp_path / "run.jsonl")
    server = start(["server", "--bind", endpoint, "--workers", "2", "--seed", "7", *run, "--metrics", metrics,
                    "--checkpoint", str(tmp_path / "ck"), "--checkpoint-every", "5", "--timeout", "20",
                    "--heartbeat", "0.2", "--rejoin-timeout", "60", "-q"])
    honest = start(["worker", "--connect", endpoint, "--device", "cpu", "--rank", "1", "--timeout", "60", "--heartbeat", "0.2"])
    procs = [server, honest]
    rogue = zmq.Context.instance().socket(zmq.DEALER)
    rogue.setsockopt(zmq.LINGER, 0)
    rogue.connect(endpoint)
    try:
        welcome = register_by_hand(rogue, 0, 40)
        config = RunConfig.from_dict(welcome.header["config"])
        stats, up = WorkerCore(RunSetup.build(config), 0, torch.device("cpu")).uplink(0)
        rogue.send_multipart(stats)
        rogue.send_multipart([*up[:-1], up[-1][:-3]])  # its values cut short
        stop = None
        deadline = time.monotonic() + 60
        while stop is None and time.monotonic() < deadline:
            if rogue.poll(1000):
                msg = protocol.parse(rogue.recv_multipart())
                stop = msg if msg.kind == b"STOP" else None
        assert stop is not None and not stop.header["ok"] and "malformed uplink from worker 0" in stop.header["reason"]
        replacement = start(["worker", "--connect", endpoint, "--device", "cpu", "--rank", "0", "--timeout", "60",
                             "--heartbeat", "0.2"])
        procs.append(replacement)
        code, _, err = finish(server, 120)
        assert code == 0, err[-3000:]
        assert "worker 0 is disconnected" in err
        assert finish(honest, 30)[0] == 0 and finish(replacement, 30)[0] == 0
    finally:
        rogue.close()
        kill_all(procs)
    got = records(metrics)
    assert [r["round"] for r in got if r["event"] == "round"] == list(range(30))
    assert got[-1]["model_sha256"] == reference_sha(run, 7, workers=2)
