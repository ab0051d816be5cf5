"""Top-K (Beznosikov et al. eq. 11): keep the k largest |x_i|, unscaled.

B1(k/d, 1), B2(k/d, 1), B3(d/k), i.e. alpha = k/d (Lemma 11). Deterministic; ties in |x_i| are broken
towards the lower index, so the output does not depend on the device or the sort algorithm.
The support is data-dependent and travels with the values.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from common.compressors import cpu_kernels
from common.compressors.base import K_PARAMS, Constants, Selection, Sparsifier, resolve_k, register
from common.compressors.payloads import CPU_BLOCK, Dense, Sparse, cpu_blocks


MIN_STRIDE = 16  # a sample of at most 1 in 16: below 2^20 coordinates, 1 in m/65536 was most of the vector


def top_k(x: torch.Tensor, k: int, check_finite: Callable[[torch.Tensor], None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sorted indices of the k largest |x_i|, x at them); among equal magnitudes the lowest indices
    win.

    For a large vector and a small k the k-th largest magnitude is looked for among candidates only:
    a strided sample (1 in ``MIN_STRIDE`` or fewer) gives a level t that about 1.3 k + 64 stride
    magnitudes reach, one pass keeps the indices (and values) with |x_i| >= t, and when at least k
    are kept they contain every index the rule selects (the k-th largest magnitude is then >= t), so
    the result is the same as over the whole vector. Otherwise the whole vector is searched.

    ``check_finite`` (the compressor's input check, which raises for a NaN or inf) is called with x
    unless the compiled candidate pass, which reads every x_i anyway, found them all finite: that
    saves the check's own pass over x. x then being finite, so are its values, which are marked so
    (``cpu_kernels.note_finite``): the encoder does not read them again.
    """
    finite, indices, values = _search(x, k)
    if not finite and check_finite is not None:
        check_finite(x)
    values = values if values is not None else x[indices]
    return indices, (cpu_kernels.note_finite(values) if check_finite is not None else values)


