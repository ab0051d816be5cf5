"""A progress bar on the terminal (tqdm on stderr; silent when stderr is not a terminal)."""
from __future__ import annotations

import contextlib

from tqdm import tqdm


class _Bar:
    def __init__(self, bar):
        self.bar = bar

    def update(self, record: dict) -> None:
        if self.bar is None:
            return
        shown = {k: f"{record[k]:.3g}" for k in ("grad_norm_sq", "loss", "test_accuracy") if isinstance(record.get(k), float)}
        shown["MB"] = f"{(record.get('cum_bytes_up', 0) + record.get('cum_bytes_down', 0)) / 1e6:.3g}"
        self.bar.set_postfix(shown, refresh=False)
        self.bar.update(1)


@contextlib.contextmanager
def progress_bar(total: int, enabled: bool = True):
    bar = tqdm(total=total, unit="round", disable=None, leave=False, dynamic_ncols=True) if enabled else None
    try:
        yield _Bar(bar)
    finally:
        if bar is not None:
            bar.close()
