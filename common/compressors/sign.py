"""Scaled sign: C(x) = scale * sign(x), sign(0) = +1, one bit a coordinate plus a float32 scale.

* ``scale=l1`` (CD-Adam, Wang et al.): scale = ||x||_1 / d, the least-squares scale. Then
  ||C(x)||^2 = <C(x), x> = ||x||_1^2/d >= ||x||^2/d, so B1(1/d, 1), B2(1/d, 1) and
  ||C(x) - x||^2 = (1 - ||x||_1^2/(d||x||^2))||x||^2 <= (1 - 1/d)||x||^2: alpha = 1/d (identity A.2).
* ``scale=l2`` (1-bit Adam): scale = ||x||_2 / sqrt(d), so ||C(x)||^2 = ||x||^2 and
  <C(x), x> = ||x||_2||x||_1/sqrt(d) >= ||x||^2/sqrt(d): B1(1, sqrt(d)), B2(1/sqrt(d), sqrt(d)); it is
  contractive only for d < 4.

Deterministic. The scale is rounded to float32 and both sides use the rounded value, so the bounds
hold up to that rounding (a relative 6e-8).
"""
from __future__ import annotations

import math

import torch

from common.compressors.base import Compressor, Constants, Param, float32_scalar, float64_norm, register
from common.compressors.payloads import Signs


@register
class Sign(Compressor):
    name = "sign"
    compiled = True
    summary = "scaled sign: one bit a coordinate and one scale (l1: ||x||_1/d, l2: ||x||_2/sqrt(d))"
    example = "sign:scale=l1"
    params = (Param("scale", str, "l1", lambda v: v in ("l1", "l2"), "l1 or l2"),)

    def __init__(self, dim, n_workers, seed, options, purpose="compress"):
        super().__init__(dim, n_workers, seed, options, purpose)
        self.norm = self.options["scale"]
        d = dim
        if self.norm == "l1":
            self._set_constants(Constants(unbiased=False, alpha=1.0 / d, b1=(1.0 / d, 1.0), b2=(1.0 / d, 1.0)))
        else:
            r = math.sqrt(d)
            self._set_constants(Constants(unbiased=False, b1=(1.0, r), b2=(1.0 / r, r)))

    def _check_input(self, x):
        """Shape and type only: ``_compress`` reads finiteness off the norm it computes anyway."""
        self._check_shape(x)

    def _compress(self, x, key):
        m = max(1, x.numel())
        x = x.detach()
        negative = torch.empty(x.shape, dtype=torch.bool, device=x.device)  # x < 0, written by the norm's pass
        if self.norm == "l1":  # accumulated in float64: a float32 sum can overflow while the mean fits
            scale = float64_norm(x, 1, negative) / m
        else:
            scale = float64_norm(x, 2, negative) / math.sqrt(m)
        if not math.isfinite(scale):
            # A NaN or inf in x makes the float64 norm NaN or inf, so a finite norm saves the separate
            # pass of the input check. The converse fails only for float64 inputs near its largest
            # values, whose sum can overflow: the check below tells the two apart.
            self._check_finite(x)
        return Signs(negative, float32_scalar(scale), x.dtype)
