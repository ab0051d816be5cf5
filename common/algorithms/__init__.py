"""Algorithms by name (INTERFACE.md): each is a server rule and a worker rule (see ``base``).

Every module of this package is imported here, so an ``Algorithm`` subclass decorated with
``@register`` (the registry of ``common.options``, shared with compressors and problems) exists by
its name as soon as its file does: adding a method means adding one file.
"""
from __future__ import annotations

import importlib
import pkgutil

from common.algorithms.base import ALGORITHMS, Algorithm, RuleContext, ServerRule, WorkerRule, register

# ``psc list algorithms`` shows the registration order, which is this import order; a module added to
# this package is imported after these (and listed after them).
_LISTED = ("amsgrad", "amsgrad_ef", "amsgrad_naive", "cd_adam", "core", "dcgd", "neolithic", "double_squeeze",
           "ef21_p", "ef21", "ef21_p_dcgd", "ef21_sgd", "ef_sgd", "gd", "marina", "marina_p", "m3", "mem_sgd",
           "onebit_adam", "psgd")
for _name in _LISTED + tuple(m.name for m in pkgutil.iter_modules(__path__)):
    importlib.import_module(f"{__name__}.{_name}")

__all__ = ["ALGORITHMS", "Algorithm", "RuleContext", "ServerRule", "WorkerRule", "build_algorithm", "register"]


def build_algorithm(spec: str) -> Algorithm:
    """The algorithm named by ``spec`` with its options checked; a ValueError names what is wrong."""
    return ALGORITHMS.build(spec)
