"""Time per round of ResNet-18 on CIFAR-sized input (3x32x32), GPU against CPU, with the in-process
engine (the same rules and wire format as the real processes).

No data set is downloaded: the script writes random images in the real CIFAR-10 python-batch format to
a temporary folder and reads them through the project's reader. Each device runs ``--rounds`` rounds
after one warm-up round; the server's evaluation is switched off (``eval_every`` beyond the run), so a
round is: every worker's forward/backward on its minibatch, compression, encode/decode, the server rule.

    python benchmarks/bench_resnet18_round.py                    # cpu and, when present, cuda
    python benchmarks/bench_resnet18_round.py --devices cuda --workers 3 --rounds 20 --batch 128
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common.config import RunConfig  # noqa: E402
from common.problems.datasets import CIFAR_TEST, CIFAR_TRAIN  # noqa: E402
from runtime.engine import run_inproc  # noqa: E402
from runtime.metrics import read_metrics  # noqa: E402


def write_fake_cifar(folder: str, per_batch: int) -> None:
    rng = np.random.default_rng(0)
    os.makedirs(folder, exist_ok=True)
    for name in CIFAR_TRAIN + (CIFAR_TEST,):
        batch = {b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                 b"labels": [int(v) for v in rng.integers(0, 10, per_batch)]}
        with open(os.path.join(folder, name), "wb") as fh:
            pickle.dump(batch, fh)


def bench(device: str, args, data_dir: str, out_dir: str) -> dict:
    problem = f"resnet18:dataset=cifar10,data_dir={data_dir},batch={args.batch},eval_every=1000000,bn_samples=32"
    config = RunConfig(algorithm=args.algorithm, problem=problem, workers=args.workers, rounds=args.rounds + 1,
                       lr=args.lr, seed=0)
    path = os.path.join(out_dir, f"{device.replace(':', '')}.jsonl")
    start = time.perf_counter()
    run_inproc(config, path, device=device, progress=False)
    wall = time.perf_counter() - start
    rounds = [r for r in read_metrics(path) if r.get("event") == "round"][1:]  # drop the warm-up round
    per = [r["round_s"] for r in rounds]
    return {
        "device": device, "workers": args.workers, "batch": args.batch, "algorithm": args.algorithm,
        "round_s_median": statistics.median(per), "round_s_mean": statistics.fmean(per),
        "compute_s_median": statistics.median(r["compute_s"] for r in rounds),
        "compress_s_median": statistics.median(r["compress_s"] for r in rounds),
        "server_s_median": statistics.median(r["server_s"] for r in rounds),
        "bytes_up_per_worker_round": rounds[-1]["bytes_up"][0], "wall_s": wall,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", nargs="+", default=None, help="cpu, cuda, cuda:K (default: cpu and cuda when present)")
    ap.add_argument("--workers", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds (after one warm-up round)")
    ap.add_argument("--batch", type=int, default=32, help="minibatch per worker")
    ap.add_argument("--algorithm", default="cd-adam", help="algorithm spec (default cd-adam: scaled sign both ways)")
    ap.add_argument("--lr", default="0.001")
    ap.add_argument("--json", action="store_true", help="print one JSON object per device")
    args = ap.parse_args()
    devices = args.devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = os.path.join(tmp, "cifar")
        write_fake_cifar(os.path.join(data_dir, "cifar-10-batches-py"), per_batch=max(64, args.batch * args.workers))
        results = []
        for device in devices:
            r = bench(device, args, data_dir, tmp)
            results.append(r)
            if args.json:
                print(json.dumps(r))
            else:
                print(f"{device:8} {args.workers} workers, batch {args.batch}, {args.algorithm}: "
                      f"{r['round_s_median'] * 1e3:9.1f} ms/round (compute {r['compute_s_median'] * 1e3:.1f} ms, "
                      f"compress+encode {r['compress_s_median'] * 1e3:.1f} ms, server {r['server_s_median'] * 1e3:.1f} ms), "
                      f"{r['bytes_up_per_worker_round'] / 1e6:.2f} MB up per worker and round", flush=True)
        if len(results) > 1 and not args.json:
            base = results[0]["round_s_median"]
            for r in results[1:]:
                fast, slow = (r, results[0]) if r["round_s_median"] <= base else (results[0], r)
                print(f"{fast['device']} is {slow['round_s_median'] / fast['round_s_median']:.1f}x faster per round "
                      f"than {slow['device']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
