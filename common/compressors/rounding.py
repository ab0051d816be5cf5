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

import functools

import torch

from common.compressors.base import Compressor, Constants, Param, register
from common.compressors.payloads import CPU_BLOCK, LevelTable, Quantized, cpu_blocks, negative_flags, rounding_exponent_range


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


def stochastic_codes(t: torch.Tensor, table: LevelTable, levels: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
    """Round each t (>= 0) between the two neighbouring levels.

    With ``gen`` the rounding is unbiased: up with probability (t - lo)/(hi - lo) (linear in value,
    spec pitfall 5). Without it, to the nearest level (ties down). Values at or above the top level map
    to the top level.
    """
    top = levels.numel() - 1
    lo_idx = lower_level(t, table, levels)
    lo = levels[lo_idx]
    hi = levels[lo_idx + 1]
    if gen is None:
        up = (t - lo) > (hi - t)
    else:
        gap = hi - lo
        p_up = torch.where(gap > 0, (t - lo) / torch.where(gap > 0, gap, 1), torch.ones_like(t))
        up = uniform_below(p_up, gen)
    return (lo_idx + up).to(torch.int16 if top < 2 ** 15 else torch.int32)


def uniform_below(p: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """``torch.rand(p.shape, generator=gen, dtype=p.dtype) < p``, bit for bit, with the same draws.

    On the CPU torch.rand makes a float32 from the low 24 bits of one 32-bit Mersenne-Twister output,
    u = k 2^-24 (a float64 from 53 bits of a 64-bit output), and ``random_`` on int32 (int64) hands
    out those same outputs. So u < p iff k < p 2^24 (exact: scaling by a power of two), and the
    integer draw skips torch.rand's float conversion pass. Elsewhere torch.rand itself is used.
    """
    if p.device.type == "cpu" and p.dtype in (torch.float32, torch.float64):
        bits, itype = (24, torch.int32) if p.dtype == torch.float32 else (53, torch.int64)
        k = torch.empty(p.shape, dtype=itype).random_(generator=gen).bitwise_and_((1 << bits) - 1)
        return k < p * float(2**bits)
    return torch.rand(p.shape, generator=gen, device=p.device, dtype=p.dtype) < p


@functools.lru_cache(maxsize=8)
def _natural_code_table(top: int) -> torch.Tensor:
    """Code of a float32 whose biased exponent after rounding is e (e = 0: zero): level k holds
    2^(k - 150), so a normal 2^(e - 127) is code e + 23, clamped to the top level 2^127."""
    e = torch.arange(256, dtype=torch.int32)
    return torch.where(e == 0, 0, (e + 23).clamp(max=top)).to(torch.int16)


def natural_codes_float32(x: torch.Tensor, gen: torch.Generator, top: int) -> torch.Tensor | None:
    """Unbiased rounding of |x| to powers of two for a float32 CPU vector, on its bit pattern
    (Horvath et al.'s C_nat, spec eq. 12 with b = 2): the same codes and draws as ``stochastic_codes``.

    For a normal |x| = 2^(E - 127)(1 + m 2^-23) the probability of rounding up is m 2^-23 and the draw
    is u = k 2^-24 (``uniform_below``): up iff floor(k/2) < m iff m + (2^23 - 1 - floor(k/2)) carries
    into the exponent field. So code = table[exponent field of (x + noise)], with the noise added to
    the bit pattern. Returns None (and restores the generator) when x holds subnormals, which this
    does not cover. Works block by block (``cpu_blocks``): the draws are the same as one call's.
    """
    state = gen.get_state()
    bits = x.contiguous().view(torch.int32)
    table = _natural_code_table(top)
    codes = torch.empty(x.shape, dtype=torch.int16)
    noise = torch.empty(min(bits.numel(), CPU_BLOCK), dtype=torch.int32)
    for block in cpu_blocks(bits.numel()):
        b = bits[block]
        e = noise[: b.numel()].random_(generator=gen)
        e.bitwise_not_().bitwise_right_shift_(1).bitwise_and_(0x7FFFFF)
        e.add_(b).bitwise_right_shift_(23).bitwise_and_(0xFF)  # the sign bit never changes
        if int(e.amin()) <= 1:  # zeros, or possibly subnormals: look at the input
            if bool(((b & 0x7FFFFFFF) - 1 >> 23 == 0).any()):  # 0 < |x| < 2^-126
                gen.set_state(state)
                return None
        torch.index_select(table, 0, e, out=codes[block])
    return codes


@register
class ExpRounding(Compressor):
    name = "exprounding"
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

    def _compress(self, x, key):
        table = LevelTable("rounding", self.base, dtype_name=str(x.dtype).removeprefix("torch."))
        work = compute_dtype(x.dtype)
        levels = table.values(work, x.device)
        gen = None if self.biased else key.torch_generator(x.device)
        codes = None
        if gen is not None and self.base == 2.0 and x.dtype == torch.float32 and x.device.type == "cpu":
            codes = natural_codes_float32(x.detach(), gen, levels.numel() - 1)
        if codes is None and x.device.type == "cpu":  # block by block: the same draws in the same order
            codes = torch.empty(x.shape, dtype=torch.int16 if levels.numel() <= 2**15 else torch.int32)
            for block in cpu_blocks(x.numel()):
                codes[block] = stochastic_codes(x.detach()[block].abs().to(work), table, levels, gen)
        if codes is None:
            codes = stochastic_codes(x.detach().abs().to(work), table, levels, gen)
        return Quantized(table, negative_flags(x.detach()), codes, None, x.dtype)


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
