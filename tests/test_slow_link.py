"""Through a 100 Mbit/s link, messages of several MB still arrive before either side exits."""
from __future__ import annotations

import pytest

from benchmarks.shutdown_trials import run_once

pytestmark = pytest.mark.procs


def test_a_run_through_a_slow_link_loses_no_message_at_the_end(tmp_path):
    """16 MB a message (d = 4e6): about 1.3 s each way at 100 Mbit/s. ``benchmarks/shutdown_trials.py``
    repeats this at 4e6 and 1e7."""
    result = run_once(4_000_000, 100.0, str(tmp_path))
    assert result["server"] == 0 and result["worker"] == 0 and result["ok"], result
    assert result["mbit"] is not None and result["mbit"] < 105, result  # the link was as slow as configured
