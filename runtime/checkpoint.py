"""Checkpoints of a whole run, and the saved model (``--checkpoint``, ``--resume``, ``--model-out``).

What a checkpoint holds (a round boundary t: rounds 0..t-1 done, round t not begun):

* the server rule's state and every worker rule's state, each as ``rule.state_dict()`` (the rules
  keep everything a continuation needs in their attributes: x, memories, shifts, momenta, AMSGrad
  state, replicas, step counters; randomness is keyed by the round, so no generator state exists);
* the problem's server-side counters (``Problem.state_dict``, e.g. the evaluation schedule);
* the metrics counters (every ``cum_*`` of the writer, and the seconds elapsed) and the round t.

Round 0 is written as soon as the run starts, without worker states (the workers' rules are then as
their configuration builds them: a RESTORE with ``fresh``), so that a run killed before its first
K rounds resumes too.

Where worker state lives: on the server. At a checkpoint round the server asks every worker for its
state (SAVE), each worker uploads it (STATE, counted in ``control_bytes``) and the server writes one
file; on a restore the server sends each worker its state back (RESTORE). A worker restarted on a
fresh machine therefore needs nothing but its original command line.

The file, ``DIR/ckpt-<round, 8 digits>.psc``::

    PSC-CHECKPOINT 1\\n
    {manifest: round, fingerprint, config, dim, workers, payload_bytes, sha256}\\n   (one JSON line)
    payload: msgpack {"server": frames, "workers": [frames, ...], "problem": {...}, "metrics": {...}}

A state travels and is stored as frames (``pack_state``): a msgpack map of the plain values and of
each tensor's name, dtype and shape, then one frame of raw bytes per tensor. Nothing is unpickled.
Writing is atomic (temporary file, fsync, rename, fsync of the folder), so a write cut short leaves
no ``ckpt-*.psc`` and the previous checkpoint is the newest; the last ``KEEP`` are kept. A damaged
file (its checksum or length does not match) or one from another configuration is refused with a
one-line ``CheckpointError``.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any

import msgpack
import torch

MAGIC = b"PSC-CHECKPOINT 1\n"
KEEP = 2  # checkpoints kept in the folder (the newest ones)
NAME = re.compile(r"^ckpt-(\d{8})\.psc$")
DTYPES = {str(d).removeprefix("torch."): d for d in (torch.float16, torch.bfloat16, torch.float32, torch.float64,
                                                    torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64, torch.bool)}
PLAIN = (int, float, str, bool, type(None))


class CheckpointError(ValueError):
    """A checkpoint that cannot be written or used; the message says why in one line."""


# -- a state as frames --------------------------------------------------------------------------

def pack_state(state: dict[str, Any]) -> list[bytes]:
    """``state`` (tensors and plain values by name) as frames: a msgpack header, then one frame of
    raw bytes per tensor (no frame is larger than the largest tensor)."""
    values, tensors, frames = {}, [], []
    for name, value in state.items():
        if isinstance(value, torch.Tensor):
            t = value.detach().to("cpu").contiguous()
            tensors.append([name, str(t.dtype).removeprefix("torch."), list(t.shape)])
            frames.append(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(value, PLAIN):
            values[name] = value
        else:
            raise CheckpointError(f"state field {name!r} is a {type(value).__name__}; a checkpoint holds tensors and plain values")
    return [msgpack.packb({"values": values, "tensors": tensors}, use_bin_type=True), *frames]


def unpack_state(frames: list[bytes], device: torch.device | str = "cpu") -> dict[str, Any]:
    """The state of ``pack_state``'s frames, tensors on ``device``; ``CheckpointError`` if they do not fit together."""
    if not frames:
        raise CheckpointError("a state needs at least its header frame")
    try:
        head = msgpack.unpackb(bytes(frames[0]), raw=False, strict_map_key=True)
        values, tensors = head["values"], head["tensors"]
        assert isinstance(values, dict) and isinstance(tensors, list)
    except Exception:
        raise CheckpointError("a state's header is not readable") from None
    if len(tensors) != len(frames) - 1:
        raise CheckpointError(f"a state names {len(tensors)} tensors but carries {len(frames) - 1}")
    state = {k: v for k, v in values.items() if isinstance(v, PLAIN)}
    for entry, raw in zip(tensors, frames[1:]):
        try:
            name, dtype_name, shape = entry
            dtype = DTYPES[dtype_name]
            shape = [int(s) for s in shape]
            assert isinstance(name, str) and all(s >= 0 for s in shape)
        except Exception:
            raise CheckpointError(f"a state's tensor entry {str(entry)[:60]!r} is malformed") from None
        numel = 1
        for s in shape:
            numel *= s
        itemsize = torch.empty((), dtype=dtype).element_size()
        if len(raw) != numel * itemsize:
            raise CheckpointError(f"state tensor {name!r}: {len(raw)} bytes for shape {shape} of {dtype_name}")
        flat = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
        state[name] = flat.view(dtype).reshape(shape).to(device)
    return state


