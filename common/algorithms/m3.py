"""M3 = MARINA-P + momentum + MARINA (Gruntkowska, Tyurin, Richtarik 2024, Algorithm 2 / eq. 14;
spec/marina-p-m3.md 2.4). Bidirectional.

    init:      w_i^0 = z_i^0 = x^0, g^0 = (1/n) sum_i grad f_i(z_i^0)       (a full first upload)
    line 1:    x^{t+1} = x^t - gamma g^t;  c_P^t ~ Bern(p_P), c_D^t ~ Bern(p_D), independent, shared
    line 2:    server -> worker i: x^{t+1} if c_P^t = 1, else C_i^t(x^{t+1} - x^t)   (Perm-K)
    line 3:    w_i^{t+1} = x^{t+1} or w_i^t + C_i^t(x^{t+1} - x^t)
               z_i^{t+1} = beta w_i^{t+1} + (1 - beta) z_i^t                        (momentum)
               send grad f_i(z_i^{t+1}) if c_D^t = 1, else Q_i^t(grad f_i(z_i^{t+1}) - grad f_i(z_i^t))
    line 4:    g^{t+1} = (1/n) sum_i grad f_i(z_i^{t+1}) or g^t + (1/n) sum_i Q_i^t(...)

Runtime round t: worker uplinks the gradient message for z_i^t (full on round 0 and after c_D^{t-1} = 1),
caching grad f_i(z_i^t); the server forms g^t, does line 1 and sends line 2 with both flags; workers
do line 3's updates. The coins are ``ctx.coin(t, p_P, "coin")`` (the same key as MARINA-P's coin, so
M3 with identity uplink and beta = 1 reproduces MARINA-P draw for draw) and ``ctx.coin(t, p_D, "coin_d")``.

Defaults (Cor. E.2): p_P = 1/(omega_P + 1), p_D = 1/(omega_D + 1),
beta = min{(n / (omega_D omega_P (omega_D + 1)))^(1/3), 1} (1 when omega_D omega_P = 0).
Uplink Q_i: Rand-K with K = max(1, d // n), independent per worker; downlink C_i: Perm-K.
Theory step (Thm E.1): gamma = 1 / (L + sqrt(288 S)),
S = (theta/p_P + (1 + theta p_P)/beta^2) L_B^2 + (omega_P/p_P + (1 + omega_P p_P)/beta^2) L_A^2
    + (omega_D omega_P beta/(n p_D) + omega_D (1 + omega_P p_P)/(n p_D)) L_max^2.
"""
from __future__ import annotations

import math

import torch

from common.algorithms.base import Algorithm, register, ServerRule, WorkerRule, need_constants, mean_of, descend
from common.algorithms.marina import difference_message
from common.algorithms.marina_p_downlink import model_messages, shifted_model
from common.algorithms.memory import shift_by_mean
from common.algorithms.sync import sync_probability, unbiased_omega
from common.options import Param


def m3_parameters(ctx) -> tuple[float, float, float]:
    """(p_P, p_D, beta): the options where given, else Cor. E.2's values."""
    o = ctx.options
    p_p = sync_probability(o["p_p"], ctx.downlink, ctx.downlink_spec, "m3 downlink", "p_p")
    p_d = sync_probability(o["p_d"], ctx.uplink, ctx.uplink_spec, "m3 uplink", "p_d")
    if o["beta"] is not None:
        beta = o["beta"]
    else:
        omega_p = unbiased_omega(ctx.downlink, ctx.downlink_spec, "m3 downlink", " (or give beta=)")
        omega_d = unbiased_omega(ctx.uplink, ctx.uplink_spec, "m3 uplink", " (or give beta=)")
        denom = omega_d * omega_p * (omega_d + 1.0)
        beta = 1.0 if denom == 0 else min((ctx.n / denom) ** (1.0 / 3.0), 1.0)
    return p_p, p_d, beta


