"""Double-Squeeze (Tang et al. 2019, as recalled in NEOLITHIC App. C.3, no momentum; spec/neolithic.md 1c).

    worker i:  v_i = g_i + delta_i;  send Q_i(v_i);  delta_i <- v_i - Q_i(v_i)     (worker error feedback)
    server:    v = (1/n) sum_i Q_i(v_i) + delta;  broadcast Q(v);  delta <- v - Q(v)  (server error feedback)
    worker i:  x <- x - gamma Q(v)

Errors live in gradient units and gamma is applied at the update (pitfall P6). This is NEOLITHIC
with R = 1 and no accumulation; it is written out separately so that the tests compare two codes.
One stochastic gradient per round (oracle step t). The server mirrors x.
"""
from __future__ import annotations

import torch

from common.algorithms.base import Algorithm, ServerRule, WorkerRule, descend_by, register
from common.algorithms.memory import error_feedback, shift_by_mean
from common.algorithms.schedule import SCHEDULE_PARAMS, staircase
from common.compressors.message import Message


class DoubleSqueezeServer(ServerRule):
    def __init__(self, ctx, x0):
        super().__init__(ctx, x0)
        self.delta = torch.zeros_like(self.x)

    def step(self, t, uplinks):
        v = shift_by_mean(self.delta, uplinks, "q", owned=True)    # v = (1/n) sum_i Q_i(v_i) + delta (delta + it: the same sum; delta is replaced)
        q, self.delta = error_feedback(self.ctx.downlink, v, 0, t, owned=True)   # broadcast Q(v);  delta <- v - Q(v)
        self.x = descend_by(self.x, staircase(self.ctx, t), q)
        return [Message({"q": q})] * self.ctx.n

    def round_metrics(self):
        return {"comm_rounds": 1}


class DoubleSqueezeWorker(WorkerRule):
    def __init__(self, ctx, rank, oracle, x0):
        super().__init__(ctx, rank, oracle, x0)
        self.delta = torch.zeros_like(self.x)

    def uplink(self, t):
        v = self.grad(self.x, t) + self.delta                           # v_i = g_i + delta_i
        q, self.delta = error_feedback(self.ctx.uplink, v, self.rank, t, owned=True)  # (v is fresh) send Q_i(v_i);  delta_i <- v_i - Q_i(v_i)
        return Message({"q": q})

    def downlink(self, t, msg):
        self.x = descend_by(self.x, staircase(self.ctx, t), msg.payloads["q"])


@register
class DoubleSqueeze(Algorithm):
    name = "double-squeeze"
    paper = "Tang, Yu, Lian, Zhang, Liu 2019 (NEOLITHIC App. C.3)"
    summary = "bidirectional compression with error feedback on both sides"
    sends = "up: Q_i(g_i + delta_i); down: Q(mean + delta), one broadcast"
    server_rule, worker_rule = DoubleSqueezeServer, DoubleSqueezeWorker
    default_uplink, default_downlink = "topk:ratio=0.05", "topk:ratio=0.05"
    params = SCHEDULE_PARAMS
