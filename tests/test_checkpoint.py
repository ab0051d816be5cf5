"""Checkpoints in one process: every algorithm's rules resume bit for bit from their saved state, the
file is written atomically and refused when damaged or from another run, and --model-out loads back."""
from __future__ import annotations

import json
import os

import pytest
import torch

from common.algorithms import ALGORITHMS
from common.config import RunConfig
from runtime import checkpoint
from runtime.engine import Engine, run_inproc


def _digest(engine: Engine) -> str:
    return engine.server.model_digest()


def _run(config: RunConfig, **kw) -> Engine:
    engine = Engine(config, **kw)
    try:
        for _ in engine.rounds():
            pass
    finally:
        engine.close()
    return engine


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_every_algorithm_resumes_bit_for_bit(name, tmp_path):
    """Stop after round 4 (a checkpoint at boundary 3), resume in a fresh engine, finish: the same
    model and the same worker states as a run that was never stopped."""
    config = RunConfig(algorithm=name, problem="quadratic:d=24", workers=3, rounds=7, lr="0.01", seed=5)
    straight = _run(config)
    first = Engine(config, checkpoint_dir=str(tmp_path), checkpoint_every=3)
    for t, _ in first.rounds():
        if t == 4:
            break
    first.close()
    assert [r for r, _ in checkpoint.checkpoint_files(str(tmp_path))] == [3, 0]
    resumed = _run(config, resume=str(tmp_path))
    assert _digest(resumed) == _digest(straight)
    for a, b in zip(straight.workers, resumed.workers):
        sa, sb = a.rule.state_dict(), b.rule.state_dict()
        assert sa.keys() == sb.keys()
        for key in sa:
            if isinstance(sa[key], torch.Tensor):
                assert torch.equal(sa[key], sb[key]), (name, key)
            else:
                assert sa[key] == sb[key], (name, key)


def test_a_run_stopped_before_its_first_checkpoint_resumes_from_round_zero(tmp_path):
    config = RunConfig(algorithm="cd-adam", problem="quadratic:d=24", workers=3, rounds=6, lr="0.001", seed=2)
    first = Engine(config, checkpoint_dir=str(tmp_path), checkpoint_every=50)
    for t, _ in first.rounds():
        if t == 2:
            break
    first.close()
    assert [r for r, _ in checkpoint.checkpoint_files(str(tmp_path))] == [0]
    assert _digest(_run(config, resume=str(tmp_path))) == _digest(_run(config))


def test_state_frames_round_trip_and_refuse_nonsense():
    state = {"x": torch.arange(5, dtype=torch.float32), "k": 3, "mode": "exp", "b": torch.tensor(True), "e": torch.zeros(0, 2)}
    frames = checkpoint.pack_state(state)
    back = checkpoint.unpack_state(frames)
    assert back["k"] == 3 and back["mode"] == "exp" and torch.equal(back["x"], state["x"]) and back["e"].shape == (0, 2)
    with pytest.raises(checkpoint.CheckpointError, match="bytes for shape"):
        checkpoint.unpack_state([frames[0], frames[1][:-1], *frames[2:]])
    with pytest.raises(checkpoint.CheckpointError, match="names 3 tensors"):
        checkpoint.unpack_state(frames[:2])
    with pytest.raises(checkpoint.CheckpointError, match="not readable"):
        checkpoint.unpack_state([b"\xc1"])
    with pytest.raises(checkpoint.CheckpointError, match="a list"):
        checkpoint.pack_state({"h": [1, 2]})


def _config(**kw) -> RunConfig:
    return RunConfig(**{"algorithm": "ef21", "problem": "quadratic:d=16", "workers": 2, "rounds": 9, "lr": "0.01", **kw})


def test_keeps_the_last_two_and_a_write_cut_short_is_never_loaded(tmp_path):
    config = _config()
    _run(config, checkpoint_dir=str(tmp_path), checkpoint_every=2)
    assert [r for r, _ in checkpoint.checkpoint_files(str(tmp_path))] == [8, 6]
    # A writer killed before its rename leaves only its temporary file: the newest whole one is loaded.
    with open(tmp_path / ".ckpt-00000010.psc.tmp-999", "wb") as fh:
        fh.write(checkpoint.MAGIC + b'{"round": 10')
    assert checkpoint.latest(str(tmp_path), config.to_dict(), 16).round == 8


