"""RUN OPTIONS shared by ``psc server`` and ``psc launch``, and the TOML file that may hold them.

Precedence: the command line, then ``--config FILE.toml``, then the defaults of ``RunConfig`` (and
the algorithm's default compressors). A TOML key that is not an option is an error.

Nothing here imports torch: ``psc --help`` stays fast. An existing metrics file is not overwritten
unless ``--force`` is given; ``--tensorboard`` needs the optional ``tensorboard`` package. Both are
checked here, before any process starts.
"""
from __future__ import annotations

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib
import os
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from common.config import RunConfig
    from runtime.metrics import Outputs

RUN_KEYS = ("algorithm", "uplink", "downlink", "problem", "workers", "rounds", "lr", "seed", "dtype", "eval_every")
FILE_ONLY_KEYS = ("metrics", "tensorboard")
DTYPE_NAMES = ("float32", "float64")  # common.config.DTYPES (tests/test_cli.py checks they agree)


def run_options(func):
    """Add the RUN OPTIONS (all default to None, so that 'given' can be told from 'default')."""
    options = [
        click.option("--algorithm", help="Algorithm SPEC, e.g. marina-p or 'ef-sgd'.  [default: gd]"),
        click.option("--uplink", help="Worker-to-server compressor SPEC.  [default: the algorithm's]"),
        click.option("--downlink", help="Server-to-worker compressor SPEC.  [default: the algorithm's]"),
        click.option("--problem", help="Problem SPEC, e.g. 'quadratic:d=300,la2=0,lb2=100'.  [default: quadratic]"),
        click.option("--rounds", type=click.IntRange(min=0), help="Number of rounds.  [default: 100]"),
        click.option("--lr", help="Step size: a number, 'theory' or 'theory*F'.  [default: theory]"),
        click.option("--seed", type=int, help="Seed of all randomness.  [default: 0]"),
        click.option("--dtype", type=click.Choice(DTYPE_NAMES), help="Model and wire precision.  [default: float32]"),
        click.option("--eval-every", type=click.IntRange(min=1), help="The server evaluates loss, gradient norm and accuracy every K rounds (and the first and last).  [default: 1]"),
        click.option("--metrics", type=click.Path(dir_okay=False), help="Metrics file (JSON Lines) to write; an existing one only with --force."),
        click.option("--force", is_flag=True, help="Overwrite an existing --metrics file."),
        click.option("--tensorboard", type=click.Path(file_okay=False), help="Also write the round metrics as TensorBoard events into this folder (needs the tensorboard package)."),
        click.option("--config", type=click.Path(exists=True, dir_okay=False), help="TOML file with any of these options."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def fault_options(func):
    """``--checkpoint``, ``--checkpoint-every``, ``--resume``, ``--rejoin-timeout``, ``--model-out``
    (server and launch; ``runtime.checkpoint``)."""
    options = [
        click.option("--checkpoint", "checkpoint_dir", type=click.Path(file_okay=False), help="Write a checkpoint of the whole run (server, every worker, metrics counters) into this folder; a lost worker's rank then stays open for --rejoin-timeout and the run rolls back to the last checkpoint."),
        click.option("--checkpoint-every", type=click.IntRange(min=1), default=50, show_default=True, help="Rounds between checkpoints."),
        click.option("--resume", "resume_dir", type=click.Path(file_okay=False), help="Continue from the newest complete checkpoint in this folder (same options as the run that wrote it); the metrics file is appended."),
        click.option("--rejoin-timeout", type=click.FloatRange(min=0.1), default=120.0, show_default=True, help="Seconds a lost worker's rank stays open for its replacement (with --checkpoint or --resume)."),
        click.option("--model-out", type=click.Path(dir_okay=False), help="Save the final model: a torch.save state dict for neural networks, the flat vector otherwise."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def check_resume(resume_dir: str | None) -> None:
    """A usage error for a --resume folder that does not exist (its content is checked by the run)."""
    if resume_dir is not None and not os.path.isdir(resume_dir):
        raise click.UsageError(f"--resume {resume_dir}: no such folder")


def read_toml(path: str | None) -> dict[str, Any]:
    if not path:
        return {}
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise click.UsageError(f"--config {path}: not valid TOML ({exc})") from None
    unknown = sorted(set(data) - set(RUN_KEYS) - set(FILE_ONLY_KEYS))
    if unknown:
        raise click.UsageError(f"--config {path}: unknown option {unknown[0]!r} (known: {', '.join(RUN_KEYS + FILE_ONLY_KEYS)})")
    return data


def build_config(cli: dict[str, Any], workers: int | None = None) -> "tuple[RunConfig, Outputs]":
    """The run's configuration and where it writes (metrics file, TensorBoard folder), from
    command-line values and the TOML file; ``click.UsageError`` for what the user must fix."""
    from common.config import RunConfig
    from runtime.metrics import Outputs

    file_values = read_toml(cli.get("config"))
    merged: dict[str, Any] = {}
    for key in RUN_KEYS + FILE_ONLY_KEYS:
        value = cli.get(key)
        if key == "workers" and workers is not None:
            value = workers
        merged[key] = value if value is not None else file_values.get(key)
    metrics, tensorboard = merged.pop("metrics"), merged.pop("tensorboard")
    if metrics and os.path.isdir(metrics):
        raise click.UsageError(f"--metrics {metrics}: is a folder; give a file name")
    if metrics and os.path.exists(metrics) and not cli.get("force") and not cli.get("resume_dir"):
        raise click.UsageError(f"--metrics {metrics}: the file exists; pass --force to overwrite it, or choose another file name")
    if tensorboard:
        from runtime.tensorboard import INSTALL_HINT, available

        if not available():
            raise click.UsageError(f"--tensorboard needs the tensorboard package: {INSTALL_HINT}")
    values = {k: v for k, v in merged.items() if v is not None}
    if "lr" in values:
        values["lr"] = str(values["lr"])
    try:
        return RunConfig.from_dict(values), Outputs(metrics, tensorboard)
    except (TypeError, ValueError) as exc:
        raise click.UsageError(str(exc)) from None
