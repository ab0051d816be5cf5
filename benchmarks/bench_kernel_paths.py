"""The compiled CPU kernels that have a faster path, each timed against the path it replaces, in one
process: interleaved calls, medians, the same inputs.

    python benchmarks/bench_kernel_paths.py [--dim 1e7] [--threads 2] [--repeats 15]

* quantize with a table of one level a binade (exponential rounding and dithering with base 3): the
  kernel that reads its tables from copies on its stack (``quantize_pairs32``) against the general
  table kernel (``quantize32``: a search from the binade's first level, in a table read from its
  arguments), stochastic and to the nearest level. The general kernel is what a base-3 table would
  use without the stack copies; before them, a scalar loop over the same pair tables took about a
  third less than it (docs/overhead.md). Where the kernels are compiled for AVX-512, also the kernel
  that reads windows of the tables from registers (``quantize_pairs32_windowed``) against the stack
  copies' gathers;
* a bitmap's values: ``gather_marked`` and ``scatter_marked`` (the dense form, and h + it) with
  AVX-512's vector compression and masked store / expanding load against the scan of one set bit at a time, with half
  and with a tenth of the bits set (Perm-K with n = 2 and n = 10);
* natural compression's codes: ``pack_codes`` / ``unpack_codes`` 64 fields at a time in vector
  registers (AVX-512 VBMI) against 64-bit words with a carried accumulator;
* base-3 rounding's codes: ``dequantize`` with its signed level table copied onto the stack against
  the table read from its arguments;
* Rand-K's long supports (``randk:ratio=R`` for R = 1/16, 1/4, 1/2): compress, the dense form of a
  message and its addition into a vector in place (into a fresh copy of it each call, the copy
  timed too), the support drawn afresh for each call, through the support's bitmap
  (``indices.marked_support``) against its index arrays;
* the dithering's norms: the float64 2-norm's compiled block sums (runs of rows as vectors in
  registers, ``kernel_parts.step_sums``) against torch's float64 sums of the same blocks, and the
  maximum norm from the magnitudes' bits (``largest_magnitude``) against ``torch.aminmax``.

The vector paths are timed only where the kernels are compiled for them (the rows say so). Every
pair of paths is checked to give the same result before it is timed. Prints a markdown table.
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout this file is in, not an installed copy

from runtime.openmp import short_openmp_spin  # noqa: E402

short_openmp_spin()  # before torch loads OpenMP, as every psc process does

import numpy as np  # noqa: E402
import torch  # noqa: E402

from common.compressors import build, cpu_kernels  # noqa: E402
from common.compressors.dithering import norm_float32_up  # noqa: E402
from common.compressors.payloads import LevelTable  # noqa: E402
from common.wire.codec import encode_node  # noqa: E402
from runtime.allocator import keep_freed_memory  # noqa: E402


def medians(fns, repeats: int) -> list[float]:
    """Median milliseconds of each function, called in turn ``repeats`` times after one warm-up each."""
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for t, fn in zip(times, fns):
            start = time.perf_counter()
            fn()
            t.append(time.perf_counter() - start)
    return [statistics.median(t) * 1e3 for t in times]


def quantize_rows(x: np.ndarray, repeats: int):
    """The stack-table kernel against the general table kernel, on the same arguments."""
    kernels = cpu_kernels._kernels()
    norm = np.float32(np.linalg.norm(x.astype(np.float64)))
    for name, table, divisor in (("exponential rounding, base 3", LevelTable("rounding", 3.0, dtype_name="float32"), np.float32(1)),
                                 ("exponential dithering, base 3, s = 4", LevelTable("exp", 3.0, 4), norm)):
        levels = table.values(torch.float32, "cpu").numpy()
        top = len(levels) - 1
        starts, crowded, scan = cpu_kernels.binade_starts(levels.tobytes(), np.float32)
        pairs = cpu_kernels.binade_pairs(levels.tobytes())
        signs = np.empty((x.size + 7) // 8, dtype=np.uint8)  # x < 0: the sign frame each kernel writes
        before, after = np.empty(x.size, dtype=np.int16), np.empty(x.size, dtype=np.int16)
        for stochastic in (True, False):
            def general():
                return kernels[np.float32](x, 0, divisor, 0, starts, crowded, levels, top, np.uint64(7), stochastic, signs, before)

            def stacked():
                return kernels["pairs32"](x, 0, divisor, *pairs, levels, scan, top, np.uint64(7), stochastic, signs, after)

            general(), stacked()
            assert np.array_equal(before, after), name
            rounding = "stochastic" if stochastic else "nearest level"
            yield (f"quantize, {name}, {rounding} (one piece)", "general table kernel",
                   "pair tables copied onto the stack", *medians([general, stacked], repeats))
            if cpu_kernels.vector_compress():
                windows = cpu_kernels.binade_windows(levels.tobytes())

                def windowed():
                    return kernels["pairs32_windowed"](x, 0, divisor, *pairs, windows, levels, scan, top, np.uint64(7),
                                                       stochastic, signs, before)

                windowed()
                assert np.array_equal(before, after), name
                yield (f"quantize, {name}, {rounding} (one piece)", "pair tables copied onto the stack (gathers)",
                       "windows of the tables in registers (AVX-512)", *medians([stacked, windowed], repeats))
            if top <= 15:  # the small-table kernel: the levels counted in registers
                small_codes, padded = np.empty(x.size, dtype=np.uint8), cpu_kernels.small_levels(levels.tobytes())

                def small():
                    return kernels["small32"](x, 0, divisor, padded, top, np.uint64(7), stochastic, signs, small_codes)

                small()
                assert np.array_equal(small_codes, after), name
                yield (f"quantize, {name}, {rounding} (one piece)", "pair tables copied onto the stack (gathers)",
                       "levels counted in registers (small tables)", *medians([stacked, small], repeats))


def _switched(name: str, value: bool):
    """Sets ``cpu_kernels.<name>()`` (a path switch) to return ``value``."""
    setattr(cpu_kernels, name, lambda: value)


def both_paths(switch: str, fn, vector: bool, repeats: int) -> tuple[float, float]:
    """Median ms of ``fn`` with the path switch ``switch`` off and on (on: NaN where the vector path is
    not compiled here), after checking that both give the same bytes."""
    paths = []
    for on in (False, True) if vector else (False,):
        _switched(switch, on)
        paths.append((fn().numpy().tobytes(), lambda on=on: (_switched(switch, on), fn())))
    assert len({p[0] for p in paths}) == 1, f"the paths of {switch} differ"
    times = medians([p[1] for p in paths], repeats)
    return times[0], times[1] if vector else float("nan")


def marked_rows(x: torch.Tensor, repeats: int, vector: bool):
    d = x.numel()
    h = torch.randn(d, generator=torch.Generator().manual_seed(2))
    for n in (2, 10):
        support = torch.randperm(d, generator=torch.Generator().manual_seed(n))[: d // n]
        words = cpu_kernels.marked(support.to(torch.int32), d)
        count = d // n
        calls = {"gather": lambda: cpu_kernels.gather_marked(x, words, count, 1.5)[0]}
        values = calls["gather"]()
        calls["dense form"] = lambda: cpu_kernels.scatter_marked(words, values, d)
        calls["h + dense form"] = lambda: cpu_kernels.scatter_marked(words, values, d, h)
        for what, fn in calls.items():
            yield (f"bitmap, {what}, 1/{n} of the bits", "one set bit at a time",
                   "16 coordinates at a time" if vector else "(no AVX-512 here)", *both_paths("vector_compress", fn, vector, repeats))


def packing_rows(x: torch.Tensor, repeats: int, vector: bool):
    payload = build("natural", x.numel(), 2, seed=0).compress(x)
    node, views = encode_node(payload)
    mode, offset, width = node[-3:]
    codes = payload.codes.view(-1)
    data = np.frombuffer(bytes(views[-1]), dtype=np.uint8)
    minus, clamp = (offset, False) if mode == 0 else (offset - 1, True)
    calls = {f"pack {width}-bit fields of int16 codes": lambda: cpu_kernels.pack_codes(codes, minus, clamp, width),
             f"unpack {width}-bit fields into int16 codes": lambda: cpu_kernels.unpack_codes(
                 data, codes.numel(), width, offset, mode == 1, torch.int16)[0]}
    for what, fn in calls.items():
        yield (f"natural compression's codes, {what}", "64-bit words", "64 fields in vector registers" if vector
               else "(no AVX-512 VBMI here)", *both_paths("vector_pack", fn, vector, repeats))


def dequantize_rows(x: torch.Tensor, repeats: int):
    """The signed level table of base-3 rounding read from the arguments, or from a stack copy."""
    payload = build("exprounding:base=3", x.numel(), 2, seed=0).compress(x)
    levels = payload.table.values(torch.float32, "cpu")
    signed = torch.cat([levels, -levels])
    codes, signs = payload.codes.view(-1), payload.signs  # (the sign frame, as the quantizer wrote it)
    stacked = cpu_kernels.STACKED_TABLE

    def with_cap(cap):
        cpu_kernels.STACKED_TABLE = cap
        return cpu_kernels.dequantize(codes, signs, signed)

    assert torch.equal(with_cap(0), with_cap(stacked))
    yield ("dequantize base-3 rounding's codes", "table read from the arguments", "table copied onto the stack",
           *medians([lambda: with_cap(0), lambda: with_cap(stacked)], repeats))


def norm_rows(x: torch.Tensor, repeats: int):
    """The dithering's norms, compiled against torch's: the float64 2-norm (QSGD, dithering with
    p = 2, the scaled sign's l2 scale) against torch's float64 sums of the same blocks, and the
    maximum norm (ternary, dithering with p = inf) against torch's min and max."""
    real_sum, real_largest = cpu_kernels.float64_sum, cpu_kernels.largest_magnitude
    x64 = x.to(torch.float64)

    def norm(v, p, compiled):
        cpu_kernels.float64_sum = real_sum if compiled else (lambda *a: None)
        cpu_kernels.largest_magnitude = real_largest if compiled else (lambda *a: None)
        return norm_float32_up(v, p)

    for v, p, what in ((x, 2.0, "float64 2-norm of float32"), (x64, 2.0, "float64 2-norm of float64"),
                       (x, math.inf, "maximum norm of float32"), (x64, math.inf, "maximum norm of float64")):
        assert torch.equal(norm(v, p, False), norm(v, p, True))
        before = "torch's sums of 2^15 blocks" if p == 2 else "torch.aminmax"
        after = "runs of rows in vector registers (step_sums)" if p == 2 else "the magnitudes' bits (largest_magnitude)"
        yield (what, before, after, *medians([lambda: norm(v, p, False), lambda: norm(v, p, True)], repeats))
    cpu_kernels.float64_sum, cpu_kernels.largest_magnitude = real_sum, real_largest


def randk_rows(x: torch.Tensor, repeats: int):
    from common.compressors import indices
    from common.compressors.payloads import add_dense

    d, steps = x.numel(), iter(range(10 ** 9))
    h = torch.randn(d, generator=torch.Generator().manual_seed(3))
    ratio = indices.RANDK_MARKED_RATIO
    for share in (16, 4, 2):
        c = build(f"randk:ratio={1 / share}", d, 4)
        message = c.compress(x, worker=1, step=0)

        def fresh(fn):
            def call():
                indices.randk_support.kept.clear()
                indices.randk_marked.kept.clear()
                return fn()
            return call

        calls = {"compress": lambda: c.compress(x, worker=1, step=next(steps)).values.to_dense(),
                 "dense form": fresh(message.to_dense), "h + dense form, in place": fresh(lambda: add_dense(h.clone(), message, inplace=True))}
        checks = {**calls, "compress": lambda: c.compress(x, worker=1, step=0).values.to_dense()}
        for what, fn in calls.items():
            both = []
            for marked in (1, ratio):
                indices.RANDK_MARKED_RATIO = marked
                both.append(fresh(checks[what])().numpy().tobytes())
            assert both[0] == both[1], f"Rand-K's paths differ: {what}"
            yield (f"Rand-K, 1/{share} of the coordinates, {what}", "index arrays", "bitmap",
                   *medians([lambda: (setattr(indices, "RANDK_MARKED_RATIO", 1), fn()),
                             lambda: (setattr(indices, "RANDK_MARKED_RATIO", ratio), fn())], repeats))
    indices.RANDK_MARKED_RATIO = ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=float, default=1e7)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads (the kernels' pieces)")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    if not cpu_kernels.available():
        sys.exit("Numba is not installed: there are no compiled kernels to time")
    keep_freed_memory()
    torch.set_num_threads(args.threads)
    x = torch.randn(int(args.dim), generator=torch.Generator().manual_seed(1))
    compress, pack = cpu_kernels.vector_compress(), cpu_kernels.vector_pack()
    print(f"d = {int(args.dim):.0e}, torch threads {args.threads} (the quantize rows: one piece, one thread), "
          f"medians of {args.repeats} interleaved calls; AVX-512 paths compiled here: bitmap {compress}, packing {pack}\n")
    print("| kernel | before | ms | after | ms |")
    print("|---|---|---|---|---|")
    rows = [*quantize_rows(x.numpy(), args.repeats), *marked_rows(x, args.repeats, compress),
            *packing_rows(x, args.repeats, pack), *dequantize_rows(x, args.repeats), *norm_rows(x, args.repeats),
            *randk_rows(x, args.repeats)]
    for what, before, after, slow, fast in rows:
        print(f"| {what} | {before} | {slow:.2f} | {after} | {fast:.2f} |")


if __name__ == "__main__":
    main()
