"""MARINA-P's downlink (Gruntkowska, Tyurin, Richtarik 2024, Algorithm 1 lines 3-4; Algorithm 2
lines 2-3), shared by MARINA-P and M3. Defines no Algorithm.

    server:    c^t ~ Bernoulli(p), one coin for all (drawn by the server, sent as the flag ``sync``)
               c^t = 1: send x^{t+1} to every worker (one broadcast)
               c^t = 0: send C_i^t(x^{t+1} - x^t) to worker i (a different message per worker: Perm-K)
    worker i:  w_i^{t+1} = x^{t+1} if c^t = 1, else w_i^t + C_i^t(x^{t+1} - x^t)

With Perm-K (theta = 0) the mean of the w_i stays equal to x exactly.
"""
from __future__ import annotations

import torch

from common.algorithms.base import dense, full
from common.compressors.indices import every_block_asked
from common.compressors.message import Message


def model_messages(ctx, compressor, x: torch.Tensor, x_next: torch.Tensor, t: int, sync: bool, **flags) -> list[Message]:
    """The server's side: one message per worker, x^{t+1} if ``sync`` else C_i^t(x^{t+1} - x^t);
    ``flags`` (M3's ``sync_d``) travel in every message's meta after ``sync``."""
    meta = {"sync": sync, **flags}
    if sync:
        return [Message({"x": full(x_next, copy=False)}, meta)] * ctx.n  # the new model, never updated in place
    delta = x_next - x
    with every_block_asked():  # (Perm-K's blocks of the step, all marked at the first: indices.marked_support)
        return [Message({"delta": compressor.compress(delta, worker=i, step=t)}, meta) for i in range(ctx.n)]


def shifted_model(w: torch.Tensor, msg: Message) -> torch.Tensor:
    """The worker's side: w_i^{t+1} = x^{t+1} on a sync round, else w_i^t + C_i^t(x^{t+1} - x^t)."""
    if msg.meta.get("sync"):
        return dense(msg.payloads["x"])
    return w + dense(msg.payloads["delta"])
