"""Where a round's time goes, message by message: a ``psc launch`` run traced at its sockets.

    python benchmarks/timeline.py [--dims 1e6] [--workers 2] [--methods dense sign topk]
                                  [--rounds 60] [--device cpu] [--show-round K]

``benchmarks/overhead.py`` splits a round into the parts the metrics time (gradient, compress +
encode, the server's critical path) and a "rest". This script splits the rest. Every process of the
run (the server, in the launching process, and each worker) notes when each UP and DOWN message
enters and leaves its ZeroMQ calls, on ``CLOCK_MONOTONIC``, which the processes of one host share.
That needs no change to psc: a ``sitecustomize`` module, written into a temporary folder put first on
the run's ``PYTHONPATH``, wraps ``zmq.Socket.send_multipart`` and ``recv_multipart`` in every process
of the run (control messages are not noted; each wrapped call costs about a microsecond more).

A round t on the critical path, from the server's first DOWN send of round t-1 to its first DOWN
send of round t, ends with the worker whose UP the server received last:

``down``    the server's DOWN send call begins -> that worker's receive call returns (transfer, and
            the receiver being busy with something else, its last round's deferred work included);
``worker``  -> the worker's UP send call begins (decode, apply the downlink, the gradient, the next
            uplink and its encoding, its STATS);
``up``      -> the server's receive call for it returns (transfer, and the server busy with other
            messages: the STATS before it, the other workers' uplinks, whose decode runs as each
            arrives);
``server``  -> the server's next DOWN send call begins (the last uplink's decode, the rule, the
            encodes: ``server_s``).

The four add up to the round. ``down first`` and ``down last`` are when the first and the last
worker had its DOWN (after the send began): n downlinks leave one after another. ``plain`` is the
round of ``benchmarks/overhead.py``'s plain pyzmq script moving the run's median UP and DOWN sizes
with no computation, run right after. Medians over rounds 2..R-1, in milliseconds. ``--show-round
K`` also prints round K's events in order. Only for runs on one host (the clocks of two hosts are
not comparable).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections import defaultdict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from overhead import METHODS, launch_command, plain_round_s  # noqa: E402
from runtime.allocator import keep_freed_memory  # noqa: E402
from runtime.metrics import read_metrics  # noqa: E402

# Written as sitecustomize.py into the folder first on the run's PYTHONPATH. A lean UP/DOWN head frame
# starts with a flags byte: form (bits 7-6, nonzero), direction (bit 5: 0 up, 1 down), bit 4 zero
# (common.wire.stream); a control message starts with b"PSC", whose "P" has bit 4 set.
TRACER = r'''
import atexit, os, time
_folder = os.environ.get("PSC_TIMELINE_DIR")
if _folder:
    import zmq
    _events, _pid, _mono = [], os.getpid(), time.monotonic
    _send, _recv = zmq.Socket.send_multipart, zmq.Socket.recv_multipart

    def _lean(frames, router):
        """(peer identity or b"", direction, bytes) of a lean message, else None."""
        head = frames[1] if router else frames[0]
        first = memoryview(head)[0] if len(head) else 0
        if first >> 6 == 0 or first & 0x10:
            return None
        return (bytes(frames[0]) if router else b""), (first >> 5) & 1, sum(len(f) for f in frames[1 if router else 0:])

    def _traced(call, op):
        def traced(self, *args, **kwargs):
            began = _mono()
            out = call(self, *args, **kwargs)
            router = self.type == zmq.ROUTER
            lean = _lean(args[0] if op == "send" else out, router)
            if lean is not None:
                me = b"" if router else self.getsockopt(zmq.ROUTING_ID)
                _events.append((began, _mono(), op, lean[1], lean[0].hex() or me.hex(), lean[2]))
            return out
        return traced

    zmq.Socket.send_multipart, zmq.Socket.recv_multipart = _traced(_send, "send"), _traced(_recv, "recv")

    @atexit.register
    def _write():
        import json
        with open(os.path.join(_folder, f"{_pid}.json"), "w") as fh:
            json.dump(_events, fh)
'''

UP, DOWN = 0, 1
PARTS = ("round", "down", "worker", "up", "server", "down first", "down last")


def message_sizes(records: list[dict]) -> tuple[int, int]:
    """The median UP and DOWN bytes of a run's rounds (its metrics lines)."""
    rounds = [r for r in records if r.get("event") == "round"][1:]
    return (int(statistics.median(b for r in rounds for b in r["bytes_up"])),
            int(statistics.median(b for r in rounds for b in r["bytes_down"])))


