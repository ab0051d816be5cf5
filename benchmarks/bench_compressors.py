"""Compress + decompress time per compressor against a plain tensor copy of the same size.

    python benchmarks/bench_compressors.py --dims 1e6 1e7 [--device cpu|cuda|all] [--repeats 5]

Each figure is the median over ``--repeats`` timed calls after one warm-up call, on a float32 N(0,1)
vector. ``GB/s`` is dense input bytes (4 d) over the time of compress + decompress. CUDA timings
synchronize the device around each call. Prints a markdown table.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from common.compressors import build

SPECS = [
    "identity", "fp16", "bf16", "topk:ratio=0.01", "randk:ratio=0.01", "samerandk:ratio=0.01", "permk",
    "adaptive", "natural", "exprounding:base=3", "exprounding:base=2,biased=true", "natdither:s=2,p=inf",
    "expdither:base=3,s=4,p=2", "qsgd:s=16", "ternary", "sign", "sign:scale=l2",
    "topk:ratio=0.01+natdither:s=2,p=inf", "permk+natural", "randk:ratio=0.01+natural",
]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn, device: torch.device, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dims", nargs="+", type=float, default=[1e6, 1e7])
    parser.add_argument("--device", default="all", help="cpu, cuda, cuda:K or all (cpu and, if present, cuda)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workers", type=int, default=10, help="n for Perm-K")
    parser.add_argument("--specs", nargs="*", default=SPECS)
    args = parser.parse_args()

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else []) if args.device == "all" else [args.device]
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, median of {args.repeats}")
    print("| device | d | compressor | compress ms | decompress ms | total ms | GB/s | x copy time |")
    print("|---|---|---|---|---|---|---|---|")
    for dev_name in devices:
        device = torch.device(dev_name)
        for d in (int(v) for v in args.dims):
            x = torch.randn(d, generator=torch.Generator().manual_seed(0)).to(device)
            copy = median_seconds(lambda: x.clone(), device, args.repeats)
            print(f"| {dev_name} | {d:.0e} | copy (x.clone()) | | | {copy * 1e3:.3f} | {4 * d / copy / 1e9:.2f} | 1.0 |")
            for spec in args.specs:
                c = build(spec, d, args.workers, seed=0)
                step = [0]

                def compress():
                    step[0] += 1
                    return c.compress(x, worker=1, step=step[0])

                payload = compress()
                t_c = median_seconds(compress, device, args.repeats)
                t_d = median_seconds(lambda: c.decompress(payload), device, args.repeats)
                total = t_c + t_d
                print(
                    f"| {dev_name} | {d:.0e} | {spec} | {t_c * 1e3:.3f} | {t_d * 1e3:.3f} | {total * 1e3:.3f} | "
                    f"{4 * d / total / 1e9:.2f} | {total / copy:.1f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
