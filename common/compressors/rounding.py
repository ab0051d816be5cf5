"""Exponential rounding onto the levels a_k = b^k (Beznosikov et al. eqs. 12-13, Lemmas 12-13).

* unbiased (``exprounding``, ``natural`` = base 2): round |x_i| in [b^k, b^(k+1)] to one of the two
  ends with probabilities linear in value; U(zeta) with zeta = (b + 1/b + 2)/4, so
  omega = (b - 1)^2 / (4b) (1/8 for natural compression, Horvath et al.).
* biased (``exprounding:biased=true``): nearest level in linear distance (ties go down);
  B1((2/(b+1))^2, 2b/(b+1)), B2(2/(b+1), 2b/(b+1)), B3((b+1)^2/(4b)).

Levels cover the positive range of the input's dtype (``LevelTable`` kind "rounding"); 0 stays 0.
Inputs above the top level b^emax (only the last binade of the dtype) are clamped to it: that is the
one place where the declared constants do not hold, since the next level is not representable.
The payload keeps a sign and a code per coordinate (natural compression: sign + exponent).
"""
from __future__ import annotations

import torch

from common.compressors import cpu_kernels
from common.compressors.base import Compressor, Constants, Param, register
from common.compressors.draws import uniform_below
from common.compressors.payloads import LevelTable, Quantized, code_dtype, rounding_exponent_range


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Arithmetic precision for rounding decisions: float64 stays, everything else uses float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def lower_level(t: torch.Tensor, table: LevelTable, levels: torch.Tensor) -> torch.Tensor:
    """Index of the largest level <= t, clamped to [0, len - 2] so that the next level exists.

    Uniform tables and base-2 tables are located arithmetically (floor, frexp); other tables by binary
    search. Where floating-point rounding puts t a hair outside its interval, the rounding probability
    below is clamped, so the result is still one of the two nearest levels.
    """
    top = levels.numel() - 1
    if table.kind == "uniform":
        idx = torch.floor(t * table.s).to(torch.int64)
    elif table.base == 2.0:
        exponent = torch.frexp(t).exponent.to(torch.int64)  # t in [2^(e-1), 2^e)
        if table.kind == "rounding":
            emin = rounding_exponent_range(2.0, getattr(torch, table.dtype_name))[0]
            idx = exponent - emin  # level k holds 2^(emin + k - 1)
        else:  # "exp": level k holds 2^(k - s) for k >= 1
            idx = exponent - 1 + table.s
        idx = torch.where(t > 0, idx, 0)
    else:
        idx = torch.searchsorted(levels, t, right=True) - 1
    return idx.clamp_(0, top - 1)


def stochastic_codes(t: torch.Tensor, table: LevelTable, levels: torch.Tensor, key: int | None) -> torch.Tensor:
    """Round each t (>= 0) between the two neighbouring levels.

    With a stream ``key`` the rounding is unbiased: up with probability (t - lo)/(hi - lo) (linear in
    value, spec pitfall 5), from the counter-based draws of ``common.compressors.draws``. Without it,
    to the nearest level (ties down). Values at or above the top level map to the top level.
    """
    top = levels.numel() - 1
    lo_idx = lower_level(t, table, levels)
    lo = levels[lo_idx]
    hi = levels[lo_idx + 1]
    if key is None:
        up = (t - lo) > (hi - t)
    else:
        gap = hi - lo
        p_up = torch.where(gap > 0, (t - lo) / torch.where(gap > 0, gap, 1), torch.ones_like(t))
        up = uniform_below(p_up, key)
    return (lo_idx + up).to(code_dtype(top))


def quantize(x: torch.Tensor, table: LevelTable, levels: torch.Tensor, key: int | None,
             divisor: torch.Tensor | None = None, sign_bits: bool = False,
             ) -> tuple[torch.Tensor, torch.Tensor, tuple | None, bool | None]:
    """(x < 0, codes, code span or None, whether x is finite or None) of t = |x| (/ ``divisor``)
    against ``levels`` (in the arithmetic dtype): one compiled pass on the CPU (``cpu_kernels``, which
    also returns the codes' (min, max, smallest nonzero) for the encoder and whether every x_i was
    finite), the vectorized torch version elsewhere (span and finiteness unknown: None); both give
    the same codes from the same draws. x < 0 as bool flags, or with ``sign_bits`` possibly as their
    bitmap (``Quantized.signs``)."""
    x = x.detach()
    uniform_s = table.s if table.kind == "uniform" else 0
    if x.device.type == "cpu":
        out = cpu_kernels.quantize(x, levels, uniform_s, 0 if key is None else key, key is not None, divisor, sign_bits)
        if out is not None:
            return out
    t = x.abs().to(levels.dtype)
    if divisor is not None:
        t = t.div_(divisor)
    return x < 0, stochastic_codes(t, table, levels, key), None, None


@register
class ExpRounding(Compressor):
    name = "exprounding"
    compiled = True
    summary = "round each |x_i| to a power of b (stochastic and unbiased, or nearest when biased=true)"
    example = "exprounding:base=2"
    params = (
        Param("base", float, 2.0, lambda v: 1.0 < v < float("inf"), "a number > 1", "b, levels are b^k"),
        Param("biased", bool, False, doc="nearest level (biased) instead of stochastic rounding"),
    )

    def __init__(self, dim, n_workers, seed, options, purpose="compress"):
        super().__init__(dim, n_workers, seed, options, purpose)
        b = self.base = self.options["base"]
        self.biased = self.options["biased"]
        if self.biased:
            beta, gamma = 2 * b / (b + 1), 2 / (b + 1)
            self._set_constants(Constants(unbiased=False, alpha=4 * b / (b + 1) ** 2, b1=(gamma**2, beta), b2=(gamma, beta)))
        else:
            self._set_constants(Constants(unbiased=True, omega=(b - 1) ** 2 / (4 * b)))

    def _check_input(self, x):
        """Shape and type only: ``_compress`` checks finiteness after the quantizer, whose compiled
        pass reads it for bases of 2 and more and for float64 (natural compression at d = 1e7: a
        pass of 2.5 ms saved); elsewhere (bases below 2 in float32) the check is a pass of its own."""
        self._check_shape(x)

    def _compress(self, x, key):
        table = LevelTable("rounding", self.base, dtype_name=str(x.dtype).removeprefix("torch."))
        work = compute_dtype(x.dtype)
        levels = table.values(work, x.device)
        signs, codes, span, finite = quantize(x, table, levels, None if self.biased else key.code, sign_bits=True)
        if not finite:  # False: raises for the NaN or inf; None (not the compiled pass): checks
            self._check_finite(x)
        return Quantized(table, signs, codes, None, x.dtype, span)


@register
class Natural(ExpRounding):
    name = "natural"
    summary = "natural compression: unbiased rounding to a power of 2 (sign + exponent)"
    example = "natural"
    params = ()

    def __init__(self, dim, n_workers, seed, options, purpose="compress"):
        super().__init__(dim, n_workers, seed, dict(options), purpose)

    def _parse_options(self, options):
        parsed = super()._parse_options(options)
        return {**parsed, "base": 2.0, "biased": False}

    @property
    def spec(self):
        return self.name
