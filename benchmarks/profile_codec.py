"""Where a compressor's time goes: torch.profiler over compress + encode and decode + decompress.

    python benchmarks/profile_codec.py --device cuda --dim 1e7 [--specs topk:ratio=0.01 natural] [--top 6]

For each compressor it runs ``--calls`` compress + encode and decode + decompress pairs after one
warm-up pair (the same calls as ``bench_compressors.py``), under the profiler, and prints per call:
the wall time, the kernels launched, the memory copies between host and device
(``cudaMemcpyAsync``), the stream synchronizations (``cudaStreamSynchronize`` and the like) and the
scalars read back to the host (``aten::_local_scalar_dense``: ``.item()``, ``int(t)``); then the operators with the most self time (device
time on CUDA, CPU time on the CPU). A codec that runs at the device's memory speed launches few
kernels, synchronizes about once (to hand its packed bytes to the host) and spends its device time in
passes over the vector.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout this file is in, not an installed copy

from benchmarks.bench_compressors import SPECS, codec_calls  # noqa: E402

SYNC_EVENTS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
LAUNCH_EVENTS = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _profiled(fn, device: torch.device, calls: int):
    """Runs ``fn`` ``calls`` times under the profiler; returns (wall seconds per call, sorted, key averages)."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    walls = []
    with profile(activities=activities) as prof:
        for _ in range(calls):
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            walls.append(time.perf_counter() - t0)
    return walls, prof.key_averages()


def _summary(name: str, walls, averages, device: torch.device, calls: int, top: int) -> list[str]:
    by_key = {e.key: e for e in averages}
    count = lambda keys: sum(by_key[k].count for k in keys if k in by_key) / calls  # noqa: E731
    launches = count(LAUNCH_EVENTS)
    syncs = count(SYNC_EVENTS)
    scalars = count(("aten::_local_scalar_dense",))
    copies = count(("cudaMemcpyAsync", "cudaMemcpy"))
    line = (f"  {name}: {statistics.median(walls) * 1e3:.3f} ms/call (median of {calls}, profiled), "
            f"{launches:.0f} kernel launches, {copies:.0f} memcpys, {syncs:.0f} stream syncs, {scalars:.0f} scalar reads to the host")
    out = [line]
    if device.type == "cuda":
        ops = [e for e in averages if e.self_device_time_total > 0 and not e.key.startswith("aten::")]
        ops.sort(key=lambda e: -e.self_device_time_total)
        for e in ops[:top]:
            out.append(f"    {e.self_device_time_total / calls / 1e3:8.3f} ms dev  x{e.count // calls:<3} {e.key[:110]}")
    cpu_ops = [e for e in averages if e.key.startswith("aten::")]
    cpu_ops.sort(key=lambda e: -e.self_cpu_time_total)
    for e in cpu_ops[:top]:
        out.append(f"    {e.self_cpu_time_total / calls / 1e3:8.3f} ms host x{e.count // calls:<3} {e.key}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=float, default=1e7)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--workers", type=int, default=10, help="n for Perm-K (worker 1's message is profiled)")
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--top", type=int, default=6, help="operators listed per pass")
    parser.add_argument("--specs", nargs="*", default=SPECS)
    args = parser.parse_args()

    device, d = torch.device(args.device), int(args.dim)
    x = torch.randn(d, generator=torch.Generator().manual_seed(0)).to(device)
    print(f"torch {torch.__version__}, device {device}, d = {d:.0e}, n = {args.workers}")
    for spec in args.specs:
        compress_encode, frames, decode_decompress = codec_calls(spec, x, args.workers)
        decode_decompress()  # with the first compress + encode, the warm-up pair
        size = sum(len(f) for f in frames)
        print(f"\n{spec} ({size} bytes)")
        for name, fn in (("compress+encode", compress_encode), ("decode+decompress", decode_decompress)):
            walls, averages = _profiled(fn, device, args.calls)
            print("\n".join(_summary(name, walls, averages, device, args.calls, args.top)), flush=True)


if __name__ == "__main__":
    main()
