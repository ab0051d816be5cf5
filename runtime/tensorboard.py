"""TensorBoard events of the round metrics (``--tensorboard DIR``), an optional dependency:
``pip install "psc[tensorboard]"``.

Every number of a round record becomes a scalar at step ``round``, under its own name (``loss``,
``grad_norm_sq``, ``test_accuracy``, ``cum_bytes_up``, ``time_s``, ``compute_s``, ...), plus
``MB_per_worker`` (both directions, so far): the same names as the metrics file and ``psc plot``.
"""
from __future__ import annotations

import importlib.util
from typing import Any

INSTALL_HINT = 'pip install "psc[tensorboard]" (or pip install tensorboard)'


def available() -> bool:
    return importlib.util.find_spec("tensorboard") is not None


class TensorBoardWriter:
    def __init__(self, directory: str):
        if not available():
            raise ValueError(f"--tensorboard needs the tensorboard package: {INSTALL_HINT}")
        from torch.utils.tensorboard import SummaryWriter

        self.directory = directory
        self.writer = SummaryWriter(log_dir=directory)

    def round(self, record: dict[str, Any]) -> None:
        step = int(record.get("round", 0))
        for key, value in record.items():
            if key in ("round", "event") or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            self.writer.add_scalar(key, value, step)
        workers = len(record.get("bytes_up") or []) or 1
        mb = (record.get("cum_bytes_up", 0) + record.get("cum_bytes_down", 0)) / 1e6 / workers
        self.writer.add_scalar("MB_per_worker", mb, step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
