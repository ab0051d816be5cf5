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

Fault tolerance (with ``checkpoint_dir``, ``runtime.checkpoint``): every ``checkpoint_every`` rounds
the server sends SAVE before the round's DOWNs; each worker uploads its rule state (STATE, before its
next UP) and the server writes one checkpoint of the whole run. A worker that is lost (silent,
its connection closed, a BYE, no uplink in time) no longer stops the run: its rank stays open for
``rejoin_timeout`` seconds, a restarted worker takes it back (HELLO; a HELLO for a rank whose
holder's connection has closed is how a quick restart is noticed), and every worker and the
server roll back to the last checkpoint (RESTORE; round 0 before the first one). ``resume``
starts a new server from the newest complete checkpoint in a folder: the workers that are still
alive re-register (they re-send HELLO while the server is silent), the others are restarted, and
the metrics file is rewound to the checkpoint and appended.

``supervise`` (optional) is called between polls, at least every half second: ``psc launch`` uses
it to raise ``RunFailed`` as soon as one of its worker processes has exited with an error (or, where
workers are restarted, to start it again and return True). A send that finds a connection closed
first gives it up to ``EXIT_REPORT_S`` to see the process's end, so that the error names how the
worker ended (killed by SIGKILL) and not only its closed socket, whichever of the two is seen first.

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
import os
import time
from typing import Callable

import zmq

from common.config import RunConfig
from runtime import checkpoint, protocol, transport
from runtime.metrics import MetricsWriter, Outputs
from runtime.progress import progress_bar
from runtime.server_core import BadUplink, RunFailed, ServerCore
from runtime.setup import RunSetup
from runtime.signals import Terminated, raise_pending

EXIT_REPORT_S = 1.0  # how long a closed connection waits for the supervisor to see its process end
HOUSEKEEPING_S = 0.01  # between two runs of the supervisor's check, the heartbeats and the liveness check

log = logging.getLogger("psc.server")


class WorkerLost(RunFailed):
    """Worker(s) ``ranks`` are gone; with checkpoints the run waits for a replacement and rolls back."""

    def __init__(self, ranks, message: str):
        super().__init__(message)
        self.ranks = sorted(set(ranks))


class Server:
    def __init__(self, config: RunConfig, bind: str, metrics_path: str | None = None, timeout: float = 60.0,
                 heartbeat: float = 1.0, join_timeout: float = 600.0, progress: bool = True,
                 supervise: Callable[[], bool | None] | None = None, keys: transport.ServerKeys | None = None,
                 round_timeout: float | None = None, checkpoint_dir: str | None = None, checkpoint_every: int = 50,
                 resume: str | None = None, rejoin_timeout: float = 120.0, model_out: str | None = None,
                 step_threads: int | None = None):
        self.config, self.bind, self.metrics_path = config, bind, metrics_path
        self.step_threads = step_threads  # the compiled passes' threads while the workers wait (ServerCore)
        self.timeout, self.heartbeat, self.join_timeout, self.progress = timeout, heartbeat, join_timeout, progress
        self.supervise, self.round_timeout = supervise, round_timeout
        self.setup = RunSetup.build(config)  # a bad configuration fails here, before any socket
        # --resume DIR: the newest complete checkpoint, refused here (before any socket) if damaged
        # or of another configuration; checkpoints go on into DIR unless --checkpoint names another.
        self.resumed = checkpoint.latest(resume, config.to_dict(), self.setup.dim) if resume else None
        self.checkpoint_dir, self.checkpoint_every = checkpoint_dir or resume, checkpoint_every
        self.rejoin_timeout, self.model_out = rejoin_timeout, model_out
        self.ckpt: checkpoint.Checkpoint | None = None  # the newest complete checkpoint (round 0: fresh rules)
        self.pending: checkpoint.Checkpoint | None = None  # one waiting for the workers' states
        self.restoring = False  # WELCOME tells a worker to wait for its state (RESTORE)
        self.stashed: list = []  # HELLOs that revealed a lost worker, answered once the run recovers
        # RESTORE and its answer RESTORED carry ``seq``, new for each rollback and random from the start,
        # so that an answer queued for a server that died is not taken for one to this server.
        self.restores = int.from_bytes(os.urandom(4), "little")
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
        self.housekeeping_due = 0.0  # when ``_receive`` next runs the supervisor, heartbeats and liveness
        self.early_ups: dict[int, protocol.Envelope] = {}  # round-0 uplinks of workers ready before the others
        self.core: ServerCore | None = None

    # -- sending -------------------------------------------------------------------------------
    def _send(self, identity: bytes, frames: list[bytes], must: bool = False) -> None:
        """Send to a registered worker; a closed connection (or, for a message that ``must``
        arrive, a worker that stopped reading) makes it lost."""
        if not self.transport.send(identity, frames, must) and identity in self.rank_of:
            rank = self.rank_of[identity]
            self._await_exit_report()
            raise WorkerLost([rank], f"worker {rank}'s connection closed (or it stopped reading)")

    def _await_exit_report(self) -> None:
        """A connection closed: where a supervisor watches the worker processes, let it see the one
        that died (the kernel closes a dying process's sockets just before its exit status can be
        read), for at most ``EXIT_REPORT_S`` seconds. It raises ``RunFailed`` naming the exit, or
        returns True once it has restarted the process."""
        if self.supervise is None:
            return
        deadline = time.monotonic() + EXIT_REPORT_S
        while not self._supervised() and time.monotonic() < deadline:
            time.sleep(0.02)

    def _supervised(self):
        """The supervisor's check, after raising a stop signal whose exception was lost
        (``raise_pending``): the workers that the signal stopped (``psc launch`` forwards it) must
        not be reported as failed first. Seen in the launch supervision test: the SIGTERM's exception
        was lost in a frame's destructor, a send then found a stopped worker's connection closed,
        and the supervisor named its exit 143 before any receive raised the signal, so ``psc
        launch`` exited 1 instead of 143."""
        raise_pending()
        return self.supervise()

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
        liveness, at most every ``HOUSEKEEPING_S`` (not for each of a round's 2n messages: the
        supervisor's check alone is a system call per worker). A stop signal whose exception was lost
        is raised first, before the supervisor reports the workers it stopped as failed."""
        raise_pending()
        now = time.monotonic()
        if now >= self.housekeeping_due:
            self.housekeeping_due = now + HOUSEKEEPING_S
            if self.supervise is not None:
                self._supervised()
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
        self._send(identity, protocol.pack(b"WELCOME", {"rank": rank, "config": self.config.to_dict(), "dim": self.setup.dim,
                                                        "restore": self.restoring}), must=True)

    def _check_liveness(self) -> None:
        for rank, silent in self.liveness.silent():
            raise WorkerLost([rank], f"worker {rank} has been silent for {silent:.1f} s (timeout {self.timeout:g} s)")

    def _gone_holders(self, wanted) -> list[int]:
        """The ranks a HELLO for ``wanted`` (-1: any) could take whose holder's connection has closed
        (a probe heartbeat to it fails)."""
        ranks = [wanted] if wanted in self.ident else list(self.ident) if wanted == -1 else []
        return [r for r in ranks if not self.transport.send(self.ident[r], protocol.pack(b"HEARTBEAT", {}))]

    def _forget(self, rank: int) -> None:
        """Drop everything that binds ``rank`` to its lost worker, so that a new one can take it."""
        identity = self.ident.pop(rank, None)
        if identity is not None:
            self.rank_of.pop(identity, None)
            self.beats_of.pop(identity + b"-hb", None)
            self.conn_of.pop(identity, None)
            self.conn_of.pop(identity + b"-hb", None)
        self.key_of.pop(rank, None)
        self.ready.discard(rank)
        self.liveness.last_seen.pop(rank, None)

    def _handle_common(self, identity: bytes, kind: bytes, header: dict, frames=()) -> None:
        """Messages that mean the same in every phase."""
        if kind == b"HELLO":
            if identity not in self.rank_of and self.checkpoint_dir:
                gone = self._gone_holders(header.get("rank", -1))
                if gone:  # a restarted worker came back before its old connection was noticed closed
                    self.stashed.append((identity, header, frames))
                    raise WorkerLost(gone, f"worker(s) {', '.join(map(str, gone))}: connection closed, a replacement is here")
            if identity not in self.rank_of:
                started = " and the run has started" if len(self.ready) == self.config.workers else ""
                self._refuse(identity, f"server is full: all {self.config.workers} workers are registered{started}")
        elif kind == b"BYE" and identity in self.rank_of:
            rank = self.rank_of[identity]
            raise WorkerLost([rank], f"worker {rank} left: {header.get('reason', 'no reason given')}")

    # -- phases --------------------------------------------------------------------------------
    def _register(self, patience: float, restore: bool = False) -> None:
        """Wait until all n ranks are registered and ready, at most ``patience`` seconds. With
        ``restore`` (a resumed run, or the recovery from a lost worker) WELCOME tells each worker to
        wait for its state, and early uplinks are dropped (the restore decides the round)."""
        n = self.config.workers
        deadline = time.monotonic() + patience
        self.restoring = restore
        log.info("waiting for %d workers on %s", n - len(self.ready), self.endpoint)
        while len(self.ready) < n:
            if time.monotonic() > deadline:
                missing = ", ".join(str(r) for r in range(n) if r not in self.ready)
                if restore:
                    raise RunFailed(f"worker(s) {missing} did not (re)join within {patience:g} s; stopping the run")
                raise RunFailed(f"only {len(self.ready)} of {n} workers joined within {patience:g} s")
            try:
                self._register_one(n, restore)
            except WorkerLost as exc:
                if not self.checkpoint_dir:
                    raise
                log.warning("%s; its rank is open again", exc)
                for rank in exc.ranks:
                    self._forget(rank)
        log.info("all %d workers ready; running %d rounds", n, self.config.rounds)

    def _register_one(self, n: int, restore: bool) -> None:
        """Handle one message (or a stashed HELLO) of the registration phase."""
        if self.stashed:
            identity, header, frames = self.stashed.pop(0)
            if identity not in self.rank_of and len(self.ident) < n:
                self._handle_hello(identity, header, frames)
            return
        got = self._receive(min(self.heartbeat, 0.5))
        if got is None or got[1] is None:
            return
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
        elif kind in (b"UP", b"STATS", b"STATE", b"RESTORED") and identity in self.rank_of and restore:
            return  # from before the restore that is coming
        elif kind in (b"UP", b"STATS") and identity in self.rank_of:
            self._early(self.rank_of[identity], 0, msg)
        else:
            self._handle_common(identity, kind, header, frames)

    def _round_deadline(self) -> float:
        """``--round-timeout``, else ten times the liveness timeout or the slowest round so far,
        whichever is longer (a worker may be busy past ``timeout`` while its heartbeats say it is
        alive); before any round has been seen, none (liveness alone decides)."""
        if self.round_timeout is not None:
            return self.round_timeout
        if self.slowest_round == 0.0:
            return math.inf
        return 10.0 * max(self.timeout, self.slowest_round)

    def _collect(self, t: int) -> None:
        """Wait for round ``t``'s uplinks (and the states a checkpoint asked for); each UP goes to
        ``ServerCore.accept`` the moment it arrives, which keeps it for ``ServerCore.round``."""
        ups: list[protocol.Envelope | None] = [None] * self.config.workers
        early, self.early_ups = self.early_ups, {}
        for rank, msg in early.items():
            self.core.accept(rank, t, msg)
            ups[rank] = msg
        missing = sum(u is None for u in ups)
        states = self.pending.workers if self.pending is not None and self.pending.round == t else None
        if states is not None:
            missing += sum(s is None for s in states)
        began, deadline = time.monotonic(), self._round_deadline()
        while missing:
            waited = time.monotonic() - began
            if waited > deadline:
                late = ", ".join(str(r) for r, u in enumerate(ups) if u is None)
                raise WorkerLost([r for r, u in enumerate(ups) if u is None],
                                 f"worker(s) {late} sent no uplink for round {t} within {deadline:g} s (round timeout)")
            got = self._receive(max(0.01, min(self.heartbeat, 0.5, deadline - waited)))
            if got is None or got[1] is None:
                continue
            identity, msg, frames = got
            if msg.kind == b"STATE" and identity in self.rank_of:
                rank = self.rank_of[identity]
                self.core.control(msg.nbytes)
                if states is not None and msg.header.get("t") == t and states[rank] is None:
                    states[rank] = msg.body
                    missing -= 1
                continue
            if msg.kind in (b"UP", b"STATS") and identity in self.rank_of:
                rank = self.rank_of[identity]
                if not msg.is_round(msg.kind, t) or (msg.kind == b"UP" and ups[rank] is not None):
                    # a link's two ends must see the same messages: one cannot be skipped
                    raise BadUplink(rank, f"worker {rank} sent {msg.kind.decode()} for round {msg.round_text} during round {t}")
                if msg.kind == b"STATS":
                    self.core.stats(rank, t, msg)
                    continue
                self.core.accept(rank, t, msg)  # decoded now, while the others are still on their way
                ups[rank] = msg
                missing -= 1
            else:
                self._handle_common(identity, msg.kind, msg.header, frames)
        self.slowest_round = max(self.slowest_round, time.monotonic() - began)

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

    # -- checkpoints and recovery ----------------------------------------------------------------
    def _ask_states(self, t: int) -> None:
        """Boundary ``t`` is a checkpoint: keep the server's side now, ask every worker for its state
        (SAVE goes before the DOWNs, so each worker uploads it right after applying round t-1)."""
        self.pending = checkpoint.server_snapshot(self.core, t)
        self.pending.workers = [None] * self.config.workers
        for rank in range(self.config.workers):
            frames = protocol.pack(b"SAVE", {"t": t})
            self._count_control(frames)
            self._send(self.ident[rank], frames, must=True)

    def _write_pending(self, t: int) -> None:
        if self.pending is not None and self.pending.round == t:
            path = checkpoint.write(self.checkpoint_dir, self.pending, self.config.to_dict(), self.setup.dim)
            self.ckpt, self.pending = self.pending, None
            log.info("checkpoint of round %d written to %s", t, path)

    def _restore(self, ckpt: checkpoint.Checkpoint, old_records=None) -> int:
        """Roll the server and every worker back to ``ckpt`` (RESTORE carries each worker's state;
        ``fresh``: round 0, the worker rebuilds its rule) and wait until every worker has answered
        RESTORED. Every link starts again from an empty memory on both ends. Returns the round to
        run next."""
        checkpoint.restore_server(self.core, ckpt, old_records)
        self.pending, self.early_ups = None, {}
        self.restores += 1
        for rank in range(self.config.workers):
            frames = protocol.pack(b"RESTORE", {"t": ckpt.round, "fresh": not ckpt.workers, "seq": self.restores},
                                   ckpt.workers[rank] if ckpt.workers else [])
            self._count_control(frames)
            self._send(self.ident[rank], frames, must=True)
        self._await_restored(ckpt.round)
        log.info("rolled back to round %d", ckpt.round)
        return ckpt.round

    def _await_restored(self, t: int) -> None:
        """Wait for every worker's RESTORED (of this rollback: its ``seq``). What a worker sent
        before it belongs to the abandoned rounds and was encoded on the links' old memory, so it
        is dropped unread; what it sends after it (round t's STATS and UP) is kept for round t."""
        waiting = set(range(self.config.workers))
        began, deadline = time.monotonic(), self._round_deadline()
        while waiting:
            if time.monotonic() - began > deadline:
                late = sorted(waiting)
                raise WorkerLost(late, f"worker(s) {', '.join(map(str, late))} did not confirm the rollback to round {t} "
                                       f"within {deadline:g} s (round timeout)")
            got = self._receive(min(self.heartbeat, 0.5))
            if got is None or got[1] is None:
                continue
            identity, msg, frames = got
            rank = self.rank_of.get(identity)
            if rank is not None and msg.kind == b"RESTORED":
                self._count_control(frames)
                if msg.header.get("seq") == self.restores:
                    waiting.discard(rank)
            elif rank is not None and msg.kind in (b"UP", b"STATS", b"STATE"):
                if rank not in waiting:
                    self._early(rank, t, msg)
            else:
                self._handle_common(identity, msg.kind, msg.header, frames)

    def _early(self, rank: int, t: int, msg: protocol.Envelope) -> None:
        """Round ``t``'s STATS or UP from a worker that is ready before the others; an UP or STATS
        of another round stops the run (a link cannot skip a message)."""
        if msg.kind == b"STATE" or not msg.is_round(msg.kind, t) or rank in self.early_ups:
            raise BadUplink(rank, f"worker {rank} sent {msg.kind.decode()} for round {msg.round_text} before round {t} began")
        if msg.kind == b"STATS":
            self.core.stats(rank, t, msg)
        else:
            self.early_ups[rank] = msg

    def _recover(self, lost: WorkerLost) -> int:
        """A worker is gone: keep its rank open for ``rejoin_timeout`` s, then roll everyone back."""
        for rank in lost.ranks:
            self._forget(rank)
        log.warning("%s; waiting up to %g s for a replacement, then rolling back to round %d",
                    lost, self.rejoin_timeout, self.ckpt.round)
        self._register(self.rejoin_timeout, restore=True)
        return self._restore(self.ckpt)

    def _rounds(self, bar) -> None:
        if self.resumed is not None:
            self.ckpt = self.resumed
            t = self._restore(self.resumed, self.old_records)
        else:
            self.core.begin(engine="procs", endpoint=self.endpoint)
            t = 0
            if self.checkpoint_dir:  # round 0: the workers' initial states need not travel
                self.ckpt = checkpoint.server_snapshot(self.core, 0)
                checkpoint.write(self.checkpoint_dir, self.ckpt, self.config.to_dict(), self.setup.dim)
        while t < self.config.rounds:
            try:
                self._collect(t)
                self._write_pending(t)
                downs = self.core.round(t)
                t += 1
                if self.checkpoint_dir and t % self.checkpoint_every == 0 and t < self.config.rounds:
                    self._ask_states(t)
                for rank, frames in enumerate(downs):
                    self._send(self.ident[rank], frames, must=True)
                bar.update(self.core.record())  # evaluates while the workers compute
            except (WorkerLost, BadUplink) as exc:
                if not self.checkpoint_dir:
                    raise
                while True:  # another worker may be lost during the recovery itself
                    try:
                        t = self._recover(self._disconnect(exc) if isinstance(exc, BadUplink) else exc)
                        break
                    except (WorkerLost, BadUplink) as again:
                        exc = again

    def _disconnect(self, bad: BadUplink) -> WorkerLost:
        """A worker that sent a malformed or impossible message is told why (STOP) and counted lost:
        its rank is open to a replacement, and the run rolls back to the last checkpoint."""
        identity = self.ident.get(bad.rank)
        if identity is not None:
            self.transport.send(identity, protocol.pack(b"STOP", {"ok": False, "reason": f"disconnected: {bad}"}))
        return WorkerLost([bad.rank], f"{bad}; worker {bad.rank} is disconnected")

    def run(self) -> int:
        self.old_records = checkpoint.old_metrics(Outputs.metrics_file(self.metrics_path)) if self.resumed is not None else None
        metrics = MetricsWriter(self.metrics_path)
        core = self.core = ServerCore(self.setup, metrics, self.step_threads)
        try:
            self._register(self.join_timeout, restore=self.resumed is not None)
            with progress_bar(self.config.rounds, self.progress) as bar:
                self._rounds(bar)
            if self.model_out:
                checkpoint.save_model(self.model_out, self.setup.problem, core.rule.model)
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
