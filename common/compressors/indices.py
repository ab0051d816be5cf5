"""Supports that both ends of a link regenerate from a key instead of sending them.

Rand-K (Beznosikov et al. eq. 8) draws k of d coordinates uniformly without replacement. Perm-K
(Gruntkowska et al. Def. 4.1, and spec/marina-p-m3.md section 1 for n not dividing d and for d < n)
gives worker i block i of one random permutation shared by all workers at a step.

Draws happen on the host with NumPy's PCG64 keyed by the rule's 64-bit code, so a CPU server and a
CUDA worker get the same indices. The last few results are cached: a server that compresses n Perm-K
messages at one step computes the permutation once.
"""
from __future__ import annotations

import functools

import numpy as np
import torch

from common.keys import numpy_rng


def regenerate(rule) -> np.ndarray:
    if rule.kind == "randk":
        return randk_support(rule.dim, rule.count, rule.key)
    if rule.kind == "permk":
        return permk_support(rule.dim, rule.count, rule.worker, rule.key)
    raise ValueError(f"unknown index rule {rule.kind!r}")


def _frozen(a: np.ndarray) -> np.ndarray:
    """Cached results are shared: they are read-only, and ``support_tensor`` copies them."""
    a.setflags(write=False)
    return a


def support_tensor(indices: np.ndarray, device) -> torch.Tensor:
    """A private int64 tensor copy of a (cached, read-only) support on ``device``."""
    return torch.tensor(indices, dtype=torch.int64, device=device)


@functools.lru_cache(maxsize=64)
def randk_support(dim: int, k: int, key: int) -> np.ndarray:
    """Sorted k-subset of range(dim), uniform over all subsets."""
    rng = numpy_rng(key)
    if k == dim:
        return _frozen(np.arange(dim, dtype=np.int64))
    return _frozen(np.sort(rng.choice(dim, size=k, replace=False)).astype(np.int64))


@functools.lru_cache(maxsize=8)
def _permutations(dim: int, n: int, key: int) -> tuple[np.ndarray, np.ndarray]:
    rng = numpy_rng(key)
    coord_perm = rng.permutation(dim) if dim >= n else np.arange(dim)
    worker_perm = rng.permutation(n)
    return coord_perm, worker_perm


def permk_blocks(dim: int, n: int) -> list[int]:
    """Block sizes for d >= n: ceil(d/n) for the first d mod n blocks, floor(d/n) for the rest."""
    q, r = divmod(dim, n)
    return [q + 1 if b < r else q for b in range(n)]


def permk_scale(dim: int, n: int) -> float:
    """The factor every kept value is multiplied by: n for d >= n, n/q for d < n with n = q d + r."""
    return float(n) if dim >= n else n / (n // dim)


@functools.lru_cache(maxsize=4096)
def permk_support(dim: int, n: int, worker: int, key: int) -> np.ndarray:
    """Worker ``worker``'s sorted support for the step keyed by ``key``.

    d >= n: a random permutation of the coordinates is cut into n blocks (sizes of ``permk_blocks``),
    and a random permutation of the workers assigns the blocks, so each worker's support is uniformly
    distributed whatever its index. The blocks are disjoint and cover range(d).
    d < n, n = q d + r: the workers are randomly ordered; positions 0..q d - 1 get coordinate
    position mod d (each coordinate goes to exactly q workers), the last r workers get nothing.
    """
    coord_perm, worker_perm = _permutations(dim, n, key)
    slot = int(worker_perm[worker])
    if dim >= n:
        q, r = divmod(dim, n)
        start = slot * q + min(slot, r)
        size = q + (1 if slot < r else 0)
        return _frozen(np.sort(coord_perm[start:start + size]).astype(np.int64))
    q = n // dim
    if slot < q * dim:
        return _frozen(np.array([slot % dim], dtype=np.int64))
    return _frozen(np.empty(0, dtype=np.int64))
