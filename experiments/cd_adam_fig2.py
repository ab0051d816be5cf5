"""CD-Adam figure 2 (and Fig. 4's Top-1 variant) (Wang, Lin, Chen 2022, sec. 7.1 / App. D.1;
spec/cd-adam.md 3.1): nonconvex-regularized logistic regression, n = 20 workers, gradient norm
against communication bits (upper row) and against iterations (lower row).

    python experiments/cd_adam_fig2.py [--rounds 300] [--lrs 0.01] [--data-dir DIR] [--out runs/cd_adam_fig2]

Data: scikit-learn's breast_cancer and binarized digits (offline), plus every LIBSVM file named
phishing, mushrooms, a9a or w8a found in ``--data-dir`` (nothing is downloaded). Compressors: scaled
sign (||x||_1/d, ``sign``) and Top-1 (``topk:k=1``), on both links. Methods: CD-Adam, AMSGrad + EF
(COMP-AMS, EF on both sides), AMSGrad with naive compression (both sides), uncompressed AMSGrad, and
EF21 with bidirectional Top-K (K = 0.016 d, at least 1) and SGD (lr ``--ef21-lr``, the paper's 0.1)
where ``ef21`` exists. beta1 = 0.9, beta2 = 0.99, nu = 1e-8, full local gradients (the paper does not
say). With several ``--lrs`` each method keeps its best final gradient norm (the paper's grid search).
Bits are the bytes of the real frames, both directions, per worker (the broadcast counted once per
worker). Writes metrics files, fig2.png and table.md.
"""
from __future__ import annotations

import argparse
import json
import os

import numpy as np

from common.algorithms import ALGORITHMS
from common.config import RunConfig
from runtime.engine import run_inproc
from runtime.metrics import read_metrics

LIBSVM = ("phishing", "mushrooms", "a9a", "w8a")
COMPRESSORS = {"scaled sign": "sign", "Top-1": "topk:k=1"}
COMPRESSED = {"CD-Adam": "cd-adam", "AMSGrad + EF": "amsgrad-ef", "AMSGrad naive": "amsgrad-naive"}


def curve(path, n):
    recs = read_metrics(path)
    its, bits, g = [0], [0.0], [recs[0]["initial"]["grad_norm_sq"]]
    for r in recs:
        if r["event"] == "round":
            its.append(r["round"] + 1)
            bits.append(8 * (r["cum_bytes_up"] + r["cum_bytes_down"]) / n)
            g.append(r["grad_norm_sq"])
    return np.array(its), np.array(bits), np.sqrt(np.array(g))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=300)
    ap.add_argument("--workers", type=int, default=20)
    ap.add_argument("--lrs", type=float, nargs="+", default=[0.01], help="step sizes tried for the AMSGrad methods")
    ap.add_argument("--ef21-lr", type=float, default=0.1)
    ap.add_argument("--data-dir", default=None, help="folder with LIBSVM files (phishing, mushrooms, a9a, w8a)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/cd_adam_fig2")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    n = args.workers
    datasets = {"breast_cancer": "nonconvex-logistic:dataset=breast_cancer", "digits": "nonconvex-logistic:dataset=digits"}
    for name in LIBSVM:
        path = os.path.join(args.data_dir, name) if args.data_dir else None
        if path and os.path.isfile(path):
            datasets[name] = f"nonconvex-logistic:dataset=libsvm,path={os.path.abspath(path)}"
    have_ef21 = "ef21" in ALGORITHMS

    def run(tag, algorithm, problem, up, down, lrs):
        best = None
        for lr in lrs:
            path = os.path.join(args.out, f"{tag}_lr{lr}.jsonl")
            config = RunConfig(algorithm=algorithm, uplink=up, downlink=down, problem=problem, workers=n,
                               rounds=args.rounds, lr=str(lr), seed=args.seed)
            try:
                run_inproc(config, path, progress=False)
            except RuntimeError as exc:  # diverged: not a candidate
                print(f"{tag} lr={lr}: {exc}", flush=True)
                continue
            its, bits, g = curve(path, n)
            if best is None or g[-1] < best[3][-1]:
                best = (lr, its, bits, g)
        return best

    results = {}
    for dname, problem in datasets.items():
        base = run(f"{dname}_amsgrad", "amsgrad", problem, None, None, args.lrs)
        for cname, cspec in COMPRESSORS.items():
            for label, algo in COMPRESSED.items():
                results[(dname, cname, label)] = run(f"{dname}_{algo}_{cname.replace(' ', '')}", algo, problem, cspec, cspec, args.lrs)
            results[(dname, cname, "AMSGrad (uncompressed)")] = base
            if have_ef21:
                k = "topk:ratio=0.016"
                results[(dname, cname, "EF21 (Top-K both ways, SGD)")] = run(f"{dname}_ef21", "ef21", problem, k, k, [args.ef21_lr])
        for key, r in results.items():
            if key[0] == dname and r is not None:
                print(json.dumps({"dataset": key[0], "compressor": key[1], "method": key[2], "lr": r[0],
                                  "final_grad_norm": float(r[3][-1]), "bits_per_worker": float(r[2][-1])}), flush=True)

    lines = [f"CD-Adam Fig. 2 / Fig. 4: nonconvex logistic regression (lambda = 0.1), n = {n}, {args.rounds} iterations, "
             "full local gradients; ||grad f|| at the server model (= the workers' x); bits = up + down per worker\n",
             "| data | compressor | method | lr | ||grad f|| at T/10 | ||grad f|| at T | bits / worker | bits / iteration / worker |",
             "|---|---|---|---|---|---|---|---|"]
    for (dname, cname, label), r in results.items():
        if r is None:
            lines.append(f"| {dname} | {cname} | {label} | - | diverged | diverged | - | - |")
            continue
        lr, its, bits, g = r
        lines.append(f"| {dname} | {cname} | {label} | {lr:g} | {g[len(g) // 10]:.3e} | {g[-1]:.3e} | {bits[-1]:.3g} | {bits[-1] / its[-1]:.0f} |")
    table = "\n".join(lines) + "\n"
    with open(os.path.join(args.out, "table.md"), "w") as fh:
        fh.write(table)
    print(table)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = [(d, c) for d in datasets for c in COMPRESSORS]
    fig, axes = plt.subplots(2, len(columns), figsize=(4.2 * len(columns), 7), squeeze=False)
    for j, (dname, cname) in enumerate(columns):
        for (dd, cc, label), r in results.items():
            if (dd, cc) != (dname, cname) or r is None:
                continue
            _, its, bits, g = r
            axes[0][j].loglog(np.maximum(bits, 1), g, label=label)
            axes[1][j].semilogy(its, g, label=label)
        axes[0][j].set_title(f"{dname}, {cname}")
        axes[0][j].set_xlabel("bits per worker (up + down)")
        axes[1][j].set_xlabel("iterations")
        for ax in (axes[0][j], axes[1][j]):
            ax.set_ylabel("||grad f(x)||")
            ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "fig2.png"), dpi=110)
    print(f"wrote {args.out}/table.md and {args.out}/fig2.png")


if __name__ == "__main__":
    main()
