"""The metrics file (INTERFACE.md): JSON Lines, a start line, one line a round, an end line."""
from __future__ import annotations

import json
import math
import os
import time
from typing import Any, TextIO


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

    def __init__(self, path: str | None):
        self.path = path
        self.file: TextIO | None = None
        if path:
            directory = os.path.dirname(os.path.abspath(path))
            os.makedirs(directory, exist_ok=True)
            self.file = open(path, "w", encoding="utf-8")
        self.t0 = time.perf_counter()
        self.cum_up = 0
        self.cum_down = 0

    def write(self, record: dict[str, Any]) -> None:
        if self.file is not None:
            self.file.write(json.dumps(_clean(record)) + "\n")
            self.file.flush()

    def start(self, config: dict[str, Any], dim: int, workers: int, **extra: Any) -> None:
        self.t0 = time.perf_counter()
        self.write({"event": "start", "config": config, "dim": dim, "workers": workers, **extra})

    def round(self, t: int, bytes_up: list[int], bytes_down: list[int], **fields: Any) -> dict[str, Any]:
        self.cum_up += sum(bytes_up)
        self.cum_down += sum(bytes_down)
        record = {
            "event": "round", "round": t, "time_s": time.perf_counter() - self.t0,
            "bytes_up": bytes_up, "bytes_down": bytes_down,
            "cum_bytes_up": self.cum_up, "cum_bytes_down": self.cum_down, **fields,
        }
        self.write(record)
        return record

    def end(self, **summary: Any) -> None:
        self.write({"event": "end", "time_s": time.perf_counter() - self.t0, "cum_bytes_up": self.cum_up, "cum_bytes_down": self.cum_down, **summary})

    def close(self) -> None:
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
