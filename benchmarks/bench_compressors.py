"""Compressor + wire codec time per compressor, as multiples of one memory copy of the same vector.

    python benchmarks/bench_compressors.py --dims 1e7 [--device cpu|cuda|all] [--repeats 5]

For each compressor it times, on a float32 N(0,1) vector of d coordinates:

* compress + encode: ``c.compress(x, worker, step)`` with a fresh step each call (so fresh random
  draws and, for Perm-K / Rand-K, a fresh support), then the frames a link sends (``encode_node``: a
  msgpack header and views of the packed bytes on the host, which ZeroMQ sends without a copy).
  ``encode``, the self-describing form, also copies every frame into a ``bytes`` object; the runtime
  does not, and that copy alone is 25 ms of a 40 MB message on an H200 host;
* decode + decompress: ``c.decompress(decode(frames))`` of one such message, onto the device, from
  writable copies of its frames in ordinary memory (where a receiver has them: ZeroMQ hands the
  runtime writable frames, over which a dense part is decoded without a copy; copies as ``bytes``,
  immutable, made the decoder copy every dense part once more, 2.5 ms of Perm-K's 20 MB at n = 2;
  on a GPU the sender's views point into page-locked memory, which would make the upload look
  several times faster than it is);
* one memory copy, ``x.clone()`` (``--copy into``: ``y.copy_(x)`` into a vector allocated once).

The process keeps freed memory for reuse as every ``psc`` process does (``runtime.allocator``), so
a 40 MB vector allocated in a call reuses pages that an earlier call freed, as in a run's rounds.
Without it (``PSC_MALLOC=system``) every such vector faults in fresh pages: at d = 1e7 on a 2-core
host that made a clone 9-10 ms instead of about 2 ms and a Top-K decode + decompress 50 ms instead of
6 ms, costs the runtime does not pay, and the "x copy" columns then compare codecs with a copy that is
mostly page faults.

It also gives torch's idle OpenMP threads the short spin that every ``psc`` process gives them
(``runtime.openmp``), before torch is loaded, unless ``GOMP_SPINCOUNT`` or ``OMP_WAIT_POLICY`` is set.
With libgomp's default spin (``GOMP_SPINCOUNT=300000``, about 10 ms on this host) the threads of each
timed copy kept spinning through the next compress, whose compiled pieces then waited for the cores:
at d = 1e7 on 2 cores, compress + encode took 20-40% longer (Top-K 13.3-14.2 ms against 8.2-9.5,
the scaled sign 10.0-10.4 against 6.3-7.4).

On a GPU only packed bytes cross to the host, and the bus, not the GPU's memory, bounds what a codec
can do: the least a compress + encode can cost is one pass over the vector and one copy of the
message's bytes to the host, and the least a decode + decompress can cost is one copy of the
received bytes to the GPU and one pass. So CUDA rows also time those two transfers of the message's
size (``to host``: into page-locked memory, as ``encode`` copies; ``to GPU``: from ordinary memory,
where ZeroMQ puts received frames) and give each codec pass as a multiple of that least cost
(``x floor``: copy + transfer). On the CPU the floor is the copy alone.

The timed calls are interleaved (copy, compress + encode, decode + decompress, the transfers,
repeated) after one warm-up call each, so that a machine whose load changes during the run affects
them alike; each figure is the median over ``--repeats`` rounds and the "x copy" columns divide by the median copy time of
the same compressor's rounds. CUDA timings synchronize the device around each call. ``--clock cpu``
times this process's CPU time instead of wall time, which other work on the machine disturbs less.
Prints a markdown table.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout this file is in, not an installed copy

from runtime.openmp import short_openmp_spin  # noqa: E402

SPIN_SET = short_openmp_spin()  # before torch loads OpenMP, as every psc process does (runtime.openmp)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from common.compressors import build  # noqa: E402
from runtime.allocator import keep_freed_memory  # noqa: E402
from common.wire import decode  # noqa: E402
from common.wire.codec import encode_node  # noqa: E402
from common.wire.header import pack_header  # noqa: E402

# randk:ratio=0.25 is M3's uplink with 4 workers (K = d/n): a support of a quarter of the coordinates,
# which NumPy's choice drew by a serial shuffle of an arange of d (psc draws its own, by chunks)
SPECS = [
    "identity", "fp16", "bf16", "topk:ratio=0.01", "randk:ratio=0.01", "randk:ratio=0.25", "samerandk:ratio=0.01", "permk",
    "adaptive", "natural", "exprounding:base=3", "exprounding:base=2,biased=true", "natdither:s=2,p=inf",
    "expdither:base=3,s=4,p=2", "qsgd:s=16", "ternary", "sign", "sign:scale=l2",
    "topk:ratio=0.01+natdither:s=2,p=inf", "permk+natural", "randk:ratio=0.01+natural",
]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
_clock = time.perf_counter


def _timed(fn, device: torch.device) -> float:
    _sync(device)
    start = _clock()
    fn()
    _sync(device)
    return _clock() - start


def interleaved_medians(fns, device: torch.device, repeats: int) -> list[float]:
    """Median seconds of each function, timed in turn ``repeats`` times after one warm-up call each."""
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for t, fn in zip(times, fns):
            t.append(_timed(fn, device))
    return [statistics.median(t) for t in times]


def codec_calls(spec: str, x: torch.Tensor, workers: int):
    """(compress + encode, the frames of one call, decode + decompress of those frames) for ``spec``
    on ``x``, as worker 1 of ``workers`` (worker 0 if alone); each compress + encode is a fresh step."""
    c = build(spec, x.numel(), workers, seed=0)
    worker, step = min(1, workers - 1), [0]

    def compress_encode():
        step[0] += 1
        node, views = encode_node(c.compress(x, worker=worker, step=step[0]))
        return [pack_header(node), *views]

    frames = compress_encode()
    received = [bytearray(f) for f in frames]  # in ordinary memory and writable, as ZeroMQ hands a receiver its frames
    return compress_encode, frames, lambda: c.decompress(decode(received, x.device))


def _transfers(size: int, device: torch.device) -> list:
    """A message's bytes to the host (into page-locked memory) and to the GPU (from ordinary memory)."""
    on_gpu = torch.empty(size, dtype=torch.uint8, device=device)
    pinned = torch.empty(size, dtype=torch.uint8, pin_memory=True)
    received = torch.from_numpy(np.frombuffer(bytearray(size), dtype=np.uint8))
    return [lambda: pinned.copy_(on_gpu), lambda: on_gpu.copy_(received)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dims", nargs="+", type=float, default=[1e6, 1e7])
    parser.add_argument("--device", default="all", help="cpu, cuda, cuda:K or all (cpu and, if present, cuda)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workers", type=int, default=10, help="n for Perm-K (worker 1's message is timed)")
    parser.add_argument("--specs", nargs="*", default=SPECS)
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="wall time, or this process's CPU time (steadier on a machine shared with other work; "
                             "counts every thread, so it is not for CUDA)")
    parser.add_argument("--copy", choices=["clone", "into"], default="clone",
                        help="the reference copy: x.clone() (a new vector) or a copy into one allocated once")
    args = parser.parse_args()
    global _clock
    _clock = CLOCKS[args.clock]
    kept = keep_freed_memory()

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else []) if args.device == "all" else [args.device]
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, n = {args.workers}, "
          f"median of {args.repeats} interleaved rounds, {args.clock} clock, copy = {args.copy}, "
          f"freed memory {'kept for reuse' if kept else 'returned (the C library allocator as it is)'}, "
          f"OpenMP spin count {os.environ.get('GOMP_SPINCOUNT', 'the default')}"
          f"{' (set as psc sets it)' if SPIN_SET else ''}")
    print()
    print("| device | d | compressor | bytes | copy ms | compress+encode ms | decode+decompress ms "
          "| compress+encode x copy | decode+decompress x copy | to host ms | to GPU ms "
          "| compress+encode x floor | decode+decompress x floor |")
    print("|---" * 13 + "|")
    for dev_name in devices:
        device = torch.device(dev_name)
        for d in (int(v) for v in args.dims):
            x = torch.randn(d, generator=torch.Generator().manual_seed(0)).to(device)
            target = torch.empty_like(x)
            copy = (lambda: x.clone()) if args.copy == "clone" else (lambda: target.copy_(x))
            for spec in args.specs:
                compress_encode, frames, decode_decompress = codec_calls(spec, x, args.workers)
                size = sum(len(f) for f in frames)
                fns = [copy, compress_encode, decode_decompress]
                if device.type == "cuda":
                    fns += _transfers(size, device)
                t_copy, t_ce, t_dd, *moves = interleaved_medians(fns, device, args.repeats)
                t_host, t_gpu = moves or (0.0, 0.0)
                shown = (lambda t: f"{t * 1e3:.2f}") if moves else (lambda t: "-")
                print(
                    f"| {dev_name} | {d:.0e} | {spec} | {size} | {t_copy * 1e3:.2f} | {t_ce * 1e3:.2f} | "
                    f"{t_dd * 1e3:.2f} | {t_ce / t_copy:.1f} | {t_dd / t_copy:.1f} | {shown(t_host)} | {shown(t_gpu)} | "
                    f"{t_ce / (t_copy + t_host):.1f} | {t_dd / (t_copy + t_gpu):.1f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
