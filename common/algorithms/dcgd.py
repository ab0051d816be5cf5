"""DCGD, distributed compressed gradient descent without error feedback (Beznosikov, Horvath,
Richtarik, Safaryan 2023, section 2; spec/biased-compression.md 2):

    worker i:  send C_i^k(grad f_i(x^k))
    server:    x^{k+1} = x^k - eta (1/n) sum_i C_i^k(grad f_i(x^k)); broadcast x^{k+1} uncompressed

C: ``--uplink`` (default Rand-K, 10% of d). With a biased C (Top-K) it can diverge (Example 1).
Theory step, for an unbiased C in U(omega) only: gamma = 1 / (L + 2 L_max omega / n) (the standard
DCGD bound, Khaled & Richtarik 2020 / Gorbunov et al. 2020); None for a biased C.
"""
from __future__ import annotations


from common.algorithms.base import Algorithm, register, ServerRule, WorkerRule, dense, full, need_constants, descend_by_mean
from common.compressors.message import Message


class DCGDServer(ServerRule):
    def step(self, t, uplinks):
        self.x = descend_by_mean(self.x, self.ctx.lr, uplinks, "g")
        down = Message({"x": full(self.x, copy=False)})  # x is replaced, never updated in place
        return [down] * self.ctx.n


class DCGDWorker(WorkerRule):
    def uplink(self, t):
        return Message({"g": self.ctx.uplink.compress(self.grad(self.x, t), worker=self.rank, step=t)})

    def downlink(self, t, msg):
        self.x = dense(msg.payloads["x"])


@register
class DCGD(Algorithm):
    name = "dcgd"
    paper = "Beznosikov et al. 2023 (sec. 2, DCGD)"
    summary = "compressed gradients up, no error feedback"
    sends = "up: C_i(grad f_i(x^k)); down: x^{k+1} (d floats)"
    server_rule, worker_rule = DCGDServer, DCGDWorker
    default_uplink = "randk:ratio=0.1"
    fixed_downlink = True

    def theory_lr(self, ctx):
        c = ctx.uplink.constants
        if not c["unbiased"] or c["omega"] is None:
            return None
        L, L_max = need_constants(ctx, "L", "L_max")
        return 1.0 / (L + 2.0 * L_max * c["omega"] / ctx.n)
