"""Rand-K: k coordinates drawn uniformly without replacement.

* ``randk`` (scaled=true, default): values times d/k, unbiased, U(d/k) i.e. omega = d/k - 1
  (Beznosikov et al. eq. 8, Lemma 8); E||C(x)||^2 = (d/k)||x||^2 exactly. Workers draw independently,
  so the collection has theta = omega/n (Gruntkowska et al. Lemma A.5/A.6(b)).
* ``randk:scaled=false``: unscaled, biased random sparsification (eq. 9): B1(k/d,1), B2(k/d,1), B3(d/k);
  for independent workers theta = (1-q)^2 + q(1-q)/n with q = k/d (each coordinate is kept with
  probability q independently across workers).
* ``samerandk``: one draw per step shared by every worker (MARINA-P's SameRandK, Lemma A.6(a)): the
  workers get the same message and theta = omega.

The support is regenerated from the key by the receiver, so only the values travel: a uniform
k-subset drawn by chunks (``indices.randk_support``).
"""
from __future__ import annotations


from common.compressors.base import K_PARAMS, Constants, Param, Selection, Sparsifier, resolve_k, register
from common.compressors.indices import check_randk_dim, support_tensor
from common.compressors.payloads import Dense, IndexRule, Sparse


@register
class RandK(Sparsifier):
    name = "randk"
    summary = "k uniformly random coordinates, independent per worker (indices regenerated, not sent)"
    example = "randk:ratio=0.01"
    params = K_PARAMS + (Param("scaled", bool, True, doc="multiply by d/k (unbiased) or not (biased)"),)
    checks_in_select = True

    def __init__(self, dim, n_workers, seed, options, purpose="compress"):
        super().__init__(dim, n_workers, seed, options, purpose)
        check_randk_dim(dim)
        self.k = resolve_k(self.name, dim, self.options)
        self.scaled = self.options["scaled"]
        d, k, n = dim, self.k, n_workers
        q = k / d
        if self.scaled:
            self.selection = Selection(scale=d / k, gamma=1.0, max_out=k)
            self._set_constants(Constants(unbiased=True, omega=d / k - 1.0, b1=(d / k, d / k), b2=(1.0, d / k)))
        else:
            theta = (1 - q) if self.shared else (1 - q) ** 2 + q * (1 - q) / n
            self.selection = Selection(scale=1.0, gamma=q, max_out=k)
            self._set_constants(Constants(unbiased=False, alpha=q, b1=(q, 1.0), b2=(q, 1.0), theta=theta))

    def _rule(self, m, key):
        """The rule of the support of a vector of m coordinates, and the values' scale."""
        k = min(self.k, m)
        rule = IndexRule.keyed("randk", m, k, 0, (key.for_worker(0) if self.shared else key).child("support"))
        return rule, m / k if self.scaled else 1.0

    def select(self, x, key):
        rule, scale = self._rule(x.numel(), key)
        values = self._marked_values(x, rule, scale)  # a long support, read from a bitmap
        if values is not None:
            return None, rule, values
        self._check_finite(x)
        idx = support_tensor(rule.indices(), x.device)
        values = x.index_select(0, idx)  # (x[idx], through advanced indexing, took 0.24-0.83 ms at k = 1e5 against 0.13)
        if self.scaled:
            values = values * scale
        return None, rule, values

    def _compress_difference(self, target, h, key):
        """C(target - h) for a long support read through its bitmap, the difference formed in the
        gather's registers only (``_marked_values`` with ``minus``): the payload of
        ``compress(target - h)`` without writing the difference and reading it back (MARINA's and
        M3's uplink, Q(grad f_i(x^{t+1}) - grad f_i(x^t))). None elsewhere."""
        rule, scale = self._rule(target.numel(), key)
        values = self._marked_values(target, rule, scale, minus=h)
        if values is None:
            return None
        return Sparse(target.numel(), Dense(values, target.dtype), None, rule, target.dtype)


@register
class SameRandK(RandK):
    name = "samerandk"
    summary = "one Rand-K draw per step shared by all workers (same message to everyone)"
    example = "samerandk:ratio=0.01"
    shared = True
