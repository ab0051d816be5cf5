"""``psc plot``: curves of any metric against any other, one line per metrics file.

A FIELD is a key of the round records (``round``, ``time_s``, ``cum_bytes_up``, ``grad_norm_sq``,
...), or ``cum_bits_up`` / ``cum_bits_down`` (8 x bytes), optionally followed by ``/n`` to divide by
the number of workers (the papers' "bits / n" axes).
"""
from __future__ import annotations

import os

from psserver.metrics import read_metrics


def field_values(records: list[dict], field: str, workers: int, path: str) -> list[float]:
    name, per_worker = (field[:-2], True) if field.endswith("/n") else (field, False)
    scale = 1.0 / workers if per_worker else 1.0
    if name in ("cum_bits_up", "cum_bits_down"):
        name, scale = name.replace("bits", "bytes"), scale * 8
    values = []
    for r in records:
        if name not in r:
            known = sorted(k for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
            raise ValueError(f"{path}: no field {name!r} in its round records (fields: {', '.join(known)})")
        v = r[name]
        values.append(float("nan") if v is None else float(v) * scale)
    return values


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
        ax.plot(field_values(rounds, x, workers, path), field_values(rounds, y, workers, path), label=label)
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
