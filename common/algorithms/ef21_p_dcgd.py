"""EF21-P + DCGD (Gruntkowska, Tyurin, Richtarik 2023; the MARINA-P paper's F.2 baseline,
spec/marina-p-m3.md 2.5): EF21-P's downlink with compressed gradients up.

    worker i:  send Q_i(grad f_i(w^t)), Q_i unbiased and independent across workers
    server:    x^{t+1} = x^t - gamma (1/n) sum_i Q_i(grad f_i(w^t))
               broadcast c^t = C(x^{t+1} - w^t);   everyone: w^{t+1} = w^t + c^t

Q: ``--uplink`` (default Rand-K, 10% of d); C: ``--downlink``, contractive (default Top-K, 10%).
F.2 used Rand-K + natural both ways; how an unbiased Rand-K enters EF21-P is not stated: pass a
contractive one (``randk:scaled=false``, or ``...+scale:lambda=...``). No theory step size (None).
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
    paper = "Gruntkowska, Tyurin, Richtarik 2023; MARINA-P paper F.2"
    summary = "EF21-P downlink with unbiased compressed gradients up (DCGD)"
    sends = "up: Q_i(grad f_i(w^t)); down: C(x^{t+1} - w^t), the same to every worker"
    server_rule, worker_rule = EF21PServer, EF21PDCGDWorker
    default_uplink, default_downlink = "randk:ratio=0.1", "topk:ratio=0.1"
