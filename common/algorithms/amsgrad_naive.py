"""AMSGrad with naive compression (CD-Adam paper sec. 4, Figs. 2 and 4; spec/cd-adam.md 1.2(b)).

    worker i:  send C(g_t^(i))
    server:    g_hat_t = (1/n) sum_i C(g_t^(i));  broadcast C_0(g_hat_t)
    worker i:  m, v, v_hat, x: CD-Adam Alg. 1 lines 13-16 with C_0(g_hat_t)

The paper leaves the downlink and the side that updates open; we use CD-Adam's topology (workers
update, server mirrors) so that only the compression strategy differs; --downlink identity gives the
uplink-only variant (the server then broadcasts g_hat_t in full).
"""
from __future__ import annotations


from common.algorithms.amsgrad_state import AMS_PARAMS, MirrorServer, MirrorWorker, amsgrad_step
from common.algorithms.base import Algorithm, dense, register, mean_of
from common.compressors.message import Message


class NaiveServer(MirrorServer):
    def step(self, t, uplinks):
        g_hat = mean_of(uplinks, "c")
        c = self.ctx.downlink.compress(g_hat, worker=0, step=t)
        amsgrad_step(self, dense(c))
        return [Message({"c": c})] * self.ctx.n


class NaiveWorker(MirrorWorker):
    def uplink(self, t):
        return Message({"c": self.ctx.uplink.compress(self.grad(self.x, t), worker=self.rank, step=t)})

    def downlink(self, t, msg):
        amsgrad_step(self, dense(msg.payloads["c"]))


@register
class AMSGradNaive(Algorithm):
    name = "amsgrad-naive"
    paper = "baseline of Wang, Lin, Chen 2022 (sec. 4)"
    summary = "AMSGrad fed naively compressed gradients (no error feedback), both ways"
    sends = "up: C(g_i); down: C(mean), one broadcast"
    server_rule, worker_rule = NaiveServer, NaiveWorker
    default_uplink, default_downlink = "sign", "sign"
    params = AMS_PARAMS
