"""Value casts to fp16 and bf16: round to nearest, 16 bits a coordinate.

A cast is a precision choice outside the compression theory: no class constant holds for *every* x
(a float32 value below the 16-bit subnormal range becomes 0, so no alpha > 0 bounds the error), and
round-to-nearest is biased. Both therefore declare ``unbiased=False`` and no other constant. fp16
saturates at +-65504 instead of overflowing to inf.
"""
from __future__ import annotations

import torch

from common.compressors import cpu_kernels
from common.compressors.base import Compressor, Constants, all_finite, register
from common.compressors.payloads import Dense, cpu_blocks


class _Cast(Compressor):
    target: torch.dtype

    def __init__(self, dim, n_workers, seed, options, purpose="compress"):
        super().__init__(dim, n_workers, seed, options, purpose)
        self._set_constants(Constants(unbiased=False))

    def _check_input(self, x):
        """The shape here; the values where they are cast (``_compress``), which reads the cast instead
        of x where it can."""
        self._check_shape(x)

    def _compress(self, x, key):
        limit = min(torch.finfo(self.target).max, torch.finfo(x.dtype).max)
        x = x.detach()
        if x.device.type != "cpu":
            self._check_finite(x)
            return Dense(x.clamp(-limit, limit).to(self.target), x.dtype)
        # One cast, then its check: a finite cast says that x is finite too (a NaN or inf stays one),
        # so x is read once, and the cast is marked finite (``note_finite``) for the encoder, which
        # read it a second time. An inf or NaN in the cast is x's (refused with ``compress``'s
        # message) or a value beyond the format's range, which rounding to nearest took to inf:
        # only then are the values clamped first, block by block (no clamped float copy of all of
        # x). Within the range the clamp changes nothing, so both give the same bits. At d = 1e7 the
        # input check, the cast and two checks of it took about 7 ms, these about 4; the blocks'
        # clamp and cast about 9.
        out = x.to(self.target)
        if not all_finite(out):
            self._check_finite(x)  # raises for a NaN or inf of x
            for block in cpu_blocks(x.numel()):
                out[block] = x[block].clamp(-limit, limit)
        return Dense(cpu_kernels.note_finite(out), x.dtype)


@register
class Fp16(_Cast):
    name = "fp16"
    summary = "cast values to IEEE half precision (round to nearest, saturating)"
    example = "fp16"
    target = torch.float16


@register
class Bf16(_Cast):
    name = "bf16"
    summary = "cast values to bfloat16 (round to nearest)"
    example = "bf16"
    target = torch.bfloat16
