"""Usage errors of the psc command line: one line on stderr, exit status 2, before any process starts;
a fast start-up; -q anywhere; the current folder importable for custom:factory=."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from psc.cli import main
from tests.procs import PSC, ROOT


@pytest.fixture
def no_workers(monkeypatch):
    """Any attempt to start a worker process fails the test."""
    import psc.launch

    def refuse(*args, **kwargs):
        raise AssertionError("a worker process was started")

    monkeypatch.setattr(psc.launch, "WorkerProcess", refuse)
    monkeypatch.setattr(subprocess, "Popen", refuse)


def run(*args):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def one_line_usage_error(result, *words):
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def test_bad_connect_and_bind_addresses(no_workers):
    line = one_line_usage_error(run("worker", "--connect", "localhost:5555"), "--connect", "tcp://localhost:5555")
    assert "Invalid argument" not in line
    one_line_usage_error(run("worker", "--connect", "tcp://*:5555"), "--connect")
    one_line_usage_error(run("worker", "--connect", "tcp://host:99999"), "port")
    one_line_usage_error(run("server", "--bind", "0.0.0.0:5555", "--rounds", "1"), "--bind")
    one_line_usage_error(run("server", "--bind", "udp://0.0.0.0:5555"), "--bind", "transport")


def test_unknown_device(no_workers):
    line = one_line_usage_error(run("worker", "--connect", "tcp://127.0.0.1:5555", "--device", "gpu"), "'gpu'", "cuda:K")
    assert len(line) < 200  # not torch's list of device types
    one_line_usage_error(run("launch", "--device", "GPU0", "--rounds", "1"), "--device")


def test_cuda_on_a_host_without_gpu_is_a_usage_error(no_workers):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this host has a GPU")
    one_line_usage_error(run("launch", "--device", "cuda", "--rounds", "1", "--problem", "quadratic:d=4"), "no CUDA GPU")
    one_line_usage_error(run("worker", "--connect", "tcp://127.0.0.1:5555", "--device", "cuda:1"), "no CUDA GPU")


def test_missing_data_folder_or_file(no_workers, tmp_path):
    line = one_line_usage_error(run("launch", "--workers", "2", "--rounds", "1", "--problem", f"mlp:dataset=mnist,data_dir={tmp_path}"), "mnist")
    assert str(tmp_path) in line
    one_line_usage_error(run("launch", "--workers", "2", "--rounds", "1", "--problem", f"mlp:dataset=libsvm,data_dir={tmp_path},file=nosuch.svm"), "nosuch.svm")


def test_unknown_plot_field_and_missing_file(tmp_path):
    metrics = tmp_path / "m.jsonl"
    assert run("launch", "--engine", "inproc", "--rounds", "2", "--workers", "2", "--problem", "quadratic:d=4", "--metrics", str(metrics)).exit_code == 0
    out = tmp_path / "p.png"
    one_line_usage_error(run("plot", str(metrics), "--x", "round", "--y", "nosuch", "-o", str(out)), "no field 'nosuch'", "grad_norm_sq")
    one_line_usage_error(run("plot", str(tmp_path / "none.jsonl"), "--x", "round", "--y", "loss", "-o", str(out)), "does not exist")
    one_line_usage_error(run("plot", str(metrics), "--x", "round", "--y", "loss", "--label", "a", "--label", "b", "-o", str(out)), "--label")
    assert not out.exists()


def test_metrics_file_is_not_overwritten_without_force(tmp_path, no_workers):
    metrics = tmp_path / "m.jsonl"
    metrics.write_text("precious\n")
    args = ["launch", "--engine", "inproc", "--rounds", "2", "--workers", "2", "--problem", "quadratic:d=4", "--metrics", str(metrics)]
    one_line_usage_error(run(*args), "--force", "exists")
    assert metrics.read_text() == "precious\n"
    assert run(*args, "--force").exit_code == 0
    assert json.loads(metrics.read_text().splitlines()[0])["event"] == "start"


def test_usage_error_from_a_real_process_is_one_line_and_quick():
    """Through the console script's path: no worker, one line, exit 2."""
    proc = subprocess.run(PSC + ["worker", "--connect", "localhost:5555", "--device", "cpu"], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith("psc worker: error:")


def test_help_does_not_import_torch_and_answers_quickly():
    code = "import sys, psc.cli; print(sorted(m for m in ('torch', 'numpy', 'zmq', 'matplotlib') if m in sys.modules))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr
    start = time.perf_counter()
    proc = subprocess.run(PSC + ["--help"], capture_output=True, text=True, cwd=ROOT, timeout=60)
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0 and "launch" in proc.stdout
    assert elapsed < 5.0  # under 1 s on an idle machine; the suite's machine may be loaded


def test_quiet_is_accepted_before_or_after_the_command(tmp_path):
    args = ["launch", "--engine", "inproc", "--rounds", "2", "--workers", "2", "--problem", "quadratic:d=4"]
    for argv in (["-q", *args], [*args, "-q"], [args[0], "-q", *args[1:]]):
        result = run(*argv)
        assert result.exit_code == 0, result.output
    assert run("list", "algorithms", "-q", "--json").exit_code == 0
    assert run("list", "-q", "algorithms").exit_code == 0


def test_quiet_after_the_command_silences_the_logs():
    base = PSC + ["launch", "--engine", "inproc", "--rounds", "2", "--workers", "2", "--problem", "quadratic:d=4"]
    loud = subprocess.run(base, capture_output=True, text=True, cwd=ROOT, timeout=120)
    quiet = subprocess.run(base + ["-q"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert loud.returncode == quiet.returncode == 0
    assert "run summary" in loud.stderr
    assert quiet.stderr.strip() == "", quiet.stderr


def test_the_current_folder_is_importable_for_a_custom_factory(tmp_path, monkeypatch):
    (tmp_path / "my_model_for_psc.py").write_text(
        "import torch\n"
        "def make(**_):\n"
        "    x = torch.randn(32, 3, generator=torch.Generator().manual_seed(0))\n"
        "    y = (x[:, 0] > 0).long()\n"
        "    return torch.nn.Linear(3, 2), (x[:24], y[:24]), (x[24:], y[24:])\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path), os.getcwd())])
    result = run("launch", "--engine", "inproc", "--rounds", "2", "--workers", "2", "--problem", "custom:factory=my_model_for_psc:make", "--lr", "0.1")
    assert result.exit_code == 0, result.output
