"""Counter-based uniform draws for stochastic rounding and dithering.

The draw of coordinate i depends only on the stream's 64-bit key and i, never on a generator's state:

* float32 arithmetic: a 24-bit integer k_i from SplitMix64 of the counter i // 2 (output
  z_j = mix(key + (j + 1) * 0x9E3779B97F4A7C15), Steele, Lea and Flood 2014); coordinate 2j takes
  bits 0..23 of z_j and coordinate 2j + 1 bits 32..55, so one 64-bit output serves two coordinates;
* float64 arithmetic: a 53-bit k_i = z_i >> 11 (one output per coordinate).

u_i = k_i 2^-bits is uniform on [0, 1) at the resolution of the arithmetic, and "round up with
probability p" is ``k_i < p 2^bits`` (exact: scaling by a power of two), as in the unbiased rounding
rules of Beznosikov et al. eqs. 12-14.

Because a draw is a pure function of (key, i), the CPU kernel (``common.compressors.cpu_kernels``)
evaluates it inside its one pass over x, any block of coordinates can be drawn on its own, and the
torch version here gives the same draws on every device: a CUDA worker and a CPU worker compress the
same vector to the same message. The torch version relies on two's complement wrap-around of int64
multiplication and addition, which is what CPU and CUDA integer arithmetic do (tested against the
NumPy/Numba uint64 version on the CPU).
"""
from __future__ import annotations

import torch

GOLDEN = 0x9E3779B97F4A7C15
MIX1 = 0xBF58476D1CE4E5B9
MIX2 = 0x94D049BB133111EB
_MASK64 = (1 << 64) - 1
BITS = {torch.float32: 24, torch.float64: 53}


def _signed(v: int) -> int:
    v &= _MASK64
    return v - (1 << 64) if v >= 1 << 63 else v


def _shr(z: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 words (torch's ``>>`` is arithmetic)."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def splitmix64(counter: torch.Tensor, key: int) -> torch.Tensor:
    """SplitMix64 output for each int64 counter j: mix(key + (j + 1) * golden), as int64 bit patterns."""
    z = (counter + 1).mul_(_signed(GOLDEN)).add_(_signed(key))
    z = z ^ _shr(z, 30)
    z.mul_(_signed(MIX1))
    z = z ^ _shr(z, 27)
    z.mul_(_signed(MIX2))
    return z ^ _shr(z, 31)


def uniform_bits(key: int, n: int, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """k_0 .. k_(n-1) (int64) of the module docstring, for arithmetic in ``dtype`` (float32 or float64)."""
    bits = BITS[dtype]
    if bits == 53:
        return _shr(splitmix64(torch.arange(n, dtype=torch.int64, device=device), key), 11)
    z = splitmix64(torch.arange((n + 1) // 2, dtype=torch.int64, device=device), key)
    pair = torch.stack([z & 0xFFFFFF, _shr(z, 32) & 0xFFFFFF], dim=1)
    return pair.reshape(-1)[:n]


def uniform_below(p: torch.Tensor, key: int) -> torch.Tensor:
    """The Bernoulli(p_i) outcomes ``u_i < p_i`` (bool) of the stream ``key``; ``p`` is float32 or float64."""
    k = uniform_bits(key, p.numel(), p.dtype, p.device).view(p.shape)
    return k.to(p.dtype) < p * float(2 ** BITS[p.dtype])
