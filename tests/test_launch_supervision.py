"""``psc launch`` supervises its workers: signals are forwarded and every child is gone within
seconds (checked in the process table), a failed worker is reported with its exit status at once."""
from __future__ import annotations

import os
import signal
import time

import pytest

from tests.procs import finish, kill_all, records, start, wait_for_rounds

pytestmark = pytest.mark.procs

LONG_RUN = ["launch", "--workers", "3", "--device", "cpu", "--rounds", "1000000", "--problem", "quadratic:d=20",
            "--heartbeat", "0.2"]


def children_of(pid: int) -> set[int]:
    """PIDs whose parent is ``pid``, read from the process table (/proc)."""
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    stat = fh.read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.add(int(entry))
    return found


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("signum,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_stops_launch_and_every_worker_within_seconds(tmp_path, signum, code):
    metrics = tmp_path / "run.jsonl"
    launcher = start([*LONG_RUN, "--metrics", str(metrics)])
    try:
        wait_for_rounds(str(metrics), 3, 120)
        workers = children_of(launcher.pid)
        assert len(workers) == 3
        launcher.send_signal(signum)
        sent = time.monotonic()
        got, _, err = finish(launcher, 30)
        assert got == code, err[-2000:]
        while any(alive(pid) for pid in workers) and time.monotonic() - sent < 5:
            time.sleep(0.05)
        assert not any(alive(pid) for pid in workers), "a worker outlived the launcher by 5 s"
        # The launcher exits after its children; on a machine loaded six times over it was seen taking 8 s.
        assert time.monotonic() - sent < 15
    finally:
        kill_all([launcher])
    end = records(metrics)[-1]
    name = signal.Signals(signum).name
    assert end["event"] == "end" and end["ok"] is False and end["signal"] == name and name in end["error"]


def test_a_worker_that_dies_is_named_with_its_exit_status_at_once(tmp_path):
    metrics = tmp_path / "run.jsonl"
    launcher = start([*LONG_RUN, "--metrics", str(metrics), "--timeout", "60"])
    try:
        wait_for_rounds(str(metrics), 3, 120)
        victim = sorted(children_of(launcher.pid))[1]
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        got, _, err = finish(launcher, 60)
        assert got == 1
        assert time.monotonic() - killed < 20  # not the 60 s liveness timeout
        assert "was killed by SIGKILL" in err
    finally:
        kill_all([launcher])
    end = records(metrics)[-1]
    assert end["ok"] is False and "SIGKILL" in end["error"]


@pytest.mark.parametrize("device,caller_threads,server_threads,worker_threads",
                         [("cpu", 6, 3, "4"), ("cpu", 2, 2, "4"), ("cuda:0", 6, 6, None)])
def test_cpu_workers_and_the_server_share_the_cores(monkeypatch, device, caller_threads, server_threads, worker_threads):
    """With CPU workers each worker gets cores // N threads (OMP_NUM_THREADS) and the server, in the
    launching process, cores // (N + 1) torch threads (never more than the caller had), put back
    after the run; GPU workers leave both alone. Server and workers are stand-ins: only the
    launcher's decisions are looked at."""
    import torch

    import psserver.server
    from common.config import RunConfig
    from psc import launch as launcher

    seen: dict = {"omp": []}

    class Server:
        endpoint = "tcp://127.0.0.1:1"

        def __init__(self, *args, **kwargs):
            pass

        def run(self):
            seen["server_threads"] = torch.get_num_threads()
            return 0

    class Worker:
        def __init__(self, rank, argv, env, restarts=0):
            seen["omp"].append(env.get("OMP_NUM_THREADS"))

        def failure(self):
            return None

    monkeypatch.setattr(psserver.server, "Server", Server)
    monkeypatch.setattr(launcher, "WorkerProcess", Worker)
    monkeypatch.setattr(launcher, "wait_all", lambda workers, deadline_s: [])
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 12)
    before = torch.get_num_threads()
    torch.set_num_threads(caller_threads)
    try:
        config = RunConfig(problem="identity-quadratic:d=10", workers=3, rounds=1, algorithm="gd", lr="0.1")
        assert launcher.launch(config, None, device=device, progress=False) == 0
        assert seen["omp"] == [worker_threads] * 3
        assert seen["server_threads"] == server_threads
        assert torch.get_num_threads() == caller_threads
    finally:
        torch.set_num_threads(before)


def test_a_closed_connection_waits_for_the_supervisor_to_name_the_dead_process():
    """The kernel closes a dying worker's socket just before its exit status can be read: a send that
    finds the connection closed lets the supervisor look again (its RunFailed names the exit), and
    goes on to the plain "connection closed" loss once the supervisor has restarted the process, or
    after ``EXIT_REPORT_S`` when it finds nothing."""
    import psserver.server as server_module
    from psserver.server import Server, WorkerLost
    from runtime.server_core import RunFailed

    class Closed:
        def send(self, identity, frames, must=False):
            return False

    def bare(supervise):
        server = Server.__new__(Server)
        server.transport, server.rank_of, server.supervise = Closed(), {b"w1": 1}, supervise
        return server

    calls = []

    def dies_on_third_look():
        calls.append(time.monotonic())
        if len(calls) == 3:
            raise RunFailed("worker 1 was killed by SIGKILL")
        return False

    with pytest.raises(RunFailed, match="killed by SIGKILL"):
        bare(dies_on_third_look)._send(b"w1", [b""])
    assert len(calls) == 3

    restarted = []
    with pytest.raises(WorkerLost, match="connection closed"):
        bare(lambda: restarted.append(1) or True)._send(b"w1", [b""])
    assert restarted == [1]  # no waiting once the process was started again

    began = time.monotonic()
    with pytest.raises(WorkerLost, match="connection closed"):
        bare(lambda: False)._send(b"w1", [b""])
    assert server_module.EXIT_REPORT_S <= time.monotonic() - began < server_module.EXIT_REPORT_S + 2
