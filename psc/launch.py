"""``psc launch``: one server and N worker processes on this host over real sockets (or, with
``--engine inproc``, the same rules and wire format in this process).

The server runs in this process, bound to a free loopback port; each worker is a separate
``python -m psc worker`` process. Device placement: with ``--device auto`` on a host with G GPUs,
worker i gets cuda:(i mod G); otherwise the CPU; ``--device`` names one device for all workers.

Supervision, as torchrun's agent does it:

* SIGINT and SIGTERM are forwarded to every worker; the server writes its metrics ``end`` line with
  the reason and stops; every child is gone within ``STOP_GRACE_S`` (killed after that), and the
  command exits 130 or 143.
* A worker that exits with an error while the run goes on stops the run at once; its exit status
  and the last line it wrote on stderr are reported.
* When the server is done, the workers are awaited as a group, with one deadline for all of them:
  a worker's own ``--timeout`` (it never waits longer than that for the server's last word) plus a
  grace period for its interpreter to exit.

Restarts (with ``--checkpoint`` or ``--resume``): a worker process that exits with an error is started
again with the same command line, at most ``MAX_RESTARTS`` times per rank (as torchrun's
``--max-restarts``); it takes its rank back and the run rolls back to the last checkpoint. Past
that, the run stops as without checkpoints.

Trust: the workers are started allowing exactly the factory and data folder of this run
(``WorkerPolicy.for_run``). With server keys (CURVE), each worker gets a fresh key pair in a private
temporary folder, and the server admits those keys (plus, with ``--allow DIR``, the keys in DIR).
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

from common.config import RunConfig
from runtime.engine import run_inproc
from runtime import transport
from runtime.server_core import RunFailed
from runtime.signals import stop_signals
from runtime.trust import WorkerPolicy

log = logging.getLogger("psc.launch")

STOP_GRACE_S = 4.0  # after SIGINT/SIGTERM, how long the children get before they are killed
EXIT_GRACE_S = 15.0  # after a run, how long beyond its own timeout a worker gets to exit
MAX_RESTARTS = 3  # with checkpoints: how often one rank's worker process is started again


@contextlib.contextmanager
def torch_threads(count: int | None):
    """torch's CPU threads (and so the server's compiled kernels') set to ``count`` within the block,
    then put back: ``launch`` may run inside a caller's process. ``None`` leaves them alone."""
    if count is None:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def worker_devices(n: int, device: str) -> list[str]:
    if device != "auto":
        return [device] * n
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return [f"cuda:{i % gpus}" if gpus else "cpu" for i in range(n)]


class WorkerProcess:
    """One ``psc worker`` child: its stderr is passed through to ours, and its last line is kept for
    the report when the worker fails."""

    def __init__(self, rank: int, argv: list[str], env: dict[str, str], restarts: int = 0):
        self.rank, self.argv, self.env, self.restarts = rank, argv, env, restarts
        self.proc = subprocess.Popen(argv, env=env, stderr=subprocess.PIPE, text=True, errors="replace", bufsize=1)
        self.last_line = ""
        self._reader = threading.Thread(target=self._pass_through, daemon=True, name=f"psc-worker-{rank}-stderr")
        self._reader.start()

    def _pass_through(self) -> None:
        for line in self.proc.stderr:
            sys.stderr.write(line)
            if line.strip():
                self.last_line = line.strip()
        self.proc.stderr.close()

    def failure(self) -> str | None:
        """None while running or after a clean exit; otherwise what went wrong, in one line."""
        code = self.proc.poll()
        if code is None or code == 0:
            return None
        self._reader.join(timeout=1.0)  # the last line may still be in the pipe
        how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with status {code}"
        return f"worker {self.rank} {how}" + (f": {self.last_line}" if self.last_line else "")

    def signal(self, signum: int) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signum)
            except ProcessLookupError:
                pass


def wait_all(workers: list[WorkerProcess], deadline_s: float) -> list[WorkerProcess]:
    """Wait for every worker until one shared deadline; kill and return those still running then."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline and any(w.proc.poll() is None for w in workers):
        time.sleep(0.05)
    late = [w for w in workers if w.proc.poll() is None]
    for w in late:
        w.proc.kill()
    for w in workers:
        w.proc.wait()
        w._reader.join(timeout=1.0)
    return late


def worker_key_options(keys: transport.ServerKeys, folder: str, n: int) -> tuple[transport.ServerKeys, list[list[str]]]:
    """Fresh CURVE key pairs for ``n`` workers in ``folder``: the server keys that admit them (and
    whoever ``keys.allow_dir`` admits) and each worker's ``--key``/``--server-public`` options."""
    allowed = os.path.join(folder, "allowed")
    os.makedirs(allowed)
    if keys.allow_dir is not None:
        for name in os.listdir(keys.allow_dir):
            if name.endswith(".key"):
                shutil.copy(os.path.join(keys.allow_dir, name), allowed)
    server_public = os.path.join(folder, "server.key")
    with open(server_public, "w") as fh:
        fh.write(f'curve\n    public-key = "{keys.public.decode()}"\n')
    options = []
    for rank in range(n):
        public, secret = transport.keygen(folder, f"worker{rank}")
        shutil.copy(public, allowed)
        options.append(["--key", secret, "--server-public", server_public])
    return dataclasses.replace(keys, allow_dir=allowed), options


