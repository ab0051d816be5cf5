"""The server's side of a round, independent of transport: decode the n uplinks, run the server
rule, encode one downlink per worker, measure, and write the metrics line.

The ZeroMQ server (``psserver.server``) and the in-process engine (``runtime.engine``) both call
``ServerCore.round``, so the two give the same trajectory and the same byte counts. The core holds
the server's end of every link (``common.wire.stream``: worker i's uplink decoder and downlink
encoder), the telemetry the workers sent for the round (``stats``) and the round's control bytes
(``control``: STATS, heartbeats), which the metrics report apart from the algorithm's bytes.
"""
from __future__ import annotations

import hashlib
import time
from typing import Any

from common.algorithms.base import ServerRule
from common.compressors import cpu_kernels
from common.compressors.base import all_finite
from common.wire.stream import DOWN, UP, LinkDecoder, LinkEncoder, encode_parts
from runtime.setup import RunSetup
from common.wire import WireError
from common.wire.codec import checked_finite
from runtime import protocol
from runtime.metrics import MetricsWriter


class RunFailed(RuntimeError):
    """The run cannot go on; the message says why in one line."""


class BadUplink(RunFailed):
    """Worker ``rank`` sent a malformed or impossible message (bad frames, another round, values
    that are not finite, a payload its link or the rule did not agree to). It was rejected before
    the server rule ran, so the run's state is untouched; the server treats the worker as lost."""

    def __init__(self, rank: int, message: str):
        super().__init__(message)
        self.rank = rank


# The least dimension for which ``step_threads`` is used. At d = 1e7 (2 cores, N = 2) the server's
# part fell 8.8 -> 7.1 ms with dense GD and 17.7 -> 13.8 ms with CD-Adam; at d = 1e6 it rose by
# 0.1-0.3 ms (short passes split over threads, beside the workers' own work after sending).
STEP_THREADS_FROM = 1 << 22


