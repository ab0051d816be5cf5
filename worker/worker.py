"""The worker process: a DEALER socket, registration, the round loop, heartbeats.

The worker sends HELLO, receives its rank and the run's configuration (WELCOME) or a refusal
(REFUSE: exit 1 with the reason), builds the problem and its rule on its device, answers READY, then
for each round sends STATS (its timing) and UP and waits for its DOWN. A thread with its own socket sends HEARTBEATs so the
server knows the worker is alive while it computes. If the server is silent for longer than
``timeout`` seconds, or sends STOP with a failure, the worker exits 1 with a one-line reason.
ZeroMQ reconnects by itself, so a worker started before its server simply waits for it (up to
``join_timeout``). The configuration may load code or read local files only where this worker's
``WorkerPolicy`` allows it (``runtime.trust``); with ``WorkerKeys`` both sockets speak CURVE.
"""
from __future__ import annotations

import logging
import os
import socket
import time
import uuid

import zmq

from common.config import RunConfig
from runtime import protocol, transport
from runtime.setup import RunSetup
from runtime.summary import WorkerTally
from runtime.trust import WorkerPolicy
from runtime.worker_core import WorkerCore, resolve_device

log = logging.getLogger("psc.worker")


class WorkerFailed(RuntimeError):
    pass


class Worker:
    def __init__(self, connect: str, device: str = "auto", rank: int | None = None, timeout: float = 60.0,
                 heartbeat: float = 1.0, join_timeout: float = 600.0, protocol_version: int = protocol.VERSION,
                 keys: transport.WorkerKeys | None = None, policy: WorkerPolicy = WorkerPolicy()):
        self.connect, self.device_spec, self.wanted_rank = connect, device, rank
        self.timeout, self.heartbeat, self.join_timeout = timeout, heartbeat, join_timeout
        self.version = protocol_version
        self.identity = uuid.uuid4().hex.encode()
        self.keys, self.policy = keys, policy
        self.sock = transport.worker_socket(connect, self.identity, keys)
        self.rank = -1

    def _send(self, kind: bytes, header: dict, body: list[bytes] = ()) -> None:
        self.sock.send_multipart(protocol.pack(kind, header, body, version=self.version), copy=False)

    def _receive(self, want: bytes, patience: float, what: str):
        """Wait for a message of kind ``want``; handle HEARTBEAT, STOP and REFUSE on the way."""
        deadline = time.monotonic() + patience
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise WorkerFailed(f"no word from the server at {self.connect} for {patience:g} s while waiting for {what}")
            if not self.sock.poll(int(min(left, self.heartbeat) * 1000)):
                continue
            frames = self.sock.recv_multipart()
            reason = protocol.refusal_reason(frames)
            if reason is not None:
                raise WorkerFailed(f"the server refused this worker: {reason}")
            try:
                msg = protocol.parse(frames)
            except protocol.ProtocolError as exc:
                raise WorkerFailed(f"unreadable message from the server: {exc}") from None
            kind = msg.kind
            if kind == b"STOP":
                if msg.header.get("ok") and want == b"STOP":
                    return msg
                raise WorkerFailed(f"the server stopped the run: {msg.header.get('reason', 'no reason given')}")
            if kind == want:
                return msg
            deadline = time.monotonic() + (self.timeout if want != b"WELCOME" else patience)
            if kind != b"HEARTBEAT":
                log.warning("unexpected %s from the server while waiting for %s; ignored", kind.decode(), what)

    def run(self) -> int:
        beats = transport.HeartbeatSender(self.connect, self.identity + b"-hb", self.heartbeat,
                                          lambda: protocol.pack(b"HEARTBEAT", {"rank": self.rank}, version=self.version),
                                          self.keys)
        try:
            self._send(b"HELLO", {"version": self.version, "rank": -1 if self.wanted_rank is None else self.wanted_rank,
                                  "host": socket.gethostname(), "pid": os.getpid()})
            welcome = self._receive(b"WELCOME", self.join_timeout, "registration").header
            self.rank = int(welcome["rank"])
            config = RunConfig.from_dict(welcome["config"])
            try:
                self.policy.check(config)  # nothing from the wire is executed unless this worker allows it
            except PermissionError as exc:
                self._send(b"BYE", {"rank": self.rank, "reason": "refused the run's configuration"})
                raise WorkerFailed(str(exc)) from None
            beats.start()  # from here on: building the problem may take longer than the timeout
            device = resolve_device(self.device_spec, int(os.environ.get("LOCAL_RANK", self.rank)))
            setup = RunSetup.build(config)
            core = WorkerCore(setup, self.rank, device)
            tally = WorkerTally(core)  # this worker's summary: rounds, bytes each way, compute time
            log.info("worker %d of %d on %s, d = %d", self.rank, config.workers, device, setup.dim)
            self._send(b"READY", {"rank": self.rank, "dim": setup.dim})
            for t in range(config.rounds):
                stats, up = core.uplink(t)
                self.sock.send_multipart(stats)  # telemetry first: the server has it when the UP completes the round
                self.sock.send_multipart(up, copy=False)
                down = self._receive(b"DOWN", self.timeout, f"round {t}")
                if not down.is_round(b"DOWN", t):
                    raise WorkerFailed(f"the server sent round {down.round_text} while this worker is at round {t}")
                tally.received(down)
                core.downlink(t, down)
            self._receive(b"STOP", self.timeout, "the end of the run")
            self._send(b"BYE", {"rank": self.rank, "reason": "done", "ok": True})  # the server waits for it to close
            log.info("%s", tally.text())
            return 0
        except WorkerFailed:
            raise
        except BaseException as exc:
            try:
                self._send(b"BYE", {"rank": self.rank, "reason": f"{exc.__class__.__name__}: {exc}"})
            except zmq.ZMQError:
                pass
            raise
        finally:
            beats.stop()
            self.sock.close()
