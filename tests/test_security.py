"""Hostile peers on loopback: a rogue server, a stolen routing identity, a hung worker, workers
without the right CURVE keys, and what an eavesdropper sees of an encrypted run."""
from __future__ import annotations

import os
import time

import msgpack
import pytest
import zmq

from benchmarks.relay import RateLimitedRelay
from common.config import RunConfig
from runtime import protocol
from runtime.engine import run_inproc
from runtime.setup import RunSetup
from runtime.worker_core import WorkerCore
from tests import slow_problem
from tests.procs import finish, free_port, kill_all, records, register_by_hand, start

pytestmark = pytest.mark.procs

RUN = ["--problem", "quadratic:d=40", "--rounds", "30", "--seed", "7", "--algorithm", "ef21"]


def welcome_from_a_rogue_server(port: int, problem: str) -> None:
    """Answer the first HELLO on ``port`` with a WELCOME whose problem is ``problem``."""
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(f"tcp://127.0.0.1:{port}")
    try:
        assert sock.poll(60_000), "the worker never said HELLO"
        identity, *frames = sock.recv_multipart()
        assert protocol.parse(frames).kind == b"HELLO"
        config = {**RunConfig().to_dict(), "problem": problem, "workers": 1}
        sock.send_multipart([identity, *protocol.pack(b"WELCOME", {"rank": 0, "config": config, "dim": 4})])
        sock.poll(10_000)  # the BYE, if any
    finally:
        sock.close()


@pytest.mark.parametrize("problem,refusal", [
    ("custom:factory=os:system,command=touch {mark}", "--allow-factory os:system"),
    ("custom:factory=tests.slow_problem:make", "--allow-factory tests.slow_problem:make"),
    ("mlp:dataset=cifar10,data_dir=/etc", "--allow-data-dir /etc"),
    ("mlp:dataset=libsvm,file=../../etc/passwd", "outside the folders"),
])
def test_a_rogue_server_cannot_make_a_worker_import_code_or_read_files(tmp_path, problem, refusal):
    mark = tmp_path / "ran"
    port = free_port()
    worker = start(["worker", "--connect", f"tcp://127.0.0.1:{port}", "--device", "cpu", "--join-timeout", "60"], cwd=tmp_path)
    try:
        welcome_from_a_rogue_server(port, problem.format(mark=mark))
        code, _, err = finish(worker, 60)
    finally:
        kill_all([worker])
    assert code == 1 and refusal in err and "Traceback" not in err, err[-2000:]
    assert not mark.exists()


def test_a_worker_runs_a_factory_its_own_command_line_allows(tmp_path):
    port = free_port()
    problem = "custom:factory=tests.slow_problem:make"
    server = start(["server", "--bind", f"tcp://127.0.0.1:{port}", "--workers", "1", "--problem", problem,
                    "--rounds", "3", "--lr", "0.1", "--metrics", str(tmp_path / "m.jsonl")])
    worker = start(["worker", "--connect", f"tcp://127.0.0.1:{port}", "--device", "cpu", "--allow-factory", "tests.slow_problem:make"])
    try:
        code, _, err = finish(server, 120)
        assert code == 0, err[-2000:]
        assert finish(worker, 60)[0] == 0
    finally:
        kill_all([server, worker])


def uplink_frames(config: RunConfig, rank: int) -> list[bytes]:
    """A well-formed round-0 UP of worker ``rank``, made the way a worker makes it."""
    import torch

    return WorkerCore(RunSetup.build(config), rank, torch.device("cpu")).uplink(0)[1]


