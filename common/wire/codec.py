"""Payload <-> frames: ``encode`` and ``decode`` (the layout of every payload kind is in
``common/wire/__init__.py``).

``encode`` walks the payload tree once: each node appends its header node and its binary frames
(uint8 tensors packed on the payload's device); at the end the header is packed with msgpack and
only the packed bytes are copied to the host.

``decode`` works in two phases so that nothing large is allocated before the message is known to be
consistent: (1) parse and check the header tree (types, ranges, dims, depth) and compute the exact
length of every frame it implies (a range for Rice-coded indices); check the number of frames and
every length; (2) read each frame (numpy / torch views of the frame memory), check its content
(index order and range, code range, finiteness) and build the payload, on the host, then move it
to ``device``. For a GPU ``device`` the large frames cross as they came (packed) and are unpacked
and checked there: a dense frame's values, sign bitmaps and quantized code fields (a Quantized
message at d = 1e7 moves 7.5 MB to the GPU instead of 30 MB of unpacked signs and codes); indices
and everything small are still read on the host.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
import warnings
from typing import Callable, Sequence

import numpy as np
import torch

from common.compressors import cpu_kernels
from common.compressors.base import all_finite
from common.compressors.indices import permk_block_size
from common.compressors.payloads import (
    CPU_BLOCK, Dense, IndexRule, LevelTable, Quantized, Scaled, Signs, Sparse, code_dtype, cpu_blocks,
    rounding_exponent_range,
)
from common.wire import bitpack, indexcode
from common.wire.header import (
    DENSE, DTYPE_CODE, DTYPE_NAMES, DTYPES as DTYPES_BY_CODE, KIND_NAMES, MAX_DEPTH, MAX_DIM, MAX_LEVELS, MAX_WORKERS,
    QUANTIZED, SCALED, SIGNS, SPARSE_PERMK, SPARSE_RANDK, SPARSE_SENT, TABLE_KINDS, Fields, WireError,
    f32_bits, pack_header, unpack_header,
)

MAX_FRAMES = 64
PLAIN, ZERO_ESCAPE = 0, 1  # how Quantized codes map to fields

# ----------------------------------------------------------------------------------------------
# encode
# ----------------------------------------------------------------------------------------------


def encode(payload) -> list[bytes]:
    """Frames of ``payload``: a msgpack header, then the packed binary frames (see package doc), as
    bytes objects that own their memory (the link form, ``common.wire.stream``, sends views)."""
    node, data = encode_node(payload)
    return [pack_header(node), *map(bytes, data)]


def encode_node(payload) -> tuple[list, list[memoryview]]:
    """``payload``'s header node and its packed binary frames (the self-describing ``encode`` puts
    the node in frame 0; the lean link form, ``common.wire.stream``, sends only what changed).

    Only packed bytes cross to the host, and on the CPU they are not copied again: a frame is a
    read-only view of the packed tensor (a dense payload's own values), which ZeroMQ sends without a
    copy and keeps alive until it is sent. So a payload must not be changed in place once encoded
    (compressors return fresh tensors; ``full`` copies what a rule keeps). Read-only also means that
    a receiver in the same process (the in-process engine) copies the values instead of sharing them."""
    out: list[torch.Tensor] = []
    node = _enc(payload, out, 0)
    return node, [memoryview(a).toreadonly() for a in _on_host(out)]


def _on_host(packed: list[torch.Tensor]) -> list[np.ndarray]:
    """The packed frames as host arrays. CPU tensors are viewed, not copied. GPU tensors are copied
    together into one page-locked buffer (from torch's caching host allocator, so a run's rounds reuse
    it): the copies are queued without waiting and the host waits once, where ``t.cpu()`` per frame
    would wait per frame and copy into pageable memory (24 ms of device time for 40 MB on an H200
    host, against 0.8 ms into page-locked memory; docs/cuda.md). The arrays keep the buffer alive
    until ZeroMQ has sent them."""
    on_device = [t for t in packed if t.device.type != "cpu"]
    if not on_device:
        return [t.numpy() for t in packed]
    staging = torch.empty(sum(t.numel() * t.element_size() for t in on_device), dtype=torch.uint8,
                          pin_memory=torch.cuda.is_available())
    spans, start = [], 0
    for t in on_device:
        size = t.numel() * t.element_size()
        staging[start:start + size].copy_(t.contiguous().view(-1).view(torch.uint8), non_blocking=True)
        spans.append((start, start + size))
        start += size
    for device in {t.device for t in on_device}:
        if device.type == "cuda":
            torch.cuda.current_stream(device).synchronize()
    host, spans = staging.numpy(), iter(spans)
    return [t.numpy() if t.device.type == "cpu" else host[slice(*next(spans))] for t in packed]


def content_bits(node: list, lengths: Sequence[int]) -> int:
    """The bits of ``node``'s content as the papers count them: values at their wire precision, one
    bit a sign, 32 bits a float32 scale / norm / factor, the sent index frames (Golomb-Rice or
    bitmap, as sent), a code field of the width on the wire; nothing for the node itself or for a
    support regenerated from its key. ``lengths``: the byte lengths of the node's binary frames in
    order. ``node`` must be one that ``encode_node`` made or that decoding accepted."""
    frames = iter(lengths)

    def walk(n) -> int:
        kind = n[0]
        if kind == DENSE:
            next(frames)
            return n[3] * 8 * DTYPES_BY_CODE[n[2]].itemsize
        if kind == SIGNS:
            next(frames)
            return n[2] + 32
        if kind == QUANTIZED:
            next(frames), next(frames)
            return n[2] * (1 + n[10]) + (0 if n[7] is None else 32)
        if kind == SCALED:
            return 32 + walk(n[2])
        if kind == SPARSE_SENT:
            return 8 * next(frames) + walk(n[-1])
        return walk(n[-1])  # a support regenerated from its key costs nothing

    return walk(node)


def message_bytes(frames: Sequence) -> int:
    """Bytes a message costs on the wire: the sum of its frame lengths, header included."""
    return sum(memoryview(f).nbytes for f in frames)


_all_finite = all_finite
_checked: contextvars.ContextVar[tuple[torch.Tensor, ...]] = contextvars.ContextVar("checked", default=())


@contextlib.contextmanager
def checked_finite(*tensors: torch.Tensor):
    """Within the block, a Dense whose values are exactly one of ``tensors`` (the same memory,
    length and dtype) is encoded without its finiteness pass: the caller has just checked them and
    nothing changes them before the encoding. The server checks its model every round, and GD's
    downlink is that model (one pass of 4 ms at d = 1e7 saved)."""
    token = _checked.set(tuple(t.detach() for t in tensors))
    try:
        yield
    finally:
        _checked.reset(token)


def _known_finite(v: torch.Tensor) -> bool:
    return any(t.data_ptr() == v.data_ptr() and t.numel() == v.numel() and t.dtype == v.dtype
               and t.device == v.device and t.is_contiguous() for t in _checked.get())


def _dtype_code(dt, what: str) -> int:
    code = DTYPE_CODE.get(dt)
    if code is None:
        raise WireError(f"{what}: dtype {dt} cannot be encoded (float32, float64, float16, bfloat16)")
    return code


def _flat(t, what: str, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or t.dim() != 1:
        raise WireError(f"{what}: {name} must be a 1-D tensor")
    return t.contiguous()


def _scalar_bits(t, what: str, name: str) -> int:
    if not isinstance(t, torch.Tensor) or t.numel() != 1:
        raise WireError(f"{what}: {name} must be a one-element tensor")
    t = t.detach().reshape(()).to(torch.float32)
    if not bool(torch.isfinite(t)):
        raise WireError(f"{what}: {name} is not finite")
    return f32_bits(t)


def _enc(p, out: list, depth: int) -> list:
    if depth >= MAX_DEPTH:
        raise WireError(f"payload nested deeper than {MAX_DEPTH} levels")
    if isinstance(p, Dense):
        v = _flat(p.values.detach(), "Dense", "values")
        code = _dtype_code(v.dtype, "Dense values")
        if not (_known_finite(v) or _all_finite(v)):
            raise WireError("Dense: values are not all finite")
        out.append(v.view(torch.uint8) if v.numel() else torch.empty(0, dtype=torch.uint8, device=v.device))
        return [DENSE, _dtype_code(p.dtype, "Dense"), code, v.numel()]
    if isinstance(p, Signs):
        neg = _flat(p.negative, "Signs", "negative")
        out.append(bitpack.pack(neg, 1))
        return [SIGNS, _dtype_code(p.dtype, "Signs"), neg.numel(), _scalar_bits(p.scale, "Signs", "scale")]
    if isinstance(p, Quantized):
        return _enc_quantized(p, out)
    if isinstance(p, Sparse):
        return _enc_sparse(p, out, depth)
    if isinstance(p, Scaled):
        factor = _scalar_bits(p.factor, "Scaled", "factor")
        return [SCALED, factor, _enc(p.inner, out, depth + 1)]
    raise WireError(f"cannot encode a {type(p).__name__}: not a payload")


def _number(x: float):
    return int(x) if float(x).is_integer() and abs(x) < 2**53 else float(x)


def _enc_quantized(p: Quantized, out: list) -> list:
    table = p.table
    if table.kind not in TABLE_KINDS:
        raise WireError(f"Quantized: unknown level table kind {table.kind!r}")
    if table.dtype_name not in DTYPE_NAMES:
        raise WireError(f"Quantized: level table dtype {table.dtype_name!r} cannot be encoded")
    codes = _flat(p.codes, "Quantized", "codes")
    n = codes.numel()
    signs = _sign_frame(p, n)
    top = len(table) - 1
    mode, offset, width = PLAIN, 0, 0
    if n:
        span = p.span or cpu_kernels.code_range(codes)  # the quantizer's, or one pass on the CPU
        lo, hi = span[:2] if span else (int(v) for v in torch.aminmax(codes))
        if lo < 0 or hi > top:
            raise WireError(f"Quantized: codes span [{lo}, {hi}], outside the table's [0, {top}]")
        mode, offset, width = PLAIN, lo, bitpack.width_for(hi - lo + 1)
        if lo == 0 and width > 1:  # the zero escape needs at least 1 bit too
            lo_nz = span[2] if span else _smallest_nonzero(codes)
            if bitpack.width_for(hi - lo_nz + 2) < width:
                mode, offset, width = ZERO_ESCAPE, lo_nz, bitpack.width_for(hi - lo_nz + 2)
    # code 0 -> field 0, code c >= offset -> c - offset + 1 (c - (offset - 1) is <= 0 only for 0)
    minus, clamp = (offset, False) if mode == PLAIN else (offset - 1, True)
    packed = cpu_kernels.pack_codes(codes, minus, clamp, width)
    if packed is None:
        packed = bitpack.pack(_fields(codes, minus, clamp, torch.uint8 if width <= 8 else torch.int64), width)
    out.append(signs)
    out.append(packed)
    norm = None if p.norm is None else _scalar_bits(p.norm, "Quantized", "norm")
    return [
        QUANTIZED, _dtype_code(p.dtype, "Quantized"), n, TABLE_KINDS.index(table.kind), _number(table.base),
        int(table.s), DTYPE_NAMES.index(table.dtype_name), norm, mode, offset, width,
    ]


def _sign_frame(p: Quantized, n: int) -> torch.Tensor:
    """The sign frame of a Quantized payload of n codes: its bitmap as it is where it holds one (the
    CPU quantizer's or the decoder's; checked for length and zero padding bits, as the decoder checks
    them), else its flags packed."""
    if p.signs.dtype == torch.uint8:
        bits = _flat(p.signs, "Quantized", "sign bitmap")
        if bits.device.type != "cpu":
            raise WireError(f"Quantized: a sign bitmap on {bits.device} (bitmaps are the host's)")
        if bits.numel() != (n + 7) // 8:
            raise WireError(f"Quantized: a sign bitmap of {bits.numel()} bytes for {n} codes")
        _check_sign_padding(bits.numpy(), n, "Quantized")
        return bits
    neg = _flat(p.signs, "Quantized", "negative")
    if neg.numel() != n:
        raise WireError(f"Quantized: {neg.numel()} signs for {n} codes")
    return bitpack.pack(neg, 1)


def _smallest_nonzero(codes: torch.Tensor) -> int:
    """The smallest nonzero code (codes are >= 0 and not all 0): code - 1 with the sign bit cleared
    turns 0 into the largest int32. On the CPU block by block."""
    if codes.device.type != "cpu":
        return int(codes.masked_fill(codes == 0, torch.iinfo(codes.dtype).max).amin())
    buf = torch.empty(min(codes.numel(), CPU_BLOCK), dtype=torch.int32)
    least = 2**31 - 1
    for block in cpu_blocks(codes.numel()):
        b = buf[: block.stop - block.start].copy_(codes[block])
        least = min(least, int(b.sub_(1).bitwise_and_(2**31 - 1).amin()))
    return least + 1


def _fields(codes: torch.Tensor, minus: int, clamp: bool, small: torch.dtype) -> torch.Tensor:
    """codes - minus (clamped at 0 when ``clamp``) as ``small``; on the CPU block by block."""
    if codes.device.type != "cpu":
        f = codes.to(torch.int32) - minus if minus else codes  # (uint8 codes would wrap below 0)
        return (f.clamp(min=0) if clamp else f).to(small)
    out = torch.empty(codes.numel(), dtype=small)
    buf = torch.empty(min(codes.numel(), CPU_BLOCK), dtype=torch.int32)
    for block in cpu_blocks(codes.numel()):
        f = buf[: block.stop - block.start].copy_(codes[block]).sub_(minus)
        out[block] = f.clamp_(min=0) if clamp else f
    return out


def _enc_sparse(p: Sparse, out: list, depth: int) -> list:
    dt = _dtype_code(p.dtype, "Sparse")
    if p.indices is not None:
        idx = _flat(p.indices, "Sparse", "indices")
        k = idx.numel()
        method, r, data = indexcode.encode_indices(idx, p.dim)
        out.append(data)
        node = [SPARSE_SENT, dt, p.dim, method, r]
    elif p.rule is not None:
        rule = p.rule
        if rule.dim != p.dim:
            raise WireError(f"Sparse: rule dimension {rule.dim} differs from payload dimension {p.dim}")
        stream = [rule.seed, rule.step, rule.key_worker, rule.purpose]
        if rule.kind == "randk":
            k = rule.count
            node = [SPARSE_RANDK, dt, p.dim, *stream]
        elif rule.kind == "permk":
            k = None
            node = [SPARSE_PERMK, dt, p.dim, rule.count, rule.worker, *stream]
        else:
            raise WireError(f"Sparse: unknown index rule {rule.kind!r}")
    else:
        raise WireError("Sparse: neither indices nor a rule")
    child = _enc(p.values, out, depth + 1)
    if k is not None and k != p.values.dim:
        raise WireError(f"Sparse: {k} indices for {p.values.dim} values")
    return node + [child]


# ----------------------------------------------------------------------------------------------
# decode
# ----------------------------------------------------------------------------------------------


def decode(frames, device=None, *, max_dim: int = MAX_DIM):
    """The payload a message stands for; raises ``WireError`` (with the reason) on anything malformed.

    ``max_dim`` caps every dimension the header may claim (pass the run's dimension where it is
    known: a payload whose support is regenerated costs the receiver O(d) memory). Tensors are built
    on the host and moved to ``device`` when given; for a GPU the large frames are moved packed and
    unpacked and checked there (module doc).
    """
    try:
        return _decode(frames, device, max_dim)
    except WireError:
        raise
    except Exception as exc:  # last line of defence: decode never raises anything but WireError
        raise WireError(f"internal error while decoding: {type(exc).__name__}: {exc}") from None


class _Plan:
    """A checked header node: its dimension, the frames it reads, and how to build its payload."""

    def __init__(self, dim: int, frames: list, build: Callable):
        self.dim, self.frames, self.build = dim, frames, build


def _decode(frames, device, max_dim):
    if isinstance(frames, (bytes, bytearray, memoryview, str)) or not isinstance(frames, Sequence):
        raise WireError("a message must be a list of frames")
    if not 1 <= len(frames) <= MAX_FRAMES:
        raise WireError(f"a message has 1 to {MAX_FRAMES} frames, got {len(frames)}")
    views = []
    for i, f in enumerate(frames):
        try:
            mv = memoryview(f)
        except TypeError:
            raise WireError(f"frame {i} is a {type(f).__name__}, not a bytes-like object") from None
        if not mv.c_contiguous:
            raise WireError(f"frame {i} is not contiguous")
        views.append(mv.cast("B") if mv.ndim != 1 or mv.format != "B" else mv)
    if isinstance(max_dim, bool) or not isinstance(max_dim, int) or max_dim < 1:
        raise WireError(f"max_dim={max_dim!r} must be a positive integer")
    max_dim = min(max_dim, MAX_DIM)
    plan = _parse(unpack_header(bytes(views[0])), 0, True, max_dim)
    if len(plan.frames) != len(views) - 1:
        raise WireError(f"header describes {len(plan.frames)} data frames, message has {len(views) - 1}")
    return _build(plan, views[1:], device, first=1)


def plan_node(node, max_dim: int = MAX_DIM) -> "_Plan":
    """A checked header node (``WireError`` otherwise): ``.frames`` lists the (name, min, max) byte
    lengths of the binary frames it reads; ``build_node`` makes the payload from them."""
    plan = _parse(node, 0, True, min(max_dim, MAX_DIM))
    plan.node = node
    return plan


def build_node(plan: "_Plan", views: Sequence[memoryview], device=None):
    """The payload of a planned node from its binary frames (host memoryviews); ``WireError`` on
    anything malformed."""
    if len(views) != len(plan.frames):
        raise WireError(f"header describes {len(plan.frames)} data frames, got {len(views)}")
    try:
        return _build(plan, views, device, first=1)
    except WireError:
        raise
    except Exception as exc:  # decoding never raises anything but WireError
        raise WireError(f"internal error while decoding: {type(exc).__name__}: {exc}") from None


def _build(plan: "_Plan", views: Sequence[memoryview], device, first: int):
    for i, (want, mv) in enumerate(zip(plan.frames, views), start=first):
        name, lo, hi = want
        if not lo <= mv.nbytes <= hi:
            expect = f"{lo}" if lo == hi else f"{lo} to {hi}"
            raise WireError(f"frame {i} ({name}) has {mv.nbytes} bytes, header implies {expect}")
    device = None if device is None else torch.device(device)
    token = _gpu.set(device if device is not None and device.type == "cuda" else None)
    try:
        payload = plan.build(iter(views))
    finally:
        _gpu.reset(token)
    if device is not None:
        payload = _to_device(payload, device)
    return payload


# the GPU a payload is being built for, if any: its large frames are unpacked there (``_upload``)
_gpu: contextvars.ContextVar[torch.device | None] = contextvars.ContextVar("gpu", default=None)


def _upload(arr: np.ndarray, device: torch.device) -> torch.Tensor:
    """``arr`` (frame memory) copied to ``device``. A read-only frame is not copied on the host
    first: the tensor over it is only read, by the copy, which has finished when ``to`` returns."""
    if not arr.flags.aligned:
        arr = arr.copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns about tensors over read-only memory
        return torch.from_numpy(arr).to(device)


def _u8(mv: memoryview) -> np.ndarray:
    return np.frombuffer(mv, dtype=np.uint8)


def _tensor(arr: np.ndarray) -> torch.Tensor:
    """A tensor over ``arr`` without a copy when the frame memory is writable and aligned, else a copy
    (a tensor over an immutable ``bytes`` would let later in-place ops write into it)."""
    if not arr.flags.writeable or not arr.flags.aligned:
        arr = arr.copy()
    return torch.from_numpy(arr)  # (writable: torch's warning about read-only memory cannot fire)


def _sign_bits(mv: memoryview, n: int, what: str) -> torch.Tensor:
    """A Quantized payload's sign frame: on the host the bitmap itself (its padding bits checked), which
    the dequantizing kernels read a block at a time (``Quantized.signs``); on a GPU the flags."""
    if _gpu.get() is not None:
        return _flags(mv, n, what)
    data = _u8(mv)
    _check_sign_padding(data, n, what)
    return _tensor(data)


def _check_sign_padding(bits: np.ndarray, n: int, what: str) -> None:
    """A sign bitmap of n flags must leave the bits after the last one 0 (one encoding per message)."""
    if n % 8 and bits.size and int(bits[-1]) >> (n % 8):
        raise WireError(f"{what}: nonzero padding bits after the last sign")


def _flags(mv: memoryview, n: int, what: str) -> torch.Tensor:
    data = _u8(mv)
    _check_sign_padding(data, n, what)
    gpu = _gpu.get()
    if gpu is not None:
        return bitpack.unpack_flags(_upload(data, gpu), n)
    return cpu_kernels.sign_flags(data, n)


def _parse(node, depth: int, top: bool, max_dim: int) -> _Plan:
    if depth >= MAX_DEPTH:
        raise WireError(f"payload nested deeper than {MAX_DEPTH} levels")
    if not isinstance(node, list) or not node:
        raise WireError("header node must be a non-empty array")
    kind = node[0]
    if type(kind) is not int or not 0 <= kind < len(KIND_NAMES):
        raise WireError(f"unknown payload kind {kind!r}")
    what = KIND_NAMES[kind]
    min_n = 1 if top else 0
    if kind == DENSE:
        f = Fields(node, what, 4)
        dtype, vdtype, n = f.dtype("dtype"), f.dtype("value dtype"), f.int("length", min_n, max_dim)
        size = n * vdtype.itemsize
        return _Plan(n, [("values", size, size)], lambda it: _build_dense(next(it), n, vdtype, dtype))
    if kind == SIGNS:
        f = Fields(node, what, 4)
        dtype, n, scale = f.dtype("dtype"), f.int("length", min_n, max_dim), f.f32("scale")
        size = (n + 7) // 8
        return _Plan(n, [("signs", size, size)], lambda it: Signs(_flags(next(it), n, what), scale, dtype))
    if kind == QUANTIZED:
        return _parse_quantized(node, what, min_n, max_dim)
    if kind == SCALED:
        f = Fields(node, what, 3)
        factor = f.f32("factor")
        inner = _parse(f.raw(), depth + 1, top, max_dim)
        return _Plan(inner.dim, inner.frames, lambda it: Scaled(factor, inner.build(it)))
    # sparse kinds
    size = {SPARSE_SENT: 6, SPARSE_RANDK: 8, SPARSE_PERMK: 10}[kind]
    f = Fields(node, what, size)
    dtype, dim = f.dtype("dtype"), f.int("dimension", 1, max_dim)
    if kind == SPARSE_SENT:
        method, r = f.int("index coding", 0, 1), f.int("Rice parameter", 0, indexcode.MAX_RICE - 1)
        child = _parse(f.raw(), depth + 1, False, max_dim)
        k = child.dim
        if k > dim:
            raise WireError(f"{what}: {k} values for dimension {dim}")
        if method == indexcode.BITMAP:
            lo = hi = (dim + 7) // 8
        elif k == 0:
            lo = hi = 0
        else:
            lo, hi = (k * r + 7) // 8 + (k + 7) // 8, (dim + 7) // 8 - 1
        def build(it):
            idx = indexcode.decode_indices(_u8(next(it)), dim, k, method, r, what)
            return Sparse(dim, child.build(it), idx, None, dtype)
        return _Plan(dim, [("indices", lo, hi)] + child.frames, build)
    if kind == SPARSE_RANDK:
        stream = _stream_fields(f)
        child = _parse(f.raw(), depth + 1, False, max_dim)
        if child.dim > dim:
            raise WireError(f"{what}: {child.dim} values for dimension {dim}")
        rule = IndexRule("randk", dim, child.dim, 0, *stream)
        return _Plan(dim, child.frames, lambda it: Sparse(dim, child.build(it), None, rule, dtype))
    n_workers = f.int("workers", 1, MAX_WORKERS)
    worker = f.int("worker", 0, n_workers - 1)
    stream = _stream_fields(f)
    child = _parse(f.raw(), depth + 1, False, max_dim)
    if dim >= n_workers:
        q, rr = divmod(dim, n_workers)
        allowed = (q, q + 1) if rr else (q,)
    else:
        allowed = (0, 1)
    if child.dim not in allowed:
        raise WireError(f"{what}: {child.dim} values, but a Perm-K block of d={dim}, n={n_workers} has {allowed}")
    rule = IndexRule("permk", dim, n_workers, worker, *stream)

    def build_permk(it):
        size = permk_block_size(dim, n_workers, worker, rule.key)
        if size != child.dim:
            raise WireError(f"{what}: {child.dim} values for worker {worker}'s block of {size}")
        return Sparse(dim, child.build(it), None, rule, dtype)
    return _Plan(dim, child.frames, build_permk)


def _stream_fields(f: Fields) -> tuple[int, int, int, int]:
    """The (seed, step, key worker, purpose code) that name a regenerated support's stream."""
    return (f.int("seed", 0, 2**64 - 1), f.int("step", 0, 2**64 - 1), f.int("key worker", 0, MAX_WORKERS - 1),
            f.int("purpose", 0, 2**64 - 1))


def _build_dense(mv, n, vdtype, dtype) -> Dense:
    arr = np.frombuffer(mv, dtype=np.int16 if vdtype == torch.bfloat16 else str(vdtype).removeprefix("torch."))
    gpu = _gpu.get()
    v = _tensor(arr) if gpu is None else _upload(arr, gpu)
    if vdtype == torch.bfloat16:
        v = v.view(torch.bfloat16)
    if not _all_finite(v):
        raise WireError(f"Dense: {int((~torch.isfinite(v)).sum())} non-finite value(s)")
    return Dense(v, dtype)


def _table_size(kind: str, base: float, s: int, dtype_name: str, what: str) -> int:
    if not math.isfinite(base):
        raise WireError(f"{what}: level base {base} is not finite")
    if kind in ("exp", "rounding") and not base > 1.0:
        raise WireError(f"{what}: level base {base} must be > 1")
    if kind in ("exp", "uniform"):
        if not 1 <= s < MAX_LEVELS:
            raise WireError(f"{what}: s={s} outside [1, {MAX_LEVELS})")
        return s + 1
    info = torch.finfo(getattr(torch, dtype_name))
    span = math.log(float(info.max)) - math.log(float(info.smallest_normal) * float(info.eps))
    if span / math.log(base) + 3 > MAX_LEVELS:
        raise WireError(f"{what}: base {base} gives more than {MAX_LEVELS} rounding levels")
    emin, emax = rounding_exponent_range(base, getattr(torch, dtype_name))
    return emax - emin + 2


def _parse_quantized(node, what, min_n, max_dim) -> _Plan:
    f = Fields(node, what, 11)
    dtype, n = f.dtype("dtype"), f.int("length", min_n, max_dim)
    kind = TABLE_KINDS[f.int("table kind", 0, len(TABLE_KINDS) - 1)]
    base = f.number("table base")
    s = f.int("table s", 0, MAX_LEVELS)
    dtype_name = DTYPE_NAMES[f.int("table dtype", 0, len(DTYPE_NAMES) - 1)]
    norm = f.f32("norm", allow_none=True)
    if norm is not None and bool(norm < 0):
        raise WireError(f"{what}: norm {float(norm)} is negative")
    mode = f.int("code mode", 0, 1)
    levels = _table_size(kind, base, s, dtype_name, what)
    top = levels - 1
    offset = f.int("code offset", 1 if mode == ZERO_ESCAPE else 0, top)
    width = f.int("code width", 0, bitpack.width_for(levels + 1))
    table = LevelTable(kind, base, s, dtype_name)
    sizes = [("signs", (n + 7) // 8, (n + 7) // 8), ("codes", bitpack.packed_len(n, width), bitpack.packed_len(n, width))]

    def build(it):
        signs = _sign_bits(next(it), n, what)
        data = _u8(next(it))
        nbits = n * width
        if nbits % 8 and data.size and int(data[-1]) >> (nbits % 8):
            raise WireError(f"{what}: nonzero padding bits after the last code")
        codes_as = code_dtype(top)
        largest = offset + (1 << width) - (1 if mode == PLAIN else 2)  # the largest code the fields allow
        work = torch.int32 if largest < 2**31 else torch.int64  # no overflow before the range check
        gpu = _gpu.get()
        fused = None if gpu is not None else cpu_kernels.unpack_codes(data, n, width, offset, mode == ZERO_ESCAPE, codes_as)
        if fused is not None:
            codes, got = fused
        else:
            packed = _tensor(data) if gpu is None else _upload(data, gpu)
            if 1 <= width <= 8:
                fields = bitpack.unpack_u8(packed, n, width).to(work)
            else:
                fields = bitpack.unpack(packed, n, width).to(work)
            if mode == PLAIN:
                codes = fields.add_(offset) if offset else fields
            else:
                codes = fields.add_((fields != 0).to(work).mul_(offset - 1))
            got = int(codes.max()) if n and largest > top else 0  # fields that cannot pass the top need no look
        if n and got > top:
            raise WireError(f"{what}: code {got} outside the table's [0, {top}]")
        return Quantized(table, signs, codes.to(codes_as), norm, dtype)
    return _Plan(n, sizes, build)


def _to_device(p, device: torch.device):
    if isinstance(p, Dense):
        return Dense(p.values.to(device), p.dtype)
    if isinstance(p, Signs):
        return Signs(p.negative.to(device), p.scale.to(device), p.dtype)
    if isinstance(p, Quantized):
        norm = None if p.norm is None else p.norm.to(device)
        signs = p.signs if device.type == "cpu" else p.negative  # (a sign bitmap is for the host's kernels)
        return Quantized(p.table, signs.to(device), p.codes.to(device), norm, p.dtype)
    if isinstance(p, Scaled):
        return Scaled(p.factor.to(device), _to_device(p.inner, device))
    idx = None if p.indices is None else p.indices.to(device)
    return Sparse(p.dim, _to_device(p.values, device), idx, p.rule, p.dtype)
