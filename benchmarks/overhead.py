"""What the runtime costs on top of the bytes: a psc round against a plain pyzmq script moving the same bytes.

    python benchmarks/overhead.py [--dims 1e6 1e7] [--workers 2 4] [--methods dense sign topk]
                                  [--rounds 10] [--repeats 3] [--device cpu|cuda]

``psc``: ``psc launch`` (real processes, loopback) of a method on the identity quadratic of dimension
d, the server's evaluation switched off (``--eval-every`` beyond the run), the workers on ``--device``
(the server's vectors stay on the CPU; with ``cuda`` every worker computes, compresses and packs on
the GPU and only packed bytes cross to the host):

  dense   GD, dense float32 both ways
  sign    CD-Adam, scaled sign both ways (1 bit a coordinate)
  topk    EF21, Top-1% both ways (values and Golomb-Rice coded indices)

A figure is the median over rounds 1.. of the metrics' ``round_s``; beside it the medians of its
parts: the slowest worker's gradient (``compute_s``, the problem's own work, which the plain script
does not do) and its compress + encode (``compress_s``), the server's critical path from the last
uplink's arrival (its decode, the rule, the encodes: ``server_s``), and the rest (``comm_s``: transfer,
the worker's decode, Python and ZeroMQ overhead). ``psc - gradient`` is the round without the
problem's own work: what the runtime and the codecs cost.

``plain``: the same topology without psc: a ROUTER bound on loopback and n DEALER processes; each
round every worker sends one frame as long as psc's uplink of that run (the median of
``bytes_up``), the server receives all n, then sends each worker a frame as long as psc's downlink
(``bytes_down``); no computation. A figure is the median round time seen by the server. Its
processes get the same allocator setting as every psc process (``runtime.allocator``: freed memory
is kept for the next round), so that the comparison is of the two programs, not of two mallocs;
without it the plain script's 40 MB receive buffers fault in fresh pages each round.

The two are run interleaved ``--repeats`` times (psc first: its byte counts size the plain run) so
that a busy machine slows both alike; the table gives the medians and their ratios.
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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from runtime.allocator import keep_freed_memory  # noqa: E402

PSC = [sys.executable, "-m", "psc", "-q"]
METHODS = {
    "dense": ["--algorithm", "gd", "--lr", "0.1"],
    "sign": ["--algorithm", "cd-adam", "--lr", "0.001", "--uplink", "sign", "--downlink", "sign"],
    "topk": ["--algorithm", "ef21", "--lr", "0.1", "--uplink", "topk:ratio=0.01", "--downlink", "topk:ratio=0.01"],
}


def _plain_worker(endpoint: str, up_bytes: int, rounds: int) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.connect(endpoint)
    payload = bytearray(up_bytes)
    for _ in range(rounds + 1):
        sock.send(payload, copy=False)
        sock.recv(copy=False)
    sock.close(linger=1000)
    ctx.term()


def plain_round_s(up_bytes: int, down_bytes: int, workers: int, rounds: int) -> float:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    procs = [mp.Process(target=_plain_worker, args=(f"tcp://127.0.0.1:{port}", up_bytes, rounds)) for _ in range(workers)]
    for p in procs:
        p.start()
    payload = bytearray(down_bytes)
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


def launch_command(method: str, d: int, workers: int, rounds: int, metrics: str, device: str = "cpu") -> list[str]:
    """``psc launch`` of ``method`` on the identity quadratic of dimension d, without evaluations."""
    return [*PSC, "launch", "--workers", str(workers), "--device", device, *METHODS[method],
            "--problem", f"identity-quadratic:d={d}", "--rounds", str(rounds), "--eval-every", str(rounds + 10),
            "--metrics", metrics, "--force"]


def psc_round(method: str, d: int, workers: int, rounds: int, folder: str, device: str = "cpu") -> dict[str, float]:
    """Medians of the round's time and of its parts, and the bytes of one uplink and one downlink
    (metrics fields; INTERFACE.md)."""
    metrics = os.path.join(folder, "run.jsonl")
    # run from this checkout (``-m psc`` looks in the working folder first), so that two checkouts compare
    subprocess.run(launch_command(method, d, workers, rounds + 1, metrics, device), check=True, cwd=ROOT)
    with open(metrics) as fh:
        lines = [json.loads(line) for line in fh if '"event": "round"' in line][1:]
    out = {k: statistics.median(r[k] for r in lines) for k in PARTS}
    out["up"] = int(statistics.median(b for r in lines for b in r["bytes_up"]))
    out["down"] = int(statistics.median(b for r in lines for b in r["bytes_down"]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dims", nargs="+", type=float, default=[1e6, 1e7])
    parser.add_argument("--workers", nargs="+", type=int, default=[2, 4])
    parser.add_argument("--methods", nargs="+", choices=sorted(METHODS), default=["dense"])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="the workers' device: cpu, cuda or cuda:K")
    args = parser.parse_args()
    keep_freed_memory()  # the plain script's server is this process; its workers are forked from it
    print("| method | d | n | bytes up / down per worker | plain pyzmq round (s) | psc round (s) | psc / plain "
          "| psc - gradient (s) | (psc - gradient) / plain | worker gradient (s) | worker compress + encode (s) "
          "| server (s) | rest: transfer, decode, Python (s) |")
    print("|---" * 13 + "|")
    with tempfile.TemporaryDirectory() as folder:
        for method in args.methods:
            for d in map(int, args.dims):
                for n in args.workers:
                    plain, ours = [], []
                    for _ in range(args.repeats):
                        ours.append(psc_round(method, d, n, args.rounds, folder, args.device))
                        plain.append(plain_round_s(ours[-1]["up"], ours[-1]["down"], n, args.rounds))
                    p = statistics.median(plain)
                    o = {k: statistics.median(r[k] for r in ours) for k in (*PARTS, "up", "down")}
                    lean = o["round_s"] - o["compute_s"]
                    print(f"| {method} | {d:.0e} | {n} | {o['up']:,.0f} / {o['down']:,.0f} | {p:.4f} | {o['round_s']:.4f} | "
                          f"{o['round_s'] / p:.2f} | {lean:.4f} | {lean / p:.2f} | {o['compute_s']:.4f} | "
                          f"{o['compress_s']:.4f} | {o['server_s']:.4f} | {o['comm_s']:.4f} |", flush=True)


if __name__ == "__main__":
    main()
