"""The 3-worker counterexamples of Beznosikov, Horvath, Richtarik, Safaryan 2023, section 2
(spec/biased-compression.md 2), where DCGD with a biased compressor fails.

Example 1: d = n = 3, f_i(x) = <a_i, x>^2 + 1/4 ||x||^2 with a_1 = (-3, 2, 2), a_2 = (2, -3, 2),
a_3 = (2, 2, -3), x^0 = (t, t, t). grad f_i(x) = 2 a_i <a_i, x> + x/2, so A_i = 2 a_i a_i^T + I/2.
With Top-1, DCGD gives x^k = (1 + 11 eta/6)^k x^0, while x* = 0.

Example 3: d = 2, n = 3, f_i(x) = <v_i, x> + 1/2 ||x||^2 with v = (1, 4), (-1, -2), (1, -2), x^0 = 0.
sum_i Top-1(v_i) = 0 while sum_i v_i = (1, 0): DCGD + Top-1 stays at x^0 = 0, x* = -(1/3, 0).

Both are quadratics 1/2 x^T A_i x + b_i^T x; constants come from ``quadratic_constants`` (plus
L_hat = sqrt(mean ||A_i||^2)). Everything is deterministic (the seed is unused).
"""
from __future__ import annotations

import numpy as np
import torch

from common.options import Param
from common.problems.base import Problem, register
from common.problems.quadratic import quadratic_constants


class SmallQuadratics(Problem):
    """f_i(x) = 1/2 x^T A_i x + b_i^T x for a fixed list of small dense A_i, b_i (one per worker)."""

    n_fixed = 3

    def setup(self, matrices: list[np.ndarray], vectors: list[np.ndarray], x0: np.ndarray) -> None:
        if self.n_workers != self.n_fixed:
            raise ValueError(f"problem {self.name}: needs exactly {self.n_fixed} workers (got {self.n_workers})")
        self.A = [np.asarray(m, dtype=np.float64) for m in matrices]
        self.b = [np.asarray(v, dtype=np.float64) for v in vectors]
        self.A_mean, self.b_mean = sum(self.A) / len(self.A), sum(self.b) / len(self.b)
        self.x0 = np.asarray(x0, dtype=np.float64)
        self.dim = self.x0.size
        self.constants = quadratic_constants(self.A)
        self.constants["L_hat"] = float(np.sqrt(np.mean([np.linalg.norm(a, 2) ** 2 for a in self.A])))

    def initial_point(self):
        return torch.from_numpy(self.x0.copy())

    def oracle(self, worker, device, dtype):
        A = torch.from_numpy(self.A[worker]).to(device=device, dtype=dtype)
        b = torch.from_numpy(self.b[worker]).to(device=device, dtype=dtype)

        def grad(x, step=0):
            ax = A @ x
            return 0.5 * torch.dot(x, ax) + torch.dot(b, x), ax + b

        return grad

    def evaluate(self, x):
        x = x.detach().to("cpu", torch.float64)
        A, b = torch.from_numpy(self.A_mean), torch.from_numpy(self.b_mean)
        g = A @ x + b
        return {"loss": float(0.5 * x @ A @ x + b @ x), "grad_norm_sq": float(g @ g), "x_norm": float(x.norm())}


@register
class BiasedExample1(SmallQuadratics):
    name = "biased-example1"
    summary = "Beznosikov et al. Example 1: f_i = <a_i, x>^2 + 1/4||x||^2, 3 workers, DCGD + Top-1 diverges"
    params = (Param("t", float, 1.0, None, "", "x^0 = (t, t, t)"),)
    a = np.array([[-3.0, 2.0, 2.0], [2.0, -3.0, 2.0], [2.0, 2.0, -3.0]])

    def __init__(self, n_workers, seed, options):
        super().__init__(n_workers, seed, options)
        t = self.options["t"]
        self.setup([2.0 * np.outer(a, a) + 0.5 * np.eye(3) for a in self.a], [np.zeros(3)] * 3, [t, t, t])


@register
class BiasedExample3(SmallQuadratics):
    name = "biased-example3"
    summary = "Beznosikov et al. Example 3: f_i = <v_i, x> + 1/2||x||^2, 3 workers, DCGD + Top-1 stuck at 0"
    v = np.array([[1.0, 4.0], [-1.0, -2.0], [1.0, -2.0]])

    def __init__(self, n_workers, seed, options):
        super().__init__(n_workers, seed, options)
        self.setup([np.eye(2)] * 3, list(self.v), [0.0, 0.0])
