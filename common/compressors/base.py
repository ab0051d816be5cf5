"""The compressor interface, its registry (``@register``) and the theory constants every compressor declares.

Constants follow INTERFACE.md (None where the class does not apply, every bound for every x):

* ``unbiased``: E C(x) = x.
* ``omega``: E||C(x) - x||^2 <= omega ||x||^2 (unbiased compressors).
* ``alpha``: E||C(x) - x||^2 <= (1 - alpha) ||x||^2, alpha in (0, 1] (contractive class, B3(1/alpha)).
* ``b1`` = [a, b]: a||x||^2 <= E||C(x)||^2 <= b <E C(x), x>  (Beznosikov et al., class B1).
* ``b2`` = [g, b]: max(g||x||^2, E||C(x)||^2 / b) <= <E C(x), x>  (class B2).
* ``theta``: for the collection C_1..C_n fed the same x, E||(1/n) sum_i C_i(x) - x||^2 <= theta||x||^2.

``Constants.complete`` derives what follows from the rest, with the paper's own arguments:
an unbiased C in U(zeta) is in B1(1, zeta) and B2(1, zeta) (Thm 7 with lambda = 1); any C in
B2(g, b) with b < 2 is contractive with alpha = g (2 - b) (expand E||C - x||^2 and use both B2
bounds; lambda = 1/b gives Thm 6's B3(b/g)); theta is omega/n for independent unbiased workers
(Lemma A.5), omega for one shared draw, and 1 - alpha for a biased collection (Jensen).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from common.compressors import cpu_kernels
from common.keys import StreamKey
from common.options import Param, Registry, parse_options  # noqa: F401  (Param: the compressors' option type)


@dataclass(frozen=True)
class Constants:
    unbiased: bool
    omega: float | None = None
    alpha: float | None = None
    b1: tuple[float, float] | None = None
    b2: tuple[float, float] | None = None
    theta: float | None = None

    def complete(self, n_workers: int, shared: bool) -> "Constants":
        c = self
        if c.unbiased and c.omega is not None:
            zeta = 1.0 + c.omega
            if c.b1 is None:
                c = replace(c, b1=(1.0, zeta))
            if c.b2 is None:
                c = replace(c, b2=(1.0, zeta))
        if c.b2 is not None and c.b2[1] < 2.0:
            derived = c.b2[0] * (2.0 - c.b2[1])
            if derived > 0 and (c.alpha is None or derived > c.alpha):
                c = replace(c, alpha=min(1.0, derived))
        if c.theta is None:
            if c.unbiased and c.omega is not None:
                c = replace(c, theta=c.omega if shared else c.omega / n_workers)
            elif c.alpha is not None:
                c = replace(c, theta=1.0 - c.alpha)
        return c

    def as_dict(self) -> dict[str, Any]:
        def clean(v):
            if v is None or isinstance(v, bool):
                return v
            if isinstance(v, tuple):
                return [clean(x) for x in v]
            return float(v)

        return {k: clean(getattr(self, k)) for k in ("unbiased", "omega", "alpha", "b1", "b2", "theta")}


def resolve_k(owner: str, dim: int, options: dict[str, Any], default_ratio: float | None = None) -> int:
    """k from ``k=`` (a count) or ``ratio=`` (a fraction of dim, rounded, at least 1)."""
    if "k" in options and "ratio" in options:
        raise ValueError(f"{owner}: give k= or ratio=, not both")
    if "k" in options:
        k = options["k"]
        if k < 1:
            raise ValueError(f"{owner}: k={k} must be at least 1")
        if k > dim:
            raise ValueError(f"{owner}: k={k} is larger than the dimension d={dim}")
        return k
    ratio = options.get("ratio", default_ratio)
    if ratio is None:
        raise ValueError(f"{owner}: needs k= (a count) or ratio= (a fraction of d)")
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"{owner}: ratio={ratio} must be in (0, 1]")
    return max(1, min(dim, round(ratio * dim)))


K_PARAMS = (
    Param("k", int, None, lambda v: v >= 1, "at least 1", "number of kept coordinates"),
    Param("ratio", float, None, lambda v: 0 < v <= 1, "in (0, 1]", "fraction of coordinates kept"),
)


class Compressor:
    """A compressor for 1-D float vectors of a fixed dimension, built by ``common.compressors.build``.

    Subclasses set ``name``, ``params`` and ``summary``, compute their constants in ``__init__`` and
    implement ``_compress(x, key)``. ``_compress`` may be handed shorter vectors when the compressor is
    the tail of a chain (it then compresses the values a sparsifier kept).
    """

    name: str = ""
    summary: str = ""
    params: tuple[Param, ...] = ()
    shared: bool = False  # one draw for all workers at a step (same-Rand-K, Perm-K's permutation)
    is_sparsifier: bool = False
    compiled: bool = False  # its CPU path runs ``cpu_kernels`` (warmed before a run's clock starts)

    def __init__(self, dim: int, n_workers: int, seed: int, options: dict[str, Any], purpose: str = "compress"):
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"{self.name}: dimension d={dim!r} must be a positive integer")
        if isinstance(n_workers, bool) or not isinstance(n_workers, int) or n_workers < 1:
            raise ValueError(f"{self.name}: n_workers={n_workers!r} must be a positive integer")
        self.dim = dim
        self.n_workers = n_workers
        self.seed = int(seed)
        self.purpose = purpose
        self.options = self._parse_options(options)
        self.constants_obj = Constants(unbiased=False)

    # -- options -------------------------------------------------------------------------------
    def _parse_options(self, options: dict[str, Any]) -> dict[str, Any]:
        """The options, checked by the shared parser; an option whose default is None is left out
        unless given. Subclasses that fix an option (natural: base=2) add it here."""
        return parse_options(self.name, self.params, options, keep_unset=False)

    # -- constants -----------------------------------------------------------------------------
    def _set_constants(self, constants: Constants) -> None:
        self.constants_obj = constants.complete(self.n_workers, self.shared)

    @property
    def constants(self) -> dict[str, Any]:
        return self.constants_obj.as_dict()

    # -- compress / decompress -----------------------------------------------------------------
    def compress(self, x: torch.Tensor, worker: int = 0, step: int = 0):
        """Compress ``x`` (1-D float tensor of length d, any device) for ``worker`` at ``step``."""
        self._check_input(x)
        return self._compress(x, self._key(worker, step))

    def compress_difference(self, target: torch.Tensor, h: torch.Tensor, worker: int = 0, step: int = 0):
        """``compress(target - h, worker, step)``: the sender's Markov message (``memory``). A
        compressor whose pass can read the difference as it goes, without forming it, implements
        ``_compress_difference`` (the scaled sign, Top-K, a long Rand-K; identity): its inputs are checked as ``compress``
        checks x, and where it returns None the difference is formed; the payload is the same."""
        if type(self)._compress_difference is not Compressor._compress_difference:
            self._check_shape(target)
            self._check_shape(h)
            payload = self._compress_difference(target.detach(), h.detach(), self._key(worker, step))
            if payload is not None:
                return payload
        return self.compress(target - h, worker, step)

    def _compress_difference(self, target: torch.Tensor, h: torch.Tensor, key: StreamKey):
        """The payload of target - h without forming it, or None where this compressor cannot."""
        return None

    def _key(self, worker: int, step: int) -> StreamKey:
        """The draws' key of ``worker`` at ``step``, which must be in range."""
        if isinstance(worker, bool) or not isinstance(worker, int) or not 0 <= worker < self.n_workers:
            raise ValueError(f"{self.name}: worker={worker!r} must be an integer in [0, {self.n_workers})")
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"{self.name}: step={step!r} must be a non-negative integer")
        return StreamKey(self.seed, step, worker, self.purpose)

    def decompress(self, payload) -> torch.Tensor:
        """The dense vector a payload stands for, on the payload's device, in the input's dtype."""
        return payload.to_dense()

    def _compress(self, x: torch.Tensor, key: StreamKey):
        raise NotImplementedError

    def _check_input(self, x: torch.Tensor) -> None:
        self._check_shape(x)
        self._check_finite(x)

    def _check_shape(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{self.name}: input must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 1:
            raise ValueError(f"{self.name}: input must be 1-D, got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"{self.name}: input must be a float tensor, got {x.dtype}")
        if x.numel() != self.dim:
            raise ValueError(f"{self.name}: input has {x.numel()} coordinates, compressor was built for d={self.dim}")

    def _check_finite(self, x: torch.Tensor) -> None:
        if not all_finite(x):
            bad = int((~torch.isfinite(x)).sum())
            raise ValueError(f"{self.name}: input has {bad} non-finite value(s) (NaN or inf)")

    # -- description ---------------------------------------------------------------------------
    @property
    def spec(self) -> str:
        if not self.options:
            return self.name
        return self.name + ":" + ",".join(f"{k}={v}" for k, v in self.options.items())

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.spec} d={self.dim} n={self.n_workers}>"


REGISTRY: Registry[type[Compressor]] = Registry("compressor")
register = REGISTRY.register  # class decorator: ``@register`` makes a compressor buildable by its name


@dataclass(frozen=True)
class Selection:
    """What a sparsifier does to the values it keeps, for the constants of a chain it heads.

    It keeps at most ``max_out`` coordinates and multiplies each by ``scale``; ``gamma`` bounds
    <E S(x), x> >= gamma ||x||^2. Then E||S(x)||^2 = scale <E S(x), x> (each kept coordinate
    contributes scale^2 x_j^2 with probability p_j, and <E S x, x> = sum scale p_j x_j^2).
    """

    scale: float
    gamma: float
    max_out: int


class Sparsifier(Compressor):
    """A compressor that keeps some coordinates (possibly scaled): it can head a ``+`` chain."""

    is_sparsifier = True
    selection: Selection
    checks_in_select = False  # ``select`` checks x's finiteness itself (in its compiled gather)

    def select(self, x: torch.Tensor, key: StreamKey):
        """Return (indices or None, IndexRule or None, kept values) for ``x``."""
        raise NotImplementedError

    def _check_input(self, x: torch.Tensor) -> None:
        self._check_shape(x)
        if not self.checks_in_select:
            self._check_finite(x)

    def _marked_values(self, x: torch.Tensor, rule, scale: float, minus: torch.Tensor | None = None) -> torch.Tensor | None:
        """x.index_select(0, support) * scale for the regenerated support of ``rule``, read through
        its bitmap (``indices.marked_support``) in one compiled pass over x, which also checks that
        x is finite (raising for a NaN or inf); with ``minus``, all of this of x - minus, which is
        not formed. None where no bitmap applies (a GPU tensor, another dtype, a rule without one,
        a ``minus`` unlike x): the caller checks x and gathers by index."""
        from common.compressors import cpu_kernels
        from common.compressors.indices import marked_support

        if x.device.type != "cpu" or x.dtype not in cpu_kernels.MARKED_DTYPES:
            return None
        marked = marked_support(rule)
        gathered = cpu_kernels.gather_marked(x, *marked, scale, minus) if marked is not None else None
        if gathered is None:
            return None
        values, finite = gathered
        if not finite:  # (x, or a product x_i * scale, is not finite)
            self._check_finite(x if minus is None else x - minus)  # raises for a NaN or inf in x
        return values

    def _compress(self, x: torch.Tensor, key: StreamKey):
        from common.compressors.payloads import Dense, Sparse

        indices, rule, values = self.select(x, key)
        return Sparse(x.numel(), Dense(values, x.dtype), indices, rule, x.dtype)


_EXPONENT_MASK = {torch.float16: 0x7C00, torch.bfloat16: 0x7F80}  # a 16-bit float's exponent field


def all_finite(t: torch.Tensor) -> bool:
    """Whether every value is finite. A vector that a compiled pass saw finite as it wrote it and
    that has not changed since is not read again (``cpu_kernels.known_finite``: the server's new
    model after a descent or AMSGrad step). On the CPU NumPy answers without torch's per-op overhead
    (which dominates for the small vectors of runs with many workers)."""
    if t.numel() == 0 or cpu_kernels.known_finite(t):
        return True
    if t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64) and t.numel() >= 1 << 16:
        # a finite sum proves every value finite (an inf or NaN makes the sum inf or NaN); one
        # reduction without a temporary, 3x faster than isfinite at d = 1e7. Only a sum that
        # overflows (or a true inf/NaN) takes the exact pass below.
        if bool(torch.isfinite(t.detach().sum())):
            return True
    if t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64):
        return bool(np.isfinite(t.detach().numpy()).all())
    if t.device.type == "cpu" and t.dtype in _EXPONENT_MASK:  # exponent field all ones: inf or NaN
        mask = _EXPONENT_MASK[t.dtype]  # (NumPy's isfinite on float16 was 2-8x slower)
        return int(t.detach().view(torch.int16).bitwise_and(mask).amax()) < mask
    return bool(torch.isfinite(t).all())