def test_a_reused_routing_identity_is_not_taken_for_the_crashed_worker(tmp_path):
    port = free_port()
    endpoint = f"tcp://127.0.0.1:{port}"
    metrics = tmp_path / "run.jsonl"
    server = start(["server", "--bind", endpoint, "--workers", "2", "--metrics", str(metrics), *RUN,
                    "--timeout", "6", "--heartbeat", "0.2"])
    honest = start(["worker", "--connect", endpoint, "--device", "cpu", "--rank", "1", "--timeout", "30"])
    ctx = zmq.Context.instance()
    victim = ctx.socket(zmq.DEALER)
    victim.setsockopt(zmq.IDENTITY, b"the-victim")
    victim.setsockopt(zmq.LINGER, 0)
    victim.connect(endpoint)
    try:
        register_by_hand(victim, 0, 40)
        victim.close()  # the worker crashes ...
        thief = ctx.socket(zmq.DEALER)  # ... and another connection claims its routing identity at once
        thief.setsockopt(zmq.IDENTITY, b"the-victim")
        thief.setsockopt(zmq.LINGER, 0)
        thief.connect(endpoint)
        config = RunConfig(**{**RunConfig().to_dict(), "problem": "quadratic:d=40", "rounds": 30, "seed": 7,
                              "algorithm": "ef21", "workers": 2})
        up = uplink_frames(config, 0)
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline and server.poll() is None:
            thief.send_multipart(up)
            thief.send_multipart(protocol.pack(b"HEARTBEAT", {"rank": 0}))
            time.sleep(0.2)
        thief.close()
        code, _, err = finish(server, 60)
    finally:
        kill_all([server, honest])
    assert code == 1, err[-2000:]
    # Either the closed connection is noticed first, or the thief's connection is told apart from it.
    assert "worker 0's connection closed" in err or "not worker 0's" in err
    assert "worker 0" in records(metrics)[-1]["error"]
    assert not [r for r in records(metrics) if r["event"] == "round"]  # the thief's uplink was never used


def test_a_worker_hung_in_its_gradient_is_lost_within_the_round_deadline(tmp_path):
    port = free_port()
    endpoint = f"tcp://127.0.0.1:{port}"
    metrics = tmp_path / "run.jsonl"
    problem = "custom:factory=tests.slow_problem:make"
    server = start(["server", "--bind", endpoint, "--workers", "2", "--metrics", str(metrics), "--problem", problem,
                    "--rounds", "1000", "--lr", "0.1", "--timeout", "120", "--heartbeat", "0.2", "--round-timeout", "8"])
    allow = {"PSC_WORKER_ALLOW_FACTORY": "tests.slow_problem:make"}
    workers = [
        start(["worker", "--connect", endpoint, "--device", "cpu", "--rank", "0", "--heartbeat", "0.2"], env=allow),
        start(["worker", "--connect", endpoint, "--device", "cpu", "--rank", "1", "--heartbeat", "0.2"],
              env={**allow, slow_problem.ORACLE_SLEEP: "3600"}),  # heartbeats go on, the gradient never ends
    ]
    try:
        began = time.monotonic()
        code, _, err = finish(server, 120)
        took = time.monotonic() - began
    finally:
        kill_all([server, *workers])
    assert code == 1 and "round timeout" in err, err[-2000:]
    assert took < 60  # the round deadline, not the 120 s liveness timeout
    end = records(metrics)[-1]
    assert end["ok"] is False and "worker(s) 1 " in end["error"]


def keygen(folder, name) -> tuple[str, str]:
    code, _, err = finish(start(["keygen", str(folder), "--name", name]), 60)
    assert code == 0, err
    return str(folder / f"{name}.key"), str(folder / f"{name}.key_secret")


