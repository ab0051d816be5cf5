"""The server process: a ROUTER socket, registration, synchronous rounds, heartbeats, metrics.

Registration: a worker sends HELLO (protocol version, wanted rank); the server answers WELCOME with
its rank and the run's configuration, or REFUSE with a reason (wrong protocol version, server full,
rank taken, run already started). The worker builds the problem and answers READY with its
dimension, which must match the server's. When all n are ready, rounds start.

Each round the server waits for one UP (and the STATS before it) from every worker, runs
``ServerCore.round`` and sends each worker its own DOWN (a broadcast's payloads are encoded once).
UP and DOWN are lean link messages (``common.wire.stream``) whose two ends must see every message, so
an UP or STATS for another round is a protocol violation that stops the run. Workers send HEARTBEATs from a
separate socket while they compute; the server sends HEARTBEATs while it waits. A worker silent for
longer than ``timeout`` seconds, or one that says BYE, stops the run: every worker gets STOP, the
log says which worker and why, and ``run`` returns 1. Messages from unknown peers that do not parse
are logged and refused; the run goes on. Sockets and liveness come from ``runtime.transport``; each
message is parsed once, here, and reaches the round as a ``protocol.Envelope``.

``supervise`` (optional) is called between polls, at least every half second: ``psc launch`` uses
it to raise ``RunFailed`` as soon as one of its worker processes has exited with an error.

Who a rank belongs to: the connection that registered it (its main socket; its heartbeat socket,
``identity + b"-hb"``, is bound at its first heartbeat) and, with CURVE, the public key it
authenticated with; every later message must come from that connection (``transport.peer_of``).
When a registered connection closes (the next send to it fails, at the latest at the next
heartbeat), its rank is lost at once, so a later connection that reuses the routing identity is
never taken for the old worker. Heartbeats count only from the rank's own heartbeat socket. A
worker that has not delivered its uplink ``round_timeout`` seconds after a round began is lost,
however lively its heartbeats (default: ten times the liveness timeout or the slowest round so
far, whichever is longer; no deadline for the first round). Refusals are logged once per peer,
with the peer's text cut short.
"""
from __future__ import annotations

import logging
import math
import time
from typing import Callable

import zmq

from common.config import RunConfig
from runtime import protocol, transport
from runtime.metrics import MetricsWriter
from runtime.progress import progress_bar
from runtime.server_core import RunFailed, ServerCore
from runtime.setup import RunSetup
from runtime.signals import Terminated

log = logging.getLogger("psc.server")


