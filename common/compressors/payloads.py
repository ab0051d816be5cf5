"""Typed payloads: what a compressor produces and what the wire layer turns into bytes.

A payload is self-contained: ``to_dense()`` rebuilds the dense vector from the payload alone (indices
that were not sent are regenerated from the ``IndexRule`` it carries). Every payload remembers the
``dtype`` of the vector it came from and decompresses to that dtype, on the device its tensors are on.

Kinds:

* ``Dense``: the values themselves, possibly cast to fp16/bf16.
* ``Sparse``: a support (sent ``indices``, or a ``rule`` that regenerates them) and a payload of the
  kept values (``Dense``, or any other payload when a chain compresses the values further).
* ``Signs``: one sign per coordinate and one float32 scale (sign(0) is +1).
* ``Quantized``: a sign and a code per coordinate into a level table, times an optional float32 norm
  (exponential rounding, natural compression, dithering, QSGD, ternary).
* ``Scaled``: a float32 factor times another payload.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Union

import numpy as np
import torch

from common.compressors import cpu_kernels, indices as index_sets
from common.keys import MASK64, StreamKey, mix, purpose_code


@dataclass(frozen=True)
class LevelTable:
    """The non-negative levels that a ``Quantized`` payload's codes index.

    * ``kind="exp"``: exponential dithering, levels [0, b^(1-s), ..., b^-1, 1] (spec eq. 14).
    * ``kind="uniform"``: standard dithering / QSGD, levels [0, 1/s, ..., 1]; ternary is s = 1.
    * ``kind="rounding"``: exponential rounding, levels [0, b^emin, ..., b^emax] where emin, emax cover
      the positive range of ``dtype`` (eq. 12 with a_k = b^k, truncated to what the dtype holds).

    Level values are computed once on the host in float64 and cast, so every device reads the same
    numbers from the table.
    """

    kind: str
    base: float
    s: int = 0
    dtype_name: str = "float32"

    def host_values(self) -> np.ndarray:
        return _host_levels(self)

    def values(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return _device_levels(self, dtype, device)

    def __len__(self) -> int:
        return len(self.host_values())

    @property
    def code_bits(self) -> int:
        return max(1, math.ceil(math.log2(len(self))))


@functools.lru_cache(maxsize=64)
def rounding_exponent_range(base: float, dtype: torch.dtype) -> tuple[int, int]:
    """The exponents e with base^e inside the positive finite range of ``dtype`` (subnormals included)."""
    info = torch.finfo(dtype)
    smallest = float(info.smallest_normal) * float(info.eps)  # the smallest subnormal
    emin = math.floor(math.log(smallest) / math.log(base))
    emax = math.floor(math.log(float(info.max)) / math.log(base))
    while _power_fits(base, emax + 1, float(info.max)):
        emax += 1
    while not _power_fits(base, emax, float(info.max)):
        emax -= 1
    return emin, emax


def _power_fits(base: float, exponent: int, limit: float) -> bool:
    try:
        return base ** exponent <= limit
    except OverflowError:
        return False


@functools.lru_cache(maxsize=64)
def _host_levels(table: LevelTable) -> np.ndarray:
    b, s = table.base, table.s
    if table.kind == "uniform":
        levels = np.arange(s + 1, dtype=np.float64) / s
    elif table.kind == "exp":
        levels = np.concatenate([[0.0], b ** np.arange(1 - s, 1, dtype=np.float64)])
    elif table.kind == "rounding":
        emin, emax = rounding_exponent_range(b, getattr(torch, table.dtype_name))
        exps = np.arange(emin, emax + 1)
        if b == 2.0:
            powers = np.ldexp(1.0, exps)  # exact, also below float64's normal range
        else:
            powers = np.power(b, exps.astype(np.float64))
        levels = np.concatenate([[0.0], powers])
    else:
        raise ValueError(f"unknown level table kind {table.kind!r}")
    levels.setflags(write=False)
    return levels


@functools.lru_cache(maxsize=256)
def _device_levels(table: LevelTable, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(_host_levels(table).copy()).to(dtype).to(device)


@dataclass(frozen=True)
class IndexRule:
    """How to regenerate a support that is not sent: ``kind`` is "randk" or "permk"; ``count`` is k
    for Rand-K and the number of workers n for Perm-K; ``worker`` the block a Perm-K message holds.

    The support's random stream is named by its parts, (``seed``, ``step``, ``key_worker``,
    ``purpose`` code), not by their 64-bit mix ``key``: on a link, seed, key worker and purpose never
    change and the step advances with the round, so the lean wire form (``common.wire.stream``)
    predicts all four and sends none of them (MARINA-P's and EF21-P's supports are derived, not sent).
    """

    kind: str
    dim: int
    count: int
    worker: int
    seed: int
    step: int
    key_worker: int
    purpose: int

    @classmethod
    def keyed(cls, kind: str, dim: int, count: int, worker: int, stream: StreamKey) -> "IndexRule":
        """The rule whose support comes from ``stream`` (a ``common.keys.StreamKey``)."""
        return cls(kind, dim, count, worker, stream.seed & MASK64, stream.step & MASK64, stream.worker,
                   purpose_code(stream.purpose))

    @property
    def key(self) -> int:
        """The 64-bit stream code, ``StreamKey(seed, step, key_worker, purpose).code``."""
        return mix(self.seed, self.step, self.key_worker, self.purpose)

    def indices(self) -> np.ndarray:
        return index_sets.regenerate(self)


@dataclass(frozen=True, eq=False)
class Dense:
    values: torch.Tensor
    dtype: torch.dtype

    @property
    def dim(self) -> int:
        return self.values.numel()

    def to_dense(self) -> torch.Tensor:
        return self.values.to(self.dtype)

    def nominal_bits(self) -> int:
        return self.values.numel() * self.values.element_size() * 8


@dataclass(frozen=True, eq=False)
class Signs:
    negative: torch.Tensor  # bool, one per coordinate
    scale: torch.Tensor  # 0-d float32
    dtype: torch.dtype

    @property
    def dim(self) -> int:
        return self.negative.numel()

    def to_dense(self) -> torch.Tensor:
        if self.negative.numel() >= cpu_kernels.MIN_COMPILED:  # one compiled pass (CPU, float32/float64)
            fused = cpu_kernels.signs_to_dense(self.negative, self.scale, self.dtype)
            if fused is not None:
                return fused
        scale = self.scale.to(self.dtype)
        out = torch.empty(self.negative.shape, dtype=self.dtype, device=self.negative.device)
        bits = _SIGN_BIT.get(self.dtype)
        if out.device.type != "cpu" or bits is None:
            return out.fill_(scale).masked_fill_(self.negative, -scale)
        # on the CPU: the scale's bit pattern with the sign bit flipped where negative, block by block
        itype, shift = bits
        pattern = int(scale.view(itype))
        words = out.view(itype)
        for block in cpu_blocks(out.numel()):
            words[block].copy_(self.negative[block]).bitwise_left_shift_(shift).bitwise_xor_(pattern)
        return out

    def nominal_bits(self) -> int:
        return self.dim + 32


def code_dtype(top: int) -> torch.dtype:
    """The integer dtype of a ``Quantized`` payload's codes for a table whose largest code is ``top``:
    uint8 up to 255 (every dithering table of up to 255 levels: half the bytes that the quantizer
    writes and the packer reads, against int16), then int16, then int32."""
    return torch.uint8 if top < 256 else torch.int16 if top < 2**15 else torch.int32


@dataclass(frozen=True, eq=False)
class Quantized:
    table: LevelTable
    # x < 0: bool flags of the codes' shape, or their bitmap, a uint8 tensor of ceil(n / 8) bytes in
    # the wire's layout (from the CPU's float32 quantizer kernels and the host's decoder), which the
    # encoder sends and the dequantizing kernels read as it is; not to be changed in place
    signs: torch.Tensor
    codes: torch.Tensor  # integer codes into table
    norm: torch.Tensor | None  # 0-d float32, or None when the levels are absolute
    dtype: torch.dtype
    span: tuple[int, int, int] | None = None  # (min, max, smallest nonzero or -1) of codes, if known

    @property
    def dim(self) -> int:
        return self.codes.numel()

    @property
    def negative(self) -> torch.Tensor:
        """x < 0 as bool flags of the codes' shape; unpacked from the bitmap (once) where the payload
        holds one: a sender that only encodes its payload never writes the flags."""
        if self.signs.dtype == torch.bool:
            return self.signs
        flags = self.__dict__.get("_flags")
        if flags is None:
            flags = cpu_kernels.sign_flags(self.signs.numpy(), self.codes.numel()).view(self.codes.shape)
            object.__setattr__(self, "_flags", flags)
        return flags

    def to_dense(self) -> torch.Tensor:
        """sign_i * level[code_i] (* norm): one gather from the 2L signed values
        [l_0 norm, .., l_(L-1) norm, -l_0 norm, ..] (the same float products as coordinate-wise)."""
        levels = self.table.values(self.dtype, self.codes.device)
        if self.codes.device.type == "cpu":
            uniform_s = self.table.s if self.table.kind == "uniform" else 0
            computed = cpu_kernels.dequantize_computed(self.codes, self.signs, levels, uniform_s, self.norm)
            if computed is not None:
                return computed.view(self.codes.shape)
        if self.norm is not None:
            levels = levels * self.norm.to(self.dtype)
        signed = torch.cat([levels, -levels])
        itype = torch.int32 if levels.numel() < 2**30 else torch.int64
        if self.codes.device.type != "cpu":
            index = self.codes.to(itype, copy=True)  # the payload stays
            return signed.index_select(0, index.add_(self.negative, alpha=levels.numel()))
        fused = cpu_kernels.dequantize(self.codes, self.signs, signed)
        if fused is not None:
            return fused
        # on the CPU block by block: the index never exists for the whole vector
        n = self.codes.numel()
        out = torch.empty(n, dtype=self.dtype)
        index = torch.empty(min(n, CPU_BLOCK), dtype=itype)
        for block in cpu_blocks(n):
            idx = index[: block.stop - block.start].copy_(self.codes[block])
            torch.index_select(signed, 0, idx.add_(self.negative[block], alpha=levels.numel()), out=out[block])
        return out

    def nominal_bits(self) -> int:
        return self.dim * (1 + self.table.code_bits) + (32 if self.norm is not None else 0)


CPU_BLOCK = 1 << 15
_SIGN_BIT = {torch.float32: (torch.int32, 31), torch.float64: (torch.int64, 63)}


def cpu_blocks(n: int) -> list[slice]:
    """Slices of 2^15 coordinates that cover range(n). The CPU paths of the quantizers work block by
    block: every pass then runs on data in cache and no temporary exceeds a block (a vector-sized
    temporary costs a memory pass, and above 32 MB glibc hands out fresh pages that fault in). 2^15
    is torch's grain size: an op on one block runs in the calling thread without waking the other
    threads of the pool for a few microseconds of work each (which cost more than they save)."""
    return [slice(i, min(n, i + CPU_BLOCK)) for i in range(0, n, CPU_BLOCK)]


_NUMPY_DTYPES = {torch.float32: np.float32, torch.float64: np.float64, torch.float16: np.float16}


def zeros(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zero vector. On the CPU NumPy's calloc gets zero pages from the system, where torch.zeros
    would write every byte once more."""
    if device.type == "cpu" and dtype in _NUMPY_DTYPES:
        return torch.from_numpy(np.zeros(n, dtype=_NUMPY_DTYPES[dtype]))
    return torch.zeros(n, dtype=dtype, device=device)


