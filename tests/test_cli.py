"""The psc command line in-process (click's runner): listings, config files, plotting, exit codes."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from psc.cli import main


def run(*args):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_list_compressors_json_has_constants_and_measured_bits():
    result = run("list", "compressors", "--json", "--dim", "10000", "--workers", "4")
    assert result.exit_code == 0
    data = json.loads(result.output)
    rows = {r["example"]: r for r in data["compressors"]}
    assert rows["sign:scale=l1"]["wire_bits_per_coord"] == pytest.approx(1.0, abs=0.05)
    assert rows["permk"]["constants"]["theta"] == 0.0
    assert rows["permk"]["wire_bits_per_coord"] == pytest.approx(32 / 4, rel=0.02)
    assert rows["identity"]["wire_bits_per_coord"] == pytest.approx(32, rel=0.01)


def test_list_compressors_table_and_a_chain():
    result = run("list", "compressors", "-d", "1000", "topk:ratio=0.1+natural")
    assert result.exit_code == 0 and "topk:ratio=0.1+natural" in result.output
    assert run("list", "compressors", "nosuch").exit_code == 1


def test_list_algorithms_and_problems():
    algos = json.loads(run("list", "algorithms", "--json").output)
    assert {"gd", "marina-p"} <= {a["name"] for a in algos}
    probs = json.loads(run("list", "problems", "--json").output)
    assert "quadratic" in {p["name"] for p in probs}


def test_toml_config_and_command_line_precedence(tmp_path):
    cfg = tmp_path / "run.toml"
    metrics = tmp_path / "m.jsonl"
    cfg.write_text(f'algorithm = "marina-p"\nrounds = 4\nproblem = "quadratic:d=12"\nworkers = 3\nmetrics = "{metrics}"\nlr = 0.05\n')
    result = run("launch", "--engine", "inproc", "--config", str(cfg), "--rounds", "6")
    assert result.exit_code == 0, result.output
    lines = [json.loads(l) for l in metrics.read_text().splitlines()]
    assert lines[0]["config"]["algorithm"] == "marina-p" and lines[0]["config"]["rounds"] == 6
    assert lines[0]["lr"] == 0.05 and lines[0]["workers"] == 3
    bad = tmp_path / "bad.toml"
    bad.write_text('algorithmm = "gd"\n')
    result = run("launch", "--config", str(bad))
    assert result.exit_code == 2 and "unknown option 'algorithmm'" in result.output


def test_plot_draws_any_field_against_any_other(tmp_path):
    metrics = tmp_path / "m.jsonl"
    assert run("launch", "--engine", "inproc", "--rounds", "5", "--workers", "2", "--problem", "quadratic:d=8", "--metrics", str(metrics)).exit_code == 0
    out = tmp_path / "p.png"
    result = run("plot", str(metrics), str(metrics), "--x", "cum_bits_down/n", "--y", "grad_norm_sq", "--logy", "-o", str(out))
    assert result.exit_code == 0 and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = run("plot", str(metrics), "--x", "nosuch", "--y", "loss", "-o", str(out))
    assert result.exit_code == 2 and "no field 'nosuch'" in result.output


def test_dtype_choices_are_the_configs():
    from common.config import DTYPES
    from psc.runopts import DTYPE_NAMES

    assert sorted(DTYPE_NAMES) == sorted(DTYPES)
