"""A multi-host run on one machine: two network namespaces joined by a veth pair.

The server binds its veth address in one namespace ("host A"); three workers in the other ("host B")
connect to it over the veth link, one by host name (resolved through /etc/netns/NS/hosts, as a
worker resolves a server's name on a real network) and one asking for its rank. The workers start
before the server, so the run also shows that workers wait for a server that is not up yet.

Needs root and iproute2's `ip`; skipped with the reason where namespaces cannot be made. Everything
the test creates (namespaces, the veth pair, /etc/netns/NS) is removed in a finally block.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid

import pytest

from tests.procs import finish, kill_all, records

pytestmark = pytest.mark.procs

PORT = 5555  # free by construction: nothing else lives in a namespace this test creates


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20, check=check)


def start_in(ns: str, args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env = {k: v for k, v in env.items() if not k.startswith("PSC_")}  # the command line says it all
    return subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-m", "psc", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


@pytest.fixture
def two_hosts():
    """(server namespace, worker namespace, server address, server host name); torn down after."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    if shutil.which("ip") is None:
        pytest.skip("no `ip` command (iproute2)")
    tag = uuid.uuid4().hex[:8]
    ns_a, ns_b = f"psc-a-{tag}", f"psc-b-{tag}"
    veth_a, veth_b = f"pa{tag}", f"pb{tag}"  # interface names: at most 15 characters
    octet = int(tag[:2], 16) % 250 + 1  # the addresses exist only inside these namespaces
    addr_a, addr_b = f"10.213.{octet}.1", f"10.213.{octet}.2"
    hosts_dir = f"/etc/netns/{ns_b}"
    etc_netns_existed = os.path.isdir("/etc/netns")
    made: list[str] = []
    try:
        probe = ip("netns", "add", ns_a, check=False)
        if probe.returncode != 0:
            ip("netns", "del", ns_a, check=False)  # a half-made one
            pytest.skip(f"cannot create a network namespace: {probe.stderr.strip()}")
        made.append(ns_a)
        try:
            made.append(ns_b)
            ip("netns", "add", ns_b)
            ip("link", "add", veth_a, "netns", ns_a, "type", "veth", "peer", "name", veth_b, "netns", ns_b)
            for ns, dev, addr in ((ns_a, veth_a, addr_a), (ns_b, veth_b, addr_b)):
                ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
                ip("-n", ns, "link", "set", dev, "up")
                ip("-n", ns, "link", "set", "lo", "up")
        except subprocess.CalledProcessError as exc:
            pytest.skip(f"cannot connect two network namespaces with a veth pair: {' '.join(exc.cmd)}: {exc.stderr.strip()}")
        # `ip netns exec NS` bind-mounts /etc/netns/NS/hosts over /etc/hosts: host B knows host A by name.
        os.makedirs(hosts_dir, exist_ok=True)
        with open(os.path.join(hosts_dir, "hosts"), "w") as fh:
            fh.write(f"127.0.0.1 localhost\n{addr_a} psc-server\n")
        yield ns_a, ns_b, addr_a, "psc-server"
    finally:
        for ns in reversed(made):  # deleting a namespace deletes its end of the veth pair, and so both
            ip("netns", "del", ns, check=False)
        shutil.rmtree(hosts_dir, ignore_errors=True)
        if not etc_netns_existed:
            try:
                os.rmdir("/etc/netns")
            except OSError:
                pass  # not empty: someone else's namespaces use it
        left = ip("netns", "list", check=False).stdout
        assert ns_a not in left and ns_b not in left, f"namespaces left behind: {left}"


def test_server_and_workers_on_two_hosts_over_veth(two_hosts, tmp_path):
    ns_a, ns_b, addr_a, name_a = two_hosts
    # Sanity check of the set-up: host B reaches host A's address through its end of the veth pair.
    route = ip("-n", ns_b, "route", "get", addr_a).stdout
    assert "dev pb" in route, route

    metrics = tmp_path / "run.jsonl"
    liveness = ["--timeout", "30", "--heartbeat", "0.5"]
    workers = [
        start_in(ns_b, ["worker", "--connect", f"tcp://{name_a}:{PORT}", "--device", "cpu", "--join-timeout", "90", *liveness]),
        start_in(ns_b, ["worker", "--connect", f"tcp://{addr_a}:{PORT}", "--device", "cpu", "--join-timeout", "90", *liveness]),
        start_in(ns_b, ["worker", "--connect", f"tcp://{addr_a}:{PORT}", "--device", "cpu", "--rank", "2", "--join-timeout", "90", *liveness]),
    ]
    server = None
    try:
        server = start_in(ns_a, ["server", "--bind", f"tcp://{addr_a}:{PORT}", "--workers", "3", "--rounds", "10",
                                 "--algorithm", "marina-p", "--problem", "quadratic:d=60,la2=1,lb2=100", "--seed", "1",
                                 "--metrics", str(metrics), "--join-timeout", "90", *liveness])
        code, _, err = finish(server, 150)
        assert code == 0, err[-3000:]
        for w in workers:
            wcode, _, werr = finish(w, 30)
            assert wcode == 0, werr[-3000:]
    finally:
        kill_all([p for p in (server, *workers) if p is not None])

    assert "listening on tcp://" + addr_a in err
    for rank in range(3):
        assert f"worker {rank} joined" in err, err[-3000:]
    got = records(str(metrics))
    assert got[0]["event"] == "start" and got[0]["workers"] == 3
    rounds = [r for r in got if r["event"] == "round"]
    assert [r["round"] for r in rounds] == list(range(10))
    assert all(len(r["bytes_up"]) == 3 and min(r["bytes_down"]) > 0 for r in rounds)
    assert got[-1]["event"] == "end" and got[-1]["ok"] is True
