"""EF21-P + DCGD (Gruntkowska, Tyurin, Richtarik 2023; the MARINA-P paper's F.2 baseline,
spec/marina-p-m3.md 2.5): EF21-P's downlink with compressed gradients up.

    worker i:  send Q_i(grad f_i(w^t)), Q_i unbiased and independent across workers
    server:    x^{t+1} = x^t - gamma (1/n) sum_i Q_i(grad f_i(w^t))
               broadcast c^t = C(x^{t+1} - w^t);   everyone: w^{t+1} = w^t + c^t

Q: ``--uplink``, C: ``--downlink``, contractive. Defaults: F.2's Rand-K + natural compression both
ways with K = d/n; how an unbiased Rand-K enters EF21-P is not stated, so the downlink default is the
unscaled (contractive) Rand-K before natural compression: E||C(x) - x||^2 <= (1 - 7K/(8d)) ||x||^2.
No theory step size (None).
"""
from __future__ import annotations

from common.algorithms.base import Algorithm, register
from common.algorithms.ef21_p import EF21PServer, EF21PWorker


class EF21PDCGDWorker(EF21PWorker):
    def encode_grad(self, g, t):
        return self.ctx.uplink.compress(g, worker=self.rank, step=t)   # Q_i(grad f_i(w^t))


@register
class EF21PDCGD(Algorithm):
    name = "ef21-p-dcgd"
    paper = "Gruntkowska, Tyurin, Richtarik 2023; defaults: MARINA-P paper F.2, Rand-K + natural both ways, K = d/n"
    summary = "EF21-P downlink with unbiased compressed gradients up (DCGD)"
    sends = "up: Q_i(grad f_i(w^t)); down: C(x^{t+1} - w^t), the same to every worker"
    server_rule, worker_rule = EF21PServer, EF21PDCGDWorker
    default_uplink, default_downlink = "randk:k={k}+natural", "randk:k={k},scaled=false+natural"
