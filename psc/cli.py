"""The ``psc`` command line: one click group (INTERFACE.md).

Exit status: 0 done, 2 usage error (one line on stderr, found before any process starts), 1 runtime
failure with a one-line reason on stderr (a traceback only with ``--debug``).

Start-up stays fast (``psc --help`` well under a second): torch and the numerical packages are
imported inside the commands that need them, never at the top of this module. ``-q`` is accepted
before or after the command. Logs go to stderr with timestamps.
"""
from __future__ import annotations

import json
import logging
import os
import re
import sys

import click

from psc.runopts import build_config, check_resume, fault_options, run_options
from runtime.allocator import keep_freed_memory
from runtime.openmp import short_openmp_spin
from runtime.signals import Terminated, stop_signals

log = logging.getLogger("psc")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LOG_DATEFMT = "%Y-%m-%d %H:%M:%S"


def _quiet(ctx, param, value) -> None:
    """``-q`` after the command: the same as before it."""
    if value and not (ctx.find_root().obj or {}).get("debug"):
        logging.getLogger().setLevel(logging.WARNING)


def _quiet_option() -> click.Option:
    return click.Option(["--quiet", "-q"], is_flag=True, expose_value=False, is_eager=True, callback=_quiet,
                        help="Log warnings and errors only (also accepted before the command).")


