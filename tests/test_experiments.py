"""experiments/figlib.py: curves carry the papers' payload bits with the wire bytes beside them, and
report.py --reuse reads back a sweep whose grid is unchanged instead of running it again."""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments"))

import figlib  # noqa: E402
from runtime.metrics import read_metrics  # noqa: E402

QUAD = "quadratic:d=12,la2=1,lb2=4"


def test_curves_count_payload_bits_beside_wire_bytes_and_reuse_skips_an_unchanged_grid(tmp_path, monkeypatch):
    sweep = figlib.Sweep([figlib.Method("marina-p", downlink="permk", label="Perm-K")], QUAD, [3], figlib.lr_grid([0]), [0, 1],
                         rounds=8)
    out = str(tmp_path / "sw")
    first = figlib.run_sweep(sweep, out, jobs=1, log=lambda _: None)
    path = os.path.join(out, first["runs"][0]["file"])
    c = figlib.curve(path)
    last = [r for r in read_metrics(path) if r["event"] == "round"][-1]
    assert c["count"] == "payload bits"
    assert c["down"][-1] == pytest.approx(last["cum_payload_bits_down"] / 3)
    assert c["wire_down"][-1] == pytest.approx(8 * last["cum_bytes_down"] / 3)
    assert c["wire_total"][-1] > c["total"][-1] > 0  # headers cost something beyond the payload
    assert len(c["round"]) == len(c["time"]) == 9 and c["round"][0] == 0

    monkeypatch.setattr(figlib, "REUSE", True)
    ran = figlib.RUN[0]
    again = figlib.run_sweep(sweep, out, jobs=1, log=lambda _: None)
    assert figlib.RUN[0] == ran and again["runs"] == first["runs"]
    changed = figlib.Sweep(sweep.methods, QUAD, [3], figlib.lr_grid([0]), [0, 1], rounds=9)
    figlib.run_sweep(changed, out, jobs=1, log=lambda _: None)
    assert figlib.RUN[0] == ran + 1  # another grid runs again

    plt = figlib.pyplot()
    fig, ax = plt.subplots()
    curves = [figlib.curve(os.path.join(out, r["file"])) for r in first["runs"]]
    figlib.band(ax, curves, "down", "grad_norm_sq", "Perm-K", wire=True)
    assert "s wall (2 seeds)" in ax.get_lines()[0].get_label() and len(ax.get_lines()) == 2
    assert np.isfinite(figlib.median_first(curves, "down", 1.0, relative=True))
    plt.close(fig)


def test_report_only_without_the_other_figures_says_what_is_missing(tmp_path):
    """--only KEY reads every other figure from --runs; an empty folder is a clear error, not a traceback."""
    import subprocess

    script = os.path.join(os.path.dirname(figlib.__file__), "report.py")
    got = subprocess.run([sys.executable, script, "--quick", "--only", "biased_fig3", "--runs", str(tmp_path), "--docs", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert got.returncode != 0
    assert "marina_p_fig1" in got.stderr and "run the whole report" in got.stderr and "Traceback" not in got.stderr
    assert not (tmp_path / "results.md").exists()
