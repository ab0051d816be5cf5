"""Composition ``S + T``: a sparsifier S, then any compressor T applied to the values S kept.

Examples: ``topk:ratio=0.01+natdither:s=2,p=inf`` (Beznosikov et al. eq. 16), ``permk+natural`` and
``randk:k=100+natural`` (MARINA-P / M3 section F). T works on the k kept values only, so a dithering
norm is taken over the kept entries (spec pitfall 6), and T's constants are those for dimension
max_out(S) (for Perm-K blocks of ceil(d/n) or floor(d/n), the larger one, the worst case for every
compressor here).

Constants of what is actually output (spec pitfall 4), with S keeping coordinates scaled by s,
<E S x, x> >= g_S||x||^2, and y = S(x):

* E C = E_S E_T[T(y)]; since T(y) lives on y's support and y = s x there,
  <E C, x> = (1/s) E<E_T T(y), y> >= (g_T / s) E||y||^2 = g_T <E S x, x> >= g_T g_S ||x||^2, and
  E||C||^2 <= b_T E<E_T T(y), y> = b_T s <E C, x>: so B2(g_T g_S, b_T s); likewise
  E||C||^2 >= a_T E||y||^2 >= a_T s g_S ||x||^2 gives B1(a_T s g_S, b_T s). For Top-K + dithering
  this is Lemma 16's B1(k/d, zeta_b), B2(k/d, zeta_b); alpha follows from B2 where b_T s < 2 and is
  otherwise not declared (scale the chain by 1/zeta_b to make it contractive, as the paper does).
* Both unbiased: omega = (1 + omega_S)(1 + omega_T) - 1 (independent randomness), and for the
  collection theta = theta_S + omega_T (1 + omega_S)/n when T is drawn per worker (Perm-K + natural:
  theta = 1/8), or omega when S is shared (same-Rand-K: every stage uses one draw, one message).
"""
from __future__ import annotations

from common.compressors.base import Compressor, Constants, Sparsifier
from common.compressors.payloads import Sparse


def chain_constants(head: Sparsifier, tail: Constants, n_workers: int, shared: bool) -> Constants:
    sel, hc = head.selection, head.constants_obj
    b1 = b2 = None
    if tail.b1 is not None:
        b1 = (tail.b1[0] * sel.scale * sel.gamma, tail.b1[1] * sel.scale)
    if tail.b2 is not None:
        b2 = (tail.b2[0] * sel.gamma, tail.b2[1] * sel.scale)
    if hc.unbiased and tail.unbiased and hc.omega is not None and tail.omega is not None:
        omega = (1 + hc.omega) * (1 + tail.omega) - 1
        theta = omega if shared else hc.theta + tail.omega * (1 + hc.omega) / n_workers
        return Constants(unbiased=True, omega=omega, b1=b1, b2=b2, theta=theta)
    return Constants(unbiased=False, b1=b1, b2=b2)


class Chain(Compressor):
    """``head + tail``: the payload is Sparse(support of head, values = tail's payload)."""

    def __init__(self, head: Sparsifier, tail: Compressor):
        self.name = f"{head.name}+{tail.name}"
        super().__init__(head.dim, head.n_workers, head.seed, {}, head.purpose)
        self.head, self.tail = head, tail
        self.shared = head.shared
        self._set_constants(chain_constants(head, tail.constants_obj, self.n_workers, self.shared))

    @property
    def spec(self):
        return f"{self.head.spec}+{self.tail.spec}"

    def _check_input(self, x):
        """The head's check: a head that checks finiteness in ``select`` (Top-K, Perm-K, Rand-K) is not checked twice."""
        self.head._check_input(x)

    def _compress(self, x, key):
        indices, rule, values = self.head.select(x, key)
        tail_key = key.child("stage")
        if self.shared:
            tail_key = tail_key.for_worker(0)
        return Sparse(x.numel(), self.tail._compress(values, tail_key), indices, rule, x.dtype)
