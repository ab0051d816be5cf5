"""Shared pieces of the AMSGrad family (CD-Adam Algorithm 1 lines 13-16; spec/cd-adam.md 1.1-1.2).
Defines no Algorithm.

    m_t = beta1 m_{t-1} + (1 - beta1) g                         (line 13)
    v_t = beta2 v_{t-1} + (1 - beta2) g^2                       (line 14)
    v_hat_t = max(v_hat_{t-1}, v_t)                             (line 15, the max over the raw v)
    x_{t+1} = x_t - alpha m_t / sqrt(v_hat_t + nu)              (line 16: nu inside the sqrt, no bias correction)

``MirrorServer`` / ``MirrorWorker``: the "worker-side model update" topology of CD-Adam. The workers
hold x, m, v, v_hat and update them with the direction the server broadcast; the server applies the
same update to its own copy (it knows what it sent), so its ``model`` is the workers' x, bit for bit.
"""
from __future__ import annotations

import torch

from common.algorithms.base import ServerRule, WorkerRule
from common.compressors import cpu_kernels
from common.options import Param

AMS_PARAMS = (
    Param("beta1", float, 0.9, lambda v: 0 <= v < 1, "in [0, 1)", "momentum"),
    Param("beta2", float, 0.99, lambda v: 0 <= v < 1, "in [0, 1)", "second-moment decay"),
    Param("nu", float, 1e-8, lambda v: v > 0, "positive", "added to v_hat inside the square root"),
)


def init_amsgrad(rule) -> None:
    rule.m = torch.zeros_like(rule.x)
    rule.v = torch.zeros_like(rule.x)
    rule.v_hat = torch.zeros_like(rule.x)
    # where the compiled step will run, load it now (the rules are built before the run's clock
    # starts); for other vectors the call returns at once, without loading anything
    _fused(rule, torch.zeros_like(rule.x))


def _fused(rule, g: torch.Tensor):
    o = rule.ctx.options
    return cpu_kernels.amsgrad_step(rule.x, rule.m, rule.v, rule.v_hat, g, o["beta1"], o["beta2"], rule.ctx.lr, o["nu"])


def amsgrad_step(rule, g: torch.Tensor) -> None:
    """Lines 13-16 on ``rule``'s x, m, v, v_hat (the same operations in the same order on every side).
    Large CPU vectors take one compiled pass with the same bits (``cpu_kernels.amsgrad_step``)."""
    fused = _fused(rule, g)
    if fused is not None:
        rule.x, rule.m, rule.v, rule.v_hat = fused
        return
    o = rule.ctx.options
    rule.m = o["beta1"] * rule.m + (1 - o["beta1"]) * g                                   # line 13
    rule.v = o["beta2"] * rule.v + (1 - o["beta2"]) * g * g                               # line 14
    rule.v_hat = torch.maximum(rule.v_hat, rule.v)                                        # line 15
    rule.x = rule.x - rule.ctx.lr * rule.m / torch.sqrt(rule.v_hat + o["nu"])             # line 16


class MirrorServer(ServerRule):
    def __init__(self, ctx, x0):
        super().__init__(ctx, x0)
        init_amsgrad(self)


class MirrorWorker(WorkerRule):
    def __init__(self, ctx, rank, oracle, x0):
        super().__init__(ctx, rank, oracle, x0)
        init_amsgrad(self)
