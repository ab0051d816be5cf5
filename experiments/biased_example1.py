"""Beznosikov et al. 2023, Example 1 (spec/biased-compression.md section 2): DCGD with Top-1 diverges,
error feedback (Algorithm 1) with Top-1 converges.

    python experiments/biased_example1.py [--quick] [--out runs/biased_example1]

Problem ``biased-example1`` (3 workers, d = 3, x^0 = (1, 1, 1), x* = 0), float64, in-process engine,
eta = 0.005. DCGD + Top-1 follows x^k = (1 + 11 eta/6)^k x^0 exactly; EF-SGD + Top-1 (its iterate x^k,
``average=none``, and the eq. 20 average) and uncompressed GD go to 0. Top-1 and GD are deterministic,
so one seed says everything (no band). Full: 4,000 rounds; quick: 1,500. The x axis is the papers'
payload bits (Top-1: a float32 value and its index), the real wire bytes dotted beside them.
"""
from __future__ import annotations

import math
import os
import time

import numpy as np

from figlib import Method, Result, Sweep, bits_label, cli, curve, md_table, pyplot, run_sweep, savefig, wall

ETA = 0.005
METHODS = [Method("dcgd", "topk:k=1", label="DCGD Top-1", options={"dtype": "float64"}),
           Method("ef-sgd:average=none", "topk:k=1", label="EF Top-1 (x^k)", options={"dtype": "float64"}),
           Method("ef-sgd:average=uniform", "topk:k=1", label="EF Top-1 (eq. 20 average)", options={"dtype": "float64"}),
           Method("gd", label="GD", options={"dtype": "float64"})]


def work(quick: bool) -> float:
    """Worker-rounds (report.py scales time by it)."""
    return len(METHODS) * (1500 if quick else 4000) * 3


def run(quick: bool, out: str, jobs: int) -> Result:
    t0 = time.time()
    rounds = 1500 if quick else 4000
    summary = run_sweep(Sweep(METHODS, "biased-example1", [3], [str(ETA)], [0], rounds=rounds, criterion="final-loss"),
                        out, jobs=jobs, log=lambda line: print(line, flush=True))
    curves = {r["method"]: (r, curve(os.path.join(out, r["file"]))) for r in summary["runs"]}
    predicted = (1 + 11 * ETA / 6) ** rounds * math.sqrt(3)

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    count = "8 x wire bytes"
    for label, (r, c) in curves.items():
        count = c["count"]
        g = np.maximum(np.sqrt(np.maximum(c["grad_norm_sq"], 0)), 1e-300)
        line, = ax.semilogy(c["up"], g, label=f"{label}, {wall([c]):.1f} s wall")
        ax.semilogy(c["wire_up"], g, linestyle=":", linewidth=1, color=line.get_color())
    ax.set_xlabel(bits_label(count, "uplink bits per worker"), fontsize=8)
    ax.set_ylabel("||grad f(x^k)||")
    ax.set_title(f"Example 1 (Beznosikov et al.), n = 3, d = 3, eta = {ETA}, float64", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig_name = savefig(fig, out, "example1.png")

    rows = []
    for label, (r, c) in curves.items():
        g = np.sqrt(c["grad_norm_sq"])
        rows.append([label, r["rounds"], float(g[0]), float(g[-1]), float(c["up"][-1]), float(c["wire_up"][-1]) / 8, wall([c]), r["status"]])
    table = md_table(["method", "rounds", "||grad f(x^0)||", "||grad f|| at the end", "uplink payload bits/worker",
                      "uplink wire bytes/worker", "wall s", "status"], rows)
    with open(os.path.join(out, "table.md"), "w") as fh:
        fh.write(table)
    dcgd = curves["DCGD Top-1"][0]
    ef = np.sqrt(curves["EF Top-1 (x^k)"][1]["grad_norm_sq"])
    grew = dcgd["status"] != "ok" or np.sqrt(dcgd["grad_norm_sq"]) > 10 * np.sqrt(curves["DCGD Top-1"][1]["grad_norm_sq"][0])
    shrank = ef[-1] < 1e-3 * ef[0]
    verdict = "reproduced" if grew and shrank else "partly reproduced" if grew or shrank else "not reproduced"
    measured = (f"after {rounds} rounds ||grad f|| of DCGD Top-1 went from {np.sqrt(curves['DCGD Top-1'][1]['grad_norm_sq'][0]):.3g} "
                f"to {np.sqrt(dcgd['grad_norm_sq']):.3g} (theory ||x^K|| = (1 + 11 eta/6)^K ||x^0|| = {predicted:.3g}), "
                f"EF Top-1 from {ef[0]:.3g} to {ef[-1]:.3g}, GD to {np.sqrt(curves['GD'][0]['grad_norm_sq']):.3g}")
    return Result(
        key="biased_example1", title="Biased compression, Example 1: DCGD vs error feedback with Top-1",
        claim="On Example 1, DCGD with Top-1 diverges exponentially while distributed SGD with error feedback and Top-1 converges.",
        measured=measured, verdict=verdict,
        why="DCGD grows (the exact (1 + 11 eta/6)^k law is also checked in tests/test_algorithms_biased.py) and EF shrinks by 1000x or more"
        if verdict == "reproduced" else f"DCGD grew: {grew}; EF shrank 1000x: {shrank}",
        figures=[fig_name], table=table, command="python experiments/biased_example1.py" + (" --quick" if quick else ""),
        seconds=time.time() - t0, settings=f"eta = {ETA}, {rounds} rounds, float64, seed 0 (deterministic)").save(out)


if __name__ == "__main__":
    cli(run, __doc__, "runs/biased_example1")
