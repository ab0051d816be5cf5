"""Shutdown through a slow link, repeated: does either side exit before its last messages have left?

    python benchmarks/shutdown_trials.py [--dims 4e6 1e7] [--trials 10] [--mbit 100]

Each trial runs one server and one worker process (GD, dense float32 messages of 4 d bytes, two
rounds) with the worker behind a user-space relay limited to ``--mbit`` Mbit/s each way
(``benchmarks/relay.py``). A trial passes when both exit 0, the metrics end with ``ok: true`` and the
relay's achieved rate was at most the configured one (so the link really was slow). Prints a table
of passes per d and, for failures, the last line each side wrote.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.relay import RateLimitedRelay  # noqa: E402
from tests.procs import finish, free_port, kill_all, records, start  # noqa: E402


def run_once(d: int, mbit: float, folder: str) -> dict:
    """One trial; returns the exit codes, whether the metrics ended ok, the achieved rate and the
    last stderr lines."""
    port = free_port()
    relay = RateLimitedRelay(port, mbit_per_s=mbit)
    metrics = os.path.join(folder, f"shutdown-{d}.jsonl")
    if os.path.exists(metrics):
        os.remove(metrics)
    patience = 60 + 3 * 8 * 4 * d / (mbit * 1e6)  # the run's messages at the link rate, three times over
    server = start(["server", "--bind", f"tcp://127.0.0.1:{port}", "--workers", "1", "--algorithm", "gd", "--lr", "0.1",
                    "--problem", f"identity-quadratic:d={d}", "--rounds", "2", "--metrics", metrics, "--timeout", "60"])
    worker = start(["worker", "--connect", f"tcp://127.0.0.1:{relay.port}", "--device", "cpu", "--timeout", "60"])
    try:
        code, _, err = finish(server, patience + 120)
        wcode, _, werr = finish(worker, 120)
    finally:
        kill_all([server, worker])
        relay.close()
    ended = records(metrics)[-1] if os.path.exists(metrics) else {}
    return {"server": code, "worker": wcode, "ok": ended.get("ok") is True, "mbit": relay.achieved_mbit_per_s(),
            "server_last": err.strip().splitlines()[-1:], "worker_last": werr.strip().splitlines()[-1:]}


def passed(result: dict, mbit: float) -> bool:
    return (result["server"] == 0 and result["worker"] == 0 and result["ok"]
            and result["mbit"] is not None and result["mbit"] < 1.05 * mbit)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dims", nargs="+", type=float, default=[4e6, 1e7])
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--mbit", type=float, default=100.0)
    args = parser.parse_args()
    print("| d | MB a message | passed | achieved Mbit/s (median) |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        for d in map(int, args.dims):
            results = [run_once(d, args.mbit, folder) for _ in range(args.trials)]
            ok = [r for r in results if passed(r, args.mbit)]
            rates = sorted(r["mbit"] for r in results if r["mbit"] is not None)
            median = rates[len(rates) // 2] if rates else float("nan")
            print(f"| {d:.0e} | {4 * d / 1e6:.0f} | {len(ok)}/{len(results)} | {median:.1f} |", flush=True)
            for r in results:
                if not passed(r, args.mbit):
                    print(f"    failed: {r}", flush=True)


if __name__ == "__main__":
    main()
