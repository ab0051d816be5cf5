"""Everything one side of a run derives from its ``RunConfig``: the problem, the algorithm, the rules'
context (with the step size resolved) and x^0. The server and every worker build it the same way."""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from common.algorithms import Algorithm, RuleContext, ServerRule, WorkerRule, build_algorithm  # noqa: F401
from common.config import RunConfig
from common.problems import Problem, build_problem


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
        return cls(config, algorithm, problem, ctx, problem.initial_point())

    @property
    def dim(self) -> int:
        return self.problem.dim

    def server_rule(self) -> ServerRule:
        return self.algorithm.server_rule(self.ctx, self.x0)

    def worker_rule(self, rank: int, device: torch.device) -> WorkerRule:
        oracle = self.problem.oracle(rank, device, self.config.torch_dtype)
        ctx = replace(self.ctx, device=device)
        return self.algorithm.worker_rule(ctx, rank, oracle, self.x0)
