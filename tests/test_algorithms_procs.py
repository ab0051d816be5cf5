"""Every algorithm over real processes (``psc launch --engine procs``): 20 rounds with 3 workers on
a quadratic, 2 on least squares (a third worker there only added 10 process start-ups, about a
quarter of the suite's slowest setup, and no check), the run ends well, and every message costs in
each direction what the method must send (the dense, sparse, sign or random-direction payload plus
bounded protocol and envelope headers).

Their rules are tested in one process, round by round, in the tests/test_algorithms_*.py files."""
from __future__ import annotations

import math

import pytest

from tests.procs import finish, records, start

pytestmark = pytest.mark.procs


# -- the MARINA-P/M3 and biased-compression families on a quadratic: one launch at a time -------

QD, QN = 120, 3
QK = QD // QN          # Rand-QK default of m3/marina, Perm-QK block
TOPK = 12           # ratio=0.1 of d = 120
OVER = 100          # protocol + envelope + payload headers
full, part, core_m = (4 * QD, 4 * QD + OVER), (4 * QK, 4 * QK + OVER), (40, 40 + OVER)
topk = (4 * TOPK, 4 * TOPK + TOPK + OVER)   # values + at most 7 index bits each
rand12 = (4 * TOPK, 4 * TOPK + OVER)        # randk:ratio=0.1, indices regenerated
top1 = (4, 4 + 1 + OVER)                     # EF21's default Top-K, 1.6% of d = 120: K = 1
topqk = (4 * QK, 4 * QK + QK + OVER)         # EF21-P's default Top-K, K = d/n
natqk = (QK // 8, 2 * QK + OVER)             # EF21-P + DCGD's default Rand-K + natural, K = d/n: a sign bit a value plus
                                             # a code field only as wide as the exponents' range needs (docs/messages.md)

QUADRATIC_METHODS = {  # name: (extra args, allowed uplink ranges, allowed downlink ranges, round-0 uplink)
    "dcgd": ([], [rand12], [full], None),
    "ef-sgd": ([], [topk], [full], None),
    "ef21": ([], [top1, full], [full], full),
    "ef21-p": ([], [full], [topqk], None),
    "ef21-p-dcgd": (["--lr", "0.005"], [natqk], [natqk], None),
    "marina": ([], [part, full], [full], full),
    "m3": ([], [part, full], [part, full], full),
    "core": ([], [core_m], [core_m], None),
}


@pytest.mark.parametrize("name", sorted(QUADRATIC_METHODS))
def test_method_runs_over_real_processes(name, tmp_path):
    extra, up_ok, down_ok, first_up = QUADRATIC_METHODS[name]
    metrics = tmp_path / "run.jsonl"
    args = ["launch", "--engine", "procs", "--device", "cpu", "--workers", str(QN), "--algorithm", name,
            "--problem", f"quadratic:d={QD},la2=1,lb2=100", "--rounds", "20", "--metrics", str(metrics), *extra]
    code, _, err = finish(start(args), 180)
    assert code == 0, err[-2000:]
    rounds = [r for r in records(str(metrics)) if r["event"] == "round"]
    assert len(rounds) == 20
    inside = lambda b, ranges: any(lo <= b < hi for lo, hi in ranges)
    for r in rounds:
        assert all(inside(b, up_ok) for b in r["bytes_up"]), (r["round"], r["bytes_up"])
        assert all(inside(b, down_ok) for b in r["bytes_down"]), (r["round"], r["bytes_down"])
    if first_up:
        assert all(first_up[0] <= b < first_up[1] for b in rounds[0]["bytes_up"])
    if len(up_ok) > 1:  # the compressed rounds must occur
        assert any(b < up_ok[0][1] for r in rounds[1:] for b in r["bytes_up"])
    if len(down_ok) > 1:
        assert any(b < down_ok[0][1] for r in rounds for b in r["bytes_down"])
    assert math.isfinite(rounds[-1]["grad_norm_sq"])


# -- NEOLITHIC, CD-Adam and their baselines on least squares, 2 workers: up to 3 launches at a time

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
            args = ["launch", "--engine", "procs", "--workers", "2", "--device", "cpu", "--rounds", "20", "--lr", "0.01",
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
