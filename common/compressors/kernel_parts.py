"""Pieces of the compiled kernels of ``cpu_kernels`` (Numba): a small array on a kernel's stack, the
float32 quantizers' first loops over a block (signs, |x| / divisor, the draws), and vector
instructions that Numba does not reach by itself (AVX-512's compressing store and expanding load,
for a bitmap's 16 coordinates at a time; a population count).

This module imports Numba; ``cpu_kernels`` imports it only where Numba is present. The kernels reach
these pieces as attributes of this module, not as variables of their closure: Numba keys its disk
cache on a pickle of a kernel's closure, and an intrinsic or a compiled function pickles with an
identifier that is new in every process, so every process would have compiled the kernel again.

``stack_like``: a loop that reads a table through an index it computes (a gather) and stores into
output arrays is kept scalar by the compiler when the table is an argument, since nothing tells it
that a store into an output leaves the table alone. A copy of the table in an array on the kernel's
own stack cannot be reached by those stores, and the same loop then runs on vector gathers
(``quantize_pairs32``: base-3 rounding at d = 1e7 on one thread, 34.5 -> 19.1 ms).
"""
from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from common.compressors.draws import GOLDEN, MIX1, MIX2

_GOLDEN, _MIX1, _MIX2 = np.uint64(GOLDEN), np.uint64(MIX1), np.uint64(MIX2)


@intrinsic
def stack_like(typingctx, size, table):
    """An uninitialized C-contiguous 1-d array of ``size`` (a literal integer) elements of
    ``table``'s dtype, on the stack of the calling kernel (so ``size`` stays small: some KB)."""
    if not isinstance(size, types.IntegerLiteral) or not isinstance(table, types.Array):
        return None
    count, item = size.literal_value, table.dtype
    array_type = types.Array(item, 1, "C")

    def codegen(context, builder, signature, args):
        data = cgutils.alloca_once(builder, context.get_data_type(item), size=count)
        width = context.get_constant(types.intp, context.get_abi_sizeof(context.get_data_type(item)))
        array = context.make_array(array_type)(context, builder)
        context.populate_array(array, data=data, shape=[context.get_constant(types.intp, count)],
                               strides=[width], itemsize=width, meminfo=None)
        return array._getvalue()

    return array_type(size, table), codegen


@numba.njit(inline="always", nogil=True, cache=True)
def draw_halves(key, start, m, halves):
    """The 32-bit halves of the SplitMix64 outputs that name coordinates start .. start + m - 1
    (``common.compressors.draws``; ``start`` even): output p + 1 of the stream ``key`` gives
    coordinates 2p (its low half) and 2p + 1 (its high half). Inlined into the calling kernel, where
    its loop vectorizes on 64-bit multiplies."""
    base = np.uint64(start // 2 + 1)
    for p in range((m + 1) // 2):
        z = key + (base + np.uint64(p)) * _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _MIX1
        z = (z ^ (z >> np.uint64(27))) * _MIX2
        z = z ^ (z >> np.uint64(31))
        halves[2 * p] = np.uint32(z & np.uint64(0xFFFFFFFF))
        halves[2 * p + 1] = np.uint32(z >> np.uint64(32))


@numba.njit(inline="always", nogil=True, cache=True)
def block_start(xb, divisor, key, start, stochastic, negative, t, halves):
    """What the float32 quantizers compute first for a block ``xb`` of x that starts at coordinate
    ``start``: the sign flags x_i < 0, t_i = |x_i| / divisor (in float32), and the draws' halves when
    the rounding is stochastic."""
    if stochastic:
        draw_halves(key, start, xb.size, halves)
    for j in range(xb.size):
        v = xb[j]
        negative[j] = v < 0
        t[j] = np.float32(abs(v) / divisor)


def _lanes_type(item, lanes: int = 16):
    """LLVM's vector of 16 of a float dtype, and the name suffix of its intrinsics."""
    return ir.VectorType(item, lanes), f"v{lanes}f{64 if isinstance(item, ir.DoubleType) else 32}"


@intrinsic
def compress_scaled(typingctx, x, start, scale, mask, out, at):
    """out[at], out[at + 1], ... = x[start + j] * scale for the set bits j of the low 16 bits of
    ``mask``, in increasing j (one vector load of x[start:start + 16], which must exist, one vector
    product rounded in x's dtype as the scalar one is, and a compressing store of popcount(mask)
    values: AVX-512's vcompressps / vcompresspd; elsewhere the compiler stores lane by lane)."""
    if not (isinstance(x, types.Array) and isinstance(out, types.Array) and x.dtype == out.dtype == scale
            and x.dtype in (types.float32, types.float64)):
        return None

    def codegen(context, builder, signature, args):
        x_value, start_value, scale_value, mask_value, out_value, at_value = args
        item = context.get_data_type(signature.args[0].dtype)
        vector, suffix = _lanes_type(item)
        source = builder.gep(context.make_array(signature.args[0])(context, builder, x_value).data, [start_value])
        loaded = builder.load(builder.bitcast(source, vector.as_pointer()), align=item.get_abi_alignment(context.target_data))
        index = ir.Constant(ir.IntType(32), 0)
        scales = builder.insert_element(ir.Constant(vector, ir.Undefined), scale_value, index)
        scales = builder.shuffle_vector(scales, ir.Constant(vector, ir.Undefined), ir.Constant(ir.VectorType(ir.IntType(32), 16), [0] * 16))
        bits = builder.bitcast(builder.trunc(mask_value, ir.IntType(16)), ir.VectorType(ir.IntType(1), 16))
        target = builder.gep(context.make_array(signature.args[4])(context, builder, out_value).data, [at_value])
        store = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [vector, item.as_pointer(), bits.type]),
                                               f"llvm.masked.compressstore.{suffix}")
        builder.call(store, [builder.fmul(loaded, scales), target, bits])
        return context.get_dummy_value()

    return types.void(x, start, scale, mask, out, at), codegen


