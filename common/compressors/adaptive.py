"""Adaptive random sparsification (Beznosikov et al. eq. 10): one coordinate x_i e_i, unscaled, drawn
with probability |x_i| / ||x||_1. B1(1/d, 1), B2(1/d, 1), B3(d) (Lemma 10). The index travels.

Sampling is by inverse CDF on float64 cumulative sums (no limit on d, unlike ``torch.multinomial``); on
the CPU a vector of more than 2^15 coordinates is searched in two levels, first among the cumulative
sums of blocks of 2^15, then inside the block found (the same distribution; float64 rounding of the
sums differs from one long scan, so a draw near a boundary between two coordinates can pick the
other one). The block sums are torch's float64 sums of the blocks, added in one compiled pass where
Numba is present (``cpu_kernels.float64_block_sums``, the same bits).
"""
from __future__ import annotations

import torch

from common.compressors import cpu_kernels
from common.compressors.base import Constants, Selection, Sparsifier, float64_blocks, register


@register
class Adaptive(Sparsifier):
    name = "adaptive"
    summary = "one coordinate drawn with probability |x_i|/||x||_1, unscaled (index sent)"
    example = "adaptive"
    compiled = True  # a long CPU vector's block sums run in one compiled pass (loaded before a run's clock)

    def __init__(self, dim, n_workers, seed, options, purpose="compress"):
        super().__init__(dim, n_workers, seed, options, purpose)
        q = 1.0 / dim
        self.selection = Selection(scale=1.0, gamma=q, max_out=1)
        self._set_constants(Constants(unbiased=False, alpha=q, b1=(q, 1.0), b2=(q, 1.0)))

    def select(self, x, key):
        if x.numel() == 0:
            return torch.empty(0, dtype=torch.int64, device=x.device), None, x[:0]
        gen = key.torch_generator(x.device)
        u = torch.rand(1, generator=gen, device=x.device, dtype=torch.float64)
        if x.device.type != "cpu" or x.numel() <= _BLOCK:
            cdf = torch.cumsum(x.abs().to(torch.float64), 0)
            idx = torch.searchsorted(cdf, u * cdf[-1], right=True).clamp_(max=x.numel() - 1)
            return idx, None, x[idx]
        # two levels: the block of u among cumulative float64 block sums, then the coordinate among
        # that block's cumulative sums (no float64 copy and no sequential scan of all of x)
        starts = range(0, x.numel(), _BLOCK)
        sums = cpu_kernels.float64_block_sums(x, 1, _BLOCK)  # the same sums in one compiled pass
        if sums is not None:
            sums = torch.from_numpy(sums)
        else:
            sums = torch.stack([block.abs_().sum() for block in float64_blocks(x, _BLOCK)])
        bounds = torch.cumsum(sums, 0)
        u = u * bounds[-1]
        j = int(torch.searchsorted(bounds, u, right=True).clamp_(max=len(starts) - 1))
        start = starts[j]
        block = x[start:start + _BLOCK].to(torch.float64, copy=True).abs_()  # (x stays)
        cdf = torch.cumsum(block, 0).add_(bounds[j] - sums[j])
        idx = torch.searchsorted(cdf, u, right=True).clamp_(max=block.numel() - 1).add_(start)
        return idx, None, x[idx]


_BLOCK = 1 << 15
