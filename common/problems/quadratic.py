"""The heterogeneous quadratics of MARINA-P (Gruntkowska et al., section 6 and F.3, Algorithm 3).

f_i(x) = 1/2 x^T A_i x + b_i^T x with A_i = c_i X, X = 1/4 tridiag(-1, 2, -1) (d x d, positive
definite, ||X|| < 1) and b_i ~ N(0, I_d). The c_i = v + xi_i are calibrated to hit the requested
L_A^2 and L_B^2 exactly (Thm 4.9: L_A = sqrt(2) max_i ||A_i - A||, L_B = sqrt(2) mean_i ||A_i||):
xi is a centred normal sample rescaled so that sqrt(2) max|xi_i| ||X|| = L_A, and v = L_B / (sqrt(2)||X||),
which needs v >= max(-xi_i) so that every A_i stays positive semi-definite (else a ValueError).
la2 = 0 gives the homogeneous case (A_i = A, L_A = 0).

A_i are never stored densely: X is applied as a stencil, so n = 1000 workers cost n + d numbers.
Starting point x^0 = 0. ``quadratic_constants`` computes L_A, L_B, L, L_max of any set of dense A_i.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from common.options import Param
from common.oracle import with_gradient
from common.problems.base import Problem, register


def apply_x(x: torch.Tensor) -> torch.Tensor:
    """X x with X = 1/4 tridiag(-1, 2, -1), as a new vector that the caller may change in place."""
    out = 2.0 * x
    out[1:] -= x[:-1]
    out[:-1] -= x[1:]
    return out.mul_(0.25)


def check_point(problem: str, x: torch.Tensor, b: torch.Tensor) -> None:
    """Refuse an x that the loss's dot products with b would refuse (another shape or dtype): a
    gradient-only entry point (``common.oracle``) must refuse what the whole oracle refuses."""
    if x.shape != b.shape or x.dtype != b.dtype:
        raise ValueError(f"{problem}: x of shape {tuple(x.shape)} and {x.dtype}; expected ({b.numel()},) and {b.dtype}")


def x_norm(d: int) -> float:
    """||X||: the largest eigenvalue of 1/4 tridiag(-1, 2, -1), (2 - 2 cos(d pi/(d+1)))/4."""
    return (2.0 - 2.0 * math.cos(d * math.pi / (d + 1))) / 4.0


def quadratic_constants(matrices: list[np.ndarray]) -> dict[str, float]:
    """L_A, L_B (Thm 4.9), L = ||mean A_i|| and L_max = max ||A_i|| (spectral norms) of symmetric A_i."""
    norm = lambda m: float(np.linalg.norm(m, 2))
    mean = sum(matrices) / len(matrices)
    return {
        "L": norm(mean),
        "L_A": math.sqrt(2.0) * max(norm(a - mean) for a in matrices),
        "L_B": math.sqrt(2.0) * sum(norm(a) for a in matrices) / len(matrices),
        "L_max": max(norm(a) for a in matrices),
    }


@register
class Quadratic(Problem):
    name = "quadratic"
    summary = "heterogeneous quadratics 1/2 x^T A_i x + b_i^T x with calibrated L_A, L_B (MARINA-P sec. 6)"
    params = (
        Param("d", int, 300, lambda v: v >= 1, "a positive integer", "dimension"),
        Param("la2", float, 0.0, lambda v: v >= 0, "non-negative", "L_A^2 (0: homogeneous A_i)"),
        Param("lb2", float, 100.0, lambda v: v >= 0, "non-negative", "L_B^2"),
    )

    def __init__(self, n_workers, seed, options):
        super().__init__(n_workers, seed, options)
        d, n = self.options["d"], n_workers
        self.dim = d
        rng = np.random.Generator(np.random.PCG64([self.seed, 0x9A0D]))
        norm_x = x_norm(d)
        l_a, l_b = math.sqrt(self.options["la2"]), math.sqrt(self.options["lb2"])
        xi = rng.standard_normal(n) if n > 1 else np.zeros(1)
        xi -= xi.mean()
        if l_a > 0 and np.abs(xi).max() > 0:
            xi *= l_a / (math.sqrt(2.0) * norm_x * np.abs(xi).max())
        else:
            xi[:] = 0.0
        v = l_b / (math.sqrt(2.0) * norm_x)
        if v + xi.min() < -1e-12:
            raise ValueError(
                f"problem quadratic: la2={self.options['la2']} is too large for lb2={self.options['lb2']} "
                f"with n={n}: some A_i would not be positive semi-definite (raise lb2 or lower la2)"
            )
        self.c = np.maximum(v + xi, 0.0)
        self.b = rng.standard_normal((n, d))
        self.b_mean = self.b.mean(0)
        self.constants = {
            "L": float(self.c.mean()) * norm_x,
            "L_A": math.sqrt(2.0) * float(np.abs(self.c - self.c.mean()).max()) * norm_x,
            "L_B": math.sqrt(2.0) * float(np.abs(self.c).mean()) * norm_x,
            "L_max": float(self.c.max()) * norm_x,
        }

    def initial_point(self):
        return torch.zeros(self.dim, dtype=torch.float64)

    def oracle(self, worker, device, dtype):
        c = float(self.c[worker])
        b = torch.from_numpy(self.b[worker]).to(device=device, dtype=dtype)

        def gradient(x: torch.Tensor, step: int = 0):
            check_point("quadratic", x, b)
            # c X x + b with every operation in place on X x's new vector: the bits of c * (X x) + b,
            # without three more vectors (at d = 1e7 on one thread 39.5-44.1 ms -> 27.2-31.6)
            return apply_x(x).mul_(c).add_(b)

        def grad(x: torch.Tensor, step: int = 0):
            ax = apply_x(x).mul_(c)
            loss = 0.5 * torch.dot(x, ax) + torch.dot(b, x)
            return loss, ax.add_(b)

        return with_gradient(grad, gradient)

    def evaluate(self, x):
        x = x.detach().to("cpu", torch.float64)
        ax = float(self.c.mean()) * apply_x(x)
        g = ax + torch.from_numpy(self.b_mean)
        return {"loss": float(0.5 * torch.dot(x, ax) + torch.dot(torch.from_numpy(self.b_mean), x)), "grad_norm_sq": float(g @ g)}
