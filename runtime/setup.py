"""Everything one side of a run derives from its ``RunConfig``: the problem, the algorithm, the rules'
context (with the step size resolved) and x^0. The server and every worker build it the same way."""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from common.algorithms import Algorithm, RuleContext, ServerRule, WorkerRule, build_algorithm  # noqa: F401
from common.algorithms import row_order
from common.algorithms.memory import shift_by_mean
from common.compressors import build as build_compressor, cpu_kernels, uses_compiled_kernels
from common.compressors.message import Message
from common.compressors.payloads import add_dense
from common.config import RunConfig
from common.problems import Problem, build_problem
from common.wire import decode, encode


@dataclass
class RunSetup:
    config: RunConfig
    algorithm: Algorithm
    problem: Problem
    ctx: RuleContext
    x0: torch.Tensor

    @classmethod
    def build(cls, config: RunConfig) -> "RunSetup":
        algorithm = build_algorithm(config.algorithm)
        problem = build_problem(config.problem, config.workers, config.seed)
        ctx = algorithm.context(config, problem.dim, problem.constants)
        setup = cls(config, algorithm, problem, ctx, problem.initial_point())
        setup.warm_kernels()
        return setup

    def warm_kernels(self) -> None:
        """Load the compiled CPU kernels this run's compressors use (Numba's disk cache, or a compile)
        now, before the server's clock starts: at first use they cost 0.5-2 s in each process, which
        fell into round 0. One throwaway compress, encode, decode and decompress of a vector of the
        run's size on the CPU, a compress of its difference with that payload (a Markov message,
        whose fused passes have kernels or signatures of their own), and that payload added to a vector twice (a Markov shift and a running
        mean, ``add_dense``), loads the kernels and signatures the run will call, and none where the
        run calls none (small vectors take the torch paths: Numba is not even imported); for scaled
        signs and sparse payloads also the server's shift by the mean of n of them
        (``memory.shift_by_mean``). A rule
        without a shift loads the addition's kernel for nothing (from Numba's disk cache after the
        first run). At ``MIN_COMPILED`` coordinates and more, the step's kernels (``cpu_kernels.descend``,
        ``mean_descend``) load on a few coordinates, whatever the compressors, and for 5 to 17
        workers the order of the server's mean is found (``row_order.group``, 21-24 ms on an idle host)."""
        if self.dim >= cpu_kernels.MIN_COMPILED:  # the mean and step (x - lr g from MIN_CHUNK) run compiled
            cpu_kernels.warm_descent(self.config.torch_dtype, self.config.workers)
        if self.config.workers in row_order.ORDERED_ROWS and self.dim >= row_order.MIN_ORDERED:
            row_order.group(self.config.torch_dtype)  # the order of the server's mean, found once (row_order)
        specs = [s for s in dict.fromkeys((self.ctx.uplink_spec, self.ctx.downlink_spec)) if uses_compiled_kernels(s)]
        if not specs:  # a dense run: no throwaway vector of the run's size either
            return
        x = torch.randn(self.dim, generator=torch.Generator().manual_seed(0), dtype=self.config.torch_dtype)
        for spec in specs:
            c = build_compressor(spec, self.dim, self.config.workers, self.config.seed, purpose="warm-up")
            payload = decode(encode(c.compress(x, worker=0, step=0)))
            if self.config.workers > 2:  # a server's compress of another worker's block (Perm-K, above 6 workers: every block at once)
                c.compress(x, worker=1, step=0)
            c.compress_difference(x, c.decompress(payload), worker=0, step=0)  # and a Markov message's own passes
            add_dense(add_dense(x, payload), payload, inplace=True)  # a Markov shift, a running mean
            shift_by_mean(x, [Message({"c": payload})] * self.config.workers, "c")  # a server's, in one pass

    @property
    def dim(self) -> int:
        return self.problem.dim

    def server_rule(self) -> ServerRule:
        return self.algorithm.server_rule(self.ctx, self.x0)

    def worker_rule(self, rank: int, device: torch.device) -> WorkerRule:
        oracle = self.problem.oracle(rank, device, self.config.torch_dtype)
        ctx = replace(self.ctx, device=device)
        return self.algorithm.worker_rule(ctx, rank, oracle, self.x0)
