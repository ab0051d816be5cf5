"""Helpers for tests that start real ``psc`` processes: free ports, bounded waits, clean-up."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

PSC = [sys.executable, "-m", "psc"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args: list[str], env: dict[str, str] | None = None, **kw) -> subprocess.Popen:
    """``psc ARGS`` with ``env`` added to this process's environment; the repository is importable
    (``custom:factory=tests.slow_problem:make`` works in the child)."""
    path = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": path, **(env or {})}
    return subprocess.Popen(PSC + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, **kw)


def finish(proc: subprocess.Popen, timeout: float) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"process {proc.args} did not finish within {timeout} s; stderr:\n{err[-3000:]}")
    return proc.returncode, out, err


def kill_all(procs) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.communicate()


def wait_for_rounds(path: str, rounds: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(path):
            with open(path) as fh:
                if sum(1 for line in fh if '"event": "round"' in line) >= rounds:
                    return
        time.sleep(0.1)
    raise AssertionError(f"{path} did not reach {rounds} rounds within {timeout} s")


def records(path: str) -> list[dict]:
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def register_by_hand(sock, rank: int, dim: int):
    """Register a raw DEALER ``sock`` as worker ``rank`` (HELLO, the server's WELCOME, READY) the
    way a worker does, and return the WELCOME."""
    from runtime import protocol

    sock.send_multipart(protocol.pack(b"HELLO", {"version": protocol.VERSION, "rank": rank}))
    assert sock.poll(60_000), "the server never answered HELLO"
    welcome = protocol.parse(sock.recv_multipart())
    assert welcome.kind == b"WELCOME" and welcome.header["rank"] == rank
    sock.send_multipart(protocol.pack(b"READY", {"rank": rank, "dim": dim}))
    return welcome
