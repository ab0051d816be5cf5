"""One rank of the baseline users would pick instead of psc: PyTorch DistributedDataParallel over gloo,
optionally with the PowerSGD communication hook, on the same problem as a psc run.

    python benchmarks/ddp_train.py --rank R --world N --master HOST:PORT --problem 'cnn:dataset=digits' \
        --lr 0.1 --steps 600 --eval-every 10 --target 0.9 [--powersgd 2] --out ddp.json

Every rank builds the psc problem (``common.problems``): the same model with the same initial weights,
the same shard of the training set and the same minibatch at each step as psc's worker of that rank
(``NNProblem.batches``). Plain SGD on the averaged gradient, which is psc's ``gd`` rule; weight decay
``wd`` as SGD's. BatchNorm statistics stay on each rank (``broadcast_buffers=False``), as in psc.

Rank 0 evaluates the model on the test set with the problem's own ``evaluate`` after steps 0, E, 2E,
... (the numbering of psc's rounds) and tells the others whether the target accuracy is reached; the
clock stops while it evaluates, so ``time_s`` is training time only: forward, backward, DDP's bucketed
all-reduce overlapped with the backward pass, the optimizer step. Rank 0 writes the evaluations as
JSON to ``--out``. ``benchmarks/slow_link.py`` runs the ranks in network namespaces behind a slow link.

A problem that is not a neural network (``quadratic``, ``logistic``, ...: any psc problem with a
gradient oracle) trains its vector x as one parameter, shaped as a matrix of r rows (r the largest
divisor of d up to sqrt(d)) so that PowerSGD compresses it as it would a layer's weights (where d
has no divisor near sqrt(d), a prime d say, the matrix is thin and PowerSGD's hook sends it
uncompressed, as it does any matrix whose rank-R factors are not smaller): each step computes rank
R's gradient with the problem's own oracle at x and hands it to DDP as x's gradient (``x.backward(g)``,
no extra pass), which averages it over the ranks as it averages a network's. Divergence shows as a
non-finite x at an evaluation, checked on every rank.
Such a problem has no test accuracy: ``--target-metric grad_norm_sq`` stops the run where the
problem's ||grad f(x)||^2 (``evaluate``) falls to ``--target`` or below.

PowerSGD (Vogels et al. 2019, ``torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook``): rank
``--powersgd`` approximations with error feedback and warm start, compressing from step 2 on (torch's
default waits 1,000 steps with plain all-reduce), and with the whole gradient in one bucket (see
``main``: several buckets make gloo's ranks disagree on the order of the hook's collectives).
"""
from __future__ import annotations

import argparse
import copy
import faulthandler
import json
import os
import signal
import sys
import time
import warnings
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common.oracle import gradient_of  # noqa: E402
from common.problems import build_problem  # noqa: E402

TARGETS = {"test_accuracy": 1, "grad_norm_sq": -1}  # a metric a run can stop at: 1 rises to it, -1 falls to it


def reached_target(metrics: dict, metric: str, target: float | None) -> bool:
    """Whether an evaluation's ``metric`` reached ``target`` (at least it for an accuracy, at most it
    for a gradient norm); shared with ``slow_link.py``, which reads psc's metrics the same way."""
    value = metrics.get(metric)
    if target is None or value is None:
        return False
    return value >= target if TARGETS[metric] > 0 else value <= target


