"""``runtime.signals``: a stop signal whose ``Terminated`` is lost inside a destructor (pyzmq checks for
signals while freeing a zero-copy frame, and Python drops what a destructor raises) is raised again
by ``raise_pending``, once, and never while a ``Terminated`` is being handled."""
from __future__ import annotations

import os
import signal

import pytest

from runtime.signals import Terminated, raise_pending, stop_signals


class SignalledWhileFreed:
    """Sends SIGTERM to this process from its destructor and stays there until the handler ran."""

    def __del__(self):
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(100_000):  # Python runs the handler between bytecodes, here
            pass


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_terminated_lost_in_a_destructor_is_raised_again_once():
    went_on = False
    with stop_signals():
        SignalledWhileFreed()  # freed at once: the handler's Terminated is reported and dropped
        went_on = True
        with pytest.raises(Terminated) as raised:
            raise_pending()
        assert raised.value.exit_code == 143
        raise_pending()  # once only
    assert went_on


def test_no_second_terminated_while_the_first_is_handled():
    with stop_signals():
        with pytest.raises(Terminated):
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                for _ in range(100_000):
                    pass
            except Terminated:
                raise_pending()  # the cleanup after a signal runs the same receive loops
                raise
    raise_pending()  # outside the block nothing is pending


def test_without_a_signal_nothing_is_raised():
    with stop_signals():
        raise_pending()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_lost_stop_signal_is_raised_before_the_supervisor_reports_the_workers_it_stopped():
    """A server whose send finds a worker's connection closed asks the supervisor about its exit
    (``Server._await_exit_report``); a stop signal lost in a destructor is raised first, since the
    launcher forwarded it to that worker and its exit is no failure."""
    from psserver.server import Server

    class Watched:
        _await_exit_report, _supervised = Server._await_exit_report, Server._supervised

        def supervise(self):
            pytest.fail("the supervisor was asked before the lost signal was raised")

    with stop_signals():
        SignalledWhileFreed()
        with pytest.raises(Terminated):
            Watched()._await_exit_report()
