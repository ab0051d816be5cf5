"""EF21-SGD (Richtarik, Sokolov, Fatkhullin 2021, EF21 with stochastic gradients; spec/neolithic.md 1c).

    round t, worker i:  c_i = C(g_i(x^t) - g_i^t);  g_i^{t+1} = g_i^t + c_i;  send c_i
    server:             g^{t+1} = g^t + (1/n) sum_i c_i;  x^{t+1} = x^t - gamma g^{t+1};  broadcast g^{t+1}
    worker i:           x^{t+1} = x^t - gamma g^{t+1}

This is the paper's order (x^{t+1} = x^t - gamma g^t, then c_i at x^{t+1}) shifted by half a round so
that one round is one uplink and one downlink. g_i^0 = 0, so round 0 sends C(g_i(x^0)) (the
"compressed value" initialisation). Unidirectional: g travels uncompressed. The server mirrors x.
"""
from __future__ import annotations

import torch

from common.algorithms.base import Algorithm, ServerRule, WorkerRule, descend, descend_by, full, register
from common.algorithms.memory import markov_message, shift, shift_by_mean
from common.algorithms.schedule import SCHEDULE_PARAMS, staircase
from common.compressors.message import Message


class EF21SGDServer(ServerRule):
    def __init__(self, ctx, x0):
        super().__init__(ctx, x0)
        self.g = torch.zeros_like(self.x)

    def step(self, t, uplinks):
        self.g = shift_by_mean(self.g, uplinks, "c")                                 # g^{t+1} = g^t + (1/n) sum_i c_i
        self.x = descend(self.x, staircase(self.ctx, t), self.g)
        return [Message({"g": full(self.g, copy=False)})] * self.ctx.n  # g is replaced, never updated in place

    def round_metrics(self):
        return {"comm_rounds": 1}


class EF21SGDWorker(WorkerRule):
    def __init__(self, ctx, rank, oracle, x0):
        super().__init__(ctx, rank, oracle, x0)
        self.g_i = torch.zeros_like(self.x)

    def uplink(self, t):
        c = markov_message(self.ctx.uplink, self.grad(self.x, t), self.g_i, self.rank, t)           # c_i = C(g_i(x^t) - g_i^t)
        return Message({"c": c})

    def settle(self, t, sent):
        self.g_i = shift(self.g_i, sent.payloads["c"], owned=True)                                   # g_i^{t+1} = g_i^t + c_i, once c_i is sent

    def downlink(self, t, msg):
        self.x = descend_by(self.x, staircase(self.ctx, t), msg.payloads["g"])


@register
class EF21SGD(Algorithm):
    name = "ef21-sgd"
    paper = "Richtarik, Sokolov, Fatkhullin 2021 (EF21, stochastic gradients)"
    summary = "EF21 Markov compression of stochastic gradients, uplink only"
    sends = "up: C(g_i(x) - g_i); down: g (d floats)"
    server_rule, worker_rule = EF21SGDServer, EF21SGDWorker
    default_uplink = "topk:ratio=0.05"
    fixed_downlink = True
    params = SCHEDULE_PARAMS
