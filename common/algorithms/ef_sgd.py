"""Distributed SGD with biased compression and error feedback (Beznosikov, Horvath, Richtarik,
Safaryan 2023, Algorithm 1; spec/biased-compression.md 2):

    server -> all:  x^k (uncompressed)
    worker i:       g_i^k = grad f_i(x^k) (+ noise, from the oracle)                    (19)
                    g~_i^k = C_i^k(e_i^k + eta g_i^k)                                  (21)
                    e_i^{k+1} = e_i^k + eta g_i^k - g~_i^k   (full precision, e^0 = 0) (22)
    server:         x^{k+1} = x^k - (1/n) sum_i g~_i^k       (no step size)            (23)
    output:         x_bar^K = (1/W^K) sum_{k=0}^K w^k x^k                               (20)

g~ is what the server decodes (payload.to_dense()), so e_i is exact. C: ``--uplink`` (default Top-K,
10% of d), which should be in B3 (contractive). Option ``average``: ``none`` (the model is x^k),
``uniform`` (the default, the paper's output: w^k = 1, Thm 21 iii) or ``exp`` (w^k = (1 - mu eta/2)^{-(k+1)}, Thm 21 ii, needs ``mu``);
the average is the server's ``model`` and is kept as a normalized running average
x_bar <- (1 - lam_k) x_bar + lam_k x^k, lam_k = w^k / W^k, computed without forming w^k (no overflow),
in ``settle``: no downlink carries it, so it runs after they are sent.
Theory step: Thm 21 (ii)/(iii) take eta <= 1/(14 (2 delta + B) L) with delta = 1/alpha and B = 0 for
exact gradients and L the f_i's smoothness (L_max); we return 1/(28 delta L_max).
"""
from __future__ import annotations


import torch

from common.algorithms.base import Algorithm, register, ServerRule, WorkerRule, dense, descend, descend_by_mean, full, need_constants
from common.algorithms.memory import error_feedback
from common.compressors import cpu_kernels
from common.options import Param
from common.compressors.message import Message


def average_weight(kind: str, k: int, q: float) -> float:
    """lam_k = w^k / sum_{j<=k} w^j for eq. (20)'s weights; q = 1/(1 - mu eta/2) for ``exp``."""
    if kind == "uniform":
        return 1.0 / (k + 1)
    # w^j = q^{j+1}: w^k / W^k = (1 - 1/q) / (1 - q^{-(k+1)})
    return (1.0 - 1.0 / q) / (1.0 - q ** (-(k + 1)))


class EFSGDServer(ServerRule):
    def __init__(self, ctx, x0):
        super().__init__(ctx, x0)
        self.average = ctx.options["average"]
        self.q = 1.0
        if self.average == "exp":
            mu = ctx.options["mu"]
            if mu is None or not 0 < mu * ctx.lr / 2 < 1:
                raise ValueError("ef-sgd: average=exp needs mu= with 0 < mu*lr/2 < 1")
            self.q = 1.0 / (1.0 - mu * ctx.lr / 2)
        self.x_bar = self.x.clone()   # x_bar^0 = x^0
        self.k = 0

    @property
    def model(self):
        return self.x if self.average == "none" else self.x_bar

    def step(self, t, uplinks):
        self.x = descend_by_mean(self.x, 1.0, uplinks, "g")   # (23): x - 1 mean is x - mean, in one compiled pass that notes finiteness
        self.k += 1
        down = Message({"x": full(self.x, copy=False)})  # x is replaced, never updated in place
        return [down] * self.ctx.n

    def settle(self, t):
        """Eq. (20)'s running average, which no downlink carries: after the downlinks are sent, while
        the workers compute (one compiled pass for long CPU vectors, the bits of the torch expression)."""
        if self.average != "none":
            lam = average_weight(self.average, self.k, self.q)
            blended = cpu_kernels.blend(self.x_bar, 1.0 - lam, self.x, lam)
            self.x_bar = (1.0 - lam) * self.x_bar + lam * self.x if blended is None else blended


class EFSGDWorker(WorkerRule):
    """Keeps x^k, the memory e_i (full precision) and its last gradient g_i^k."""

    def __init__(self, ctx, rank, oracle, x0):
        super().__init__(ctx, rank, oracle, x0)
        self.e = torch.zeros_like(self.x)
        self.g = torch.zeros_like(self.x)

    def uplink(self, t):
        self.g = self.grad(self.x, t)                                                           # (19)
        v = descend(self.e, -self.ctx.lr, self.g)  # e + eta g as e - (-eta) g: the same bits, in one compiled pass where it can
        g_tilde, self.e = error_feedback(self.ctx.uplink, v, self.rank, t, owned=True)          # (21), (22)
        return Message({"g": g_tilde})

    def downlink(self, t, msg):
        self.x = dense(msg.payloads["x"])


@register
class EFSGD(Algorithm):
    name = "ef-sgd"
    paper = "Beznosikov et al. 2023 (Alg. 1; the model is the eq. 20 average, uniform weights by default)"
    summary = "distributed SGD with biased compression and error feedback (optional eq. 20 average)"
    sends = "up: C_i(e_i + eta g_i); down: x^{k+1} (d floats)"
    server_rule, worker_rule = EFSGDServer, EFSGDWorker
    default_uplink = "topk:ratio=0.1"
    fixed_downlink = True
    params = (
        Param("average", str, "uniform", lambda v: v in ("none", "uniform", "exp"), "none, uniform or exp", "eq. 20 output average"),
        Param("mu", float, None, lambda v: v > 0, "positive", "strong convexity for average=exp"),
    )

    def theory_lr(self, ctx):
        alpha = ctx.uplink.constants["alpha"]
        if alpha is None:
            return None
        (L_max,) = need_constants(ctx, "L_max")   # Thm 21 assumes every f_i is L-smooth
        return alpha / (28.0 * L_max)