@dataclass(frozen=True, eq=False)
class Sparse:
    dim: int
    values: "Payload"
    indices: torch.Tensor | None = None  # sorted int64 support, when it must be sent
    rule: IndexRule | None = None  # how to regenerate the support, when it is not sent
    dtype: torch.dtype = torch.float32

    def support(self, device: torch.device) -> torch.Tensor:
        if self.indices is not None:
            return self.indices.to(device)
        return index_sets.support_on(self.rule, device)

    def to_dense(self) -> torch.Tensor:
        kept = self.values.to_dense().to(self.dtype)
        fused = self.marked_dense(kept)
        if fused is not None:
            return fused
        out = zeros(self.dim, self.dtype, kept.device)
        if kept.numel():
            out.index_copy_(0, self.support(kept.device), kept)
        return out

    def marked_dense(self, kept: torch.Tensor, h: torch.Tensor | None = None, inplace: bool = False) -> torch.Tensor | None:
        """The dense form of ``kept`` on a regenerated support (or h + it) in one compiled pass on the
        CPU, where the support comes as a bitmap (``indices.marked_support``: large keyed Perm-K, long Rand-K): the
        same bits as zeros and ``index_copy_``, without sorting the block. Else None."""
        if (self.indices is not None or self.rule is None or kept.device.type != "cpu"
                or kept.dtype not in cpu_kernels.MARKED_DTYPES):  # (no bitmap built for nothing)
            return None
        marked = index_sets.marked_support(self.rule)
        if marked is None or marked[1] != kept.numel():  # (a wrong length takes the reference path, which raises)
            return None
        return cpu_kernels.scatter_marked(marked[0], kept, self.dim, h, inplace)

    def nominal_bits(self) -> int:
        k = self.values.dim
        if self.indices is None or k == 0:
            index_bits = 0
        else:
            index_bits = min(k * max(1, math.ceil(math.log2(self.dim))), self.dim)
        return self.values.nominal_bits() + index_bits


