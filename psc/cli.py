"""The ``psc`` command line: one click group (INTERFACE.md).

Exit status: 0 done, 2 usage error (click), 1 runtime failure with a one-line reason on stderr
(a traceback only with ``--debug``).
"""
from __future__ import annotations

import json
import sys

import click

from common.compressors import REGISTRY, describe


class _Group(click.Group):
    """Turns an uncaught error into a one-line message and exit status 1 (unless --debug)."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except Exception as exc:  # noqa: BLE001 - the CLI's last line of defence
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"psc: error: {exc}", err=True)
            sys.exit(1)


@click.group(cls=_Group)
@click.option("--debug", is_flag=True, help="Show tracebacks on errors.")
@click.pass_context
def main(ctx, debug):
    """A compressed parameter server: compressors, server and workers over ZeroMQ."""
    ctx.ensure_object(dict)["debug"] = debug


@main.group("list")
def list_group():
    """What exists: compressors (with their theory constants)."""


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    return f"{value:.4g}"


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
    for spec in specs or [cls.example for cls in REGISTRY.values()]:
        name = spec.split(":")[0].split("+")[0]
        info = describe(spec, dim, workers)
        cls = REGISTRY.get(name)
        rows.append({
            "name": name,
            "example": spec,
            "summary": cls.summary if cls is not None and "+" not in spec else "",
            "options": [p.name for p in cls.params] if cls is not None else [],
            **info,
        })
    if as_json:
        click.echo(json.dumps({"dim": dim, "workers": workers, "compressors": rows}, indent=2))
        return
    click.echo(f"d = {dim}, n = {workers}; bits/coord is the payload's nominal size for one N(0,1) vector")
    header = f"{'spec':34} {'unbiased':8} {'omega':>9} {'alpha':>9} {'b1':>20} {'b2':>20} {'theta':>9} {'bits/coord':>10}"
    click.echo(header)
    click.echo("-" * len(header))
    for row in rows:
        c = row["constants"]
        click.echo(
            f"{row['example']:34} {_fmt(c['unbiased']):8} {_fmt(c['omega']):>9} {_fmt(c['alpha']):>9} "
            f"{_fmt(c['b1']):>20} {_fmt(c['b2']):>20} {_fmt(c['theta']):>9} {row['nominal_bits_per_coord']:>10.4g}"
        )
    if not specs:
        click.echo("")
        for row in rows:
            opts = ", ".join(row["options"]) or "none"
            click.echo(f"  {row['name']:12} {row['summary']} (options: {opts})")
