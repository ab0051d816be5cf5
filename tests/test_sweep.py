"""psc sweep: the grid, its metrics files, the summary and the best setting; bad grids are usage errors."""
from __future__ import annotations

import json
import math
import os

import pytest
from click.testing import CliRunner

from psc.cli import main
from psc.sweep import Method, Sweep, SweepError, bits_fields, lr_grid, parse_method, run_sweep, score, summarize
from runtime.metrics import read_metrics

QUAD = "quadratic:d=12,la2=1,lb2=4"


def run(*args):
    return CliRunner().invoke(main, ["sweep", *args], catch_exceptions=False)


def usage_error(result, *words):
    assert result.exit_code == 2, result.output
    line = result.stderr.strip().splitlines()[-1]
    for word in words:
        assert word in line, line
    return line


@pytest.mark.parametrize("args, words", [
    (["--method", "nosuch", "--problem", QUAD, "--lr-exp", "0"], ["unknown method 'nosuch'", "marina-p"]),
    (["--method", "gd", "--problem", QUAD, "-n", "", "--lr-exp", "0"], ["empty grid", "n"]),
    (["--method", "gd", "--problem", QUAD], ["empty grid", "step size"]),
    (["--method", "gd", "--problem", QUAD, "--lr-exp", "0", "--seeds", ""], ["empty grid", "seed"]),
    (["--method", "marina-p down=nosuch", "--problem", QUAD, "--lr-exp", "0"], ["unknown compressor 'nosuch'"]),
    (["--method", "gd up", "--problem", QUAD, "--lr-exp", "0"], ["'up' is not up=SPEC"]),
    (["--method", "gd", "--problem", "nosuch", "--lr-exp", "0"], ["unknown problem 'nosuch'"]),
    (["--method", "gd", "--problem", QUAD, "--lr-exp", "0", "--criterion", "bits-down"], ["needs a target"]),
    (["--method", "gd", "--problem", QUAD, "--lr-exp", "0", "--target", "2"], ["target", "(0, 1)"]),
    (["--method", "gd", "--problem", QUAD, "--lr", "0.1,-1"], ["positive"]),
    (["--method", "gd", "--problem", QUAD, "--lr-exp", "a,b"], ["comma-separated list of floats"]),
    (["--method", "gd", "--method", "gd", "--problem", QUAD, "--lr-exp", "0"], ["share a label"]),
])
def test_bad_grids_are_usage_errors_before_any_run(tmp_path, args, words):
    out = tmp_path / "out"
    usage_error(run(*args, "--out", str(out)), *words)
    assert not out.exists()


def test_parse_method():
    m = parse_method("marina-p:p=0.1 down=permk+natural up=identity label=MARINA-P Perm-K")
    assert (m.algorithm, m.downlink, m.uplink, m.name) == ("marina-p:p=0.1", "permk+natural", "identity", "MARINA-P Perm-K")
    assert parse_method("ef21 up=topk:k=3").name == "ef21 up=topk:k=3"
    with pytest.raises(SweepError):
        parse_method("  ")
    assert lr_grid([-1, 0, 2], [0.003]) == ["theory*0.5", "theory*1", "theory*4", "0.003"]


def test_bits_prefer_the_papers_count_when_present():
    rec = {"cum_bytes_up": 10, "cum_bytes_down": 20}
    assert bits_fields(rec) == ("8 x wire bytes", 80.0, 160.0)
    assert bits_fields({**rec, "cum_payload_bits_up": 7, "cum_payload_bits_down": 9}) == ("payload bits", 7.0, 9.0)


def test_sweep_runs_the_grid_keeps_every_run_and_picks_the_best(tmp_path):
    out = tmp_path / "sw"
    result = run("--method", "gd", "--method", "marina-p down=permk label=MARINA-P Perm-K", "--problem", QUAD,
                 "-n", "2,3", "--lr-exp", "0,1", "--lr", "1000", "--seeds", "0,1", "--rounds", "40",
                 "--target", "0.05", "--criterion", "bits-down", "--jobs", "1", "--out", str(out))
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    rows = summary["runs"]
    assert len(rows) == 2 * 2 * 3 * 2
    assert summary["bits_count"] == "payload bits"  # the papers' count, which the metrics now carry
    for r in rows:
        recs = read_metrics(str(out / r["file"]))
        assert recs[0]["event"] == "start" and recs[0]["workers"] == r["n"]
        if r["lr"] == "1000":  # far beyond 2/L: diverges, never best
            assert r["status"] in ("diverged", "failed") and score(r, "bits-down") == math.inf
            continue
        last = [x for x in recs if x["event"] == "round"][-1]
        assert r["rounds"] == last["round"] + 1
        assert r["bits_down"] == pytest.approx(last["cum_payload_bits_down"] / r["n"])
        assert r["wire_bytes_down"] == pytest.approx(last["cum_bytes_down"] / r["n"])
        if r["reached"]:  # stopped at the first round under the target
            assert last["grad_norm_sq"] <= 0.05 * recs[0]["initial"]["grad_norm_sq"]
            prev = [x for x in recs if x["event"] == "round"][-2:-1]
            assert not prev or prev[0]["grad_norm_sq"] > 0.05 * recs[0]["initial"]["grad_norm_sq"]
    assert (out / "summary.md").read_text() in result.output
    best = {(b["method"], b["n"]): b for b in summary["best"]}
    assert set(best) == {(m, n) for m in ("gd", "MARINA-P Perm-K") for n in (2, 3)}
    for (method, n), b in best.items():
        cands = [t for t in summary["table"] if t["method"] == method and t["n"] == n]
        assert b["score"] == min(t["score"] for t in cands) < math.inf
        assert b["lr"] != "1000"


def test_parallel_runs_equal_serial_ones(tmp_path):
    sweep = Sweep([Method("ef21", uplink="topk:k=2")], QUAD, [2], lr_grid([0, -1]), [0], rounds=15)
    a = run_sweep(sweep, str(tmp_path / "a"), jobs=1, log=lambda _: None)
    b = run_sweep(sweep, str(tmp_path / "b"), jobs=2, log=lambda _: None)
    key = lambda r: (r["lr"], r["rounds"], r["loss"], r["bits_up"], r["bits_down"])  # noqa: E731
    assert sorted(map(key, a["runs"])) == sorted(map(key, b["runs"]))
    assert len(os.listdir(tmp_path / "b")) == 2 + 3


def test_a_failed_seed_fails_its_setting():
    ok = {"status": "ok", "reached": True, "bits_down": 5.0, "bits_up": 1.0, "rounds": 3, "loss": 0.1, "grad_norm_sq": 1.0}
    rows = [{"method": "m", "n": 1, "lr": "a", "seed": 0, **ok}, {"method": "m", "n": 1, "lr": "a", "seed": 1, "status": "diverged"},
            {"method": "m", "n": 1, "lr": "b", "seed": 0, **ok, "bits_down": 9.0}]
    table, best = summarize(rows, "bits-down")
    assert [t["score"] for t in table] == [math.inf, 9.0]
    assert best[0]["lr"] == "b"
    with pytest.raises(SweepError, match="empty grid"):
        Sweep([], QUAD, [1], ["theory"]).check()
