"""Fuzz a live run: honest server and workers train while strangers flood the server with garbage.

    python benchmarks/fuzz_live.py [--messages 100000] [--curve] [--rounds 8000] [--d 200]

A real ``psc server`` and two ``psc worker`` processes run EF21 on loopback. Meanwhile this process
opens 16 connections of its own and sends ``--messages`` malformed messages round-robin: random
bytes, mutated real messages (flipped bytes, cut or repeated frames), other protocol versions, a
payload that claims a dimension of 10^12, messages before any handshake, HELLOs for taken ranks,
heartbeats on the heartbeat path for ranks the stranger does not own, and now and then a frame
larger than the run allows. With ``--curve`` the run is encrypted, admits any key (so the
strangers' messages do reach the server's loop) and the strangers hold keys of their own.

At the end it prints, as JSON: the messages sent, whether the server and workers exited 0, the
run's ``model_sha256`` against an unattacked in-process run of the same configuration, and the
server's memory (VmRSS) before the flood and at its peak. Exit status 0 when the run was unharmed.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time

import zmq

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common.config import RunConfig  # noqa: E402
from common.compressors.payloads import Dense  # noqa: E402
from common.compressors.message import Message  # noqa: E402
from common.wire.stream import UP, Encoded, LinkEncoder, encode_parts  # noqa: E402
from runtime import protocol  # noqa: E402

PSC = [sys.executable, "-m", "psc", "-q"]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class Garbage:
    """Malformed messages of every kind the harness sends, drawn from a seeded generator."""

    def __init__(self, rng: random.Random, d: int):
        self.rng, self.d = rng, d
        import torch

        small = encode_parts(Message({"g": Dense(torch.zeros(4), torch.float32)}))
        tree = copy.deepcopy(small.tree)
        tree[1][1][3] = 10**12  # a dense payload that claims 10^12 values
        self.huge_claim = LinkEncoder(UP).encode(0, Encoded(tree, small.data, small.bits))
        self.real = [
            protocol.pack(b"HELLO", {"version": protocol.VERSION, "rank": -1, "host": "x", "pid": 1}),
            protocol.pack(b"READY", {"rank": 0, "dim": d}),
            protocol.pack(b"STATS", {"t": 0, "compute_s": 0.1, "compress_s": 0.0}),
            LinkEncoder(UP).encode(0, Message({"g": Dense(torch.ones(d), torch.float32)})),
            protocol.pack(b"HEARTBEAT", {"rank": 0}),
            protocol.pack(b"BYE", {"rank": 1, "reason": "x"}),
        ]
        self.kinds = [self.random_bytes, self.mutated, self.wrong_version, self.claims_huge, self.before_handshake,
                      self.taken_rank, self.bad_numbers]

    def random_bytes(self):
        return [self.rng.randbytes(self.rng.randrange(0, 200)) for _ in range(self.rng.randrange(1, 5))]

    def mutated(self):
        frames = [bytearray(f) for f in self.rng.choice(self.real)]
        for _ in range(self.rng.randrange(1, 4)):
            f = self.rng.choice(frames)
            if f:
                f[self.rng.randrange(len(f))] = self.rng.randrange(256)
        if self.rng.random() < 0.3:
            frames = frames[: self.rng.randrange(1, len(frames) + 1)]
        if self.rng.random() < 0.2:
            frames.append(frames[-1])
        return [bytes(f) for f in frames]

    def wrong_version(self):
        frames = list(self.rng.choice(self.real))
        frames[0] = b"PSC" + str(self.rng.randrange(2, 99)).encode()
        return frames

    def claims_huge(self):
        return self.huge_claim

    def before_handshake(self):
        return self.rng.choice(self.real[1:])

    def taken_rank(self):
        return protocol.pack(b"HELLO", {"version": protocol.VERSION, "rank": self.rng.choice([0, 1, -1, 7, -5, "x"])})

    def bad_numbers(self):
        return protocol.pack(b"STATS", {"t": self.rng.choice([0, -1, 2**63, "0", None]), "compute_s": self.rng.choice(["nan", -1.0, float("nan"), "x"])})

    def next(self):
        return self.rng.choice(self.kinds)()


def flood(endpoint: str, messages: int, d: int, stop: threading.Event, server_public: bytes | None, out: dict) -> None:
    """Send ``messages`` garbage messages over 16 connections (2 of them heartbeat-path identities,
    1 without keys when CURVE is on) until done or ``stop``."""
    rng = random.Random(1234)
    garbage = Garbage(rng, d)
    ctx = zmq.Context.instance()
    socks = []
    for i in range(16):
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 1000)
        identity = rng.randbytes(8) + (b"-hb" if i < 2 else b"")
        sock.setsockopt(zmq.IDENTITY, identity)
        if server_public is not None and i != 15:
            public, secret = zmq.curve_keypair()
            sock.curve_secretkey, sock.curve_publickey, sock.curve_serverkey = secret, public, server_public
        sock.connect(endpoint)
        socks.append(sock)
    sent = dropped = oversized = 0
    i, began = 0, time.monotonic()
    while sent < messages and not stop.is_set():
        sock = socks[i % len(socks)]
        i += 1
        if rng.random() < 0.0005:
            frames = [protocol.MAGIC, rng.randbytes(8 * d + (1 << 17))]  # larger than any frame of the run
            oversized += 1
        else:
            frames = garbage.next()
        try:
            sock.send_multipart(frames, flags=zmq.DONTWAIT)
            sent += 1
        except zmq.Again:
            dropped += 1
            if dropped % 1000 == 0:
                time.sleep(0.001)
        for s in socks:  # read and discard the refusals
            while s.poll(0):
                s.recv_multipart()
    for s in socks:
        s.close()
    out.update(sent=sent, not_queued=dropped, oversized=oversized, flood_s=round(time.monotonic() - began, 1))


def reference_digest(config: RunConfig) -> str:
    from runtime.engine import run_inproc

    return run_inproc(config, None, progress=False).model_digest()


def run(messages: int = 100_000, curve: bool = False, rounds: int = 8000, d: int = 200, timeout: float = 900.0) -> dict:
    problem = f"quadratic:d={d}"
    args = ["--problem", problem, "--rounds", str(rounds), "--algorithm", "ef21", "--seed", "11"]
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        endpoint = f"tcp://127.0.0.1:{port}"
        metrics = os.path.join(tmp, "run.jsonl")
        server_args, worker_args, server_public = [], [[], []], None
        if curve:
            for name in ("server", "w0", "w1"):
                subprocess.run([*PSC, "keygen", tmp, "--name", name], check=True, capture_output=True)
            server_args = ["--server-key", os.path.join(tmp, "server.key_secret")]
            worker_args = [["--key", os.path.join(tmp, f"w{i}.key_secret"), "--server-public", os.path.join(tmp, "server.key")] for i in range(2)]
            import zmq.auth

            server_public, _ = zmq.auth.load_certificate(os.path.join(tmp, "server.key"))
        server = subprocess.Popen([*PSC, "server", "--bind", endpoint, "--workers", "2", "--metrics", metrics,
                                   "--timeout", "60", *server_args, *args], stderr=subprocess.PIPE, text=True)
        workers = [subprocess.Popen([*PSC, "worker", "--connect", endpoint, "--device", "cpu", "--rank", str(i), "--timeout", "60",
                                     *worker_args[i]], stderr=subprocess.PIPE, text=True) for i in range(2)]
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (os.path.exists(metrics) and '"round"' in open(metrics).read()):
            time.sleep(0.1)
        rss_before = rss_kib(server.pid)
        peak = [rss_before]
        stop, out = threading.Event(), {}

        def watch():
            while server.poll() is None:
                peak[0] = max(peak[0], rss_kib(server.pid))
                time.sleep(0.1)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        began = time.monotonic()
        fuzzer = threading.Thread(target=flood, args=(endpoint, messages, d, stop, server_public, out), daemon=True)
        fuzzer.start()
        hung = False
        try:
            server_err = server.communicate(timeout=timeout)[1]
        except subprocess.TimeoutExpired:
            hung = True
            server.kill()
            server_err = server.communicate()[1]
        stop.set()
        fuzzer.join()
        fuzz_s = time.monotonic() - began
        codes = []
        for w in workers:
            try:
                codes.append(w.wait(timeout=60))
            except subprocess.TimeoutExpired:
                w.kill()
                codes.append(w.wait())
        end = json.loads(open(metrics).read().strip().splitlines()[-1])
        digest = reference_digest(RunConfig(algorithm="ef21", problem=problem, rounds=rounds, seed=11, workers=2))
        return {
            "curve": curve, "messages_sent": out.get("sent", 0), "not_queued": out.get("not_queued", 0),
            "oversized_frames": out.get("oversized", 0), "flood_seconds": out.get("flood_s"),
            "run_seconds_after_flood_began": round(fuzz_s, 1),
            "server_exit": server.returncode, "server_hung": hung, "worker_exits": codes,
            "ok": end.get("ok"), "same_model_as_unattacked_run": end.get("model_sha256") == digest,
            "server_rss_kib_before": rss_before, "server_rss_kib_peak": peak[0],
            "server_warnings": sum("WARNING" in line for line in server_err.splitlines()),
            "server_last_line": (server_err.strip().splitlines() or [""])[-1][:200],
        }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--curve", action="store_true", help="encrypt the run (any key admitted)")
    parser.add_argument("--rounds", type=int, default=8000, help="long enough to outlast the flood")
    parser.add_argument("--d", type=int, default=200)
    args = parser.parse_args()
    result = run(args.messages, args.curve, args.rounds, args.d)
    print(json.dumps(result, indent=2))
    unharmed = (result["server_exit"] == 0 and not result["server_hung"] and result["worker_exits"] == [0, 0]
                and result["same_model_as_unattacked_run"] and result["messages_sent"] >= args.messages)
    return 0 if unharmed else 1


if __name__ == "__main__":
    sys.exit(main())