def restore_rule(rule, state: dict[str, Any]) -> None:
    """Load ``state`` into a rule, its tensors on the rule's device, and check it names the rule's
    fields (a state of another method is refused rather than half loaded)."""
    own = rule.state_dict()
    if set(own) != set(state):
        raise CheckpointError(f"the saved state has fields {sorted(state)}, this rule has {sorted(own)}")
    device = rule.x.device
    rule.load_state_dict({k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in state.items()})


def state_bytes(frames: list[bytes]) -> int:
    return sum(len(f) for f in frames)


# -- the file -------------------------------------------------------------------------------------

def fingerprint(config: dict[str, Any], dim: int) -> str:
    """What must agree between a checkpoint and the run that resumes it: the whole configuration
    except ``rounds`` (a resumed run may run longer), and the dimension."""
    same = {k: v for k, v in sorted(config.items()) if k != "rounds"}
    return hashlib.sha256(json.dumps([same, dim], sort_keys=True).encode()).hexdigest()[:32]


@dataclass
class Checkpoint:
    """One round boundary of a run: see the module docstring."""

    round: int
    server: list[bytes]
    workers: list[list[bytes]]
    problem: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    path: str = ""


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str, chunks: list[bytes]) -> None:
    """Write ``path`` so that it exists either whole or not at all: a temporary file in the same
    folder, fsync, rename over ``path``, fsync of the folder."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            for chunk in chunks:
                fh.write(chunk)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(directory)


def checkpoint_files(directory: str) -> list[tuple[int, str]]:
    """(round, path) of the complete-looking checkpoints in ``directory``, newest first."""
    found = []
    for path in glob.glob(os.path.join(glob.escape(directory), "ckpt-*.psc")):
        m = NAME.match(os.path.basename(path))
        if m:
            found.append((int(m.group(1)), path))
    return sorted(found, reverse=True)


def write(directory: str, ckpt: Checkpoint, config: dict[str, Any], dim: int) -> str:
    """Write ``ckpt`` atomically into ``directory`` (created if needed), keep the newest ``KEEP``,
    and return its path."""
    os.makedirs(directory, exist_ok=True)
    payload = msgpack.packb({"round": ckpt.round, "server": ckpt.server, "workers": ckpt.workers,
                             "problem": ckpt.problem, "metrics": ckpt.metrics}, use_bin_type=True)
    manifest = {"round": ckpt.round, "fingerprint": fingerprint(config, dim), "config": config, "dim": dim,
                "workers": len(ckpt.workers), "payload_bytes": len(payload),
                "sha256": hashlib.sha256(payload).hexdigest(), "written_unix": time.time()}
    path = os.path.join(directory, f"ckpt-{ckpt.round:08d}.psc")
    atomic_write(path, [MAGIC, json.dumps(manifest).encode() + b"\n", payload])
    for _, old in checkpoint_files(directory)[KEEP:]:
        try:
            os.unlink(old)
        except OSError:
            pass
    ckpt.path = path
    return path


def _differences(saved: dict[str, Any], config: dict[str, Any]) -> str:
    keys = sorted(k for k in set(saved) | set(config) if k != "rounds" and saved.get(k) != config.get(k))
    return ", ".join(f"{k}={saved.get(k)!r} there, {config.get(k)!r} here" for k in keys[:3])


def read(path: str, config: dict[str, Any], dim: int) -> Checkpoint:
    """The checkpoint in ``path``, checked against this run; ``CheckpointError`` if it is damaged or
    belongs to another configuration."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        raise CheckpointError(f"checkpoint {path}: cannot be read ({exc.strerror})") from None
    if not data.startswith(MAGIC):
        raise CheckpointError(f"checkpoint {path}: not a psc checkpoint (bad header)")
    end = data.find(b"\n", len(MAGIC))
    try:
        manifest = json.loads(data[len(MAGIC):end])
        size, digest, saved_round = int(manifest["payload_bytes"]), str(manifest["sha256"]), int(manifest["round"])
    except Exception:
        raise CheckpointError(f"checkpoint {path}: damaged (unreadable manifest)") from None
    payload = data[end + 1:]
    if len(payload) != size:
        raise CheckpointError(f"checkpoint {path}: damaged ({len(payload)} payload bytes, the manifest says {size}); "
                              "delete it to resume from the previous one")
    if hashlib.sha256(payload).hexdigest() != digest:
        raise CheckpointError(f"checkpoint {path}: damaged (checksum mismatch); delete it to resume from the previous one")
    if manifest.get("fingerprint") != fingerprint(config, dim):
        saved = manifest.get("config") if isinstance(manifest.get("config"), dict) else {}
        why = _differences(saved, config) or f"d={manifest.get('dim')} there, {dim} here"
        raise CheckpointError(f"checkpoint {path} belongs to another configuration ({why})")
    try:
        body = msgpack.unpackb(payload, raw=False, strict_map_key=False)
        ckpt = Checkpoint(int(body["round"]), list(body["server"]), [list(w) for w in body["workers"]],
                          dict(body["problem"]), dict(body["metrics"]), path)
    except Exception:
        raise CheckpointError(f"checkpoint {path}: damaged (unreadable payload)") from None
    if ckpt.round != saved_round or len(ckpt.workers) not in ((0, config.get("workers")) if ckpt.round == 0 else (config.get("workers"),)):
        raise CheckpointError(f"checkpoint {path}: damaged (its round or worker count disagrees with its manifest)")
    return ckpt


