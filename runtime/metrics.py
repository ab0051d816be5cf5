"""The metrics file (INTERFACE.md): JSON Lines, a start line, one line a round, an end line.

The writer also feeds every record to a ``RunSummary`` (``runtime.summary``), logs the run's
configuration and the project's version when the run starts, the summary block when it ends, and,
with ``Outputs(tensorboard=DIR)``, writes the round metrics as TensorBoard events. Callers may pass
``Outputs`` wherever a metrics path is expected.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Any, TextIO

from runtime.summary import RunSummary, project_version

log = logging.getLogger("psc.run")


@dataclass(frozen=True)
class Outputs:
    """Where a run writes: the metrics file (or None) and a TensorBoard folder (or None)."""

    metrics: str | None = None
    tensorboard: str | None = None

    def __bool__(self) -> bool:
        return bool(self.metrics or self.tensorboard)

    @staticmethod
    def metrics_file(path: "str | Outputs | None") -> str | None:
        """The metrics file of ``path``: an ``Outputs``' ``metrics``, or the path itself."""
        return path.metrics if isinstance(path, Outputs) else path


def config_line(config: dict[str, Any], dim: int, workers: int, lr: Any = None) -> str:
    """The run's configuration in one line, e.g. ``algorithm=gd problem=quadratic ... d=300``."""
    shown = {k: v for k, v in config.items() if v is not None}
    if isinstance(lr, float) and str(shown.get("lr")) != f"{lr:g}":
        shown["lr"] = f"{shown.get('lr')} ({lr:.4g})"
    shown["workers"], shown["d"] = workers, dim
    return " ".join(f"{k}={v}" for k, v in shown.items())


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


class MetricsWriter:
    """Writes one JSON object a line and flushes each, so a crash loses at most the line in flight."""

    def __init__(self, path: "str | Outputs | None", report: bool = True):
        outputs = path if isinstance(path, Outputs) else Outputs(metrics=path)
        self.path = path = outputs.metrics
        self.report = report
        self.summary = RunSummary()
        self.file: TextIO | None = None
        self.tensorboard = None
        if path:
            self.summary.paths["metrics"] = path
            directory = os.path.dirname(os.path.abspath(path))
            os.makedirs(directory, exist_ok=True)
            self.file = open(path, "w", encoding="utf-8")
        if outputs.tensorboard:
            from runtime.tensorboard import TensorBoardWriter

            try:
                self.tensorboard = TensorBoardWriter(outputs.tensorboard)
            except BaseException:
                self.close()
                raise
            self.summary.paths["tensorboard"] = outputs.tensorboard
        self.t0 = time.perf_counter()
        self.cum_up = 0
        self.cum_down = 0
        self.cum_bits_up = 0
        self.cum_bits_down = 0
        self.cum_control = 0

    def write(self, record: dict[str, Any]) -> None:
        self.summary.add(record)
        if self.tensorboard is not None and record.get("event") == "round":
            self.tensorboard.round(record)
        if self.file is not None:
            self.file.write(json.dumps(_clean(record)) + "\n")
            self.file.flush()

    def start(self, config: dict[str, Any], dim: int, workers: int, **extra: Any) -> None:
        self.t0 = time.perf_counter()
        version = project_version()
        if self.report:
            log.info("psc %s: %s", version, config_line(config, dim, workers, extra.get("lr")))
        self.write({"event": "start", "config": config, "dim": dim, "workers": workers, "version": version, **extra})

    def round(self, t: int, bytes_up: list[int], bytes_down: list[int], payload_bits_up: list[int] | None = None,
              payload_bits_down: list[int] | None = None, control_bytes: int = 0, **fields: Any) -> dict[str, Any]:
        """One round line: the algorithm's bytes per worker each way (all frames handed to the
        socket), the papers' content bits per worker each way, the round's control bytes, running
        totals of all three, and ``fields`` (loss, timings, ...)."""
        bits_up = payload_bits_up if payload_bits_up is not None else [0] * len(bytes_up)
        bits_down = payload_bits_down if payload_bits_down is not None else [0] * len(bytes_down)
        self.cum_up += sum(bytes_up)
        self.cum_down += sum(bytes_down)
        self.cum_bits_up += sum(bits_up)
        self.cum_bits_down += sum(bits_down)
        self.cum_control += control_bytes
        record = {
            "event": "round", "round": t, "time_s": time.perf_counter() - self.t0,
            "bytes_up": bytes_up, "bytes_down": bytes_down,
            "cum_bytes_up": self.cum_up, "cum_bytes_down": self.cum_down,
            "payload_bits_up": bits_up, "payload_bits_down": bits_down,
            "cum_payload_bits_up": self.cum_bits_up, "cum_payload_bits_down": self.cum_bits_down,
            "control_bytes": control_bytes, "cum_control_bytes": self.cum_control, **fields,
        }
        self.write(record)
        return record

    def end(self, **summary: Any) -> None:
        """Write the end line and log the run's summary (``self.summary``), whether the run finished or
        stopped (the summary once, if a failure while ending calls this again)."""
        first = self.summary.end is None
        self.write({"event": "end", "time_s": time.perf_counter() - self.t0, "cum_bytes_up": self.cum_up, "cum_bytes_down": self.cum_down,
                    "cum_payload_bits_up": self.cum_bits_up, "cum_payload_bits_down": self.cum_bits_down,
                    "cum_control_bytes": self.cum_control, **summary})
        if self.tensorboard is not None:
            self.tensorboard.flush()
        if self.report and first:
            log.info("%s", self.summary.text())

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None
        if self.file is not None:
            self.file.close()
            self.file = None


def read_metrics(path: str) -> list[dict[str, Any]]:
    """All records of a metrics file; a clear error for a missing or malformed file."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"metrics file {path!r} does not exist")
    records = []
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{number}: not a JSON line ({exc.msg})") from None
    return records