def float32_scalar(value: torch.Tensor) -> torch.Tensor:
    """A 0-d float32 tensor: scales and norms travel in float32 and both sides use the rounded value."""
    return value.detach().reshape(()).to(torch.float32)


def float64_norm(x: torch.Tensor, p: int, negative: torch.Tensor | None = None,
                 minus: torch.Tensor | None = None) -> torch.Tensor | None:
    """||x||_p for p = 1 or 2, accumulated in float64 (a float32 sum can overflow), as a 0-d float64
    tensor. On the CPU a vector of ``cpu_kernels.MIN_CHUNK`` coordinates or more is summed in float64
    blocks instead of through a float64 copy of all of it; that sum can differ from a one-piece sum
    in its last bits (and torch's one-piece sum of more than a block itself depends on its thread
    count). Where Numba is present, ``cpu_kernels.float64_sum`` adds the same blocks in the same
    order in one pass (the same bits): at d = 1e6 on one thread 0.8 ms with the signs against 2.5 ms
    for torch's abs, float64 sum and ``torch.lt``. Shorter vectors keep torch's sum (no compiled
    kernel is loaded for them). ``negative``: a bool tensor of x's shape on x's device, into which
    x < 0 is written too; in the compiled pass while each piece of x is in the cache, else by
    ``torch.lt``. ``minus``: the norm (and the flags) of x - minus in the compiled pass, which never
    forms that vector (``cpu_kernels.float64_block_sums``); None where that pass does not run (the
    caller forms x - minus)."""
    if x.device.type != "cpu" or x.numel() < cpu_kernels.MIN_CHUNK:
        if minus is not None:
            return None
        if negative is not None:
            torch.lt(x, 0, out=negative)
        return x.abs().sum(dtype=torch.float64) if p == 1 else torch.linalg.vector_norm(x, dtype=torch.float64)
    flags = negative.numpy().reshape(-1) if negative is not None else None
    total = cpu_kernels.float64_sum(x, p, FLOAT64_BLOCK, flags, minus)  # the same sum in one compiled pass
    if total is not None:
        total = torch.tensor(total, dtype=torch.float64)
    elif minus is not None:
        return None
    else:
        if negative is not None:
            torch.lt(x, 0, out=negative)
        total = torch.zeros((), dtype=torch.float64)
        for block in float64_blocks(x):
            total += block.abs_().sum() if p == 1 else block.square_().sum()
    return total if p == 1 else total.sqrt_()  # torch's square root (not always the nearest float64)


FLOAT64_BLOCK = 1 << 15  # coordinates per float64 block


def float64_blocks(x: torch.Tensor, size: int = FLOAT64_BLOCK):
    """The consecutive blocks of ``size`` coordinates of a CPU vector, each converted to float64 in
    one reused buffer (valid until the next block; a fresh buffer for each would be fresh pages)."""
    buf = torch.empty(min(x.numel(), size), dtype=torch.float64)
    for i in range(0, x.numel(), size):
        yield buf[: min(size, x.numel() - i)].copy_(x[i:i + size])


def finite_positive(v: float) -> bool:
    return v > 0 and math.isfinite(v)
