"""What the runtime costs on top of the bytes: a psc round against a plain pyzmq script moving the same bytes.

    python benchmarks/overhead.py [--dims 1e6 1e7] [--workers 2 4] [--rounds 10] [--repeats 3]

``psc``: ``psc launch`` (real processes, loopback) of GD with dense float32 messages both ways on the
identity quadratic of dimension d, the server's evaluation switched off (``--eval-every`` beyond the
run). A figure is the median over rounds 1.. of the metrics' ``round_s``; beside it the medians of its
parts: the slowest worker's gradient (``compute_s``, the problem's own work, which the plain script
does not do) and encode (``compress_s``), the server's decode + rule + encode (``server_s``), and the
rest (``comm_s``: transfer, the worker's decode, Python and ZeroMQ overhead).

``plain``: the same topology without psc: a ROUTER bound on loopback and n DEALER processes; each
round every worker sends one frame of 4 d bytes, the server receives all n, then sends each worker a
frame of 4 d bytes back (no computation). A figure is the median round time seen by the server.

The two are run interleaved ``--repeats`` times so that a busy machine slows both alike; the table
gives the medians and their ratio (psc / plain).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import time

import zmq

PSC = [sys.executable, "-m", "psc", "-q"]


def _plain_worker(endpoint: str, d: int, rounds: int) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.connect(endpoint)
    payload = bytearray(4 * d)
    for _ in range(rounds + 1):
        sock.send(payload, copy=False)
        sock.recv(copy=False)
    sock.close(linger=1000)
    ctx.term()


def plain_round_s(d: int, workers: int, rounds: int) -> float:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    procs = [mp.Process(target=_plain_worker, args=(f"tcp://127.0.0.1:{port}", d, rounds)) for _ in range(workers)]
    for p in procs:
        p.start()
    payload = bytearray(4 * d)
    times = []
    try:
        for _ in range(rounds + 1):  # the first round includes the connections: left out
            began = time.perf_counter()
            peers = [sock.recv_multipart(copy=False)[0].bytes for _ in range(workers)]
            for peer in peers:
                sock.send_multipart([peer, payload], copy=False)
            times.append(time.perf_counter() - began)
    finally:
        for p in procs:
            p.join(60)
        sock.close(linger=0)
        ctx.term()
    return statistics.median(times[1:])


PARTS = ("round_s", "compute_s", "compress_s", "server_s", "comm_s")


def psc_round_s(d: int, workers: int, rounds: int, folder: str) -> dict[str, float]:
    """Medians of the round's time and of its parts (metrics fields; INTERFACE.md)."""
    metrics = os.path.join(folder, "run.jsonl")
    cmd = [*PSC, "launch", "--workers", str(workers), "--device", "cpu", "--algorithm", "gd", "--lr", "0.1",
           "--problem", f"identity-quadratic:d={d}", "--rounds", str(rounds + 1), "--eval-every", str(rounds + 10),
           "--metrics", metrics, "--force"]
    subprocess.run(cmd, check=True)
    with open(metrics) as fh:
        lines = [json.loads(line) for line in fh if '"event": "round"' in line][1:]
    return {k: statistics.median(r[k] for r in lines) for k in PARTS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dims", nargs="+", type=float, default=[1e6, 1e7])
    parser.add_argument("--workers", nargs="+", type=int, default=[2, 4])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print("| d | n | MB per round | plain pyzmq round (s) | psc round (s) | psc / plain | worker gradient (s) "
          "| worker encode (s) | server (s) | rest: transfer, decode, Python (s) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        for d in map(int, args.dims):
            for n in args.workers:
                plain, ours = [], []
                for _ in range(args.repeats):
                    plain.append(plain_round_s(d, n, args.rounds))
                    ours.append(psc_round_s(d, n, args.rounds, folder))
                p = statistics.median(plain)
                o = {k: statistics.median(r[k] for r in ours) for k in PARTS}
                print(f"| {d:.0e} | {n} | {2 * n * 4 * d / 1e6:.0f} | {p:.4f} | {o['round_s']:.4f} | "
                      f"{o['round_s'] / p:.1f} | {o['compute_s']:.4f} | {o['compress_s']:.4f} | {o['server_s']:.4f} | "
                      f"{o['comm_s']:.4f} |", flush=True)

if __name__ == "__main__":
    main()