class _Command(click.Command):
    """A command that also accepts ``-q``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not any(p.name == "quiet" for p in self.params):
            self.params.append(_quiet_option())


class _Group(click.Group):
    """Turns a usage error into one line and exit status 2, an uncaught error into a one-line message
    and exit status 1 (unless --debug), and SIGINT / SIGTERM into exit status 130 / 143. Its
    commands (and sub-groups) accept ``-q``."""

    command_class = _Command
    group_class = type  # sub-groups are _Group too

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not any(p.name == "quiet" for p in self.params):
            self.params.append(_quiet_option())

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except click.exceptions.NoArgsIsHelpError:
            raise
        except click.UsageError as exc:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            where = exc.ctx.command_path if exc.ctx is not None else ctx.command_path
            root = ctx.find_root().info_name or ""
            where = "psc" + where[len(root):] if where.startswith(root) else where  # not "python -m psc"
            click.echo(f"{where}: error: {exc.format_message()} (see {where} --help)", err=True)
            sys.exit(exc.exit_code)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except Terminated as exc:
            click.echo(f"psc: {exc}", err=True)
            sys.exit(exc.exit_code)
        except BrokenPipeError:  # the reader went away (psc list ... | head): stop quietly
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(1)
        except Exception as exc:  # noqa: BLE001 - the CLI's last line of defence
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"psc: error: {exc}", err=True)
            sys.exit(1)


@click.group(cls=_Group, context_settings={"auto_envvar_prefix": "PSC"})
@click.option("--debug", is_flag=True, help="Show tracebacks on errors.")
@click.option("--quiet", "-q", is_flag=True, help="Log warnings and errors only (also accepted after the command).")
@click.pass_context
def main(ctx, debug, quiet):
    """A compressed parameter server: compressors, server and workers over ZeroMQ.

    Every option can also come from the environment: PSC_<COMMAND>_<OPTION>, e.g.
    PSC_SERVER_ROUNDS=100 or PSC_WORKER_CONNECT=tcp://server:5555.
    """
    ctx.ensure_object(dict)["debug"] = debug
    keep_freed_memory()  # large vectors reuse the last round's pages (runtime.allocator)
    short_openmp_spin()  # torch's idle threads free the cores for the codecs soon (runtime.openmp)
    level = logging.DEBUG if debug else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format=LOG_FORMAT, datefmt=LOG_DATEFMT, stream=sys.stderr)
    logging.getLogger().setLevel(level)
    # custom:factory=MODULE:FUNCTION finds a module in the current folder, as `python -m psc` would
    # (appended, so that installed packages keep their names).
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())


@main.group("list")
def list_group():
    """What exists: compressors (with their theory constants), algorithms, problems."""


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    return f"{value:.4g}"


EXTRA_EXAMPLES = (
    "randk:ratio=0.01,scaled=false", "exprounding:base=2,biased=true", "sign:scale=l2",
    "topk:ratio=0.01+natdither:s=2,p=inf", "permk+natural", "randk:ratio=0.01+natural", "natural+scale:lambda=0.888",
)


def wire_bits_per_coord(spec: str, dim: int, workers: int, seed: int = 0) -> float:
    """Bits of the encoded message over d, measured on one N(0,1) vector (worker 0, step 0)."""
    import torch

    from common.compressors import build
    from common.wire import encode, message_bytes

    c = build(spec, dim, workers, seed)
    x = torch.randn(dim, generator=torch.Generator().manual_seed(seed))
    return 8 * message_bytes(encode(c.compress(x, worker=0, step=0))) / dim


@list_group.command("compressors")
@click.option("--dim", "-d", default=1_000_000, show_default=True, type=click.IntRange(min=1), help="Dimension d for constants and bits.")
@click.option("--workers", "-n", default=10, show_default=True, type=click.IntRange(min=1), help="Number of workers n (theta, Perm-K).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.argument("specs", nargs=-1)
def list_compressors(dim, workers, as_json, specs):
    """Each compressor with its constants and payload bits per coordinate at dimension d.

    SPECS (optional) are compressor specs to describe instead of each compressor's example,
    e.g. 'topk:ratio=0.01+natural'.
    """
    from common.compressors import REGISTRY, describe

    rows = []
    for spec in specs or [cls.example for cls in REGISTRY.values()] + list(EXTRA_EXAMPLES):
        name = spec.split(":")[0].split("+")[0]
        info = describe(spec, dim, workers)
        info["wire_bits_per_coord"] = wire_bits_per_coord(spec, dim, workers)
        rows.append({"name": name, "example": spec, **info})
    if as_json:
        click.echo(json.dumps({"dim": dim, "workers": workers, "compressors": rows}, indent=2))
        return
    click.echo(f"d = {dim}, n = {workers}; bits/coord: the encoded message (header included) for one N(0,1) vector, over d")
    header = f"{'spec':36} {'unbiased':8} {'omega':>9} {'alpha':>9} {'b1':>20} {'b2':>20} {'theta':>9} {'bits/coord':>10}"
    click.echo(header)
    click.echo("-" * len(header))
    for row in rows:
        c = row["constants"]
        click.echo(
            f"{row['example']:36} {_fmt(c['unbiased']):8} {_fmt(c['omega']):>9} {_fmt(c['alpha']):>9} "
            f"{_fmt(c['b1']):>20} {_fmt(c['b2']):>20} {_fmt(c['theta']):>9} {row['wire_bits_per_coord']:>10.4g}"
        )
    if not specs:
        click.echo("")
        for name, cls in REGISTRY.items():
            opts = ", ".join(p.name for p in cls.params) or "none"
            click.echo(f"  {name:12} {cls.summary} (options: {opts})")


@list_group.command("algorithms")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def list_algorithms(as_json):
    """Each algorithm with its paper, default compressors and what each side sends ({k} in a default
    compressor is the papers' K = d/n)."""
    from common.algorithms import ALGORITHMS

    rows = [{
        "name": a.name, "paper": a.paper, "summary": a.summary, "sends": a.sends,
        "uplink": "identity (fixed)" if a.fixed_uplink else a.default_uplink,
        "downlink": "identity (fixed)" if a.fixed_downlink else a.default_downlink,
        "options": [p.name for p in a.params],
    } for a in ALGORITHMS.values()]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for r in rows:
        click.echo(f"{r['name']:12} {r['summary']} [{r['paper']}]")
        click.echo(f"{'':12} uplink {r['uplink']}, downlink {r['downlink']}; options: {', '.join(r['options']) or 'none'}")
        click.echo(f"{'':12} {r['sends']}")


@list_group.command("problems")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def list_problems(as_json):
    """Each problem with its options."""
    from common.problems import PROBLEMS

    rows = [{"name": p.name, "summary": p.summary, "options": {o.name: {"default": o.default, "doc": o.doc} for o in p.params}} for p in PROBLEMS.values()]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for r in rows:
        click.echo(f"{r['name']:12} {r['summary']}")
        for name, o in r["options"].items():
            click.echo(f"{'':14}{name}={o['default']}  {o['doc']}")


class Seconds(click.ParamType):
    """A finite number of seconds, at least ``low`` (NaN and infinity would switch a check off)."""

    name = "seconds"

    def __init__(self, low: float):
        self.low = low

    def convert(self, value, param, ctx):
        import math

        try:
            seconds = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number of seconds", param, ctx)
        if not math.isfinite(seconds) or seconds < self.low:
            self.fail(f"{value!r} must be a finite number of seconds, at least {self.low:g}", param, ctx)
        return seconds


_liveness = [
    click.option("--timeout", default=60.0, show_default=True, type=Seconds(0.1), help="Seconds of silence after which the other side is declared gone."),
    click.option("--heartbeat", default=1.0, show_default=True, type=Seconds(0.01), help="Seconds between heartbeats."),
]

_server_security = [
    click.option("--server-key", type=click.Path(dir_okay=False), help="CURVE on: the server's secret key file (NAME.key_secret from psc keygen)."),
    click.option("--allow", "allow_dir", type=click.Path(file_okay=False), help="Folder of the public keys (*.key) of the workers allowed in.  [default: any worker holding the server's public key]"),
    click.option("--round-timeout", type=Seconds(0.01), help="A worker without its uplink this many seconds after a round began is lost.  [default: --timeout or 10x the slowest round]"),
]


def server_security(func):
    for option in reversed(_server_security):
        func = option(func)
    return func


def load_server_keys(server_key: str | None, allow_dir: str | None):
    from runtime.transport import ServerKeys

    if server_key is None:
        if allow_dir is not None:
            raise click.UsageError("--allow needs --server-key (CURVE must be on to check workers' keys)")
        return None
    try:
        return ServerKeys.load(server_key, allow_dir)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None


@main.command("keygen")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--name", required=True, help="Key name: writes DIRECTORY/NAME.key (public) and NAME.key_secret.")
def keygen_cmd(directory, name):
    """Write a CurveZMQ key pair for a server or a worker."""
    from runtime.transport import keygen

    try:
        public, secret = keygen(directory, name)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    click.echo(f"wrote {public} (public: give it to the other side) and {secret} (secret: keep it here)")


def liveness(func):
    for option in reversed(_liveness):
        func = option(func)
    return func


def _endpoint(bind: bool):
    """A click callback: the endpoint, or a usage error saying in words what is wrong with it."""

    def check(ctx, param, value):
        if value is None:
            return value
        from runtime.transport import check_endpoint

        try:
            return check_endpoint(value, bind=bind)
        except ValueError as exc:
            raise click.BadParameter(str(exc), ctx, param) from None

    return check


class Device(click.ParamType):
    """auto, cpu, cuda or cuda:K, checked by spelling (torch is not imported for this)."""

    name = "device"

    def convert(self, value, param, ctx):
        text = str(value).strip().lower()
        if re.fullmatch(r"auto|cpu|cuda(:\d+)?", text):
            return text
        self.fail(f"{value!r} is not a device: expected auto, cpu, cuda or cuda:K (K = 0, 1, ...)", param, ctx)


def check_gpu(device: str) -> None:
    """A usage error if ``device`` names a GPU this host does not have (imports torch: only for cuda)."""
    if device.startswith("cuda"):
        from runtime.worker_core import resolve_device

        try:
            resolve_device(device, 0)
        except ValueError as exc:
            raise click.UsageError(str(exc)) from None


@main.command("server")
@click.option("--bind", default="tcp://0.0.0.0:5555", show_default=True, callback=_endpoint(True), help="ZeroMQ endpoint to bind.")
@click.option("--workers", type=click.IntRange(min=1), help="Number of workers to wait for.  [default: 4]")
@click.option("--join-timeout", default=600.0, show_default=True, type=click.FloatRange(min=0.1), help="Seconds to wait for all workers to join.")
@liveness
@server_security
@fault_options
@run_options
def server_cmd(bind, workers, join_timeout, timeout, heartbeat, server_key, allow_dir, round_timeout,
               checkpoint_dir, checkpoint_every, resume_dir, rejoin_timeout, model_out, **run):
    """Start the server: wait for N workers, then run the rounds."""
    from psserver.server import Server

    check_resume(resume_dir)
    config, metrics = build_config({**run, "resume_dir": resume_dir}, workers)
    keys = load_server_keys(server_key, allow_dir)
    try:
        server = Server(config, bind, metrics, timeout=timeout, heartbeat=heartbeat, join_timeout=join_timeout,
                        keys=keys, round_timeout=round_timeout, checkpoint_dir=checkpoint_dir,
                        checkpoint_every=checkpoint_every, resume=resume_dir, rejoin_timeout=rejoin_timeout,
                        model_out=model_out)
    except (ValueError, OSError) as exc:  # a bad spec or option, a missing data file: the user's to fix
        raise click.UsageError(str(exc)) from None
    log.info("psc server: %s on %s, %d workers, listening on %s", config.algorithm, config.problem, config.workers, server.endpoint)
    with stop_signals():
        code = server.run()
    sys.exit(code)


@main.command("worker")
@click.option("--connect", required=True, callback=_endpoint(False), help="The server's endpoint, e.g. tcp://HOST:5555.")
@click.option("--device", default="auto", show_default=True, type=Device(), help="auto, cpu, cuda or cuda:K (auto: GPU local_rank mod count, else CPU).")
@click.option("--rank", type=click.IntRange(min=0), help="Ask for this rank (default: the server assigns one).")
@click.option("--join-timeout", default=600.0, show_default=True, type=click.FloatRange(min=0.1), help="Seconds to wait for the server to answer.")
@click.option("--protocol-version", type=int, hidden=True, help="Speak another protocol version (for tests).")
@click.option("--key", type=click.Path(dir_okay=False), help="CURVE on: this worker's secret key file (NAME.key_secret).")
@click.option("--server-public", type=click.Path(dir_okay=False), help="CURVE on: the server's public key file (NAME.key).")
@click.option("--allow-factory", multiple=True, help="A custom:factory=MODULE:FUNCTION the server may make this worker import (repeatable; env: comma-separated).")
@click.option("--allow-data-dir", multiple=True, type=click.Path(file_okay=False), help="A folder the server's configuration may make this worker read data from, besides $PSC_DATA_DIR or ./data (repeatable).")
@liveness
def worker_cmd(connect, device, rank, join_timeout, protocol_version, key, server_public, allow_factory, allow_data_dir, timeout, heartbeat):
    """Start one worker; it gets the run's configuration from the server."""
    from runtime import protocol
    from runtime.transport import WorkerKeys
    from runtime.trust import WorkerPolicy
    from worker.worker import Worker

    if (key is None) != (server_public is None):
        raise click.UsageError("CURVE needs both --key (this worker's secret key) and --server-public (the server's public key)")
    try:
        keys = WorkerKeys.load(key, server_public) if key else None
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    factories = tuple(f.strip() for item in allow_factory for f in item.split(",") if f.strip())
    policy = WorkerPolicy(factories, tuple(allow_data_dir))
    check_gpu(device)
    w = Worker(connect, device=device, rank=rank, timeout=timeout, heartbeat=heartbeat, join_timeout=join_timeout,
               protocol_version=protocol.VERSION if protocol_version is None else protocol_version, keys=keys, policy=policy)
    with stop_signals():
        code = w.run()
    sys.exit(code)


@main.command("launch")
@click.option("--workers", type=click.IntRange(min=1), help="Number of workers.  [default: 4]")
@click.option("--engine", type=click.Choice(["procs", "inproc"]), default="procs", show_default=True, help="Real processes and sockets, or everything in this process.")
@click.option("--device", default="auto", show_default=True, type=Device(), help="Workers' device: auto (GPU i mod G, else CPU), cpu, cuda, cuda:K.")
@liveness
@server_security
@fault_options
@run_options
@click.pass_context
def launch_cmd(ctx, workers, engine, device, timeout, heartbeat, server_key, allow_dir, round_timeout,
               checkpoint_dir, checkpoint_every, resume_dir, rejoin_timeout, model_out, **run):
    """One server and N workers on this host; with no options, the built-in demo."""
    from runtime.setup import RunSetup
    from psc.launch import launch

    given = [p.name for p in ctx.command.params
             if p.name != "quiet" and ctx.get_parameter_source(p.name) != click.core.ParameterSource.DEFAULT]
    if not given:
        from psc.demo import run_demo

        sys.exit(run_demo())
    check_resume(resume_dir)
    config, metrics = build_config({**run, "resume_dir": resume_dir}, workers)
    check_gpu(device)
    try:
        setup = RunSetup.build(config)  # a bad spec or option, a missing data file: a usage error, before any process starts
        if resume_dir:
            from runtime.checkpoint import latest

            latest(resume_dir, config.to_dict(), setup.dim)  # a damaged or foreign checkpoint: refused now
    except (ValueError, OSError) as exc:
        raise click.UsageError(str(exc)) from None
    keys = load_server_keys(server_key, allow_dir)
    sys.exit(launch(config, metrics, engine=engine, device=device, timeout=timeout, heartbeat=heartbeat,
                    keys=keys, round_timeout=round_timeout, checkpoint_dir=checkpoint_dir,
                    checkpoint_every=checkpoint_every, resume=resume_dir, rejoin_timeout=rejoin_timeout,
                    model_out=model_out))


@main.command("plot")
@click.argument("runs", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--x", "x_field", required=True, help="Field on the x axis (e.g. cum_bits_down/n, round, time_s).")
@click.option("--y", "y_fields", required=True, multiple=True, help="Field on the y axis (e.g. grad_norm_sq); repeat for one panel per field.")
@click.option("--label", "labels", multiple=True, help="The legend of each file, in order (repeat once per file).  [default: the configuration values that differ]")
@click.option("--logy", is_flag=True, help="Logarithmic y axis.")
@click.option("--logx", is_flag=True, help="Logarithmic x axis.")
@click.option("--title", help="Plot title.  [default: the problem and the number of workers]")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="PNG file to write.")
def plot_cmd(runs, x_field, y_fields, labels, logy, logx, title, output):
    """Curves from metrics files, one line per file.

    A FIELD is any number of the round records (round, time_s, loss, grad_norm_sq, test_accuracy,
    cum_bytes_up, ...) or cum_bits_up / cum_bits_down, each optionally /n (per worker). Bytes are
    drawn in MB.
    """
    from psc.plot import PlotError, plot

    try:
        plot(list(runs), x_field, list(y_fields), output, logy=logy, logx=logx, title=title, labels=list(labels))
    except PlotError as exc:
        raise click.UsageError(str(exc)) from None
    click.echo(f"wrote {output}")


def _number_list(kind):
    """A click callback: a comma-separated list of ``kind`` (int or float); a clear error otherwise."""

    def convert(ctx, param, value):
        if value is None:
            return []
        items = [v for v in str(value).replace(" ", "").split(",") if v]
        try:
            return [kind(v) for v in items]
        except ValueError:
            raise click.BadParameter(f"{value!r} is not a comma-separated list of {kind.__name__}s") from None

    return convert


@main.command("sweep")
@click.option("--method", "methods", multiple=True, required=True,
              help="One method: 'ALGO[ up=SPEC][ down=SPEC][ label=TEXT]' (repeat for each method).")
@click.option("--problem", required=True, help="Problem SPEC; '{n}' in it is replaced by the number of workers.")
@click.option("--workers", "-n", default="4", show_default=True, callback=_number_list(int), help="Numbers of workers, comma-separated.")
@click.option("--lr-exp", "lr_exps", callback=_number_list(float), help="Step sizes theory x 2^i for these i, comma-separated (e.g. -2,-1,0,1).")
@click.option("--lr", "lr_values", callback=_number_list(float), help="Fixed step sizes, comma-separated (e.g. 0.001,0.003).")
@click.option("--seeds", default="0", show_default=True, callback=_number_list(int), help="Seeds, comma-separated.")
@click.option("--rounds", default=100, show_default=True, type=click.IntRange(min=1), help="Rounds per run (at most).")
@click.option("--target", type=float, help="Stop a run once grad_norm_sq <= TARGET x grad_norm_sq(x^0).")
@click.option("--criterion", type=click.Choice(["bits-down", "bits-up", "bits-total", "rounds", "final-loss", "final-grad"]),
              help="What 'best' means (smaller wins).  [default: bits-total with --target, else final-loss]")
@click.option("--jobs", "-j", default=2, show_default=True, type=click.IntRange(min=1), help="Runs at a time (processes).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for every run's metrics file and the summary.")
def sweep_cmd(methods, problem, workers, lr_exps, lr_values, seeds, rounds, target, criterion, jobs, out):
    """A grid of runs over step sizes, seeds, n and methods, in parallel (in-process engine).

    Writes every run's metrics file, runs.jsonl, summary.md and summary.json into --out and prints
    the summary: one row per (method, n, step size) with the median over seeds, and the best step
    size of each method by --criterion.
    """
    from psc.sweep import Sweep, SweepError, lr_grid, parse_method, run_sweep

    try:
        sweep = Sweep([parse_method(m) for m in methods], problem, workers, lr_grid(lr_exps, lr_values), seeds, rounds,
                      target, criterion or ("bits-total" if target is not None else "final-loss"))
        sweep.check()
    except SweepError as exc:
        raise click.UsageError(str(exc)) from None
    if os.path.exists(out) and not os.path.isdir(out):
        raise click.UsageError(f"--out {out}: exists and is not a folder")
    summary = run_sweep(sweep, out, jobs=jobs, log=lambda line: click.echo(line, err=True))
    click.echo(summary["markdown"], nl=False)
    click.echo(f"wrote {len(summary['runs'])} metrics files, summary.md and summary.json in {out} ({summary['seconds']:.0f} s)")
