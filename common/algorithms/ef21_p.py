"""EF21-P (Gruntkowska, Tyurin, Richtarik 2023), server-to-worker error feedback; the baseline of the
MARINA-P paper's section 6 / F.3 (spec/marina-p-m3.md 2.5). Everyone keeps w^t, w^0 = x^0.

    worker i:  send grad f_i(w^t), uncompressed
    server:    x^{t+1} = x^t - gamma (1/n) sum_i grad f_i(w^t)
               broadcast the SAME c^t = C(x^{t+1} - w^t)          (difference against w, EF style)
    everyone:  w^{t+1} = w^t + c^t                                 (the server from what it sends)

C: ``--downlink``, contractive (default Top-K, 10% of d). The server's model (metrics) is x^t.
Theory step: the paper gives none for F.3's plots that we can check; we use EF21's form
gamma = 1 / (L + L sqrt(beta/theta)), theta = 1 - sqrt(1 - alpha), beta = (1 - alpha)/(1 - sqrt(1 - alpha))
(Richtarik et al. 2021, Thm 1, with the primal compressor's alpha); the experiments tune multiples of it.
"""
from __future__ import annotations

import math


from common.algorithms.base import Algorithm, register, ServerRule, WorkerRule, full, need_constants, descend_by_mean
from common.algorithms.memory import markov_compress, shift
from common.compressors.message import Message


def ef21_factor(alpha: float | None, spec: str, who: str) -> float:
    """sqrt(beta/theta) of EF21 (Richtarik et al. 2021, Thm 1) for a contractive alpha."""
    if alpha is None:
        raise ValueError(f"{who}: {spec!r} is not contractive (no alpha); give --lr a number")
    if alpha >= 1.0:
        return 0.0
    r = math.sqrt(1.0 - alpha)
    theta = 1.0 - r
    beta = (1.0 - alpha) / (1.0 - r)
    return math.sqrt(beta / theta)


class EF21PServer(ServerRule):
    def __init__(self, ctx, x0):
        super().__init__(ctx, x0)
        self.w = self.x.clone()

    def step(self, t, uplinks):
        self.x = descend_by_mean(self.x, self.ctx.lr, uplinks, "g")        # x^{t+1}
        c, self.w = markov_compress(self.ctx.downlink, self.x, self.w, 0, t)  # c^t = C(x^{t+1} - w^t);  w^{t+1} = w^t + c^t
        down = Message({"c": c})
        return [down] * self.ctx.n


class EF21PWorker(WorkerRule):
    """Keeps w^t (``self.x``), the point its gradient is evaluated at."""

    def uplink(self, t):
        return Message({"g": self.encode_grad(self.grad(self.x, t), t)})

    def encode_grad(self, g, t):
        return full(g, copy=False)  # a fresh gradient

    def downlink(self, t, msg):
        self.x = shift(self.x, msg.payloads["c"])                          # w^{t+1} = w^t + c^t


@register
class EF21P(Algorithm):
    name = "ef21-p"
    paper = "Gruntkowska, Tyurin, Richtarik 2023 (EF21-P); defaults: MARINA-P paper sec. 6 / F.3, Top-K with K = d/n"
    summary = "server-to-worker error feedback: one compressed broadcast of x^{t+1} - w^t"
    sends = "up: grad f_i(w^t) (d floats); down: C(x^{t+1} - w^t), the same to every worker"
    server_rule, worker_rule = EF21PServer, EF21PWorker
    default_downlink = "topk:k={k}"
    fixed_uplink = True

    def theory_lr(self, ctx):
        (L,) = need_constants(ctx, "L")
        return 1.0 / (L * (1.0 + ef21_factor(ctx.downlink.constants["alpha"], ctx.downlink_spec, self.name)))