def test_a_write_that_dies_before_its_rename_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    config = _config(rounds=5)
    engine = Engine(config, checkpoint_dir=str(tmp_path), checkpoint_every=2)
    rounds = engine.rounds()
    for t, _ in rounds:
        if t == 2:
            break

    def crash(src, dst):
        raise KeyboardInterrupt("killed during the write")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        for _ in rounds:  # at boundary 4, the write of its checkpoint dies
            pass
    engine.close()
    assert sorted(os.listdir(tmp_path)) == ["ckpt-00000000.psc", "ckpt-00000002.psc"]
    assert checkpoint.latest(str(tmp_path), config.to_dict(), 16).round == 2


def test_damaged_or_foreign_checkpoints_are_refused_in_one_line(tmp_path):
    config = _config()
    _run(config, checkpoint_dir=str(tmp_path), checkpoint_every=4)
    newest = checkpoint.checkpoint_files(str(tmp_path))[0][1]
    with pytest.raises(checkpoint.CheckpointError, match=r"another configuration \(algorithm='ef21' there, 'gd' here"):
        checkpoint.latest(str(tmp_path), _config(algorithm="gd").to_dict(), 16)
    with pytest.raises(checkpoint.CheckpointError, match="another configuration"):
        checkpoint.latest(str(tmp_path), config.to_dict(), 17)
    checkpoint.latest(str(tmp_path), _config(rounds=50).to_dict(), 16)  # a longer run may resume it
    data = bytearray(open(newest, "rb").read())
    data[-3] ^= 0xFF
    open(newest, "wb").write(bytes(data))
    with pytest.raises(checkpoint.CheckpointError, match="damaged \\(checksum mismatch\\)") as err:
        checkpoint.latest(str(tmp_path), config.to_dict(), 16)
    assert "\n" not in str(err.value)
    open(newest, "wb").write(bytes(data[:-10]))
    with pytest.raises(checkpoint.CheckpointError, match="damaged .*payload bytes"):
        checkpoint.latest(str(tmp_path), config.to_dict(), 16)
    open(newest, "wb").write(b"hello")
    with pytest.raises(checkpoint.CheckpointError, match="not a psc checkpoint"):
        checkpoint.latest(str(tmp_path), config.to_dict(), 16)
    with pytest.raises(checkpoint.CheckpointError, match="no complete checkpoint"):
        checkpoint.latest(str(tmp_path / "empty"), config.to_dict(), 16) if os.makedirs(tmp_path / "empty") is None else None
    with pytest.raises(checkpoint.CheckpointError, match="no such folder"):
        checkpoint.latest(str(tmp_path / "nowhere"), config.to_dict(), 16)


def test_resumed_metrics_file_reads_as_one_run(tmp_path):
    config = _config(rounds=8)
    metrics = str(tmp_path / "run.jsonl")
    straight = str(tmp_path / "straight.jsonl")
    run_inproc(config, straight, progress=False)
    engine = Engine(config, metrics, checkpoint_dir=str(tmp_path / "ck"), checkpoint_every=3)
    for t, _ in engine.rounds():
        if t == 7:  # rounds 6 and 7 are written after the newest checkpoint (boundary 6)
            break
    engine.close()
    run_inproc(config, metrics, progress=False, resume=str(tmp_path / "ck"))
    got = [json.loads(line) for line in open(metrics)]
    want = [json.loads(line) for line in open(straight)]
    assert [r["event"] for r in got] == ["start"] + ["round"] * 8 + ["end"]
    assert [r["round"] for r in got if r["event"] == "round"] == list(range(8))
    for a, b in zip(got, want):
        for key in ("loss", "payload_bits_up", "payload_bits_down", "cum_payload_bits_up", "cum_payload_bits_down"):
            assert a.get(key) == b.get(key), key
        if a.get("round", 8) < 6:
            assert (a["bytes_up"], a["bytes_down"], a["cum_bytes_up"]) == (b["bytes_up"], b["bytes_down"], b["cum_bytes_up"])
    # The links' memory is not part of a checkpoint: the first message each way after the resume is
    # sent in full again, so round 6 costs more bytes than in the straight run; the totals stay the
    # file's own sums.
    rounds, straight_rounds = [r for r in got if r["event"] == "round"], [r for r in want if r["event"] == "round"]
    assert all(a > b for a, b in zip(rounds[6]["bytes_up"], straight_rounds[6]["bytes_up"]))
    assert all(a > b for a, b in zip(rounds[6]["bytes_down"], straight_rounds[6]["bytes_down"]))
    assert rounds[-1]["cum_bytes_up"] == sum(sum(r["bytes_up"]) for r in rounds)
    assert rounds[-1]["cum_bytes_down"] == sum(sum(r["bytes_down"]) for r in rounds)
    assert got[-1]["model_sha256"] == want[-1]["model_sha256"]
    times = [r["time_s"] for r in got if r["event"] == "round"]
    assert times == sorted(times)


