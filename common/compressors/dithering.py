"""Dithering: C(x)_i = ||x||_p sign(x_i) xi(|x_i| / ||x||_p), xi rounding stochastically (linear in
value) between neighbouring levels of a fixed table (Beznosikov et al. eq. 14). All are unbiased.

* ``expdither`` (base b, s levels, p-norm): levels 0 < b^(1-s) < ... < b^-1 < 1 and 0;
  U(zeta_b), zeta_b = (b + 1/b + 2)/4 + d^(1/r) b^(1-s) min(1, d^(1/r) b^(1-s)), r = min(p, 2)
  (Lemma 15, eq. 15). ``natdither`` is b = 2.
* ``qsgd`` (standard dithering, Alistarh et al.): levels l/s over the 2-norm; omega = min(d/s^2, sqrt(d)/s).
* ``ternary`` (TernGrad): levels {0, 1}; E||C||^2 = ||x||_p ||x||_1 <= sqrt(d)||x||^2 for p = 2 or inf,
  so omega = sqrt(d) - 1.

The norm travels as float32, rounded up, and the codes are computed against that rounded norm, so
the decoded vector is still unbiased and the receiver reproduces it exactly.
"""
from __future__ import annotations

import math

import torch

from common.compressors import cpu_kernels
from common.compressors.base import Compressor, Constants, Param, float64_norm, register
from common.compressors.payloads import LevelTable, Quantized
from common.compressors.rounding import compute_dtype, quantize


def norm_float32_up(x: torch.Tensor, p: float) -> torch.Tensor:
    """||x||_p as a 0-d float32 tensor, rounded up so that |x_i| <= norm for every i.

    The maximum norm is exact in any precision (one pass: on long CPU vectors the largest magnitude's
    bits, ``cpu_kernels.largest_magnitude``; elsewhere torch's min and max). The 2-norm is summed in float64
    (a float32 sum of squares overflows), on the CPU in blocks that fit the cache instead of a float64
    copy of x; the float64 sum then differs from a one-piece sum in its last bits at most, which
    changes the rounded-up float32 norm only when the sum lies that close to a float32 number.
    """
    if p == math.inf and x.dtype in (torch.float32, torch.float64):
        if x.numel() == 0:
            return torch.zeros((), dtype=torch.float32, device=x.device)
        largest = cpu_kernels.largest_magnitude(x)  # long CPU vectors: one compiled pass
        if largest is not None:
            norm = torch.tensor(largest, dtype=torch.float64)
        else:
            lo, hi = torch.aminmax(x)
            norm = torch.maximum(-lo, hi).abs_().to(torch.float64)  # (abs: +0 for a zero vector)
    elif p == 2.0:
        norm = float64_norm(x, 2)
    else:
        norm = torch.linalg.vector_norm(x, ord=p, dtype=torch.float64)
    n32 = norm.to(torch.float32)
    bump = n32.to(torch.float64) < norm
    return torch.where(bump, torch.nextafter(n32, torch.tensor(math.inf, device=x.device)), n32)


class _Dither(Compressor):
    compiled = True
    table: LevelTable
    p: float

    def _check_input(self, x):
        """Shape and type only: ``_compress`` reads finiteness off the norm it computes anyway."""
        self._check_shape(x)

    def _compress(self, x, key):
        x = x.detach()
        norm = norm_float32_up(x, self.p)
        if not math.isfinite(float(norm)):
            # A NaN or inf in x makes every p-norm NaN or inf, so a finite norm saves the input
            # check's separate pass over x. A norm beyond float32 (or a float64 sum that overflows)
            # with finite x also lands here; the check tells the two apart, and such x goes on as before.
            self._check_finite(x)
        levels = self.table.values(compute_dtype(x.dtype), x.device)
        divisor = norm.to(levels.dtype).clamp_min(torch.finfo(torch.float32).tiny)
        signs, codes, span, _ = quantize(x, self.table, levels, key.code, divisor, sign_bits=True)  # (x checked by its norm)
        return Quantized(self.table, signs, codes, norm, x.dtype, span)


P_PARAM = Param("p", float, 2.0, lambda v: v >= 1, "a number >= 1 or inf", "the norm the levels are relative to")


@register
class ExpDither(_Dither):
    name = "expdither"
    summary = "general exponential dithering: levels b^-j of the p-norm, stochastic, unbiased"
    example = "expdither:base=2,s=4,p=2"
    params = (
        Param("base", float, 2.0, lambda v: 1.0 < v < float("inf"), "a number > 1"),
        Param("s", int, 4, lambda v: 1 <= v <= 1023, "an integer in [1, 1023]", "number of non-zero levels"),
        P_PARAM,
    )

    def __init__(self, dim, n_workers, seed, options, purpose="compress"):
        super().__init__(dim, n_workers, seed, options, purpose)
        b, s, self.p = self.options["base"], self.options["s"], self.options["p"]
        self.table = LevelTable("exp", b, s)
        r = min(self.p, 2.0)
        tail = dim ** (1.0 / r) * b ** (1 - s)
        zeta = (b + 1 / b + 2) / 4 + tail * min(1.0, tail)
        self._set_constants(Constants(unbiased=True, omega=zeta - 1.0))


@register
class NatDither(ExpDither):
    name = "natdither"
    summary = "natural dithering: exponential dithering with base 2"
    example = "natdither:s=4,p=inf"
    params = tuple(p for p in ExpDither.params if p.name != "base")

    def _parse_options(self, options):
        return {**super()._parse_options(options), "base": 2.0}


@register
class QSGD(_Dither):
    name = "qsgd"
    summary = "standard (uniform) dithering / QSGD with s levels of the 2-norm"
    example = "qsgd:s=16"
    params = (Param("s", int, 16, lambda v: 1 <= v <= 65535, "an integer in [1, 65535]", "number of levels"),)

    def __init__(self, dim, n_workers, seed, options, purpose="compress"):
        super().__init__(dim, n_workers, seed, options, purpose)
        s = self.options["s"]
        self.p = 2.0
        self.table = LevelTable("uniform", 1.0, s)
        self._set_constants(Constants(unbiased=True, omega=min(dim / s**2, math.sqrt(dim) / s)))


@register
class Ternary(_Dither):
    name = "ternary"
    summary = "ternary quantization (TernGrad): ||x||_p * sign * Bernoulli(|x_i|/||x||_p)"
    example = "ternary"
    params = (Param("p", float, math.inf, lambda v: v == 2 or v == math.inf, "2 or inf"),)

    def __init__(self, dim, n_workers, seed, options, purpose="compress"):
        super().__init__(dim, n_workers, seed, options, purpose)
        self.p = self.options["p"]
        self.table = LevelTable("uniform", 1.0, 1)
        self._set_constants(Constants(unbiased=True, omega=math.sqrt(dim) - 1.0))
