"""CD-Adam (Wang, Lin, Chen 2022, Algorithm 1; spec/cd-adam.md 1.1): Markov compression both ways,
AMSGrad state on the workers, nu inside the square root, no bias correction.

    line 1:  g_hat_0^(i) = 0, g_hat_0 = 0, g~_0 = 0, m_0 = v_0 = v_hat_0 = 0
    worker i:  g_t^(i) = grad f_i(x_t; xi_t^(i))                      (line 4; batch via the problem's option)
               c_t^(i) = C(g_t^(i) - g_hat_{t-1}^(i))                  (line 5)
               send c_t^(i);  g_hat_t^(i) = g_hat_{t-1}^(i) + c_t^(i)  (line 6; in ``settle``, once c_t^(i) is sent)
    server:    g_hat_t = g_hat_{t-1} + (1/n) sum_i c_t^(i)             (line 8)
               c_t = C(g_hat_t - g~_{t-1})                             (line 9)
               broadcast c_t;  g~_t = g~_{t-1} + c_t                   (line 10)
    worker i:  g~_t = g~_{t-1} + c_t                                   (line 12)
               m, v, v_hat, x: lines 13-16 (``amsgrad_state``)

Both sides update their Markov state with what the receiver decodes (the float32-rounded scale and
the packed signs, sign(0) = +1). The server holds g_hat and g~ and mirrors lines 13-16 so that its
``model`` is the workers' x; the broadcast c_t does not depend on that copy, so the mirror runs in
``settle``, after c_t is sent, while the workers run the same lines. Default compressor: scaled sign, scale = ||x||_1/d (``sign``), both ways.
"""
from __future__ import annotations

import torch

from common.algorithms.amsgrad_state import AMS_PARAMS, MirrorServer, MirrorWorker, amsgrad_step
from common.algorithms.base import Algorithm, register
from common.algorithms.memory import markov_compress, markov_message, shift, shift_by_mean
from common.compressors.message import Message


class CDAdamServer(MirrorServer):
    def __init__(self, ctx, x0):
        super().__init__(ctx, x0)
        self.g_hat = torch.zeros_like(self.x)
        self.g_tilde = torch.zeros_like(self.x)

    def step(self, t, uplinks):
        self.g_hat = shift_by_mean(self.g_hat, uplinks, "c")                                        # line 8
        c, self.g_tilde = markov_compress(self.ctx.downlink, self.g_hat, self.g_tilde, 0, t)        # lines 9-10
        return [Message({"c": c})] * self.ctx.n

    def settle(self, t):
        amsgrad_step(self, self.g_tilde)                                                           # lines 13-16, mirrored


class CDAdamWorker(MirrorWorker):
    def __init__(self, ctx, rank, oracle, x0):
        super().__init__(ctx, rank, oracle, x0)
        self.g_hat = torch.zeros_like(self.x)
        self.g_tilde = torch.zeros_like(self.x)

    def uplink(self, t):
        g = self.grad(self.x, t)                                                                    # line 4
        c = markov_message(self.ctx.uplink, g, self.g_hat, self.rank, t)                           # line 5
        return Message({"c": c})

    def settle(self, t, sent):
        self.g_hat = shift(self.g_hat, sent.payloads["c"])                                          # line 6, once c is sent

    def downlink(self, t, msg):
        self.g_tilde = shift(self.g_tilde, msg.payloads["c"])                                       # line 12
        amsgrad_step(self, self.g_tilde)                                                           # lines 13-16


@register
class CDAdam(Algorithm):
    name = "cd-adam"
    paper = "Wang, Lin, Chen 2022 (Alg. 1)"
    summary = "compressed AMSGrad: Markov compression both ways, optimizer state on the workers"
    sends = "up: C(g_i - g_hat_i) (scaled sign: d bits + 32); down: C(g_hat - g~), one broadcast"
    server_rule, worker_rule = CDAdamServer, CDAdamWorker
    default_uplink, default_downlink = "sign", "sign"
    params = AMS_PARAMS
