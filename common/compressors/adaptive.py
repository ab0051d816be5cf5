"""Adaptive random sparsification (Beznosikov et al. eq. 10): one coordinate x_i e_i, unscaled, drawn
with probability |x_i| / ||x||_1. B1(1/d, 1), B2(1/d, 1), B3(d) (Lemma 10). The index travels.

Sampling is by inverse CDF on a float64 cumulative sum (no limit on d, unlike ``torch.multinomial``).
"""
from __future__ import annotations

import torch

from common.compressors.base import Constants, Selection, Sparsifier, register


@register
class Adaptive(Sparsifier):
    name = "adaptive"
    summary = "one coordinate drawn with probability |x_i|/||x||_1, unscaled (index sent)"
    example = "adaptive"

    def __init__(self, dim, n_workers, seed, options, purpose="compress"):
        super().__init__(dim, n_workers, seed, options, purpose)
        q = 1.0 / dim
        self.selection = Selection(scale=1.0, gamma=q, max_out=1)
        self._set_constants(Constants(unbiased=False, alpha=q, b1=(q, 1.0), b2=(q, 1.0)))

    def select(self, x, key):
        if x.numel() == 0:
            return torch.empty(0, dtype=torch.int64, device=x.device), None, x[:0]
        cdf = torch.cumsum(x.abs().to(torch.float64), 0)
        gen = key.torch_generator(x.device)
        u = torch.rand(1, generator=gen, device=x.device, dtype=torch.float64) * cdf[-1]
        idx = torch.searchsorted(cdf, u, right=True).clamp_(max=x.numel() - 1)
        return idx, None, x[idx]
