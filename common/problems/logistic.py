"""Logistic regression with heterogeneous per-worker solutions (NEOLITHIC section 3, Fig. 1 right).

f_i(x) = (1/M) sum_m ln(1 + exp(-y_{i,m} h_{i,m}^T x)), h ~ N(0, I_d), per-worker x_i* ~ N(0, I_d),
P(y = +1) = 1/(1 + exp(-h^T x_i*)) (the paper's formula is circular; this is its evident intent),
y in {-1, +1}. The starting point is x0 * N(0, I_d) (the paper does not say). One-row stochastic oracle keyed by (seed, step, worker); exact metrics on the server.
"""
from __future__ import annotations

import numpy as np

from common.options import Param
from common.problems.base import register
from common.problems.tabular_data import LogisticLoss, RowProblem, heterogeneous_rows


@register
class Logistic(LogisticLoss, RowProblem):
    name = "logistic"
    summary = "logistic regression with per-worker x_i* (NEOLITHIC sec. 3), one-row stochastic oracle"
    params = (
        Param("d", int, 30, lambda v: v >= 1, "a positive integer", "dimension"),
        Param("m", int, 1000, lambda v: v >= 1, "a positive integer", "samples per worker (M)"),
        Param("batch", int, 1, lambda v: v >= 0, "a non-negative integer", "samples per oracle call (0: full local gradient)"),
        Param("x0", float, 1.0, lambda v: v >= 0, "non-negative", "x^0 ~ x0 * N(0, I_d) keyed by the seed (0: x^0 = 0)"),
    )

    def __init__(self, n_workers, seed, options):
        super().__init__(n_workers, seed, options)
        o = self.options
        rng, self.A, x_star = heterogeneous_rows(self.seed, n_workers, o["m"], o["d"], 0x10A)
        p = 1.0 / (1.0 + np.exp(-(self.A @ x_star[:, :, None])[:, :, 0]))
        self.y = np.where(rng.random(p.shape) < p, 1.0, -1.0)
        self.finish()
