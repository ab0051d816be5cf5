"""SIGINT and SIGTERM as an exception, so that every process of a run stops the same clean way.

``docker stop``, systemd and SLURM send SIGTERM; a terminal sends SIGINT. Inside ``stop_signals()``
either one raises ``Terminated`` in the main thread: the server writes its metrics ``end`` line and
tells the workers to stop, a worker says BYE, ``psc launch`` forwards the signal to its children
first. The command line then exits with 128 + the signal's number (130 for SIGINT, 143 for SIGTERM).

A handler's exception is lost when the signal is handled inside a destructor: pyzmq checks for
signals while it frees a zero-copy frame, and Python only prints ("Exception ignored in
Frame.__dealloc__") what a ``__dealloc__`` raises. The run would then go on as if no signal had come
(seen: the launcher forwarded SIGTERM, then reported its workers' exit 143 as a failure and exited
1). So the receive loops, and the server before it asks its supervisor about a worker's exit, call
``raise_pending()``, which raises ``Terminated`` once more for a signal whose exception has not been
seen.
"""
from __future__ import annotations

import contextlib
import signal
import sys
import threading
from typing import Callable, Iterator

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)

# The signal received inside the active ``stop_signals`` block whose Terminated may have been lost,
# until ``raise_pending`` has raised it once more.
_pending: list[int] = []


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
            _pending[:] = [signum]
            raise Terminated(signum)

    previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        _pending.clear()
        for sig, old in previous.items():
            signal.signal(sig, old)


def raise_pending() -> None:
    """Raise ``Terminated`` again for a signal whose exception was lost (see the module's docstring):
    at most once per signal, and not while a ``Terminated`` is being handled (the cleanup after a
    signal may run the same loops). Receive loops call it before they wait; it costs a list test."""
    if _pending and not isinstance(sys.exc_info()[1], Terminated):
        signum = _pending.pop()
        raise Terminated(signum)
