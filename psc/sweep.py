"""``psc sweep``: a grid of runs (methods x n x step sizes x seeds), run in parallel, one metrics file
per run, one summary table and the best step size of every method by a stated criterion.

The grid is the papers' tuning protocol: only the step size is searched, over 2^i multiples of the
method's theory step (``theory*2^i``) or over a list of numbers; every other setting is the method's
own. A run stops early once ``grad_norm_sq <= target x grad_norm_sq(x^0)`` when a relative target is
given (the bits-to-epsilon measurements of the MARINA-P paper).

Criteria (smaller is better; a run that diverged or missed the target is never best):

- ``bits-down`` / ``bits-up`` / ``bits-total``: bits per worker (server-to-worker, worker-to-server,
  both) spent until the target was reached. Bits are the papers' count (``cum_payload_bits_*``) where
  the metrics have it, otherwise 8 x the wire bytes (frames with headers); the summary says which,
  and its table shows the real wire bytes per worker beside the bits.
- ``rounds``: rounds to the target.
- ``final-loss`` / ``final-grad``: the loss or grad_norm_sq of the last round.

For each (method, n, step size) the criterion is the median over seeds (a seed that failed makes the
setting fail); the best step size of each (method, n) is the one with the smallest median.

The runs use the in-process engine (``runtime.engine``): the same rules and wire format as
``psc launch``, in one process per run, ``jobs`` runs at a time.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

CRITERIA = ("bits-down", "bits-up", "bits-total", "rounds", "final-loss", "final-grad")
NEEDS_TARGET = ("bits-down", "bits-up", "bits-total", "rounds")


class SweepError(ValueError):
    """A grid that cannot run: the message says what to fix."""


@dataclass(frozen=True)
class Method:
    """One curve of a figure: an algorithm SPEC with its compressors and the label a legend shows."""

    algorithm: str
    uplink: str | None = None
    downlink: str | None = None
    label: str = ""
    lrs: tuple[str, ...] | None = None  # this method's own step sizes (None: the sweep's)
    options: dict[str, Any] = field(default_factory=dict)  # RunConfig fields of this method (rounds, dtype)

    @property
    def name(self) -> str:
        if self.label:
            return self.label
        parts = [self.algorithm] + [f"{k}={v}" for k, v in (("up", self.uplink), ("down", self.downlink)) if v]
        return " ".join(parts)


def parse_method(text: str) -> Method:
    """``ALGO[ up=SPEC][ down=SPEC][ label=TEXT]`` (whitespace-separated; a label may hold spaces
    when it comes last)."""
    text = text.strip()
    if not text:
        raise SweepError("empty --method: expected ALGO[ up=SPEC][ down=SPEC][ label=TEXT]")
    label = ""
    m = re.search(r"(?:^|\s)label=(.*)$", text)
    if m:
        label, text = m.group(1).strip(), text[: m.start()].strip()
    tokens = text.split()
    if not tokens:
        raise SweepError("--method: the algorithm SPEC comes first, e.g. 'marina-p down=permk'")
    algorithm, up, down = tokens[0], None, None
    for tok in tokens[1:]:
        key, eq, value = tok.partition("=")
        if not eq or key not in ("up", "down") or not value:
            raise SweepError(f"--method {text!r}: {tok!r} is not up=SPEC, down=SPEC or label=TEXT")
        if key == "up":
            up = value
        else:
            down = value
    return Method(algorithm, up, down, label)


def lr_grid(exponents: Iterable[float] = (), values: Iterable[float] = ()) -> list[str]:
    """Step sizes as RunConfig strings: ``theory*2^i`` for each exponent, then each fixed value."""
    out = [f"theory*{2.0 ** float(i):g}" for i in exponents]
    for v in values:
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            raise SweepError(f"step size {v!r} must be a positive finite number")
        out.append(f"{float(v):g}")
    return out


@dataclass
class Sweep:
    """The grid. ``target`` is relative to grad_norm_sq(x^0); ``problem`` may hold ``{n}``."""

    methods: list[Method]
    problem: str
    workers: list[int]
    lrs: list[str]
    seeds: list[int] = field(default_factory=lambda: [0])
    rounds: int = 100
    target: float | None = None
    criterion: str = "final-loss"

    def check(self) -> None:
        """Raise SweepError on a grid that cannot run (before any run starts)."""
        from common.algorithms import ALGORITHMS, build_algorithm
        from common.compressors import REGISTRY
        from common.config import parse_lr
        from common.problems import PROBLEMS
        from common.spec import parse, parse_chain

        for what, items in (("method", self.methods), ("n", self.workers), ("seed", self.seeds)):
            if not items:
                raise SweepError(f"empty grid: no {what} given")
        if not self.lrs and any(m.lrs is None for m in self.methods):
            raise SweepError("empty grid: no step size given (--lr-exp or --lr)")
        if self.criterion not in CRITERIA:
            raise SweepError(f"unknown criterion {self.criterion!r} (known: {', '.join(CRITERIA)})")
        if self.criterion in NEEDS_TARGET and self.target is None:
            raise SweepError(f"criterion {self.criterion!r} needs a target (--target EPS)")
        if self.target is not None and not (0 < self.target < 1):
            raise SweepError(f"target {self.target!r} must lie in (0, 1): a fraction of grad_norm_sq(x^0)")
        if self.rounds < 1:
            raise SweepError(f"rounds={self.rounds} must be at least 1")
        if any(n < 1 for n in self.workers):
            raise SweepError(f"every n must be at least 1 (got {self.workers})")
        names = [m.name for m in self.methods]
        if len(set(names)) != len(names):
            raise SweepError(f"two methods share a label: {sorted(n for n in names if names.count(n) > 1)[0]!r}")
        try:
            pname = parse(self.problem.replace("{n}", "1")).name
        except ValueError as exc:
            raise SweepError(f"problem: {exc}") from None
        if pname not in PROBLEMS:
            raise SweepError(f"unknown problem {pname!r} (known: {', '.join(PROBLEMS)})")
        for m in self.methods:
            try:
                name = parse(m.algorithm).name
            except ValueError as exc:
                raise SweepError(f"method {m.name!r}: {exc}") from None
            if name not in ALGORITHMS:
                raise SweepError(f"unknown method {name!r} (known: {', '.join(ALGORITHMS)})")
            try:
                build_algorithm(m.algorithm)
                for spec in (m.uplink, m.downlink):
                    for stage in parse_chain(spec) if spec else ():
                        if stage.name not in REGISTRY:
                            raise ValueError(f"unknown compressor {stage.name!r} (known: {', '.join(REGISTRY)})")
                for lr in m.lrs or self.lrs:
                    parse_lr(lr)
            except ValueError as exc:
                raise SweepError(f"method {m.name!r}: {exc}") from None

    def runs(self) -> list[dict[str, Any]]:
        """The grid, one dict per run (what ``run_one`` takes)."""
        self.check()
        out = []
        for m in self.methods:
            for n in self.workers:
                for lr in m.lrs or self.lrs:
                    for seed in self.seeds:
                        config = dict(algorithm=m.algorithm, uplink=m.uplink, downlink=m.downlink,
                                      problem=self.problem.replace("{n}", str(n)), workers=n, rounds=self.rounds,
                                      lr=lr, seed=seed)
                        config.update(m.options)  # e.g. NEOLITHIC's rounds = T / R, or dtype
                        out.append({"method": m.name, "n": n, "lr": lr, "seed": seed, "config": config,
                                    "target": self.target})
        return out


def run_name(run: dict[str, Any]) -> str:
    """A file name for one run: method, n, step size and seed, in letters a shell accepts."""
    safe = re.sub(r"[^A-Za-z0-9.=_-]+", "_", run["method"]).strip("_")
    lr = run["lr"].replace("theory*", "th")
    return f"{safe}__n{run['n']}__lr{lr}__s{run['seed']}.jsonl"


def bits_fields(record: dict[str, Any]) -> tuple[str, float, float]:
    """(which count, total bits up, total bits down) of one round record: the papers' payload bits
    when the metrics carry them, otherwise 8 x the wire bytes."""
    if "cum_payload_bits_up" in record and "cum_payload_bits_down" in record:
        return "payload bits", float(record["cum_payload_bits_up"]), float(record["cum_payload_bits_down"])
    return "8 x wire bytes", 8.0 * record["cum_bytes_up"], 8.0 * record["cum_bytes_down"]


def run_one(run: dict[str, Any], out_dir: str, threads: int | None = 1) -> dict[str, Any]:
    """Run one configuration to its rounds (or its target); return its summary row. The run's own
    summary log is quiet (one progress line per run instead), in this process only while it runs."""
    logger = logging.getLogger("psc.run")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        return _run_one(run, out_dir, threads)
    finally:
        logger.setLevel(level)


def _run_one(run: dict[str, Any], out_dir: str, threads: int | None) -> dict[str, Any]:
    import torch

    from common.config import RunConfig
    from runtime.engine import Engine

    if threads:
        torch.set_num_threads(threads)
    path = os.path.join(out_dir, run_name(run))
    row: dict[str, Any] = {k: run[k] for k in ("method", "n", "lr", "seed")}
    row.update(file=os.path.basename(path), status="ok", reached=None)
    t0 = time.perf_counter()
    try:
        engine = Engine(RunConfig(**run["config"]), path)
    except (ValueError, TypeError) as exc:
        row.update(status="error", error=str(exc), seconds=0.0)
        return row
    try:
        row["lr_value"] = float(engine.setup.ctx.lr)
        threshold = None
        if run["target"] is not None:
            initial = engine.setup.problem.evaluate(engine.setup.x0)
            if "grad_norm_sq" not in initial:
                raise ValueError(f"problem {run['config']['problem']!r} reports no grad_norm_sq: a target needs it")
            threshold = run["target"] * float(initial["grad_norm_sq"])
        last: dict[str, Any] = {}
        for _ in engine.rounds():
            last = engine.server.last
            if threshold is not None and last["grad_norm_sq"] <= threshold:
                break
        engine.server.end(engine="inproc", sweep=True)
    except RuntimeError as exc:  # RunFailed: the run diverged or a rule refused its input
        row.update(status="diverged" if "diverged" in str(exc) else "failed", error=str(exc))
        last = engine.server.last
    except ValueError as exc:
        row.update(status="error", error=str(exc))
        last = {}
    finally:
        engine.close()
    row["seconds"] = time.perf_counter() - t0
    if last:
        n = run["n"]
        row["bits_count"], up, down = bits_fields(last)
        row.update(rounds=last["round"] + 1, bits_up=up / n, bits_down=down / n, bits_total=(up + down) / n,
                   wire_bytes_up=last["cum_bytes_up"] / n, wire_bytes_down=last["cum_bytes_down"] / n,
                   loss=last.get("loss"), grad_norm_sq=last.get("grad_norm_sq"), time_s=last.get("time_s"))
        if threshold is not None:
            row["reached"] = row["status"] == "ok" and last["grad_norm_sq"] <= threshold
    return row


def score(row: dict[str, Any], criterion: str) -> float:
    """The row's value under ``criterion``; inf when the run failed or missed its target."""
    if row["status"] != "ok":
        return math.inf
    if criterion in NEEDS_TARGET and not row.get("reached"):
        return math.inf
    key = {"bits-down": "bits_down", "bits-up": "bits_up", "bits-total": "bits_total", "rounds": "rounds",
           "final-loss": "loss", "final-grad": "grad_norm_sq"}[criterion]
    value = row.get(key)
    return math.inf if value is None or not math.isfinite(value) else float(value)


