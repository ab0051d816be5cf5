"""The d = 1000 quadratics of the MARINA-P paper's F.1 (M3 vs CORE, Fig. 2):

    f_i(x) = 1/2 a_i ||x||^2 + b_i^T x,  i.e. A_i = a_i I with a_i = 1 + xi_i, xi_i ~ N(0, sigma2)

sigma2 = 0.01 read as the variance (std 0.1). b_i is not stated in the paper: we take b_i ~ N(0, bscale^2 I)
(option ``bscale``, default 1), the same choice as its F.3 quadratics. x^0 = 0. Draws come from a
PCG64 keyed by the run seed. A draw with a_i <= 0 is rejected (ValueError: lower sigma2).
Constants from ``quadratic_constants`` applied to the 1x1 matrices [a_i], whose spectral norms
equal those of a_i I_d: L = |mean a|, L_A = sqrt(2) max |a_i - mean a|, L_B = sqrt(2) mean |a_i|,
L_max = max a_i; also L_hat = sqrt(mean a_i^2).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from common.compressors import cpu_kernels
from common.options import Param
from common.oracle import with_gradient
from common.problems.base import Problem, register
from common.problems.quadratic import check_point, quadratic_constants


@register
class IdentityQuadratic(Problem):
    name = "identity-quadratic"
    summary = "f_i = 1/2 (1 + xi_i) ||x||^2 + b_i^T x, xi_i ~ N(0, sigma2), b_i ~ N(0, I) (MARINA-P paper F.1)"
    params = (
        Param("d", int, 1000, lambda v: v >= 1, "a positive integer", "dimension"),
        Param("sigma2", float, 0.01, lambda v: v >= 0, "non-negative", "variance of xi_i"),
        Param("bscale", float, 1.0, lambda v: v >= 0, "non-negative", "standard deviation of b_i's entries"),
    )

    def __init__(self, n_workers, seed, options):
        super().__init__(n_workers, seed, options)
        d, n = self.options["d"], n_workers
        self.dim = d
        rng = np.random.Generator(np.random.PCG64([self.seed, 0xF1]))
        self.a = 1.0 + math.sqrt(self.options["sigma2"]) * rng.standard_normal(n)
        if self.a.min() <= 0:
            raise ValueError("problem identity-quadratic: some a_i = 1 + xi_i <= 0; lower sigma2")
        self.b = self.options["bscale"] * rng.standard_normal((n, d))
        self.a_mean, self.b_mean = float(self.a.mean()), self.b.mean(0)
        self.constants = quadratic_constants([np.array([[a]]) for a in self.a])
        self.constants["L_hat"] = float(np.sqrt(np.mean(self.a**2)))

    def initial_point(self):
        return torch.zeros(self.dim, dtype=torch.float64)

    def oracle(self, worker, device, dtype):
        a = float(self.a[worker])
        b = torch.from_numpy(self.b[worker]).to(device=device, dtype=dtype)

        def gradient(x, step=0):
            """a_i x + b_i. For long CPU vectors one compiled pass, b_i - (-a_i) x (``descend``: the
            same bits as torch's a * x + b, since negating a and the product is exact), which also
            marks the gradient finite, so that sending it reads it no more (d = 1e7: two torch
            passes and the check's third made one)."""
            check_point("identity-quadratic", x, b)
            out = cpu_kernels.descend(b, -a, x)
            return (a * x).add_(b) if out is None else out  # a * x + b without a second temporary

        def grad(x, step=0):
            return 0.5 * a * torch.dot(x, x) + torch.dot(b, x), gradient(x)

        return with_gradient(grad, gradient)

    def evaluate(self, x):
        x = x.detach().to("cpu", torch.float64)
        b = torch.from_numpy(self.b_mean)
        g = self.a_mean * x + b
        return {"loss": float(0.5 * self.a_mean * x @ x + b @ x), "grad_norm_sq": float(g @ g)}
