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
        return self._signs(x.detach())

    def _compress_difference(self, target, h, key):
        """C(target - h) in the norm's compiled pass over target and h, the difference formed a
        few blocks at a time in the cache (``base.float64_norm`` with ``minus``): the same payload
        as ``compress(target - h)`` without writing the difference and reading it back; None where
        the pass does not apply (short vectors, other devices or dtypes)."""
        return self._signs(target, h)

    def _signs(self, x, minus=None):
        """The payload of x, or with ``minus`` of x - minus (None where the pass does not take it)."""
        m = max(1, x.numel())
        negative = torch.empty(x.shape, dtype=torch.bool, device=x.device)  # x < 0, written by the norm's pass
        norm = float64_norm(x, 1 if self.norm == "l1" else 2, negative, minus)
        if norm is None:
            return None
        # the l1 norm accumulated in float64: a float32 sum can overflow while the mean fits
        scale = norm / m if self.norm == "l1" else norm / math.sqrt(m)
        if not math.isfinite(scale):
            # A NaN or inf in x makes the float64 norm NaN or inf, so a finite norm saves the separate
            # pass of the input check. The converse fails only for float64 inputs near its largest
            # values, whose sum can overflow: the check below tells the two apart.
            self._check_finite(x if minus is None else x - minus)
        return Signs(negative, float32_scalar(scale), x.dtype)
