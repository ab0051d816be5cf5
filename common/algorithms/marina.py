"""MARINA, uplink compression (Gorbunov et al. 2021; MARINA-P paper eq. 5, spec/marina-p-m3.md 2.2).

    x^{t+1} = x^t - gamma g^t;   c^t ~ Bernoulli(p), one coin for all             (eq. 5)
    g_i^{t+1} = grad f_i(x^{t+1})                                   if c^t = 1
              = g_i^t + Q_i(grad f_i(x^{t+1}) - grad f_i(x^t))       otherwise
    g^{t+1} = (1/n) sum_i g_i^{t+1},   g^0 = grad f(x^0)  (a full first upload)

Round t of the runtime: worker i sends (at its copy of x^t) the full gradient on round 0 and after
a sync coin, else Q_i of its gradient difference (it caches grad f_i(x^{t-1})); the server forms g^t,
steps x^{t+1} = x^t - gamma g^t, draws c^t (``ctx.coin(t, p, "coin")``) and broadcasts x^{t+1}
uncompressed with the flag. Q_i: ``--uplink``, default Rand-K with K = max(1, d // n), independent
per worker; p defaults to 1/(omega + 1) (= K/d for Rand-K). With p = 1 every round is GD.
Theory step (MARINA Thm 2.1): gamma = 1 / (L + L_hat sqrt((1 - p) omega / (p n))), with
L_hat^2 = (1/n) sum L_i^2; where the problem does not give L_hat, L_max >= L_hat is used (smaller step).
"""
from __future__ import annotations

import math

import torch

from common.algorithms.base import Algorithm, register, ServerRule, WorkerRule, dense, full, need_constants, mean_of, descend
from common.algorithms.memory import shift_by_mean
from common.algorithms.sync import sync_probability, unbiased_omega
from common.options import Param
from common.compressors.message import Message


def marina_probability(ctx) -> float:
    """p: the option p=, else 1/(omega + 1) of the uplink."""
    return sync_probability(ctx.options["p"], ctx.uplink, ctx.uplink_spec, "marina")


class MarinaServer(ServerRule):
    def __init__(self, ctx, x0):
        super().__init__(ctx, x0)
        self.p = marina_probability(ctx)
        self.g = torch.zeros_like(self.x)
        self.sync = True  # round 0: g^0 is a full upload

    def step(self, t, uplinks):
        self.g = mean_of(uplinks, "g") if self.sync else shift_by_mean(self.g, uplinks, "g")  # g^t (eq. 5)
        self.x = descend(self.x, self.ctx.lr, self.g)         # x^{t+1} = x^t - gamma g^t
        self.sync = self.ctx.coin(t, self.p)                  # c^t ~ Bern(p)
        down = Message({"x": full(self.x, copy=False)}, {"sync": self.sync})  # x is replaced, never updated in place
        return [down] * self.ctx.n


def difference_message(rule: WorkerRule, g, sync: bool, t: int) -> Message:
    """MARINA's uplink (eq. 5): the full gradient after a sync coin, else Q_i(g - g_prev); keeps g
    as ``rule.g_prev`` for the next difference (M3 sends its uplink the same way, at z_i)."""
    if sync:
        out = Message({"g": full(g, copy=False)})  # a fresh gradient, kept as g_prev and never updated in place
    else:
        out = Message({"g": rule.ctx.uplink.compress_difference(g, rule.g_prev, worker=rule.rank, step=t)})
    rule.g_prev = g
    return out


class MarinaWorker(WorkerRule):
    """Keeps x^t, the cached grad f_i(x^{t-1}) and the coin c^{t-1}."""

    def __init__(self, ctx, rank, oracle, x0):
        super().__init__(ctx, rank, oracle, x0)
        self.g_prev = None
        self.sync = True

    def uplink(self, t):
        return difference_message(self, self.grad(self.x, t), self.sync, t)

    def downlink(self, t, msg):
        self.x = dense(msg.payloads["x"])
        self.sync = bool(msg.meta["sync"])


@register
class Marina(Algorithm):
    name = "marina"
    paper = "Gorbunov et al. 2021; MARINA-P paper eq. 5"
    summary = "uplink compression of gradient differences with a shared sync coin"
    sends = "up: Q_i(grad f_i(x^t) - grad f_i(x^{t-1})), or grad f_i(x^t) after a sync coin (round 0 full); down: x^{t+1} (d floats) + coin"
    server_rule, worker_rule = MarinaServer, MarinaWorker
    default_uplink = "randk:k={k}"
    fixed_downlink = True
    params = (Param("p", float, None, lambda v: 0 < v <= 1, "in (0, 1]", "sync probability (default 1/(omega+1))"),)

    def theory_lr(self, ctx):
        L, L_max = need_constants(ctx, "L", "L_max")
        L_hat = ctx.problem_constants.get("L_hat", L_max)
        omega = unbiased_omega(ctx.uplink, ctx.uplink_spec, "marina")
        p = marina_probability(ctx)
        return 1.0 / (L + L_hat * math.sqrt((1.0 - p) * omega / (p * ctx.n)))
