"""Pieces of the compiled kernels of ``cpu_kernels`` (Numba): a small array on a kernel's stack, the
float32 quantizers' first loops over a block (signs, |x| / divisor, the draws), the code of one
coordinate between two levels, and their second look at its subnormal values, the codes of a table
of at most 16 levels counted in vector registers (``small_table_codes``), a block's sign flags into
the wire's sign bitmap and back (``pack_signs`` / ``flag_word``, ``unpack_signs`` / ``word_flags``,
and the signed-level gather that reads it, ``signed_levels``), the word of a group of 8 code fields,
Perm-K's keyed bijection and its inverse for one value (``keyed_image``, ``network_back``) and the
pieces of its bitmap from the image side (a row's word of a band from 16 table entries at a time,
``rows_word``; a word's bits permuted by an XOR of their index, ``xor_bits``; a 64 x 64 bit
transpose, ``transpose64``), 64 bits of a bitmap from any bit and runs of them moved by a fixed
shift (``bits_from``, ``shifted_words``), the float64 sums of runs of rows that a norm's cascade adds (as
vectors kept in registers), and vector instructions that Numba does not reach by itself (AVX-512's
compression in a register with a masked store, and its expanding load, for 16 coordinates of a
bitmap or of Top-K's candidates at a time, and the comparisons that find those candidates; a
population count; two-source permutations that read windows of a level table held in registers;
AVX-512 VBMI's byte permutation, to pack and unpack 64 code fields at a time), and the request for
a block's cache lines ahead of a loop that computes too long on each line for the hardware
prefetchers to keep up (``prefetch``, ``fetch_ahead``). The x86-specific
intrinsics (the permutations) are only in kernels that run where the host has the instructions;
the others lower on any target.

This module imports Numba; ``cpu_kernels`` imports it only where Numba is present. The kernels reach
these pieces as attributes of this module, not as variables of their closure: Numba keys its disk
cache on a pickle of a kernel's closure, and an intrinsic or a compiled function pickles with an
identifier that is new in every process, so every process would have compiled the kernel again.
Numba checks a cached kernel against a hash of its own file's content only, not against this
module's: after editing a piece here, set ``cpu_kernels.KERNEL_PARTS_DIGEST`` to this file's new
digest (tests/test_cpu_kernels.py fails and names it until then; until then the kernels compile
without their disk cache).

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


@intrinsic
def prefetch(typingctx, array, index):
    """Asks the caches for the line that holds array[index] (``llvm.prefetch``: a read, kept in every
    level; x86's prefetcht0). It never faults and changes no value: only when the bytes arrive."""
    if not (isinstance(array, types.Array) and array.layout == "C" and isinstance(index, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        array_value, index_value = args
        data = context.make_array(signature.args[0])(context, builder, array_value).data
        index_value = context.cast(builder, index_value, signature.args[1], types.intp)  # (an unsigned one zero-extended)
        byte_pointer, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
        fetch = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [byte_pointer, i32, i32, i32]), "llvm.prefetch.p0i8")
        line = builder.bitcast(builder.gep(data, [index_value]), byte_pointer)
        builder.call(fetch, [line, ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return types.void(array, index), codegen


@numba.njit(inline="always", nogil=True, cache=True)
def fetch_ahead(x, start, stop):
    """Requests the cache lines of x[start:stop] (clipped to x), one prefetch per 64 bytes, all at
    once. A kernel that spends some 20 cycles or more on each line of x calls it for its next block
    while it computes this one: the hardware prefetchers follow a stream only a few lines ahead of
    such a loop, and each line then costs much of a memory latency. On an Intel Xeon host (2 vCPUs,
    AVX-512), QSGD's codes at d = 1e7 on one thread took 17.9 ms without it and 5.8 with it, about
    the speed of the same loop on a vector that is already in the cache."""
    start, stop = max(start, 0), min(stop, x.size)
    for q in range(start, stop, max(1, 64 // x.itemsize)):
        prefetch(x, q)


@numba.njit(inline="always", nogil=True, cache=True)
def splitmix(state):
    """SplitMix64's output for the state key + (j + 1) GOLDEN of output j (``common.compressors.draws``):
    its mixer, two multiplies and three shifts."""
    z = (state ^ (state >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


@numba.njit(inline="always", nogil=True, cache=True)
def draw_halves(key, start, m, halves):
    """The 32-bit halves of the SplitMix64 outputs that name coordinates start .. start + m - 1
    (``common.compressors.draws``; ``start`` even): output p + 1 of the stream ``key`` gives
    coordinates 2p (its low half) and 2p + 1 (its high half). Inlined into the calling kernel, where
    its loop vectorizes on 64-bit multiplies. The stream's state key + (p + 1) GOLDEN steps by GOLDEN
    from one output to the next (the same sum mod 2^64), so each output takes the mixer's two
    multiplies and not a third: 10 vector multiplies in the loop instead of 15, and the draws of
    1e7 coordinates in 3.8 ms on one thread instead of 5.2."""
    state = key + np.uint64(start // 2 + 1) * _GOLDEN
    for p in range((m + 1) // 2):
        z = splitmix(state)
        halves[2 * p] = np.uint32(z & np.uint64(0xFFFFFFFF))
        halves[2 * p + 1] = np.uint32(z >> np.uint64(32))
        state += _GOLDEN


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


@intrinsic
def flag_word(typingctx, flags, at, out, out_at):
    """out[out_at:out_at + 8] = the 64 bits of flags[at:at + 64] (bool or uint8; bit k set where flag
    k is not 0), as one little-endian word: one vector comparison of 64 bytes and its mask (AVX-512's
    vptestmb, AVX2's vpmovmskb twice). Plain LLVM vector operations: lowers on any target."""
    if not (isinstance(flags, types.Array) and flags.dtype in (types.boolean, types.uint8)
            and isinstance(out, types.Array) and out.dtype == types.uint8):
        return None

    def codegen(context, builder, signature, args):
        i8, i64 = ir.IntType(8), ir.IntType(64)
        bytes64 = ir.VectorType(i8, 64)
        source = builder.gep(context.make_array(signature.args[0])(context, builder, args[0]).data, [args[1]])
        loaded = builder.load(builder.bitcast(source, bytes64.as_pointer()), align=1)
        word = builder.bitcast(builder.icmp_unsigned("!=", loaded, ir.Constant(bytes64, [0] * 64)), i64)
        target = builder.gep(context.make_array(signature.args[2])(context, builder, args[2]).data, [args[3]])
        builder.store(word, builder.bitcast(target, i64.as_pointer()), align=1)
        return context.get_dummy_value()

    return types.void(flags, at, out, out_at), codegen


@intrinsic
def word_flags(typingctx, signs, at, flags, out_at):
    """flags[out_at:out_at + 64] = the 64 bits of signs[at:at + 8] (a little-endian word; bit k of it
    is flag k), one byte 0 or 1 each: the inverse of ``flag_word`` (a mask expanded into bytes).
    Plain LLVM vector operations: lowers on any target."""
    if not (isinstance(signs, types.Array) and signs.dtype == types.uint8 and isinstance(flags, types.Array)
            and flags.dtype in (types.boolean, types.uint8)):
        return None

    def codegen(context, builder, signature, args):
        i1, i8, i64 = ir.IntType(1), ir.IntType(8), ir.IntType(64)
        source = builder.gep(context.make_array(signature.args[0])(context, builder, args[0]).data, [args[1]])
        word = builder.load(builder.bitcast(source, i64.as_pointer()), align=1)
        spread = builder.zext(builder.bitcast(word, ir.VectorType(i1, 64)), ir.VectorType(i8, 64))
        target = builder.gep(context.make_array(signature.args[2])(context, builder, args[2]).data, [args[3]])
        builder.store(spread, builder.bitcast(target, ir.VectorType(i8, 64).as_pointer()), align=1)
        return context.get_dummy_value()

    return types.void(signs, at, flags, out_at), codegen


@numba.njit(inline="always", nogil=True, cache=True)
def unpack_signs(signs, at, m, flags):
    """flags[0:m] = the bits of signs from byte ``at`` (``at`` for coordinate 8 at): the inverse of
    ``pack_signs``, 64 flags a word (``word_flags``) and the last few one at a time; ``flags`` is a
    scratch in the cache."""
    for g in range(m // 64):
        word_flags(signs, at + 8 * g, flags, 64 * g)
    for j in range(m // 64 * 64, m):
        flags[j] = (signs[at + (j >> 3)] >> np.uint8(j & 7)) & np.uint8(1) != np.uint8(0)


@numba.njit(inline="always", nogil=True, cache=True)
def signed_levels(codes, signs, table, half, flags, out):
    """out_i = table[code_i + half negative_i] (``table`` = [levels, -levels], ``half`` levels), x < 0
    from the sign bitmap ``signs`` a block of ``flags.size`` coordinates at a time, unpacked into the
    scratch ``flags`` (``unpack_signs``)."""
    n, block = codes.size, flags.size
    for b0 in range(0, n, block):
        m = min(block, n - b0)
        unpack_signs(signs, b0 // 8, m, flags)
        cb, ob = codes[b0:b0 + m], out[b0:b0 + m]
        for j in range(m):
            ob[j] = table[np.int64(cb[j]) + half * np.int64(flags[j])]


@numba.njit(inline="always", nogil=True, cache=True)
def pack_signs(flags, m, signs, at):
    """signs[at:at + ceil(m / 8)] = the bitmap of the bool flags[0:m] (``common.wire.bitpack``'s
    layout: flag 8 g + k is bit k of byte g), from a block's flags in a scratch of the cache whose
    length is a multiple of 64: 64 flags a word (``flag_word``), and the last few bytes (only at the
    vector's end) from 8 flags read as a word, whose byte k (0 or 1) one multiply moves to bit 56 + k,
    ignoring the flags past m: the padding bits are 0."""
    for g in range(m // 64):
        flag_word(flags, 64 * g, signs, at + 8 * g)
    words = flags.view(np.uint64)
    ones, gather = np.uint64(0x0101010101010101), np.uint64(0x0102040810204080)
    for g in range(m // 64 * 8, m // 8):
        signs[at + g] = np.uint8(((words[g] & ones) * gather) >> np.uint64(56))
    if m % 8:
        live = words[m // 8] & ((np.uint64(1) << np.uint64(8 * (m % 8))) - np.uint64(1))
        signs[at + m // 8] = np.uint8(((live & ones) * gather) >> np.uint64(56))


@numba.njit(inline="always", nogil=True, cache=True)
def pair_code(tj, lo, hi, lower, half, stochastic):
    """The code of t = ``tj`` between its two levels lo < hi of a one-level-a-binade table, ``lower``
    being lo's code: up with probability (t - lo) / gap from the draw's 32-bit ``half``
    (``stochastic``; up where the gap is 0), else to the nearer level (ties down). Both tests are
    computed and one selected: a loop for each kept the stochastic one scalar."""
    num = np.float32(tj - lo)
    gap = np.float32(hi - lo)
    drawn = (np.float32(half & np.uint32(0xFFFFFF)) < np.float32(np.float32(num / gap) * np.float32(16777216.0))) | (gap <= np.float32(0))
    nearer = num > np.float32(hi - tj)
    return np.int32(lower + np.int32((stochastic & drawn) | (nearer & (not stochastic))))


@numba.njit(inline="always", nogil=True, cache=True)
def keyed_image(v, low, a_size, t0, t1, t2, t3, dim, rotation):
    """``indices.keyed_permutation`` of the position ``v`` (< dim); or, for a value v >= dim that a pass
    through the network gave, the image that its cycle walk goes on to: the four Feistel rounds (right ^=
    T0[left]; left = (left + T1[right]) mod A; the same with T2, T3; T1 and T3 stored minus A, so one
    sign test reduces mod A), again while the value is >= dim, then the rotation (v + s) mod dim.
    Integer arithmetic without overflow, as the torch version, so the values are the same. The
    tables are read at unsigned indices: no test for a negative one (one thread, a block of 5e6
    positions at d = 1e7: 24-25 ms against 29-32 with signed indices)."""
    mask = (np.int64(1) << low) - 1
    while True:  # one pass at least, then again while the value is >= dim
        left = v >> low
        right = (v & mask) ^ t0[np.uint64(left)]
        left = left + t1[np.uint64(right)]
        left += (left >> 63) & a_size
        right = right ^ t2[np.uint64(left)]
        left = left + t3[np.uint64(right)]
        left += (left >> 63) & a_size
        v = (left << low) | right
        if v < dim:
            break
    v += rotation - dim
    return v + ((v >> 63) & dim)


@numba.njit(inline="always", nogil=True, cache=True)
def network_back(v, low, a_size, t0, t1, t2, t3):
    """The Feistel network's inverse of the value ``v`` (its four rounds undone in reverse order:
    left = (left - T3[right]) mod A; right ^= T2[left]; the same with T1, T0): the position whose
    first pass through ``indices._feistel`` gives ``v``."""
    mask = (np.int64(1) << low) - 1
    left, right = v >> low, v & mask
    left = left - t3[np.uint64(right)] - a_size
    left += (left >> 63) & a_size
    right = right ^ t2[np.uint64(left)]
    left = left - t1[np.uint64(right)] - a_size
    left += (left >> 63) & a_size
    right = right ^ t0[np.uint64(left)]
    return (left << low) | right


@intrinsic
def rows_word(typingctx, table, at, row, a_size, first_row, rows):
    """64 bits of one row of a Perm-K bit matrix (``cpu_kernels.mark_rows_banded``): bit i is whether
    (row - table[at + i] - a_size) mod a_size, the left half that undoing the Feistel network's round
    1 (left = (left - T1[right]) mod A, T1 stored minus A) gives for left ``row`` and right at + i,
    lies in [first_row, first_row + rows). int32 tables; four vector loads of 16 entries, the
    arithmetic in 32-bit lanes (Numba widens every integer operation to 64 bits: 8 lanes a vector,
    and the word's bits ORed lane by lane, took 4-5 times as long), and each comparison's 16 bits
    taken as they are. Plain LLVM vector operations: lowers on any target."""
    if not (isinstance(table, types.Array) and table.dtype == types.int32 and table.layout == "C"):
        return None

    def codegen(context, builder, signature, args):
        i32, i64 = ir.IntType(32), ir.IntType(64)
        ints = ir.VectorType(i32, 16)
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        at = context.cast(builder, args[1], signature.args[1], types.int64)
        lanes_of = lambda k: _splat(builder, builder.trunc(context.cast(builder, args[k], signature.args[k], types.int64), i32), ints)
        row_v, a_v, first_v, rows_v = (lanes_of(k) for k in (2, 3, 4, 5))
        sign = _splat(builder, ir.Constant(i32, 31), ints)
        top = builder.sub(row_v, a_v)
        word = ir.Constant(i64, 0)
        for q in range(4):
            entries = builder.load(builder.bitcast(builder.gep(data, [builder.add(at, ir.Constant(i64, 16 * q))]), ints.as_pointer()), align=4)
            left = builder.sub(top, entries)  # in [-A, A)
            left = builder.add(left, builder.and_(builder.ashr(left, sign), a_v))
            inside = builder.icmp_unsigned("<", builder.sub(left, first_v), rows_v)
            bits = builder.zext(builder.bitcast(inside, ir.IntType(16)), i64)
            word = builder.or_(word, builder.shl(bits, ir.Constant(i64, 16 * q)))
        return word

    return types.uint64(table, at, row, a_size, first_row, rows), codegen


@numba.njit(inline="always", nogil=True, cache=True)
def xor_bits(p, c):
    """The uint64 whose bit i is bit i ^ c of ``p`` (0 <= c < 64): a swap of the groups of 2^s bits for
    each set bit s of c, selected by masks, not branches (c is random from one call to the next)."""
    cc = np.uint64(c)
    for s, groups in ((0, 0x5555555555555555), (1, 0x3333333333333333), (2, 0x0F0F0F0F0F0F0F0F),
                      (3, 0x00FF00FF00FF00FF), (4, 0x0000FFFF0000FFFF), (5, 0x00000000FFFFFFFF)):
        width, mask = np.uint64(1 << s), np.uint64(groups)
        take = np.uint64(0) - ((cc >> np.uint64(s)) & np.uint64(1))
        swapped = ((p >> width) & mask) | ((p & mask) << width)
        p = (p & ~take) | (swapped & take)
    return p


@numba.njit(inline="always", nogil=True, cache=True)
def _swap_blocks(a, at, j, mask):
    """One stage of ``transpose64``: in each pair of rows k, k + j (k's bit j clear) of the 64 at
    ``at``, row k's bits of the columns with bit j set swap with row k + j's of the columns without."""
    for base in range(0, 64, 2 * j):
        for k in range(at + base, at + base + j):
            t = ((a[k] >> np.uint64(j)) ^ a[k + j]) & mask
            a[k + j] ^= t
            a[k] ^= t << np.uint64(j)


@numba.njit(inline="always", nogil=True, cache=True)
def transpose64(a, at):
    """The 64 x 64 bit matrix a[at:at + 64] (row r is a[at + r], column c its bit c) transposed in place:
    six stages of block swaps (32 x 32 blocks, then 16 x 16 within them, ..., single bits)."""
    _swap_blocks(a, at, 32, np.uint64(0x00000000FFFFFFFF))
    _swap_blocks(a, at, 16, np.uint64(0x0000FFFF0000FFFF))
    _swap_blocks(a, at, 8, np.uint64(0x00FF00FF00FF00FF))
    _swap_blocks(a, at, 4, np.uint64(0x0F0F0F0F0F0F0F0F))
    _swap_blocks(a, at, 2, np.uint64(0x3333333333333333))
    _swap_blocks(a, at, 1, np.uint64(0x5555555555555555))


@numba.njit(inline="always", nogil=True, cache=True)
def bits_from(words, v):
    """Bits v .. v + 63 of the bitmap ``words`` (bit j of words[w] is bit 64 w + j) as one uint64,
    bits past its end read as 0; v >= 0."""
    w, shift = v >> 6, np.uint64(v & 63)
    low = words[w] >> shift
    if shift != np.uint64(0) and w + 1 < words.size:
        low |= words[w + 1] << (np.uint64(64) - shift)
    return low


@numba.njit(inline="always", nogil=True, cache=True)
def shifted_words(source, offset, word_a, word_b, out):
    """out[w] = bits 64 w + offset .. 64 w + offset + 63 of the bitmap ``source`` (bits past its end
    read as 0), for w in [word_a, word_b) with 64 word_a + offset >= 0: each word from two
    neighbours by fixed shifts, so that the loop runs on vectors; the words whose upper neighbour
    is past the end through ``bits_from``."""
    q, s = offset >> 6, np.uint64(offset & 63)
    safe = max(word_a, min(word_b, source.size - 1 - q))  # w + q + 1 < source.size below it
    if s == np.uint64(0):
        for w in range(word_a, safe):
            out[w] = source[w + q]
    else:
        for w in range(word_a, safe):
            out[w] = (source[w + q] >> s) | (source[w + q + 1] << (np.uint64(64) - s))
    for w in range(safe, word_b):
        out[w] = bits_from(source, (np.int64(w) << 6) + offset)


@numba.njit(inline="always", nogil=True, cache=True)
def bucket_of(hist, last, k):
    """The bucket of a histogram's ``hist[0:last + 1]`` that holds the k-th largest value (k >= 1),
    counting down from bucket ``last``, and that value's rank within it (a radix selection's step)."""
    bucket = last
    while k > hist[bucket]:
        k -= hist[bucket]
        bucket -= 1
    return bucket, k


@numba.njit(inline="always", nogil=True, cache=True)
def redo_subnormal(t, halves, codes, start, levels, top, stochastic):
    """The float32 quantizers' second look at a block whose t (|x| / divisor) holds subnormal values,
    where a table may hold many levels that no exponent field tells apart: for each t with exponent
    field 0, the level below it from a scan of ``levels`` up from code ``start`` (the lower level of
    the smallest number, ``cpu_kernels.binade_starts``), then its code as the main loops take it (up
    with probability (t - lo) / gap, from the same draw, and up where the gap is 0; or the nearer
    level, ties down). Returns the block's (smallest, largest, smallest nonzero) code, 2^30 for
    none."""
    scale = np.float32(16777216.0)  # 2^24
    fields = t.view(np.uint32)
    none = np.int32(2**30)
    least, most, nonzero = none, np.int32(-1), none
    for j in range(codes.size):
        if fields[j] & np.uint32(0x7F800000) == 0:
            tj = t[j]
            k = np.int64(start)
            while k < top - 1 and levels[k + 1] <= tj:
                k += 1
            lo, hi = levels[k], levels[k + 1]
            num = np.float32(tj - lo)
            if stochastic:
                gap = np.float32(hi - lo)
                up = (np.float32(halves[j] & np.uint32(0xFFFFFF)) < np.float32(np.float32(num / gap) * scale)) | (gap <= np.float32(0))
            else:
                up = num > np.float32(hi - tj)
            codes[j] = np.int32(k + np.int64(up))
        code = np.int32(codes[j])
        least, most = min(least, code), max(most, code)
        nonzero = min(nonzero, code if code != 0 else none)
    return least, most, nonzero


@numba.njit(inline="always", nogil=True, cache=True)
def group_word(group, minus, clamp, width):
    """The fields group[j] - minus (clamped at 0 with ``clamp``) of ``width`` bits of a group of up to
    8 codes, side by side in one 64-bit word, the first field in the lowest bits (``pack_small``)."""
    word = np.uint64(0)
    for j in range(min(8, group.size)):
        f = np.int64(group[j]) - minus
        word |= np.uint64(max(f, np.int64(0)) if clamp else f) << np.uint64(j * width)
    return word


def _lanes_type(item, lanes: int = 16):
    """LLVM's vector of 16 of a float dtype, and the name suffix of its intrinsics."""
    return ir.VectorType(item, lanes), f"v{lanes}f{64 if isinstance(item, ir.DoubleType) else 32}"


def _splat(builder, value, vector_type):
    """A vector of ``vector_type`` with ``value`` in every lane."""
    lanes, i32 = vector_type.count, ir.IntType(32)
    one = builder.insert_element(ir.Constant(vector_type, ir.Undefined), value, ir.Constant(i32, 0))
    return builder.shuffle_vector(one, ir.Constant(vector_type, ir.Undefined), ir.Constant(ir.VectorType(i32, lanes), [0] * lanes))


def _low_bytes(builder, width):
    """The mask of the low 8 ``width`` of 64 bytes (an i64 ``width`` < 8): the 8 groups of ``width``
    bytes that ``pack64`` stores and ``unpack64`` loads."""
    i64 = ir.IntType(64)
    count = builder.shl(width, ir.Constant(i64, 3))
    return builder.bitcast(builder.sub(builder.shl(ir.Constant(i64, 1), count), ir.Constant(i64, 1)),
                           ir.VectorType(ir.IntType(1), 64))


@intrinsic
def compress_scaled(typingctx, x, minus, start, scale, mask, out, at):
    """out[at], out[at + 1], ... = v_j * scale for the set bits j of the low 16 bits of ``mask``, in
    increasing j, where v = x[start:start + 16] (which must exist), or x - minus there (``minus`` an
    array, or None): one or two vector loads, one vector product rounded in x's dtype as the scalar
    one is, then the kept lanes moved to the front in a register and stored by a masked store of
    popcount(mask) lanes (``_store_compressed``)."""
    if not (isinstance(x, types.Array) and isinstance(out, types.Array) and x.dtype == out.dtype == scale
            and x.dtype in (types.float32, types.float64) and _minus_fits(x, minus)):
        return None

    def codegen(context, builder, signature, args):
        _, _, start_value, scale_value, mask_value, out_value, at_value = args
        loaded, vector, _ = _lanes_of(context, builder, signature, args, 0, 1, start_value)
        target = builder.gep(context.make_array(signature.args[5])(context, builder, out_value).data, [at_value])
        _store_compressed(context, builder, builder.fmul(loaded, _splat(builder, scale_value, vector)), mask_value, target)
        return context.get_dummy_value()

    return types.void(x, minus, start, scale, mask, out, at), codegen


def _store_compressed(context, builder, values, mask, target):
    """The lanes of ``values`` (16 floats or int64) at the set bits of the low 16 bits of ``mask`` (an i64),
    in order, stored at ``target`` and after it: per 512 bits of lanes, LLVM's generic compress
    (AVX-512's vcompressps / vcompresspd with a register destination) and a masked store of as many
    lanes as it kept. The compressing store to memory (``llvm.masked.compressstore``) is microcoded
    on AMD Zen 4, where a marked gather took 9.5 ms against 2.5 for the scalar loop (d = 1e7, a
    tenth of the bits set, 2 threads); this form took 1.5 ms."""
    item = values.type.element
    wide = isinstance(item, ir.DoubleType) or item == ir.IntType(64)
    per = 8 if wide else 16  # lanes in one 512-bit register
    i32, i64 = ir.IntType(32), ir.IntType(64)
    part_type, bits_type = ir.VectorType(item, per), ir.VectorType(ir.IntType(1), per)
    suffix = f"v{per}{'i' if isinstance(item, ir.IntType) else 'f'}{64 if wide else 32}"
    compress = cgutils.get_or_insert_function(builder.module, ir.FunctionType(part_type, [part_type, bits_type, part_type]),
                                              f"llvm.experimental.vector.compress.{suffix}")
    store = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [part_type, part_type.as_pointer(), i32, bits_type]),
                                           f"llvm.masked.store.{suffix}.p0")
    count = cgutils.get_or_insert_function(builder.module, ir.FunctionType(i64, [i64]), "llvm.ctpop.i64")
    align = ir.Constant(i32, item.get_abi_alignment(context.target_data))
    for first in range(0, values.type.count, per):
        part = builder.shuffle_vector(values, ir.Constant(values.type, ir.Undefined),
                                      ir.Constant(ir.VectorType(i32, per), list(range(first, first + per))))
        lanes = builder.and_(builder.lshr(mask, ir.Constant(i64, first)), ir.Constant(i64, (1 << per) - 1))
        kept = builder.call(count, [lanes])
        front = builder.sub(builder.shl(ir.Constant(i64, 1), kept), ir.Constant(i64, 1))  # the kept lanes, moved to the front
        packed = builder.call(compress, [part, builder.bitcast(builder.trunc(lanes, ir.IntType(per)), bits_type),
                                         ir.Constant(part_type, ir.Undefined)])
        builder.call(store, [packed, builder.bitcast(target, part_type.as_pointer()), align,
                             builder.bitcast(builder.trunc(front, ir.IntType(per)), bits_type)])
        target = builder.gep(target, [kept])


def _lanes_of(context, builder, signature, args, x_at, minus_at, start_value):
    """x[start:start + 16] as a vector (x the argument at ``x_at``), or x[start:start + 16] -
    minus[start:start + 16] where the argument at ``minus_at`` (an index, or None for none) is an
    array, not None: one vector subtraction, the bits of x - minus. Also the vector type and its
    intrinsics' suffix."""
    item = context.get_data_type(signature.args[x_at].dtype)
    vector, suffix = _lanes_type(item)
    align = item.get_abi_alignment(context.target_data)

    def load(at):
        source = builder.gep(context.make_array(signature.args[at])(context, builder, args[at]).data, [start_value])
        return builder.load(builder.bitcast(source, vector.as_pointer()), align=align)

    loaded = load(x_at)
    if minus_at is not None and isinstance(signature.args[minus_at], types.Array):
        loaded = builder.fsub(loaded, load(minus_at))
    return loaded, vector, suffix


def _minus_fits(x, minus) -> bool:
    return isinstance(minus, types.NoneType) or (isinstance(minus, types.Array) and minus.dtype == x.dtype)


@intrinsic
def at_least_lanes(typingctx, x, minus, start, level, largest):
    """Two masks of the 16 lanes v = x[start:start + 16] (which must exist), or v = x - minus there
    (``minus`` an array, or None), as one int64: bit j set where |v_j| >= ``level``, bit 16 + j where
    |v_j| is not <= ``largest`` (a NaN or an inf): one or two vector loads and two vector
    comparisons (a NaN is never >= level)."""
    if not (isinstance(x, types.Array) and x.dtype in (types.float32, types.float64) and level == largest == x.dtype
            and _minus_fits(x, minus)):
        return None

    def codegen(context, builder, signature, args):
        _, _, start_value, level_value, largest_value = args
        loaded, vector, suffix = _lanes_of(context, builder, signature, args, 0, 1, start_value)
        magnitude = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vector, [vector]), f"llvm.fabs.{suffix}")
        size = builder.call(magnitude, [loaded])
        i16, i64 = ir.IntType(16), ir.IntType(64)
        found = builder.zext(builder.bitcast(builder.fcmp_ordered(">=", size, _splat(builder, level_value, vector)), i16), i64)
        bad = builder.zext(builder.bitcast(builder.fcmp_unordered(">", size, _splat(builder, largest_value, vector)), i16), i64)
        return builder.or_(found, builder.shl(bad, ir.Constant(i64, 16)))

    return types.int64(x, minus, start, level, largest), codegen


@intrinsic
def compress_found(typingctx, x, minus, start, mask, first, out, values, at):
    """For the set bits j of the low 16 bits of ``mask``, in increasing j: out[at], out[at + 1], ... =
    first + start + j (int64) and values[at], values[at + 1], ... = v_j, where v = x[start:start + 16]
    (which must exist), or x - minus there (``minus`` an array, or None), through two register
    compressions and masked stores (``_store_compressed``)."""
    if not (isinstance(x, types.Array) and isinstance(values, types.Array) and isinstance(out, types.Array)
            and x.dtype == values.dtype and x.dtype in (types.float32, types.float64) and out.dtype == types.int64
            and _minus_fits(x, minus)):
        return None

    def codegen(context, builder, signature, args):
        _, _, start_value, mask_value, first_value, out_value, values_value, at_value = args
        loaded, _, _ = _lanes_of(context, builder, signature, args, 0, 1, start_value)
        i64 = ir.IntType(64)
        _store_compressed(context, builder, loaded, mask_value,
                          builder.gep(context.make_array(signature.args[6])(context, builder, values_value).data, [at_value]))
        base = builder.add(context.cast(builder, first_value, signature.args[4], types.int64),
                           context.cast(builder, start_value, signature.args[2], types.int64))
        positions = builder.add(_splat(builder, base, ir.VectorType(i64, 16)), ir.Constant(ir.VectorType(i64, 16), list(range(16))))
        _store_compressed(context, builder, positions, mask_value,
                          builder.gep(context.make_array(signature.args[5])(context, builder, out_value).data, [at_value]))
        return context.get_dummy_value()

    return types.void(x, minus, start, mask, first, out, values, at), codegen


SMALL_TOP = 15  # the largest table (codes 0 .. SMALL_TOP) that ``small_table_codes`` reads from registers


@intrinsic
def small_table_codes(typingctx, x, divisor, halves, m, levels, top, stochastic, codes, signs, signs_at):
    """The codes of t = |x| / ``divisor`` for x[0:m] (float32) against a table of top + 1 <=
    ``SMALL_TOP`` + 1 ascending levels, 16 coordinates at a time in vector registers, stored into
    codes[0:m] (uint8), and the bitmap of x < 0 into signs[signs_at:signs_at + ceil(m / 8)] (two bytes
    a group, each group's comparison mask as it is: no flag array, no second pass to pack it, and t
    is never stored). Returns the codes met as bits (bit c: some coordinate has code c), with bit 16
    set where a t is inf or NaN.

    t is the float32 quotient that ``block_start`` computes. Its lower code k is the number of the
    levels l_1 .. l_(top-1) that are <= t (the largest level <= t, clamped to [0, top - 1], as
    ``rounding.lower_level``), and lo and hi are l_k and l_(k+1), selected as the comparisons go: no
    table read, no gather, and exact for every t, subnormal ones included (the binade lookups need a
    second look there). Then ``pair_code``'s test, the same float32 operations in the same order: up
    with probability (t - lo) / gap from the draw's 24 low bits of ``halves`` (``stochastic``; up
    where the gap is 0), else to the nearer level (ties down). The codes met are ORed as one-hot
    words (two operations a group, where a minimum, a maximum and a smallest nonzero code took nine).
    ``levels`` holds ``SMALL_TOP`` + 1 entries (the ones past ``top`` are loaded once and not read);
    the last group of a length that is not a multiple of 16 loads its live lanes of x (the others
    read as 0), reads a whole group of ``halves`` (entries past m mean nothing), and stores, counts
    and marks its live lanes only. The loop is emitted once for each table size, so that the
    comparisons are unrolled and the levels stay in registers. Plain LLVM vector operations: lowers
    on any target."""
    arrays = (x, halves, levels, codes, signs)
    if not (all(isinstance(a, types.Array) and a.layout == "C" for a in arrays)  # (read through their data pointers)
            and [a.dtype for a in arrays] == [types.float32, types.uint32, types.float32, types.uint8, types.uint8]
            and divisor == types.float32):
        return None

    def codegen(context, builder, signature, args):
        f32, i32, i64, i16, i8, i1 = ir.FloatType(), ir.IntType(32), ir.IntType(64), ir.IntType(16), ir.IntType(8), ir.IntType(1)
        floats, ints, narrow, lanes = (ir.VectorType(f32, 16), ir.VectorType(i32, 16), ir.VectorType(i8, 16),
                                       ir.VectorType(i1, 16))
        pair, pair_bits = ir.VectorType(i8, 2), ir.VectorType(i1, 2)
        x_data, half_data, level_data, code_data, sign_data = (
            context.make_array(signature.args[k])(context, builder, args[k]).data for k in (0, 2, 4, 7, 8))
        count = context.cast(builder, args[3], signature.args[3], types.int64)
        full = builder.udiv(count, ir.Constant(i64, 16))
        top_value = context.cast(builder, args[5], signature.args[5], types.int64)
        drawing = _splat(builder, context.cast(builder, args[6], signature.args[6], types.boolean), lanes)
        first_sign = context.cast(builder, args[9], signature.args[9], types.int64)
        divisors = _splat(builder, args[1], floats)
        ints_of = lambda value: _splat(builder, ir.Constant(i32, value), ints)
        levels_v = [_splat(builder, builder.load(builder.gep(level_data, [ir.Constant(i64, i)])), floats)
                    for i in range(SMALL_TOP + 1)]
        low_bits, scale = ints_of(0xFFFFFF), _splat(builder, ir.Constant(f32, 16777216.0), floats)
        zero, infinity = ir.Constant(floats, [0.0] * 16), _splat(builder, ir.Constant(f32, float("inf")), floats)
        one, special_bit, no_bits = ints_of(1), ints_of(1 << 16), ints_of(0)
        function = lambda name, result, arguments: cgutils.get_or_insert_function(builder.module, ir.FunctionType(result, arguments), name)
        fabs = function("llvm.fabs.v16f32", floats, [floats])
        load_live = function("llvm.masked.load.v16f32.p0", floats, [floats.as_pointer(), i32, lanes, floats])
        store = function("llvm.masked.store.v16i8.p0", ir.VoidType(), [narrow, narrow.as_pointer(), i32, lanes])
        store_pair = function("llvm.masked.store.v2i8.p0", ir.VoidType(), [pair, pair.as_pointer(), i32, pair_bits])
        met = cgutils.alloca_once_value(builder, no_bits)

        def group(size, at, live, live_count):
            source = builder.bitcast(builder.gep(x_data, [at]), floats.as_pointer())
            xv = (builder.load(source, align=4) if live is None
                  else builder.call(load_live, [source, ir.Constant(i32, 4), live, zero]))
            negative = builder.bitcast(builder.fcmp_ordered("<", xv, zero), i16)
            sign_at = builder.gep(sign_data, [builder.add(first_sign, builder.udiv(at, ir.Constant(i64, 8)))])
            if live is None:
                builder.store(negative, builder.bitcast(sign_at, i16.as_pointer()), align=1)
            else:  # the bytes that hold live lanes: 1 for up to 8, else 2
                second = builder.icmp_signed(">", live_count, ir.Constant(i64, 8))
                bytes_live = builder.insert_element(ir.Constant(pair_bits, [1, 0]), second, ir.Constant(i32, 1))
                builder.call(store_pair, [builder.bitcast(negative, pair), builder.bitcast(sign_at, pair.as_pointer()),
                                          ir.Constant(i32, 1), bytes_live])
            tv = builder.fdiv(builder.call(fabs, [xv]), divisors)
            k, lo, hi = ir.Constant(ints, [0] * 16), levels_v[0], levels_v[1]
            for i in range(1, size):
                reached = builder.fcmp_ordered(">=", tv, levels_v[i])
                k = builder.sub(k, builder.sext(reached, ints))
                lo, hi = builder.select(reached, levels_v[i], lo), builder.select(reached, levels_v[i + 1], hi)
            num, gap = builder.fsub(tv, lo), builder.fsub(hi, lo)
            half = builder.load(builder.bitcast(builder.gep(half_data, [at]), ints.as_pointer()), align=4)
            drawn = builder.uitofp(builder.and_(half, low_bits), floats)
            up_drawn = builder.or_(builder.fcmp_ordered("<", drawn, builder.fmul(builder.fdiv(num, gap), scale)),
                                   builder.fcmp_ordered("<=", gap, zero))
            nearer = builder.fcmp_ordered(">", num, builder.fsub(hi, tv))
            code = builder.add(k, builder.zext(builder.select(drawing, up_drawn, nearer), ints))
            target = builder.bitcast(builder.gep(code_data, [at]), narrow.as_pointer())
            bits = builder.or_(builder.shl(one, code),
                               builder.select(builder.fcmp_unordered(">=", tv, infinity), special_bit, no_bits))
            if live is None:
                builder.store(builder.trunc(code, narrow), target, align=1)
            else:
                builder.call(store, [builder.trunc(code, narrow), target, ir.Constant(i32, 1), live])
                bits = builder.select(live, bits, no_bits)
            builder.store(builder.or_(builder.load(met), bits), met)

        def codes_of(size):
            with cgutils.for_range(builder, full) as loop:
                group(size, builder.mul(loop.index, ir.Constant(i64, 16)), None, None)
            at = builder.mul(full, ir.Constant(i64, 16))
            with builder.if_then(builder.icmp_signed("<", at, count)):
                lane = ir.Constant(ints, list(range(16)))
                rest = builder.sub(count, at)
                group(size, at, builder.icmp_signed("<", lane, _splat(builder, builder.trunc(rest, i32), ints)), rest)

        for size in range(1, SMALL_TOP + 1):
            with builder.if_then(builder.icmp_signed("==", top_value, ir.Constant(i64, size))):
                codes_of(size)
        reduce = cgutils.get_or_insert_function(builder.module, ir.FunctionType(i32, [ints]), "llvm.vector.reduce.or.v16i32")
        return builder.zext(builder.call(reduce, [builder.load(met)]), i64)

    return types.int64(x, divisor, halves, m, levels, top, stochastic, codes, signs, signs_at), codegen


BINADES = 256  # float32 exponent fields: entries of each row of ``window_pairs``'s tables
WINDOW = 32  # fields a window holds: two vectors of 16 entries, which one two-source permutation reads


@intrinsic
def window_pairs(typingctx, t, groups, first_field, tables, lows, highs, codes, outside):
    """The lookups of ``cpu_kernels.binade_pairs`` for t[0:16 groups] (float32, which must exist)
    without gathers: for each t its lower level, upper level and lower code, from the exponent field
    E of t and whether t >= above[E], into ``lows``, ``highs`` and ``codes`` (int32), for the fields
    first_field .. first_field + 31 only. ``tables``: float32 rows of ``BINADES`` entries (above; the
    lower level for t below above[E], then at or above it; the same for the upper level; the same for
    the code, its int32 bits), of which the 32-entry window of each row is loaded once into two
    vectors and read by AVX-512's two-source permutation (vpermi2ps): seven permutations, a
    comparison and three selects for 16 coordinates, against four gathers. outside[g] gets the mask
    of group g's lanes whose field is not in the window (their outputs mean nothing; the caller looks
    them up); returns the OR of those masks. AVX-512 only."""
    if not (isinstance(t, types.Array) and t.dtype == types.float32 and isinstance(tables, types.Array)
            and tables.dtype == types.float32 and isinstance(lows, types.Array) and lows.dtype == types.float32
            and isinstance(highs, types.Array) and highs.dtype == types.float32 and isinstance(codes, types.Array)
            and codes.dtype == types.int32 and isinstance(outside, types.Array) and outside.dtype == types.int64):
        return None

    def codegen(context, builder, signature, args):
        f32, i32, i64 = ir.FloatType(), ir.IntType(32), ir.IntType(64)
        floats, ints = ir.VectorType(f32, 16), ir.VectorType(i32, 16)
        t_data, table_data, low_data, high_data, code_data, outside_data = (
            context.make_array(signature.args[k])(context, builder, args[k]).data for k in (0, 3, 4, 5, 6, 7))
        first = context.cast(builder, args[2], signature.args[2], types.int64)

        def window(row, half):
            at = builder.add(first, ir.Constant(i64, row * BINADES + 16 * half))
            return builder.load(builder.bitcast(builder.gep(table_data, [at]), floats.as_pointer()), align=4)

        windows = [(window(row, 0), window(row, 1)) for row in range(7)]
        permute = cgutils.get_or_insert_function(builder.module, ir.FunctionType(floats, [floats, ints, floats]),
                                                 "llvm.x86.avx512.vpermi2var.ps.512")
        splat = lambda value: _splat(builder, ir.Constant(i32, value), ints)
        first32 = _splat(builder, builder.trunc(first, i32), ints)
        union = cgutils.alloca_once_value(builder, ir.Constant(i64, 0))
        with cgutils.for_range(builder, context.cast(builder, args[1], signature.args[1], types.int64)) as loop:
            at = builder.mul(loop.index, ir.Constant(i64, 16))
            tv = builder.load(builder.bitcast(builder.gep(t_data, [at]), floats.as_pointer()), align=4)
            fields = builder.and_(builder.lshr(builder.bitcast(tv, ints), splat(23)), splat(0xFF))
            offset = builder.sub(fields, first32)
            index = builder.and_(offset, splat(WINDOW - 1))
            read = lambda row: builder.call(permute, [windows[row][0], index, windows[row][1]])
            above = builder.fcmp_ordered(">=", tv, read(0))
            pick = lambda row: builder.select(above, read(row + 1), read(row))
            builder.store(pick(1), builder.bitcast(builder.gep(low_data, [at]), floats.as_pointer()), align=4)
            builder.store(pick(3), builder.bitcast(builder.gep(high_data, [at]), floats.as_pointer()), align=4)
            builder.store(builder.bitcast(pick(5), ints), builder.bitcast(builder.gep(code_data, [at]), ints.as_pointer()), align=4)
            missed = builder.zext(builder.bitcast(builder.icmp_unsigned(">=", offset, splat(WINDOW)), ir.IntType(16)), i64)
            builder.store(missed, builder.gep(outside_data, [loop.index]))
            builder.store(builder.or_(builder.load(union), missed), union)
        return builder.load(union)

    return types.int64(t, groups, first_field, tables, lows, highs, codes, outside), codegen


@intrinsic
def step_sums(typingctx, width, values, steps, rows, square, out):
    """out[s, k] = the float64 sum, from 0 and row after row, of values[(s rows + r) width + k]^2
    (``square``) or of its magnitude, over r = 0 .. rows - 1, for each of ``steps`` runs of ``rows``
    rows of ``width`` lanes (``width`` a literal): the partial sums that ``cpu_kernels.block_sums``
    adds into its cascade, each with the roundings of its scalar loop (a product, then a sum; exact
    conversions). ``values``: float32 or float64, C-contiguous, at least steps x rows x width long;
    ``out``: float64, C-contiguous, steps x width. The sums run as vectors of ``width`` lanes kept in
    registers, one run after another, so that x is read in order. Four runs side by side (to keep
    more of the runs' dependent additions in flight) read four streams of 1 KB each at a time, which
    AMD Zen 4's prefetchers did not follow: 1e7 float32 squares on one thread took 3.0-3.5 ms that
    way against 1.1-1.6 ms one run after another (the chain of a run's additions is not what limits:
    16 rows of 3-4 cycles for 256 or 512 coordinates)."""
    if not (isinstance(width, types.IntegerLiteral) and isinstance(values, types.Array) and isinstance(out, types.Array)
            and values.dtype in (types.float32, types.float64) and out.dtype == types.float64
            and values.layout == out.layout == "C" and isinstance(steps, types.Integer) and isinstance(rows, types.Integer)
            and square == types.boolean):
        return None
    lanes = width.literal_value

    def codegen(context, builder, signature, args):
        _, values_value, steps_value, rows_value, square_value, out_value = args
        item = context.get_data_type(signature.args[1].dtype)
        double = ir.DoubleType()
        sums_type = ir.VectorType(double, lanes)
        source = builder.bitcast(context.make_array(signature.args[1])(context, builder, values_value).data,
                                 ir.VectorType(item, lanes).as_pointer())
        target = builder.bitcast(context.make_array(signature.args[5])(context, builder, out_value).data, sums_type.as_pointer())
        magnitude = cgutils.get_or_insert_function(builder.module, ir.FunctionType(sums_type, [sums_type]), f"llvm.fabs.v{lanes}f64")
        alignment = item.get_abi_alignment(context.target_data)
        intp = steps_value.type
        rows_count = builder.sext(rows_value, intp) if rows_value.type != intp else rows_value
        cell = cgutils.alloca_once(builder, sums_type)

        def all_runs(term):
            """The sums of the runs, one after another."""
            with cgutils.for_range(builder, steps_value) as run:
                builder.store(ir.Constant(sums_type, [0.0] * lanes), cell)
                start = builder.gep(source, [builder.mul(run.index, rows_count)])
                with cgutils.for_range(builder, rows_count) as loop:
                    loaded = builder.load(builder.gep(start, [loop.index]), align=alignment)
                    wide = loaded if item == double else builder.fpext(loaded, sums_type)
                    builder.store(builder.fadd(builder.load(cell), term(wide)), cell)
                builder.store(builder.load(cell), builder.gep(target, [run.index]), align=8)

        with builder.if_else(square_value) as (squares, magnitudes):
            with squares:
                all_runs(lambda v: builder.fmul(v, v))
            with magnitudes:
                all_runs(lambda v: builder.call(magnitude, [v]))
        return context.get_dummy_value()

    return types.void(width, values, steps, rows, square, out), codegen


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


@intrinsic
def pack64(typingctx, codes, at, minus, clamp, width, index, out, out_at):
    """The 64 fields codes[at + j] - minus (clamped at 0 with ``clamp``) of ``width`` bits (2..7), in
    the layout of ``common.wire.bitpack``, written as the 8 ``width`` bytes out[out_at:]: the codes
    (uint8 or int16) narrowed to bytes, each 8 bytes' fields moved together in three shift-and-mask
    steps (as ``cpu_kernels``'s ``pack_words`` does in one 64-bit word), and the 8 groups' ``width``
    low bytes put side by side by one byte permutation (AVX-512 VBMI's vpermb, ``index``: the 64
    byte positions for this width) and a masked store. x86 with AVX-512 VBMI only."""
    if not (isinstance(codes, types.Array) and codes.dtype in (types.uint8, types.int16)
            and isinstance(index, types.Array) and index.dtype == types.uint8
            and isinstance(out, types.Array) and out.dtype == types.uint8):
        return None

    def codegen(context, builder, signature, args):
        codes_value, at_value, minus_value, clamp_value, width_value, index_value, out_value, out_at_value = args
        i8, i32, i64 = ir.IntType(8), ir.IntType(32), ir.IntType(64)
        item = context.get_data_type(signature.args[0].dtype)
        source = builder.gep(context.make_array(signature.args[0])(context, builder, codes_value).data, [at_value])
        loaded = builder.load(builder.bitcast(source, ir.VectorType(item, 64).as_pointer()), align=1)
        wide_type = ir.VectorType(i32, 64)
        wide = builder.zext(loaded, wide_type) if signature.args[0].dtype == types.uint8 else builder.sext(loaded, wide_type)

        fields = builder.sub(wide, _splat(builder, builder.trunc(minus_value, i32), wide_type))
        zeros = ir.Constant(wide_type, [0] * 64)
        clamped = builder.select(builder.icmp_signed(">", fields, zeros), fields, zeros)
        clamp_bit = context.cast(builder, clamp_value, signature.args[3], types.boolean)
        fields = builder.select(clamp_bit, clamped, fields)
        words_type = ir.VectorType(i64, 8)
        x = builder.bitcast(builder.trunc(fields, ir.VectorType(i8, 64)), words_type)
        w = builder.zext(builder.trunc(width_value, i32), i64) if width_value.type != i64 else width_value

        def constant(value):
            return ir.Constant(words_type, [value] * 8)

        def shifted(amount):
            return _splat(builder, amount, words_type)

        x = builder.or_(builder.and_(x, constant(0x00FF00FF00FF00FF)),
                        builder.lshr(builder.and_(x, constant(0xFF00FF00FF00FF00 - (1 << 64))), shifted(builder.sub(ir.Constant(i64, 8), w))))
        x = builder.or_(builder.and_(x, constant(0x0000FFFF0000FFFF)),
                        builder.lshr(builder.and_(x, constant(0xFFFF0000FFFF0000 - (1 << 64))),
                                     shifted(builder.sub(ir.Constant(i64, 16), builder.shl(w, ir.Constant(i64, 1))))))
        x = builder.or_(builder.and_(x, constant(0xFFFFFFFF)),
                        builder.shl(builder.lshr(x, constant(32)), shifted(builder.shl(w, ir.Constant(i64, 2)))))
        byte_vector = ir.VectorType(i8, 64)
        positions = builder.load(builder.bitcast(context.make_array(signature.args[5])(context, builder, index_value).data,
                                                 byte_vector.as_pointer()), align=1)
        permute = cgutils.get_or_insert_function(builder.module, ir.FunctionType(byte_vector, [byte_vector, byte_vector]),
                                                 "llvm.x86.avx512.permvar.qi.512")
        packed = builder.call(permute, [builder.bitcast(x, byte_vector), positions])
        keep = _low_bytes(builder, w)  # 8 width bytes (< 64)
        target = builder.gep(context.make_array(signature.args[6])(context, builder, out_value).data, [out_at_value])
        store = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [byte_vector, byte_vector.as_pointer(), i32, keep.type]),
                                               "llvm.masked.store.v64i8.p0")
        builder.call(store, [packed, builder.bitcast(target, byte_vector.as_pointer()), ir.Constant(i32, 1), keep])
        return context.get_dummy_value()

    return types.void(codes, at, minus, clamp, width, index, out, out_at), codegen


@intrinsic
def unpack64(typingctx, data, at, width, offset, escape, index, out, out_at):
    """Inverse of ``pack64``: the 64 codes out[out_at:out_at + 64] (uint8 or int16) from the 8
    ``width`` bytes data[at:] (2..7 bits a field): a masked load of those bytes only, one byte
    permutation (``index``: group g's byte b < width from byte g width + b, the other bytes from a
    byte the load left 0), three shift-and-mask steps, and the offset added (``escape``: field 0 is
    code 0, field f > 0 is code f + offset - 1). Returns the largest of the 64 codes. x86 with
    AVX-512 VBMI only."""
    if not (isinstance(data, types.Array) and data.dtype == types.uint8 and isinstance(index, types.Array)
            and index.dtype == types.uint8 and isinstance(out, types.Array) and out.dtype in (types.uint8, types.int16)):
        return None

    def codegen(context, builder, signature, args):
        data_value, at_value, width_value, offset_value, escape_value, index_value, out_value, out_at_value = args
        i8, i32, i64 = ir.IntType(8), ir.IntType(32), ir.IntType(64)
        bytes_type, words_type = ir.VectorType(i8, 64), ir.VectorType(i64, 8)

        w = builder.zext(builder.trunc(width_value, i32), i64)
        keep = _low_bytes(builder, w)
        source = builder.gep(context.make_array(signature.args[0])(context, builder, data_value).data, [at_value])
        load = cgutils.get_or_insert_function(builder.module, ir.FunctionType(bytes_type, [bytes_type.as_pointer(), i32, keep.type, bytes_type]),
                                              "llvm.masked.load.v64i8.p0")
        packed = builder.call(load, [builder.bitcast(source, bytes_type.as_pointer()), ir.Constant(i32, 1), keep, ir.Constant(bytes_type, [0] * 64)])
        positions = builder.load(builder.bitcast(context.make_array(signature.args[5])(context, builder, index_value).data,
                                                 bytes_type.as_pointer()), align=1)
        permute = cgutils.get_or_insert_function(builder.module, ir.FunctionType(bytes_type, [bytes_type, bytes_type]),
                                                 "llvm.x86.avx512.permvar.qi.512")
        v = builder.bitcast(builder.call(permute, [packed, positions]), words_type)
        one = ir.Constant(i64, 1)

        def spread(v, low_mask, shift, mask_shift):
            low = _splat(builder, low_mask, words_type)
            moved = builder.and_(builder.shl(v, _splat(builder, shift, words_type)), builder.shl(low, _splat(builder, mask_shift, words_type)))
            return builder.or_(builder.and_(v, low), moved)

        half = builder.sub(builder.shl(one, builder.shl(w, ir.Constant(i64, 2))), one)
        v = spread(v, half, builder.sub(ir.Constant(i64, 32), builder.shl(w, ir.Constant(i64, 2))), ir.Constant(i64, 32))
        pair = builder.mul(builder.sub(builder.shl(one, builder.shl(w, one)), one), ir.Constant(i64, 0x0000000100000001))
        v = spread(v, pair, builder.sub(ir.Constant(i64, 16), builder.shl(w, one)), ir.Constant(i64, 16))
        field = builder.mul(builder.sub(builder.shl(one, w), one), ir.Constant(i64, 0x0001000100010001))
        v = spread(v, field, builder.sub(ir.Constant(i64, 8), w), ir.Constant(i64, 8))
        fields = builder.bitcast(v, bytes_type)
        item = context.get_data_type(signature.args[6].dtype)
        codes_type = ir.VectorType(item, 64)
        wide = builder.zext(fields, codes_type) if item != i8 else fields
        escape_bit = context.cast(builder, escape_value, signature.args[4], types.boolean)
        add = builder.trunc(builder.sub(offset_value, builder.zext(escape_bit, offset_value.type)), item)
        added = builder.add(wide, _splat(builder, add, codes_type))
        zeros = ir.Constant(codes_type, [0] * 64)
        escaped = builder.select(builder.icmp_unsigned("==", wide, zeros), zeros, added)
        codes = builder.select(escape_bit, escaped, added)
        target = builder.gep(context.make_array(signature.args[6])(context, builder, out_value).data, [out_at_value])
        builder.store(codes, builder.bitcast(target, codes_type.as_pointer()), align=1)
        largest = cgutils.get_or_insert_function(builder.module, ir.FunctionType(item, [codes_type]),
                                                 f"llvm.vector.reduce.umax.v64i{item.width}")
        return builder.zext(builder.call(largest, [codes]), i64)

    return types.int64(data, at, width, offset, escape, index, out, out_at), codegen
