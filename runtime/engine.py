"""The in-process engine: the same rules and the same wire format as the real processes, in one
process, for tests and for experiments with hundreds of workers.

Every uplink and downlink is encoded to frames and decoded again, exactly as over a socket, so the
trajectory and the byte counts equal those of ``psc launch --engine procs`` (on the CPU).
"""
from __future__ import annotations

from typing import Callable

from common.config import RunConfig
from runtime.setup import RunSetup
from runtime.server_core import ServerCore
from runtime.metrics import MetricsWriter
from runtime.progress import progress_bar
from runtime.worker_core import WorkerCore, resolve_device


def run_inproc(config: RunConfig, metrics_path: str | None = None, device: str = "cpu", progress: bool = True,
               until: Callable[[dict], bool] | None = None) -> ServerCore:
    """Run ``config.rounds`` rounds (fewer if ``until(round_record)`` becomes true) and return the
    server side, whose ``last`` holds the last round's record."""
    setup = RunSetup.build(config)
    metrics = MetricsWriter(metrics_path)
    try:
        server = ServerCore(setup, metrics)
        workers = [WorkerCore(setup, rank, resolve_device(device, rank)) for rank in range(config.workers)]
        server.begin(engine="inproc")
        with progress_bar(config.rounds, progress) as bar:
            for t in range(config.rounds):
                downs = server.round(t, [w.uplink(t) for w in workers])
                for worker, frames in zip(workers, downs):
                    worker.downlink(t, frames)
                bar.update(server.last)
                if until is not None and until(server.last):
                    break
        server.end(engine="inproc")
        return server
    finally:
        metrics.close()
