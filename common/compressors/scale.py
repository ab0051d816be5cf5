"""Scaling: ``lambda * C`` for any compressor C (``C+scale:lambda=...``); alone, ``lambda * x``.

Beznosikov et al. Thm 6/7: B1(a, b) -> B1(lambda^2 a, lambda b) and B2(g, b) -> B2(lambda g, lambda b);
the contraction then follows from B2 (alpha = lambda g (2 - lambda b)), which for unbiased C in
U(zeta) is Thm 7's B3(1/(lambda(2 - zeta lambda))) and for lambda = 1/zeta NEOLITHIC's
(1+omega)^-1 C. For an unbiased collection with theta, E||lambda mean C_i - x||^2 <=
((1 - lambda)^2 + lambda^2 theta)||x||^2.
"""
from __future__ import annotations

import torch

from common.compressors.base import Compressor, Constants, Param, register
from common.compressors.payloads import Dense, Scaled

LAMBDA = Param("lambda", float, None, lambda v: 0 < v < float("inf"), "a positive number", "the factor")


def scaled_constants(inner: Constants, lam: float) -> Constants:
    if lam == 1.0:
        return inner
    b1 = None if inner.b1 is None else (lam * lam * inner.b1[0], lam * inner.b1[1])
    b2 = None if inner.b2 is None else (lam * inner.b2[0], lam * inner.b2[1])
    theta = None
    if inner.unbiased and inner.theta is not None:
        theta = (1 - lam) ** 2 + lam * lam * inner.theta
    return Constants(unbiased=False, b1=b1, b2=b2, theta=theta)


@register
class Scale(Compressor):
    """``scale:lambda=L`` on its own: lambda * x (useful mostly at the end of a chain)."""

    name = "scale"
    summary = "multiply by lambda: C+scale:lambda=L is lambda*C"
    example = "scale:lambda=0.5"
    params = (LAMBDA,)

    def __init__(self, dim, n_workers, seed, options, purpose="compress"):
        super().__init__(dim, n_workers, seed, options, purpose)
        if "lambda" not in self.options:
            raise ValueError("scale: needs lambda=")
        self.factor = float(torch.tensor(self.options["lambda"], dtype=torch.float32))
        one = Constants(unbiased=True, omega=0.0, alpha=1.0, b1=(1.0, 1.0), b2=(1.0, 1.0), theta=0.0)
        self._set_constants(scaled_constants(one, self.factor))

    def _compress(self, x, key):
        return Scaled(torch.tensor(self.factor, dtype=torch.float32, device=x.device), Dense(x.detach().clone(), x.dtype))


class ScaledCompressor(Compressor):
    """lambda * inner, where ``inner`` is any compressor (chain included)."""

    def __init__(self, inner: Compressor, factor: float):
        self.name = inner.name
        super().__init__(inner.dim, inner.n_workers, inner.seed, {}, inner.purpose)
        self.inner, self.factor = inner, float(torch.tensor(factor, dtype=torch.float32))
        self.shared = inner.shared
        self._set_constants(scaled_constants(inner.constants_obj, self.factor))

    @property
    def spec(self):
        return f"{self.inner.spec}+scale:lambda={self.factor}"

    def _compress(self, x, key):
        return Scaled(torch.tensor(self.factor, dtype=torch.float32, device=x.device), self.inner._compress(x, key))
