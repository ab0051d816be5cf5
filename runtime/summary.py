"""The end-of-run summary, computed from the records the metrics writer produced.

``RunSummary.add`` takes the records one by one, as ``MetricsWriter`` writes them (or as
``RunSummary.of_file`` reads them back), so the summary printed at the end of a run and the metrics
file cannot disagree. ``fields()`` gives the numbers, ``text()`` the block a user reads:

* rounds done (of those planned), the final loss / grad_norm_sq / test accuracy (the last value of
  each in the round records);
* bytes each way per worker (frames handed to the socket, headers included) and, where the records
  have them, the payload bits; the compression ratio against dense float32 (4 d bytes a message);
* the wall-clock split: the sums over rounds of the slowest worker's compute and compress time, the
  server's time and the rest (communication and waiting), as in the round records;
* the files written.

``WorkerTally`` is a worker's own short account: rounds, bytes sent and received, compute time.
"""
from __future__ import annotations

import logging
import time
from typing import Any

log = logging.getLogger("psc.summary")

FINAL_FIELDS = ("loss", "grad_norm_sq", "test_accuracy")
TIME_FIELDS = ("compute_s", "compress_s", "server_s", "comm_s")
TIME_NAMES = {"compute_s": "compute", "compress_s": "compress", "server_s": "server", "comm_s": "communication"}


def project_version() -> str:
    """The installed version of psc ("unknown" when run from a tree that is not installed)."""
    try:
        from importlib.metadata import PackageNotFoundError, version
    except ImportError:  # pragma: no cover
        return "unknown"
    try:
        return version("psc")
    except PackageNotFoundError:
        return "unknown"


def human_bytes(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} B"


