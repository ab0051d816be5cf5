"""Uncompressed distributed AMSGrad (CD-Adam paper sec. 3, the "original AMSGrad" of Figs. 1-2;
spec/cd-adam.md 1.2(a)), server-side update, no bias correction, nu inside the square root:

    worker i:  send g_t^(i) (d floats)
    server:    g_t = (1/n) sum_i g_t^(i);  m, v, v_hat, x: CD-Adam Alg. 1 lines 13-16 with g_t;  broadcast x_{t+1}
"""
from __future__ import annotations


from common.algorithms.amsgrad_state import AMS_PARAMS, amsgrad_step, init_amsgrad
from common.algorithms.base import Algorithm, ServerRule, WorkerRule, dense, full, register, mean_of
from common.compressors.message import Message


class AMSGradServer(ServerRule):
    def __init__(self, ctx, x0):
        super().__init__(ctx, x0)
        init_amsgrad(self)

    def step(self, t, uplinks):
        amsgrad_step(self, mean_of(uplinks, "g"))
        return [Message({"x": full(self.x, copy=False)})] * self.ctx.n  # x is replaced, never updated in place


class AMSGradWorker(WorkerRule):
    def uplink(self, t):
        return Message({"g": full(self.grad(self.x, t), copy=False)})  # a fresh gradient

    def downlink(self, t, msg):
        self.x = dense(msg.payloads["x"])


@register
class AMSGrad(Algorithm):
    name = "amsgrad"
    paper = "Reddi, Kale, Kumar 2018; baseline of Wang, Lin, Chen 2022 (sec. 3)"
    summary = "distributed AMSGrad on the server, uncompressed both ways (no bias correction)"
    sends = "up: g_i (d floats); down: x (d floats)"
    server_rule, worker_rule = AMSGradServer, AMSGradWorker
    fixed_uplink = fixed_downlink = True
    params = AMS_PARAMS
