"""What a worker lets the server's configuration make it do: nothing from the wire is executed.

A worker takes the run's configuration from the server's WELCOME. Most of it is numbers and names
from fixed registries, which a worker may build as they are. Two kinds of problem options reach
outside the process and are honoured only when the worker's own command line or environment
allows them (``WorkerPolicy``):

* options that **load code**: ``factory=package.module:function`` (``custom``) imports a module and
  calls a function. The factory must be one the worker allows (``--allow-factory``, or
  ``PSC_WORKER_ALLOW_FACTORY``, several separated by commas).
* options that **name local files**: ``data_dir``, ``file``, ``test_file`` (and any option whose
  name ends in ``_dir`` or ``file``). The files must lie inside the worker's own data folder
  ($PSC_DATA_DIR, else ./data) or a folder it allows (``--allow-data-dir``). CIFAR-10 batches are
  pickles, so reading a file the server picked could also run code.

``psc launch`` starts its workers allowing exactly the factory and data folder of the run it was
given, since the same user typed both. Other options need no such check: their values are parsed
by the registries into numbers, flags and names of built-in objects.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from common import spec as specs
from common.config import RunConfig

CODE_OPTIONS = ("factory",)


def _is_path_option(name: str) -> bool:
    return name.endswith("_dir") or name.endswith("file")


def default_data_dir() -> str:
    """The worker's own data folder: $PSC_DATA_DIR, else ./data (what the dataset readers use)."""
    return os.environ.get("PSC_DATA_DIR") or "data"


def _inside(path: str, root: str) -> bool:
    path, root = os.path.realpath(path), os.path.realpath(root)
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


@dataclass(frozen=True)
class WorkerPolicy:
    """The factories and data folders this worker allows a server's configuration to use."""

    factories: tuple[str, ...] = ()
    data_dirs: tuple[str, ...] = field(default_factory=tuple)

    def check(self, config: RunConfig) -> None:
        """Raise ``PermissionError`` naming the option and how to allow it, if ``config`` asks for
        code or files this worker does not allow."""
        item = specs.parse(config.problem)
        for name in CODE_OPTIONS:
            if name in item.options and str(item.options[name]) not in self.factories:
                raise PermissionError(
                    f"the server's configuration asks this worker to import {name}={item.options[name]!r}, "
                    f"which it does not allow; if you trust it, start the worker with --allow-factory {item.options[name]}")
        roots = (default_data_dir(), *self.data_dirs)
        data_dir = str(item.options.get("data_dir") or default_data_dir())
        for name, value in item.options.items():
            if not _is_path_option(name) or value in ("", None):
                continue
            value = str(value)
            path = value if name == "data_dir" or os.path.isabs(value) else os.path.join(data_dir, value)
            if not any(_inside(path, root) for root in roots):
                raise PermissionError(
                    f"the server's configuration asks this worker to read {name}={value!r}, outside the folders it "
                    f"allows ({', '.join(map(repr, roots))}); if you trust it, start the worker with "
                    f"--allow-data-dir {os.path.dirname(os.path.abspath(path)) if name != 'data_dir' else value}")

    @classmethod
    def for_run(cls, config: RunConfig) -> "WorkerPolicy":
        """What ``psc launch`` allows its own workers: the factory and data folder of ``config``."""
        item = specs.parse(config.problem)
        factories = tuple(str(item.options[n]) for n in CODE_OPTIONS if n in item.options)
        data_dir = item.options.get("data_dir")
        dirs = [str(data_dir)] if data_dir else []
        for name, value in item.options.items():
            if _is_path_option(name) and name != "data_dir" and value and os.path.isabs(str(value)):
                dirs.append(os.path.dirname(str(value)))
        return cls(factories, tuple(dirs))

    def argv(self) -> list[str]:
        """The ``psc worker`` options that grant this policy."""
        out: list[str] = []
        for factory in self.factories:
            out += ["--allow-factory", factory]
        for folder in self.data_dirs:
            out += ["--allow-data-dir", folder]
        return out
