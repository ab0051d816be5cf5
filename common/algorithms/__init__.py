"""Algorithms by name (INTERFACE.md): each is a server rule and a worker rule (see ``base``)."""
from __future__ import annotations

from common.algorithms.base import Algorithm, RuleContext, ServerRule, WorkerRule
from common.algorithms.gd import GD
from common.algorithms.marina_p import MarinaP
from common import spec as specs

ALGORITHMS: dict[str, Algorithm] = {a.name: a for a in (GD(), MarinaP())}

__all__ = ["ALGORITHMS", "Algorithm", "RuleContext", "ServerRule", "WorkerRule", "get_algorithm"]


def get_algorithm(spec: str) -> tuple[Algorithm, dict]:
    item = specs.parse(spec)
    algo = ALGORITHMS.get(item.name)
    if algo is None:
        raise ValueError(f"unknown algorithm {item.name!r} (known: {', '.join(ALGORITHMS)})")
    return algo, item.options
