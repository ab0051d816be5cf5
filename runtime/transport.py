"""The transport: the one place where ZeroMQ sockets are made and configured, and where liveness lives.

Every socket of a run comes from here: the server's ROUTER (``ServerSocket``), a worker's main
DEALER (``worker_socket``) and its heartbeat DEALER (``HeartbeatSender``). Socket options that
every socket of a kind needs (linger, IPv6, identities, encryption, size limits, disconnect
notification) are set here and nowhere else, so a policy is changed in one place.

Encryption and authentication (CurveZMQ): with ``ServerKeys`` every socket of the run, main and
heartbeat, is encrypted and the server proves its identity; a ZAP handler (pyzmq's authenticator)
admits any worker that holds the server's public key, or, with an allow folder, only workers whose
public keys are in it. A refused peer never reaches the server's loop; each refused key is logged
once. ``psc keygen`` writes key pairs with ``zmq.auth.create_certificates``.

Connections, not routing identities: the ZAP handler runs for every connection (with or without
CURVE) and names it ``KEY#N`` (CURVE: the peer's z85 public key) or ``anonymous#N``, N counting
connections. ZeroMQ attaches that name to every message the connection delivers (``peer_of``), so
the server can bind a rank to the connection that registered it: a later connection that claims
the same routing identity (which travels in plaintext without CURVE) has another name.

Limits: the server's socket drops (disconnects) a peer that sends a frame larger than
``max_frame`` bytes before the frame is read, and queues at most ``RCVHWM`` messages per peer.
With ``ROUTER_MANDATORY`` a send to a peer whose connection has closed fails (``send`` returns
False) instead of vanishing, so a worker that dies is noticed at the server's next heartbeat to it,
not after the liveness timeout. The server never blocks on a peer that does not read.

Liveness (the ZeroMQ guide's heartbeat pattern, as ps-lite puts it in its transport): a worker's
``HeartbeatSender`` thread sends a HEARTBEAT every ``interval`` seconds from its own socket, so that
it is heard while its main thread computes; the server's ``Liveness`` records when each rank was
last heard from and names the ranks silent for longer than the timeout.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Callable

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

log = logging.getLogger("psc.transport")

# The server's socket outlives its last send by at most this long (queued frames are flushed).
SERVER_LINGER_MS = 500
# A worker's last messages (a BYE after an error) get this long to leave.
WORKER_LINGER_MS = 2000
# Messages queued per peer on the server's socket (bounds what one peer can make it hold).
SERVER_RCVHWM = 64
# The ZAP domain of the server's socket (the allowed keys are configured for it).
ZAP_DOMAIN = "psc"
# Refusals remembered to log each peer once; past this many, refusals are only counted.
MAX_REMEMBERED_REFUSALS = 4096


def keygen(directory: str, name: str) -> tuple[str, str]:
    """Write a CURVE key pair ``DIR/NAME.key`` (public) and ``DIR/NAME.key_secret`` (secret, mode
    0600); refuse to overwrite an existing pair. Returns both paths."""
    public, secret = (os.path.join(directory, f"{name}.key{suffix}") for suffix in ("", "_secret"))
    if not name or os.sep in name or name.startswith("."):
        raise ValueError(f"--name {name!r}: a plain file name is needed")
    for path in (public, secret):
        if os.path.exists(path):
            raise ValueError(f"{path} exists; remove it first or choose another --name")
    os.makedirs(directory, exist_ok=True)
    public, secret = zmq.auth.create_certificates(directory, name)
    os.chmod(secret, 0o600)
    return public, secret


def _load(path: str, what: str, secret: bool) -> tuple[bytes, bytes | None]:
    if not os.path.isfile(path):
        raise ValueError(f"{what} {path!r}: no such file")
    try:
        public, secret_key = zmq.auth.load_certificate(path)
    except Exception as exc:  # pyzmq raises ValueError/OSError/KeyError on a bad file
        raise ValueError(f"{what} {path!r}: not a CURVE key file ({exc})") from None
    if secret and secret_key is None:
        raise ValueError(f"{what} {path!r} holds only a public key; give the NAME.key_secret file")
    return public, secret_key


@dataclass(frozen=True)
class ServerKeys:
    """The server's CURVE key pair and, optionally, the folder of allowed workers' public keys."""

    public: bytes
    secret: bytes
    allow_dir: str | None = None

    @classmethod
    def load(cls, secret_file: str, allow_dir: str | None = None) -> "ServerKeys":
        public, secret = _load(secret_file, "--server-key", secret=True)
        if allow_dir is not None:
            if not os.path.isdir(allow_dir):
                raise ValueError(f"--allow {allow_dir!r}: no such folder")
            if not zmq.auth.load_certificates(allow_dir):
                raise ValueError(f"--allow {allow_dir!r} holds no public key (*.key) files")
        return cls(public, secret, allow_dir)


@dataclass(frozen=True)
class WorkerKeys:
    """A worker's CURVE key pair and the server's public key."""

    public: bytes
    secret: bytes
    server_public: bytes

    @classmethod
    def load(cls, key_file: str, server_public_file: str) -> "WorkerKeys":
        public, secret = _load(key_file, "--key", secret=True)
        server_public, _ = _load(server_public_file, "--server-public", secret=False)
        return cls(public, secret, server_public)


def _client_curve(sock: zmq.Socket, keys: WorkerKeys | None) -> None:
    if keys is not None:
        sock.curve_secretkey, sock.curve_publickey, sock.curve_serverkey = keys.secret, keys.public, keys.server_public


class _Gatekeeper(ThreadAuthenticator):
    """The ZAP handler: pyzmq's authenticator, naming each admitted connection uniquely and logging
    each refused key once (not once a packet)."""

    def __init__(self, context: zmq.Context):
        super().__init__(context, log=logging.getLogger("psc.transport.zap"))
        self.refused: set[bytes] = set()
        self.refusals = 0
        self.connections = 0

    def _send_zap_reply(self, request_id, status_code, status_text, user_id="anonymous"):
        if status_code == b"200":
            self.connections += 1
            user_id = f"{user_id}#{self.connections}"
        super()._send_zap_reply(request_id, status_code, status_text, user_id)

    async def _authenticate_curve(self, domain, client_key):
        allowed, reason = await super()._authenticate_curve(domain, client_key)
        if not allowed:
            self.refusals += 1
            if client_key not in self.refused and len(self.refused) < MAX_REMEMBERED_REFUSALS:
                self.refused.add(client_key)
                log.warning("refused a peer whose CURVE key %s is not allowed (%s); logged once per key",
                            z85.encode(client_key).decode()[:12] + "...", reason.decode(errors="replace"))
        return allowed, reason


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


class ServerSocket:
    """The server's ROUTER socket bound to ``bind`` (``tcp://HOST:*`` picks a free port).

    ``endpoint`` is where it actually listens. With ``keys`` it speaks CURVE and runs the ZAP
    handler; ``max_frame`` (bytes) drops peers that send larger frames. ``send`` tells whether the
    peer was still connected."""

    def __init__(self, bind: str, keys: ServerKeys | None = None, max_frame: int | None = None):
        self.keys = keys
        self.sock = _socket(zmq.ROUTER, bind, SERVER_LINGER_MS)
        self.sock.setsockopt(zmq.RCVHWM, SERVER_RCVHWM)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        if max_frame is not None:
            self.sock.setsockopt(zmq.MAXMSGSIZE, int(max_frame))
        self.gatekeeper: _Gatekeeper | None = _Gatekeeper(context())
        self.gatekeeper.start()
        self.sock.zap_domain = ZAP_DOMAIN.encode()  # ZAP for every connection, with or without CURVE
        if keys is not None:
            location = zmq.auth.CURVE_ALLOW_ANY if keys.allow_dir is None else keys.allow_dir
            self.gatekeeper.configure_curve(domain=ZAP_DOMAIN, location=location)
            self.sock.curve_secretkey, self.sock.curve_publickey = keys.secret, keys.public
            self.sock.curve_server = True
        try:
            self.sock.bind(bind)
        except zmq.ZMQError as exc:
            self.close()
            raise RuntimeError(f"cannot bind {bind}: {exc}") from None
        self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)

    def send(self, identity: bytes, frames: list, must: bool = False) -> bool:
        """Send ``frames`` to the peer ``identity`` without ever blocking. False if it has no open
        connection, or, when the message ``must`` arrive, if the peer has stopped reading (its
        queue is full); a message that need not arrive (a refusal, a heartbeat) is then dropped."""
        try:
            self.sock.send_multipart([identity, *frames], flags=zmq.DONTWAIT, copy=False)
            return True
        except zmq.ZMQError as exc:
            if exc.errno == zmq.EHOSTUNREACH:
                return False
            if exc.errno == zmq.EAGAIN:
                return not must
            raise

    @staticmethod
    def peer_of(frame: zmq.Frame) -> str:
        """The name of the connection that delivered ``frame``: ``KEY#N`` or ``anonymous#N``."""
        try:
            return frame.get("User-Id")
        except zmq.ZMQError:
            return ""

    def key_of(self, peer: str) -> str | None:
        """The CURVE public key (z85) in a connection's name; None without CURVE."""
        return peer.rpartition("#")[0] if self.keys is not None else None

    def close(self) -> None:
        self.sock.close()
        if self.gatekeeper is not None:
            self.gatekeeper.stop()
            self.gatekeeper = None


def worker_socket(connect: str, identity: bytes, keys: WorkerKeys | None = None) -> zmq.Socket:
    """A worker's main DEALER socket, connected to the server (ZeroMQ reconnects by itself, so a
    worker started before its server simply waits for it)."""
    sock = _socket(zmq.DEALER, connect, WORKER_LINGER_MS, identity)
    _client_curve(sock, keys)
    sock.connect(connect)
    return sock


class HeartbeatSender:
    """A thread that sends ``message()`` every ``interval`` seconds from its own DEALER socket, so a
    worker is heard while its main thread is busy. ``start()`` once; ``stop()`` joins it."""

    def __init__(self, connect: str, identity: bytes, interval: float, message: Callable[[], list[bytes]],
                 keys: WorkerKeys | None = None):
        self.connect, self.identity, self.interval, self.message, self.keys = connect, identity, interval, message, keys
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="psc-heartbeat")

    def _run(self) -> None:
        sock = _socket(zmq.DEALER, self.connect, 0, self.identity)
        _client_curve(sock, self.keys)
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
