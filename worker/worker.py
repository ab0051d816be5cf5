"""The worker process: a DEALER socket, registration, the round loop, heartbeats.

The worker sends HELLO, receives its rank and the run's configuration (WELCOME) or a refusal
(REFUSE: exit 1 with the reason), builds the problem and its rule on its device, answers READY, then
for each round sends STATS (its timing) and UP and waits for its DOWN. A thread with its own socket sends HEARTBEATs so the
server knows the worker is alive while it computes. If the server is silent for longer than
``timeout`` seconds, or sends STOP with a failure, the worker exits 1 with a one-line reason.
ZeroMQ reconnects by itself, so a worker started before its server simply waits for it (up to
``join_timeout``). The configuration may load code or read local files only where this worker's
``WorkerPolicy`` allows it (``runtime.trust``); with ``WorkerKeys`` both sockets speak CURVE.

Checkpoints and restarts (``runtime.checkpoint``): a SAVE {t} makes the worker upload its rule state
(STATE) once round t-1 is applied, before its next UP; a RESTORE {t} puts its rule back at round t
(the state it carries, or the rule's initial state for ``fresh``), empties the memory of both its
links, is answered RESTORED, and the rounds go on from t. While
it waits for the server, a worker that has heard nothing for ``rehello`` seconds sends HELLO again
(ignored by a server that knows it): a server restarted with ``--resume`` then answers WELCOME,
the worker answers READY and waits for its RESTORE. The whole wait is bounded by ``timeout``.
"""
from __future__ import annotations

import logging
import os
import socket
import time
import uuid

import zmq

