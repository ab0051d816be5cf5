"""``psc launch``: one server and N worker processes on this host over real sockets (or, with
``--engine inproc``, the same rules and wire format in this process).

The server runs in this process, bound to a free loopback port; each worker is a separate
``python -m psc worker`` process. Device placement: with ``--device auto`` on a host with G GPUs,
worker i gets cuda:(i mod G); otherwise the CPU; ``--device`` names one device for all workers.
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys

import torch

from common.config import RunConfig
from runtime.engine import run_inproc
from psserver.server import Server

log = logging.getLogger("psc.launch")


def worker_devices(n: int, device: str) -> list[str]:
    if device != "auto":
        return [device] * n
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return [f"cuda:{i % gpus}" if gpus else "cpu" for i in range(n)]


def launch(config: RunConfig, metrics: str | None, engine: str = "procs", device: str = "auto",
           timeout: float = 60.0, heartbeat: float = 1.0, progress: bool = True) -> int:
    quiet = ["-q"] if logging.getLogger().getEffectiveLevel() > logging.INFO else []
    if engine == "inproc":
        run_inproc(config, metrics, device="cpu" if device == "auto" else device, progress=progress)
        return 0
    server = Server(config, "tcp://127.0.0.1:*", metrics, timeout=timeout, heartbeat=heartbeat, join_timeout=max(120.0, timeout), progress=progress)
    devices = worker_devices(config.workers, device)
    env = dict(os.environ)
    if "OMP_NUM_THREADS" not in env and all(d == "cpu" for d in devices):
        # N CPU workers on one host share its cores: more threads each only oversubscribe them.
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // config.workers))
    procs = [
        subprocess.Popen([
            sys.executable, "-m", "psc", *quiet, "worker", "--connect", server.endpoint, "--rank", str(rank),
            "--device", devices[rank], "--timeout", str(timeout), "--heartbeat", str(heartbeat),
        ], env=env)
        for rank in range(config.workers)
    ]
    try:
        code = server.run()
    finally:
        for proc in procs:
            try:
                proc.wait(timeout=max(10.0, 3 * heartbeat))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    failed = [rank for rank, proc in enumerate(procs) if proc.returncode != 0]
    if code == 0 and failed:
        log.error("worker(s) %s exited with an error", ", ".join(map(str, failed)))
        return 1
    return code
