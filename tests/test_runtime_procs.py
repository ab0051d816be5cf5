"""Real processes on loopback: psc server + psc worker, psc launch, failures and refusals."""
from __future__ import annotations

import re
import signal
import time

import pytest

from common.config import RunConfig
from runtime import protocol
from tests import slow_problem
from tests.procs import finish, free_port, kill_all, records, start, wait_for_rounds
from tests.inproc import drive

pytestmark = pytest.mark.procs


def rounds_of(path):
    return [r for r in records(path) if r["event"] == "round"]


def test_server_and_three_workers_run_50_rounds(tmp_path):
    port = free_port()
    metrics = tmp_path / "run.jsonl"
    args = ["--algorithm", "marina-p", "--problem", "quadratic:d=90,la2=1,lb2=100", "--rounds", "50", "--seed", "3"]
    server = start(["server", "--bind", f"tcp://127.0.0.1:{port}", "--workers", "3", "--metrics", str(metrics), "--timeout", "30", *args])
    workers = [start(["worker", "--connect", f"tcp://127.0.0.1:{port}", "--device", "cpu", "--timeout", "30"]) for _ in range(3)]
    try:
        code, _, err = finish(server, 120)
        assert code == 0, err[-2000:]
        for w in workers:
            wcode, _, werr = finish(w, 30)
            assert wcode == 0, werr[-2000:]
    finally:
        kill_all([server, *workers])
    got = rounds_of(metrics)
    assert len(got) == 50
    # The bytes in the metrics are the lengths of the frames: replay the same run in one process and
    # measure the frames it encodes (same seed, same rules, same wire format).
    config = RunConfig(algorithm="marina-p", problem="quadratic:d=90,la2=1,lb2=100", rounds=50, seed=3, workers=3)
    distinct_rounds = 0
    for (t, server_core, _, downs), rec in zip(drive(config), got):
        assert rec["bytes_down"] == [protocol.size(f) for f in downs]
        assert rec["bytes_up"] == server_core.last["bytes_up"]
        assert rec["grad_norm_sq"] == server_core.last["grad_norm_sq"]
        distinct_rounds += len({b"".join(f) for f in downs}) == 3
    assert distinct_rounds > 25  # Perm-K: a different message per worker on the compressed rounds
    up = down = 0
    for rec in got:  # the server's cumulative counts are the running sums of what it sent and received
        up, down = up + sum(rec["bytes_up"]), down + sum(rec["bytes_down"])
        assert (rec["cum_bytes_up"], rec["cum_bytes_down"]) == (up, down), rec["round"]


def test_processes_and_inproc_give_bit_identical_trajectories(tmp_path):
    common = ["--algorithm", "marina-p", "--problem", "quadratic:d=50,la2=2,lb2=200", "--rounds", "30", "--workers", "3", "--seed", "5"]
    procs, inproc = tmp_path / "procs.jsonl", tmp_path / "inproc.jsonl"
    code, _, err = finish(start(["launch", "--engine", "procs", "--device", "cpu", "--metrics", str(procs), *common]), 120)
    assert code == 0, err[-2000:]
    code, _, err = finish(start(["launch", "--engine", "inproc", "--metrics", str(inproc), *common]), 120)
    assert code == 0, err[-2000:]
    a, b = records(procs), records(inproc)
    for ra, rb in zip(a[1:-1], b[1:-1]):
        for key in ("round", "bytes_up", "bytes_down", "loss", "grad_norm_sq", "cum_bytes_up", "cum_bytes_down"):
            assert ra[key] == rb[key], key
    assert a[-1]["model_sha256"] == b[-1]["model_sha256"]


def test_a_killed_worker_stops_the_run_within_the_timeout(tmp_path):
    port = free_port()
    metrics = tmp_path / "run.jsonl"
    server = start(["server", "--bind", f"tcp://127.0.0.1:{port}", "--workers", "3", "--rounds", "1000000",
                    "--problem", "quadratic:d=20", "--metrics", str(metrics), "--timeout", "3", "--heartbeat", "0.2"])
    workers = [start(["worker", "--connect", f"tcp://127.0.0.1:{port}", "--device", "cpu", "--timeout", "20", "--heartbeat", "0.2"]) for _ in range(3)]
    try:
        wait_for_rounds(str(metrics), 5, 60)
        workers[1].send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        code, _, err = finish(server, 30)
        assert code == 1
        assert time.monotonic() - killed_at < 3 + 10  # the timeout, plus poll granularity and exit on a loaded machine
        _, _, killed_err = finish(workers[1], 20)
        rank = int(re.search(r"worker (\d+) of 3", killed_err).group(1))
        # Found silent after the timeout, or sooner: the server's next heartbeat to it finds its connection closed.
        lost = (f"worker {rank} has been silent", "(timeout 3 s)"), (f"worker {rank}'s connection closed",)
        assert any(all(part in err for part in way) for way in lost), err[-2000:]
        for w in (workers[0], workers[2]):
            wcode, _, werr = finish(w, 20)
            assert wcode == 1 and "stopped the run" in werr
    finally:
        kill_all([server, *workers])
    end = records(metrics)[-1]
    assert end["event"] == "end" and end["ok"] is False
    assert any(all(part in end["error"] for part in way) for way in lost), end["error"]


