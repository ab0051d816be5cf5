"""What a run tells its user: timestamped logs, progress lines outside a terminal, the summary block
(checked against the metrics file), the worker's own summary, TensorBoard events, plot labels."""
from __future__ import annotations

import os
import re
import subprocess

import pytest
from click.testing import CliRunner

from psc.cli import main
from runtime.summary import RunSummary, human_bytes
from tests.procs import PSC, ROOT, records

STAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ")


def run(*args):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def check_summary_against_file(text: str, path: str) -> None:
    """The summary block in ``text`` says what the metrics file at ``path`` holds, field by field."""
    recs = records(path)
    start = recs[0]
    rounds = [r for r in recs if r["event"] == "round"]
    n = start["workers"]
    last = rounds[-1]
    block = text[text.index("run summary:"):]
    assert f"{start['config']['algorithm']} on {start['config']['problem']}, {n} workers, d = {start['dim']}: {len(rounds)} rounds" in block
    assert f"loss {last['loss']:.4g}" in block and f"grad_norm_sq {last['grad_norm_sq']:.4g}" in block
    up = sum(sum(r["bytes_up"]) for r in rounds)
    down = sum(sum(r["bytes_down"]) for r in rounds)
    assert up == last["cum_bytes_up"] and down == last["cum_bytes_down"]
    assert f"uplink      {human_bytes(up / n)} per worker ({human_bytes(up)} in all)" in block
    assert f"downlink    {human_bytes(down / n)} per worker ({human_bytes(down)} in all)" in block
    dense = 4 * start["dim"] * len(rounds) * n
    assert f"compression {dense / up:.3g}x against dense float32" in block
    for name, key in (("compute", "compute_s"), ("compress", "compress_s"), ("communication", "comm_s")):
        assert f"{name} {sum(r[key] for r in rounds):.2f} s" in block
    assert f"metrics {path}" in block
    assert "payload" not in block or "payload_bits_up" in last


@pytest.mark.procs
def test_a_run_redirected_to_a_file_tells_its_story(tmp_path):
    metrics = tmp_path / "run.jsonl"
    log = tmp_path / "out.txt"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PSC_PROGRESS_ROUNDS": "3"}
    with open(log, "w") as fh:
        proc = subprocess.run(PSC + ["launch", "--workers", "2", "--rounds", "9", "--algorithm", "dcgd", "--uplink", "randk:ratio=0.25",
                                     "--problem", "quadratic:d=40", "--metrics", str(metrics), "--timeout", "60"],
                              stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT, env=env, timeout=300)
    text = log.read_text()
    assert proc.returncode == 0, text[-3000:]
    first_lines = [line for line in text.splitlines() if line and not line.startswith("  ")]
    assert first_lines and all(STAMP.match(line) for line in first_lines), text
    progress = [line for line in first_lines if "psc.progress" in line]
    assert [re.search(r"round (\d+)/9", line).group(1) for line in progress] == ["3", "6", "9"], text
    assert "loss" in progress[-1] and "MB" in progress[-1]
    version_line = next(line for line in first_lines if "psc.run: psc " in line)
    assert "algorithm=dcgd" in version_line and "uplink=randk:ratio=0.25" in version_line and "workers=2" in version_line
    check_summary_against_file(text, str(metrics))
    for rank in (0, 1):
        line = next(line for line in first_lines if f"worker {rank} done:" in line)
        assert "9 rounds" in line and "sent" in line and "received" in line and "compute" in line
    up = [sum(r["bytes_up"][0] for r in records(str(metrics)) if r["event"] == "round")]
    assert f"sent {human_bytes(up[0])}" in next(line for line in first_lines if "worker 0 done:" in line)


def test_inproc_summary_equals_the_file_and_start_line_has_the_version(tmp_path, caplog):
    metrics = tmp_path / "m.jsonl"
    with caplog.at_level("INFO"):
        result = run("launch", "--engine", "inproc", "--workers", "3", "--rounds", "5", "--problem", "quadratic:d=12",
                     "--metrics", str(metrics))
    assert result.exit_code == 0, result.output
    text = "\n".join(r.getMessage() for r in caplog.records)
    check_summary_against_file(text, str(metrics))
    start = records(str(metrics))[0]
    assert start["version"] and start["config"]["problem"] == "quadratic:d=12"
    assert f"psc {start['version']}: algorithm=gd" in text


