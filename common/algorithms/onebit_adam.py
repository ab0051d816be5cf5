"""1-bit Adam (Tang et al. 2021; the CD-Adam paper's baseline, sec. 7.2; spec/cd-adam.md 1.2(e)).

Warm-up, rounds t < warmup (full precision both ways; by default 13% of the run's rounds, the CD-Adam
paper's 13 of 100 epochs): worker i sends g_t^(i); the server broadcasts
g_t = (1/n) sum_i g_t^(i); everyone runs Adam:
    m = beta1 m + (1 - beta1) g;  v = beta2 v + (1 - beta2) g^2;  x <- x - alpha m / (sqrt(v) + eps)
Compression stage, t >= warmup: v is frozen at v_{T_w} and
    worker i:  m^(i) = beta1 m + (1 - beta1) g_t^(i)                                  (step 1)
               m_hat^(i) = C(m^(i) + delta^(i)); delta^(i) <- m^(i) + delta^(i) - m_hat^(i); send  (step 2)
    server:    m_bar = mean m_hat^(i); m_bar_hat = C(m_bar + delta_bar);
               delta_bar <- m_bar + delta_bar - m_bar_hat; broadcast                  (step 3)
    worker i:  m := m_bar_hat;  x <- x - alpha m / (sqrt(v_{T_w}) + eps)              (step 4)
C is DeepSpeed's scaled sign, scale ||x||_2/sqrt(d) (``sign:scale=l2``) both ways. Like DeepSpeed's
OnebitAdam there is no bias correction by default (``bias_correction=true`` applies Adam's to the
warm-up steps; the frozen stage uses the warm-up's last correction of v). eps sits outside the sqrt.
The server mirrors x, m and v, so its ``model`` is the workers' x.
"""
from __future__ import annotations

import torch

from common.algorithms.base import Algorithm, ServerRule, WorkerRule, dense, full, register, mean_of
from common.algorithms.memory import error_feedback, shift_by_mean
from common.options import Param
from common.compressors.message import Message


def _init(rule):
    rule.m = torch.zeros_like(rule.x)
    rule.v = torch.zeros_like(rule.x)
    rule.delta = torch.zeros_like(rule.x)


def _denominator(rule, t):
    o = rule.ctx.options
    v = rule.v
    if o["bias_correction"]:
        v = v / (1 - o["beta2"] ** min(t + 1, o["warmup"]))
    return torch.sqrt(v) + o["eps"]


def _adam(rule, t, g):
    """Warm-up step: full Adam on the averaged gradient."""
    o = rule.ctx.options
    rule.m = o["beta1"] * rule.m + (1 - o["beta1"]) * g
    rule.v = o["beta2"] * rule.v + (1 - o["beta2"]) * g * g
    m = rule.m / (1 - o["beta1"] ** (t + 1)) if o["bias_correction"] else rule.m
    rule.x = rule.x - rule.ctx.lr * m / _denominator(rule, t)


def _frozen(rule, t, m_bar_hat):
    """Compression stage, step 4: momentum overwritten, variance frozen."""
    rule.m = m_bar_hat
    rule.x = rule.x - rule.ctx.lr * rule.m / _denominator(rule, t)


class OneBitAdamServer(ServerRule):
    def __init__(self, ctx, x0):
        super().__init__(ctx, x0)
        _init(self)

    def step(self, t, uplinks):
        if t < self.ctx.options["warmup"]:
            g = mean_of(uplinks, "g")
            _adam(self, t, g)
            return [Message({"g": full(g)})] * self.ctx.n
        p = shift_by_mean(self.delta, uplinks, "m")                      # step 3: m_bar + delta_bar (delta_bar + m_bar: the same sum)
        c, self.delta = error_feedback(self.ctx.downlink, p, 0, t)       # m_bar_hat = C(...);  delta_bar <- ... - m_bar_hat
        _frozen(self, t, dense(c))
        return [Message({"m": c})] * self.ctx.n


class OneBitAdamWorker(WorkerRule):
    def __init__(self, ctx, rank, oracle, x0):
        super().__init__(ctx, rank, oracle, x0)
        _init(self)

    def uplink(self, t):
        o = self.ctx.options
        g = self.grad(self.x, t)
        if t < o["warmup"]:
            return Message({"g": full(g, copy=False)})  # a fresh gradient
        p = o["beta1"] * self.m + (1 - o["beta1"]) * g + self.delta                        # step 1: m^(i) + delta^(i)
        c, self.delta = error_feedback(self.ctx.uplink, p, self.rank, t, owned=True)      # step 2 (p is fresh)
        return Message({"m": c})

    def downlink(self, t, msg):
        if t < self.ctx.options["warmup"]:
            _adam(self, t, dense(msg.payloads["g"]))
        else:
            _frozen(self, t, dense(msg.payloads["m"]))                                     # step 4


@register
class OneBitAdam(Algorithm):
    name = "onebit-adam"
    paper = "Tang et al. 2021 (1-bit Adam); defaults: Wang, Lin, Chen 2022 (sec. 7.2), warm-up 13% of the rounds"
    summary = "Adam warm-up uncompressed, then frozen variance and sign-compressed momentum with EF both ways"
    sends = "warm-up: g_i / mean g (d floats each way); then C(m_i + delta_i) / C(m_bar + delta_bar) (d bits + 32)"
    server_rule, worker_rule = OneBitAdamServer, OneBitAdamWorker
    default_uplink, default_downlink = "sign:scale=l2", "sign:scale=l2"
    params = (
        Param("beta1", float, 0.9, lambda v: 0 <= v < 1, "in [0, 1)", "momentum"),
        Param("beta2", float, 0.99, lambda v: 0 <= v < 1, "in [0, 1)", "second-moment decay"),
        Param("eps", float, 1e-8, lambda v: v > 0, "positive", "added to sqrt(v)"),
        Param("warmup", int, 0, lambda v: v >= 0, "a non-negative integer",
              "uncompressed Adam rounds before v is frozen (0: 13% of the rounds, the CD-Adam paper's 13 of 100 epochs)"),
        Param("bias_correction", bool, False, doc="Adam's bias correction in the warm-up"),
    )

    def context(self, config, dim, problem_constants):
        ctx = super().context(config, dim, problem_constants)
        if ctx.options["warmup"] == 0:  # both sides derive the same count from the run's rounds
            ctx.options["warmup"] = max(1, round(0.13 * config.rounds))
        return ctx
