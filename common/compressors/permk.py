"""Perm-K (Gruntkowska et al. Def. 4.1; spec/marina-p-m3.md section 1): a correlated collection.

At each step one random permutation, shared by all n workers, is cut into n disjoint blocks that cover
[d]; worker i gets its block scaled by n. Each C_i is unbiased with omega = n - 1 exactly
(E||C_i(x)||^2 = n||x||^2), and (1/n) sum_i C_i(x) = x for every draw, so theta = 0.
For d < n (n = q d + r) each coordinate goes to exactly q workers scaled by n/q, r workers get
nothing, and omega = n/q - 1 (Lemma A.6). See ``indices.permk_support`` for the construction (for
large d a keyed bijection that each worker evaluates on its own block only).
"""
from __future__ import annotations

import math

from common.compressors.base import Constants, Selection, Sparsifier, register
from common.compressors.indices import permk_scale, support_on
from common.compressors.payloads import IndexRule


@register
class PermK(Sparsifier):
    name = "permk"
    summary = "worker i gets block i of a shared random permutation, scaled by n; the n messages average to x"
    example = "permk"
    compiled = True  # a large d's keyed bijection runs as one compiled pass on the CPU (indices.keyed_block)
    checks_in_select = True

    def __init__(self, dim, n_workers, seed, options, purpose="compress"):
        super().__init__(dim, n_workers, seed, options, purpose)
        d, n = dim, n_workers
        scale = permk_scale(d, n)
        zeta = scale  # E||C_i(x)||^2 = scale ||x||^2
        self.selection = Selection(scale=scale, gamma=1.0, max_out=math.ceil(d / n) if d >= n else 1)
        self._set_constants(Constants(unbiased=True, omega=zeta - 1.0, b1=(zeta, zeta), b2=(1.0, zeta), theta=0.0))

    def select(self, x, key):
        m = x.numel()
        rule = IndexRule.keyed("permk", m, self.n_workers, key.worker, key.for_worker(0).child("permutation"))
        scale = permk_scale(m, self.n_workers)
        values = self._marked_values(x, rule, scale)  # the block read from a bitmap, unsorted
        if values is not None:
            return None, rule, values
        self._check_finite(x)
        return None, rule, x.index_select(0, support_on(rule, x.device)).mul_(scale)