def test_curve_keeps_out_workers_without_the_right_keys_and_the_run_is_unchanged(tmp_path):
    keys, allowed = tmp_path / "keys", tmp_path / "allowed"
    server_public, server_secret = keygen(keys, "server")
    honest = [keygen(keys, f"worker{i}") for i in range(2)]
    _, stranger_secret = keygen(keys, "stranger")
    _, rogue_server_secret = keygen(keys, "rogue")
    allowed.mkdir()
    for public, _ in honest:
        os.link(public, allowed / os.path.basename(public))
    port = free_port()
    endpoint = f"tcp://127.0.0.1:{port}"
    metrics = tmp_path / "run.jsonl"
    server = start(["server", "--bind", endpoint, "--workers", "2", "--metrics", str(metrics), *RUN,
                    "--server-key", server_secret, "--allow", str(allowed)])
    wrong_server_key = str(keys / "rogue.key")
    intruders = [
        # holds the server's public key, but its own key is not allowed
        start(["worker", "--connect", endpoint, "--key", stranger_secret, "--server-public", server_public, "--join-timeout", "8"]),
        # an allowed worker's key, but it expects another server
        start(["worker", "--connect", endpoint, "--key", honest[0][1], "--server-public", wrong_server_key, "--join-timeout", "8"]),
        # no keys at all
        start(["worker", "--connect", endpoint, "--join-timeout", "8"]),
    ]
    time.sleep(3)  # the intruders knock first
    workers = [start(["worker", "--connect", endpoint, "--device", "cpu", "--key", secret, "--server-public", server_public])
               for _, secret in honest]
    try:
        code, _, err = finish(server, 120)
        assert code == 0, err[-2000:]
        for w in workers:
            assert finish(w, 60)[0] == 0
        for intruder in intruders:
            icode, _, ierr = finish(intruder, 60)
            assert icode == 1 and "no word from the server" in ierr
        assert err.count("refused a peer whose CURVE key") == 1  # the stranger, logged once however often it knocks
    finally:
        kill_all([server, *workers, *intruders])
    reference = run_inproc(RunConfig(problem="quadratic:d=40", rounds=30, seed=7, algorithm="ef21", workers=2), None, progress=False)
    assert records(metrics)[-1]["model_sha256"] == reference.model_digest()


def captured_run(tmp_path, curve: bool) -> bytes:
    keys = tmp_path / ("keys" if curve else "none")
    port = free_port()
    relay = RateLimitedRelay(port, mbit_per_s=1e6, record=True)  # no useful limit: it records
    server_args, worker_args = [], []
    if curve:
        server_public, server_secret = keygen(keys, "server")
        _, worker_secret = keygen(keys, "worker")
        server_args = ["--server-key", server_secret]
        worker_args = ["--key", worker_secret, "--server-public", server_public]
    server = start(["server", "--bind", f"tcp://127.0.0.1:{port}", "--workers", "1", "--problem", "quadratic:d=64",
                    "--rounds", "5", "--algorithm", "gd", *server_args])
    worker = start(["worker", "--connect", f"tcp://127.0.0.1:{relay.port}", "--device", "cpu", *worker_args])
    try:
        assert finish(server, 120)[0] == 0
        assert finish(worker, 60)[0] == 0
    finally:
        kill_all([server, worker])
        relay.close()
    return bytes(relay.seen)


def test_an_eavesdropper_sees_no_plaintext_of_a_curve_run(tmp_path):
    gradient = uplink_frames(RunConfig(problem="quadratic:d=64", workers=1, algorithm="gd"), 0)[-1][:32]  # round 0's float32 values
    plain = captured_run(tmp_path, curve=False)
    # (not the kind names: READY, WELCOME and HELLO are also the names of CurveZMQ's handshake commands)
    markers = [protocol.MAGIC, msgpack.packb("config"), msgpack.packb("algorithm"), msgpack.packb("quadratic:d=64"), gradient]
    assert all(m in plain for m in markers)  # the capture does see what travels in plaintext
    secret = captured_run(tmp_path, curve=True)
    assert len(secret) > 64 * 4 * 5  # the run did travel through the relay
    assert not [m for m in markers if m in secret]


def test_a_live_run_survives_a_flood_of_malformed_messages():
    from benchmarks.fuzz_live import run

    result = run(messages=3000, rounds=1500, d=50, timeout=300)
    assert result["messages_sent"] == 3000 and not result["server_hung"], result
    assert result["server_exit"] == 0 and result["worker_exits"] == [0, 0] and result["ok"], result
    assert result["same_model_as_unattacked_run"], result
    assert result["server_warnings"] <= 40, result  # logged once per peer, not once per message
