"""The step-size schedule of NEOLITHIC and its baselines (Huang, Chen, Yin, Yuan 2022, section 3;
spec/neolithic.md pitfall P5). Defines no Algorithm.

A constant ``--lr``, optionally divided by a factor every ``every`` communication rounds (the paper's
staircase): gamma = lr * decay^floor(comm_rounds / every). Measured in communication rounds, so a
method that communicates R times an iteration (NEOLITHIC's FCC) passes t * R. A rule adds
``SCHEDULE_PARAMS`` to its options and calls ``staircase(ctx, comm_rounds)`` where the paper writes gamma.
"""
from __future__ import annotations

from common.options import Param

SCHEDULE_PARAMS = (
    Param("decay", float, 1.0, lambda v: 0 < v <= 1, "in (0, 1]", "multiply the step size by this every `every` comm rounds"),
    Param("every", int, 0, lambda v: v >= 0, "a non-negative integer", "staircase period in communication rounds (0: constant)"),
)


def staircase(ctx, comm_rounds: int) -> float:
    """gamma after ``comm_rounds`` communication rounds: lr * decay^floor(comm_rounds / every)."""
    every = ctx.options.get("every", 0)
    if not every:
        return ctx.lr
    return ctx.lr * ctx.options["decay"] ** (comm_rounds // every)