def summarize(rows: list[dict[str, Any]], criterion: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(one row per (method, n, lr) with the median over seeds, the best lr per (method, n))."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["n"], r["lr"]), []).append(r)
    table = []
    for (method, n, lr), rs in groups.items():
        scores = [score(r, criterion) for r in rs]
        ok = [r for r in rs if r["status"] == "ok"]
        table.append({
            "method": method, "n": n, "lr": lr, "lr_value": rs[0].get("lr_value"), "seeds": len(rs),
            "failed": len(rs) - len(ok), "reached": sum(bool(r.get("reached")) for r in rs),
            "score": statistics.median(scores) if all(math.isfinite(s) for s in scores) else math.inf,
            "rounds": statistics.median(r["rounds"] for r in ok) if ok else None,
            "bits_down": statistics.median(r["bits_down"] for r in ok) if ok else None,
            "bits_up": statistics.median(r["bits_up"] for r in ok) if ok else None,
            "wire_bytes_down": _median(r.get("wire_bytes_down") for r in ok),
            "wire_bytes_up": _median(r.get("wire_bytes_up") for r in ok),
            "final_loss": _median(r.get("loss") for r in ok),
            "final_grad_norm_sq": _median(r.get("grad_norm_sq") for r in ok),
            "seconds": sum(r.get("seconds", 0.0) for r in rs),
        })
    best: dict[tuple, dict[str, Any]] = {}
    for row in table:
        key = (row["method"], row["n"])
        if key not in best or row["score"] < best[key]["score"]:
            best[key] = row
    return table, list(best.values())


def _median(values) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "not reached" if math.isinf(v) else f"{v:.4g}"
    return str(v)


def markdown(table: list[dict[str, Any]], best: list[dict[str, Any]], criterion: str, bits_count: str,
             target: float | None) -> str:
    """The summary table and the best setting per method, as markdown."""
    what = {"bits-down": f"server-to-worker bits per worker ({bits_count}) to the target",
            "bits-up": f"worker-to-server bits per worker ({bits_count}) to the target",
            "bits-total": f"bits per worker, both directions ({bits_count}), to the target",
            "rounds": "rounds to the target", "final-loss": "final loss", "final-grad": "final grad_norm_sq"}[criterion]
    head = [f"Criterion: {what}, median over seeds (smaller is better)"
            + (f"; target grad_norm_sq <= {target:g} x grad_norm_sq(x^0)" if target is not None else "") + ".", ""]
    cols = ["method", "n", "lr", "lr_value", "seeds", "failed", "reached", "score", "rounds", "bits_down", "bits_up",
            "wire_bytes_down", "wire_bytes_up", "final_loss", "final_grad_norm_sq", "seconds"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r[c]) for c in cols) + " |" for r in table]
    bl = ["", "Best step size per method and n:", "", "| method | n | lr | lr_value | score |", "|---|---|---|---|---|"]
    bl += [f"| {r['method']} | {r['n']} | {r['lr']} | {_fmt(r['lr_value'])} | {_fmt(r['score'])} |" for r in best]
    return "\n".join(head + lines + bl) + "\n"


