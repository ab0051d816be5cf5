"""What the figure scripts share: the import path, curves read from metrics files, bands over seeds,
the bit axis (the papers' payload bits when the metrics carry them, otherwise 8 x the wire bytes,
and the label says which) with the real wire bytes beside it (a dotted line of the same colour),
each run's wall-clock in its legend entry, markdown tables and the verdict record that
``report.py`` collects.

Every script has ``run(quick, out, jobs) -> Result`` and a ``main()`` for the command line.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # `python experiments/x.py` runs this checkout, not an installed copy
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

from psc import sweep as _sweep  # noqa: E402
from psc.sweep import Method, Sweep, lr_grid  # noqa: E402,F401
from runtime.metrics import read_metrics  # noqa: E402

REUSE = False  # report.py --reuse: a sweep whose grid is unchanged is read back, not run again
RUN = [0]  # sweeps actually run in this process


def run_sweep(sweep: Sweep, out: str, jobs: int = 1, log=print) -> dict[str, Any]:
    """``psc.sweep.run_sweep``, or with ``REUSE`` the summary already in ``out`` when it was made by
    the very same grid (methods, problem, n, steps, seeds, rounds, target, criterion)."""
    path = os.path.join(out, "summary.json")
    if REUSE and os.path.isfile(path):
        with open(path) as fh:
            old = json.load(fh)
        now = {**asdict(sweep), "methods": [asdict(m) | {"name": m.name} for m in sweep.methods]}
        if json.dumps(old["sweep"], sort_keys=True) == json.dumps(json.loads(json.dumps(now, default=str)), sort_keys=True):
            log(f"reusing the {len(old['runs'])} runs in {out}")
            return old
    RUN[0] += 1
    return _sweep.run_sweep(sweep, out, jobs=jobs, log=log)


@dataclass
class Result:
    """One figure's outcome, as the report prints it."""

    key: str
    title: str
    claim: str  # the paper's claim in one sentence
    measured: str  # what this system measured, with numbers
    verdict: str  # "reproduced", "partly reproduced" or "not reproduced"
    why: str
    figures: list[str] = field(default_factory=list)  # paths relative to the output folder
    table: str = ""
    command: str = ""
    seconds: float = 0.0
    settings: str = ""

    def save(self, out: str) -> "Result":
        with open(os.path.join(out, "result.json"), "w") as fh:
            json.dump(asdict(self), fh, indent=1)
        return self


