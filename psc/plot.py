"""``psc plot``: curves of any metric against any other, one line per metrics file.

A FIELD is a key of the round records (``round``, ``time_s``, ``cum_bytes_up``, ``grad_norm_sq``,
...), or ``cum_bits_up`` / ``cum_bits_down`` (8 x bytes), optionally followed by ``/n`` to divide by
the number of workers (the papers' "bits / n" axes). Byte fields are drawn in MB; each axis says its
unit. Several ``--y`` fields give one panel each, sharing the x axis.

Each file's label is ``--label`` (one per file, in order) or, by default, the configuration values
that tell the files apart (e.g. ``lr=0.1`` and ``lr=0.01`` for two runs of one method); a single file
is labelled by its algorithm and compressors. A field that no file has, or a file that does not
exist, is a ``PlotError`` (the command line's usage error), found before anything is drawn.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from runtime.metrics import read_metrics

NAMES = {
    "round": "round", "time_s": "wall-clock time", "loss": "loss", "grad_norm_sq": "squared gradient norm",
    "test_accuracy": "test accuracy", "round_s": "round time", "compute_s": "compute time",
    "compress_s": "compress time", "server_s": "server time", "comm_s": "communication time",
}


class PlotError(ValueError):
    """What the user asked for cannot be drawn: the message says why, in one line."""


@dataclass
class Run:
    path: str
    start: dict
    rounds: list[dict]
    workers: int
    settings: dict = field(default_factory=dict)


def _field(name: str) -> tuple[str, float, bool]:
    """(record key, scale, per worker) for a FIELD such as ``cum_bits_down/n``."""
    key, per_worker = (name[:-2], True) if name.endswith("/n") else (name, False)
    scale = 1.0
    if key in ("cum_bits_up", "cum_bits_down"):
        key, scale = key.replace("bits", "bytes"), 8.0
    elif "bytes" in key:
        scale = 1e-6  # drawn in MB
    return key, scale, per_worker


def axis_label(name: str) -> str:
    """The axis label of a FIELD, with its unit: 'bits sent down per worker', 'wall-clock time (s)'."""
    key, _, per_worker = _field(name)
    base = name[:-2] if per_worker else name
    who = " per worker" if per_worker else (", all workers" if "bytes" in key or "bits" in base else "")
    for way in ("up", "down"):
        if base in (f"cum_bits_{way}", f"cum_payload_bits_{way}"):
            return f"{'payload ' if 'payload' in base else ''}bits sent {way}{who}"
        if base == f"cum_bytes_{way}":
            return f"MB sent {way}{who}"
        if base == f"bytes_{way}":
            return f"MB sent {way} this round{who}"
    if base in NAMES:
        text = NAMES[base]
    else:
        text = base.replace("_", " ")
    if base.endswith("_s"):
        text += " (s)"
    return text + (" per worker" if per_worker else "")


def load(paths: list[str]) -> list[Run]:
    runs = []
    for path in paths:
        try:
            records = read_metrics(path)
        except (OSError, ValueError) as exc:
            raise PlotError(str(exc)) from None
        start = next((r for r in records if r.get("event") == "start"), {})
        rounds = [r for r in records if r.get("event") == "round"]
        if not rounds:
            raise PlotError(f"{path}: no round records")
        workers = int(start.get("workers") or len(rounds[0].get("bytes_up", [])) or 1)
        settings = dict(start.get("config", {}))
        for key in ("uplink", "downlink", "lr"):
            if key in start:
                settings[key] = start[key]
        runs.append(Run(path, start, rounds, workers, settings))
    return runs


def check_fields(runs: list[Run], names: list[str]) -> None:
    for name in names:
        key = _field(name)[0]
        for run in runs:
            if not any(key in r for r in run.rounds):
                known = sorted({k for r in run.rounds for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
                raise PlotError(f"{run.path}: no field {key!r} in its round records (fields: {', '.join(known)}, "
                                "cum_bits_up, cum_bits_down; any of them /n)")


def series(records: list[dict], x: str, y: str, workers: int, path: str = "") -> tuple[list[float], list[float]]:
    """The (x, y) points of the round records that have both fields (a problem may measure some
    fields only every few rounds, e.g. test_accuracy with eval_every)."""
    (xn, xs, xw), (yn, ys, yw) = _field(x), _field(y)
    xv, yv = [], []
    for r in records:
        if r.get(xn) is None or r.get(yn) is None:
            continue
        xv.append(float(r[xn]) * xs / (workers if xw else 1))
        yv.append(float(r[yn]) * ys / (workers if yw else 1))
    return xv, yv


def _short(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def default_labels(runs: list[Run]) -> list[str]:
    """The configuration values that differ between the files; the file names if none do."""
    if len(runs) == 1:
        s = runs[0].settings
        label = str(s.get("algorithm", os.path.basename(runs[0].path)))
        if s.get("downlink") not in (None, "identity") or s.get("uplink") not in (None, "identity"):
            label += f" (up {s.get('uplink')}, down {s.get('downlink')})"
        return [label]
    keys = [k for k in dict.fromkeys(k for r in runs for k in r.settings)
            if len({repr(r.settings.get(k)) for r in runs}) > 1]
    if not keys:
        return [os.path.basename(r.path) for r in runs]
    labels = [", ".join(f"{k}={_short(r.settings.get(k))}" for k in keys) for r in runs]
    if len(set(labels)) < len(labels):
        labels = [f"{label} ({os.path.basename(r.path)})" for label, r in zip(labels, runs)]
    return labels


def default_title(runs: list[Run]) -> str:
    problems = {str(r.settings.get("problem")) for r in runs}
    workers = {r.workers for r in runs}
    parts = [problems.pop() if len(problems) == 1 else "several problems"]
    parts.append(f"{workers.pop()} workers" if len(workers) == 1 else "several worker counts")
    return ", ".join(parts)


def plot(paths: list[str], x: str, y: str | list[str], out: str, logy: bool = False, logx: bool = False,
         title: str | None = None, labels: list[str] | None = None) -> None:
    ys = [y] if isinstance(y, str) else list(y)
    runs = load(paths)
    check_fields(runs, [x, *ys])
    if labels and len(labels) != len(runs):
        raise PlotError(f"{len(labels)} --label for {len(runs)} files: give one per file, in order")
    labels = list(labels) if labels else default_labels(runs)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(ys), 1, figsize=(7, 3.2 + 2.3 * len(ys)), sharex=True, squeeze=False)
    for ax, yname in zip(axes[:, 0], ys):
        positive = False
        for run, label in zip(runs, labels):
            xv, yv = series(run.rounds, x, yname, run.workers, run.path)
            positive = positive or any(v > 0 for v in yv)
            ax.plot(xv, yv, label=label)
        ax.set_ylabel(axis_label(yname))
        if logy and positive:  # a panel with no positive value (a loss below 0) stays linear
            ax.set_yscale("log")
        if logx:
            ax.set_xscale("log")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    axes[-1, 0].set_xlabel(axis_label(x))
    fig.suptitle(title or default_title(runs))
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