def test_summary_reports_payload_bits_only_when_the_records_have_them():
    start = {"event": "start", "config": {"algorithm": "gd", "problem": "q", "rounds": 2}, "dim": 100, "workers": 2}
    plain = [start] + [{"event": "round", "round": t, "time_s": t, "bytes_up": [500, 500], "bytes_down": [400, 400],
                        "loss": 1.0 / (t + 1), "test_accuracy": 0.5} for t in range(2)]
    text = RunSummary.of_records(plain).text()
    assert "payload" not in text and "test accuracy 50.00%" in text and "loss 0.5" in text
    with_bits = [dict(r, payload_bits_up=[320, 320], payload_bits_down=[3200, 3200]) if r["event"] == "round" else r for r in plain]
    summary = RunSummary.of_records(with_bits)
    assert summary.fields()["payload_bits_up_per_worker"] == 640
    assert summary.fields()["payload_ratio_up"] == pytest.approx(32 * 100 * 2 * 2 / 1280)
    assert "payload 640 bit per worker" in summary.text()


def test_tensorboard_event_files_are_written_and_readable(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    metrics, tb = tmp_path / "m.jsonl", tmp_path / "tb"
    result = run("launch", "--engine", "inproc", "--workers", "2", "--rounds", "6", "--problem", "quadratic:d=10",
                 "--metrics", str(metrics), "--tensorboard", str(tb))
    assert result.exit_code == 0, result.output
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(tb))
    acc = EventAccumulator(str(tb))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"loss", "grad_norm_sq", "cum_bytes_up", "time_s", "MB_per_worker"} <= set(tags)
    rounds = [r for r in records(str(metrics)) if r["event"] == "round"]
    events = acc.Scalars("grad_norm_sq")
    assert [e.step for e in events] == [r["round"] for r in rounds]
    assert [e.value for e in events] == pytest.approx([r["grad_norm_sq"] for r in rounds], rel=1e-6)
    assert acc.Scalars("cum_bytes_up")[-1].value == rounds[-1]["cum_bytes_up"]


def test_tensorboard_missing_is_a_usage_error(tmp_path, monkeypatch):
    import runtime.tensorboard

    monkeypatch.setattr(runtime.tensorboard, "available", lambda: False)
    result = run("launch", "--engine", "inproc", "--rounds", "1", "--tensorboard", str(tmp_path / "tb"))
    assert result.exit_code == 2 and "pip install" in result.stderr


def test_progress_lines_outside_a_terminal(caplog, monkeypatch):
    from runtime.progress import progress_bar

    monkeypatch.setenv("PSC_PROGRESS_ROUNDS", "4")
    with caplog.at_level("INFO", logger="psc.progress"):
        with progress_bar(10) as bar:
            for t in range(10):
                bar.update({"round": t, "loss": 1.0 / (t + 1), "cum_bytes_up": 1000 * t, "cum_bytes_down": 0})
    lines = [r.getMessage() for r in caplog.records if r.name == "psc.progress"]
    assert [line.split()[1] for line in lines] == ["4/10", "8/10", "10/10"]
    assert "loss 0.1" in lines[-1] and "MB 0.009" in lines[-1]
    caplog.clear()
    with caplog.at_level("INFO", logger="psc.progress"), progress_bar(10, enabled=False) as bar:
        bar.update({"round": 0})
    assert not caplog.records


def test_plot_labels_units_title_and_several_fields(tmp_path):
    paths = []
    for lr in ("0.1", "0.05"):
        path = tmp_path / f"gd-{lr}.jsonl"
        assert run("launch", "--engine", "inproc", "--workers", "2", "--rounds", "4", "--problem", "quadratic:d=6",
                   "--lr", lr, "--metrics", str(path)).exit_code == 0
        paths.append(str(path))
    from psc.plot import axis_label, default_labels, default_title, load

    runs = load(paths)
    assert default_labels(runs) == ["lr=0.1", "lr=0.05"]
    assert default_title(runs) == "quadratic:d=6, 2 workers"
    assert axis_label("cum_bits_down/n") == "bits sent down per worker"
    assert axis_label("cum_bytes_up") == "MB sent up, all workers"
    assert axis_label("time_s") == "wall-clock time (s)"
    out = tmp_path / "p.png"
    result = run("plot", *paths, "--x", "cum_bits_up/n", "--y", "grad_norm_sq", "--y", "loss", "--logy",
                 "--label", "fast", "--label", "slow", "--title", "two step sizes", "-o", str(out))
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
