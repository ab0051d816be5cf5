"""Monte-Carlo estimates of a compressor's moments, with standard errors, for the constants tests."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Moments:
    """Per-sample quantities for C(x) over independent draws (steps 0..N-1) for one worker."""

    x: torch.Tensor
    samples: torch.Tensor  # (N, d) the decompressed outputs

    @property
    def n(self) -> int:
        return self.samples.shape[0]

    def sq_norm(self) -> np.ndarray:
        return (self.samples**2).sum(1).numpy()

    def inner(self) -> np.ndarray:
        return (self.samples @ self.x).numpy()

    def err(self) -> np.ndarray:
        return ((self.samples - self.x) ** 2).sum(1).numpy()


def draw(c, x: torch.Tensor, n_samples: int, worker: int = 0) -> Moments:
    out = torch.stack([c.decompress(c.compress(x, worker=worker, step=t)) for t in range(n_samples)])
    return Moments(x, out.to(torch.float64))


def collection_error(c, x: torch.Tensor, n_samples: int) -> np.ndarray:
    """||(1/n) sum_i C_i(x) - x||^2 for each step, all n workers fed the same x."""
    errs = []
    for t in range(n_samples):
        mean = sum(c.decompress(c.compress(x, worker=i, step=t)).to(torch.float64) for i in range(c.n_workers)) / c.n_workers
        errs.append(float(((mean - x) ** 2).sum()))
    return np.array(errs)


def upper_ok(z: np.ndarray, bound: float, scale: float, sigmas: float = 4.0, rel: float = 1e-6) -> tuple[bool, str]:
    """Is E z <= bound, allowing ``sigmas`` standard errors and a float slack of ``rel * scale``
    (``scale`` is ||x||^2, the size of the quantities compared)?"""
    mean = float(z.mean())
    se = float(z.std(ddof=1) / np.sqrt(len(z))) if len(z) > 1 else 0.0
    slack = sigmas * se + rel * scale
    return mean <= bound + slack, f"mean {mean:.6g} vs bound {bound:.6g} (se {se:.3g})"


def equal_ok(z: np.ndarray, value: float, sigmas: float = 4.0, rel: float = 1e-6) -> tuple[bool, str]:
    mean = float(z.mean())
    se = float(z.std(ddof=1) / np.sqrt(len(z))) if len(z) > 1 else 0.0
    slack = sigmas * se + rel * max(abs(value), 1e-300)
    return abs(mean - value) <= slack, f"mean {mean:.6g} vs expected {value:.6g} (se {se:.3g})"