class VectorModel(torch.nn.Module):
    """A problem's vector x as one parameter of shape (r, d / r) (r: see the module docstring)."""

    def __init__(self, x0: torch.Tensor):
        super().__init__()
        d = x0.numel()
        rows = max(r for r in range(1, int(d**0.5) + 1) if d % r == 0)
        self.x = torch.nn.Parameter(x0.detach().to(torch.float32).reshape(rows, d // rows).clone())

    def forward(self) -> torch.Tensor:
        return self.x.reshape(-1)


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world", type=int, required=True)
    parser.add_argument("--master", required=True, help="HOST:PORT of rank 0's rendezvous store")
    parser.add_argument("--problem", default="cnn:dataset=digits")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--target", type=float, default=None, help="stop where --target-metric reaches this")
    parser.add_argument("--target-metric", choices=sorted(TARGETS), default="test_accuracy",
                        help="test_accuracy (at least --target) or grad_norm_sq (at most --target)")
    parser.add_argument("--powersgd", type=int, default=0, help="PowerSGD rank (0: plain all-reduce)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds any collective may take")
    parser.add_argument("--out", help="rank 0: write the evaluations here (JSON)")
    return parser.parse_args()


def main() -> None:
    args = parse()
    faulthandler.register(signal.SIGUSR1)  # kill -USR1 PID prints where every thread is (a hung collective)
    torch.set_num_threads(args.threads)
    problem = build_problem(args.problem, args.world, args.seed)
    network = hasattr(problem, "model")
    if network and (not getattr(problem, "classifier", False) or not hasattr(problem, "batches")):
        raise SystemExit(f"ddp_train: {args.problem}: a neural network must be a classifier (cnn, mlp, resnet20, ...)")
    dist.init_process_group("gloo", init_method=f"tcp://{args.master}", rank=args.rank, world_size=args.world,
                            timeout=timedelta(seconds=args.timeout))
    model = copy.deepcopy(problem.model).float().train() if network else VectorModel(problem.initial_point())
    # PowerSGD: one bucket. Its hook chains each bucket's collectives through futures that gloo runs on
    # its own threads, so with several buckets the ranks issue them in different orders (seen here: a
    # hang, or "Received data size doesn't match expected size" from gloo).
    one_bucket_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20 + 1
    with warnings.catch_warnings():  # its successor still syncs buffers at start; these must stay rank-local
        warnings.filterwarnings("ignore", message=".*broadcast_buffers.*")
        ddp = DistributedDataParallel(model, broadcast_buffers=False,
                                      bucket_cap_mb=one_bucket_mb if args.powersgd else None)
    if args.powersgd:
        from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as powersgd

        state = powersgd.PowerSGDState(process_group=None, matrix_approximation_rank=args.powersgd,
                                       start_powerSGD_iter=2, use_error_feedback=True, warm_start=True,
                                       random_seed=args.seed)
        ddp.register_comm_hook(state, powersgd.powerSGD_hook)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=args.lr, weight_decay=problem.options.get("wd", 0.0))
    if network:
        batch_of, transform = problem.batches(args.rank, "cpu"), problem.transform()

        def backward(t: int) -> torch.Tensor | None:
            """Step t's forward and backward (DDP all-reduces the gradient buckets as backward produces
            them); the minibatch loss."""
            inputs, targets = batch_of(t)
            loss = F.cross_entropy(ddp(transform.apply(inputs, torch.float32)), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            return loss
    else:
        oracle = problem.oracle(args.rank, "cpu", torch.float32)

        def backward(t: int) -> torch.Tensor | None:
            x = ddp()
            optimizer.zero_grad(set_to_none=True)
            x.backward(gradient_of(oracle, x.detach(), t))  # x's gradient: the oracle's, which DDP averages
            return None

    dist.barrier()  # every rank built its model: the clock starts together
    evaluations, train_s = [], 0.0
    for t in range(args.steps):
        began = time.perf_counter()
        loss = backward(t)
        optimizer.step()
        if loss is not None and not torch.isfinite(loss):
            raise SystemExit(f"ddp_train: the loss is {float(loss)} at step {t}: the run diverged (try a smaller --lr)")
        train_s += time.perf_counter() - began
        if t % args.eval_every == 0 or t == args.steps - 1:
            if not network and not bool(torch.isfinite(model.x).all()):  # the same x on every rank
                raise SystemExit(f"ddp_train: x is not finite at step {t}: the run diverged (try a smaller --lr)")
            reached = torch.zeros(1)
            if args.rank == 0:
                vector = torch.nn.utils.parameters_to_vector(model.parameters()).detach().double()
                metrics = problem.evaluate(vector)
                train = {"train_loss": float(loss.detach())} if network else {}
                evaluations.append({"round": t, "time_s": train_s, **train, **metrics})
                reached[0] = reached_target(metrics, args.target_metric, args.target)
            began = time.perf_counter()
            dist.broadcast(reached, 0)  # the others wait here while rank 0 evaluates
            if args.rank == 0:
                train_s += time.perf_counter() - began
            if reached[0]:
                break
    if args.rank == 0 and args.out:
        with open(args.out, "w") as f:
            json.dump({"problem": args.problem, "lr": args.lr, "powersgd": args.powersgd, "world": args.world,
                       "dim": sum(p.numel() for p in model.parameters()), "evaluations": evaluations}, f)
    # every rank waits for rank 0's file before any tears the group down: a rank that destroyed its
    # group while rank 0 still wrote has ended in gloo's teardown ("terminate called without an
    # active exception", SIGABRT) in some runs
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