def add_dense(h: torch.Tensor, payload, inplace: bool = False) -> torch.Tensor:
    """h + payload.to_dense(), bit for bit: a new tensor, or h itself with ``inplace``. Two kinds skip
    the dense form (2 passes over the vector instead of 4):

    * a large CPU ``Signs`` of h's dtype and length: one compiled pass (``cpu_kernels.signs_added``);
    * a ``Sparse`` of h's dtype, length and device: h + 0 everywhere (which turns -0 into +0, as
      adding the dense form's zeros does), then h_i + c_i written on the support; for a long CPU h,
      both in one compiled pass (``cpu_kernels.sparse_added``). In place, where h is known to hold
      no negative zero (``cpu_kernels.without_negative_zero``, marked by the last such addition
      that wrote it), h + 0 is h itself and the support alone is written: O(k), not a pass over d
      (for a long CPU h, one compiled loop over the support: ``cpu_kernels.add_on_support``).
    """
    if isinstance(payload, Signs) and payload.dtype == h.dtype and payload.dim >= cpu_kernels.MIN_COMPILED:
        fused = cpu_kernels.signs_added(h, payload.negative, payload.scale, inplace)
        if fused is not None:
            return fused
    if isinstance(payload, Sparse) and payload.dtype == h.dtype and h.dim() == 1 and payload.dim == h.numel():
        kept = payload.values.to_dense().to(h.dtype)
        fused = payload.marked_dense(kept, h, inplace) if kept.device == h.device else None
        if fused is not None:
            return fused
        support = payload.support(h.device) if kept.device == h.device else None
        if support is not None and support.numel() == kept.numel():  # else the reference path raises as before
            clean = inplace and cpu_kernels.without_negative_zero.holds(h)  # h + 0 is h: the support alone changes
            if clean:
                negative_zero = cpu_kernels.add_on_support(h, support, kept)  # one compiled loop over the support
                if negative_zero is not None:
                    return _noting_negative_zero(h, negative_zero)
            on_support = h.index_select(0, support).add_(kept)  # h_i + c_i
            if clean:
                return _noting_signed_zeros(h.index_copy_(0, support, on_support), on_support)
            fused = cpu_kernels.sparse_added(h, support, kept, inplace)
            if fused is None:
                fused = (h.add_(0.0) if inplace else h + 0.0).index_copy_(0, support, on_support)
            return _noting_signed_zeros(fused, on_support)
    return h.add_(payload.to_dense()) if inplace else h + payload.to_dense()