def human_bits(n: float) -> str:
    for unit, scale in (("Gbit", 1e9), ("Mbit", 1e6), ("kbit", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} bit"


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class RunSummary:
    def __init__(self) -> None:
        self.start: dict[str, Any] = {}
        self.end: dict[str, Any] | None = None
        self.rounds = 0
        self.last_round: dict[str, Any] = {}
        self.final: dict[str, float] = {}
        self.up: list[int] = []
        self.down: list[int] = []
        self.payload_up: list[int] | None = None
        self.payload_down: list[int] | None = None
        self.times = {k: 0.0 for k in TIME_FIELDS}
        self.paths: dict[str, str] = {}

    @classmethod
    def of_records(cls, records: list[dict[str, Any]]) -> "RunSummary":
        summary = cls()
        for record in records:
            summary.add(record)
        return summary

    @classmethod
    def of_file(cls, path: str) -> "RunSummary":
        from runtime.metrics import read_metrics

        summary = cls.of_records(read_metrics(path))
        summary.paths["metrics"] = path
        return summary

    @staticmethod
    def _add_lists(total: list[int] | None, values: Any) -> list[int] | None:
        if not isinstance(values, list):
            return total
        total = list(total or [])
        total.extend([0] * (len(values) - len(total)))
        for i, v in enumerate(values):
            if _number(v):
                total[i] += v
        return total

    def add(self, record: dict[str, Any]) -> None:
        event = record.get("event")
        if event == "start":
            self.start = record
        elif event == "end":
            self.end = record
        elif event == "round":
            self.rounds += 1
            self.last_round = record
            for k in FINAL_FIELDS:
                if _number(record.get(k)):
                    self.final[k] = float(record[k])
            self.up = self._add_lists(self.up, record.get("bytes_up")) or []
            self.down = self._add_lists(self.down, record.get("bytes_down")) or []
            if "payload_bits_up" in record:
                self.payload_up = self._add_lists(self.payload_up, record["payload_bits_up"])
            if "payload_bits_down" in record:
                self.payload_down = self._add_lists(self.payload_down, record["payload_bits_down"])
            for k in TIME_FIELDS:
                if _number(record.get(k)):
                    self.times[k] += float(record[k])

    def fields(self) -> dict[str, Any]:
        """The summary's numbers (what ``text`` prints)."""
        config = self.start.get("config", {})
        n = int(self.start.get("workers") or len(self.up) or 1)
        dim = self.start.get("dim")
        end = self.end or {}
        out: dict[str, Any] = {
            "algorithm": config.get("algorithm"), "problem": config.get("problem"), "workers": n, "dim": dim,
            "rounds": self.rounds, "rounds_planned": config.get("rounds"),
            "ok": end.get("ok", True if self.end is not None else None), "error": end.get("error"),
            "time_s": end.get("time_s", self.last_round.get("time_s")),
            **self.final,
        }
        for way, per_worker, payload in (("up", self.up, self.payload_up), ("down", self.down, self.payload_down)):
            total = sum(per_worker)
            out[f"bytes_{way}"] = total
            out[f"bytes_{way}_per_worker"] = total / n
            dense = 4 * dim * self.rounds * n if dim else 0
            out[f"ratio_{way}"] = dense / total if total and dense else None
            if payload is not None:
                bits = sum(payload)
                out[f"payload_bits_{way}"] = bits
                out[f"payload_bits_{way}_per_worker"] = bits / n
                out[f"payload_ratio_{way}"] = 8 * dense / bits if bits and dense else None
        out.update(self.times)
        out["paths"] = dict(self.paths)
        return out

    def text(self) -> str:
        f = self.fields()
        if not self.start:
            return f"run summary: the run stopped before its first round: {f['error'] or 'no reason given'}"
        planned = f["rounds_planned"]
        done = f"{f['rounds']} of {planned} rounds" if planned not in (None, f["rounds"]) else f"{f['rounds']} rounds"
        status = "" if f["ok"] in (True, None) else f" (stopped: {f['error'] or 'failed'})"
        time_s = f["time_s"] if _number(f["time_s"]) else 0.0
        lines = [f"run summary: {f['algorithm']} on {f['problem']}, {f['workers']} workers, d = {f['dim']}: "
                 f"{done} in {time_s:.2f} s{status}"]
        final = []
        for k in FINAL_FIELDS:
            if k in f:
                final.append(f"test accuracy {f[k]:.2%}" if k == "test_accuracy" else f"{k} {f[k]:.4g}")
        lines.append("  final       " + (", ".join(final) if final else "no round finished"))
        for way, name in (("up", "uplink"), ("down", "downlink")):
            ratio = f[f"ratio_{way}"]
            vs = f", compression {ratio:.3g}x against dense float32" if ratio else ""
            line = (f"  {name:11} {human_bytes(f[f'bytes_{way}_per_worker'])} per worker "
                    f"({human_bytes(f[f'bytes_{way}'])} in all){vs}")
            if f"payload_bits_{way}" in f:
                pr = f[f"payload_ratio_{way}"]
                line += (f"; payload {human_bits(f[f'payload_bits_{way}_per_worker'])} per worker"
                         + (f" (compression {pr:.3g}x against 32 bits a coordinate)" if pr else ""))
            lines.append(line)
        split = sum(f[k] for k in TIME_FIELDS)
        if split > 0:
            parts = ", ".join(f"{TIME_NAMES[k]} {f[k]:.2f} s ({f[k] / split:.0%})" for k in TIME_FIELDS)
            lines.append(f"  wall clock  {parts}")
        if f["paths"]:
            lines.append("  written     " + ", ".join(f"{k} {v}" for k, v in f["paths"].items()))
        return "\n".join(lines)


class WorkerTally:
    """A worker's own account of its run: rounds, bytes sent and received, compute and compress time.

    It wraps ``core.uplink`` (the UP frames, not the STATS, and the oracle's time); the worker adds what it
    received with ``received(envelope)``."""

    def __init__(self, core) -> None:
        from runtime import protocol

        self.rank = core.rank
        self.device = core.device
        self.rounds = 0
        self.sent = 0
        self.got = 0
        self.compute_s = 0.0
        self.compress_s = 0.0
        self.t0 = time.perf_counter()
        uplink = core.uplink

        def counted(t: int) -> tuple[list[bytes], list[bytes]]:
            start = time.perf_counter()
            stats, frames = uplink(t)
            total = time.perf_counter() - start
            self.rounds += 1
            self.sent += protocol.size(frames)
            self.compute_s += core.compute_s
            self.compress_s += max(0.0, total - core.compute_s)
            return stats, frames

        core.uplink = counted

    def received(self, envelope) -> None:
        self.got += int(getattr(envelope, "nbytes", 0))

    def text(self) -> str:
        return (f"worker {self.rank} done: {self.rounds} rounds in {time.perf_counter() - self.t0:.2f} s on {self.device}, "
                f"sent {human_bytes(self.sent)}, received {human_bytes(self.got)}, "
                f"compute {self.compute_s:.2f} s, compress {self.compress_s:.2f} s")
