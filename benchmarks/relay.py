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

``transparent=True`` forwards each connection to the address its client asked for, not to a fixed
target: the relay then runs in the router namespace of ``benchmarks/star.py``, whose iptables rule
redirects every TCP connection crossing the router to the relay's port, and the relay reads the
original destination back with ``SO_ORIGINAL_DST``. Any TCP protocol crosses the slow link that way,
including torch.distributed's gloo, whose peers connect to ports they choose at run time.

As a process (in the router namespace; prints its port, writes its flows as JSON at SIGTERM):

    python benchmarks/relay.py --transparent --mbit 100 [--mode shared] [--port P] --stats FILE
"""
from __future__ import annotations

import argparse
import json
import signal
import socket
import struct
import sys
import threading
import time

CHUNK = 64 * 1024
MEASURED_S = 0.1  # a direction busy this long tells the link's rate (100 Mbit/s: 1.25 MB, 19 chunks)
SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h: the destination a connection had before a REDIRECT


def original_destination(sock: socket.socket) -> tuple[str, int]:
    """(host, port) the client connected to before iptables redirected it here (IPv4)."""
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)  # a struct sockaddr_in
    port, = struct.unpack_from("!H", raw, 2)
    return socket.inet_ntoa(raw[4:8]), port


def _name(sock: socket.socket) -> str:
    try:
        host, port = sock.getpeername()[:2]
        return f"{host}:{port}"
    except OSError:
        return "?"


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
    def __init__(self, target_port: int | None, mbit_per_s: float, target_host: str = "127.0.0.1",
                 mode: str = "per-connection", record: bool = False, transparent: bool = False,
                 listen: tuple[str, int] = ("127.0.0.1", 0)):
        if mode not in ("per-connection", "shared"):
            raise ValueError(f"mode={mode!r}: per-connection or shared")
        if not mbit_per_s > 0:
            raise ValueError(f"mbit_per_s={mbit_per_s!r} must be positive")
        if transparent == (target_port is not None):
            raise ValueError("give a target_port, or transparent=True (each connection's own destination), not both")
        self.target = None if transparent else (target_host, target_port)
        self.bytes_per_s = mbit_per_s * 1e6 / 8
        self.mode = mode
        self.shared = TokenBucket(self.bytes_per_s)
        self.listener = socket.create_server(listen)
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
                upstream = socket.create_connection(self.target or original_destination(client))
            except OSError:  # the server is not listening yet: the client reconnects
                client.close()
                continue
            for sock in (client, upstream):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for src, dst in ((client, upstream), (upstream, client)):
                bucket = self.shared if self.mode == "shared" else TokenBucket(self.bytes_per_s)
                threading.Thread(target=self._pump, args=(src, dst, bucket), daemon=True, name="relay-pump").start()

    def _pump(self, src: socket.socket, dst: socket.socket, bucket: TokenBucket) -> None:
        flow = {"bytes": 0, "busy_s": 0.0, "from": _name(src), "to": _name(dst)}
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
        chunks, when the sender had nothing to send, is not counted); None if no direction was busy
        for ``MEASURED_S``. The bucket lets no burst through (every chunk waits its own bytes' time),
        so a short flow is not measured above the link; the floor leaves out flows of a few chunks,
        where the time of a send says more about the machine than about the link. The relay's own
        time per chunk shows more in a short flow at a high rate: at 1 Gbit/s, 4.6 MB a direction
        (DDP dense on the MLP) read 770-780 Mbit/s and 0.5 MB (PowerSGD) 560-580."""
        with self.lock:
            busy = [f for f in self.flows if f["busy_s"] > MEASURED_S]
        if not busy:
            return None
        best = max(busy, key=lambda f: f["bytes"])
        return best["bytes"] * 8 / 1e6 / best["busy_s"]

    def close(self) -> None:
        self.closed = True
        self.listener.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mbit", type=float, required=True, help="link rate, Mbit/s, each direction (or shared)")
    parser.add_argument("--mode", choices=("per-connection", "shared"), default="per-connection")
    parser.add_argument("--transparent", action="store_true", help="forward to each connection's original destination")
    parser.add_argument("--target", help="HOST:PORT to forward to (without --transparent)")
    parser.add_argument("--port", type=int, default=0, help="port to listen on, all addresses (0: any free one)")
    parser.add_argument("--stats", help="write the flows and the achieved rate here as JSON at SIGTERM")
    args = parser.parse_args()
    if args.transparent == bool(args.target):
        parser.error("give --transparent or --target HOST:PORT")
    host, port = args.target.rsplit(":", 1) if args.target else ("127.0.0.1", None)
    relay = RateLimitedRelay(None if port is None else int(port), args.mbit, host, args.mode,
                             transparent=args.transparent, listen=("0.0.0.0", args.port))
    print(relay.port, flush=True)

    def stop(*_):
        relay.close()
        if args.stats:
            with relay.lock:
                flows = [dict(f) for f in relay.flows]
            with open(args.stats, "w") as f:
                json.dump({"mbit": args.mbit, "mode": args.mode, "achieved_mbit": relay.achieved_mbit_per_s(),
                           "flows": flows}, f)
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while True:
        signal.pause()


if __name__ == "__main__":
    main()
