"""Pieces that several compiled kernels of ``cpu_kernels`` share (Numba): a small array on a kernel's
stack, and the float32 quantizers' first loops over a block (signs, |x| / divisor, the draws).

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
