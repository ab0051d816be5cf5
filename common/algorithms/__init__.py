"""Algorithms by name (INTERFACE.md): each is a server rule and a worker rule (see ``base``).

Every module of this package that defines an ``Algorithm`` subclass decorated with ``@register``
is imported here, so adding a method means adding one file.
"""
from __future__ import annotations

import importlib
import pkgutil

from common import spec as specs
from common.algorithms.base import ALGORITHMS, Algorithm, RuleContext, ServerRule, WorkerRule, register

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["ALGORITHMS", "Algorithm", "RuleContext", "ServerRule", "WorkerRule", "get_algorithm", "register"]


def get_algorithm(spec: str) -> tuple[Algorithm, dict]:
    item = specs.parse(spec)
    algo = ALGORITHMS.get(item.name)
    if algo is None:
        raise ValueError(f"unknown algorithm {item.name!r} (known: {', '.join(sorted(ALGORITHMS))})")
    return algo, item.options