def traced_run(method: str, d: int, workers: int, rounds: int, device: str, folder: str) -> tuple[list[dict], dict[str, list]]:
    """Run ``psc launch`` with every process traced: the run's metrics records, and the events of
    each process, by pid."""
    tracer_dir = os.path.join(folder, "tracer")
    events_dir = os.path.join(folder, "events")
    os.makedirs(tracer_dir)
    os.makedirs(events_dir)
    with open(os.path.join(tracer_dir, "sitecustomize.py"), "w") as fh:
        fh.write(TRACER)
    env = dict(os.environ, PSC_TIMELINE_DIR=events_dir,
               PYTHONPATH=os.pathsep.join([tracer_dir, ROOT, *filter(None, [os.environ.get("PYTHONPATH")])]))
    metrics = os.path.join(folder, "run.jsonl")
    subprocess.run(launch_command(method, d, workers, rounds, metrics, device), check=True, env=env, cwd=ROOT)
    traces = {}
    for path in glob.glob(os.path.join(events_dir, "*.json")):
        with open(path) as fh:
            traces[os.path.basename(path)[:-5]] = json.load(fh)
    return read_metrics(metrics), traces


def rounds_of(traces: dict[str, list], workers: int):
    """Per worker identity, the times of its messages by round: the server's DOWN send begins and
    UP receive returns, the worker's DOWN receive returns and UP send begins (the k-th message of
    a kind on a link is round k: no run here restarts)."""
    server = [pid for pid, ev in traces.items() if any(e[2] == "send" and e[3] == DOWN for e in ev)]
    if len(server) != 1:
        raise SystemExit(f"expected one process sending DOWNs, found {len(server)}")
    s = defaultdict(lambda: defaultdict(list))  # identity -> what -> times by round
    w = defaultdict(lambda: defaultdict(list))
    for pid, events in traces.items():
        target = s if pid == server[0] else w
        for began, ended, op, direction, peer, _ in sorted(events):
            if op == "send":
                target[peer]["down_sent" if direction == DOWN else "up_sent"].append(began)
            else:
                target[peer]["down_got" if direction == DOWN else "up_got"].append(ended)
    if len(w) != workers or set(w) != set(s):
        raise SystemExit(f"traced {len(w)} workers, the server saw {len(s)}: cannot pair them")
    return s, w


def breakdown(s, w, rounds: int) -> dict[str, list[float]]:
    """The parts of each round t = 2..rounds-2 (``PARTS``), in ms."""
    parts = {k: [] for k in PARTS}
    ids = list(w)
    for t in range(2, rounds - 1):
        began = min(s[i]["down_sent"][t - 1] for i in ids)
        last = max(ids, key=lambda i: s[i]["up_got"][t])
        ended = min(s[i]["down_sent"][t] for i in ids)
        got = [w[i]["down_got"][t - 1] for i in ids]
        parts["round"].append(ended - began)
        parts["down"].append(w[last]["down_got"][t - 1] - began)
        parts["worker"].append(w[last]["up_sent"][t] - w[last]["down_got"][t - 1])
        parts["up"].append(s[last]["up_got"][t] - w[last]["up_sent"][t])
        parts["server"].append(ended - s[last]["up_got"][t])
        parts["down first"].append(min(got) - began)
        parts["down last"].append(max(got) - began)
    return {k: [1e3 * v for v in vs] for k, vs in parts.items()}


def show_round(s, w, t: int) -> None:
    """Round t's events in time order, relative to the server's first DOWN send of round t-1."""
    ids = list(w)
    start = min(s[i]["down_sent"][t - 1] for i in ids)
    names = {i: f"worker {k}" for k, i in enumerate(ids)}
    events = []
    for i in ids:
        events += [(s[i]["down_sent"][t - 1], f"server sends DOWN {t - 1} to {names[i]}"),
                   (w[i]["down_got"][t - 1], f"{names[i]} has DOWN {t - 1}"),
                   (w[i]["up_sent"][t], f"{names[i]} sends UP {t}"),
                   (s[i]["up_got"][t], f"server has UP {t} of {names[i]}"),
                   (s[i]["down_sent"][t], f"server sends DOWN {t} to {names[i]}")]
    for at, what in sorted(events):
        print(f"  {1e3 * (at - start):8.3f} ms  {what}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dims", nargs="+", default=["1e6"])
    ap.add_argument("--workers", nargs="+", type=int, default=[2])
    ap.add_argument("--methods", nargs="+", choices=sorted(METHODS), default=["dense"])
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--show-round", type=int, default=None, help="also print this round's events in order")
    args = ap.parse_args()
    if args.rounds < 5:
        ap.error("--rounds must be at least 5")
    keep_freed_memory()  # for the plain script, as overhead.py does: its server is this process
    print("| method | d | n | round | down (to the last worker) | worker | up | server | down first | down last | plain |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for method in args.methods:
        for dim in args.dims:
            d = int(float(dim))
            for n in args.workers:
                with tempfile.TemporaryDirectory() as folder:
                    records, traces = traced_run(method, d, n, args.rounds, args.device, folder)
                s, w = rounds_of(traces, n)
                parts = breakdown(s, w, args.rounds)
                med = {k: statistics.median(v) for k, v in parts.items()}
                plain = 1e3 * plain_round_s(*message_sizes(records), n, args.rounds)
                print(f"| {method} | {d:.0e} | {n} | " + " | ".join(f"{med[k]:.3f}" for k in PARTS) + f" | {plain:.3f} |", flush=True)
                if args.show_round is not None and 2 <= args.show_round < args.rounds - 1:
                    show_round(s, w, args.show_round)


if __name__ == "__main__":
    main()