def launch(config: RunConfig, metrics: str | None, engine: str = "procs", device: str = "auto",
           timeout: float = 60.0, heartbeat: float = 1.0, progress: bool = True,
           keys: transport.ServerKeys | None = None, round_timeout: float | None = None,
           checkpoint_dir: str | None = None, checkpoint_every: int = 50, resume: str | None = None,
           rejoin_timeout: float = 120.0, model_out: str | None = None) -> int:
    faults = dict(checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every, resume=resume, model_out=model_out)
    if engine == "inproc":
        with stop_signals():
            run_inproc(config, metrics, device="cpu" if device == "auto" else device, progress=progress, **faults)
        return 0
    faults["rejoin_timeout"] = rejoin_timeout
    with tempfile.TemporaryDirectory(prefix="psc-launch-") as folder:
        os.chmod(folder, 0o700)
        key_options: list[list[str]] = [[] for _ in range(config.workers)]
        if keys is not None:
            keys, key_options = worker_key_options(keys, folder, config.workers)
        return _launch_procs(config, metrics, device, timeout, heartbeat, progress, keys, round_timeout, key_options, faults)


def _launch_procs(config, metrics, device, timeout, heartbeat, progress, keys, round_timeout, key_options, faults) -> int:
    from psserver.server import Server

    quiet = ["-q"] if logging.getLogger().getEffectiveLevel() > logging.INFO else []
    workers: list[WorkerProcess] = []

    restartable = bool(faults["checkpoint_dir"] or faults["resume"])

    def supervise() -> bool:
        """Raise ``RunFailed`` for a worker that exited with an error, or start it again where the
        run can be restored; True if one was restarted."""
        restarted = False
        for i, w in enumerate(workers):
            reason = w.failure()
            if reason is None:
                continue
            if not restartable or w.restarts >= MAX_RESTARTS:
                raise RunFailed(reason + (f" (restarted {w.restarts} times)" if w.restarts else ""))
            log.warning("%s; starting it again (restart %d of %d)", reason, w.restarts + 1, MAX_RESTARTS)
            workers[i] = WorkerProcess(w.rank, w.argv, w.env, w.restarts + 1)
            restarted = True
        return restarted

    devices = worker_devices(config.workers, device)
    env = dict(os.environ)
    server_threads = step_threads = None
    if "OMP_NUM_THREADS" not in env and all(d == "cpu" for d in devices):
        # N CPU workers and the server on one host share its cores: more threads each only
        # oversubscribe them. A worker gets cores / N; the server, whose work alternates with the
        # workers' but whose idle threads still spin while their uplinks arrive, cores / (N + 1)
        # (2 cores, d = 1e6: a dense round took 12-13 ms instead of 20-21 at N = 2, 22 instead of
        # 27-31 at N = 4; at d = 1e7 no change beyond the noise: docs/overhead.md). Measured again
        # once idle threads spun for half a millisecond instead of about ten (runtime.openmp): the
        # server with all the cores was faster at d = 1e7 (its part 15-17 -> 10 ms) but the round
        # was not, beyond the noise, and at d = 1e6 it was not faster at all; so this split stays.
        # Between the last uplink and the downlinks the workers only wait (or finish what they left
        # for after sending), so there the server's compiled passes take every core it had, for
        # long models (``step_threads``; its part of a round at d = 1e7, N = 2: dense GD 8.8 -> 7.1
        # ms, CD-Adam 17.7 -> 13.8: docs/overhead.md).
        cores = os.cpu_count() or 1
        env["OMP_NUM_THREADS"] = str(max(1, cores // config.workers))
        import torch

        step_threads = torch.get_num_threads()
        server_threads = min(step_threads, max(1, cores // (config.workers + 1)))
    with torch_threads(server_threads):
        server = Server(config, "tcp://127.0.0.1:*", metrics, timeout=timeout, heartbeat=heartbeat,
                        join_timeout=max(120.0, timeout), progress=progress, supervise=supervise, keys=keys,
                        round_timeout=round_timeout, step_threads=step_threads, **faults)
        allow = WorkerPolicy.for_run(config).argv()

        def forward(signum: int) -> None:
            for w in workers:
                w.signal(signum)

        try:
            with stop_signals(forward):
                for rank in range(config.workers):
                    workers.append(WorkerProcess(rank, [
                        sys.executable, "-m", "psc", *quiet, "worker", "--connect", server.endpoint, "--rank", str(rank),
                        "--device", devices[rank], "--timeout", str(timeout), "--heartbeat", str(heartbeat),
                        *allow, *key_options[rank],
                    ], env))
                code = server.run()
        except BaseException:
            late = wait_all(workers, STOP_GRACE_S)
            if late:
                log.warning("killed worker(s) %s, still running %g s after the run stopped", ", ".join(str(w.rank) for w in late), STOP_GRACE_S)
            raise
        late = wait_all(workers, timeout + EXIT_GRACE_S)
        if late:
            log.error("worker(s) %s had not exited %g s after the run ended; killed", ", ".join(str(w.rank) for w in late), timeout + EXIT_GRACE_S)
        if code != 0:
            return code
        failures = [w.failure() for w in workers if w not in late]
        failures = [f for f in failures if f]
        for reason in failures:
            log.error("%s", reason)
        return 1 if failures or late else 0
