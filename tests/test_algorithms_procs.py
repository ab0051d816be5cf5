"""Every algorithm over real processes (``psc launch --engine procs``): 20 rounds with 3 workers,
the run ends well, and every message costs in each direction what the method must send (the dense,
sparse, sign or random-direction payload plus bounded protocol and envelope headers).

Their rules are tested in one process, round by round, in the tests/test_algorithms_*.py files."""
from __future__ import annotations

import math

import pytest

from tests.procs import finish, records, start

pytestmark = pytest.mark.procs


# -- NEOLITHIC, CD-Adam and their baselines on least squares: up to 3 launches at a time ---------

LD = 64  # least-squares:d=64 for all; each payload is checked against what the method must send
DENSE, SIGN, RAND1 = 4 * LD, LD // 8, 4
LEAST_SQUARES_METHODS = {
    # name: (run options, core bytes up, core bytes down) -- core = values/bits, headers excluded
    "neolithic": (["--algorithm", "neolithic:r=4", "--uplink", "randk:k=1,scaled=false", "--downlink", "randk:k=2,scaled=false"], 4 * RAND1, 4 * 2 * RAND1),
    "mem-sgd": (["--algorithm", "mem-sgd", "--uplink", "randk:k=1,scaled=false"], RAND1, DENSE),
    "double-squeeze": (["--algorithm", "double-squeeze", "--uplink", "randk:k=1,scaled=false", "--downlink", "randk:k=2,scaled=false"], RAND1, 2 * RAND1),
    "ef21-sgd": (["--algorithm", "ef21-sgd", "--uplink", "randk:k=1,scaled=false"], RAND1, DENSE),
    "psgd": (["--algorithm", "psgd"], DENSE, DENSE),
    "cd-adam": (["--algorithm", "cd-adam"], SIGN, SIGN),
    "amsgrad": (["--algorithm", "amsgrad"], DENSE, DENSE),
    "amsgrad-naive": (["--algorithm", "amsgrad-naive"], SIGN, SIGN),
    "amsgrad-ef": (["--algorithm", "amsgrad-ef"], SIGN, SIGN),
    "onebit-adam": (["--algorithm", "onebit-adam:warmup=5"], SIGN, SIGN),
}
PARALLEL = 3
PAYLOADS = {"neolithic": 4}  # payloads in one message (R FCC rounds), else 1


@pytest.fixture(scope="module")
def procs_runs(tmp_path_factory):
    """Run the ten launches, at most PARALLEL at a time (the host is small and shared: a few overlap
    their start-up, too many starve each other past the join timeout)."""
    out = tmp_path_factory.mktemp("procs")
    pending = list(LEAST_SQUARES_METHODS.items())
    running, results = {}, {}
    while pending or running:
        while pending and len(running) < PARALLEL:
            name, (opts, _, _) = pending.pop(0)
            path = out / f"{name}.jsonl"
            args = ["launch", "--engine", "procs", "--workers", "3", "--device", "cpu", "--rounds", "20", "--lr", "0.01",
                    "--problem", f"least-squares:d={LD},m=50", "--metrics", str(path), *opts]
            running[name] = (start(args), path)
        name = next(iter(running))
        proc, path = running.pop(name)
        code, _, err = finish(proc, 600)
        results[name] = (code, err, path)
    return results


@pytest.mark.parametrize("name", list(LEAST_SQUARES_METHODS))
def test_method_runs_over_processes_and_sends_what_it_should(procs_runs, name):
    code, err, path = procs_runs[name]
    assert code == 0, err[-2000:]
    recs = records(path)
    rounds = [r for r in recs if r["event"] == "round"]
    assert len(rounds) == 20 and recs[-1]["event"] == "end"
    _, up_core, down_core = LEAST_SQUARES_METHODS[name]
    slack = 90 + 32 * PAYLOADS.get(name, 1)  # protocol header, envelope, one payload header each
    for r in rounds:
        if name == "onebit-adam" and r["round"] < 5:
            up, down = DENSE, DENSE  # uncompressed warm-up
        else:
            up, down = up_core, down_core
        assert all(up <= b <= up + slack for b in r["bytes_up"]), (r["round"], r["bytes_up"], up)
        assert all(down <= b <= down + slack for b in r["bytes_down"]), (r["round"], r["bytes_down"], down)
        assert math.isfinite(r["grad_norm_sq"])
    if name == "neolithic":
        assert all(r["comm_rounds"] == 4 for r in rounds)
    if name == "cd-adam":  # about d/8 + a few tens of bytes each way per worker
        assert max(rounds[-1]["bytes_up"]) <= LD // 8 + 80 and max(rounds[-1]["bytes_down"]) <= LD // 8 + 50