def run_sweep(sweep: Sweep, out_dir: str, jobs: int = 1, log=print) -> dict[str, Any]:
    """Run the grid with ``jobs`` processes, write ``runs.jsonl``, ``summary.md`` and ``summary.json``
    into ``out_dir`` (with every run's metrics file) and return the summary."""
    runs = sweep.runs()
    os.makedirs(out_dir, exist_ok=True)
    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    if jobs <= 1:
        for run in runs:
            rows.append(run_one(run, out_dir, threads=None))
            log(_progress(rows[-1], len(rows), len(runs)))
    else:
        import multiprocessing

        with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("forkserver")) as pool:
            futures = [pool.submit(run_one, run, out_dir) for run in runs]
            for fut in futures:
                rows.append(fut.result())
                log(_progress(rows[-1], len(rows), len(runs)))
    table, best = summarize(rows, sweep.criterion)
    counts = sorted({r["bits_count"] for r in rows if "bits_count" in r}) or ["8 x wire bytes"]
    summary = {"sweep": {**asdict(sweep), "methods": [asdict(m) | {"name": m.name} for m in sweep.methods]},
               "bits_count": " and ".join(counts), "seconds": time.perf_counter() - t0,
               "runs": rows, "table": table, "best": best}
    with open(os.path.join(out_dir, "runs.jsonl"), "w") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
    with open(os.path.join(out_dir, "summary.json"), "w") as fh:
        json.dump(summary, fh, indent=1, default=str)
    text = markdown(table, best, sweep.criterion, summary["bits_count"], sweep.target)
    with open(os.path.join(out_dir, "summary.md"), "w") as fh:
        fh.write(text)
    summary["markdown"] = text
    return summary


def _progress(row: dict[str, Any], done: int, total: int) -> str:
    state = row["status"] if row["status"] != "ok" else ("reached" if row.get("reached") else "done")
    return (f"[{done}/{total}] {row['method']} n={row['n']} lr={row['lr']} seed={row['seed']}: {state}, "
            f"{row.get('rounds', '-')} rounds, {row.get('seconds', 0):.1f} s")