class M3Server(ServerRule):
    def __init__(self, ctx, x0):
        super().__init__(ctx, x0)
        self.p_p, self.p_d, self.beta = m3_parameters(ctx)
        self.compressor = ctx.downlink
        self.g = torch.zeros_like(self.x)
        self.sync_d = True  # round 0: the full initial upload of g^0

    def step(self, t, uplinks):
        self.g = mean_of(uplinks, "g") if self.sync_d else shift_by_mean(self.g, uplinks, "g")   # line 4 (of the previous iteration)
        x_next = descend(self.x, self.ctx.lr, self.g)                   # line 1
        sync_p = self.ctx.coin(t, self.p_p)                             # c_P^t
        self.sync_d = self.ctx.coin(t, self.p_d, "coin_d")              # c_D^t
        out = model_messages(self.ctx, self.compressor, self.x, x_next, t, sync_p, sync_d=self.sync_d)   # line 2
        self.x = x_next
        return out


class M3Worker(WorkerRule):
    """Keeps w_i (``self.x``), z_i, the cached grad f_i(z_i^t) and the coin c_D^{t-1}."""

    def __init__(self, ctx, rank, oracle, x0):
        super().__init__(ctx, rank, oracle, x0)
        self.p_p, self.p_d, self.beta = m3_parameters(ctx)
        self.z = self.x.clone()
        self.g_prev = None
        self.sync_d = True

    def uplink(self, t):
        return difference_message(self, self.grad(self.z, t), self.sync_d, t)   # grad f_i(z_i^t), line 4

    def downlink(self, t, msg):
        self.x = shifted_model(self.x, msg)                             # line 3: w_i^{t+1}
        self.z = self.beta * self.x + (1.0 - self.beta) * self.z if self.beta != 1.0 else self.x.clone()
        self.sync_d = bool(msg.meta["sync_d"])


@register
class M3(Algorithm):
    name = "m3"
    paper = "Gruntkowska, Tyurin, Richtarik 2024 (Alg. 2)"
    summary = "MARINA-P downlink + momentum + MARINA uplink, two shared coins"
    sends = ("up: Q_i(grad f_i(z^{t+1}) - grad f_i(z^t)) (Rand-K, d/n values), or the full gradient when c_D = 1 "
             "(round 0 full); down: C_i(x^{t+1} - x^t) (Perm-K, d/n values per worker), or x^{t+1} when c_P = 1")
    server_rule, worker_rule = M3Server, M3Worker
    default_uplink, default_downlink = "randk:k={k}", "permk"
    params = (
        Param("p_p", float, None, lambda v: 0 < v <= 1, "in (0, 1]", "downlink sync probability (default 1/(omega_P+1))"),
        Param("p_d", float, None, lambda v: 0 < v <= 1, "in (0, 1]", "uplink sync probability (default 1/(omega_D+1))"),
        Param("beta", float, None, lambda v: 0 < v <= 1, "in (0, 1]", "momentum (default Cor. E.2)"),
    )

    def theory_lr(self, ctx):
        L, L_A, L_B, L_max = need_constants(ctx, "L", "L_A", "L_B", "L_max")
        omega_p = unbiased_omega(ctx.downlink, ctx.downlink_spec, "m3 downlink")
        omega_d = unbiased_omega(ctx.uplink, ctx.uplink_spec, "m3 uplink")
        theta = ctx.downlink.constants["theta"]
        p_p, p_d, beta = m3_parameters(ctx)
        n = ctx.n
        S = ((theta / p_p + (1 + theta * p_p) / beta**2) * L_B**2
             + (omega_p / p_p + (1 + omega_p * p_p) / beta**2) * L_A**2
             + (omega_d * omega_p * beta / (n * p_d) + omega_d * (1 + omega_p * p_p) / (n * p_d)) * L_max**2)
        return 1.0 / (L + math.sqrt(288.0 * S))