def test_wrong_protocol_version_and_full_server_are_refused(tmp_path):
    port = free_port()
    metrics = tmp_path / "run.jsonl"
    server = start(["server", "--bind", f"tcp://127.0.0.1:{port}", "--workers", "2", "--rounds", "1000000",
                    "--problem", "quadratic:d=20", "--metrics", str(metrics), "--timeout", "10"])
    endpoint = f"tcp://127.0.0.1:{port}"
    workers = []
    try:
        old = start(["worker", "--connect", endpoint, "--protocol-version", "99", "--join-timeout", "30"])
        code, _, err = finish(old, 60)
        assert code == 1 and "refused" in err and "protocol version" in err
        workers = [start(["worker", "--connect", endpoint, "--device", "cpu"]) for _ in range(2)]
        wait_for_rounds(str(metrics), 2, 60)
        extra = start(["worker", "--connect", endpoint, "--join-timeout", "30"])
        code, _, err = finish(extra, 60)
        assert code == 1 and "server is full" in err
        assert server.poll() is None  # the run goes on
    finally:
        kill_all([server, *workers])


def test_cli_usage_errors_exit_2_and_runtime_errors_exit_1(tmp_path):
    code, _, err = finish(start(["launch", "--algorithm", "nosuch", "--rounds", "2"]), 60)
    assert code == 2 and "unknown algorithm" in err
    code, _, err = finish(start(["server", "--problem", "quadratic:d=0"]), 60)
    assert code == 2 and "d=0" in err
    code, _, err = finish(start(["plot", str(tmp_path / "missing.jsonl"), "--x", "round", "--y", "loss", "-o", str(tmp_path / "p.png")]), 60)
    assert code == 2 and "does not exist" in err and "Traceback" not in err  # a missing input file: a usage error
    code, _, err = finish(start(["launch", "--engine", "inproc", "--rounds", "300", "--lr", "100", "--problem", "quadratic:d=10"]), 60)
    assert code == 1 and "diverged" in err and "Traceback" not in err


SLOW = "custom:factory=tests.slow_problem:make"
TRUST_SLOW = {"PSC_WORKER_ALLOW_FACTORY": "tests.slow_problem:make"}  # psc worker --allow-factory, from the environment


@pytest.mark.parametrize("slow_from", [0, 1], ids=["from-round-0", "from-round-1"])
def test_a_worker_busy_past_the_timeout_is_not_declared_dead(tmp_path, slow_from):
    """Liveness is the heartbeat, not the round: a worker whose gradient takes three timeouts while
    its heartbeats arrive is alive, and so is the fast worker that waits for it; whether the worker is
    slow from the start or becomes slow after a fast first round (two rounds: a slow one after either)."""
    timeout, beat, busy = 1.5, 0.3, 4.5
    port = free_port()
    metrics = tmp_path / "run.jsonl"
    liveness = ["--timeout", str(timeout), "--heartbeat", str(beat)]
    server = start(["server", "--bind", f"tcp://127.0.0.1:{port}", "--workers", "2", "--rounds", "2", "--algorithm", "gd",
                    "--problem", SLOW, "--lr", "0.1", "--metrics", str(metrics), *liveness])
    connect = ["worker", "--connect", f"tcp://127.0.0.1:{port}", "--device", "cpu", *liveness]
    slow = start(connect, env={**TRUST_SLOW, slow_problem.ORACLE_SLEEP: str(busy), slow_problem.ORACLE_SLEEP_FROM: str(slow_from)})
    fast = start(connect, env=TRUST_SLOW)
    try:
        code, _, err = finish(server, 180)
        assert code == 0, err[-2000:]
        for w in (slow, fast):
            wcode, _, werr = finish(w, 60)
            assert wcode == 0, werr[-2000:]
    finally:
        kill_all([server, slow, fast])
    got = rounds_of(metrics)
    assert len(got) == 2
    assert all(r["compute_s"] >= busy for r in got[slow_from:])  # the slow worker really was busy past the timeout
    assert slow_from == 0 or got[0]["compute_s"] < busy  # and fast before that
    assert records(metrics)[-1]["ok"] is True


def test_a_worker_busy_building_its_problem_past_the_timeout_is_not_declared_dead(tmp_path):
    """Loading data or building a model may take longer than the timeout; the worker is alive all along."""
    timeout, beat, busy = 1.5, 0.3, 4.5
    port = free_port()
    metrics = tmp_path / "run.jsonl"
    liveness = ["--timeout", str(timeout), "--heartbeat", str(beat)]
    server = start(["server", "--bind", f"tcp://127.0.0.1:{port}", "--workers", "2", "--rounds", "3", "--algorithm", "gd",
                    "--problem", SLOW, "--lr", "0.1", "--metrics", str(metrics), *liveness])
    connect = ["worker", "--connect", f"tcp://127.0.0.1:{port}", "--device", "cpu", *liveness]
    slow = start(connect, env={**TRUST_SLOW, slow_problem.BUILD_SLEEP: str(busy)})
    fast = start(connect, env=TRUST_SLOW)
    try:
        code, _, err = finish(server, 180)
        assert code == 0, err[-2000:]
        for w in (slow, fast):
            wcode, _, werr = finish(w, 60)
            assert wcode == 0, werr[-2000:]
    finally:
        kill_all([server, slow, fast])
    assert len(rounds_of(metrics)) == 3 and records(metrics)[-1]["ok"] is True
