"""The gradient oracle: what a problem hands a worker, and what a worker rule calls.

``oracle(x, step) -> (loss, gradient)``: both tensors on x's device, no host sync. ``step`` names the
sample draw (the same step gives the same minibatch for a stochastic oracle). It lives here, below
both, so that algorithms need not import problems (nor problems algorithms) to name it.
"""
from __future__ import annotations

from typing import Callable

import torch

Oracle = Callable[[torch.Tensor, int], "tuple[torch.Tensor, torch.Tensor]"]
