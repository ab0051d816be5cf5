"""The in-process engine: the same rules and the same wire format as the real processes, in one
process, for tests and for experiments with hundreds of workers.

Every uplink and downlink is encoded to frames and decoded again, exactly as over a socket, so the
trajectory and the byte counts equal those of ``psc launch --engine procs`` (on the CPU).
"""
from __future__ import annotations

from typing import Callable, Iterator

from common.config import RunConfig
from runtime import protocol
from runtime.metrics import MetricsWriter
from runtime.progress import progress_bar
from runtime.server_core import ServerCore
from runtime.setup import RunSetup
from runtime.worker_core import WorkerCore, resolve_device


class Engine:
    """One server core and n worker cores in this process, driven round by round.

    ``rounds()`` yields ``(t, downs)`` after each round, where ``downs[i]`` are the DOWN frames worker i
    received; ``engine.server`` and ``engine.workers`` are the cores (their ``rule`` holds the state),
    so a test can look at both sides between rounds. ``run_inproc`` is this loop with a progress bar.
    """

    def __init__(self, config: RunConfig, metrics_path: str | None = None, device: str = "cpu"):
        self.config = config
        self.setup = RunSetup.build(config)
        self.metrics = MetricsWriter(metrics_path)
        try:
            self.server = ServerCore(self.setup, self.metrics)
            self.workers = [WorkerCore(self.setup, rank, resolve_device(device, rank)) for rank in range(config.workers)]
        except BaseException:
            self.metrics.close()
            raise

    def rounds(self) -> Iterator[tuple[int, list[list[bytes]]]]:
        """Run the rounds; each UP and DOWN is encoded, parsed once and decoded, as over a socket."""
        self.server.begin(engine="inproc")
        for t in range(self.config.rounds):
            yield t, self.exchange(t)

    def exchange(self, t: int) -> list[list[bytes]]:
        """Round ``t``: every worker's STATS and UP, the server's round, every worker's DOWN."""
        ups = []
        for rank, worker in enumerate(self.workers):
            stats, up = worker.uplink(t)
            self.server.stats(rank, t, protocol.parse(stats))
            ups.append(protocol.parse(up))
        downs = self.server.round(t, ups)
        for worker, frames in zip(self.workers, downs):
            worker.downlink(t, protocol.parse(frames))
        return downs

    def close(self) -> None:
        self.metrics.close()


def run_inproc(config: RunConfig, metrics_path: str | None = None, device: str = "cpu", progress: bool = True,
               until: Callable[[dict], bool] | None = None) -> ServerCore:
    """Run ``config.rounds`` rounds (fewer if ``until(round_record)`` becomes true) and return the
    server side, whose ``last`` holds the last round's record."""
    engine = Engine(config, metrics_path, device)
    try:
        with progress_bar(config.rounds, progress) as bar:
            for _ in engine.rounds():
                bar.update(engine.server.last)
                if until is not None and until(engine.server.last):
                    break
        engine.server.end(engine="inproc")
        return engine.server
    finally:
        engine.close()
