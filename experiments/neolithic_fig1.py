"""NEOLITHIC figure 1 (Huang et al. 2022, section 5; spec/neolithic.md section 3): E||grad f||^2 against
communication rounds on least squares and logistic regression, d = 30, n = 32, M = 1000 rows per
worker, one-row stochastic gradients, rand-1 (unscaled, delta = 1/d), NEOLITHIC with R = 4.

    python experiments/neolithic_fig1.py [--comm-rounds 2000] [--trials 1] [--out runs/neolithic_fig1]

Methods: NEOLITHIC (uplink rand-1, downlink identity, R = 4: K = T/R iterations, pitfall P5),
MEM-SGD, Double-Squeeze (rand-1 both ways, as in the paper's bidirectional baseline), P-SGD
(uncompressed). Every method gets the same communication-round budget T and the same staircase
step size (``--lr-ls``/``--lr-logistic``, NEOLITHIC's times ``--neolithic-lr-scale`` = R: one move per R
rounds on an R-times larger batch, the linear scaling rule; halved every ``--every`` communication rounds; the paper's initial values and
factor are not given). E||grad f||^2 is the exact full gradient at the server's model (= the workers'
x), averaged over ``--trials`` seeds. Writes one metrics file per run, fig1.png and table.md.
"""
from __future__ import annotations

import argparse
import json
import os

import numpy as np

from common.config import RunConfig
from runtime.engine import run_inproc
from runtime.metrics import read_metrics

RAND1 = "randk:k=1,scaled=false"
METHODS = {
    "NEOLITHIC (R=4)": ("neolithic:r=4", RAND1, "identity"),
    "MEM-SGD": ("mem-sgd", RAND1, None),
    "Double-Squeeze": ("double-squeeze", RAND1, RAND1),
    "P-SGD": ("psgd", None, None),
}


def curve(path):
    """(cumulative communication rounds, grad_norm_sq) after every iteration, starting at 0."""
    recs = read_metrics(path)
    x, y, total = [0], [recs[0]["initial"]["grad_norm_sq"]], 0
    for r in recs:
        if r["event"] == "round":
            total += r.get("comm_rounds", 1)
            x.append(total)
            y.append(r["grad_norm_sq"])
    return np.array(x), np.array(y), recs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--comm-rounds", type=int, default=2000, help="communication-round budget T per method")
    ap.add_argument("--trials", type=int, default=1)
    ap.add_argument("--workers", type=int, default=32)
    ap.add_argument("--d", type=int, default=30)
    ap.add_argument("--m", type=int, default=1000)
    ap.add_argument("--lr-ls", type=float, default=0.02, help="initial step size, least squares")
    ap.add_argument("--lr-logistic", type=float, default=0.2, help="initial step size, logistic regression")
    ap.add_argument("--neolithic-lr-scale", type=float, default=4.0,
                    help="NEOLITHIC's step = this x the others' (its iteration averages R minibatches and makes one move per R comm rounds)")
    ap.add_argument("--decay", type=float, default=0.5)
    ap.add_argument("--every", type=int, default=500, help="decay period in communication rounds")
    ap.add_argument("--out", default="runs/neolithic_fig1")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    problems = {"least squares": ("least-squares", args.lr_ls), "logistic regression": ("logistic", args.lr_logistic)}
    results = {}
    for pname, (pspec, lr) in problems.items():
        for label, (algo, up, down) in METHODS.items():
            R = 4 if algo.startswith("neolithic") else 1
            lr_m = lr * (args.neolithic_lr_scale if R > 1 else 1.0)
            ys = []
            for seed in range(args.trials):
                path = os.path.join(args.out, f"{pspec}_{algo.split(':')[0]}_s{seed}.jsonl")
                config = RunConfig(algorithm=f"{algo}{',' if ':' in algo else ':'}decay={args.decay},every={args.every}",
                                   uplink=up, downlink=down, problem=f"{pspec}:d={args.d},m={args.m}", workers=args.workers,
                                   rounds=args.comm_rounds // R, lr=str(lr_m), seed=seed)
                run_inproc(config, path, progress=False)
                x, y, recs = curve(path)
                ys.append(y)
                bits = 8 * recs[-2]["cum_bytes_up"] / args.workers
            y = np.mean(ys, 0)
            results[(pname, label)] = (x, y, bits, lr_m)
            print(json.dumps({"problem": pname, "method": label, "final": float(y[-1]), "bits_up_per_worker": bits}), flush=True)

    marks = [args.comm_rounds // 4, args.comm_rounds // 2, args.comm_rounds]
    lines = [f"NEOLITHIC Fig. 1: E||grad f||^2 (exact, at the server model, mean of {args.trials} trial(s)) after T "
             f"communication rounds; d={args.d}, n={args.workers}, M={args.m}, rand-1, R=4, step halved every {args.every} comm rounds\n",
             "| problem | method | lr | " + " | ".join(f"T={m}" for m in marks) + " | uplink bits / worker |",
             "|---|---|---|" + "---|" * len(marks) + "---|"]
    for (pname, label), (x, y, bits, lr_m) in results.items():
        vals = [y[np.searchsorted(x, m)] if m <= x[-1] else y[-1] for m in marks]
        lines.append(f"| {pname} | {label} | {lr_m:g} | " + " | ".join(f"{v:.3e}" for v in vals) + f" | {bits:.0f} |")
    table = "\n".join(lines) + "\n"
    with open(os.path.join(args.out, "table.md"), "w") as fh:
        fh.write(table)
    print(table)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, pname in zip(axes, problems):
        for label in METHODS:
            x, y = results[(pname, label)][:2]
            ax.semilogy(x, y, label=label)
        ax.set_title(f"{pname}, d={args.d}, n={args.workers}, rand-1")
        ax.set_xlabel("communication rounds")
        ax.set_ylabel("E||grad f(x)||^2")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "fig1.png"), dpi=120)
    print(f"wrote {args.out}/table.md and {args.out}/fig1.png")


if __name__ == "__main__":
    main()
