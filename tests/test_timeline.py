"""``benchmarks/timeline.py``: a traced run's rounds split into parts that add up to the round."""
from __future__ import annotations

import pytest

from benchmarks.timeline import PARTS, breakdown, message_sizes, rounds_of, traced_run

pytestmark = pytest.mark.procs


def test_a_traced_run_splits_each_round_into_parts_that_add_up(tmp_path):
    rounds = 8
    records, traces = traced_run("dense", 300, 2, rounds, "cpu", str(tmp_path))
    assert message_sizes(records) == (1202, 1202)  # 300 float32 and a 2-byte lean head
    s, w = rounds_of(traces, 2)
    assert len(w) == 2 and all(len(w[i]["up_sent"]) == rounds and len(s[i]["down_sent"]) == rounds for i in w)
    parts = breakdown(s, w, rounds)
    assert set(parts) == set(PARTS) and all(len(v) == rounds - 3 for v in parts.values())
    for k in range(rounds - 3):
        assert all(parts[p][k] >= 0 for p in PARTS)
        whole = parts["down"][k] + parts["worker"][k] + parts["up"][k] + parts["server"][k]
        assert whole == pytest.approx(parts["round"][k], abs=1e-9)
        assert parts["down first"][k] <= parts["down last"][k]


def test_the_last_worker_is_the_one_whose_uplink_the_server_had_last():
    """Synthetic times (s): worker b's UP reaches the server after a's, so b's path is the round's."""
    ms = 1e-3
    s = {"a": {"down_sent": [0, 10 * ms, 20 * ms], "up_got": [0, 7 * ms, 17 * ms]},
         "b": {"down_sent": [0, 10.1 * ms, 20.1 * ms], "up_got": [0, 8 * ms, 18 * ms]}}
    w = {"a": {"down_got": [1 * ms, 11 * ms, 21 * ms], "up_sent": [0, 6 * ms, 16 * ms]},
         "b": {"down_got": [2 * ms, 12 * ms, 22 * ms], "up_sent": [0, 7.5 * ms, 17.5 * ms]}}
    parts = breakdown(s, w, 4)
    assert parts["round"] == pytest.approx([10.0])
    assert parts["down"] == pytest.approx([2.0]) and parts["worker"] == pytest.approx([5.5])
    assert parts["up"] == pytest.approx([0.5]) and parts["server"] == pytest.approx([2.0])
    assert parts["down first"] == pytest.approx([1.0]) and parts["down last"] == pytest.approx([2.0])
