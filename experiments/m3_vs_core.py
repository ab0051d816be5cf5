"""MARINA-P paper F.1 / Figure 2: M3 against CORE on the d = 1000 quadratics A_i = (1 + xi_i) I.

    python experiments/m3_vs_core.py [--d 1000] [--ns 10 100 1000] [--eps 1e-3] [--max-rounds 2000]
        [--factors -2 -1 0 1 2 3] [--quick] [--out runs/m3_vs_core]

Problem ``identity-quadratic`` (b_i ~ N(0, I), x^0 = 0). M3: Perm-K + natural compression down,
Rand-K (K = max(1, d // n)) + natural compression up, p_P, p_D, beta from Cor. E.2 for the composed
compressors' omegas; CORE with m = 10. Step sizes tuned as lr = theory * 2^f (M3: Thm E.1; CORE: the
descent-lemma step m / (L (d + m + 1))). A run stops at grad_norm_sq <= eps * initial; the score is the
total bits per worker (s2w + w2s, real frames). Writes JSONL per run, ``table.md`` and ``m3_vs_core.png``.
"""
from __future__ import annotations

import argparse
import os
import time

from marina_p_fig1 import tune, write_outputs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d", type=int, default=1000)
    ap.add_argument("--ns", type=int, nargs="+", default=[10, 100, 1000])
    ap.add_argument("--eps", type=float, default=1e-3)
    ap.add_argument("--max-rounds", type=int, default=2000)
    ap.add_argument("--factors", type=int, nargs="+", default=[0, 1, 2, 3, 4, 5, 6, 7], help="M3: lr = theory * 2^f (Thm E.1's step is small)")
    ap.add_argument("--core-factors", type=int, nargs="+", default=[-2, -1, 0, 1, 2])
    ap.add_argument("--m", type=int, default=10, help="CORE's number of directions")
    ap.add_argument("--quick", action="store_true", help="eps 1e-2, 600 rounds, M3 factors 3 5 7, CORE factors -1 0 1")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/m3_vs_core")
    args = ap.parse_args()
    if args.quick:
        args.eps, args.max_rounds, args.factors, args.core_factors = 1e-2, 600, [3, 5, 7], [-1, 0, 1]
    os.makedirs(args.out, exist_ok=True)
    rows = []
    for n in args.ns:
        k = max(1, args.d // n)
        common = dict(problem=f"identity-quadratic:d={args.d}", workers=n, rounds=args.max_rounds, seed=args.seed)
        for label, spec, factors in ((f"M3 Perm-K+nat / Rand{k}+nat", dict(algorithm="m3", downlink="permk+natural", uplink=f"randk:k={k}+natural"), args.factors),
                                     (f"CORE m={args.m}", dict(algorithm=f"core:m={args.m}"), args.core_factors)):
            t0 = time.time()
            best = tune(f"n{n}_{label.split()[0]}", {**common, **spec}, factors, args.eps, args.out, "total_bits")
            rows.append({"n": n, "method": label.split()[0], **best, "seconds": time.time() - t0})
    write_outputs(rows, args, "total_bits", "total bits per worker (s2w + w2s)", "m3_vs_core",
                  f"identity-quadratic d={args.d}; target grad_norm_sq <= {args.eps} x initial; lr = theory x 2^f, "
                  f"f in {args.factors} (M3), {args.core_factors} (CORE), at most {args.max_rounds} rounds")


if __name__ == "__main__":
    main()
