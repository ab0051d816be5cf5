"""Through a 100 Mbit/s link, messages of several MB still arrive before either side exits."""
from __future__ import annotations

import pytest

from benchmarks.relay import RateLimitedRelay
from tests.procs import finish, free_port, kill_all, records, start

pytestmark = pytest.mark.procs


def test_a_run_through_a_slow_link_loses_no_message_at_the_end(tmp_path):
    d = 4_000_000  # 16 MB a message: about 1.3 s each way at 100 Mbit/s
    port = free_port()
    relay = RateLimitedRelay(port, mbit_per_s=100)
    metrics = tmp_path / "run.jsonl"
    server = start(["server", "--bind", f"tcp://127.0.0.1:{port}", "--workers", "1", "--algorithm", "gd", "--lr", "0.1",
                    "--problem", f"identity-quadratic:d={d}", "--rounds", "2", "--metrics", str(metrics), "--timeout", "60"])
    worker = start(["worker", "--connect", f"tcp://127.0.0.1:{relay.port}", "--device", "cpu", "--timeout", "60"])
    try:
        code, _, err = finish(server, 300)
        assert code == 0, err[-2000:]
        wcode, _, werr = finish(worker, 120)
        assert wcode == 0, werr[-2000:]
    finally:
        kill_all([server, worker])
        relay.close()
    assert records(metrics)[-1]["ok"] is True
    achieved = relay.achieved_mbit_per_s()
    assert achieved is not None and achieved < 105, achieved  # the link was as slow as configured
