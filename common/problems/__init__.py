"""Problems by name: ``build_problem("quadratic:d=300,la2=0,lb2=100", n_workers, seed)``.

Every module of this package is imported here, so a ``Problem`` subclass decorated with ``@register``
(the registry of ``common.options``, shared with compressors and algorithms) exists by its name as
soon as its file does: adding a problem means adding one file.
"""
from __future__ import annotations

import importlib
import pkgutil

from common.problems.base import PROBLEMS, Oracle, Problem, register

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")

from common.problems.quadratic import quadratic_constants  # noqa: E402

__all__ = ["PROBLEMS", "Problem", "Oracle", "build_problem", "quadratic_constants", "register"]


def build_problem(spec: str, n_workers: int, seed: int = 0) -> Problem:
    """The problem named by ``spec`` for ``n_workers`` workers; a ValueError names what is wrong."""
    return PROBLEMS.build(spec, n_workers, seed)
