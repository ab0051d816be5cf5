"""Coding of a sorted support (Top-K, adaptive) that must travel: Golomb-Rice gaps or a bitmap.

Given k strictly increasing indices in [0, d), the encoder computes both sizes exactly and sends the
smaller (a tie goes to the bitmap); the header records which (``RICE`` or ``BITMAP``) and the Rice
parameter r.

* ``BITMAP``: d bits, bit i set iff i is in the support (bit order of ``bitpack``), ceil(d/8) bytes.
* ``RICE`` with parameter r: the gaps g_0 = i_0, g_j = i_j - i_(j-1) - 1 (all >= 0) are split into a
  remainder g mod 2^r and a quotient g >> r. The frame is two sections, each byte-aligned:
  (1) the k remainders as fixed-width r-bit fields (``bitpack`` layout), ceil(k r / 8) bytes;
  (2) the k quotients in unary, each as q zero bits followed by a one bit, in order, zero-padded to a
  byte. The one bits then sit at positions cumsum(q + 1) - 1, so both coding and decoding are a
  cumsum and a scatter / nonzero, with no loop over entries. r is chosen around log2(ln 2 * mean gap)
  (the mean gap is (i_last + 1 - k) / k) by computing the exact size of four candidates. On the CPU
  the sizes and the frame come from two compiled passes over the indices (``cpu_kernels``:
  ``gap_quotient_sums``, ``rice_write``, ``bitmap_write``), with the same bytes.

A random support of k = d/100 costs about log2(d/k) + 1.1 bits an index (8.1 bits), within half a
percent of log2(C(d, k)) / k.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from common.compressors import cpu_kernels
from common.wire import bitpack
from common.wire.header import WireError

RICE, BITMAP = 0, 1
MAX_RICE = 32


def _ones_to_bytes(positions: torch.Tensor, nbits: int) -> torch.Tensor:
    """A zero bit stream of ``nbits`` with ones at the (distinct) ``positions``, packed (on their device)."""
    nbytes = (nbits + 7) // 8
    out = torch.zeros(nbytes, dtype=torch.int32, device=positions.device)
    if positions.numel():
        out.index_add_(0, positions >> 3, (1 << (positions & 7)).to(torch.int32))  # disjoint bits: add == or
    return out.to(torch.uint8)


def rice_candidates(k: int, last: int) -> list[int]:
    mean_gap = (last + 1 - k) / k
    centre = int(math.floor(math.log2(mean_gap * math.log(2)))) if mean_gap * math.log(2) >= 1 else 0
    return sorted({min(MAX_RICE - 1, max(0, centre + delta)) for delta in (-1, 0, 1, 2)})


def encode_indices(idx: torch.Tensor, dim: int) -> tuple[int, int, torch.Tensor]:
    """(method, rice parameter, packed uint8 tensor on idx's device) for sorted indices ``idx``."""
    k = idx.numel()
    bitmap_bytes = (dim + 7) // 8
    if k == 0:
        return RICE, 0, torch.empty(0, dtype=torch.uint8, device=idx.device)
    idx = idx.to(torch.int64)
    last = int(idx[-1])
    cands = rice_candidates(k, last)
    # on the CPU the sizes and the frame come from compiled passes over the indices (the same bytes)
    qsum = cpu_kernels.gap_quotient_sums(idx, cands)
    compiled = qsum is not None
    if not compiled:
        gaps = torch.diff(idx, prepend=idx.new_full((1,), -1)) - 1
        shifts = torch.tensor(cands, dtype=torch.int64, device=idx.device)
        qsum = (gaps.unsqueeze(0) >> shifts.unsqueeze(1)).sum(dim=1).tolist()  # one device sync
    sizes = [(k * r + 7) // 8 + (q + k + 7) // 8 for r, q in zip(cands, qsum)]
    best = min(range(len(cands)), key=lambda j: (sizes[j], cands[j]))
    if bitmap_bytes <= sizes[best]:
        frame = cpu_kernels.bitmap_frame(idx, dim) if compiled else None
        return BITMAP, 0, frame if frame is not None else _ones_to_bytes(idx, dim)
    r = cands[best]
    if compiled:
        return RICE, r, cpu_kernels.rice_frame(idx, r, (k * r + 7) // 8, (int(qsum[best]) + k + 7) // 8)
    rem = bitpack.pack(gaps & ((1 << r) - 1), r) if r else torch.empty(0, dtype=torch.uint8, device=idx.device)
    ones = torch.cumsum((gaps >> r) + 1, dim=0) - 1
    unary = _ones_to_bytes(ones, int(qsum[best]) + k)
    return RICE, r, torch.cat([rem, unary])


def _bits(data: np.ndarray) -> np.ndarray:
    return np.unpackbits(data, bitorder="little")


def decode_indices(data: np.ndarray, dim: int, k: int, method: int, r: int, what: str) -> torch.Tensor:
    """Indices (int64 host tensor) from a frame; every inconsistency raises ``WireError``."""
    n = data.size
    bitmap_bytes = (dim + 7) // 8
    if method == BITMAP:
        if n != bitmap_bytes:
            raise WireError(f"{what}: bitmap frame has {n} bytes, expected {bitmap_bytes} for d={dim}")
        bits = _bits(data)
        if bits[dim:].any():
            raise WireError(f"{what}: bitmap sets bits beyond the dimension d={dim}")
        idx = np.flatnonzero(bits)
        if idx.size != k:
            raise WireError(f"{what}: bitmap has {idx.size} indices, header says {k}")
        return torch.from_numpy(idx.astype(np.int64))
    if method != RICE:
        raise WireError(f"{what}: unknown index coding {method}")
    if not 0 <= r < MAX_RICE:
        raise WireError(f"{what}: Rice parameter {r} outside [0, {MAX_RICE})")
    if k == 0:
        if n:
            raise WireError(f"{what}: {n} index bytes for an empty support")
        return torch.empty(0, dtype=torch.int64)
    if n >= bitmap_bytes:
        raise WireError(f"{what}: Rice frame of {n} bytes is not smaller than a bitmap ({bitmap_bytes})")
    rem_bytes = (k * r + 7) // 8
    if rem_bytes + (k + 7) // 8 > n:
        raise WireError(f"{what}: index frame of {n} bytes is too short for {k} Rice codes with r={r}")
    rem_part = data[:rem_bytes]
    if k * r % 8 and int(rem_part[-1]) >> (k * r % 8):
        raise WireError(f"{what}: nonzero padding after the Rice remainders")
    compiled = cpu_kernels.rice_indices(data, rem_bytes, k, r, dim)  # one pass, the same checks in the same order
    if compiled is not None:
        status, value, idx = compiled
        if status == 0:
            return idx
        raise WireError(f"{what}: " + {
            1: f"Rice stream holds {value} codes, header says {k}",
            2: "Rice stream has trailing bytes after its last code",
            3: f"a Rice gap exceeds the dimension d={dim}",
            4: f"index {value} out of range for d={dim}"}[status])
    ones = np.flatnonzero(_bits(data[rem_bytes:]))
    if ones.size != k:
        raise WireError(f"{what}: Rice stream holds {ones.size} codes, header says {k}")
    if ones[-1] // 8 != n - rem_bytes - 1:
        raise WireError(f"{what}: Rice stream has trailing bytes after its last code")
    q = np.diff(ones, prepend=-1) - 1
    if int(q.max()) > (dim >> r):
        raise WireError(f"{what}: a Rice gap exceeds the dimension d={dim}")
    rem = bitpack.unpack(torch.from_numpy(rem_part.copy()), k, r).numpy() if r else 0
    gaps = (q.astype(np.int64) << r) | rem
    if int(gaps.max()) >= dim:
        raise WireError(f"{what}: a Rice gap exceeds the dimension d={dim}")
    idx = np.cumsum(gaps + 1) - 1
    if int(idx[-1]) >= dim:
        raise WireError(f"{what}: index {int(idx[-1])} out of range for d={dim}")
    return torch.from_numpy(idx)
