"""The sum of n vectors in the order torch adds them in ``torch.stack(rows).mean(0)`` on the CPU,
without the stack: at d = 1e7 and n = 8 the stack alone writes and reads 320 MB.

On the CPU that mean is ATen's sum over dim 0 (``cascade_sum``), + 0, divided by n. The sum adds
the rows of a column:

* for up to 4 rows, one after the other (``base.RUNNING_SUM_ROWS``);
* for 5 to 17 rows (``ORDERED_ROWS``), one after the other in every column but the last d mod G,
  G being four of ATen's vectors (``group``); in those last columns it keeps four partial sums from
  0 (rows k, k + 4, k + 8, ... into sum k), adds the rows past the last multiple of 4 into sum 0, then
  sums 1, 2 and 3 into sum 0 in that order (``interleaved_sum``);
* for more rows, in a cascade of blocks of 16, which is not reproduced here.

Up to 17 rows the blocks of 16 make no difference: the 17th row is added to the sum of the first 16,
which is the same sum as adding it last. On this project's build of torch the bits do not depend on
torch's thread count (it splits the columns between threads in whole groups): probed for 1 to 8
threads when this was written, and the tests check 1, 2 and 3.

"Bit for bit" holds for every finite and infinite value. Where NaNs of different signs or payloads
meet in one column, which one the sum keeps may differ from the stack's (as the running sum of 2 to 4
rows always could); runs never get there, since decoding refuses an uplink that is not finite.

G is not read from torch (the vector width of its sum kernel is not public): ``group`` tries each
candidate on two probes against torch's own result, once per dtype and process, at the thread count
of the moment, and keeps the one that gives torch's bits (128 bytes with torch 2.13's CPU wheel on
an AMD Zen 4 host: 32 float32 or 16 float64). Where none does (another build or CPU), or for vectors
shorter than ``MIN_ORDERED``, half precision, or another device, the callers stack as before. A
build whose G were larger than the span at which torch splits columns between threads would put
such columns inside the vector too; the probes would catch that only at their lengths and thread
count, so on another build the tests above are the check.
"""
from __future__ import annotations

import functools

import torch

ORDERED_ROWS = range(5, 18)  # numbers of rows whose sum ``ordered_sum`` gives (fewer: a running sum)
MIN_ORDERED = 1 << 12  # coordinates below which the callers stack (cheap; ATen's other paths start below G)
GROUP_BYTES = (32, 64, 128, 256, 512)  # candidates for G, in bytes: 4 vectors of 64 to 1024 bits
_PROBE_DIMS = (MIN_ORDERED + 2 * 512 - 3, (1 << 16) + 511)  # two lengths whose last columns fill no group (the longer one split among threads)


def interleaved_sum(columns: list[torch.Tensor]) -> torch.Tensor:
    """ATen's sum of 5 or more rows in its last columns (``row_sum``): four partial sums from 0, rows
    k, k + 4, ... in sum k; the rows past the last multiple of 4 into sum 0; then sums 1, 2, 3 into
    sum 0."""
    full = len(columns) // 4 * 4
    partial = [torch.zeros_like(columns[0]) for _ in range(4)]
    for i in range(full):
        partial[i % 4].add_(columns[i])
    for i in range(full, len(columns)):
        partial[0].add_(columns[i])
    for k in range(1, 4):
        partial[0].add_(partial[k])
    return partial[0]


def _sum_from(vectors: list[torch.Tensor], cut: int) -> torch.Tensor:
    """The rows added one after the other in columns 0 .. cut - 1, then + 0 (ATen adds the sum into a
    zero output: a sum of -0s is +0), and in four partial sums from column ``cut`` on
    (``interleaved_sum``, from +0)."""
    total = torch.add(vectors[0], vectors[1])
    for v in vectors[2:]:
        total.add_(v)
    total.add_(0.0)
    if cut < total.numel():
        total[cut:] = interleaved_sum([v[cut:] for v in vectors])
    return total


@functools.lru_cache(maxsize=None)
def group(dtype: torch.dtype) -> int | None:
    """G in coordinates of ``dtype``: the candidate whose order gives torch's own bits for 5 and 9 rows
    of two lengths (values of magnitudes 1e-6 to 1e6, where the order of additions shows), or None."""
    if dtype not in (torch.float32, torch.float64):
        return None
    size = torch.finfo(dtype).bits // 8
    gen = torch.Generator().manual_seed(20261207)
    probes = []
    for dim in _PROBE_DIMS:
        rows = [torch.randn(dim, generator=gen, dtype=torch.float64) * 10.0 ** torch.randint(-6, 7, (dim,), generator=gen)
                for _ in range(9)]
        probes += [[r.to(dtype) for r in rows[:5]], [r.to(dtype) for r in rows]]
    expected = [torch.stack(rows).sum(0) for rows in probes]
    for candidate in GROUP_BYTES:
        g = candidate // size
        if candidate % size == 0 and all(torch.equal(_sum_from(rows, rows[0].numel() - rows[0].numel() % g), want)
                                         for rows, want in zip(probes, expected)):
            return g
    return None


def first_interleaved(vectors: list[torch.Tensor]) -> int | None:
    """The first of the last columns that ATen sums in four partial sums, where ``ordered_sum``
    applies to ``vectors`` (see ``ordered_sum``); None where it does not."""
    first = vectors[0]
    if (len(vectors) not in ORDERED_ROWS or first.device.type != "cpu" or first.dim() != 1
            or first.numel() < MIN_ORDERED
            or any(v.shape != first.shape or v.dtype != first.dtype or v.device != first.device for v in vectors)):
        return None
    size = group(first.dtype)
    return None if size is None else first.numel() - first.numel() % size


def ordered_sum(vectors: list[torch.Tensor]) -> torch.Tensor | None:
    """ATen's sum over dim 0 of ``torch.stack(vectors)``, bit for bit, as a new vector, for 5 to 17
    CPU float32/float64 vectors of one length of at least ``MIN_ORDERED`` where ``group`` found G;
    None otherwise. torch's mean is this sum divided by n."""
    cut = first_interleaved(vectors)
    return None if cut is None else _sum_from(vectors, cut)
