"""Problems by name: ``build_problem("quadratic:d=300,la2=0,lb2=100", n_workers, seed)``."""
from __future__ import annotations

from common import spec as specs
from common.problems.base import Oracle, Problem
from common.problems.quadratic import Quadratic, quadratic_constants

PROBLEMS: dict[str, type[Problem]] = {cls.name: cls for cls in (Quadratic,)}

__all__ = ["PROBLEMS", "Problem", "Oracle", "build_problem", "quadratic_constants"]


def build_problem(spec: str, n_workers: int, seed: int = 0) -> Problem:
    item = specs.parse(spec)
    cls = PROBLEMS.get(item.name)
    if cls is None:
        raise ValueError(f"unknown problem {item.name!r} (known: {', '.join(PROBLEMS)})")
    return cls(n_workers, seed, item.options)
