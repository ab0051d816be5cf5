"""The built-in demo of ``psc launch`` with no options: MARINA-P against GD, over real processes.

Both methods solve the same homogeneous quadratic (L_A = 0, so MARINA-P with Perm-K follows GD's
trajectory, Gruntkowska et al. section 4.3) with the theory step size 1/L. The demo reports how many
bytes each sent to one worker to reach the accuracy GD reaches in its rounds.
"""
from __future__ import annotations

import logging
import os

import click

from common.config import RunConfig
from psc.launch import launch
from psc.plot import plot
from psserver.metrics import read_metrics

WORKERS = 8
ROUNDS = 300
PROBLEM = "quadratic:d=2000,la2=0,lb2=100"


def first_reaching(records: list[dict], target: float) -> dict | None:
    for r in records:
        if r.get("event") == "round" and r.get("grad_norm_sq") is not None and r["grad_norm_sq"] <= target:
            return r
    return None


def run_demo(out_dir: str = "runs/demo") -> int:
    os.makedirs(out_dir, exist_ok=True)
    logging.getLogger().setLevel(logging.WARNING)  # the demo prints its own summary
    click.echo(f"psc demo: {WORKERS} worker processes, {PROBLEM}, GD and MARINA-P (Perm-K downlink)")
    paths = {}
    for name, algorithm, rounds in (("gd", "gd", ROUNDS), ("marina-p", "marina-p", int(ROUNDS * 1.2))):
        paths[name] = os.path.join(out_dir, f"{name}.jsonl")
        config = RunConfig(algorithm=algorithm, problem=PROBLEM, workers=WORKERS, rounds=rounds, lr="theory", seed=0)
        click.echo(f"  running {algorithm} for {rounds} rounds -> {paths[name]}")
        code = launch(config, paths[name], engine="procs", device="cpu", timeout=60.0)
        if code != 0:
            return code
    gd = read_metrics(paths["gd"])
    mp = read_metrics(paths["marina-p"])
    gd_last = [r for r in gd if r["event"] == "round"][-1]
    target = gd_last["grad_norm_sq"]
    hit = first_reaching(mp, target * (1 + 1e-6))
    per_worker = lambda r, key: r[key] / WORKERS
    click.echo("")
    click.echo(f"target: grad_norm_sq <= {target:.4g} (what GD reaches in {ROUNDS} rounds)")
    click.echo(f"  {'method':10} {'rounds':>6} {'down KB/worker':>15} {'up KB/worker':>13}")
    click.echo(f"  {'GD':10} {gd_last['round'] + 1:>6} {per_worker(gd_last, 'cum_bytes_down') / 1e3:>15.1f} {per_worker(gd_last, 'cum_bytes_up') / 1e3:>13.1f}")
    if hit is None:
        click.echo("  MARINA-P did not reach the target within its rounds")
        return 1
    click.echo(f"  {'MARINA-P':10} {hit['round'] + 1:>6} {per_worker(hit, 'cum_bytes_down') / 1e3:>15.1f} {per_worker(hit, 'cum_bytes_up') / 1e3:>13.1f}")
    ratio = gd_last["cum_bytes_down"] / hit["cum_bytes_down"]
    click.echo(f"MARINA-P sent {ratio:.1f}x fewer bytes server-to-worker for the same accuracy (theory: about n/2 = {WORKERS / 2:g}x);")
    figure = os.path.join(out_dir, "demo.png")
    plot([paths["gd"], paths["marina-p"]], "cum_bytes_down/n", "grad_norm_sq", figure, logy=True, title="bytes sent to one worker")
    click.echo("its worker-to-server traffic is uncompressed, like GD's.")
    click.echo(f"metrics: {paths['gd']}, {paths['marina-p']}; plot: {figure}")
    return 0