def _noting_signed_zeros(result: torch.Tensor, on_support: torch.Tensor) -> torch.Tensor:
    """``result`` of h + a sparse payload's dense form, marked as holding no negative zero where its
    support holds none (``on_support``: the sums written there; ``cpu_kernels.without_negative_zero``):
    off the support it is h_i + 0, never -0. The next such addition into it in place then writes the
    support alone, O(k) instead of a pass over d (EF21's Markov states at d = 1e6: a pass of 4 MB read
    and 4 MB written a round on each side). Only CPU vectors are marked (``TensorMarks.holds`` refuses
    others): on a GPU the test would cost a device sync every addition."""
    if result.device.type != "cpu":
        return result
    return _noting_negative_zero(result, bool(((on_support == 0) & on_support.signbit()).any()))


def _noting_negative_zero(result: torch.Tensor, negative_zero: bool) -> torch.Tensor:
    """``result`` (a CPU vector) marked as holding no negative zero, or its mark dropped where a sum on
    the support is -0 (``negative_zero``)."""
    if negative_zero:
        cpu_kernels.without_negative_zero.drop(result)
    else:
        cpu_kernels.without_negative_zero.note(result)
    return result


@dataclass(frozen=True, eq=False)
class Scaled:
    factor: torch.Tensor  # 0-d float32
    inner: "Payload"

    @property
    def dim(self) -> int:
        return self.inner.dim

    @property
    def dtype(self) -> torch.dtype:
        return self.inner.dtype

    def to_dense(self) -> torch.Tensor:
        dense = self.inner.to_dense()
        return dense * self.factor.to(dense.dtype)

    def nominal_bits(self) -> int:
        return self.inner.nominal_bits() + 32


Payload = Union[Dense, Sparse, Signs, Quantized, Scaled]
