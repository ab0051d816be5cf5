"""Algorithms by name (INTERFACE.md): each is a server rule and a worker rule (see ``base``).

Every module of this package is imported here, so an ``Algorithm`` subclass decorated with
``@register`` (the registry of ``common.options``, shared with compressors and problems) exists by
its name as soon as its file does: adding a method means adding one file.
"""
from __future__ import annotations

import importlib
import pkgutil

from common.algorithms.base import ALGORITHMS, Algorithm, RuleContext, ServerRule, WorkerRule, register

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["ALGORITHMS", "Algorithm", "RuleContext", "ServerRule", "WorkerRule", "build_algorithm", "register"]


def build_algorithm(spec: str) -> Algorithm:
    """The algorithm named by ``spec`` with its options checked; a ValueError names what is wrong."""
    return ALGORITHMS.build(spec)
