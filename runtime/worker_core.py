"""A worker's side of a round, independent of transport: run the worker rule (which calls the
gradient oracle on the worker's device), encode the uplink, and apply a decoded downlink.

Timing: ``compute_s`` is the time inside the oracle, ``compress_s`` the rest of the rule plus
encoding; on CUDA both synchronize the device so that they measure the GPU work.
"""
from __future__ import annotations

import time

import torch

from common.wire.message import decode_message, encode_message
from runtime.setup import RunSetup
from common.wire import WireError
from runtime import protocol


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
        self.compute_s = 0.0
        inner = self.rule.oracle

        def timed_oracle(x, step):
            self._sync()
            start = time.perf_counter()
            result = inner(x, step)
            self._sync()
            self.compute_s += time.perf_counter() - start
            return result

        self.rule.oracle = timed_oracle

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def uplink(self, t: int) -> list[bytes]:
        self.compute_s = 0.0
        start = time.perf_counter()
        try:
            frames = encode_message(self.rule.uplink(t))
        except (WireError, ValueError) as exc:
            raise RuntimeError(f"worker {self.rank}, round {t}: cannot send the uplink ({exc}); "
                               "if values are not finite the run diverged: try a smaller --lr") from None
        total = time.perf_counter() - start
        return protocol.pack(b"UP", {"t": t, "compute_s": self.compute_s, "compress_s": max(0.0, total - self.compute_s)}, frames)

    def downlink(self, t: int, frames: list[bytes]) -> None:
        """Apply worker-bound DOWN frames of round ``t`` (the whole protocol message)."""
        down = protocol.parse(frames)
        if down.round_of(b"DOWN") != t:
            raise protocol.ProtocolError(f"expected DOWN for round {t}, got round {down.header.get('t')!r}")
        self.apply(t, down.body)

    def apply(self, t: int, body: list[bytes]) -> None:
        """Apply the algorithm message frames of round ``t``'s downlink."""
        self.rule.downlink(t, decode_message(body, device=self.device, max_dim=self.setup.dim))
