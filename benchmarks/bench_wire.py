"""Encode and decode throughput of the wire format, per compressor, next to a plain memory copy.

    python benchmarks/bench_wire.py --dims 1e6 1e7 [--repeats 5] [--device cpu|cuda|all] [--specs ...]

Throughput is GB/s of dense float32 input: 4 d bytes divided by the median time of ``--repeats``
runs (after one warm-up run). ``encode`` packs on the payload's device and copies the packed bytes
to the host; ``decode`` unpacks on the host and moves the payload to the device. The compression
itself is not timed. ``copy`` is ``torch.clone`` of the d float32 values on the same device.
Prints a markdown table.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common.compressors import build  # noqa: E402
from common.wire import decode, encode, message_bytes  # noqa: E402

DEFAULT_SPECS = [
    "identity", "fp16", "bf16", "topk:ratio=0.01", "randk:ratio=0.01", "permk", "adaptive", "natural",
    "exprounding:base=3", "natdither:s=4,p=inf", "qsgd:s=16", "ternary", "sign", "topk:ratio=0.01+natural",
    "permk+natural", "natural+scale:lambda=0.888",
]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_time(fn, device: torch.device, repeats: int) -> float:
    fn()  # warm-up
    _sync(device)
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench(dims: list[int], specs: list[str], devices: list[torch.device], repeats: int, workers: int) -> list[dict]:
    rows = []
    for device in devices:
        for d in dims:
            x = torch.randn(d, generator=torch.Generator().manual_seed(0)).to(device)
            gb = 4 * d / 1e9
            t_copy = _median_time(lambda: x.clone(), device, repeats)
            rows.append({"device": device.type, "d": d, "spec": "copy (torch.clone)", "bits": 32.0,
                         "enc": gb / t_copy, "dec": gb / t_copy})
            for spec in specs:
                c = build(spec, d, workers, 0)
                p = c.compress(x, worker=1 % workers, step=0)
                frames = encode(p)
                t_enc = _median_time(lambda: encode(p), device, repeats)
                t_dec = _median_time(lambda: decode(frames, device=device), device, repeats)
                rows.append({"device": device.type, "d": d, "spec": spec, "bits": 8 * message_bytes(frames) / d,
                             "enc": gb / t_enc, "dec": gb / t_dec})
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| device | d | compressor | bits/coord | encode GB/s | decode GB/s |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['device']} | {r['d']:.0e} | {r['spec']} | {r['bits']:.4g} | {r['enc']:.3g} | {r['dec']:.3g} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dims", nargs="+", type=float, default=[1e6, 1e7])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", choices=["cpu", "cuda", "all"], default="all",
                    help="all: the CPU, and CUDA when available")
    ap.add_argument("--specs", nargs="+", default=DEFAULT_SPECS)
    ap.add_argument("--workers", type=int, default=10, help="n for Perm-K")
    args = ap.parse_args(argv)
    devices = []
    if args.device in ("cpu", "all"):
        devices.append(torch.device("cpu"))
    if args.device == "cuda" or (args.device == "all" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            ap.error("--device cuda: no CUDA device available")
        devices.append(torch.device("cuda"))
    rows = bench([int(d) for d in args.dims], args.specs, devices, max(1, args.repeats), args.workers)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads; median of {args.repeats} runs; "
          "GB/s of dense float32 input (4 d bytes)\n")
    print(table(rows))


if __name__ == "__main__":
    main()
