"""Problems: the objective f = (1/n) sum_i f_i, a gradient oracle per worker, server-side metrics.

A worker calls ``oracle(x, step)`` on its own device and gets (loss, gradient) as tensors (no host
sync). The server calls ``evaluate(x)`` at its own model for the metrics file, where the problem can
(the quadratics evaluate f and grad f exactly). ``constants`` holds the smoothness constants that
theory step sizes need (L, L_A, L_B, L_max), where known.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from common.compressors.base import Param

Oracle = Callable[[torch.Tensor, int], "tuple[torch.Tensor, torch.Tensor]"]


PROBLEMS: dict[str, type["Problem"]] = {}


def register(cls):
    """Class decorator: make the problem buildable by its ``name``."""
    if cls.name in PROBLEMS:
        raise ValueError(f"problem {cls.name!r} registered twice")
    PROBLEMS[cls.name] = cls
    return cls


class Problem:
    name: str = ""
    summary: str = ""
    params: tuple[Param, ...] = ()

    def __init__(self, n_workers: int, seed: int, options: dict[str, Any]):
        if isinstance(n_workers, bool) or not isinstance(n_workers, int) or n_workers < 1:
            raise ValueError(f"{self.name}: n_workers={n_workers!r} must be a positive integer")
        self.n_workers = n_workers
        self.seed = int(seed)
        known = {p.name: p for p in self.params}
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise ValueError(f"problem {self.name}: unknown option {unknown[0]!r} (options: {', '.join(known) or 'none'})")
        self.options = {p.name: p.convert(f"problem {self.name}", options[p.name]) if p.name in options else p.default for p in self.params}
        self.dim = 0
        self.constants: dict[str, float] = {}

    def initial_point(self) -> torch.Tensor:
        """x^0, float64 on the CPU (the run casts it to its dtype and device)."""
        raise NotImplementedError

    def oracle(self, worker: int, device: torch.device, dtype: torch.dtype) -> Oracle:
        raise NotImplementedError

    def evaluate(self, x: torch.Tensor) -> dict[str, float]:
        """Server-side metrics at x (loss, grad_norm_sq, ...); {} when the server cannot know them."""
        return {}
