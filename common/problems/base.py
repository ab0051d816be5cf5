"""Problems: the objective f = (1/n) sum_i f_i, a gradient oracle per worker, server-side metrics.

A worker calls ``oracle(x, step)`` on its own device and gets (loss, gradient) as tensors (no host
sync). The server calls ``evaluate(x)`` at its own model for the metrics file, where the problem can
(the quadratics evaluate f and grad f exactly). ``constants`` holds the smoothness constants that
theory step sizes need (L, L_A, L_B, L_max), where known.

A problem is a ``Problem`` subclass decorated with ``@register`` (``common.options.Registry``), built
from its SPEC by ``PROBLEMS.build(spec, n_workers, seed)`` = ``cls(n_workers, seed, options=...)``.
"""
from __future__ import annotations

from typing import Any

import torch

from common.options import Param, Registry, parse_options
from common.oracle import Oracle


class Problem:
    name: str = ""
    summary: str = ""
    params: tuple[Param, ...] = ()

    def __init__(self, n_workers: int, seed: int, options: dict[str, Any]):
        if isinstance(n_workers, bool) or not isinstance(n_workers, int) or n_workers < 1:
            raise ValueError(f"{self.name}: n_workers={n_workers!r} must be a positive integer")
        self.n_workers = n_workers
        self.seed = int(seed)
        self.options = parse_options(f"problem {self.name}", self.params, options)
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

    def export(self, x: torch.Tensor) -> Any:
        """What ``--model-out`` saves with ``torch.save`` for the model x: the flat vector (float64 CPU
        copy unless x is float32); neural networks return a state dict for their model class."""
        return x.detach().to("cpu").clone()

    def state_dict(self) -> dict[str, Any]:
        """The server-side counters ``evaluate`` keeps between calls (saved in a checkpoint so that a
        resumed run measures on the same schedule); {} for a problem that keeps none."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)


PROBLEMS: Registry[type[Problem]] = Registry("problem")
register = PROBLEMS.register  # class decorator: ``@register`` makes a problem buildable by its name
