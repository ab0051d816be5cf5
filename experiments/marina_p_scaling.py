"""MARINA-P's server-to-worker bits against n (Gruntkowska et al. section 6, Cor. D.4 / eq. 10).

    python experiments/marina_p_scaling.py [--d 300] [--ns 10 100 1000] [--rounds 2000] [--out DIR]

The paper's set-up with L_A = 0 (homogeneous A_i, L_B^2 = 100 by default), in-process engine, the
theory step size 1/L for both methods. For each n: GD runs ``--rounds`` rounds and sets the target
(its final grad_norm_sq); MARINA-P with Perm-K (K = d/n, p = 1/n) runs until it reaches the target.
Reported: the bits one worker received from the server up to that point as the paper counts them
(payload bits: 32 a value, nothing for the shared support), and beside them the real bytes (the
frames, headers included) and the wall-clock. Theory says MARINA-P's s2w cost falls like 1/n while GD's is flat
(eq. 10 with L_A = 0). Writes metrics files, a PNG and a markdown table under ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import time

from common.config import RunConfig
from runtime.engine import run_inproc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d", type=int, default=300)
    ap.add_argument("--ns", type=int, nargs="+", default=[10, 100, 1000])
    ap.add_argument("--rounds", type=int, default=2000)
    ap.add_argument("--lb2", type=float, default=100.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/marina_p_scaling")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    problem = f"quadratic:d={args.d},la2=0,lb2={args.lb2}"
    rows = []
    for n in args.ns:
        common = dict(problem=problem, workers=n, lr="theory", seed=args.seed)
        t0 = time.time()
        gd = run_inproc(RunConfig(algorithm="gd", rounds=args.rounds, **common), os.path.join(args.out, f"gd_n{n}.jsonl"), progress=False)
        target = gd.last["grad_norm_sq"]
        mp = run_inproc(
            RunConfig(algorithm="marina-p", downlink="permk", rounds=int(args.rounds * 1.5), **common),
            os.path.join(args.out, f"marina-p_n{n}.jsonl"), progress=False, until=lambda r: r["grad_norm_sq"] <= target,
        )
        reached = mp.last["grad_norm_sq"] <= target
        row = {
            "n": n, "target": target, "gd_rounds": gd.last["round"] + 1, "mp_rounds": mp.last["round"] + 1, "reached": reached,
            "gd_bits_per_worker": gd.last["cum_payload_bits_down"] / n, "mp_bits_per_worker": mp.last["cum_payload_bits_down"] / n,
            "gd_bytes_per_worker": gd.last["cum_bytes_down"] / n, "mp_bytes_per_worker": mp.last["cum_bytes_down"] / n,
            "gd_seconds": gd.last["time_s"], "mp_seconds": mp.last["time_s"], "seconds": time.time() - t0,
        }
        row["ratio"] = row["gd_bits_per_worker"] / row["mp_bits_per_worker"]
        rows.append(row)
        print(json.dumps(row), flush=True)

    table = ["| n | target grad_norm_sq | GD rounds | GD s2w payload bits / worker | GD wire bytes / worker | GD wall s | MARINA-P rounds | "
             "MARINA-P s2w payload bits / worker | MARINA-P wire bytes / worker | MARINA-P wall s | GD / MARINA-P (bits) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        table.append(f"| {r['n']} | {r['target']:.4g} | {r['gd_rounds']} | {r['gd_bits_per_worker']:.4g} | {r['gd_bytes_per_worker']:.4g} | "
                     f"{r['gd_seconds']:.1f} | {r['mp_rounds']}{'' if r['reached'] else ' (not reached)'} | {r['mp_bits_per_worker']:.4g} | "
                     f"{r['mp_bytes_per_worker']:.4g} | {r['mp_seconds']:.1f} | {r['ratio']:.1f}x |")
    with open(os.path.join(args.out, "table.md"), "w") as fh:
        fh.write(f"MARINA-P (Perm-K) vs GD, {problem}, target = GD's grad_norm_sq after {args.rounds} rounds\n\n" + "\n".join(table) + "\n")
    print("\n".join(table))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ns = [r["n"] for r in rows]
    gd_line, = ax.loglog(ns, [r["gd_bits_per_worker"] for r in rows], "o-", label="GD")
    mp_line, = ax.loglog(ns, [r["mp_bits_per_worker"] for r in rows], "s-", label="MARINA-P, Perm-K")
    ax.loglog(ns, [8 * r["gd_bytes_per_worker"] for r in rows], "o:", color=gd_line.get_color(), mfc="none", label="GD, 8 x wire bytes")
    ax.loglog(ns, [8 * r["mp_bytes_per_worker"] for r in rows], "s:", color=mp_line.get_color(), mfc="none",
              label="MARINA-P, 8 x wire bytes")
    ax.loglog(ns, [rows[0]["mp_bits_per_worker"] * ns[0] / n for n in ns], "k:", label="1/n")
    ax.set_xlabel("workers n")
    ax.set_ylabel("s2w bits per worker to the target\n[payload bits, the paper's count]")
    ax.set_title(f"d = {args.d}, L_A = 0")
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "scaling.png"), dpi=80)
    print(f"wrote {args.out}/table.md and {args.out}/scaling.png")


if __name__ == "__main__":
    main()