def _search(x: torch.Tensor, k: int, minus: torch.Tensor | None = None) -> tuple[bool, torch.Tensor, torch.Tensor | None] | None:
    """(whether x is known to be finite, the indices of ``top_k``, x at them or None).

    On the CPU every step but the compiled candidate pass runs in NumPy (the sample's magnitudes, the
    selections, the gathers from the candidates): a torch operation between them woke torch's
    OpenMP threads, which then spun on the cores that the candidate pass's threads needed (that
    pass took 5.5 ms instead of 4.1 at d = 1e7 on 2 cores).

    With ``minus`` (a CPU vector of x's float dtype and length), the same for x - minus where the
    sampled search runs with the compiled candidate pass, which forms the difference a cache-sized
    group at a time (``cpu_kernels.indices_at_least``); None where it does not (the caller then forms
    x - minus)."""
    m = x.numel()
    k = min(k, m)
    if minus is not None and not (x.device.type == minus.device.type == "cpu" and x.dtype == minus.dtype
                                  and x.dtype in (torch.float32, torch.float64) and minus.numel() == m):
        return None
    if k == 0 and minus is None:
        return False, torch.empty(0, dtype=torch.int64, device=x.device), None
    if k == m and minus is None:
        return False, torch.arange(m, device=x.device), None
    if m >= 1 << 16 and 0 < k <= m // 4:
        stride = max(MIN_STRIDE, m // (1 << 16))
        sample = _magnitudes(x[::stride] if minus is None else _difference(x[::stride], minus[::stride]))
        rank = min(sample.numel(), int(1.3 * k * sample.numel() / m) + 64)
        level = _kth_largest(sample, rank)  # a NaN among the largest sorts last: the check below raises
        sparse = bool(level == 0)  # most of the sample is zero: every nonzero coordinate is a candidate
        if sparse:
            level = torch.nextafter(torch.zeros((), dtype=level.dtype), torch.ones((), dtype=level.dtype))
        if bool(level > 0):
            found = _at_least(x, level, rank * m // sample.numel(), minus)
            if found is not None and found[0].numel() >= k:
                candidates, values, finite = found
                if values is None:
                    values = x.index_select(0, candidates)
                picked = _lowest_index_topk(_magnitudes(values), k)
                return finite, _take(candidates, picked), _take(values, picked)
            if found is not None and sparse and minus is None and found[2]:
                return True, *_with_lowest_zeros(x, found[0], k)
    if minus is not None:
        return None
    return False, _lowest_index_topk(x.abs(), k), None


def _with_lowest_zeros(x: torch.Tensor, nonzero: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``top_k`` of a vector with fewer than k nonzero coordinates (``nonzero``, ascending): all of
    them, and the k - len(nonzero) zeros of lowest index (ties go to the lower index), in order, with
    x at them (a zero keeps its sign). Without it such a vector took the search over all of x, where
    NumPy's selection among many equal magnitudes took 95 ms at d = 1e6 (6 ms without ties): EF21's
    difference g - h, nonzero where the last rounds moved g, is such a vector."""
    places = nonzero.numpy()
    first = np.arange(k, dtype=np.int64)  # the k lowest positions hold the zeros wanted (and some nonzeros)
    zeros = first[~np.isin(first, places[places < k], assume_unique=True)][:k - places.size]
    indices = torch.from_numpy(np.union1d(places, zeros))
    return indices, x.index_select(0, indices)


def _difference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a - b for CPU float vectors, through NumPy (see ``_search``); the bits of torch's a - b."""
    return torch.from_numpy(cpu_kernels.subtract(a.numpy(), b.numpy()))


def _magnitudes(t: torch.Tensor) -> torch.Tensor:
    """|t| (a new tensor); through NumPy for a CPU float vector (see ``_search``)."""
    if t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64):
        return torch.from_numpy(np.abs(t.detach().numpy()))
    return t.abs()


def _take(t: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """t[positions]; through NumPy for the CPU tensors it holds (see ``_search``)."""
    if t.device.type == "cpu" and t.dtype in (torch.int64, torch.float16, torch.float32, torch.float64):
        return torch.from_numpy(t.numpy()[positions.numpy()])
    return t[positions]


def _at_least(x: torch.Tensor, level: torch.Tensor, expect: int,
              minus: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None, bool] | None:
    """(sorted indices of |x_i| >= level (about ``expect`` of them), x at them or None, whether x is
    known to be finite): on a GPU in one masked pass; on the CPU in one compiled pass
    (``cpu_kernels.indices_at_least``), which also copies the values and tells whether every x_i is
    finite, else block by block (the mask stays in cache). With ``minus``: of x - minus by the
    compiled pass, or None."""
    if minus is not None:
        return cpu_kernels.indices_at_least(x, float(level), expect, minus)
    if x.device.type != "cpu":
        return torch.nonzero((x >= level).logical_or_(x <= -level)).flatten(), None, False
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
    return torch.cat(parts), None, False


def _lowest_index_topk(mag: torch.Tensor, k: int) -> torch.Tensor:
    """Positions in ``mag`` of its k largest values, ascending, ties to the lower position."""
    threshold = _kth_largest(mag, k)
    compiled = cpu_kernels.pick_top(mag, threshold, k)
    if compiled is not None:
        return compiled
    above = mag > threshold
    at = mag == threshold
    keep = above.logical_or_(at.logical_and_(torch.cumsum(at, 0) <= k - int(above.sum())))
    return torch.nonzero(keep).flatten()


def _kth_largest(mag: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest of ``mag`` as a 0-d tensor: on the CPU for float32/float64 by a radix selection
    over the magnitudes' bits (``cpu_kernels.kth_largest``), else by NumPy's selection (introselect),
    10x faster than torch's ``topk`` or ``kthvalue`` there (1e7 values, k = 1e6: 19-21 ms against
    100-170 ms); elsewhere the least of torch's ``topk``. On the 2-core CI host the radix selection
    took 0.05 ms where NumPy took 0.31 (the candidate level from a sample of 62,500), 0.75 against 6.4
    (1e6, k = 1e4) and 11 against 66 (1e7, k = 1e6); and NumPy's slows down on ties: 4.7 ms for a
    sample mostly of zeros, 94 ms for 1e6 zeros and ones, where the radix selection took 0.08 and
    2.7. All count a NaN as the largest value; the callers raise for non-finite input, so which
    finite or NaN level a NaN leads to does not reach a payload."""
    if mag.device.type == "cpu" and mag.dtype in (torch.float32, torch.float64, torch.float16):
        compiled = cpu_kernels.kth_largest(mag, k)
        if compiled is not None:
            return compiled
        values = mag.numpy()
        return torch.tensor(np.partition(values, values.size - k)[values.size - k])
    return torch.topk(mag, k, sorted=False).values.min()


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

    def _check_input(self, x):
        """Shape and type only: ``select`` checks finiteness, in the candidate pass where it runs."""
        self._check_shape(x)

    def select(self, x, key):
        idx, values = top_k(x, self.k, self._check_finite)
        return idx, None, values

    def _compress_difference(self, target, h, key):
        """C(target - h) with the difference formed only in the candidate pass's cache-sized groups
        and at the sample (``_search`` with ``minus``): the same payload as ``compress(target - h)``,
        without writing the difference and reading it back; None where the sampled search does not
        run or does not settle it (short vectors, large k, other devices or dtypes)."""
        found = _search(target, self.k, h)
        if found is None:
            return None
        finite, idx, values = found
        if not finite:
            self._check_finite(target - h)  # raises for the NaN or inf
        return Sparse(self.dim, Dense(cpu_kernels.note_finite(values), target.dtype), idx, None, target.dtype)
