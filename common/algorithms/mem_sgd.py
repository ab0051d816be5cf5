"""MEM-SGD (Stich, Cordonnier, Jaggi 2018; NEOLITHIC Algorithm 3, App. C.4; spec/neolithic.md 1c).

    worker i:  p_i = gamma g_i + e_i        (gamma applied BEFORE compression, error in model units, P6)
               send q_i = C_i(p_i);  e_i <- p_i - q_i
    server:    broadcast q_bar = (1/n) sum_i q_i, losslessly (unidirectional)
    worker i:  x <- x - q_bar

Virtual sequence (App. C.4): y = x - (1/n) sum_i e_i follows y - (gamma/n) sum_i g_i exactly.
One stochastic gradient per round (oracle step t). The server mirrors x.
"""
from __future__ import annotations

import torch

from common.algorithms.base import Algorithm, ServerRule, WorkerRule, descend, descend_by, full, register, mean_of
from common.algorithms.memory import error_feedback
from common.algorithms.schedule import SCHEDULE_PARAMS, staircase
from common.compressors.message import Message


class MemSGDServer(ServerRule):
    def step(self, t, uplinks):
        q_bar = mean_of(uplinks, "q")
        self.x = descend(self.x, 1.0, q_bar)  # x - 1 q_bar is x - q_bar, in one compiled pass that notes finiteness
        return [Message({"q_bar": full(q_bar)})] * self.ctx.n

    def round_metrics(self):
        return {"comm_rounds": 1}


class MemSGDWorker(WorkerRule):
    def __init__(self, ctx, rank, oracle, x0):
        super().__init__(ctx, rank, oracle, x0)
        self.e = torch.zeros_like(self.x)

    def uplink(self, t):
        p = staircase(self.ctx, t) * self.grad(self.x, t) + self.e        # p_i = gamma g_i + e_i
        q, self.e = error_feedback(self.ctx.uplink, p, self.rank, t, owned=True)  # (p is fresh) q_i = C_i(p_i);  e_i <- p_i - q_i
        return Message({"q": q})

    def downlink(self, t, msg):
        self.x = descend_by(self.x, 1.0, msg.payloads["q_bar"])  # x - 1 q_bar is x - q_bar


@register
class MemSGD(Algorithm):
    name = "mem-sgd"
    paper = "Stich, Cordonnier, Jaggi 2018 (NEOLITHIC Alg. 3)"
    summary = "SGD with memory (error feedback in model units), uplink compression only"
    sends = "up: C_i(gamma g_i + e_i); down: mean of the q_i (d floats)"
    server_rule, worker_rule = MemSGDServer, MemSGDWorker
    default_uplink = "topk:ratio=0.05"
    fixed_downlink = True
    params = SCHEDULE_PARAMS