class Server:
    def __init__(self, config: RunConfig, bind: str, metrics_path: str | None = None, timeout: float = 60.0,
                 heartbeat: float = 1.0, join_timeout: float = 600.0, progress: bool = True,
                 supervise: Callable[[], None] | None = None, keys: transport.ServerKeys | None = None,
                 round_timeout: float | None = None):
        self.config, self.bind, self.metrics_path = config, bind, metrics_path
        self.timeout, self.heartbeat, self.join_timeout, self.progress = timeout, heartbeat, join_timeout, progress
        self.supervise, self.round_timeout = supervise, round_timeout
        self.setup = RunSetup.build(config)  # a bad configuration fails here, before any socket
        # No honest frame is larger than d float64 values plus headers.
        self.transport = transport.ServerSocket(bind, keys, max_frame=8 * self.setup.dim + (1 << 16))
        self.sock, self.endpoint = self.transport.sock, self.transport.endpoint
        self.ident: dict[int, bytes] = {}  # rank -> identity of its main socket
        self.rank_of: dict[bytes, int] = {}
        self.beats_of: dict[bytes, int] = {}  # identity of a rank's heartbeat socket -> rank
        self.key_of: dict[int, str | None] = {}  # rank -> the CURVE key it registered with
        self.conn_of: dict[bytes, str] = {}  # a rank's main and heartbeat identities -> their connections
        self.logged_peers: set[bytes] = set()
        self.slowest_round = 0.0
        self.ready: set[int] = set()
        self.liveness = transport.Liveness(timeout)
        self.last_beat = 0.0
        self.early_ups: dict[int, protocol.Envelope] = {}  # round-0 uplinks of workers ready before the others
        self.core: ServerCore | None = None

    # -- sending -------------------------------------------------------------------------------
    def _send(self, identity: bytes, frames: list[bytes], must: bool = False) -> None:
        """Send to a registered worker; a closed connection (or, for a message that ``must``
        arrive, a worker that stopped reading) makes it lost."""
        if not self.transport.send(identity, frames, must) and identity in self.rank_of:
            raise RunFailed(f"worker {self.rank_of[identity]}'s connection closed (or it stopped reading); stopping the run")

    def _stop_all(self, ok: bool, reason: str) -> None:
        for identity in self.ident.values():
            try:
                self.transport.send(identity, protocol.pack(b"STOP", {"ok": ok, "reason": reason}))
            except zmq.ZMQError:
                pass

    def _beat(self) -> None:
        now = time.monotonic()
        if now - self.last_beat >= self.heartbeat:
            self.last_beat = now
            beat = protocol.pack(b"HEARTBEAT", {})
            for identity in list(self.ident.values()):
                self._send(identity, beat)
                self._count_control(beat)

    def _count_control(self, frames) -> None:
        """Heartbeats and telemetry go into the round's ``control_bytes`` (once rounds have begun)."""
        if self.core is not None:
            self.core.control(protocol.size(frames))

    def _once(self, identity: bytes, message: str, *args) -> None:
        """Log a warning about a peer the first time only (a bounded memory of peers)."""
        if identity not in self.logged_peers and len(self.logged_peers) < transport.MAX_REMEMBERED_REFUSALS:
            self.logged_peers.add(identity)
            log.warning(message + " (logged once per peer)", *args)

    def _refuse(self, identity: bytes, reason: str) -> None:
        reason = reason[:200]
        self._once(identity, "refusing a peer: %s", reason)
        self.transport.send(identity, protocol.pack(b"REFUSE", {"reason": reason}))

    # -- receiving -----------------------------------------------------------------------------
    def _receive(self, wait_s: float):
        """One message as (identity, Envelope or None if it was not for the run, its frames), or None after
        ``wait_s`` seconds. Also runs the supervisor's check, sends due heartbeats and checks
        liveness."""
        if self.supervise is not None:
            self.supervise()
        self._beat()
        self._check_liveness()
        if not self.sock.poll(int(wait_s * 1000)):
            return None
        identity, *frames = self.sock.recv_multipart(copy=False)
        identity = identity.bytes
        rank = self.rank_of.get(identity, self.beats_of.get(identity))
        if rank is not None and not self._owns(identity, rank, self.transport.peer_of(frames[0])):
            self._once(identity, "a connection that is not worker %d's uses its routing identity; ignored", rank)
            return identity, None, frames
        try:
            msg = protocol.parse(frames)
        except protocol.ProtocolError as exc:
            if identity in self.rank_of:
                log.warning("worker %d sent a malformed message (%s); ignored", self.rank_of[identity], exc)
            elif identity not in self.beats_of:
                self._refuse(identity, str(exc))
            return identity, None, frames
        if rank is not None:
            self.liveness.heard(rank)
        if identity in self.beats_of:  # a heartbeat socket says nothing else
            self._count_control(frames)
            return identity, None, frames
        return identity, msg, frames

    def _owns(self, identity: bytes, rank: int, peer: str) -> bool:
        """Whether the connection ``peer`` may speak for ``rank`` through ``identity``: the one that
        registered it, or, for the heartbeat socket, the first one with the rank's key."""
        bound = self.conn_of.get(identity)
        if bound is None and identity in self.beats_of and self.transport.key_of(peer) == self.key_of.get(rank):
            self.conn_of[identity] = bound = peer
        return bound == peer

    def _handle_hello(self, identity: bytes, header: dict, frames: list) -> None:
        n = self.config.workers
        wanted = header.get("rank", -1)
        if identity in self.rank_of:
            return
        if len(self.ident) >= n:
            return self._refuse(identity, f"server is full: all {n} workers are registered")
        if not isinstance(wanted, int) or isinstance(wanted, bool) or wanted >= n or wanted < -1:
            return self._refuse(identity, f"rank {wanted!r} is out of range for {n} workers")
        if wanted in self.ident:
            return self._refuse(identity, f"rank {wanted} is already taken")
        peer = self.transport.peer_of(frames[0])
        key = self.transport.key_of(peer)
        if key is not None and key in self.key_of.values():
            return self._refuse(identity, "this key already holds a rank")
        rank = wanted if wanted >= 0 else min(set(range(n)) - set(self.ident))
        self.ident[rank], self.rank_of[identity], self.beats_of[identity + b"-hb"] = identity, rank, rank
        self.conn_of[identity], self.key_of[rank] = peer, key
        self.liveness.heard(rank)
        log.info("worker %d joined (host %s, pid %s)", rank, header.get("host"), header.get("pid"))
        self._send(identity, protocol.pack(b"WELCOME", {"rank": rank, "config": self.config.to_dict(), "dim": self.setup.dim}), must=True)

    def _check_liveness(self) -> None:
        for rank, silent in self.liveness.silent():
            raise RunFailed(f"worker {rank} has been silent for {silent:.1f} s (timeout {self.timeout:g} s); stopping the run")

    def _handle_common(self, identity: bytes, kind: bytes, header: dict) -> None:
        """Messages that mean the same in every phase."""
        if kind == b"HELLO":
            if identity not in self.rank_of:
                started = " and the run has started" if len(self.ready) == self.config.workers else ""
                self._refuse(identity, f"server is full: all {self.config.workers} workers are registered{started}")
        elif kind == b"BYE" and identity in self.rank_of:
            raise RunFailed(f"worker {self.rank_of[identity]} left: {header.get('reason', 'no reason given')}")

    # -- phases --------------------------------------------------------------------------------
    def _register(self) -> None:
        n = self.config.workers
        deadline = time.monotonic() + self.join_timeout
        log.info("waiting for %d workers on %s", n, self.endpoint)
        while len(self.ready) < n:
            if time.monotonic() > deadline:
                raise RunFailed(f"only {len(self.ready)} of {n} workers joined within {self.join_timeout:g} s")
            got = self._receive(min(self.heartbeat, 0.5))
            if got is None or got[1] is None:
                continue
            identity, msg, frames = got
            kind, header = msg.kind, msg.header
            if kind == b"HELLO" and identity not in self.rank_of and len(self.ident) < n:
                self._handle_hello(identity, header, frames)
            elif kind == b"READY" and identity in self.rank_of:
                rank = self.rank_of[identity]
                if header.get("dim") != self.setup.dim:
                    self._refuse(identity, f"dimension mismatch: worker has d={header.get('dim')}, server d={self.setup.dim}")
                    raise RunFailed(f"worker {rank} reports dimension {header.get('dim')}, the server has {self.setup.dim}")
                self.ready.add(rank)
            elif kind == b"STATS" and identity in self.rank_of and self.core is not None:
                self.core.stats(self.rank_of[identity], 0, msg)
            elif kind == b"UP" and identity in self.rank_of and msg.is_round(b"UP", 0):
                self.early_ups[self.rank_of[identity]] = msg
            else:
                self._handle_common(identity, kind, header)
        log.info("all %d workers ready; running %d rounds", n, self.config.rounds)

    def _round_deadline(self) -> float:
        """``--round-timeout``, else ten times the liveness timeout or the slowest round so far,
        whichever is longer (a worker may be busy past ``timeout`` while its heartbeats say it is
        alive); before any round has been seen, none (liveness alone decides)."""
        if self.round_timeout is not None:
            return self.round_timeout
        if self.slowest_round == 0.0:
            return math.inf
        return 10.0 * max(self.timeout, self.slowest_round)

    def _collect(self, t: int) -> list[protocol.Envelope]:
        ups: list[protocol.Envelope | None] = [None] * self.config.workers
        for rank, msg in self.early_ups.items():
            ups[rank] = msg
        self.early_ups = {}
        missing = sum(u is None for u in ups)
        began, deadline = time.monotonic(), self._round_deadline()
        while missing:
            waited = time.monotonic() - began
            if waited > deadline:
                late = ", ".join(str(r) for r, u in enumerate(ups) if u is None)
                raise RunFailed(f"worker(s) {late} sent no uplink for round {t} within {deadline:g} s "
                                f"(round timeout); stopping the run")
            got = self._receive(max(0.01, min(self.heartbeat, 0.5, deadline - waited)))
            if got is None or got[1] is None:
                continue
            identity, msg, _ = got
            if msg.kind in (b"UP", b"STATS") and identity in self.rank_of:
                rank = self.rank_of[identity]
                if not msg.is_round(msg.kind, t) or (msg.kind == b"UP" and ups[rank] is not None):
                    # a link's two ends must see the same messages: one cannot be skipped
                    raise RunFailed(f"worker {rank} sent {msg.kind.decode()} for round {msg.round_text} during round {t}; stopping the run")
                if msg.kind == b"STATS":
                    self.core.stats(rank, t, msg)
                    continue
                ups[rank] = msg
                missing -= 1
            else:
                self._handle_common(identity, msg.kind, msg.header)
        self.slowest_round = max(self.slowest_round, time.monotonic() - began)
        return ups

    def _await_goodbyes(self) -> None:
        """After the last round: wait until every worker confirms the end (its BYE), at most
        ``timeout`` seconds. The last DOWN and the STOP may still be queued here (on a slow link a
        large DOWN takes seconds), and closing the socket under them would lose them."""
        waiting = set(self.ident)
        deadline = time.monotonic() + self.timeout
        while waiting and time.monotonic() < deadline:
            if not self.sock.poll(100):
                continue
            identity, *frames = self.sock.recv_multipart(copy=False)
            rank = self.rank_of.get(identity.bytes)
            if rank is None or not self._owns(identity.bytes, rank, self.transport.peer_of(frames[0])):
                continue
            try:
                if protocol.parse(frames).kind == b"BYE":
                    waiting.discard(rank)
            except protocol.ProtocolError:
                continue
        if waiting:
            log.warning("worker(s) %s did not confirm the end of the run within %g s", ", ".join(map(str, sorted(waiting))), self.timeout)

    def run(self) -> int:
        metrics = MetricsWriter(self.metrics_path)
        core = self.core = ServerCore(self.setup, metrics)
        try:
            self._register()
            core.begin(engine="procs", endpoint=self.endpoint)
            with progress_bar(self.config.rounds, self.progress) as bar:
                for t in range(self.config.rounds):
                    downs = core.round(t, self._collect(t))
                    for rank, frames in enumerate(downs):
                        self._send(self.ident[rank], frames, must=True)
                    bar.update(core.last)
            core.end(engine="procs", ok=True)
            self._stop_all(True, "done")
            self._await_goodbyes()
            return 0
        except RunFailed as exc:
            log.error("%s", exc)
            metrics.end(ok=False, error=str(exc))
            self._stop_all(False, str(exc))
            return 1
        except Terminated as exc:  # SIGINT or SIGTERM: say why, stop the workers, exit 130 / 143
            log.error("%s; stopping the run", exc)
            metrics.end(ok=False, error=str(exc), signal=exc.name)
            self._stop_all(False, str(exc))
            raise
        except BaseException as exc:  # a bug: the workers must not wait for a dead server
            metrics.end(ok=False, error=f"{exc.__class__.__name__}: {exc}")
            self._stop_all(False, f"server error: {exc.__class__.__name__}: {exc}")
            raise
        finally:
            metrics.close()
            self.transport.close()
