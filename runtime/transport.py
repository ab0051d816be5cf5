"""The transport: the one place where ZeroMQ sockets are made and configured, and where liveness lives.

Every socket of a run comes from here: the server's ROUTER (``server_socket``), a worker's main
DEALER (``worker_socket``) and its heartbeat DEALER (``HeartbeatSender``). Socket options that
every socket of a kind needs (linger, IPv6, identities, and later encryption and size limits) are
set here and nowhere else, so a policy is changed in one place.

Liveness (the ZeroMQ guide's heartbeat pattern, as ps-lite puts it in its transport): a worker's
``HeartbeatSender`` thread sends a HEARTBEAT every ``interval`` seconds from its own socket, so that
it is heard while its main thread computes; the server's ``Liveness`` records when each rank was
last heard from and names the ranks silent for longer than the timeout.
"""
from __future__ import annotations

import threading
import time
from typing import Callable

import zmq

# The server's socket outlives its last send by at most this long (queued frames are flushed).
SERVER_LINGER_MS = 500
# A worker's last messages (a BYE after an error) get this long to leave.
WORKER_LINGER_MS = 2000


def context() -> zmq.Context:
    """The process's ZeroMQ context (one per process, shared by all its sockets)."""
    return zmq.Context.instance()


def is_ipv6(endpoint: str) -> bool:
    """``tcp://[::]:5555`` or ``tcp://[2001:db8::1]:5555``: the socket must speak IPv6 (and IPv4)."""
    return "[" in endpoint


def check_endpoint(endpoint: str, bind: bool) -> str:
    """``endpoint`` if ZeroMQ can use it to bind (``bind``) or connect, else ``ValueError`` saying
    why in words: ``tcp://HOST:PORT`` (``tcp://*:PORT`` and port ``*`` only to bind, IPv6 hosts in
    brackets), ``ipc://PATH`` or ``inproc://NAME``."""
    scheme, sep, rest = str(endpoint).partition("://")
    usage = "expected tcp://HOST:PORT" + (" (HOST may be * and PORT * to pick a free one)" if bind else "")
    if not sep:
        raise ValueError(f"{endpoint!r} has no transport: {usage}, e.g. tcp://{endpoint}")
    if scheme in ("ipc", "inproc"):
        if not rest:
            raise ValueError(f"{endpoint!r}: {scheme}:// needs a name")
        return endpoint
    if scheme != "tcp":
        raise ValueError(f"{endpoint!r}: unknown transport {scheme!r}; {usage}")
    host, colon, port = rest.rpartition(":")
    if not colon or not host:
        raise ValueError(f"{endpoint!r}: {usage}")
    if host.startswith("[") != host.endswith("]") or (":" in host and not host.startswith("[")):
        raise ValueError(f"{endpoint!r}: an IPv6 address goes in brackets, e.g. tcp://[::1]:5555")
    if host == "*" and not bind:
        raise ValueError(f"{endpoint!r}: a worker connects to a host name or address, not *")
    if port == "*" and bind:
        return endpoint
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{endpoint!r}: port {port!r} must be a number from 1 to 65535")
    return endpoint


def _socket(kind: int, endpoint: str, linger_ms: int, identity: bytes | None = None) -> zmq.Socket:
    sock = context().socket(kind)
    sock.setsockopt(zmq.LINGER, linger_ms)
    sock.setsockopt(zmq.IPV6, int(is_ipv6(endpoint)))
    if identity is not None:
        sock.setsockopt(zmq.IDENTITY, identity)
    return sock


def server_socket(bind: str) -> tuple[zmq.Socket, str]:
    """The server's ROUTER socket bound to ``bind`` (``tcp://HOST:*`` picks a free port) and the
    endpoint it actually listens on."""
    sock = _socket(zmq.ROUTER, bind, SERVER_LINGER_MS)
    try:
        sock.bind(bind)
    except zmq.ZMQError as exc:
        sock.close(0)
        raise RuntimeError(f"cannot bind {bind}: {exc}") from None
    return sock, sock.getsockopt_string(zmq.LAST_ENDPOINT)


def worker_socket(connect: str, identity: bytes) -> zmq.Socket:
    """A worker's main DEALER socket, connected to the server (ZeroMQ reconnects by itself, so a
    worker started before its server simply waits for it)."""
    sock = _socket(zmq.DEALER, connect, WORKER_LINGER_MS, identity)
    sock.connect(connect)
    return sock


class HeartbeatSender:
    """A thread that sends ``message()`` every ``interval`` seconds from its own DEALER socket, so a
    worker is heard while its main thread is busy. ``start()`` once; ``stop()`` joins it."""

    def __init__(self, connect: str, identity: bytes, interval: float, message: Callable[[], list[bytes]]):
        self.connect, self.identity, self.interval, self.message = connect, identity, interval, message
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="psc-heartbeat")

    def _run(self) -> None:
        sock = _socket(zmq.DEALER, self.connect, 0, self.identity)
        sock.connect(self.connect)
        try:
            while not self._stop.wait(self.interval):
                sock.send_multipart(self.message())
        finally:
            sock.close()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2 * self.interval + 1.0)


class Liveness:
    """When each rank was last heard from; ``silent()`` names the ranks quiet for over ``timeout`` s."""

    def __init__(self, timeout: float):
        self.timeout = timeout
        self.last_seen: dict[int, float] = {}

    def heard(self, rank: int) -> None:
        self.last_seen[rank] = time.monotonic()

    def silent(self) -> list[tuple[int, float]]:
        now = time.monotonic()
        return [(rank, now - seen) for rank, seen in self.last_seen.items() if now - seen > self.timeout]
