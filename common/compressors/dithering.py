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

from common.compressors.base import Compressor, Constants, Param, float64_norm, register
from common.compressors.payloads import CPU_BLOCK, LevelTable, Quantized, cpu_blocks, negative_flags
from common.compressors.rounding import compute_dtype, stochastic_codes, uniform_below


def norm_float32_up(x: torch.Tensor, p: float) -> torch.Tensor:
    """||x||_p as a 0-d float32 tensor, rounded up so that |x_i| <= norm for every i.

    The maximum norm is exact in any precision (one min/max pass). The 2-norm is summed in float64
    (a float32 sum of squares overflows), on the CPU in blocks that fit the cache instead of a float64
    copy of x; the float64 sum then differs from a one-piece sum in its last bits at most, which
    changes the rounded-up float32 norm only when the sum lies that close to a float32 number.
    """
    if p == math.inf and x.dtype in (torch.float32, torch.float64):
        if x.numel() == 0:
            return torch.zeros((), dtype=torch.float32, device=x.device)
        lo, hi = torch.aminmax(x)
        norm = torch.maximum(-lo, hi).abs_().to(torch.float64)  # (abs: +0 for a zero vector)
    elif p == 2.0:
        norm = float64_norm(x, 2)
    else:
        norm = torch.linalg.vector_norm(x, ord=p, dtype=torch.float64)
    n32 = norm.to(torch.float32)
    bump = n32.to(torch.float64) < norm
    return torch.where(bump, torch.nextafter(n32, torch.tensor(math.inf, device=x.device)), n32)


def dither_codes(t: torch.Tensor, table: LevelTable, levels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """``stochastic_codes(t, ...)`` for t = |x_i| / ||x||_p in [0, 1]: the same codes from the same
    draws, with int32 level indices and the level pair fetched from the small table (eq. 14's
    xi(t) = l_k with probability (l_(k+1) - t)/(l_(k+1) - l_k), else l_(k+1)). ``t`` is consumed.

    Uniform levels l_k = k/s (QSGD, ternary): k = floor(t s); base-2 levels 2^(k - s) (natural
    dithering): k from t's exponent field. Other tables go through ``stochastic_codes``.
    """
    top = levels.numel() - 1
    code_dtype = torch.int16 if top < 2**15 else torch.int32
    gaps = levels[1:] - levels[:-1]
    fast = t.dtype == torch.float32 and bool((gaps > 0).all()) and (
        table.kind == "uniform" or (table.kind == "exp" and table.base == 2.0 and table.s < 127))
    if not fast:
        return stochastic_codes(t, table, levels, gen)
    if top == 1 and table.kind == "uniform":  # ternary: levels {0, 1}, p_up = (t - 0)/(1 - 0) = t
        return uniform_below(t, gen).to(code_dtype)
    if table.kind == "uniform":  # floor(t s) (t >= 0: truncation is floor)
        lo_idx = (t * float(table.s)).to(torch.int32)
    else:  # t in [2^(E-127), 2^(E-126)) lies above level E - 127 + s; 0 and t < 2^-126 give <= 0
        lo_idx = t.view(torch.int32).bitwise_right_shift(23).add_(table.s - 127)
    lo_idx.clamp_(0, top - 1)
    lo = levels.index_select(0, lo_idx)
    gap = gaps.index_select(0, lo_idx)
    # (t - lo) / (hi - lo); hi - lo is the same float difference as in ``stochastic_codes``
    up = uniform_below(t.sub_(lo).div_(gap), gen)
    return lo_idx.add_(up).to(code_dtype)


class _Dither(Compressor):
    table: LevelTable
    p: float

    def _compress(self, x, key):
        x = x.detach()
        work = compute_dtype(x.dtype)
        norm = norm_float32_up(x, self.p)
        divisor = norm.to(work).clamp_min(torch.finfo(torch.float32).tiny)
        levels = self.table.values(work, x.device)
        gen = key.torch_generator(x.device)
        if x.device.type != "cpu":
            codes = dither_codes(x.abs().to(work).div_(divisor), self.table, levels, gen)
            return Quantized(self.table, x < 0, codes, norm, x.dtype)
        # block by block (the same draws in the same order as one pass over x)
        n = x.numel()
        codes = torch.empty(n, dtype=torch.int16 if levels.numel() <= 2**15 else torch.int32)
        buf = torch.empty(min(n, CPU_BLOCK), dtype=work)
        for block in cpu_blocks(n):
            xb, t = x[block], buf[: block.stop - block.start]
            if x.dtype == work:
                torch.abs(xb, out=t)
            else:
                t.copy_(xb).abs_()
            codes[block] = dither_codes(t.div_(divisor), self.table, levels, gen)
        return Quantized(self.table, negative_flags(x), codes, norm, x.dtype)


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
