"""Time to accuracy through a slow link: psc (dense and compressed) against PyTorch DDP over gloo (dense and
with the PowerSGD hook), every process on its own emulated host.

    sudo python benchmarks/slow_link.py [--problem 'cnn:dataset=digits,width=64'] [--workers 2]
        [--target 0.9] [--target-metric test_accuracy|grad_norm_sq] [--links 100 1000 0]
        [--mode per-connection|shared] [--only NAME ...] [--json OUT]

Needs root, iproute2 and iptables (``benchmarks/star.py``): every process runs in a network namespace
of its own, joined to the others only through a router namespace, where a user-space relay forwards
every TCP connection at the link rate (``--links`` in Mbit/s; 0: no relay, the kernel forwards at
full speed). psc's server is host 0 and its workers hosts 1..n; DDP's ranks are hosts 1..n. Per
connection (default) every direction of every TCP connection has a link of its own at that rate: each
worker's link to the server, each gloo pair; ``--mode shared`` puts all traffic through one link.

Methods (the same model, initial weights, shards and minibatches for all; each one's default step size,
changed with ``--lr METHOD=LR``: docs/slow-link.md gives the ones tuned for each model):
  psc-dense    psc gd, dense float32 both ways (SGD on the averaged gradient)
  psc-cdadam   psc CD-Adam, scaled sign both ways (AMSGrad-type steps)
  psc-ef21     psc EF21, Top-K both ways (error feedback), SGD steps
  psc-ef21-sign psc EF21, scaled sign both ways from round 0 (d bits + 32 a message), SGD steps
  ddp          DDP over gloo, dense all-reduce (SGD; the same trajectory as psc-dense)
  ddp-powersgd DDP over gloo with the PowerSGD hook (rank 2 or ``--powersgd-rank``, error feedback)
Each run stops at the first evaluation (every ``--eval-every`` rounds) whose test accuracy reaches
``--target``; for a problem without one (``quadratic:d=1000000``, any psc problem that is not a
network) ``--target-metric grad_norm_sq`` stops it where ||grad f(x)||^2 falls to ``--target`` times
its value at x^0 (``ddp_train.py`` trains such a problem's vector as one DDP parameter). Its time is
training time: psc's summed ``round_s`` (the server's clock from the start of round 1 to the end of
the round that reached the target; the evaluation runs after the downlinks are sent), DDP's rank-0
clock with evaluations excluded. Bytes per round and worker: psc's metrics
(the frames handed to the socket); DDP's from the relay's counts.

Break-even: each method's time to the target is modelled as a + b / rate (a: what does not depend on
the link; b: the bytes to the target, serialized as the method sends them), fitted by least squares
to its times at the measured rates (unthrottled: 1 / rate = 0). Below the rate where its line crosses
DDP's dense one (psc's dense one), it reaches the target sooner than DDP (psc dense). With
``--repeats`` every cell runs that many times, interleaved, and the median time is used.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.ddp_train import reached_target  # noqa: E402
from benchmarks.star import Star, missing  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
PORT = 5555
PARTS = ("round_s", "compute_s", "compress_s", "server_s", "comm_s")  # a psc round and its parts (metrics file)


@dataclass(frozen=True)
class Method:
    name: str
    system: str  # psc or ddp
    lr: float
    algorithm: str = "gd"
    uplink: str = "identity"
    downlink: str = "identity"
    powersgd: int = 0


METHODS = [
    Method("psc-dense", "psc", 0.1),
    Method("psc-cdadam", "psc", 0.003, "cd-adam", "sign", "sign"),
    Method("psc-ef21", "psc", 0.1, "ef21", "topk:ratio=0.05", "topk:ratio=0.05"),
    Method("psc-ef21-sign", "psc", 0.1, "ef21:init=compressed", "sign", "sign"),
    Method("ddp", "ddp", 0.1),
    Method("ddp-powersgd", "ddp", 0.1, powersgd=2),
]


def env() -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if not k.startswith("PSC_")}
    out.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", GLOO_SOCKET_IFNAME="eth0")
    return out


def stop(procs: list[subprocess.Popen], grace: float = 10.0) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def read_rounds(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            if line.endswith("\n"):  # a line still being written is read next time
                record = json.loads(line)
                if record.get("event") == "round":
                    out.append(record)
    return out


def run_psc(net: Star, m: Method, args, folder: str) -> dict:
    metrics = os.path.join(folder, f"{m.name}.jsonl")
    server = net.popen(0, [sys.executable, "-m", "psc", "-q", "server", "--bind", f"tcp://0.0.0.0:{PORT}",
                           "--workers", str(args.workers), "--algorithm", m.algorithm, "--uplink", m.uplink,
                           "--downlink", m.downlink, "--problem", args.problem, "--rounds", str(args.rounds),
                           "--lr", str(m.lr), "--seed", str(args.seed), "--eval-every", str(args.eval_every),
                           "--metrics", metrics, "--force", "--timeout", "120"],
                       env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    workers = [net.popen(k, [sys.executable, "-m", "psc", "-q", "worker", "--connect",
                             f"tcp://{net.address(0)}:{PORT}", "--device", "cpu", "--rank", str(k - 1),
                             "--timeout", "120"],
                         env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
               for k in range(1, args.workers + 1)]
    procs = [server, *workers]
    reached = None
    deadline = time.monotonic() + args.max_seconds
    try:
        while reached is None and time.monotonic() < deadline and server.poll() is None:
            time.sleep(0.2)
            reached = next((r for r in read_rounds(metrics) if reached_target(r, args.target_metric, args.threshold)), None)
    finally:
        stop(procs)
    rounds = read_rounds(metrics)
    if reached is None:
        err = server.stderr.read().strip().splitlines()[-1:] if server.stderr else []
        return {"reached": False, "rounds": len(rounds), "why": err}
    upto = [r for r in rounds if r["round"] <= reached["round"]]
    per_round = (reached["cum_bytes_up"] + reached["cum_bytes_down"]) / len(upto) / args.workers
    return {"reached": True, "round": reached["round"], "time_s": sum(r["round_s"] for r in upto),
            "bytes_per_round": per_round, "value": reached[args.target_metric],
            **{part: statistics.median(r[part] for r in upto) for part in PARTS}}


def run_ddp(net: Star, m: Method, args, folder: str) -> dict:
    out = os.path.join(folder, f"{m.name}.json")
    master = f"{net.address(1)}:29500"
    ranks = [net.popen(k, [sys.executable, os.path.join(HERE, "ddp_train.py"), "--rank", str(k - 1), "--world",
                           str(args.workers), "--master", master, "--problem", args.problem, "--lr", str(m.lr),
                           "--seed", str(args.seed), "--steps", str(args.rounds), "--eval-every",
                           str(args.eval_every), "--target", repr(args.threshold), "--target-metric",
                           args.target_metric, "--powersgd", str(m.powersgd),
                           "--timeout", "120", "--out", out],
                       env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for k in range(1, args.workers + 1)]
    try:
        codes = [p.wait(args.max_seconds) for p in ranks]
    except subprocess.TimeoutExpired:
        codes = None
    finally:
        stop(ranks)
    tails = [p.stderr.read().strip().splitlines()[-2:] for p in ranks]
    return ddp_outcome(codes, out, tails, args)


def ddp_outcome(codes: list[int] | None, out: str, tails: list[list[str]], args) -> dict:
    """A DDP run's result from its ranks' exit codes (None: not done in time), rank 0's evaluations
    file and each rank's last lines of error output. Rank 0 writes the file after the last step and
    the last collective every rank took part in, and before the process group's teardown; so a
    rank that fails after the file exists failed in the teardown (gloo has ended a process there
    with "terminate called without an active exception"), and the training time stands. Such a
    result keeps the exit codes and lines under ``teardown``."""
    why = [f"rank {k}: {line}" for k, tail in enumerate(tails) for line in tail]
    if codes is None or not os.path.exists(out):
        return {"reached": False, "why": [f"exit codes {codes}" if codes else f"not done in {args.max_seconds:g} s", *why]}
    with open(out) as f:
        evaluations = json.load(f)["evaluations"]
    reached = next((e for e in evaluations if reached_target(e, args.target_metric, args.threshold)), None)
    if reached is None:
        return {"reached": False, "rounds": evaluations[-1]["round"] + 1, "why": ["the target was not reached"]}
    result = {"reached": True, "round": reached["round"], "time_s": reached["time_s"],
              "value": reached[args.target_metric], "round_s": reached["time_s"] / (reached["round"] + 1)}
    if any(codes):
        result["teardown"] = [f"exit codes {codes}", *why]
    return result


def run(m: Method, mbit: float, args) -> dict:
    hosts = args.workers + 1
    with tempfile.TemporaryDirectory() as folder:
        with Star(hosts, mbit or None, args.mode, python=sys.executable) as net:
            result = (run_psc if m.system == "psc" else run_ddp)(net, m, args, folder)
        stats = net.relay_stats
    if stats:
        result["relay_mbit"] = stats["achieved_mbit"]
        if m.system == "ddp" and result.get("reached"):  # the relay saw the run's bytes, all rounds
            moved = sum(f["bytes"] for f in stats["flows"])
            result["bytes_per_round"] = moved / (result["round"] + 1) / args.workers
    return result


def fmt_rate(mbit: float) -> str:
    return "unthrottled" if not mbit else (f"{mbit / 1000:g} Gbit/s" if mbit >= 1000 else f"{mbit:g} Mbit/s")


def fit(times: dict[float, float]) -> tuple[float, float] | None:
    """(a, b) of time = a + b / rate, least squares over the measured rates (Mbit/s; 0 = unthrottled,
    1 / rate = 0); None with fewer than two rates."""
    if len(times) < 2:
        return None
    xs = [1 / x if x else 0.0 for x in times]
    ys = list(times.values())
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return None
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    return my - b * mx, b


def break_even(times: dict[float, float], ref: dict[float, float]) -> str:
    """Where a method with times ``times`` (by link rate in Mbit/s; 0 = unthrottled) reaches the target
    sooner than ``ref``, from the a + b / rate model of each (``fit``)."""
    mine, theirs = fit(times), fit(ref)
    if mine is None or theirs is None:
        return "n/a"
    (a, b), (ra, rb) = mine, theirs
    if a <= ra and b <= rb:
        return "at every rate"
    if a >= ra and b >= rb:
        return "at no rate"
    return f"below {(rb - b) / (a - ra):.0f} Mbit/s" if a > ra else f"above {(b - rb) / (ra - a):.0f} Mbit/s"


def summary(runs: list[dict]) -> dict | None:
    """The median run (by time) of the repeats that reached the target, the faster of the middle two
    for an even count; None if none reached it."""
    reached = sorted((r for r in runs if r["reached"]), key=lambda r: r["time_s"])
    return reached[(len(reached) - 1) // 2] if reached else None


def target_of(args) -> tuple[float, str]:
    """The threshold that a run's ``--target-metric`` must reach, and how to say it: the accuracy
    itself, or ``--target`` times ||grad f(x^0)||^2 (the problem built here, as every process builds it)."""
    if args.target_metric == "test_accuracy":
        return args.target, f"{args.target} test accuracy"
    from common.problems import build_problem

    problem = build_problem(args.problem, args.workers, args.seed)
    start = problem.evaluate(problem.initial_point()).get("grad_norm_sq")
    if start is None:
        raise SystemExit(f"slow_link: {args.problem} does not report grad_norm_sq; use --target-metric test_accuracy")
    return args.target * start, f"||grad f||^2 <= {args.target:g} x {start:.4g} (its value at x^0)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problem", default="cnn:dataset=digits,width=64")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--target", type=float, default=0.9,
                        help="test accuracy to reach; with --target-metric grad_norm_sq, the fraction of its value at x^0")
    parser.add_argument("--target-metric", choices=("test_accuracy", "grad_norm_sq"), default="test_accuracy")
    parser.add_argument("--links", type=float, nargs="+", default=[100, 1000, 0], help="Mbit/s (0: unthrottled)")
    parser.add_argument("--mode", choices=("per-connection", "shared"), default="per-connection")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each cell, interleaved; the median is reported")
    parser.add_argument("--rounds", type=int, default=1000, help="at most this many rounds a run")
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-seconds", type=float, default=600, help="give up on a run after this long")
    parser.add_argument("--only", nargs="+", choices=[m.name for m in METHODS], help="run these methods only")
    parser.add_argument("--lr", nargs="+", default=[], metavar="METHOD=LR", help="another step size for a method")
    parser.add_argument("--powersgd-rank", type=int, default=2, help="ddp-powersgd's rank (its messages grow with it)")
    parser.add_argument("--json", help="also write every run's result here")
    args = parser.parse_args()
    steps = {m.name: m.lr for m in METHODS}
    for item in args.lr:
        name, _, value = item.partition("=")
        if name not in steps:
            parser.error(f"--lr {item}: the methods are {', '.join(steps)}")
        steps[name] = float(value)
    why = missing()
    if why:
        raise SystemExit(f"slow_link: {why}")
    if args.powersgd_rank < 1:
        parser.error("--powersgd-rank must be at least 1")
    methods = [replace(m, lr=steps[m.name], powersgd=m.powersgd and args.powersgd_rank)
               for m in METHODS if not args.only or m.name in args.only]
    args.threshold, goal = target_of(args)
    runs: dict[str, dict[float, list[dict]]] = {m.name: {x: [] for x in args.links} for m in methods}
    print(f"{args.problem}, n = {args.workers}, target {goal}, links {args.mode}; step sizes "
          + ", ".join(f"{m.name} {m.lr:g}" for m in methods) + f"; PowerSGD rank {args.powersgd_rank}", flush=True)
    for _ in range(args.repeats):
        for mbit in args.links:
            for m in methods:
                began = time.time()
                r = run(m, mbit, args)
                runs[m.name][mbit].append(r)
                print(f"  {fmt_rate(mbit):>12} {m.name:<13} " + (
                    f"round {r['round']:>4}  {r['time_s']:7.2f} s  {r['round_s'] * 1e3:7.1f} ms/round  "
                    f"{r.get('bytes_per_round', float('nan')) / 1e3:8.1f} kB/round/worker  relay "
                    f"{r.get('relay_mbit') or float('nan'):.0f} Mbit/s" if r["reached"] else f"not reached: {r['why']}")
                    + (f"  (then failed in teardown: {r['teardown']})" if r.get("teardown") else "")
                    + f"  [{time.time() - began:.0f} s]", flush=True)
    best = {name: {x: summary(rs) for x, rs in by_rate.items()} for name, by_rate in runs.items()}
    times = {name: {x: r["time_s"] for x, r in by_rate.items() if r} for name, by_rate in best.items()}
    slow = min((x for x in args.links if x), default=None)
    ddp, dense = times.get("ddp", {}), times.get("psc-dense", {})
    print(f"\nTime to {goal} (training seconds, median of {args.repeats}; the round that reached it)")
    print(f"| method | {' | '.join(fmt_rate(x) for x in args.links)} | vs DDP dense at {fmt_rate(slow or 0)} "
          "| sooner than DDP dense | sooner than psc dense |")
    print("|---" * (len(args.links) + 4) + "|")
    for m in methods:
        mine = times[m.name]
        cells = [f"{mine[x]:.2f} s (round {best[m.name][x]['round']})" if x in mine else "not reached" for x in args.links]
        speedup = f"{ddp[slow] / mine[slow]:.2f}x" if slow in ddp and slow in mine else "-"
        print(f"| {m.name} | {' | '.join(cells)} | {speedup} | {break_even(mine, ddp)} | {break_even(mine, dense)} |")
    psc = [(m.name, x, r) for m in methods if m.system == "psc" for x, r in best[m.name].items() if r]
    if psc:
        print("\npsc rounds, medians in ms: the slowest worker's gradient and encode, the server's decode + rule +"
              " encode, the rest (transfer, the worker's decode, waiting)")
        print("| method | link | round | gradient | encode | server | rest |\n|---|---|---|---|---|---|---|")
        for name, x, r in psc:
            print(f"| {name} | {fmt_rate(x)} | " + " | ".join(f"{r[part] * 1e3:.1f}" for part in PARTS) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "runs": {k: {str(x): r for x, r in v.items()} for k, v in runs.items()}},
                      f, indent=1)


if __name__ == "__main__":
    main()
