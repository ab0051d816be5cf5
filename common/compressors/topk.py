"""Top-K (Beznosikov et al. eq. 11): keep the k largest |x_i|, unscaled.

B1(k/d, 1), B2(k/d, 1), B3(d/k), i.e. alpha = k/d (Lemma 11). Deterministic; ties in |x_i| are broken
towards the lower index, so the output does not depend on the device or the sort algorithm.
The support is data-dependent and travels with the values.
"""
from __future__ import annotations

import torch

from common.compressors import cpu_kernels
from common.compressors.base import K_PARAMS, Constants, Selection, Sparsifier, resolve_k, register
from common.compressors.payloads import CPU_BLOCK, cpu_blocks


def topk_indices(x: torch.Tensor, k: int) -> torch.Tensor:
    """Sorted indices of the k largest |x_i|; among equal magnitudes the lowest indices win.

    For a large vector and a small k the k-th largest magnitude is looked for among candidates only:
    a strided sample gives a level t that about 1.3 k + 64 magnitudes reach, one pass keeps the
    indices with |x_i| >= t, and when at least k are kept they contain every index the rule selects
    (the k-th largest magnitude is then >= t), so the result is the same as over the whole vector.
    Otherwise the whole vector is searched.
    """
    m = x.numel()
    k = min(k, m)
    if k == 0:
        return torch.empty(0, dtype=torch.int64, device=x.device)
    if k == m:
        return torch.arange(m, device=x.device)
    if m >= 1 << 16 and k <= m // 16:
        stride = max(1, m // (1 << 16))
        sample = x[::stride].abs()
        rank = min(sample.numel(), int(1.3 * k * sample.numel() / m) + 64)
        level = torch.topk(sample, rank, sorted=False).values.min()
        if bool(level > 0):
            candidates = _at_least(x, level, rank * m // sample.numel())
            if candidates.numel() >= k:
                return _lowest_index_topk(x.index_select(0, candidates).abs_(), candidates, k)
    return _lowest_index_topk(x.abs(), None, k)


def _at_least(x: torch.Tensor, level: torch.Tensor, expect: int) -> torch.Tensor:
    """Sorted indices of |x_i| >= level (about ``expect`` of them): on a GPU in one masked pass; on
    the CPU in one compiled pass (``cpu_kernels.indices_at_least``), else block by block (the mask
    stays in cache)."""
    if x.device.type != "cpu":
        return torch.nonzero((x >= level).logical_or_(x <= -level)).flatten()
    compiled = cpu_kernels.indices_at_least(x, float(level), expect)
    if compiled is not None:
        return compiled
    mag = torch.empty(min(x.numel(), CPU_BLOCK), dtype=x.dtype)
    mask = torch.empty(mag.numel(), dtype=torch.bool)
    parts = []
    for block in cpu_blocks(x.numel()):
        m = block.stop - block.start
        torch.ge(torch.abs(x[block], out=mag[:m]), level, out=mask[:m])
        parts.append(torch.nonzero(mask[:m]).flatten().add_(block.start))
    return torch.cat(parts)


def _lowest_index_topk(mag: torch.Tensor, where: torch.Tensor | None, k: int) -> torch.Tensor:
    """Positions (in ``where``, sorted, or in ``mag`` itself) of the k largest of ``mag``, ties to the
    lower position."""
    threshold = torch.topk(mag, k, sorted=False).values.min()
    above = mag > threshold
    at = mag == threshold
    keep = above.logical_or_(at.logical_and_(torch.cumsum(at, 0) <= k - int(above.sum())))
    picked = torch.nonzero(keep).flatten()
    return picked if where is None else where[picked]


@register
class TopK(Sparsifier):
    name = "topk"
    compiled = True
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