@intrinsic
def popcount(typingctx, word):
    """The number of set bits of a uint64."""
    if word != types.uint64:
        return None

    def codegen(context, builder, signature, args):
        count = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.IntType(64), [ir.IntType(64)]), "llvm.ctpop.i64")
        return builder.call(count, [args[0]])

    return types.int64(word), codegen


@intrinsic
def expand_added(typingctx, values, at, mask, h, start, use_h, out):
    """out[start:start + 16] = the next popcount(mask) ``values`` from values[at] placed, in order, at
    the set bits of the low 16 bits of ``mask`` and +0 elsewhere (an expanding load: AVX-512's
    vexpandps / vexpandpd), plus h[start:start + 16] where ``use_h`` (h_i + 0 off the support, as
    torch adds a dense form). ``out`` may be h: each lane is read before it is written."""
    if not (all(isinstance(a, types.Array) for a in (values, h, out)) and values.dtype == h.dtype == out.dtype
            and values.dtype in (types.float32, types.float64)):
        return None

    def codegen(context, builder, signature, args):
        values_value, at_value, mask_value, h_value, start_value, use_h_value, out_value = args
        item = context.get_data_type(signature.args[0].dtype)
        vector, suffix = _lanes_type(item)
        align = item.get_abi_alignment(context.target_data)
        source = builder.gep(context.make_array(signature.args[0])(context, builder, values_value).data, [at_value])
        bits = builder.bitcast(builder.trunc(mask_value, ir.IntType(16)), ir.VectorType(ir.IntType(1), 16))
        load = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vector, [item.as_pointer(), bits.type, vector]),
                                              f"llvm.masked.expandload.{suffix}")
        expanded = builder.call(load, [source, bits, ir.Constant(vector, [0.0] * 16)])
        below = builder.gep(context.make_array(signature.args[3])(context, builder, h_value).data, [start_value])
        added = builder.fadd(builder.load(builder.bitcast(below, vector.as_pointer()), align=align), expanded)
        result = builder.select(context.cast(builder, use_h_value, signature.args[5], types.boolean), added, expanded)
        target = builder.gep(context.make_array(signature.args[6])(context, builder, out_value).data, [start_value])
        builder.store(result, builder.bitcast(target, vector.as_pointer()), align=align)
        return context.get_dummy_value()

    return types.void(values, at, mask, h, start, use_h, out), codegen
