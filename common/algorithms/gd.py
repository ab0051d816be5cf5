"""GD, the uncompressed baseline (MARINA-P paper eq. 2; spec/marina-p-m3.md section 2.1).

Worker i sends grad f_i(x^t) (d values); the server steps x^{t+1} = x^t - gamma (1/n) sum_i g_i and
sends x^{t+1} to every worker (one broadcast, counted once per worker). Theory step: gamma = 1/L.
"""
from __future__ import annotations


from common.algorithms.base import Algorithm, register, ServerRule, WorkerRule, dense, full, need_constants, descend_by_mean
from common.compressors.message import Message


class GDServer(ServerRule):
    def step(self, t, uplinks):
        self.x = descend_by_mean(self.x, self.ctx.lr, uplinks, "g")
        down = Message({"x": full(self.x, copy=False)})  # x is replaced, never updated in place
        return [down] * self.ctx.n


class GDWorker(WorkerRule):
    def uplink(self, t):
        return Message({"g": full(self.grad(self.x, t), copy=False)})  # a fresh gradient

    def downlink(self, t, msg):
        self.x = dense(msg.payloads["x"])


@register
class GD(Algorithm):
    name = "gd"
    paper = "baseline"
    summary = "gradient descent, uncompressed both ways"
    sends = "up: grad f_i(x) (d floats); down: x (d floats)"
    server_rule, worker_rule = GDServer, GDWorker
    fixed_uplink = fixed_downlink = True

    def theory_lr(self, ctx):
        (L,) = need_constants(ctx, "L")
        return 1.0 / L
