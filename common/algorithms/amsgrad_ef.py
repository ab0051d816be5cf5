"""AMSGrad + EF: the COMP-AMS scheme (Li, Karimi, Li 2022) as the CD-Adam paper's "AMSGrad + EF"
baseline (sec. 4, eq. 4.2; spec/cd-adam.md 1.2(c)).

    worker i:  g_hat^(i) = C(g_t^(i) + delta^(i));  delta^(i) <- g_t^(i) + delta^(i) - g_hat^(i);  send g_hat^(i)
    server:    g_hat = (1/n) sum_i g_hat^(i)
               d_t = C_0(g_hat + delta_bar);  delta_bar <- g_hat + delta_bar - d_t;  broadcast d_t
    all:       m, v, v_hat, x: CD-Adam Alg. 1 lines 13-16 with d_t (v built from the compressed
               aggregate, eq. 4.2)

With --downlink identity this is COMP-AMS as published (AMSGrad on the server fed the average of
error-feedback-compressed gradients; d_t = g_hat travels in full, the same bytes as broadcasting x).
The default compresses the downlink too, with a server residual delta_bar (the spec's
recommendation: CD-Adam's topology, only the compression strategy differs). The server mirrors x.
"""
from __future__ import annotations

import torch

from common.algorithms.amsgrad_state import AMS_PARAMS, MirrorServer, MirrorWorker, amsgrad_step
from common.algorithms.base import Algorithm, dense, register
from common.algorithms.memory import error_feedback, shift_by_mean
from common.compressors.message import Message


class EFServer(MirrorServer):
    def __init__(self, ctx, x0):
        super().__init__(ctx, x0)
        self.delta = torch.zeros_like(self.x)

    def step(self, t, uplinks):
        p = shift_by_mean(self.delta, uplinks, "c")                 # g_hat + delta_bar (delta_bar + g_hat: the same sum)
        d_t, self.delta = error_feedback(self.ctx.downlink, p, 0, t)  # d_t = C_0(...);  delta_bar <- g_hat + delta_bar - d_t
        amsgrad_step(self, dense(d_t))
        return [Message({"c": d_t})] * self.ctx.n


class EFWorker(MirrorWorker):
    def __init__(self, ctx, rank, oracle, x0):
        super().__init__(ctx, rank, oracle, x0)
        self.delta = torch.zeros_like(self.x)

    def uplink(self, t):
        p = self.grad(self.x, t) + self.delta                            # g_t^(i) + delta^(i)
        c, self.delta = error_feedback(self.ctx.uplink, p, self.rank, t, owned=True)  # (p is fresh) g_hat^(i) = C(...);  delta^(i) <- ... - g_hat^(i)
        return Message({"c": c})

    def downlink(self, t, msg):
        amsgrad_step(self, dense(msg.payloads["c"]))


@register
class AMSGradEF(Algorithm):
    name = "amsgrad-ef"
    paper = "Li, Karimi, Li 2022 (COMP-AMS); baseline of Wang, Lin, Chen 2022 (sec. 4)"
    summary = "AMSGrad fed error-feedback-compressed gradients (COMP-AMS), EF on both sides"
    sends = "up: C(g_i + delta_i); down: C(mean + delta_bar), one broadcast"
    server_rule, worker_rule = EFServer, EFWorker
    default_uplink, default_downlink = "sign", "sign"
    params = AMS_PARAMS
