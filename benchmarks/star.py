"""A star network on one machine: each host a network namespace, all joined through one router namespace
whose links a user-space relay paces (``benchmarks/relay.py``), for any TCP protocol.

    with Star(hosts=3, mbit=100) as net:          # needs root, iproute2 and iptables
        server = net.popen(0, [python, "-m", "psc", "server", "--bind", "tcp://0.0.0.0:5555", ...])
        worker = net.popen(1, [python, "-m", "psc", "worker", "--connect", f"tcp://{net.address(0)}:5555"])
        ...
    net.relay_stats   # the relay's flows and achieved rate, after the with block

Host k lives in namespace ``psc-h<k>-<tag>`` with one interface ``eth0`` (address 10.<o>.<k+1>.2,
default route through the router's 10.<o>.<k+1>.1). The router forwards between hosts; with ``mbit``
set, an iptables rule in the router redirects every TCP connection that crosses it to the relay,
which forwards it to its original destination at that rate (``mode``: every direction of every
connection has a link of its own, or all share one). ``mbit=None`` leaves forwarding to the kernel:
the unthrottled link. Nothing outside the namespaces changes; ``close`` (or leaving the ``with``
block) removes them, and with them their interfaces and rules.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import uuid

RELAY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "relay.py")
RELAY_PORT = 7000  # inside the router namespace, where nothing else listens


def missing() -> str | None:
    """Why a Star cannot be built here, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "iptables"):
        if shutil.which(tool) is None:
            return f"no `{tool}` command (apt-get install iproute2 iptables)"
    return None


def _run(*args: str) -> None:
    done = subprocess.run(list(args), capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {done.stderr.strip() or done.returncode}")


class Star:
    def __init__(self, hosts: int, mbit: float | None, mode: str = "per-connection", python: str = "python3"):
        why = missing()
        if why:
            raise RuntimeError(why)
        self.hosts, self.mbit, self.mode, self.python = hosts, mbit, mode, python
        tag = uuid.uuid4().hex[:6]
        self.octet = int(tag[:2], 16) % 200 + 20
        self.router = f"psc-r-{tag}"
        self.names = [f"psc-h{k}-{tag}" for k in range(hosts)]
        self._veths = [(f"pr{k}{tag}", f"ph{k}{tag}") for k in range(hosts)]
        self._made: list[str] = []
        self._relay: subprocess.Popen | None = None
        self._stats = os.path.join(tempfile.mkdtemp(prefix="psc-star-"), "relay.json")
        self.relay_stats: dict | None = None

    def address(self, k: int) -> str:
        return f"10.{self.octet}.{k + 1}.2"

    def __enter__(self) -> "Star":
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _build(self) -> None:
        for ns in (self.router, *self.names):
            _run("ip", "netns", "add", ns)
            self._made.append(ns)
            _run("ip", "-n", ns, "link", "set", "lo", "up")
        _run("ip", "netns", "exec", self.router, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        for k, (ns, (r_end, h_end)) in enumerate(zip(self.names, self._veths)):
            _run("ip", "link", "add", r_end, "netns", self.router, "type", "veth", "peer", "name", h_end, "netns", ns)
            _run("ip", "-n", self.router, "addr", "add", f"10.{self.octet}.{k + 1}.1/24", "dev", r_end)
            _run("ip", "-n", self.router, "link", "set", r_end, "up")
            _run("ip", "-n", ns, "link", "set", h_end, "name", "eth0")
            _run("ip", "-n", ns, "addr", "add", f"{self.address(k)}/24", "dev", "eth0")
            _run("ip", "-n", ns, "link", "set", "eth0", "up")
            _run("ip", "-n", ns, "route", "add", "default", "via", f"10.{self.octet}.{k + 1}.1")
        if self.mbit is not None:
            self._relay = subprocess.Popen(
                ["ip", "netns", "exec", self.router, self.python, RELAY, "--transparent", "--mbit", str(self.mbit),
                 "--mode", self.mode, "--port", str(RELAY_PORT), "--stats", self._stats],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            line = self._relay.stdout.readline().strip()  # the relay prints its port once it listens
            if line != str(RELAY_PORT):
                raise RuntimeError(f"the relay did not start: {line!r} {self._relay.stderr.read()[-500:]}")
            _run("ip", "netns", "exec", self.router, "iptables", "-t", "nat", "-A", "PREROUTING", "-p", "tcp",
                 "-j", "REDIRECT", "--to-ports", str(RELAY_PORT))

    def popen(self, k: int, argv: list[str], **kwargs) -> subprocess.Popen:
        """Start ``argv`` on host k (its own network namespace)."""
        return subprocess.Popen(["ip", "netns", "exec", self.names[k], *argv], **kwargs)

    def close(self) -> None:
        if self._relay is not None:
            if self._relay.poll() is None:
                self._relay.send_signal(signal.SIGTERM)
                try:
                    self._relay.wait(10)
                except subprocess.TimeoutExpired:
                    self._relay.kill()
                    self._relay.wait()
            if os.path.exists(self._stats):
                with open(self._stats) as f:
                    self.relay_stats = json.load(f)
            self._relay = None
        for ns in reversed(self._made):  # an interface goes with its namespace, and a veth with its peer
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        self._made.clear()
        shutil.rmtree(os.path.dirname(self._stats), ignore_errors=True)