def latest(directory: str, config: dict[str, Any], dim: int) -> Checkpoint:
    """The newest complete checkpoint in ``directory`` (a write cut short left none under its name,
    so the previous one is the newest); ``CheckpointError`` if there is none or it is unusable."""
    if not os.path.isdir(directory):
        raise CheckpointError(f"--resume {directory}: no such folder")
    files = checkpoint_files(directory)
    if not files:
        raise CheckpointError(f"--resume {directory}: no complete checkpoint in this folder")
    return read(files[0][1], config, dim)


# -- the metrics file of a resumed run ------------------------------------------------------------

def metrics_counters(writer) -> dict[str, Any]:
    """The writer's running totals (every ``cum_*`` attribute) and the seconds since the run began."""
    out = {k: v for k, v in vars(writer).items() if k.startswith("cum_") and isinstance(v, (int, float, list))}
    out["elapsed_s"] = time.perf_counter() - writer.t0
    return out


def rewind_metrics(writer, t: int, counters: dict[str, Any], old_records: list[dict[str, Any]] | None = None) -> None:
    """Make the metrics file read as one run that has done rounds 0..t-1: keep its start line and
    rounds before t (from the file itself, or ``old_records`` read before the writer reopened it),
    drop the rest, restore the running totals and the clock, and go on appending."""
    from runtime.summary import RunSummary

    if old_records is None:
        old_records = old_metrics(writer.path)
    kept = [r for r in old_records if r.get("event") == "start" or (r.get("event") == "round" and r.get("round", t) < t)]
    if writer.file is not None:
        writer.file.seek(0)
        writer.file.truncate()
        for record in kept:
            writer.file.write(json.dumps(record) + "\n")
        writer.file.flush()
    writer.summary = RunSummary()
    for record in kept:
        writer.summary.add(record)
    for key, value in counters.items():
        if key.startswith("cum_"):
            setattr(writer, key, value)
    writer.t0 = time.perf_counter() - float(counters.get("elapsed_s", 0.0))


# -- the final model ------------------------------------------------------------------------------

def save_model(path: str, problem, x: torch.Tensor) -> None:
    """``--model-out``: ``torch.save(problem.export(x))`` written atomically (a state dict for a
    neural network, the flat vector otherwise)."""
    import io

    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(problem.export(x), buffer)
    atomic_write(path, [buffer.getvalue()])


# -- the server's part, shared by the in-process engine and the server process --------------------

def server_snapshot(core, t: int) -> Checkpoint:
    """The server's side of boundary ``t`` (its rule, the problem's counters, the metrics totals);
    the workers' states are added as they arrive. The rule is settled first (``ServerCore.settle``)."""
    core.settle()
    return Checkpoint(t, pack_state(core.rule.state_dict()), [], dict(core.setup.problem.state_dict()),
                      metrics_counters(core.metrics))


def restore_server(core, ckpt: Checkpoint, old_records: list[dict[str, Any]] | None = None) -> None:
    """Put the server's side back at ``ckpt``'s boundary, metrics file included; the server's ends of
    the links forget what was said (the workers' ends do the same when they get their RESTORE)."""
    restore_rule(core.rule, unpack_state(ckpt.server, core.rule.x.device))
    core.unsettled = None  # an abandoned round's rest is not applied to the restored state
    core.reset_links()
    core.setup.problem.load_state_dict(ckpt.problem)
    rewind_metrics(core.metrics, ckpt.round, ckpt.metrics, old_records)
    core.last, core.pending = {}, None
    core.last_round_end = time.perf_counter()


def old_metrics(path: str | None) -> list[dict[str, Any]]:
    """The records of a metrics file about to be reopened by a resumed run ([] if there is none); a
    line cut short by the crash that stopped the run is left out."""
    if not path or not os.path.exists(path):
        return []
    records = []
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records
