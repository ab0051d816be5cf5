"""EF21 (Richtarik, Sokolov, Fatkhullin 2021; spec/neolithic.md 1c, spec/cd-adam.md 1(d)):
Markov compression of the gradients, optionally of the downlink too.

    x^{t+1} = x^t - gamma g^t
    worker i:  c_i = C(grad f_i(x^{t+1}) - g_i^t);  send c_i;  g_i^{t+1} = g_i^t + c_i (``settle``, once c_i is sent)
    server:    g^{t+1} = g^t + (1/n) sum_i c_i
    init:      g_i^0 = grad f_i(x^0) sent in full (``init=full``), or c_i = C(grad f_i(x^0)) from
               g_i = 0 (``init=compressed``, CD-Adam's Markov sequence started at 0)

Downlink (the CD-Adam paper's "EF21 with bidirectional Top-K and SGD", its Algorithm 1 lines 5-7
with SGD in place of Adam): the server keeps g~, a copy of what the workers hold, and broadcasts
c = C_down(g^t - g~); everyone does g~ += c and x^{t+1} = x^t - gamma g~ (the server too: its x is
the model, stepped in ``settle`` once c is sent, since no downlink depends on it). With ``--downlink identity`` (the default) c = g^t - g~, so g~ = g^t up to rounding and this
is plain EF21. Every shared vector is updated from the decoded payloads.
Theory step (Richtarik et al. 2021, Thm 1), identity downlink only:
gamma = 1 / (L + L_tilde sqrt(beta/theta)), theta = 1 - sqrt(1 - alpha), beta = (1 - alpha)/theta,
L_tilde^2 = (1/n) sum L_i^2 (L_max where the problem does not give L_hat).
"""
from __future__ import annotations

import torch

from common.algorithms.base import Algorithm, register, ServerRule, WorkerRule, full, need_constants, descend
from common.algorithms.ef21_p import ef21_factor
from common.algorithms.memory import markov_compress, markov_message, shift, shift_by_mean
from common.options import Param
from common.compressors.message import Message


class EF21Server(ServerRule):
    def __init__(self, ctx, x0):
        super().__init__(ctx, x0)
        self.g = torch.zeros_like(self.x)        # g^t = (1/n) sum_i g_i^t
        self.g_down = torch.zeros_like(self.x)   # g~: what every worker holds

    def step(self, t, uplinks):
        self.g = shift_by_mean(self.g, uplinks, "c", owned=True)                                 # g^{t+1} = g^t + (1/n) sum_i c_i
        c, self.g_down = markov_compress(self.ctx.downlink, self.g, self.g_down, 0, t, owned=True)  # c = C_down(g - g~);  g~ += c
        down = Message({"c": c})
        return [down] * self.ctx.n

    def settle(self, t):
        self.x = descend(self.x, self.ctx.lr, self.g_down)  # the server's copy of x^{t+1}; no downlink needs it


class EF21Worker(WorkerRule):
    """Keeps x^t, its Markov state g_i and the downlink state g~."""

    def __init__(self, ctx, rank, oracle, x0):
        super().__init__(ctx, rank, oracle, x0)
        self.g_i = torch.zeros_like(self.x)
        self.g_down = torch.zeros_like(self.x)

    def uplink(self, t):
        grad = self.grad(self.x, t)
        if t == 0 and self.ctx.options["init"] == "full":
            c = full(grad, copy=False)                                                   # g_i^0 = grad f_i(x^0) (fresh)
        else:
            c = markov_message(self.ctx.uplink, grad, self.g_i, self.rank, t)            # c_i = C(grad - g_i)
        return Message({"c": c})

    def settle(self, t, sent):
        self.g_i = shift(self.g_i, sent.payloads["c"], owned=True)                       # g_i += c_i, once c_i is sent

    def downlink(self, t, msg):
        self.g_down = shift(self.g_down, msg.payloads["c"], owned=True)                  # g~ += c
        self.x = descend(self.x, self.ctx.lr, self.g_down)


@register
class EF21(Algorithm):
    name = "ef21"
    paper = "Richtarik, Sokolov, Fatkhullin 2021 (EF21); defaults: CD-Adam paper sec. 7.2, Top-K with K = 1.6% of d (bidirectional there: --downlink)"
    summary = "Markov-compressed gradients (g_i += C(grad - g_i)); optional Markov-compressed downlink"
    sends = "up: C(grad f_i(x) - g_i) (round 0 full with init=full); down: C_down(g - g~), the same to all (d floats with identity)"
    server_rule, worker_rule = EF21Server, EF21Worker
    default_uplink, default_downlink = "topk:ratio=0.016", "identity"
    params = (Param("init", str, "full", lambda v: v in ("full", "compressed"), "full or compressed", "g_i^0: full gradient or C(grad)"),)

    def theory_lr(self, ctx):
        if ctx.downlink.constants["alpha"] != 1.0:
            return None
        L, L_max = need_constants(ctx, "L", "L_max")
        L_tilde = ctx.problem_constants.get("L_hat", L_max)
        return 1.0 / (L + L_tilde * ef21_factor(ctx.uplink.constants["alpha"], ctx.uplink_spec, self.name))
