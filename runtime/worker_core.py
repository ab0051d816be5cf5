"""A worker's side of a round, independent of transport: run the worker rule (which calls the
gradient oracle on the worker's device), encode the uplink, and apply a decoded downlink. The
worker's two links (``common.wire.stream``) remember what was said on them, so the algorithm's
messages carry only what changes.

Timing: ``compute_s`` is the time inside the oracle, ``compress_s`` the rest of the rule plus
encoding; on CUDA both synchronize the device so that they measure the GPU work. The rule's
``settle`` (work the uplink does not need, such as a Markov state h += c) runs after the uplink is
sent (``settle``), so it is in neither: it overlaps the transfer and the server's work.
"""
from __future__ import annotations

import time

import torch

from common.compressors.message import Message
from common.oracle import gradient_entry, with_gradient
from common.wire.stream import DOWN, UP, LinkDecoder, LinkEncoder
from runtime.setup import RunSetup
from common.wire import WireError
from runtime import checkpoint, protocol


def resolve_device(spec: str, rank: int) -> torch.device:
    """``auto``: GPU (rank mod count) on a CUDA host, else CPU; or ``cpu``, ``cuda``, ``cuda:K``."""
    spec = (spec or "auto").lower()
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", rank % torch.cuda.device_count())
        return torch.device("cpu")
    device = torch.device(spec)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {spec}: this host has no CUDA GPU")
        index = device.index if device.index is not None else 0
        if index >= torch.cuda.device_count():
            raise ValueError(f"--device {spec}: this host has {torch.cuda.device_count()} GPU(s)")
        return torch.device("cuda", index)
    if device.type != "cpu":
        raise ValueError(f"--device {spec}: expected auto, cpu, cuda or cuda:K")
    return device


class WorkerCore:
    def __init__(self, setup: RunSetup, rank: int, device: torch.device):
        self.setup, self.rank, self.device = setup, rank, device
        self.rule = setup.worker_rule(rank, device)
        self.initial = self.rule.state_dict()  # what a rollback to round 0 goes back to
        self.reset_links()
        self.received: Message | None = None  # the last downlink, as decoded
        self.unsettled: tuple[int, Message] | None = None  # the round and uplink whose ``settle`` has not run
        self.compute_s = 0.0
        inner = self.rule.oracle
        self.rule.oracle = self._timed(inner)
        gradient = gradient_entry(inner)
        if gradient is not None:  # the oracle's gradient-only entry point (common.oracle), timed too
            with_gradient(self.rule.oracle, self._timed(gradient))

    def _timed(self, call):
        """``call`` (an oracle entry point), adding the time inside it to ``compute_s``."""
        def timed(x, step):
            self._sync()
            start = time.perf_counter()
            result = call(x, step)
            self._sync()
            self.compute_s += time.perf_counter() - start
            return result

        return timed

    def reset_links(self) -> None:
        """Forget what this worker's two links have said (``common.wire.stream``); the server's ends
        are reset at the same point of the run, so the next message each way is sent in full."""
        self.up, self.down = LinkEncoder(UP), LinkDecoder(DOWN)

    def restore(self, state: dict | None) -> None:
        """Roll back to a checkpoint: the rule takes ``state`` (None: the rule's state as built,
        kept from the start) and the links start again."""
        checkpoint.restore_rule(self.rule, self.initial if state is None else state)
        self.unsettled = None  # an abandoned round's rest is not applied to the restored state
        self.reset_links()

    def settle(self) -> None:
        """Run the rule's ``settle`` for the uplink just made (once; nothing if it ran). The worker
        calls it once the UP is sent; the downlink, the next uplink and ``state_dict`` call it first."""
        if self.unsettled is not None:
            (t, sent), self.unsettled = self.unsettled, None
            self.rule.settle(t, sent)

    def state_dict(self) -> dict:
        """The rule's state for a checkpoint, settled first."""
        self.settle()
        return self.rule.state_dict()

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def uplink(self, t: int) -> tuple[list[bytes], list[bytes]]:
        """Round ``t``'s STATS (control path: its timing) and UP (the lean algorithm message), to be
        sent in this order."""
        self.settle()
        self.compute_s = 0.0
        start = time.perf_counter()
        try:
            sent = self.rule.uplink(t)
            frames = self.up.encode(t, sent)
            self.unsettled = (t, sent)
        except (WireError, ValueError) as exc:
            raise RuntimeError(f"worker {self.rank}, round {t}: cannot send the uplink ({exc}); "
                               "if values are not finite the run diverged: try a smaller --lr") from None
        total = time.perf_counter() - start
        stats = protocol.pack(b"STATS", {"t": t, "compute_s": self.compute_s, "compress_s": max(0.0, total - self.compute_s)})
        return stats, frames

    def downlink(self, t: int, down: protocol.Envelope) -> None:
        """Apply round ``t``'s DOWN message (parsed where it was received)."""
        if not down.is_round(b"DOWN", t):
            raise protocol.ProtocolError(f"expected DOWN for round {t}, got {down.kind.decode()} for round {down.round_text}")
        self.settle()
        self.received, _ = self.down.decode(down.body, t, device=self.device, max_dim=self.setup.dim)
        self.rule.downlink(t, self.received)