def test_model_out_flat_vector(tmp_path):
    config = _config(rounds=5)
    path = str(tmp_path / "sub" / "model.pt")
    core = run_inproc(config, progress=False, model_out=path)
    x = torch.load(path, weights_only=True)
    assert torch.equal(x, core.rule.model.cpu())
    assert core.setup.problem.evaluate(x)["loss"] == core.last["loss"]


def test_model_out_state_dict_loads_into_the_model_class(tmp_path):
    from common.problems import models

    config = RunConfig(algorithm="ef-sgd", problem="cnn:dataset=digits,width=4,batch=16", workers=2, rounds=6, lr="0.05", seed=1)
    path = str(tmp_path / "cnn.pt")
    core = run_inproc(config, progress=False, model_out=path)
    problem = core.setup.problem
    model = models.SmallCNN(1, 10, 4, 8, "none")
    model.load_state_dict(torch.load(path, weights_only=True))
    measured = problem.metrics_on(model.eval(), problem.data.x_test, problem.data.y_test)
    assert measured["test_accuracy"] == core.last["test_accuracy"]
    assert measured["loss"] == pytest.approx(core.last["loss"], rel=1e-6)


# -- the command line -----------------------------------------------------------------------------

from tests.test_cli_usage import one_line_usage_error as _one_line_error, run as _cli  # noqa: E402


RUN = ["--algorithm", "ef21", "--problem", "quadratic:d=16", "--workers", "2", "--lr", "0.01"]


def test_launch_inproc_checkpoints_resumes_and_saves_the_model(tmp_path):
    ck, metrics, model = str(tmp_path / "ck"), str(tmp_path / "m.jsonl"), str(tmp_path / "x.pt")
    result = _cli("-q", "launch", "--engine", "inproc", *RUN, "--rounds", "6", "--checkpoint", ck, "--checkpoint-every", "2",
                  "--metrics", metrics)
    assert result.exit_code == 0, result.output
    assert [r for r, _ in checkpoint.checkpoint_files(ck)] == [4, 2]
    # a longer run resumes from round 4 and appends to the same metrics file
    result = _cli("-q", "launch", "--engine", "inproc", *RUN, "--rounds", "9", "--resume", ck, "--metrics", metrics,
                  "--model-out", model)
    assert result.exit_code == 0, result.output
    rounds = [json.loads(line).get("round") for line in open(metrics) if '"round"' in line]
    assert rounds == list(range(9))
    straight = run_inproc(RunConfig(algorithm="ef21", problem="quadratic:d=16", workers=2, lr="0.01", rounds=9), progress=False)
    assert torch.equal(torch.load(model, weights_only=True), straight.rule.model)
    assert json.loads(open(metrics).readlines()[-1])["model_sha256"] == straight.model_digest()


@pytest.mark.parametrize("command", ["server", "launch"])
def test_resume_refuses_damaged_foreign_or_missing_checkpoints(tmp_path, command):
    ck = str(tmp_path / "ck")
    _run(RunConfig(algorithm="ef21", problem="quadratic:d=16", workers=2, lr="0.01", rounds=5), checkpoint_dir=ck, checkpoint_every=2)
    extra = ["--bind", "tcp://127.0.0.1:*"] if command == "server" else []
    _one_line_error(_cli(command, *extra, *RUN, "--rounds", "5", "--resume", str(tmp_path / "none")), "--resume", "no such folder")
    _one_line_error(_cli(command, *extra, *RUN, "--rounds", "5", "--seed", "9", "--resume", ck), "another configuration", "seed=0 there, 9 here")
    newest = checkpoint.checkpoint_files(ck)[0][1]
    data = bytearray(open(newest, "rb").read())
    data[-1] ^= 0x01
    open(newest, "wb").write(bytes(data))
    _one_line_error(_cli(command, *extra, *RUN, "--rounds", "5", "--resume", ck), "damaged", "checksum")