from common.config import RunConfig
from runtime import checkpoint, protocol, transport
from runtime.setup import RunSetup
from runtime.signals import raise_pending
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
        self.rehello = max(3.0 * heartbeat, 1.0)  # silence after which HELLO is sent again (a restarted server)

    def _send(self, kind: bytes, header: dict, body: list[bytes] = ()) -> None:
        self.sock.send_multipart(protocol.pack(kind, header, body, version=self.version), copy=False)

    def _hello(self) -> None:
        self._send(b"HELLO", {"version": self.version, "rank": -1 if self.wanted_rank is None else self.wanted_rank,
                              "host": socket.gethostname(), "pid": os.getpid()})

    def _receive(self, want: bytes | tuple[bytes, ...], patience: float, what: str, rejoin: bool = False):
        """Wait for a message of a kind in ``want``; handle HEARTBEAT, STOP and REFUSE on the way.
        ``rejoin``: after ``rehello`` seconds of silence, send HELLO again (for a restarted server)."""
        want = (want,) if isinstance(want, bytes) else want
        deadline = time.monotonic() + patience
        heard = time.monotonic()
        while True:
            raise_pending()  # a stop signal whose exception was lost in a frame's destructor
            now = time.monotonic()
            left = deadline - now
            if left <= 0:
                raise WorkerFailed(f"no word from the server at {self.connect} for {patience:g} s while waiting for {what}")
            if rejoin and now - heard > self.rehello:
                self._hello()
                heard = now
            if not self.sock.poll(int(min(left, self.heartbeat) * 1000)):
                continue
            heard = time.monotonic()
            frames = self.sock.recv_multipart(copy=False)  # zmq.Frames: writable, so decoding needs no copy
            reason = protocol.refusal_reason(frames)
            if reason is not None:
                raise WorkerFailed(f"the server refused this worker: {reason}")
            try:
                msg = protocol.parse(frames)
            except protocol.ProtocolError as exc:
                raise WorkerFailed(f"unreadable message from the server: {exc}") from None
            kind = msg.kind
            if kind == b"STOP":
                if msg.header.get("ok") and b"STOP" in want:
                    return msg
                raise WorkerFailed(f"the server stopped the run: {msg.header.get('reason', 'no reason given')}")
            if kind in want:
                return msg
            deadline = time.monotonic() + (self.timeout if want != (b"WELCOME",) else patience)
            if kind != b"HEARTBEAT":
                log.warning("unexpected %s from the server while waiting for %s; ignored", kind.decode(), what)

    def _rounds(self, config: RunConfig, setup: RunSetup, core: WorkerCore, tally: WorkerTally, restore: bool) -> None:
        """The rounds until the server's final STOP, with the checkpoint messages on the way.
        ``t`` is the round to run next; None while waiting for a RESTORE."""
        t: int | None = None if restore else 0
        save_at = None
        self.wanted_rank = self.rank  # a HELLO from now on asks for the rank this worker holds
        while True:
            if t is not None and t < config.rounds:
                if save_at == t:
                    self._send(b"STATE", {"rank": self.rank, "t": t}, checkpoint.pack_state(core.state_dict()))
                stats, up = core.uplink(t)
                self.sock.send_multipart(stats)  # telemetry first: the server has it when the UP completes the round
                self.sock.send_multipart(up, copy=False)
                core.settle()  # the rule's work that the uplink does not need, while it crosses the link
            while True:
                done = t is not None and t >= config.rounds
                want = (b"RESTORE", b"WELCOME", b"SAVE") + ((b"STOP",) if done else (b"DOWN",) if t is not None else ())
                what = "the end of the run" if done else f"round {t}" if t is not None else "the run's state"
                msg = self._receive(want, self.timeout, what, rejoin=True)
                if msg.kind == b"STOP":
                    return
                if msg.kind == b"SAVE":
                    save_at = msg.header.get("t")
                elif msg.kind == b"WELCOME":  # a restarted server (or one that had counted this worker lost)
                    self._welcome_back(msg.header, config)
                    self._send(b"READY", {"rank": self.rank, "dim": setup.dim})
                    t = None
                elif msg.kind == b"RESTORE":
                    t, save_at = self._restore(msg, core, config.rounds), None
                    break
                elif t is not None and not done:  # DOWN
                    if not msg.is_round(b"DOWN", t):
                        raise WorkerFailed(f"the server sent round {msg.round_text} while this worker is at round {t}")
                    tally.received(msg)
                    core.downlink(t, msg)
                    t += 1
                    break

    def _welcome_back(self, header: dict, config: RunConfig) -> None:
        if header.get("rank") != self.rank or header.get("config") != config.to_dict():
            raise WorkerFailed(f"the server that answered again runs another configuration or gave another rank "
                               f"({header.get('rank')!r} for {self.rank}); stopping")
        if not header.get("restore"):
            raise WorkerFailed("the server started the run again from the beginning without --resume; stopping")
        log.warning("worker %d: the server is back; waiting for the run's state", self.rank)

    def _restore(self, msg, core: WorkerCore, rounds: int) -> int:
        """Apply a RESTORE and answer RESTORED: what this worker sends from then on belongs to the
        restored run (the server drops what it sent before), and its links start again."""
        t = msg.header.get("t")
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t <= rounds:
            raise WorkerFailed(f"the server asked to restore round {t!r} of a {rounds}-round run")
        try:
            core.restore(None if msg.header.get("fresh") else checkpoint.unpack_state(msg.body, core.device))
        except checkpoint.CheckpointError as exc:
            raise WorkerFailed(f"the server sent a state this worker cannot use: {exc}") from None
        self._send(b"RESTORED", {"rank": self.rank, "t": t, "seq": msg.header.get("seq")})
        log.info("worker %d: rolled back to round %d", self.rank, t)
        return t

    def run(self) -> int:
        beats = transport.HeartbeatSender(self.connect, self.identity + b"-hb", self.heartbeat,
                                          lambda: protocol.pack(b"HEARTBEAT", {"rank": self.rank}, version=self.version),
                                          self.keys)
        try:
            self._hello()
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
            self._rounds(config, setup, core, tally, restore=bool(welcome.get("restore")))
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
