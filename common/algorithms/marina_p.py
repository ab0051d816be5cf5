"""MARINA-P (Gruntkowska, Tyurin, Richtarik 2024, Algorithm 1 / eq. 6): server-to-worker compression
with a different message per worker.

    worker i:  send grad f_i(w_i^t), uncompressed                         (line 1: at its own w_i)
    server:    g^t = (1/n) sum_i grad f_i(w_i^t);  x^{t+1} = x^t - gamma g^t (line 2)
               c^t ~ Bernoulli(p), one coin for all                       (line 3)
               c^t = 1: send x^{t+1} to everyone; else send C_i^t(x^{t+1} - x^t) to worker i
    worker i:  w_i^{t+1} = x^{t+1} if c^t = 1, else w_i^t + C_i^t(x^{t+1} - x^t)   (line 4)

w_i^0 = x^0. Downlink compressor: ``permk`` by default (theta = 0, so mean_i w_i^t = x^t exactly),
``samerandk`` or ``randk`` with k = d/n as in the paper. p defaults to 1/(omega_P + 1).
Theory step (Thm D.1, which gives Thm D.2's three cases with theta = omega, omega/n and 0):
gamma = 1 / (L + sqrt((L_A^2 omega_P + L_B^2 theta)(1/p - 1))).
"""
from __future__ import annotations

import math


from common.algorithms.base import Algorithm, register, ServerRule, WorkerRule, full, need_constants, descend_by_mean
from common.algorithms.marina_p_downlink import model_messages, shifted_model
from common.algorithms.sync import sync_probability
from common.options import Param
from common.compressors.message import Message


def marina_p_probability(ctx) -> float:
    """p: the option p=, else 1/(omega_P + 1) of the downlink."""
    return sync_probability(ctx.options["p"], ctx.downlink, ctx.downlink_spec, "marina-p downlink")


class MarinaPServer(ServerRule):
    def __init__(self, ctx, x0):
        super().__init__(ctx, x0)
        self.compressor = ctx.downlink
        self.p = marina_p_probability(ctx)

    def step(self, t, uplinks):
        x_next = descend_by_mean(self.x, self.ctx.lr, uplinks, "g")                  # line 2
        out = model_messages(self.ctx, self.compressor, self.x, x_next, t, self.ctx.coin(t, self.p))   # line 3
        self.x = x_next
        return out


class MarinaPWorker(WorkerRule):
    """Keeps w_i (``self.x``), the point its gradient is evaluated at."""

    def uplink(self, t):
        return Message({"g": full(self.grad(self.x, t), copy=False)})               # line 1 (a fresh gradient)

    def downlink(self, t, msg):
        self.x = shifted_model(self.x, msg)                                          # line 4


@register
class MarinaP(Algorithm):
    name = "marina-p"
    paper = "Gruntkowska, Tyurin, Richtarik 2024 (Alg. 1)"
    summary = "server-to-worker compression, a different message per worker (Perm-K)"
    sends = "up: grad f_i(w_i) (d floats); down: C_i(x^{t+1} - x^t), or x^{t+1} with probability p"
    server_rule, worker_rule = MarinaPServer, MarinaPWorker
    default_downlink = "permk"
    fixed_uplink = True
    params = (Param("p", float, None, lambda v: 0 < v <= 1, "in (0, 1]", "sync probability (default 1/(omega+1))"),)

    def theory_lr(self, ctx):
        L, L_A, L_B = need_constants(ctx, "L", "L_A", "L_B")
        c = ctx.downlink.constants
        p = marina_p_probability(ctx)
        return 1.0 / (L + math.sqrt((L_A**2 * c["omega"] + L_B**2 * c["theta"]) * (1.0 / p - 1.0)))
