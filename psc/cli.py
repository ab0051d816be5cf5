"""The ``psc`` command line: one click group (INTERFACE.md).

Exit status: 0 done, 2 usage error (click), 1 runtime failure with a one-line reason on stderr
(a traceback only with ``--debug``).
"""
from __future__ import annotations

import json
import logging
import os
import sys

import click

from common.compressors import REGISTRY, describe
from psc.runopts import build_config, run_options
from runtime.signals import Terminated, stop_signals


class _Group(click.Group):
    """Turns an uncaught error into a one-line message and exit status 1 (unless --debug), and
    SIGINT / SIGTERM into exit status 130 / 143."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
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
@click.option("--quiet", "-q", is_flag=True, help="Log warnings and errors only.")
@click.pass_context
def main(ctx, debug, quiet):
    """A compressed parameter server: compressors, server and workers over ZeroMQ.

    Every option can also come from the environment: PSC_<COMMAND>_<OPTION>, e.g.
    PSC_SERVER_ROUNDS=100 or PSC_WORKER_CONNECT=tcp://server:5555.
    """
    ctx.ensure_object(dict)["debug"] = debug
    level = logging.DEBUG if debug else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(name)s: %(message)s", stream=sys.stderr)


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


_liveness = [
    click.option("--timeout", default=60.0, show_default=True, type=click.FloatRange(min=0.1), help="Seconds of silence after which the other side is declared gone."),
    click.option("--heartbeat", default=1.0, show_default=True, type=click.FloatRange(min=0.01), help="Seconds between heartbeats."),
]


def liveness(func):
    for option in reversed(_liveness):
        func = option(func)
    return func


@main.command("server")
@click.option("--bind", default="tcp://0.0.0.0:5555", show_default=True, help="ZeroMQ endpoint to bind.")
@click.option("--workers", type=click.IntRange(min=1), help="Number of workers to wait for.  [default: 4]")
@click.option("--join-timeout", default=600.0, show_default=True, type=click.FloatRange(min=0.1), help="Seconds to wait for all workers to join.")
@liveness
@run_options
def server_cmd(bind, workers, join_timeout, timeout, heartbeat, **run):
    """Start the server: wait for N workers, then run the rounds."""
    from psserver.server import Server

    config, metrics = build_config(run, workers)
    try:
        server = Server(config, bind, metrics, timeout=timeout, heartbeat=heartbeat, join_timeout=join_timeout)
    except ValueError as exc:  # a bad spec or option: the user's to fix
        raise click.UsageError(str(exc)) from None
    click.echo(f"psc server: {config.algorithm} on {config.problem}, {config.workers} workers, listening on {server.endpoint}", err=True)
    with stop_signals():
        code = server.run()
    sys.exit(code)


@main.command("worker")
@click.option("--connect", required=True, help="The server's endpoint, e.g. tcp://HOST:5555.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:K (auto: GPU local_rank mod count, else CPU).")
@click.option("--rank", type=click.IntRange(min=0), help="Ask for this rank (default: the server assigns one).")
@click.option("--join-timeout", default=600.0, show_default=True, type=click.FloatRange(min=0.1), help="Seconds to wait for the server to answer.")
@click.option("--protocol-version", type=int, hidden=True, help="Speak another protocol version (for tests).")
@liveness
def worker_cmd(connect, device, rank, join_timeout, protocol_version, timeout, heartbeat):
    """Start one worker; it gets the run's configuration from the server."""
    from runtime import protocol
    from worker.worker import Worker

    w = Worker(connect, device=device, rank=rank, timeout=timeout, heartbeat=heartbeat, join_timeout=join_timeout,
               protocol_version=protocol.VERSION if protocol_version is None else protocol_version)
    with stop_signals():
        code = w.run()
    sys.exit(code)


@main.command("launch")
@click.option("--workers", type=click.IntRange(min=1), help="Number of workers.  [default: 4]")
@click.option("--engine", type=click.Choice(["procs", "inproc"]), default="procs", show_default=True, help="Real processes and sockets, or everything in this process.")
@click.option("--device", default="auto", show_default=True, help="Workers' device: auto (GPU i mod G, else CPU), cpu, cuda, cuda:K.")
@liveness
@run_options
@click.pass_context
def launch_cmd(ctx, workers, engine, device, timeout, heartbeat, **run):
    """One server and N workers on this host; with no options, the built-in demo."""
    from runtime.setup import RunSetup
    from psc.launch import launch

    given = [p.name for p in ctx.command.params if ctx.get_parameter_source(p.name) != click.core.ParameterSource.DEFAULT]
    if not given:
        from psc.demo import run_demo

        sys.exit(run_demo())
    config, metrics = build_config(run, workers)
    try:
        RunSetup.build(config)  # a bad spec or option fails here as a usage error, before any process starts
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    sys.exit(launch(config, metrics, engine=engine, device=device, timeout=timeout, heartbeat=heartbeat))


@main.command("plot")
@click.argument("runs", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--x", "x_field", required=True, help="Field on the x axis (e.g. cum_bytes_down/n, round, time_s).")
@click.option("--y", "y_field", required=True, help="Field on the y axis (e.g. grad_norm_sq).")
@click.option("--logy", is_flag=True, help="Logarithmic y axis.")
@click.option("--logx", is_flag=True, help="Logarithmic x axis.")
@click.option("--title", help="Plot title.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="PNG file to write.")
def plot_cmd(runs, x_field, y_field, logy, logx, title, output):
    """Curves from metrics files, one line per file."""
    from psc.plot import plot

    plot(list(runs), x_field, y_field, output, logy=logy, logx=logx, title=title)
    click.echo(f"wrote {output}")
