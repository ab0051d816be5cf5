"""A rate-limited TCP relay in user space: a slow link between workers and a server on one host.

    relay = RateLimitedRelay(target_port=5555, mbit_per_s=100)      # listens on relay.port
    ...                                                             # workers connect to relay.port
    relay.close(); relay.achieved_mbit_per_s()

Every connection accepted on ``relay.port`` is forwarded to ``target_host:target_port``. Each
direction of each connection is paced by a token bucket at ``mbit_per_s`` (``mode="per-connection"``:
every worker has a link of its own), or all connections and directions share one bucket
(``mode="shared"``: one bottleneck, as a server behind a single uplink). Kernel traffic shaping is
not needed, so it runs anywhere. ``achieved_mbit_per_s`` reports the rate the busiest direction
actually reached, to check the link against the configured one (it can only fall below it, on a
machine too busy to keep the relay's threads running). ``flows`` holds the bytes each direction of
each connection moved; with ``record=True``, ``seen`` keeps every byte forwarded (to look for
plaintext on the wire).
"""
from __future__ import annotations

import socket
import threading
import time

CHUNK = 64 * 1024


class TokenBucket:
    """Pacing: ``take(n)`` returns when the n bytes would have finished crossing a link of
    ``bytes_per_s`` that carries everything taken before them."""

    def __init__(self, bytes_per_s: float):
        self.rate = bytes_per_s
        self.lock = threading.Lock()
        self.next_free = time.monotonic()

    def take(self, n: int) -> None:
        with self.lock:
            now = time.monotonic()
            self.next_free = max(self.next_free, now) + n / self.rate
            wait = self.next_free - now
        if wait > 0:
            time.sleep(wait)


class RateLimitedRelay:
    def __init__(self, target_port: int, mbit_per_s: float, target_host: str = "127.0.0.1", mode: str = "per-connection",
                 record: bool = False):
        if mode not in ("per-connection", "shared"):
            raise ValueError(f"mode={mode!r}: per-connection or shared")
        if not mbit_per_s > 0:
            raise ValueError(f"mbit_per_s={mbit_per_s!r} must be positive")
        self.target = (target_host, target_port)
        self.bytes_per_s = mbit_per_s * 1e6 / 8
        self.mode = mode
        self.shared = TokenBucket(self.bytes_per_s)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.lock = threading.Lock()
        self.flows: list[dict] = []  # per direction: bytes moved and the time they took
        self.seen = bytearray() if record else None  # with record=True: every byte forwarded, both ways
        self.closed = False
        threading.Thread(target=self._accept, daemon=True, name="relay-accept").start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target)
            except OSError:  # the server is not listening yet: the client reconnects
                client.close()
                continue
            for sock in (client, upstream):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for src, dst in ((client, upstream), (upstream, client)):
                bucket = self.shared if self.mode == "shared" else TokenBucket(self.bytes_per_s)
                threading.Thread(target=self._pump, args=(src, dst, bucket), daemon=True, name="relay-pump").start()

    def _pump(self, src: socket.socket, dst: socket.socket, bucket: TokenBucket) -> None:
        flow = {"bytes": 0, "busy_s": 0.0}
        with self.lock:
            self.flows.append(flow)
        try:
            while data := src.recv(CHUNK):
                began = time.monotonic()
                bucket.take(len(data))
                dst.sendall(data)
                if self.seen is not None:
                    with self.lock:
                        self.seen += data
                flow["bytes"] += len(data)  # each chunk's bytes over the time it held the link
                flow["busy_s"] += time.monotonic() - began
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def achieved_mbit_per_s(self) -> float | None:
        """Megabits per second of the busiest direction while it was moving data (the time between
        chunks, when the sender had nothing to send, is not counted); None if nothing was moved
        for long enough to tell."""
        with self.lock:
            busy = [f for f in self.flows if f["busy_s"] > 0.5]
        if not busy:
            return None
        best = max(busy, key=lambda f: f["bytes"])
        return best["bytes"] * 8 / 1e6 / best["busy_s"]

    def close(self) -> None:
        self.closed = True
        self.listener.close()
