"""P-SGD, parallel minibatch SGD, uncompressed (NEOLITHIC section 1c; the CIFAR runs' DDP baseline).

    worker i:  g_i = (1/B) sum_{b<B} O_i(x; zeta_i^(t,b))      (oracle steps t*B + b)
    server:    x <- x - gamma (1/n) sum_i g_i;  broadcast x

With identity compressors NEOLITHIC with R rounds equals P-SGD with batch=R (same oracle steps).
"""
from __future__ import annotations


from common.algorithms.base import Algorithm, ServerRule, WorkerRule, dense, full, register, descend_by_mean
from common.algorithms.schedule import SCHEDULE_PARAMS, staircase
from common.options import Param
from common.compressors.message import Message


class PSGDServer(ServerRule):
    def step(self, t, uplinks):
        self.x = descend_by_mean(self.x, staircase(self.ctx, t), uplinks, "g")
        return [Message({"x": full(self.x, copy=False)})] * self.ctx.n  # x is replaced, never updated in place

    def round_metrics(self):
        return {"comm_rounds": 1}


class PSGDWorker(WorkerRule):
    def uplink(self, t):
        B = self.ctx.options["batch"]
        g = self.grad(self.x, t * B)
        for b in range(1, B):
            g = g + self.grad(self.x, t * B + b)
        return Message({"g": full(g / B, copy=False)})  # a fresh vector

    def downlink(self, t, msg):
        self.x = dense(msg.payloads["x"])


@register
class PSGD(Algorithm):
    name = "psgd"
    paper = "baseline (NEOLITHIC sec. 1c)"
    summary = "parallel SGD with B minibatches per round, uncompressed both ways"
    sends = "up: mean of B stochastic gradients (d floats); down: x (d floats)"
    server_rule, worker_rule = PSGDServer, PSGDWorker
    fixed_uplink = fixed_downlink = True
    params = (Param("batch", int, 1, lambda v: v >= 1, "a positive integer", "oracle calls averaged per round"),) + SCHEDULE_PARAMS
