"""SIGINT and SIGTERM as an exception, so that every process of a run stops the same clean way.

``docker stop``, systemd and SLURM send SIGTERM; a terminal sends SIGINT. Inside ``stop_signals()``
either one raises ``Terminated`` in the main thread: the server writes its metrics ``end`` line and
tells the workers to stop, a worker says BYE, ``psc launch`` forwards the signal to its children
first. The command line then exits with 128 + the signal's number (130 for SIGINT, 143 for SIGTERM).
"""
from __future__ import annotations

import contextlib
import signal
import threading
from typing import Callable, Iterator

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Terminated(BaseException):
    """The process received SIGINT or SIGTERM (a BaseException, like KeyboardInterrupt, so that no
    ``except Exception`` swallows it)."""

    def __init__(self, signum: int):
        self.signum = signum
        self.name = signal.Signals(signum).name
        super().__init__(f"stopped by {self.name}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


@contextlib.contextmanager
def stop_signals(on_signal: Callable[[int], None] | None = None) -> Iterator[None]:
    """Within the block, SIGINT and SIGTERM raise ``Terminated`` (after ``on_signal(signum)``, which
    may forward the signal to child processes). Previous handlers are restored afterwards; a second
    signal while the first is being handled is not raised again. Outside the main thread (where
    Python cannot install handlers) the block runs unchanged."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []

    def handler(signum, _frame):
        first = not received
        received.append(signum)
        if on_signal is not None:
            on_signal(signum)
        if first:
            raise Terminated(signum)

    previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
