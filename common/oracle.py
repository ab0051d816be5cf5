"""The gradient oracle: what a problem hands a worker, and what a worker rule calls.

``oracle(x, step) -> (loss, gradient)``: both tensors on x's device, no host sync. The gradient is
a tensor of its own that the oracle does not keep or change afterwards: the rules that send it whole
(GD, AMSGrad, MARINA, MARINA-P, EF21's first round, EF21-P, 1-bit Adam's warm-up, minibatch SGD)
send it as it is, without a copy, while the link may still be reading it. ``step`` names the
sample draw (the same step gives the same minibatch for a stochastic oracle). It lives here, below
both, so that algorithms need not import problems (nor problems algorithms) to name it.

No update rule uses the loss, so an oracle may also carry a gradient-only entry point,
``with_gradient(oracle, gradient)`` with ``gradient(x, step) -> gradient``, which skips it. Where the
loss is a pass of its own over x (the quadratics at d = 1e7: 17 of a worker's 39 ms), that saves it;
where backward needs the loss anyway (neural networks) there is nothing to skip. ``gradient_of`` is
what a rule calls: the entry point where the oracle has one, else the oracle's second result. Both
must give the same bits, and refuse the same input.
"""
from __future__ import annotations

from typing import Callable

import torch

Oracle = Callable[[torch.Tensor, int], "tuple[torch.Tensor, torch.Tensor]"]
Gradient = Callable[[torch.Tensor, int], torch.Tensor]


def with_gradient(oracle: Oracle, gradient: Gradient) -> Oracle:
    """``oracle`` with ``gradient`` as its gradient-only entry point (it must return exactly
    ``oracle(x, step)[1]``, bit for bit). The entry point names its owner, so a wrapper that copies
    the oracle's attributes (``functools.wraps``) does not inherit it and is called whole."""
    oracle._gradient_entry = (oracle, gradient)  # type: ignore[attr-defined]
    return oracle


def gradient_entry(oracle: Oracle) -> Gradient | None:
    """The oracle's gradient-only entry point, or None where ``with_gradient`` gave it none."""
    owner, gradient = getattr(oracle, "_gradient_entry", (None, None))
    return gradient if owner is oracle else None


def gradient_of(oracle: Oracle, x: torch.Tensor, step: int) -> torch.Tensor:
    """The gradient at ``x`` for sample draw ``step``, without the loss where the oracle can skip it."""
    gradient = gradient_entry(oracle)
    return gradient(x, step) if gradient is not None else oracle(x, step)[1]
