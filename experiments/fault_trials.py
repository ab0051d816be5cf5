"""Fault trials: kill -9 a worker (then start it again with its original command) or the server (then
start it again with --resume) at a random round, and check that the run still ends with exit 0 and
the same model as a run that was never interrupted (``model_sha256``, CPU).

    python experiments/fault_trials.py --trials 20                 # every method, both kinds
    python experiments/fault_trials.py --trials 5 --methods ef21 --kinds server

Prints one line per trial and the tally per (method, kind). The reference model comes from the
in-process engine, whose trajectory equals that of the processes on the CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Each method with the compressors the fault-tolerance tests name (rounds long enough to be hit).
METHODS = {
    "ef21": ["--algorithm", "ef21", "--uplink", "topk:ratio=0.1", "--downlink", "topk:ratio=0.2",
             "--problem", "quadratic:d=60,la2=1,lb2=10", "--lr", "0.01", "--rounds", "240"],
    "marina-p": ["--algorithm", "marina-p", "--downlink", "permk", "--problem", "quadratic:d=60,la2=1,lb2=10",
                 "--lr", "0.01", "--rounds", "240"],
    "cd-adam": ["--algorithm", "cd-adam", "--uplink", "sign", "--downlink", "sign",
                "--problem", "quadratic:d=60,la2=1,lb2=10", "--lr", "0.001", "--rounds", "240"],
    "cnn": ["--algorithm", "ef-sgd", "--uplink", "topk:ratio=0.1", "--problem", "cnn:dataset=digits,width=4,batch=16",
            "--lr", "0.05", "--rounds", "60"],
}
WORKERS = 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def psc(args: list[str], log_path: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH", "")) if p),
           "OMP_NUM_THREADS": "1"}
    log = open(log_path, "ab")
    return subprocess.Popen([sys.executable, "-m", "psc", *args], stdout=log, stderr=log, env=env, cwd=ROOT)


def reference_sha(run_args: list[str], seed: int, workers: int = WORKERS) -> str:
    """The model of the uninterrupted run, from the in-process engine (same rules, same wire, and one
    thread, like the processes of a trial)."""
    sys.path.insert(0, ROOT)
    from common.config import RunConfig
    from runtime.engine import run_inproc

    values = dict(zip(run_args[::2], run_args[1::2]))
    config = RunConfig(algorithm=values["--algorithm"], uplink=values.get("--uplink"), downlink=values.get("--downlink"),
                       problem=values["--problem"], workers=workers, rounds=int(values["--rounds"]), lr=values["--lr"],
                       seed=seed)
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the trial's processes (OMP_NUM_THREADS=1): conv sums depend on it
    try:
        return run_inproc(config, progress=False).model_digest()
    finally:
        torch.set_num_threads(threads)


def rounds_written(path: str) -> int:
    try:
        with open(path) as fh:
            return max([json.loads(line).get("round", -1) for line in fh if '"event": "round"' in line] or [-1]) + 1
    except (OSError, ValueError):
        return 0


def wait_round(path: str, r: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if rounds_written(path) >= r:
            return True
        time.sleep(0.02)
    return False


def end_record(path: str) -> dict:
    with open(path) as fh:
        lines = [json.loads(line) for line in fh if line.strip()]
    return lines[-1] if lines and lines[-1].get("event") == "end" else {}


@dataclass
class Trial:
    ok: bool
    kill_round: int
    seconds: float
    why: str = ""


def trial(kind: str, run_args: list[str], seed: int, want_sha: str, rng: random.Random, every: int = 20,
          timeout: float = 120.0, workers: int = WORKERS, keep_log: str | None = None) -> Trial:
    """One trial of ``kind`` (``worker`` or ``server``) in a fresh folder: start a server and
    ``workers`` workers, kill -9 one of them (or the server) once a random round is written, start it
    again with its original command (the server with ``--resume``), and check the outcome. The
    processes' log of a failed trial is copied to ``keep_log``."""
    n = workers
    began = time.monotonic()
    rounds = int(dict(zip(run_args[::2], run_args[1::2]))["--rounds"])
    with tempfile.TemporaryDirectory(prefix="psc-fault-") as folder:
        metrics, ckpt, log_path = (os.path.join(folder, n) for n in ("run.jsonl", "ckpt", "log.txt"))
        endpoint = f"tcp://127.0.0.1:{free_port()}"
        server_args = ["server", "--bind", endpoint, "--workers", str(n), "--seed", str(seed), *run_args,
                       "--metrics", metrics, "--checkpoint", ckpt, "--checkpoint-every", str(every),
                       "--timeout", "20", "--heartbeat", "0.2", "--rejoin-timeout", "120"]
        worker_args = ["worker", "--connect", endpoint, "--device", "cpu", "--timeout", "60", "--heartbeat", "0.2"]
        server = psc(server_args, log_path)
        workers = [psc(worker_args, log_path) for _ in range(n)]
        # a kill must land while the run still goes: polling every 20 ms, a fast run (4 ms a round)
        # is several rounds further when the signal arrives, and a worker restarted after the last
        # round has no run to rejoin (it waits out its --timeout, as it should)
        kill_round = rng.randrange(1, max(2, rounds - 10))
        procs = [server, *workers]

        def failed(why: str) -> Trial:
            text = open(log_path, errors="replace").read()
            if keep_log:
                os.makedirs(os.path.dirname(os.path.abspath(keep_log)), exist_ok=True)
                with open(keep_log, "w") as out:
                    out.write(text)
            return Trial(False, kill_round, time.monotonic() - began, why + "\n" + text[-1500:])

        try:
            if not wait_round(metrics, kill_round, timeout):
                return failed(f"round {kill_round} not reached")
            if kind == "worker":
                victim = rng.randrange(n)
                workers[victim].send_signal(signal.SIGKILL)
                workers[victim].wait()
                workers[victim] = psc(worker_args, log_path)
                procs.append(workers[victim])
            else:
                server.send_signal(signal.SIGKILL)
                server.wait()
                server = psc([*server_args, "--resume", ckpt], log_path)
                procs.append(server)
            try:
                code = server.wait(timeout)
            except subprocess.TimeoutExpired:
                return failed("the server did not finish")
            codes = []
            for w in workers:
                try:
                    codes.append(w.wait(30))
                except subprocess.TimeoutExpired:
                    codes.append(None)
            end = end_record(metrics)
            got_rounds = [json.loads(line)["round"] for line in open(metrics) if '"event": "round"' in line]
            why = []
            if code != 0:
                why.append(f"server exit {code}")
            if any(c != 0 for c in codes):
                why.append(f"worker exits {codes}")
            if end.get("model_sha256") != want_sha:
                why.append("model differs")
            if got_rounds != list(range(rounds)):
                why.append("metrics rounds are not 0..T-1 once each")
            if why:
                return failed("; ".join(why))
            return Trial(True, kill_round, time.monotonic() - began)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--kinds", nargs="+", default=["worker", "server"], choices=["worker", "server"])
    ap.add_argument("--seed", type=int, default=0, help="seed of the trial draws (kill round, victim)")
    ap.add_argument("--logs", default="runs/fault_trials", help="folder for the logs of failed trials")
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    tally = {}
    for method in args.methods:
        run_args = METHODS[method]
        want = reference_sha(run_args, seed=7)
        for kind in args.kinds:
            passed = 0
            for i in range(args.trials):
                result = trial(kind, run_args, 7, want, rng, timeout=300,
                               keep_log=os.path.join(args.logs, f"{method}-{kind}-{i + 1}.log"))
                passed += result.ok
                print(f"{method:9} kill {kind:6} trial {i + 1:2}: round {result.kill_round:3} "
                      f"{'ok' if result.ok else 'FAILED: ' + result.why} ({result.seconds:.1f} s)", flush=True)
            tally[(method, kind)] = passed
    print("\ntally (runs that ended with exit 0 and the uninterrupted run's model_sha256):")
    for (method, kind), passed in tally.items():
        print(f"  {method:9} kill -9 {kind:6}: {passed}/{args.trials}")
    return 0 if all(p == args.trials for p in tally.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
