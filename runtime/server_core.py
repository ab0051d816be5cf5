"""The server's side of a round, independent of transport: decode the n uplinks, run the server
rule, encode one downlink per worker, measure, and write the metrics line.

The ZeroMQ server (``psserver.server``) and the in-process engine (``runtime.engine``) both call
``ServerCore.round``, so the two give the same trajectory and the same byte counts.
"""
from __future__ import annotations

import hashlib
import time
from typing import Any

import torch

from common.wire.message import decode_message, encode_message
from runtime.setup import RunSetup
from common.wire import WireError
from runtime import protocol
from runtime.metrics import MetricsWriter


class RunFailed(RuntimeError):
    """The run cannot go on; the message says why in one line."""


class ServerCore:
    def __init__(self, setup: RunSetup, metrics: MetricsWriter):
        self.setup = setup
        self.rule = setup.server_rule()
        self.metrics = metrics
        self.n = setup.config.workers
        self.last_round_end = time.perf_counter()
        self.last: dict[str, Any] = {}
        self.control_bytes = 0  # bytes of this round that are not algorithm messages (checkpoint traffic)

    def begin(self, **extra: Any) -> None:
        initial = self.setup.problem.evaluate(self.rule.model)
        self.metrics.start(
            self.setup.config.to_dict(), self.setup.dim, self.n, lr=self.setup.ctx.lr,
            uplink=self.setup.ctx.uplink_spec, downlink=self.setup.ctx.downlink_spec,
            problem_constants=self.setup.problem.constants, initial=initial, **extra,
        )
        self.last_round_end = time.perf_counter()

    def round(self, t: int, uplinks: list[protocol.Envelope]) -> list[list[bytes]]:
        """``uplinks[i]``: worker i's UP message, parsed where it was received. Returns worker i's
        DOWN frames."""
        start = time.perf_counter()
        msgs, compute, compress = [], [], []
        for rank, up in enumerate(uplinks):
            try:
                if up.round_of(b"UP") != t:
                    raise protocol.ProtocolError(f"expected UP for round {t}, got round {up.header.get('t')!r}")
                compute.append(up.seconds("compute_s"))
                compress.append(up.seconds("compress_s"))
                msgs.append(decode_message(up.body, device=self.rule.x.device, max_dim=self.setup.dim))
            except (WireError, protocol.ProtocolError) as exc:
                raise RunFailed(f"round {t}: malformed uplink from worker {rank}: {exc}") from None
        try:
            downs = self.rule.step(t, msgs)
        except (KeyError, ValueError, IndexError, RuntimeError) as exc:  # e.g. a payload the rule did not expect
            raise RunFailed(f"round {t}: the server rule could not use the uplinks ({exc.__class__.__name__}: {exc})") from None
        if len(downs) != self.n:
            raise RunFailed(f"round {t}: the server rule returned {len(downs)} downlinks for {self.n} workers")
        if not bool(torch.isfinite(self.rule.model).all()):
            raise RunFailed(f"round {t}: the model is no longer finite (the run diverged; try a smaller --lr)")
        encoded: dict[int, list[bytes]] = {}
        out = []
        for msg in downs:
            if id(msg) not in encoded:  # a broadcast is encoded once and sent (and counted) n times
                encoded[id(msg)] = protocol.pack(b"DOWN", {"t": t}, encode_message(msg))
            out.append(encoded[id(msg)])
        server_s = time.perf_counter() - start
        now = time.perf_counter()
        round_s = now - self.last_round_end
        self.last_round_end = now
        compute_s, compress_s = max(compute), max(compress)
        self.last = self.metrics.round(
            t, [up.nbytes for up in uplinks], [protocol.size(f) for f in out],
            **self.setup.problem.evaluate(self.rule.model), **self.rule.round_metrics(),
            round_s=round_s, compute_s=compute_s, compress_s=compress_s, server_s=server_s,
            comm_s=max(0.0, round_s - compute_s - compress_s - server_s), control_bytes=self.control_bytes,
        )
        self.control_bytes = 0
        return out

    def model_digest(self) -> str:
        """SHA-256 of the model's bytes: two runs with the same digest have bit-identical models."""
        return hashlib.sha256(self.rule.model.detach().cpu().contiguous().numpy().tobytes()).hexdigest()

    def end(self, **summary: Any) -> None:
        final = {k: self.last[k] for k in ("loss", "grad_norm_sq") if k in self.last}
        self.metrics.end(rounds=self.setup.config.rounds, model_sha256=self.model_digest(), **final, **summary)
