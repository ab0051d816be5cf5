"""Top-K (Beznosikov et al. eq. 11): keep the k largest |x_i|, unscaled.

B1(k/d, 1), B2(k/d, 1), B3(d/k), i.e. alpha = k/d (Lemma 11). Deterministic; ties in |x_i| are broken
towards the lower index, so the output does not depend on the device or the sort algorithm.
The support is data-dependent and travels with the values.
"""
from __future__ import annotations

import torch

from common.compressors.base import K_PARAMS, Constants, Selection, Sparsifier, resolve_k, register


def topk_indices(x: torch.Tensor, k: int) -> torch.Tensor:
    """Sorted indices of the k largest |x_i|; among equal magnitudes the lowest indices win."""
    m = x.numel()
    k = min(k, m)
    if k == 0:
        return torch.empty(0, dtype=torch.int64, device=x.device)
    if k == m:
        return torch.arange(m, device=x.device)
    mag = x.abs()
    threshold = torch.topk(mag, k, sorted=False).values.min()
    above = torch.nonzero(mag > threshold).flatten()
    at = torch.nonzero(mag == threshold).flatten()[: k - above.numel()]
    return torch.sort(torch.cat([above, at])).values


@register
class TopK(Sparsifier):
    name = "topk"
    summary = "keep the k largest magnitudes (indices sent)"
    example = "topk:ratio=0.01"
    params = K_PARAMS

    def __init__(self, dim, n_workers, seed, options, purpose="compress"):
        super().__init__(dim, n_workers, seed, options, purpose)
        self.k = resolve_k(self.name, dim, self.options)
        q = self.k / dim
        self.selection = Selection(scale=1.0, gamma=q, max_out=self.k)
        self._set_constants(Constants(unbiased=False, alpha=q, b1=(q, 1.0), b2=(q, 1.0)))

    def select(self, x, key):
        idx = topk_indices(x, self.k)
        return idx, None, x[idx]
