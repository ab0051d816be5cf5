"""What encryption costs: the round time of a dense run with and without CURVE.

    python benchmarks/curve_cost.py [--dims 1e6 1e7] [--workers 2] [--rounds 10] [--repeats 3]

Each run is ``psc launch`` (real processes, loopback) of GD with uncompressed messages on the
identity quadratic of dimension d, once plain and once with ``--server-key`` (every socket
encrypted with CurveZMQ), interleaved ``--repeats`` times so that a busy machine slows both alike.
A figure is the median of the runs' median ``round_s`` (round 0 left out). Prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

PSC = [sys.executable, "-m", "psc", "-q"]


def median_round_s(metrics: str) -> float:
    with open(metrics) as fh:
        rounds = [json.loads(line) for line in fh if '"event": "round"' in line]
    return statistics.median(r["round_s"] for r in rounds[1:])


def one_run(d: int, workers: int, rounds: int, folder: str, key: str | None, tag: str) -> float:
    metrics = os.path.join(folder, f"{tag}.jsonl")
    if os.path.exists(metrics):
        os.remove(metrics)
    cmd = [*PSC, "launch", "--workers", str(workers), "--device", "cpu", "--algorithm", "gd", "--lr", "0.1",
           "--problem", f"identity-quadratic:d={d}", "--rounds", str(rounds), "--metrics", metrics]
    if key:
        cmd += ["--server-key", key]
    subprocess.run(cmd, check=True)
    return median_round_s(metrics)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dims", nargs="+", type=float, default=[1e6, 1e7])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        subprocess.run([*PSC, "keygen", folder, "--name", "server"], check=True, capture_output=True)
        key = os.path.join(folder, "server.key_secret")
        print(f"| d | n | MB per round | plain round (s) | CURVE round (s) | CURVE / plain |")
        print("|---|---|---|---|---|---|")
        for d in map(int, args.dims):
            plain, curve = [], []
            for i in range(args.repeats):
                plain.append(one_run(d, args.workers, args.rounds, folder, None, f"plain{i}"))
                curve.append(one_run(d, args.workers, args.rounds, folder, key, f"curve{i}"))
            p, c = statistics.median(plain), statistics.median(curve)
            mb = 2 * args.workers * 4 * d / 1e6
            print(f"| {d:.0e} | {args.workers} | {mb:.0f} | {p:.3f} | {c:.3f} | {c / p:.2f} |", flush=True)


if __name__ == "__main__":
    main()
