"""Least squares with heterogeneous per-worker solutions (NEOLITHIC section 3, Fig. 1 left).

f_i(x) = 1/(2M) ||A_i x - b_i||^2, A_i in R^{M x d} with N(0,1) entries, b_i = A_i x_i* + s_i,
x_i* ~ N(0, I_d) per worker, s_i ~ N(0, noise^2) (the paper's "N(0, 0.01)": we read 0.01 as the
variance, noise=0.1). The paper's (1/(2n)) sum_i ||A_i x - b_i||^2 is divided by M here so that the
one-row oracle 0.5 (a^T x - b)^2 is an unbiased estimate of f_i (same minimiser). x^0 ~ x0 * N(0, I_d), keyed by the seed (the paper does not give x^0). Stochastic
oracle: ``batch`` rows drawn uniformly per call (default 1, the paper's), keyed by (seed, step, worker).
"""
from __future__ import annotations

from common.options import Param
from common.problems.base import register
from common.problems.tabular_data import RowProblem, heterogeneous_rows


@register
class LeastSquares(RowProblem):
    name = "least-squares"
    summary = "1/(2M)||A_i x - b_i||^2 with per-worker x_i* (NEOLITHIC sec. 3), one-row stochastic oracle"
    params = (
        Param("d", int, 30, lambda v: v >= 1, "a positive integer", "dimension"),
        Param("m", int, 1000, lambda v: v >= 1, "a positive integer", "rows per worker (M)"),
        Param("noise", float, 0.1, lambda v: v >= 0, "non-negative", "std of the label noise s_i"),
        Param("batch", int, 1, lambda v: v >= 0, "a non-negative integer", "rows per oracle call (0: full local gradient)"),
        Param("x0", float, 1.0, lambda v: v >= 0, "non-negative", "x^0 ~ x0 * N(0, I_d) keyed by the seed (0: x^0 = 0)"),
    )

    def __init__(self, n_workers, seed, options):
        super().__init__(n_workers, seed, options)
        o = self.options
        rng, self.A, x_star = heterogeneous_rows(self.seed, n_workers, o["m"], o["d"], 0x15A)
        self.y = (self.A @ x_star[:, :, None])[:, :, 0] + o["noise"] * rng.standard_normal((n_workers, o["m"]))
        self.finish()

    def loss(self, z, y):
        return 0.5 * (z - y) ** 2

    def dloss(self, z, y):
        return z - y
