"""The in-process engine: the same rules and the same wire format as the real processes, in one
process, for tests and for experiments with hundreds of workers.

Every uplink and downlink is encoded to frames and decoded again, exactly as over a socket, so the
trajectory and the byte counts equal those of ``psc launch --engine procs`` (on the CPU).
"""
from __future__ import annotations

from typing import Callable, Iterator

from common.config import RunConfig
from runtime import checkpoint, protocol
from runtime.metrics import MetricsWriter, Outputs
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

    def __init__(self, config: RunConfig, metrics_path: str | None = None, device: str = "cpu",
                 checkpoint_dir: str | None = None, checkpoint_every: int = 50, resume: str | None = None):
        self.config = config
        self.setup = RunSetup.build(config)
        # --resume DIR: the newest complete checkpoint (refused here if damaged or of another run);
        # checkpoints then go on into DIR unless --checkpoint names another folder.
        self.resume = checkpoint.latest(resume, config.to_dict(), self.setup.dim) if resume else None
        self.checkpoint_dir = checkpoint_dir or resume
        self.checkpoint_every = checkpoint_every
        self.old_records = checkpoint.old_metrics(Outputs.metrics_file(metrics_path)) if resume else []
        self.metrics = MetricsWriter(metrics_path)
        try:
            self.server = ServerCore(self.setup, self.metrics)
            self.workers = [WorkerCore(self.setup, rank, resolve_device(device, rank)) for rank in range(config.workers)]
        except BaseException:
            self.metrics.close()
            raise

    def rounds(self) -> Iterator[tuple[int, list[list[bytes]]]]:
        """Run the rounds; each UP and DOWN is encoded, parsed once and decoded, as over a socket.
        With a checkpoint folder, the whole run is saved at every ``checkpoint_every``-th round
        boundary; with ``resume``, the rounds start at the checkpoint's."""
        first = 0
        if self.resume is not None:
            self.restore(self.resume, self.old_records)
            first = self.resume.round
        else:
            self.server.begin(engine="inproc")
            if self.checkpoint_dir:
                self.save(0)
        for t in range(first, self.config.rounds):
            if self.checkpoint_dir and t != first and t % self.checkpoint_every == 0:
                self.save(t)
            yield t, self.exchange(t)

    def exchange(self, t: int) -> list[list[bytes]]:
        """Round ``t``: every worker's STATS and UP, the server's round, every worker's DOWN."""
        ups = []
        for rank, worker in enumerate(self.workers):
            stats, up = worker.uplink(t)
            worker.settle()  # where a worker process runs it: once its UP is sent
            self.server.stats(rank, t, protocol.parse(stats))
            ups.append(protocol.parse(up))
        downs = self.server.round(t, ups)
        for worker, frames in zip(self.workers, downs):
            worker.downlink(t, protocol.parse(frames))
        self.server.record()
        return downs

    def save(self, t: int) -> str:
        """Write the checkpoint of boundary ``t`` (rounds 0..t-1 done)."""
        ckpt = checkpoint.server_snapshot(self.server, t)
        if t > 0:  # round 0's workers are new rules, as the configuration builds them
            ckpt.workers = [checkpoint.pack_state(w.state_dict()) for w in self.workers]
        return checkpoint.write(self.checkpoint_dir, ckpt, self.config.to_dict(), self.setup.dim)

    def restore(self, ckpt: checkpoint.Checkpoint, old_records=None) -> None:
        """Put the server, every worker and the metrics back at ``ckpt``'s boundary."""
        checkpoint.restore_server(self.server, ckpt, old_records)
        for rank, worker in enumerate(self.workers):  # round 0's holds no worker states: the rules are new
            worker.restore(checkpoint.unpack_state(ckpt.workers[rank], worker.device) if ckpt.workers else None)

    def close(self) -> None:
        self.metrics.close()


def run_inproc(config: RunConfig, metrics_path: str | None = None, device: str = "cpu", progress: bool = True,
               until: Callable[[dict], bool] | None = None, model_out: str | None = None,
               checkpoint_dir: str | None = None, checkpoint_every: int = 50, resume: str | None = None) -> ServerCore:
    """Run ``config.rounds`` rounds (fewer if ``until(round_record)`` becomes true) and return the
    server side, whose ``last`` holds the last round's record; ``model_out``: save the final model."""
    engine = Engine(config, metrics_path, device, checkpoint_dir, checkpoint_every, resume)
    try:
        with progress_bar(config.rounds, progress) as bar:
            for _ in engine.rounds():
                bar.update(engine.server.last)
                if until is not None and until(engine.server.last):
                    break
        if model_out:
            checkpoint.save_model(model_out, engine.setup.problem, engine.server.rule.model)
        engine.server.end(engine="inproc")
        return engine.server
    finally:
        engine.close()
