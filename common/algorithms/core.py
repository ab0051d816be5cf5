"""CORE, Common randOm REconstruction (Yue et al. 2023; MARINA-P paper's F.1/F.2 baseline,
spec/marina-p-m3.md 2.5). m shared Gaussian directions a round, m floats each way.

    shared:    xi_1..xi_m ~ N(0, I_d), drawn from the key (seed, t, 0, "core")
    worker i:  send p_{i,j} = <grad f_i(x^t), xi_j>, j = 1..m            (m floats)
    server:    p_j = (1/n) sum_i p_{i,j}; broadcast p (m floats)
    everyone:  g~ = (1/m) sum_j p_j xi_j;  x^{t+1} = x^t - gamma g~

The directions are drawn on the CPU (float64, ``StreamKey(seed, t, 0, "core").torch_generator("cpu")``)
and then cast and moved, so a CPU server and a CUDA worker get the same numbers. Everyone steps with
the decoded p (the server with the payload it sends). Option m (default 10, as in F.1).
Theory step: E g~ = grad f and E||g~||^2 = ((d + m + 1)/m) ||grad f||^2 for Gaussian xi, so the descent
lemma gives gamma = m / (L (d + m + 1)) (derived here; CORE's own theorem uses tr(A) instead of d L).
"""
from __future__ import annotations

import torch

from common.algorithms.base import Algorithm, register, ServerRule, WorkerRule, dense, full, need_constants, mean_of
from common.options import Param
from common.keys import StreamKey
from common.compressors.message import Message


def directions(ctx, t: int, device, dtype) -> torch.Tensor:
    """The m x d matrix of shared Gaussian directions of round t."""
    gen = StreamKey(ctx.seed, t, 0, "core").torch_generator("cpu")
    xi = torch.randn(ctx.options["m"], ctx.dim, generator=gen, dtype=torch.float64)
    return xi.to(dtype).to(device)


class CoreServer(ServerRule):
    def step(self, t, uplinks):
        p = mean_of(uplinks, "p")   # p_j
        down = Message({"p": full(p)})
        xi = directions(self.ctx, t, self.x.device, self.x.dtype)
        self.x = self.x - self.ctx.lr * (dense(down.payloads["p"]) @ xi) / xi.shape[0]
        return [down] * self.ctx.n


class CoreWorker(WorkerRule):
    def uplink(self, t):
        xi = directions(self.ctx, t, self.x.device, self.x.dtype)
        return Message({"p": full(xi @ self.grad(self.x, t))})                 # <grad f_i, xi_j>

    def downlink(self, t, msg):
        xi = directions(self.ctx, t, self.x.device, self.x.dtype)
        self.x = self.x - self.ctx.lr * (dense(msg.payloads["p"]) @ xi) / xi.shape[0]


@register
class Core(Algorithm):
    name = "core"
    paper = "Yue et al. 2023 (CORE); MARINA-P paper F.1"
    summary = "m shared Gaussian directions: m scalar projections each way"
    sends = "up: <grad f_i(x), xi_j>, j = 1..m (m floats); down: their mean (m floats)"
    server_rule, worker_rule = CoreServer, CoreWorker
    fixed_uplink = fixed_downlink = True
    params = (Param("m", int, 10, lambda v: v >= 1, "at least 1", "number of shared directions"),)

    def context(self, config, dim, problem_constants):
        ctx = super().context(config, dim, problem_constants)
        if ctx.options["m"] > dim:
            raise ValueError(f"algorithm core: m={ctx.options['m']} exceeds the dimension d={dim}")
        return ctx

    def theory_lr(self, ctx):
        (L,) = need_constants(ctx, "L")
        m = ctx.options["m"]
        return m / (L * (ctx.dim + m + 1))
