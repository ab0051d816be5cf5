"""``psc plot``: curves of any metric against any other, one line per metrics file.

A FIELD is a key of the round records (``round``, ``time_s``, ``cum_bytes_up``, ``grad_norm_sq``,
...), or ``cum_bits_up`` / ``cum_bits_down`` (8 x bytes), optionally followed by ``/n`` to divide by
the number of workers (the papers' "bits / n" axes).
"""
from __future__ import annotations

import os

from runtime.metrics import read_metrics


def _field(field: str) -> tuple[str, float, bool]:
    """(record key, scale, per worker) for a FIELD such as ``cum_bits_down/n``."""
    name, per_worker = (field[:-2], True) if field.endswith("/n") else (field, False)
    scale = 1.0
    if name in ("cum_bits_up", "cum_bits_down"):
        name, scale = name.replace("bits", "bytes"), 8.0
    return name, scale, per_worker


def series(records: list[dict], x: str, y: str, workers: int, path: str) -> tuple[list[float], list[float]]:
    """The (x, y) points of the round records that have both fields (a problem may measure some
    fields only every few rounds, e.g. test_accuracy with eval_every)."""
    (xn, xs, xw), (yn, ys, yw) = _field(x), _field(y)
    for name in (xn, yn):
        if not any(name in r for r in records):
            known = sorted({k for r in records for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
            raise ValueError(f"{path}: no field {name!r} in its round records (fields: {', '.join(known)})")
    xv, yv = [], []
    for r in records:
        if r.get(xn) is None or r.get(yn) is None:
            continue
        xv.append(float(r[xn]) * xs / (workers if xw else 1))
        yv.append(float(r[yn]) * ys / (workers if yw else 1))
    return xv, yv


def plot(paths: list[str], x: str, y: str, out: str, logy: bool = False, logx: bool = False, title: str | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for path in paths:
        records = read_metrics(path)
        start = next((r for r in records if r.get("event") == "start"), {})
        rounds = [r for r in records if r.get("event") == "round"]
        if not rounds:
            raise ValueError(f"{path}: no round records")
        workers = int(start.get("workers") or len(rounds[0].get("bytes_up", [])) or 1)
        cfg = start.get("config", {})
        label = cfg.get("algorithm", os.path.basename(path))
        if start.get("downlink") not in (None, "identity") or start.get("uplink") not in (None, "identity"):
            label += f" (up {start.get('uplink')}, down {start.get('downlink')})"
        ax.plot(*series(rounds, x, y, workers, path), label=label)
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    if logy:
        ax.set_yscale("log")
    if logx:
        ax.set_xscale("log")
    if title:
        ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