class ServerCore:
    def __init__(self, setup: RunSetup, metrics: MetricsWriter, step_threads: int | None = None):
        """``step_threads``: the compiled passes' threads for the rule's step and the encodes, the
        part of a round when the workers wait for their downlinks, for models of at least
        ``STEP_THREADS_FROM`` coordinates (None, and below: as many as elsewhere)."""
        self.setup = setup
        self.step_threads = step_threads if setup.dim >= STEP_THREADS_FROM else None
        self.rule = setup.server_rule()
        self.metrics = metrics
        self.n = setup.config.workers
        self.last_round_end = time.perf_counter()
        self.last: dict[str, Any] = {}
        self.pending: dict[str, Any] | None = None  # the last round's metrics, until ``record``
        self.reset_links()
        self.control_bytes = 0
        self.unsettled: int | None = None  # the round whose ``settle`` has not run yet
        self.defers = type(self.rule).settle is not ServerRule.settle  # the rule leaves work for after sending

    def reset_links(self) -> None:
        """Forget what every link has said (a new run, or a rollback to a checkpoint: the worker
        ends forget too, so the next message on each link is sent in full)."""
        self.ups = [LinkDecoder(UP) for _ in range(self.n)]
        self.downs = [LinkEncoder(DOWN) for _ in range(self.n)]
        self.arrived: list[tuple[int, Any, int, int] | None] = [None] * self.n  # (round, message, bits, bytes) by ``accept``
        self.last_accept = 0.0  # when the last ``accept`` began (perf_counter)
        self.timing: list[tuple[float, float]] = [(0.0, 0.0)] * self.n  # (compute_s, compress_s) this round

    def control(self, nbytes: int) -> None:
        """Count a control message (heartbeat, telemetry, checkpoint traffic) sent or received
        during the round."""
        self.control_bytes += nbytes

    def stats(self, rank: int, t: int, msg: protocol.Envelope) -> None:
        """Worker ``rank``'s STATS for round ``t`` (its compute and compress time); ``RunFailed`` if
        it is malformed."""
        try:
            if not msg.is_round(b"STATS", t):
                raise protocol.ProtocolError(f"expected STATS for round {t}, got {msg.kind.decode()} for round {msg.round_text}")
            self.timing[rank] = (msg.seconds("compute_s"), msg.seconds("compress_s"))
        except protocol.ProtocolError as exc:
            raise BadUplink(rank, f"round {t}: malformed telemetry from worker {rank}: {exc}") from None
        self.control(msg.nbytes)
    def begin(self, **extra: Any) -> None:
        initial = self.setup.problem.evaluate(self.rule.model)
        self.metrics.start(
            self.setup.config.to_dict(), self.setup.dim, self.n, lr=self.setup.ctx.lr,
            uplink=self.setup.ctx.uplink_spec, downlink=self.setup.ctx.downlink_spec,
            problem_constants=self.setup.problem.constants, initial=initial, **extra,
        )
        self.last_round_end = time.perf_counter()

    def accept(self, rank: int, t: int, up: protocol.Envelope) -> None:
        """Decode worker ``rank``'s UP for round ``t`` as soon as it arrives, while the server waits
        for the others: only the last uplink's decode is left on the round's critical path. A
        malformed one raises ``BadUplink`` and is not kept (nothing else changes)."""
        self.last_accept = time.perf_counter()
        try:
            if not up.is_round(b"UP", t):
                raise protocol.ProtocolError(f"expected UP for round {t}, got {up.kind.decode()} for round {up.round_text}")
            msg, bits = self.ups[rank].decode(up.body, t, device=self.rule.x.device, max_dim=self.setup.dim)
        except (WireError, protocol.ProtocolError) as exc:
            raise BadUplink(rank, f"round {t}: malformed uplink from worker {rank}: {exc}") from None
        self.arrived[rank] = (t, msg, bits, up.nbytes)

    def round(self, t: int, uplinks: list[protocol.Envelope] | None = None) -> list[list[bytes]]:
        """Run round ``t`` on the uplinks that ``accept`` decoded (or, given ``uplinks[i]``, worker
        i's UP parsed where it was received, on those). Returns worker i's DOWN frames. The round's
        metrics line waits for ``record``, which the caller runs once the downlinks are on their
        way: the evaluation of loss and gradient norm (a pass over the data for a neural network)
        then overlaps the workers' next gradient instead of delaying it. It measures the same model:
        the rule does not move until the next round's uplinks. ``server_s`` is the server's time on
        the critical path: from the last uplink's arrival (its decode included) to the encoded
        downlinks; the work a rule leaves to ``settle`` (CD-Adam's mirrored AMSGrad step, EF21's
        x step) is not in it, since ``record`` runs it after the downlinks are sent."""
        self.settle()  # the last round's rest, where nothing ran it yet
        start = time.perf_counter() if uplinks is not None else self.last_accept
        for rank, up in enumerate(uplinks or ()):
            self.arrived[rank] = None
            self.accept(rank, t, up)
        arrived, self.arrived = self.arrived, [None] * self.n
        missing = [rank for rank, a in enumerate(arrived) if a is None or a[0] != t]
        if missing:
            raise RunFailed(f"round {t}: no uplink from worker(s) {missing}")
        _, msgs, bits_up, nbytes_up = (list(column) for column in zip(*arrived))
        with cpu_kernels.compiled_threads(self.step_threads):
            out, bits_down = self._step_and_encode(t, msgs)
        server_s = time.perf_counter() - start
        now = time.perf_counter()
        round_s = now - self.last_round_end
        self.last_round_end = now
        compute_s, compress_s = (max(times) for times in zip(*self.timing))
        self.timing = [(0.0, 0.0)] * self.n
        control, self.control_bytes = self.control_bytes, 0
        self.pending = dict(
            t=t, bytes_up=nbytes_up, bytes_down=[protocol.size(f) for f in out],
            payload_bits_up=bits_up, payload_bits_down=bits_down, control_bytes=control,
            **self.rule.round_metrics(),
            round_s=round_s, compute_s=compute_s, compress_s=compress_s, server_s=server_s,
            comm_s=max(0.0, round_s - compute_s - compress_s - server_s),
        )
        return out

    def _step_and_encode(self, t: int, msgs: list) -> tuple[list[list[bytes]], list[int]]:
        """The rule's step on round ``t``'s decoded uplinks, then each worker's DOWN frames and
        payload bits."""
        try:
            downs = self.rule.step(t, msgs)
        except (KeyError, ValueError, IndexError, RuntimeError) as exc:  # e.g. a payload the rule did not expect
            raise RunFailed(f"round {t}: the server rule could not use the uplinks ({exc.__class__.__name__}: {exc})") from None
        if len(downs) != self.n:
            raise RunFailed(f"round {t}: the server rule returned {len(downs)} downlinks for {self.n} workers")
        self.unsettled = t
        if not self.defers:
            self.settle()  # checks the model before it is sent
        # a downlink that is the model is not checked twice, where the model was checked: not yet
        # where the rule defers its rest (EF-SGD's average, whose model without one is its downlink)
        checked = () if self.unsettled is not None else (self.rule.model,)
        encoded: dict[int, Any] = {}
        out, bits_down = [], []
        with checked_finite(*checked):
            for rank, msg in enumerate(downs):
                if id(msg) not in encoded:  # a broadcast's payloads are encoded once, then wrapped per link
                    try:
                        encoded[id(msg)] = encode_parts(msg)
                    except (WireError, ValueError) as exc:
                        raise RunFailed(f"round {t}: cannot encode the downlink ({exc}); "
                                        "if values are not finite the run diverged: try a smaller --lr") from None
                out.append(self.downs[rank].encode(t, encoded[id(msg)]))
                bits_down.append(encoded[id(msg)].bits)
        return out, bits_down

    def settle(self) -> None:
        """Run the rule's ``settle`` for the round just stepped (once; nothing if it ran), then check
        that the model is still finite (``RunFailed`` if not). ``record``, the checkpoint's snapshot,
        the digest and the next round call it first; a rule that defers work runs it here, after the
        caller has sent the downlinks, so that it overlaps the workers' next computation."""
        if self.unsettled is None:
            return
        t, self.unsettled = self.unsettled, None
        self.rule.settle(t)
        if not all_finite(self.rule.model):
            raise RunFailed(f"round {t}: the model is no longer finite (the run diverged; try a smaller --lr)")

    def record(self) -> dict[str, Any]:
        """Settle the round (``settle``), evaluate the model if this round is due (``--eval-every``)
        and write the round's metrics line (once; nothing if no round is pending). Returns the line."""
        self.settle()
        if self.pending is not None:
            fields, self.pending = self.pending, None
            t = fields["t"]
            if self.setup.config.evaluated(t):
                fields.update(self.setup.problem.evaluate(self.rule.model))
            self.last = self.metrics.round(**fields)
        return self.last

    def model_digest(self) -> str:
        """SHA-256 of the model's bytes: two runs with the same digest have bit-identical models."""
        self.settle()
        return hashlib.sha256(self.rule.model.detach().cpu().contiguous().numpy().tobytes()).hexdigest()

    def end(self, **summary: Any) -> None:
        final = {k: self.last[k] for k in ("loss", "grad_norm_sq") if k in self.last}
        self.metrics.end(rounds=self.setup.config.rounds, model_sha256=self.model_digest(), **final, **summary)
