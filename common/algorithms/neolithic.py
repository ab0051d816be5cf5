"""NEOLITHIC (Huang, Chen, Yin, Yuan 2022, Algorithm 2, with FCC = Algorithm 1; spec/neolithic.md 1a-1b).

    worker i:  g_hat_i = (1/R) sum_r O_i(x^k; zeta_i^(k,r))             (Alg. 2 line 3: R minibatches, averaged)
               g~_i = g_hat_i + er_i                                     (line 4: error compensation)
               s_i = FCC(g~_i, C_i, R)  -> R messages c_i^(k,0..R-1)      (line 5)
               er_i <- g~_i - s_i                                        (line 6)
    server:    g~ = (1/n) sum_i sum_r c_i^(k,r) + er                     (line 8)
               s = FCC(g~, C_0, R)  -> R broadcast messages c^(k,r)       (line 9)
               er <- g~ - s                                              (line 10)
    worker i:  x^(k+1) = x^k - gamma sum_r c^(k,r)                       (line 12)

FCC (Alg. 1): v^(0) = 0; c^(r) = C(v* - v^(r)) with fresh randomness each round (compressor step
k*R + r), v^(r+1) = v^(r) + c^(r). The R messages of one iteration travel in one network message
(payloads c0..c{R-1}); ``round_metrics`` reports comm_rounds = R so that plots can use cumulative
communication rounds. Uplink-only: --downlink identity (the default; then er = 0 and g~ travels
losslessly: with the identity the residual after round 0 is exactly 0 and C(0) = 0, so ``fcc`` sends
only c^(0) = v*). Bidirectional: any contractive --downlink,
one compression broadcast to all, so every worker's x stays bit-identical; the server mirrors x.

Compressors must be contractive (Assumption 4). An unbiased C with omega > 0 must be scaled by
1/(1+omega) by the user (Corollary 3; pitfall P2: unscaled, FCC diverges): ``randk:k=1+scale:lambda=
<1/(1+omega)>`` or the unscaled ``randk:k=1,scaled=false`` (delta = k/d). Both are checked at start.
Option ``r`` = R (default 4). Step size: constant ``--lr``, optionally divided by ``decay`` every ``every`` communication rounds
(the paper's staircase, section 3; P5: measured in communication rounds, i.e. every/R iterations).
"""
from __future__ import annotations

import torch

from common.algorithms.base import Algorithm, ServerRule, WorkerRule, average, dense, descend, register
from common.algorithms.schedule import SCHEDULE_PARAMS, staircase
from common.options import Param
from common.compressors.message import Message


def require_contractive(name: str, side: str, compressor) -> None:
    """Spec pitfall P2: NEOLITHIC's FCC needs a delta-contractive compressor (Assumption 4)."""
    c = compressor.constants
    if c["unbiased"] and (c["omega"] or 0) > 0:
        lam = 1.0 / (1.0 + c["omega"])
        raise ValueError(
            f"{name}: the {side} compressor {compressor.spec!r} is unbiased with omega={c['omega']:g}; FCC needs a "
            f"contractive compressor and diverges with it unscaled (NEOLITHIC Corollary 3, pitfall P2). Scale it by "
            f"1/(1+omega): '{compressor.spec}+scale:lambda={lam:.6g}' (or use randk:...,scaled=false, delta = k/d)")
    if c["alpha"] is None:
        raise ValueError(f"{name}: the {side} compressor {compressor.spec!r} declares no contraction constant alpha; "
                         "FCC needs a contractive compressor (NEOLITHIC Assumption 4)")


def fcc(v_star: torch.Tensor, compressor, R: int, worker: int, t: int):
    """Algorithm 1: R rounds compressing the current residual v* - v^(r), fresh randomness each round
    (compressor step t*R + r). Returns (payloads, v^(R)), v^(R) = sum of what the receiver decodes."""
    v = torch.zeros_like(v_star)
    payloads = []
    for r in range(1 if compressor.spec == "identity" else R):  # identity: later residuals are exactly 0
        c = compressor.compress(v_star - v, worker=worker, step=t * R + r)
        payloads.append(c)
        v = v + dense(c)
    return payloads, v


def fcc_message(payloads) -> Message:
    return Message({f"c{r}": p for r, p in enumerate(payloads)})


def fcc_sum(msg: Message, R: int) -> torch.Tensor:
    """sum_r c^(r) of a received FCC message, in round order (the same additions as the sender)."""
    count = len(msg.payloads)
    if not 1 <= count <= R or set(msg.payloads) != {f"c{r}" for r in range(count)}:
        raise ValueError(f"FCC message: expected payloads c0..c{R - 1}, got {sorted(msg.payloads)}")
    total = None
    for r in range(count):
        c = dense(msg.payloads[f"c{r}"])
        total = c if total is None else total + c
    return total


class NeolithicServer(ServerRule):
    def __init__(self, ctx, x0):
        super().__init__(ctx, x0)
        self.R = ctx.options["r"]
        self.er = torch.zeros_like(self.x)

    def step(self, t, uplinks):
        R = self.R
        g_tilde = average([fcc_sum(m, R) for m in uplinks]) + self.er                    # line 8
        payloads, s = fcc(g_tilde, self.ctx.downlink, R, 0, t)                            # line 9
        self.er = g_tilde - s                                                              # line 10
        self.x = descend(self.x, staircase(self.ctx, t * R), s)                            # line 12, mirrored
        return [fcc_message(payloads)] * self.ctx.n

    def round_metrics(self):
        return {"comm_rounds": self.R}


class NeolithicWorker(WorkerRule):
    def __init__(self, ctx, rank, oracle, x0):
        super().__init__(ctx, rank, oracle, x0)
        self.R = ctx.options["r"]
        self.er = torch.zeros_like(self.x)
        self.g_hat = torch.zeros_like(self.x)

    def uplink(self, t):
        R = self.R
        g = self.grad(self.x, t * R)
        for r in range(1, R):
            g = g + self.grad(self.x, t * R + r)
        self.g_hat = g / R                                                                 # line 3
        g_tilde = self.g_hat + self.er                                                     # line 4
        payloads, s = fcc(g_tilde, self.ctx.uplink, R, self.rank, t)                      # line 5
        self.er = g_tilde - s                                                              # line 6
        return fcc_message(payloads)

    def downlink(self, t, msg):
        self.x = descend(self.x, staircase(self.ctx, t * self.R), fcc_sum(msg, self.R))   # line 12


@register
class Neolithic(Algorithm):
    name = "neolithic"
    paper = "Huang, Chen, Yin, Yuan 2022 (Alg. 2 with FCC, Alg. 1)"
    summary = "R rounds of fast compressed communication + R accumulated minibatches, uni- or bidirectional"
    sends = "up: R compressed residuals C_i(g~_i - v^(r)) in one message; down: R compressed residuals (identity: g~)"
    server_rule, worker_rule = NeolithicServer, NeolithicWorker
    default_uplink, default_downlink = "topk:ratio=0.05", "identity"
    params = (Param("r", int, 4, lambda v: 1 <= v <= 64, "an integer in [1, 64]", "FCC rounds = minibatches per iteration"),) + SCHEDULE_PARAMS

    def context(self, config, dim, problem_constants):
        ctx = super().context(config, dim, problem_constants)
        require_contractive(self.name, "uplink", ctx.uplink)
        require_contractive(self.name, "downlink", ctx.downlink)
        return ctx