def parser(doc: str, out: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the reduced settings report.py --quick uses")
    ap.add_argument("--out", default=out, help="folder for metrics files, summaries, figure and table")
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time (processes)")
    return ap


def cli(module_run, doc: str, out: str) -> None:
    args = parser(doc, out).parse_args()
    t0 = time.time()
    res = module_run(args.quick, args.out, args.jobs)
    print(res.table)
    print(f"{res.verdict}: {res.measured}")
    print(f"wrote {args.out} in {time.time() - t0:.0f} s")


# -- curves ----------------------------------------------------------------------------------------

def bit_count_name(records: list[dict[str, Any]]) -> str:
    rounds = [r for r in records if r.get("event") == "round"]
    if rounds and "cum_payload_bits_down" in rounds[-1]:
        return "payload bits"
    return "8 x wire bytes"


def curve(path: str) -> dict[str, np.ndarray]:
    """Per-worker cumulative bits (up, down, total), rounds, comm rounds, time and the measured
    quantities after every round, starting at x^0 (round 0, no bits)."""
    recs = read_metrics(path)
    start = recs[0]
    n = start["workers"]
    init = start.get("initial", {})
    rows = [r for r in recs if r.get("event") == "round"]
    payload = bool(rows) and "cum_payload_bits_down" in rows[-1]

    def bits(r, side):
        return r[f"cum_payload_bits_{side}"] if payload else 8 * r[f"cum_bytes_{side}"]

    out: dict[str, list] = {k: [0.0] for k in ("round", "comm", "up", "down", "wire_up", "wire_down", "time")}
    for k in ("grad_norm_sq", "loss", "test_accuracy"):
        out[k] = [init.get(k, math.nan)]
    comm = 0
    for r in rows:
        comm += r.get("comm_rounds", 1)
        out["round"].append(r["round"] + 1)
        out["comm"].append(comm)
        out["up"].append(bits(r, "up") / n)
        out["down"].append(bits(r, "down") / n)
        out["wire_up"].append(8 * r["cum_bytes_up"] / n)
        out["wire_down"].append(8 * r["cum_bytes_down"] / n)
        out["time"].append(r.get("time_s", math.nan))
        for k in ("grad_norm_sq", "loss", "test_accuracy"):
            out[k].append(r.get(k, math.nan))
    res = {k: np.asarray(v, dtype=float) for k, v in out.items()}
    res["total"] = res["up"] + res["down"]
    res["wire_total"] = res["wire_up"] + res["wire_down"]
    res["count"] = "payload bits" if payload else "8 x wire bytes"
    return res


def best_runs(summary: dict[str, Any]) -> dict[tuple[str, int], list[str]]:
    """(method, n) -> the metrics files (one per seed) of its best step size."""
    best = {(b["method"], b["n"]): b["lr"] for b in summary["best"]}
    out: dict[tuple[str, int], list[str]] = {}
    for r in summary["runs"]:
        if best.get((r["method"], r["n"])) == r["lr"] and r["status"] == "ok":
            out.setdefault((r["method"], r["n"]), []).append(r["file"])
    return out


def band(ax, curves: list[dict], x: str, y: str, label: str, transform=None, wire: bool = False, **style) -> None:
    """Median over seeds as a line, min..max as a shaded band, on a common x grid that ends where
    the shortest seed ends (a seed that stopped at the target is not extrapolated). ``wire``: also
    the median against the real wire bits (``wire_`` + x, 8 x the bytes handed to the socket) as a
    dotted line of the same colour. The legend entry ends with the median wall-clock of a run."""
    curves = [c for c in curves if len(c[x]) > 1]
    if not curves:
        return
    f = transform or (lambda v: v)
    label = f"{label}, {wall(curves):.1f} s wall"
    if len(curves) > 1:
        label = f"{label} ({len(curves)} seeds)"
    xs, ys = _on_grid(curves, x, y, f)
    line, = ax.plot(xs, np.median(ys, 0), label=label, **style)
    if len(curves) > 1:
        ax.fill_between(xs, ys.min(0), ys.max(0), color=line.get_color(), alpha=0.2, linewidth=0)
    if wire:
        wx, wy = _on_grid(curves, "wire_" + x, y, f)
        ax.plot(wx, np.median(wy, 0), linestyle=":", linewidth=1, color=line.get_color())


def _on_grid(curves: list[dict], x: str, y: str, f) -> tuple[np.ndarray, np.ndarray]:
    if len(curves) == 1:
        return curves[0][x], np.array([f(curves[0][y])])
    grid = np.linspace(0, min(c[x][-1] for c in curves), 200)
    return grid, np.array([np.interp(grid, c[x], f(c[y])) for c in curves])


def bits_label(count: str, what: str, wire: bool = True) -> str:
    unit = "payload bits, the papers' count" if count == "payload bits" else "bits = 8 x wire bytes incl. headers"
    beside = "\n(dotted: the same runs against 8 x the wire bytes)" if wire and count == "payload bits" else ""
    return f"{what} [{unit}]{beside}"


def median_first(curves: list[dict], x: str, threshold: float, relative: bool = False) -> float:
    """The median over seeds of the x at which grad_norm_sq first falls to ``threshold`` (times
    the seed's grad_norm_sq(x^0) when ``relative``); inf when the median seed never gets there."""
    if not curves:
        return math.inf
    return float(np.median([first_at(c, "grad_norm_sq", threshold * (c["grad_norm_sq"][0] if relative else 1.0), x)
                            for c in curves]))


def wall(curves: list[dict]) -> float:
    """The median wall-clock seconds of a run (the last round's time_s)."""
    return float(np.median([c["time"][-1] for c in curves])) if curves else math.nan


def first_at(c: dict, y: str, threshold: float, x: str) -> float:
    """The x at which c[y] first falls to ``threshold`` (inf if never)."""
    hit = np.nonzero(c[y] <= threshold)[0]
    return float(c[x][hit[0]]) if len(hit) else math.inf


def md_cell(text: str) -> str:
    """``text`` for a markdown table cell: a norm's bars would split the cell."""
    return text.replace("||", "\u2016")


def md_table(header: list[str], rows: list[list[Any]]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return "not reached" if math.isinf(v) else ("-" if math.isnan(v) else f"{v:.4g}")
        return str(v)

    cell = lambda v: md_cell(fmt(v))  # noqa: E731
    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def savefig(fig, out: str, name: str) -> str:
    from matplotlib.ticker import EngFormatter

    for ax in fig.axes:  # large bit counts as 200k, 1.5M instead of long tick labels
        if ax.get_xscale() == "linear" and max(abs(v) for v in ax.get_xlim()) >= 1e4:
            ax.xaxis.set_major_formatter(EngFormatter(sep=""))
    fig.tight_layout()
    fig.savefig(os.path.join(out, name), dpi=80)
    return name


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
