"""Progress of the rounds: a tqdm bar on stderr when stderr is a terminal (it stays on screen at the
end); otherwise (a file, a container's or a CI's log) a log line every N rounds or every S seconds,
whichever comes first, and at the last round, with the bar's figures.

N defaults to a tenth of the rounds and S to 30 s; ``PSC_PROGRESS_ROUNDS`` and
``PSC_PROGRESS_SECONDS`` set them.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import time

from tqdm import tqdm

log = logging.getLogger("psc.progress")

EVERY_S = 30.0


def figures(record: dict) -> dict[str, str]:
    """What the bar and the log lines show of a round record."""
    shown = {k: f"{record[k]:.3g}" for k in ("loss", "grad_norm_sq", "test_accuracy") if isinstance(record.get(k), float)}
    shown["MB"] = f"{(record.get('cum_bytes_up', 0) + record.get('cum_bytes_down', 0)) / 1e6:.3g}"
    return shown


def _env_number(name: str, default: float) -> float:
    try:
        value = float(os.environ.get(name, ""))
    except ValueError:
        return default
    return value if value > 0 else default


class _Bar:
    def __init__(self, total: int, bar, lines: bool):
        self.total, self.bar, self.lines = total, bar, lines
        self.every_rounds = int(_env_number("PSC_PROGRESS_ROUNDS", max(1, total // 10)))
        self.every_s = _env_number("PSC_PROGRESS_SECONDS", EVERY_S)
        self.done = 0
        self.t0 = self.last_t = time.monotonic()
        self.last_done = 0

    def update(self, record: dict) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.set_postfix(figures(record), refresh=False)
            self.bar.update(1)
            return
        if not self.lines:
            return
        now = time.monotonic()
        if self.done >= self.total or self.done - self.last_done >= self.every_rounds or now - self.last_t >= self.every_s:
            self.last_done, self.last_t = self.done, now
            elapsed = now - self.t0
            eta = elapsed / self.done * (self.total - self.done)
            shown = ", ".join(f"{k} {v}" for k, v in figures(record).items())
            log.info("round %d/%d (%.0f%%), %s elapsed, %s left: %s", self.done, self.total,
                     100.0 * self.done / max(1, self.total), tqdm.format_interval(elapsed), tqdm.format_interval(eta), shown)


@contextlib.contextmanager
def progress_bar(total: int, enabled: bool = True):
    """``enabled=False``: neither bar nor lines (tests, the demo)."""
    terminal = enabled and sys.stderr.isatty()
    bar = tqdm(total=total, unit="round", leave=True, dynamic_ncols=True, file=sys.stderr) if terminal else None
    try:
        yield _Bar(total, bar, enabled and not terminal)
    finally:
        if bar is not None:
            bar.close()
