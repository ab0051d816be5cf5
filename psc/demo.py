"""The built-in demo of ``psc launch`` with no options: a small CNN on scikit-learn's digits, 4 worker
processes over real sockets, trained with a compressed method of the papers and, for comparison, with
its uncompressed counterpart for the same number of rounds.

Compressed: CD-Adam (Wang, Lin, Chen 2022), scaled sign both ways (d bits + one float per message, about
32x fewer bytes than float32). Uncompressed: distributed AMSGrad (the same optimizer, full vectors both
ways).

It prints the test accuracy of both runs and the bytes each sent (both directions, headers included,
as counted by the runtime), and writes the metrics files and a plot under ``runs/demo/``.
"""
from __future__ import annotations

import json
import logging
import os
import time

import click

from common.config import RunConfig
from runtime.metrics import read_metrics

WORKERS = 4
ROUNDS = 250
PROBLEM = "cnn:dataset=digits,batch=32"
# (name, algorithm spec, uplink, downlink, lr)
COMPRESSED = ("cd-adam", "cd-adam", "sign", "sign", "0.003")
UNCOMPRESSED = ("amsgrad", "amsgrad", None, None, "0.003")


def summary(path: str) -> dict:
    records = read_metrics(path)
    rounds = [r for r in records if r.get("event") == "round"]
    last = rounds[-1]
    return {"rounds": len(rounds), "test_accuracy": last.get("test_accuracy"), "loss": last.get("loss"),
            "bytes_up": last["cum_bytes_up"], "bytes_down": last["cum_bytes_down"],
            "bytes": last["cum_bytes_up"] + last["cum_bytes_down"], "time_s": last["time_s"], "records": rounds}


def plot_demo(runs: dict[str, dict], out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for label, s in runs.items():
        rec = s["records"]
        acc = [r.get("test_accuracy") for r in rec]
        a.plot([r["round"] + 1 for r in rec], acc, label=label)
        b.plot([(r["cum_bytes_up"] + r["cum_bytes_down"]) / 1e6 for r in rec], acc, label=label)
    a.set_xlabel("round")
    b.set_xlabel("MB sent, both directions, all workers")
    b.set_xscale("log")
    for ax in (a, b):
        ax.set_ylabel("test accuracy")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"small CNN on digits, {WORKERS} workers")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def run_demo(out_dir: str = "runs/demo") -> int:
    from psc.launch import launch

    os.makedirs(out_dir, exist_ok=True)
    logging.getLogger().setLevel(logging.WARNING)  # the demo prints its own summary
    # Several CPU workers on a few cores: one thread each, or their thread pools fight (10x slower).
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    compressed, plain = COMPRESSED, UNCOMPRESSED
    click.echo(f"psc demo: {PROBLEM} (small CNN, scikit-learn digits: 1437 train / 360 test images), "
               f"{WORKERS} worker processes, {ROUNDS} rounds each")
    start = time.perf_counter()
    runs, paths = {}, {}
    for role, (name, algorithm, up, down, lr) in (("compressed", compressed), ("uncompressed", plain)):
        path = os.path.join(out_dir, f"{name}.jsonl")
        links = f", uplink {up}, downlink {down}" if up else ", full float32 vectors both ways"
        click.echo(f"  [{role}] {algorithm}, lr {lr}{links} -> {path}")
        config = RunConfig(algorithm=algorithm, uplink=up, downlink=down, problem=PROBLEM, workers=WORKERS,
                           rounds=ROUNDS, lr=lr, seed=0)
        t0 = time.perf_counter()
        code = launch(config, path, engine="procs", device="auto", timeout=60.0)
        if code != 0:
            click.echo(f"psc demo: the {name} run failed (exit {code})", err=True)
            return code
        s = summary(path)
        label = f"{name} ({role})"
        runs[label], paths[role] = s, path
        click.echo(f"      done in {time.perf_counter() - t0:.1f} s: test accuracy {s['test_accuracy']:.3f}, "
                   f"{s['bytes'] / 1e6:.2f} MB sent")
    (c_label, c), (u_label, u) = runs.items()
    ratio = u["bytes"] / c["bytes"]
    click.echo("")
    click.echo(f"  {'run':26} {'test acc':>8} {'MB up':>9} {'MB down':>9} {'MB total':>9}")
    for label, s in runs.items():
        click.echo(f"  {label:26} {s['test_accuracy']:>8.3f} {s['bytes_up'] / 1e6:>9.3f} {s['bytes_down'] / 1e6:>9.3f} {s['bytes'] / 1e6:>9.3f}")
    click.echo(f"{c_label.split()[0]} reached test accuracy {c['test_accuracy']:.1%} and sent {ratio:.1f}x fewer bytes "
               f"than {u_label.split()[0]} in the same {ROUNDS} rounds ({time.perf_counter() - start:.0f} s in all).")
    figure = os.path.join(out_dir, "demo.png")
    plot_demo(runs, figure)
    with open(os.path.join(out_dir, "summary.json"), "w", encoding="utf-8") as fh:
        json.dump({label: {k: v for k, v in s.items() if k != "records"} for label, s in runs.items()} | {"bytes_ratio": ratio}, fh, indent=2)
    click.echo(f"metrics: {paths['compressed']}, {paths['uncompressed']}; plot: {figure}")
    return 0
