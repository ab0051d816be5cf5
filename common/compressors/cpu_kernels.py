"""The quantizers' CPU hot path as compiled single passes (Numba): quantize, pack, unpack, dequantize.

``quantize`` computes, for every coordinate, the sign flag and the level code of exponential
rounding (natural compression included), exponential / natural dithering, QSGD and ternary
quantization: t_i = |x_i| (divided by the norm for dithering), its lower level l_k <= t_i < l_(k+1),
and the code k or k + 1 (stochastic: up with probability (t_i - l_k)/(l_(k+1) - l_k), Beznosikov et
al. eqs. 12-14; biased: the nearer level, ties down). The torch version in ``rounding`` (used on
other devices, and on the CPU where Numba is missing) does the same in about ten vectorized passes
with temporaries; this kernel reads x once and writes one code per coordinate and, in float32, the
sign flags as the wire's sign bitmap (the frame the encoder sends as it is: ``Quantized.signs``),
with the same float arithmetic and the same counter-based draws (``common.compressors.draws``), so
the two give identical codes and signs (tests/test_cpu_kernels.py).

The lower level is found without a search over the whole table: ``binade_starts`` gives, for each
exponent field of the arithmetic dtype, the lower level of the smallest number with that field, and
a forward step finishes (one step for base >= 2, a short scan for bases below 2). In float32, two
tables need no lookup at all: uniform tables (QSGD, ternary) take k = floor(t s), as the torch version
does, and l_k = k / s by arithmetic (``quantize_uniform32``); tables of powers of two (natural
compression, base-2 rounding, natural dithering) take k and the levels from t's exponent field
(``quantize_powers32``). Both run as vectorized loops; a table read kept the general kernel scalar.
Tables with one level at most in each binade (bases above 2) are read from copies on the kernel's
stack (``quantize_pairs32``, ``kernel_parts``), which lets that loop run on vector gathers too, or
with AVX-512 from windows of the tables held in registers (``quantize_pairs32_windowed``). Tables of
at most 16 levels where that is faster (``_small_table_pays``: up to 7 levels past 0 of one level
a binade, natural dithering with s <= 3, bases below 2, hosts without AVX-512) count the levels t
reaches in vector registers instead (``quantize_small32``).

The wire codec uses the other kernels for a ``Quantized`` payload on the CPU: ``code_range`` (min,
max and smallest nonzero code in one pass), ``pack_codes`` / ``unpack_codes`` (fields of 1..8 bits in
the ``common.wire.bitpack`` layout, with the code offset and zero escape applied on the way: one-bit
fields through NumPy's ``packbits``, wider ones from 64-bit words of 8 uint8 or 4 int16 codes at a
time, ``pack_words`` / ``unpack_words``, or 64 at a time in vector registers where the kernels are
compiled for AVX-512 VBMI, ``pack_vectors`` / ``unpack_vectors``, and 8 fields at a time elsewhere)
and ``dequantize`` (one gather from the signed level table, from a copy on the kernel's stack where
the table is small; the signs read from the sign bitmap a block at a time). Each returns None where it does not apply, and the caller falls back to the
torch version.

``float64_sum`` serves the float64 norms of ``base.float64_norm`` (dithering's 2-norm, sign's
scale): it adds |x_i| or x_i^2 in float64 in exactly the order of torch's sum over the same blocks,
so the norm, and with it every code, stays as it was; it reads x once instead of converting each
block to a float64 copy first, and its blocks run in parallel.

``signs_to_dense`` expands a scaled-sign payload in one pass, and ``amsgrad_step`` runs the AMSGrad
family's optimizer update (CD-Adam's lines 13-16) in two compiled passes around torch's square
root, with the same bits as its torch expressions: at d = 1e7 they were about a quarter of a CD-Adam round on each side.
``descend`` (x - lr g) and ``mean_descend`` (the running mean of dense uplinks, then the step) do a
gradient method's step in one pass each, with the bits of torch's separate operations.
``keyed_range`` evaluates Perm-K's keyed bijection (``indices.keyed_permutation``) on a block of
positions in one pass, with the integer arithmetic of the torch version's twenty-odd passes.
``marked`` sets the block's positions in a bitmap of d bits; ``marked_rows`` and ``marked_blocks`` find
that bitmap from the image side, every coordinate mapped back through the network a band of its
domain at a time (``mark_rows_banded``: bit matrices, transposed; the tables read 16 entries at a
time at a row's place, not one entry a coordinate). ``gather_marked`` (the message's values, and whether x is finite) and ``scatter_marked``
(the dense form, or h + it) read the bitmap in increasing order: the block is never sorted, and no
index array is written or read.

``keyed_subsets`` draws Rand-K's supports chunk by chunk (``indices.randk_support``), each chunk's
subset from counter-based draws into a bitmap in the L1 cache, the chunks in parallel.

Kernels are compiled on first use (about a second) and cached on disk (Numba's ``cache=True``).
Numba keys a cached kernel by the content of the file that defines it, not of the modules its code
takes in, so this file names the version of ``kernel_parts`` it compiles against
(``KERNEL_PARTS_DIGEST``): a change there changes this file too, and no process loads a kernel built
from older parts.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import hashlib
import itertools
import math
import sys
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from common.compressors.draws import GOLDEN

# The digest of kernel_parts.py (``parts_digest``) that the kernels here were last compiled against:
# its intrinsics and helpers are compiled into them, and Numba's disk cache does not see them change.
# tests/test_cpu_kernels.py fails until this is the current digest. (A kernel cached before a
# change of kernel_parts.py alone was loaded as it was: a mutation test of an intrinsic found it.)
KERNEL_PARTS_DIGEST = "b2d823cf4217e814"


def parts_digest() -> str:
    """The first 16 hex digits of kernel_parts.py's SHA-256 (its line ends as LF)."""
    source = Path(__file__).with_name("kernel_parts.py").read_bytes().replace(b"\r\n", b"\n")
    return hashlib.sha256(source).hexdigest()[:16]


def _parts_current() -> bool:
    """Whether kernel_parts.py is the one ``KERNEL_PARTS_DIGEST`` names (True where it cannot be read
    as a file: then nothing here can tell)."""
    try:
        return parts_digest() == KERNEL_PARTS_DIGEST
    except OSError:
        return True


@functools.lru_cache(maxsize=None)
def _kernels():
    try:
        import numba

        from common.compressors import kernel_parts  # (imports Numba)
    except ImportError:
        return None
    u64 = np.uint64
    golden = u64(GOLDEN)
    BIG = np.int64(2**62)  # no code (an empty piece's minimum)

    cache = _parts_current()

    def jit(**options):
        """Compiled without the GIL and cached on disk; without the cache where no folder is writable
        (a read-only install), since Numba refuses to decorate a cached function there, and where
        kernel_parts.py is not the one ``KERNEL_PARTS_DIGEST`` names (a cached kernel would hold
        the older parts)."""
        def decorate(fn):
            try:
                return numba.njit(cache=cache, nogil=True, **options)(fn)
            except RuntimeError:
                return numba.njit(nogil=True, **options)(fn)
        return decorate

    # float32 works on blocks of 4096 coordinates in four loops, so that the divisions run as vector
    # instructions: |x| / norm (vectorized), the level lookup (scalar: table loads), the draws (two per
    # SplitMix64 output), then (t - lo) / gap and the coin flip (vectorized). The coin flip and the
    # level step are arithmetic, not branches (a mispredicted branch per coordinate cost more than
    # the rest), and error_model="numpy" drops the zero-division check of each division. ``first``
    # is the index of x[0] in the whole vector (even), which names the draws. The lookup reads lo and
    # hi once before its stores (the compiler cannot tell that a store leaves ``levels`` alone);
    # unsigned indices skip the wraparound of negative ones.
    # Three kinds of float32 table have their own kernels below: uniform tables and tables of powers
    # of two compute the levels instead of reading them, and tables with one level at most in each
    # binade read them from copies on the stack. This one serves the others (bases below 2, and
    # uniform tables whose levels are not the quotients k / s).

    @jit(error_model="numpy")
    def quantize32(x, first, divisor, uniform_s, starts, crowded, levels, top, key, stochastic, signs, codes):
        scale = np.float32(16777216.0)  # 2^24
        s = np.float32(uniform_s)
        one = u64(1)
        n = x.size
        t = np.empty(BLOCK, np.float32)
        num = np.empty(BLOCK, np.float32)
        den = np.empty(BLOCK, np.float32)
        low = np.empty(BLOCK, np.int64)
        halves = np.zeros(BLOCK, np.uint32)  # the draws' 32-bit halves, coordinate by coordinate
        nb = np.zeros(BLOCK, np.bool_)  # x < 0, packed into ``signs`` block by block
        least, most, nonzero = BIG, np.int64(-1), BIG
        for b0 in range(0, n, BLOCK):
            m = min(BLOCK, n - b0)
            xb, cb = x[b0:b0 + m], codes[b0:b0 + m]  # (x[b0 + j] was not vectorized)
            for j in range(m):
                v = xb[j]
                nb[j] = v < 0
                t[j] = np.float32(abs(v) / divisor)  # divisor 1 (exact) when there is no norm
            kernel_parts.pack_signs(nb, m, signs, b0 // 8)
            fields = t.view(np.uint32)  # exponent fields (the mask keeps a NaN of either sign in the table)
            if uniform_s == 0:
                for j in range(m):
                    tj = t[j]
                    field = (fields[j] >> np.uint32(23)) & np.uint32(0xFF)
                    k = np.int64(starts[field])
                    k += np.int64(levels[k + 1] <= tj)
                    if crowded[field]:  # more levels in the binade
                        while k < top - 1 and levels[k + 1] <= tj:
                            k += 1
                    low[j] = k
            for j in range(m):
                tj = t[j]
                k = np.int64(np.float32(tj * s)) if uniform_s > 0 else low[j]  # truncation is floor for t >= 0
                k = np.uint64(min(max(k, 0), top - 1))
                low[j] = k
                lo, hi = levels[k], levels[k + one]
                num[j] = np.float32(tj - lo)
                # stochastic: the gap hi - lo; nearest level: hi - t, compared with t - lo (ties down)
                den[j] = np.float32(hi - lo) if stochastic else np.float32(hi - tj)
            if stochastic:
                kernel_parts.draw_halves(key, first + b0, m, halves)
                for j in range(m):  # up with probability (t - lo) / gap; p = 1 where the gap is 0
                    gap = den[j]
                    drawn = np.float32(halves[j] & np.uint32(0xFFFFFF))
                    up = np.int64(drawn < np.float32(np.float32(num[j] / gap) * scale)) | np.int64(gap <= 0)
                    c = low[j] + up
                    cb[j] = c
                    least, most = min(least, c), max(most, c)
                    nonzero = min(nonzero, c if c != 0 else BIG)
            else:
                for j in range(m):
                    c = low[j] + np.int64(num[j] > den[j])
                    cb[j] = c
                    least, most = min(least, c), max(most, c)
                    nonzero = min(nonzero, c if c != 0 else BIG)
        return least, most, nonzero, np.int32(-1)  # (finiteness not read: it cost this loop 1-7 ms)

    # Tables with one level at most in each binade of float32 above the subnormal one (exponential
    # rounding and dithering with a base above 2): ``binade_pairs`` gives, for t's exponent field E and
    # whether t is at or above the binade's level, t's lower code and both its levels: one comparison
    # and one index instead of a search. The four tables (256 and 512 entries) are copied onto the
    # kernel's stack first (``kernel_parts``), where no store of the loop can reach them: the lookups
    # then run on vector gathers, where the tables as arguments kept them scalar (one thread at
    # d = 1e7, base-3 rounding 34.5 -> 19.1 ms stochastic and 29.8 -> 15.6 ms nearest; base-3
    # dithering, s = 4, 30.8 -> 19.3 and 25.1 -> 14.9, with the lookups and the arithmetic in one
    # loop; ``kernel_parts.pair_code`` gives a code from its levels). Nonzero subnormal t (rounding
    # tables hold many levels there: ``scan`` = 1) are redone from the table with the same draws after
    # the loop (``kernel_parts.redo_subnormal``, as in ``quantize_powers32``).

    @jit(error_model="numpy")
    def quantize_pairs32(x, first, divisor, above, pair_codes, pair_lo, pair_hi, levels, scan, top, key, stochastic,
                         signs, codes):
        n = x.size
        over = kernel_parts.stack_like(256, above)
        code_of, low_of, high_of = kernel_parts.stack_like(512, pair_codes), kernel_parts.stack_like(512, pair_lo), kernel_parts.stack_like(512, pair_hi)
        for i in range(256):
            over[i] = above[i]
        for i in range(512):
            code_of[i], low_of[i], high_of[i] = pair_codes[i], pair_lo[i], pair_hi[i]
        halves = np.zeros(BLOCK, np.uint32)
        nb = np.zeros(BLOCK, np.bool_)  # x < 0, packed into ``signs`` block by block
        t = np.empty(BLOCK, np.float32)
        fields = t.view(np.uint32)
        none = np.int32(2**30)
        least, most, nonzero = none, np.int32(-1), none
        bad = np.int32(0)  # 1 where a t is inf or NaN: its exponent field is all ones
        for b0 in range(0, n, BLOCK):
            m = min(BLOCK, n - b0)
            xb, cb = x[b0:b0 + m], codes[b0:b0 + m]
            kernel_parts.block_start(xb, divisor, key, first + b0, stochastic, nb[:m], t, halves)
            kernel_parts.pack_signs(nb, m, signs, b0 // 8)
            redo = np.int32(0)
            lmin, lmax, lnz = none, np.int32(-1), none
            for j in range(m):
                tj = t[j]
                field = (fields[j] >> np.uint32(23)) & np.uint32(0xFF)
                i = np.int32(field << np.uint32(1)) + np.int32(tj >= over[field])
                code = kernel_parts.pair_code(tj, low_of[i], high_of[i], code_of[i], halves[j], stochastic)
                cb[j] = code
                redo = max(redo, np.int32((field == np.uint32(0)) & (fields[j] != np.uint32(0))))  # subnormal t
                bad = max(bad, np.int32(field == np.uint32(0xFF)))
                lmin, lmax = min(lmin, code), max(lmax, code)
                lnz = min(lnz, code if code != 0 else none)
            if scan == 1 and redo > 0:  # only the subnormal binade (field 0) holds more levels: finish there
                lmin, lmax, lnz = kernel_parts.redo_subnormal(t[:m], halves, cb, code_of[0], levels, top, stochastic)
            least, most, nonzero = min(least, lmin), max(most, lmax), min(nonzero, lnz)
        return (np.int64(least) if most >= 0 else BIG), np.int64(most), (np.int64(nonzero) if nonzero != none else BIG), bad

    # The same with AVX-512, without gathers: a block's lookups of 16 coordinates at a time come from
    # windows of 32 exponent fields of the tables, held in registers and read by permutations
    # (``kernel_parts.window_pairs``), into three small arrays that the loop of codes then reads in
    # order. A block's window ends at its largest field; the few t below it (zeros, values 2^31 times
    # smaller than the block's largest) are looked up one by one. On AMD Zen 4, where a 16-lane gather
    # cost about 18 cycles, one thread at d = 1e7 (base-3 rounding, stochastic): 25 -> 10 ms.
    # ``windows``: ``binade_windows``.

    @jit(error_model="numpy")
    def quantize_pairs32_windowed(x, first, divisor, above, pair_codes, pair_lo, pair_hi, windows, levels, scan, top,
                                  key, stochastic, signs, codes):
        n = x.size
        halves = np.zeros(BLOCK, np.uint32)
        nb = np.zeros(BLOCK, np.bool_)  # x < 0, packed into ``signs`` block by block
        t = np.zeros(BLOCK, np.float32)  # (the last block's groups read past its end: zeros, not NaN)
        fields = t.view(np.uint32)
        lows, highs, lower = np.empty(BLOCK, np.float32), np.empty(BLOCK, np.float32), np.empty(BLOCK, np.int32)
        outside = np.empty(BLOCK // 16, np.int64)
        none = np.int32(2**30)
        least, most, nonzero = none, np.int32(-1), none
        bad = np.int32(0)
        for b0 in range(0, n, BLOCK):
            m = min(BLOCK, n - b0)
            xb, cb = x[b0:b0 + m], codes[b0:b0 + m]
            kernel_parts.block_start(xb, divisor, key, first + b0, stochastic, nb[:m], t, halves)
            kernel_parts.pack_signs(nb, m, signs, b0 // 8)
            highest = np.uint32(0)
            for j in range(m):
                highest = max(highest, (fields[j] >> np.uint32(23)) & np.uint32(0xFF))
            groups = (m + 15) // 16
            if kernel_parts.window_pairs(t, groups, max(np.int64(highest) - (kernel_parts.WINDOW - 1), 0), windows,
                                         lows, highs, lower, outside) != 0:
                for g in range(groups):
                    for j in range(16 * g, min(m, 16 * g + 16)):
                        if (outside[g] >> (j - 16 * g)) & 1:
                            field = (fields[j] >> np.uint32(23)) & np.uint32(0xFF)
                            i = np.int32(field << np.uint32(1)) + np.int32(t[j] >= above[field])
                            lows[j], highs[j], lower[j] = pair_lo[i], pair_hi[i], pair_codes[i]
            redo = np.int32(0)
            lmin, lmax, lnz = none, np.int32(-1), none
            for j in range(m):
                code = kernel_parts.pair_code(t[j], lows[j], highs[j], lower[j], halves[j], stochastic)
                cb[j] = code
                field = (fields[j] >> np.uint32(23)) & np.uint32(0xFF)
                redo = max(redo, np.int32((field == np.uint32(0)) & (fields[j] != np.uint32(0))))
                bad = max(bad, np.int32(field == np.uint32(0xFF)))
                lmin, lmax = min(lmin, code), max(lmax, code)
                lnz = min(lnz, code if code != 0 else none)
            if scan == 1 and redo > 0:
                lmin, lmax, lnz = kernel_parts.redo_subnormal(t[:m], halves, cb, pair_codes[0], levels, top, stochastic)
            least, most, nonzero = min(least, lmin), max(most, lmax), min(nonzero, lnz)
        return (np.int64(least) if most >= 0 else BIG), np.int64(most), (np.int64(nonzero) if nonzero != none else BIG), bad

    # Tables of at most 16 levels (dithering with s <= 15) in float32: t's lower code is the number of
    # levels it reaches, counted 16 coordinates at a time with the levels in registers, and the code,
    # the uint8 store, the codes met and the finiteness flag follow in the same registers
    # (``kernel_parts.small_table_codes``): no lookup, no window, no second look at subnormal t. The
    # same codes as the tables' kernels. One thread at d = 1e7, base-3 dithering with s = 4:
    # 10.6-11.5 -> 8.7-9.8 ms against the windows; base 1.5 with s = 7 (binades of several levels,
    # which the general loop above scans): 108 -> 11 ms. ``levels``: ``small_levels``. t = |x| /
    # divisor and the sign bitmap are formed in the same registers from x (no t or flag array in the
    # cache, no packing pass): the quantizer's call 9.8-12.6 -> 7.3-9.5 ms on one thread.

    @jit(error_model="numpy")
    def quantize_small32(x, first, divisor, levels, top, key, stochastic, signs, codes):
        n = x.size
        halves = np.zeros(BLOCK, np.uint32)  # (the last block's last group reads past its end)
        met = np.int64(0)  # bit c: a code c; bit 16: a t inf or NaN
        for b0 in range(0, n, BLOCK):
            m = min(BLOCK, n - b0)
            kernel_parts.fetch_ahead(x, b0 + BLOCK, b0 + 2 * BLOCK)  # the next block, while this one is computed
            if stochastic:
                kernel_parts.draw_halves(key, first + b0, m, halves)
            met |= kernel_parts.small_table_codes(x[b0:b0 + m], divisor, halves, m, levels, top, stochastic,
                                                  codes[b0:b0 + m], signs, b0 // 8)
        least, most, nonzero = BIG, np.int64(-1), BIG
        for c in range(16):
            if (met >> c) & 1:
                least, most = min(least, np.int64(c)), np.int64(c)
                nonzero = min(nonzero, np.int64(c) if c > 0 else BIG)
        return least, most, nonzero, np.int32((met >> 16) & 1)

    # Uniform tables (QSGD, ternary) in float32: l_k = k / s, so the levels come from arithmetic
    # instead of table reads, and each block is one loop that the compiler vectorizes (a gather from
    # the table kept the loops above scalar). For s a power of two, k / s = k * (1 / s) and the gap is
    # 1 / s exactly, so (t - lo) / gap is the product (t - lo) * s: no division but |x| / norm. For
    # other s, k / s is one float32 division, which equals the table's float32 of the float64 quotient
    # (``uniform_levels_are_quotients`` checks each table before the kernel is used). The draws are
    # written to a separate array first (a view of the 64-bit outputs kept the main loop scalar), and
    # the stochastic and nearest-level tests are both computed and selected, without a branch. One
    # thread over 1e7 coordinates: 8.8-9 ms for s = 16 and 12.6 ms for s = 7, against 25 ms before.
    # The draws come from ``kernel_parts.draw_halves``, inlined: a helper reached as a variable of this
    # closure instead is not found in Numba's disk cache (see ``kernel_parts``).
    # This kernel and the small-table one read x in their main loop, which spends some 25 cycles on
    # each cache line of x: they ask for the next block's lines first (``kernel_parts.fetch_ahead``).
    # On an Intel Xeon host (2 vCPUs) the hardware prefetchers alone left QSGD's codes at d = 1e7
    # (one thread) at 17.9 ms to the nearest level and 21.6 stochastic, against 5.8 and 9.0 with it;
    # on a vector already in the cache the loop takes about the latter. Kernels whose first loop over
    # a block is a light one (|x| / norm into a scratch: the general, binade and power-of-two tables)
    # were 5% slower with it and do without.

    @jit(error_model="numpy")
    def quantize_uniform32(x, first, divisor, uniform_s, power_of_two, key, stochastic, signs, codes):
        scale = np.float32(16777216.0)  # 2^24
        s = np.float32(uniform_s)
        step = np.float32(1.0) / s  # exact where s is a power of two
        last = np.float32(uniform_s - 1)  # the largest lower level's index
        n = x.size
        halves = np.zeros(BLOCK, np.uint32)  # the draws' 32-bit halves, coordinate by coordinate
        nb = np.zeros(BLOCK, np.bool_)  # x < 0, packed into ``signs`` block by block
        none = np.int32(2**30)
        least, most, nonzero = none, np.int32(-1), none
        for b0 in range(0, n, BLOCK):
            m = min(BLOCK, n - b0)
            kernel_parts.fetch_ahead(x, b0 + BLOCK, b0 + 2 * BLOCK)  # the next block, while this one is computed
            xb, cb = x[b0:b0 + m], codes[b0:b0 + m]
            if stochastic:
                kernel_parts.draw_halves(key, first + b0, m, halves)
            if power_of_two:
                for j in range(m):
                    v = xb[j]
                    nb[j] = v < 0
                    t = np.float32(abs(v) / divisor)
                    k = np.int32(min(np.float32(t * s), last))  # truncation is floor for t >= 0
                    lo = np.float32(k) * step
                    num = np.float32(t - lo)
                    drawn = np.float32(halves[j] & np.uint32(0xFFFFFF)) < np.float32(np.float32(num * s) * scale)
                    nearer = num > np.float32(np.float32(lo + step) - t)  # ties down
                    c = np.int32(k + np.int32((stochastic & drawn) | (nearer & (not stochastic))))
                    cb[j] = c
                    least, most = min(least, c), max(most, c)
                    nonzero = min(nonzero, c if c != 0 else none)
            else:
                for j in range(m):
                    v = xb[j]
                    nb[j] = v < 0
                    t = np.float32(abs(v) / divisor)
                    k = np.int32(min(np.float32(t * s), last))
                    lo = np.float32(np.float32(k) / s)
                    hi = np.float32(np.float32(k + 1) / s)
                    num = np.float32(t - lo)
                    gap = np.float32(hi - lo)
                    drawn = (np.float32(halves[j] & np.uint32(0xFFFFFF)) < np.float32(np.float32(num / gap) * scale)) | (gap <= np.float32(0))
                    nearer = num > np.float32(hi - t)
                    c = np.int32(k + np.int32((stochastic & drawn) | (nearer & (not stochastic))))
                    cb[j] = c
                    least, most = min(least, c), max(most, c)
                    nonzero = min(nonzero, c if c != 0 else none)
            kernel_parts.pack_signs(nb, m, signs, b0 // 8)
        return (np.int64(least) if most >= 0 else BIG), np.int64(most), (np.int64(nonzero) if nonzero != none else BIG), np.int32(-1)  # (not read: x checked by its norm)

    # Tables of 0 and powers of two, l_k = 2^(k + c) for k >= 1 (natural compression and base-2
    # exponential rounding: c = emin - 1; natural dithering: c = -s), in float32. For t in the binade
    # [2^e, 2^(e+1)) the lower level is k = e - c (clamped to [0, top - 1]; zeros and t below l_1 take
    # k = 0). Where 1 <= k <= top - 1, lo = 2^(k + c) is t with its mantissa field m cleared and the
    # gap is lo, so (t - lo) / gap = m 2^-23 exactly: the coin flip "u 2^24 < (t - lo) / gap 2^24" is
    # the integer comparison u 2^24 < 2 m, and the nearest level's test (t - lo > hi - t, ties down)
    # is m > 2^22. Below l_1, lo = 0 and hi = l_1, a power of two (t / l_1 as a product); at or above
    # the top level the code is the top. The same codes as the table without a read or a division,
    # in one loop per block that the compiler vectorizes (the three cases selected, not branched; one
    # thread at d = 1e7: 14.9 -> 12.6 ms stochastic, 10.7 -> 9.2 ms nearest, against a loop that
    # built lo and 1 / gap as exponent fields for a float pass). Where l_1 is subnormal
    # (natural compression of float32), a nonzero subnormal t falls between subnormal levels that
    # have no exponent field: such coordinates (``fixups`` counts them) are redone from the table,
    # with the same draw, after the loop; the block's code range is then taken again.

    @jit(error_model="numpy")
    def quantize_powers32(x, first, divisor, c, top, fixups, levels, starts, key, stochastic, signs, codes):
        scale = np.float32(16777216.0)  # 2^24
        c32 = np.int32(c)
        last = np.int32(top - 1)
        n = x.size
        halves = np.zeros(BLOCK, np.uint32)  # the draws' 32-bit halves, coordinate by coordinate
        nb = np.zeros(BLOCK, np.bool_)  # x < 0, packed into ``signs`` block by block
        t = np.empty(BLOCK, np.float32)
        fields = t.view(np.uint32)
        first_level, top_level = levels[1], levels[top]  # hi where k = 0, the top level
        inverse_first = np.float32(2.0 ** -max(1 + c, -126))  # 1 / l_1 where l_1 is a normal number
        none = np.int32(2**30)
        least, most, nonzero = none, np.int32(-1), none
        bad = np.int32(0)  # 1 where a t is inf or NaN: its exponent field is all ones
        for b0 in range(0, n, BLOCK):
            m = min(BLOCK, n - b0)
            xb, cb = x[b0:b0 + m], codes[b0:b0 + m]
            kernel_parts.block_start(xb, divisor, key, first + b0, stochastic, nb[:m], t, halves)
            kernel_parts.pack_signs(nb, m, signs, b0 // 8)
            redo = np.int32(0)  # (a max of int32 flags: other forms of this count kept the loop scalar)
            lmin, lmax, lnz = none, np.int32(-1), none
            for j in range(m):
                tj = t[j]
                field = fields[j]
                f = np.int32(field >> np.uint32(23))
                bad = max(bad, np.int32(f == np.int32(255)))  # (free here; v - v != 0 in the loop above cost 1 ms)
                k = np.int32(f - np.int32(127) - c32)  # t's level below, where it is a power of two in range
                # between two powers of two: (t - lo) / gap 2^24 is twice the mantissa field
                twice = np.int32((field & np.uint32(0x7FFFFF)) << np.uint32(1))
                drawn = np.int32(halves[j] & np.uint32(0xFFFFFF))
                up_between = (drawn < twice) if stochastic else (twice > np.int32(0x800000))
                # below l_1 (zeros): lo = 0, hi = l_1
                up_below = ((np.float32(drawn) < np.float32(np.float32(tj * inverse_first) * scale)) if stochastic
                            else (tj > np.float32(first_level - tj)))
                top_code = np.int32(last + np.int32(tj >= top_level))  # at or above l_top: up (NaN stays)
                normal = f != np.int32(0)
                code = (np.int32(k + np.int32(up_between)) if normal & (k >= np.int32(1)) & (k <= last)
                        else top_code if normal & (k > last) else np.int32(up_below))
                cb[j] = code
                redo = max(redo, np.int32((f == 0) & (field != np.uint32(0))))
                lmin, lmax = min(lmin, code), max(lmax, code)
                lnz = min(lnz, code if code != 0 else none)
            if fixups and redo > 0:
                lmin, lmax, lnz = kernel_parts.redo_subnormal(t[:m], halves, cb, starts[0], levels, top, stochastic)
            least, most, nonzero = min(least, lmin), max(most, lmax), min(nonzero, lnz)
        return (np.int64(least) if most >= 0 else BIG), np.int64(most), (np.int64(nonzero) if nonzero != none else BIG), bad

    @jit(error_model="numpy")
    def quantize64(x, first, divisor, uniform_s, starts, crowded, scan, levels, top, key, stochastic, neg, codes):
        """float64, one coordinate at a time; a 53-bit draw per coordinate."""
        scale = 9007199254740992.0  # 2^53
        s = np.float64(uniform_s)
        least, most, nonzero = BIG, np.int64(-1), BIG
        bad = np.int32(0)  # 1 where an x_i is NaN or inf (v - v is 0 only for a finite v)
        for i in range(x.size):
            v = x[i]
            neg[i] = v < 0
            bad = max(bad, np.int32(v - v != 0))
            t = np.float64(abs(v) / divisor)
            if uniform_s > 0:
                k = np.int64(t * s)
            else:
                field = (t.view(np.int64) >> 52) & 0x7FF
                k = np.int64(starts[field])
                k += np.int64(levels[k + 1] <= t)
                if (scan == 1 and field == 0) or (scan == 2 and crowded[field]):
                    while k < top - 1 and levels[k + 1] <= t:
                        k += 1
            k = min(max(k, 0), top - 1)
            lo = levels[k]
            hi = levels[k + 1]
            if stochastic:
                z = kernel_parts.splitmix(key + u64(first + i + 1) * golden)
                gap = hi - lo
                up = np.int64(np.float64(np.int64(z >> u64(11))) < (t - lo) / gap * scale) | np.int64(gap <= 0)
            else:
                up = np.int64((t - lo) > (hi - t))
            c = k + up
            codes[i] = c
            least, most = min(least, c), max(most, c)
            nonzero = min(nonzero, c if c != 0 else BIG)
        return least, most, nonzero, bad

    @jit()
    def magnitude_bits(bits, mask):
        """The largest of bits_i & mask: with x's bits and a mask that clears the sign bit, the bits of
        max |x_i| (magnitudes order as their bits), or of a NaN where some x_i is one (a NaN's bits
        exceed inf's). Integer maxima: one vector pass, and no rule for NaN to follow."""
        most = mask ^ mask
        for i in range(bits.size):
            most = max(most, bits[i] & mask)
        return most

    @jit()
    def code_range(codes):
        """(smallest code, largest code, smallest nonzero code), ``BIG`` where there is none."""
        least, most, nonzero = BIG, np.int64(-1), BIG
        for i in range(codes.size):
            c = np.int64(codes[i])
            least, most = min(least, c), max(most, c)
            nonzero = min(nonzero, c if c != 0 else BIG)
        return least, most, nonzero

    @jit()
    def pack_small(codes, minus, clamp, width, out):
        """Fields codes - minus (clamped at 0 when ``clamp``) of ``width`` <= 8 bits, least significant
        bit first: 8 fields make one 8 * width-bit word, written as ``width`` bytes (the last group
        zero-padded and cut to the bytes that exist). The whole groups come first, with a constant
        count of fields that the compiler unrolls (a third faster than one loop for all groups), and
        each stores all 8 bytes of its word wherever they fit in ``out`` (a constant count again:
        1.4-1.9x faster than storing ``width`` bytes in a loop; the bytes beyond ``width`` are zeros
        that the next group overwrites, and they never leave ``out``, so pieces in other threads
        are not touched). Each group's word comes from ``kernel_parts.group_word``, inlined."""
        n = codes.size
        whole = n // 8
        stores = min(whole, max(0, (out.size - 8) // width + 1))  # groups g with g * width + 8 <= out.size
        for g in range(stores):
            word = kernel_parts.group_word(codes[8 * g:8 * g + 8], minus, clamp, width)
            where = out[g * width:g * width + 8]
            for b in range(8):
                where[b] = np.uint8((word >> u64(8 * b)) & u64(0xFF))
        for g in range(stores, whole):
            word = kernel_parts.group_word(codes[8 * g:8 * g + 8], minus, clamp, width)
            for b in range(width):
                out[g * width + b] = np.uint8((word >> u64(8 * b)) & u64(0xFF))
        if whole < (n + 7) // 8:
            word = kernel_parts.group_word(codes[8 * whole:], minus, clamp, width)
            for b in range(out.size - whole * width):
                out[whole * width + b] = np.uint8((word >> u64(8 * b)) & u64(0xFF))

    # A 64-bit word of 8 uint8 or 4 uint16 lanes: each lane's 1, each lane's bits below its top bit,
    # and each lane's top bit (the masks of ``pack_words`` and ``unpack_words``).
    LANES8 = (u64(0x0101010101010101), u64(0x7F7F7F7F7F7F7F7F), u64(0x8080808080808080))
    LANES16 = (u64(0x0001000100010001), u64(0x7FFF7FFF7FFF7FFF), u64(0x8000800080008000))

    @jit()
    def pack_words(words, lane_bits, minus, clamp, width, out):
        """``pack_small`` for codes read as 64-bit words of 8 uint8 or 4 uint16 lanes (``lane_bits``):
        each word's fields are made at once (SWAR), the offset subtracted from every lane (no lane
        borrows: a code is >= ``minus``, or, with ``clamp``, 0, which a mask of the nonzero lanes
        keeps at 0), then moved together in two or three shift-and-mask steps (8 fields of ``width``
        bits become the word's low 8 * width bits), and appended to a 64-bit accumulator that is
        stored into ``out`` (uint64) whenever it is full. ``words`` holds a multiple of 64 fields,
        so ``out`` ends on a whole word. One thread at d = 1e7, uint8 codes: 3.5-4.7 ms against
        7-10 ms for ``pack_small``, which stores each group's bytes one by one."""
        w = u64(width)
        byte_lanes = lane_bits == 8
        ones, low, top = LANES8 if byte_lanes else LANES16
        lane = u64(lane_bits)
        sub = u64(minus) * ones
        step = (u64(64) // lane) * w  # the bits of one word's fields
        acc, bits, k = u64(0), u64(0), 0
        for g in range(words.size):
            x = words[g]
            if clamp:  # only the nonzero lanes, which hold codes > minus
                nonzero = ((x | ((x & low) + low)) & top) >> (lane - u64(1))
                x = x - (sub & (nonzero * ((u64(1) << lane) - u64(1))))
            else:
                x = x - sub
            if byte_lanes:
                x = (x & u64(0x00FF00FF00FF00FF)) | ((x & u64(0xFF00FF00FF00FF00)) >> (u64(8) - w))
                x = (x & u64(0x0000FFFF0000FFFF)) | ((x & u64(0xFFFF0000FFFF0000)) >> (u64(16) - u64(2) * w))
                x = (x & u64(0xFFFFFFFF)) | ((x >> u64(32)) << (u64(4) * w))
            else:
                x = (x & u64(0x0000FFFF0000FFFF)) | ((x & u64(0xFFFF0000FFFF0000)) >> (u64(16) - w))
                x = (x & u64(0xFFFFFFFF)) | ((x >> u64(32)) << (u64(2) * w))
            acc |= x << bits
            bits += step
            if bits >= u64(64):
                out[k] = acc
                k += 1
                bits -= u64(64)
                acc = (x >> (step - bits)) if bits != u64(0) else u64(0)

    @jit()
    def pack_vectors(codes, minus, clamp, width, index, out):
        """``pack_words`` for 64 fields at a time in vector registers (``kernel_parts.pack64``, AVX-512
        VBMI): codes.size a multiple of 64, ``out`` its 8 ``width`` bytes a group. Natural compression's
        5-bit fields of int16 codes at d = 1e7: 6.1 -> 1.4 ms on one thread, 4.1 -> 1.2 on two."""
        for g in range(codes.size // 64):
            kernel_parts.pack64(codes, 64 * g, minus, clamp, width, index, out, 8 * width * g)

    @jit()
    def unpack_small(data, n, width, offset, escape, codes):
        """Inverse of ``pack_small`` with the offset added back (``escape``: field 0 is code 0 and
        field f > 0 is code f + offset - 1). Returns the largest code. A group's word is one load
        of 8 bytes (the bits beyond its ``width`` bytes are never read into a field) wherever that
        stays inside ``data``: a constant count of bytes, which the compiler unrolls (2-3x faster
        than assembling ``width`` bytes in a loop); the last groups assemble their bytes one by one."""
        mask = u64((1 << width) - 1)
        largest = np.int64(0)
        loads = min(n // 8, max(0, (data.size - 8) // width + 1))  # groups g with g * width + 8 <= data.size
        for g in range(loads):
            w = data[g * width:g * width + 8]
            word = (u64(w[0]) | (u64(w[1]) << u64(8)) | (u64(w[2]) << u64(16)) | (u64(w[3]) << u64(24))
                    | (u64(w[4]) << u64(32)) | (u64(w[5]) << u64(40)) | (u64(w[6]) << u64(48)) | (u64(w[7]) << u64(56)))
            group = codes[8 * g:8 * g + 8]
            for j in range(8):
                f = np.int64((word >> u64(j * width)) & mask)
                c = (f + offset - 1 if f != 0 else np.int64(0)) if escape else f + offset
                largest = max(largest, c)
                group[j] = c
        for g in range(loads, (n + 7) // 8):
            full = 8 * g + 8 <= n
            word = u64(0)
            for b in range(width if full else data.size - g * width):
                word |= u64(data[g * width + b]) << u64(8 * b)
            for j in range(8 if full else n - 8 * g):
                f = np.int64((word >> u64(j * width)) & mask)
                c = (f + offset - 1 if f != 0 else np.int64(0)) if escape else f + offset
                largest = max(largest, c)
                codes[8 * g + j] = c
        return largest

    @jit()
    def unpack_words(data, lane_bits, width, offset, escape, out):
        """Inverse of ``pack_words``: ``out`` (uint64) takes the codes as words of 8 uint8 or 4 uint16
        lanes. Word g's fields are the stream's bits [g * step, g * step + step) (one or two loads,
        no state carried from word to word), spread back to one field per lane in two or three
        shift-and-mask steps, and the offset is added to every lane (``escape``: to the nonzero
        lanes only, with offset - 1). ``data`` (uint64) holds whole 64-field groups."""
        w = u64(width)
        byte_lanes = lane_bits == 8
        ones, low, top = LANES8 if byte_lanes else LANES16
        lane = u64(lane_bits)
        add = u64(offset - 1 if escape else offset) * ones
        step = (u64(64) // lane) * w
        keep = (u64(1) << step) - u64(1) if step < u64(64) else ~u64(0)
        field = (u64(1) << w) - u64(1)
        for g in range(out.size):
            at = u64(g) * step
            q, r = at >> u64(6), at & u64(63)
            v = data[q] >> r
            if r + step > u64(64):
                v |= data[q + u64(1)] << (u64(64) - r)
            v &= keep
            if byte_lanes:
                half = (u64(1) << (u64(4) * w)) - u64(1)
                v = (v & half) | ((v << (u64(32) - u64(4) * w)) & (half << u64(32)))
                pair = ((u64(1) << (u64(2) * w)) - u64(1)) * u64(0x0000000100000001)
                v = (v & pair) | ((v << (u64(16) - u64(2) * w)) & (pair << u64(16)))
                one = field * u64(0x0001000100010001)
                v = (v & one) | ((v << (u64(8) - w)) & (one << u64(8)))
            else:
                half = (u64(1) << (u64(2) * w)) - u64(1)
                v = (v & half) | ((v << (u64(32) - u64(2) * w)) & (half << u64(32)))
                one = field * u64(0x0000000100000001)
                v = (v & one) | ((v << (u64(16) - w)) & (one << u64(16)))
            if escape:
                nonzero = ((v | ((v & low) + low)) & top) >> (lane - u64(1))
                v = v + (add & (nonzero * ((u64(1) << lane) - u64(1))))
            else:
                v = v + add
            out[g] = v

    @jit()
    def unpack_vectors(data, width, offset, escape, index, codes):
        """``unpack_words`` for 64 fields at a time in vector registers (``kernel_parts.unpack64``, AVX-512
        VBMI): codes.size a multiple of 64, ``data`` its 8 ``width`` bytes a group. Returns the
        largest code (no pass of NumPy's maximum). Natural compression's 5-bit fields into int16
        codes at d = 1e7, two threads: 5.4 -> 1.3 ms."""
        largest = np.int64(0)
        for g in range(codes.size // 64):
            largest = max(largest, kernel_parts.unpack64(data, 8 * width * g, width, offset, escape, index, codes, 64 * g))
        return largest

    @jit()
    def dequantize(codes, signs, signed, out):
        """out_i = signed[code_i + L negative_i] with ``signed`` = [levels, -levels] (L levels); x < 0
        from the bitmap ``signs`` (the wire's sign frame; ``codes`` starts at one of its bytes), a
        block at a time into flags in the cache (``kernel_parts.signed_levels``)."""
        kernel_parts.signed_levels(codes, signs, signed, signed.size // 2, np.zeros(BLOCK, np.bool_), out)

    @jit()
    def dequantize_stacked(codes, signs, signed, out):
        """``dequantize`` for a table of at most ``STACKED_TABLE`` entries, read from a copy on the
        kernel's stack, where the stores into ``out`` cannot reach it: the loop then runs on vector
        gathers (``kernel_parts.stack_like``). Base-3 rounding's codes at d = 1e7: 23.0 -> 11.2 ms
        on one thread, 12.6 -> 7.1 on two."""
        table = kernel_parts.stack_like(2048, signed)
        for i in range(signed.size):
            table[i] = signed[i]
        kernel_parts.signed_levels(codes, signs, table, signed.size // 2, np.zeros(BLOCK, np.bool_), out)

    # The decoders of the two kinds of float32 table that the quantize kernels compute: the level of
    # code k is k / s (k * (1 / s) for s a power of two) or 2^(k + c) from its exponent field (the few
    # subnormal ones from the table), times the norm, negated where the flag is set: the same products
    # as the scaled table's, in loops the compiler vectorizes (the table read of ``dequantize`` kept it
    # scalar). One thread at d = 1e7: QSGD s = 16 3.2 ms and natural compression 4.6-6.5 ms, against
    # 7.4 ms through the table. The flags come from the sign frame a block at a time.

    @jit(error_model="numpy")
    def dequantize_uniform32(codes, signs, uniform_s, power_of_two, norm, out):
        s = np.float32(uniform_s)
        step = np.float32(1.0) / s
        nb = np.zeros(BLOCK, np.bool_)  # x < 0, a block at a time
        n = codes.size
        for b0 in range(0, n, BLOCK):
            m = min(BLOCK, n - b0)
            kernel_parts.unpack_signs(signs, b0 // 8, m, nb)
            cb, ob = codes[b0:b0 + m], out[b0:b0 + m]
            if power_of_two:
                for j in range(m):
                    v = np.float32(np.float32(np.float32(cb[j]) * step) * norm)
                    ob[j] = -v if nb[j] else v
            else:
                for j in range(m):
                    v = np.float32(np.float32(np.float32(cb[j]) / s) * norm)
                    ob[j] = -v if nb[j] else v

    @jit(error_model="numpy")
    def dequantize_powers32(codes, signs, c, norm, levels, out):
        bits = np.empty(BLOCK, np.uint32)
        level = bits.view(np.float32)
        nb = np.zeros(BLOCK, np.bool_)  # x < 0, a block at a time
        c32 = np.int32(c)
        n = codes.size
        for b0 in range(0, n, BLOCK):
            m = min(BLOCK, n - b0)
            kernel_parts.fetch_ahead(codes, b0 + BLOCK, b0 + 2 * BLOCK)  # (three loops a block: the next block's codes meanwhile)
            kernel_parts.unpack_signs(signs, b0 // 8, m, nb)
            cb, ob = codes[b0:b0 + m], out[b0:b0 + m]
            subnormal = np.int32(0)  # (a max of int32 flags keeps the loop vectorized)
            for j in range(m):
                k = np.int32(cb[j])
                e = np.int32(k + c32 + np.int32(127))  # the exponent field of 2^(k + c), if it is normal
                bits[j] = np.uint32(np.int32(max(e, np.int32(0))) << np.int32(23)) if k != 0 else np.uint32(0)
                subnormal = max(subnormal, np.int32((e <= np.int32(0)) & (k != np.int32(0))))
            if subnormal:  # levels below 2^-126 (natural compression of float32): read from the table
                for j in range(m):
                    k = np.int32(cb[j])
                    if k != 0 and k + c32 + np.int32(127) <= 0:
                        level[j] = levels[k]
            for j in range(m):
                v = np.float32(level[j] * norm)
                ob[j] = -v if nb[j] else v

    @jit(error_model="numpy")
    def block_sums(x, size, lanes, square, sums):
        """sums[b] = the float64 sum of x_i^2 (``square``) or |x_i| over block b of ``size`` coordinates,
        added in the order of torch's sum of a contiguous float64 vector (``cascade_sum`` in ATen's
        SumKernel.cpp): rows of 4 vectors of ``lanes`` add into 4 x lanes partial sums, which move up
        a cascade of 4 levels every 2^power rows; then come the rows left over, the levels, the vectors
        left over, the 4 vectors of a row, the coordinates left over and the lanes, in this order. The
        same additions in the same order give the same bits. Each run of 2^power rows adds into level
        0 from +0 (the cascade empties it after every run), so the runs' sums are independent of the
        cascade: ``kernel_parts.step_sums`` computes all of a block's first, as vectors in registers,
        one run after another, and the cascade then takes them in order, its levels on the stack
        (the scalar loop kept its partial sums in memory). One thread, d = 1e7, blocks of 2^15,
        interleaved calls: float32 2.4 -> 1.8 ms in a quiet moment, 6.2 -> 4.9 on the loaded host;
        float64 9.0 -> 6.4. Torch's own sum adds a vector longer than about 2^16 in another order, so
        ``size`` stays at most 2^15 (``_sums_like_torch`` checks it)."""
        width = 4 * lanes  # 16 or 32: torch's lanes are 4 or 8 (``_lanes``)
        runs = np.empty((size // (16 * width) + 1, width))  # a block's run sums (2^power >= 16 rows a run)
        # levels 0-3 of the cascade, on the stack (no store into runs or sums can reach them, so
        # their loops run on vectors)
        level0 = kernel_parts.stack_like(32, runs)
        level1 = kernel_parts.stack_like(32, runs)
        level2 = kernel_parts.stack_like(32, runs)
        level3 = kernel_parts.stack_like(32, runs)
        for b in range(sums.size):
            start = b * size
            n = min(size, x.size - start)
            vectors = n // lanes
            rows = vectors // 4
            power = 0
            while (np.int64(1) << power) < rows:
                power += 1
            power = max(4, power // 4)
            step = np.int64(1) << power
            full = rows // step
            whole = x[start:start + full * step * width]
            if width == 16:
                kernel_parts.step_sums(16, whole, full, step, square, runs)
            elif width == 32:
                kernel_parts.step_sums(32, whole, full, step, square, runs)
            else:
                raise ValueError("block_sums: lanes must be 4 or 8")
            for k in range(width):
                level0[k] = 0.0
                level1[k] = 0.0
                level2[k] = 0.0
                level3[k] = 0.0
            for run in range(full):  # each run's sum moves up the cascade, as far as i's low bits say
                i = (run + 1) * step
                for k in range(width):
                    level1[k] += runs[run, k]
                if i & ((step - 1) << power) == 0:
                    for k in range(width):
                        level2[k] += level1[k]
                        level1[k] = 0.0
                    if i & ((step - 1) << (2 * power)) == 0:
                        for k in range(width):
                            level3[k] += level2[k]
                            level2[k] = 0.0
            for r in range(full * step, rows):  # the rows left over, into level 0 from +0
                for k in range(width):
                    v = np.float64(x[start + r * width + k])
                    level0[k] += v * v if square else abs(v)
            for k in range(width):
                level0[k] += level1[k]
                level0[k] += level2[k]
                level0[k] += level3[k]
            for e in range(rows * width, vectors * lanes):
                v = np.float64(x[start + e])
                level0[e % lanes] += v * v if square else abs(v)
            for r in range(1, 4):
                for k in range(lanes):
                    level0[k] += level0[r * lanes + k]
            total = 0.0
            for e in range(vectors * lanes, n):
                v = np.float64(x[start + e])
                total += v * v if square else abs(v)
            for k in range(lanes):
                total += level0[k]
            sums[b] = total

    @jit()
    def at_least(x, minus, level, largest, first, vector, out, values):
        """Writes first + i for each |x_i| >= level (ascending) into ``out``, and x_i into ``values``,
        while they have room; returns how many there are (more than out.size: call again with larger
        arrays). A NaN is never a candidate. Also returns whether some |x_i| is not <= ``largest``
        (the dtype's largest finite value): a NaN or inf, at no extra cost. With ``minus`` (an array,
        with ``vector`` only; else None), all of this is of x - minus, formed in registers (the bits
        of torch's x - minus), never in memory.
        With ``vector`` (AVX-512), 16 coordinates at a time: two vector comparisons give the lanes'
        masks (``kernel_parts.at_least_lanes``), a block's groups with a candidate are listed without
        a branch, then each has its positions and values moved to the front of registers and stored
        (``compress_found``): a branch on each group's mask, taken by about 15% of them with 1% kept,
        was mispredicted often enough to cost 0.7 ms of 2.2. Otherwise a block's
        flags are computed in a loop the compiler vectorizes, then read 8 at a time as a 64-bit word,
        and only a word with a flag is looked into, without a branch on each flag (one thread at
        d = 1e7 with 1.2% of the coordinates kept: 3.0 ms, against 8.3 ms for a loop with a branch on
        each |x_i|; with 32% kept, 7 ms against 23). The vector loop on AMD Zen 4, one thread, d = 1e7:
        1% kept 2.9-3.3 -> 1.5 ms, 32% kept 10.7 -> 4.5 ms."""
        count = 0
        room = out.size
        bad = np.int32(0)  # (a max of int32 flags: other forms cost a pass)
        head = 0
        if vector:
            head = x.size - x.size % 16
            groups = np.empty(BLOCK // 16, np.int64)
            masks = np.empty(BLOCK // 16, np.uint64)
            for b0 in range(0, head, BLOCK):
                n = 0
                for g in range(b0, min(head, b0 + BLOCK), 16):  # the groups with a candidate, listed without a branch
                    lanes = kernel_parts.at_least_lanes(x, minus, g, level, largest)
                    bad = max(bad, np.int32(lanes >> 16 != 0))
                    groups[n] = g
                    masks[n] = u64(lanes) & u64(0xFFFF)
                    n += np.int64(masks[n] != u64(0))
                for i in range(n):
                    k = kernel_parts.popcount(masks[i])
                    if count + k <= room:
                        kernel_parts.compress_found(x, minus, groups[i], masks[i], first, out, values, count)
                    count += k
            if minus is not None:  # the last coordinates of a difference, one by one
                for i in range(head, x.size):
                    v = x[i] - minus[i]
                    a = abs(v)
                    bad = max(bad, np.int32(not (a <= largest)))
                    if a >= level:
                        if count < room:
                            out[count] = first + i
                            values[count] = v
                        count += 1
                head = x.size
        flags = np.zeros(BLOCK, np.uint8)
        words = flags.view(np.uint64)
        for b0 in range(head, x.size, BLOCK):
            m = min(BLOCK, x.size - b0)
            xb = x[b0:b0 + m]
            for j in range(m):
                a = abs(xb[j])
                flags[j] = a >= level
                bad = max(bad, np.int32(not (a <= largest)))
            for j in range(m, BLOCK):  # (the last block's tail)
                flags[j] = 0
            for w in range((m + 7) // 8):
                word = words[w]
                if word != 0:
                    at = first + b0 + 8 * w
                    if count + 8 <= room and 8 * w + 8 <= m:
                        # all 8 positions and values written, the count moved by each flag: no branch
                        for b in range(8):
                            out[count] = at + b
                            values[count] = xb[8 * w + b]
                            count += np.int64((word >> u64(8 * b)) & u64(1))
                    else:
                        for b in range(8):
                            if (word >> u64(8 * b)) & u64(1):
                                if count < room:
                                    out[count] = at + b
                                    values[count] = xb[8 * w + b]
                                count += 1
        return count, bad

    @jit()
    def below_zero(x, out):
        """out_i = x_i < 0 (False for NaN and for -0.0, as torch.lt)."""
        for i in range(x.size):
            out[i] = x[i] < 0

    @jit()
    def signs(negative, scale, out):
        """out_i = -scale where negative_i, else scale (negation flips the sign bit only: exact)."""
        minus = -scale
        for i in range(out.size):
            out[i] = minus if negative[i] else scale

    @jit()
    def add_signs(h, negative, scale, out):
        """out_i = h_i + (-scale where negative_i, else scale): the one addition of h + to_dense().
        ``out`` must not be ``h`` (the loop is then not vectorized: 20x slower); see ``add_signs_to``."""
        minus = -scale
        for i in range(out.size):
            out[i] = h[i] + (minus if negative[i] else scale)

    @jit()
    def add_signs_to(h, negative, scale):
        """``add_signs`` in place: h_i += -scale where negative_i, else scale."""
        minus = -scale
        for i in range(h.size):
            h[i] += minus if negative[i] else scale

    @jit(error_model="numpy")
    def amsgrad_moments(m, v, v_hat, g, b1, c1, b2, c2, nu, m_out, v_out, v_hat_out, root_out):
        """AMSGrad's lines 13-15 and v_hat + nu in one pass, each operation as torch does it on the
        whole vectors (``amsgrad_state.amsgrad_step``), in the same order, in the arrays' precision with
        the scalars rounded to it first; without fast-math, so no product is fused into an addition
        and the results are the same bits. torch.maximum's NaN: either operand NaN gives NaN."""
        for i in range(m.size):
            gi = g[i]
            mi = b1 * m[i] + c1 * gi
            vi = b2 * v[i] + c2 * gi * gi
            hi = v_hat[i]
            hi = vi if vi > hi or vi != vi else hi
            m_out[i], v_out[i], v_hat_out[i], root_out[i] = mi, vi, hi, hi + nu

    @jit(error_model="numpy")  # IEEE division (no zero check), so the loop runs as vector instructions
    def amsgrad_apply(x, m, root, lr, x_out):
        """Line 16 once the square root is taken: x - lr m / root, as torch's ops do it. Returns
        whether a result is inf or NaN (``known_finite``)."""
        bad = False
        for i in range(x.size):
            out = x[i] - lr * m[i] / root[i]
            x_out[i] = out
            bad |= (out - out) != 0
        return bad

    @jit(error_model="numpy")
    def descend(x, g, lr, out):
        """out_i = x_i - lr g_i: torch's x - lr * g (the product rounded first: no fused multiply-add).
        Returns whether an out_i is inf or NaN (``known_finite``): o - o is 0 for every finite o, NaN
        for the others; a flag kept in the loop costs 0.3-0.9 ms at d = 1e7 on one thread, where a
        check of its own afterwards took 4 ms."""
        bad = False
        for i in range(x.size):
            o = x[i] - lr * g[i]
            out[i] = o
            bad |= (o - o) != 0
        return bad

    @jit(error_model="numpy")
    def blend(y, a, x, b, out):
        """out_i = a y_i + b x_i: torch's a * y + b * x (each product rounded, then the sum; no fused
        multiply-add). Returns whether an out_i is inf or NaN (``known_finite``)."""
        bad = False
        for i in range(y.size):
            o = a * y[i] + b * x[i]
            out[i] = o
            bad |= (o - o) != 0
        return bad

    @jit(error_model="numpy")
    def signs_mean_added(h, negatives, scales, zero, n, cut, out):
        """out_i = h_i + ((v_0i + v_1i + ...) + 0) / n with v_ki = -scale_k where negatives_k[i], else
        scale_k: the running mean of scaled-sign payloads (``base.mean_of``: the first one's dense
        form, the others added one after the other, +0, one division) added to h, each operation
        rounded as torch rounds it, in one pass; from i = ``cut`` on, the v_ki summed in ATen's order
        of its last columns (as ``mean_descend``)."""
        first, second = negatives[0], negatives[1]
        s0, s1 = scales[0], scales[1]
        head = min(max(cut, 0), h.size)
        for i in range(head):
            total = (-s0 if first[i] else s0) + (-s1 if second[i] else s1)
            for k in range(2, len(negatives)):
                total += -scales[k] if negatives[k][i] else scales[k]
            out[i] = h[i] + (total + zero) / n
        full = len(negatives) // 4 * 4
        for i in range(head, h.size):
            p0, p1, p2, p3 = zero, zero, zero, zero
            for k in range(0, full, 4):
                p0 += -scales[k] if negatives[k][i] else scales[k]
                p1 += -scales[k + 1] if negatives[k + 1][i] else scales[k + 1]
                p2 += -scales[k + 2] if negatives[k + 2][i] else scales[k + 2]
                p3 += -scales[k + 3] if negatives[k + 3][i] else scales[k + 3]
            for k in range(full, len(negatives)):
                p0 += -scales[k] if negatives[k][i] else scales[k]
            out[i] = h[i] + ((((p0 + p1) + p2) + p3) + zero) / n

    @jit(error_model="numpy")
    def sparse_added(h, supports, values, offset, zero, n, mean, descend, rate, out):
        """With ``mean``: out_i = h_i + (t_i + 0) / n, t_i the sum of the sparse payloads' values at
        index offset + i (each support ascending, in [offset, offset + len(h))), added in the
        payloads' order, and +0 where no support holds the index (then out_i = h_i + 0, as h + the
        mean's +0). ``base.mean_of``'s running sum adds +0 to t where a payload holds nothing; that
        only turns a -0 into +0, which the last + 0 does anyway, so the result has its bits.
        Without: out_i = h_i + v_i on one payload's support, h_i + 0 elsewhere: h + its dense form;
        ``out`` may be h. A block at a time, while it is in the cache: the sums go into a buffer,
        then one pass writes the block (a merge of two Top-1% supports index by index, at d = 1e7,
        took 8 ms against 3 for the pass). With ``mean`` and ``descend``: out_i = h_i - rate ((t_i + 0) / n),
        torch's x - lr * mean (``descend_by_mean``), and the return says whether an out_i is inf or NaN."""
        bad = False
        t = np.empty(BLOCK, h.dtype)
        at = np.zeros(len(supports), np.int64)
        for b0 in range(0, h.size, BLOCK):
            m = min(BLOCK, h.size - b0)
            end = offset + b0 + m
            hb, ob = h[b0:b0 + m], out[b0:b0 + m]
            if mean:
                t[:m] = zero
                for k in range(len(supports)):
                    index, kept, a = supports[k], values[k], at[k]
                    while a < index.size and index[a] < end:
                        i = index[a] - offset - b0
                        t[i] = kept[a] if k == 0 else t[i] + kept[a]
                        a += 1
                    at[k] = a
                if descend:
                    for i in range(m):
                        o = hb[i] - rate * ((t[i] + zero) / n)
                        ob[i] = o
                        bad |= (o - o) != 0
                else:
                    for i in range(m):
                        ob[i] = hb[i] + (t[i] + zero) / n
            else:  # h_i + v_i of the block's entries first (``out`` may be h), then h + 0, then the entries
                index, kept, first = supports[0], values[0], at[0]
                a = first
                while a < index.size and index[a] < end:
                    t[a - first] = hb[index[a] - offset - b0] + kept[a]
                    a += 1
                at[0] = a
                for i in range(m):
                    ob[i] = hb[i] + zero
                for q in range(first, a):
                    ob[index[q] - offset - b0] = t[q - first]
        return bad

    @jit(error_model="numpy")
    def add_on_support(h, support, values, ahead):
        """h[s_j] = h[s_j] + v_j in place for a strictly increasing ``support`` in [0, len(h)) (the
        caller checks it): torch's index_select, add_ and index_copy_, in one loop. A support of a
        sparse payload is spread over h, so each entry is a cache miss, and the loop has nothing else
        to do meanwhile: it asks for the line of entry j + ``ahead`` before it adds entry j. Returns
        whether a sum is -0 (``without_negative_zero``)."""
        negative_zero = False
        k = support.size
        for j in range(k):
            if j + ahead < k:
                kernel_parts.prefetch(h, support[j + ahead])
            i = support[j]
            total = values[j] + h[i]  # (in this order, the NaN that torch's add_ keeps where both are NaN)
            h[i] = total
            negative_zero |= (total == 0) & np.signbit(total)
        return negative_zero

    @jit(error_model="numpy")
    def marked_mean_added(h, words, values, at, zero, n, lowest_bit, out):
        """``sparse_added``'s mean where each payload's support is a bitmap: out_i = h_i + (t_i + 0) / n,
        t_i the payloads' values at coordinate i added in the payloads' order (the first one's value
        itself), +0 where no bitmap holds i. ``h`` and ``out`` (which may be h) are the piece of
        coordinates that ``words[k]`` (each the piece's words of payload k's bitmap) cover, and
        ``at[k]`` is the index in values[k] of the piece's first set bit. A block at a time, while it
        is in the cache: the sums go into a buffer, each bitmap's set bits read lowest first, then
        one pass writes the block. Returns 1 if some out_i is -0 (only a sum on a support can be:
        h_i + 0 is not), else 0."""
        t = np.empty(BLOCK, h.dtype)
        c = at.copy()
        negative_zero = np.int32(0)
        for b0 in range(0, h.size, BLOCK):
            m = min(BLOCK, h.size - b0)
            hb, ob = h[b0:b0 + m], out[b0:b0 + m]
            t[:m] = zero
            for k in range(len(words)):
                bits, kept, a = words[k], values[k], c[k]
                for w in range(b0 >> 6, (b0 + m + 63) >> 6):
                    word = bits[w]
                    while word != u64(0):
                        low = word & (~word + u64(1))
                        i = (np.int64(w) << 6) + lowest_bit[(low * u64(DE_BRUIJN)) >> u64(58)] - b0
                        t[i] = kept[a] if k == 0 else t[i] + kept[a]
                        a += 1
                        word ^= low
                c[k] = a
            for i in range(m):
                v = hb[i] + (t[i] + zero) / n
                ob[i] = v
                negative_zero = max(negative_zero, np.int32(v == zero and math.copysign(1.0, v) < 0.0))
        return negative_zero

    @jit(error_model="numpy")
    def mean_added_on_union(h, supports, values, offset, zero, n):
        """h_i += (t_i + 0) / n in place at each index offset + i that a support holds (t_i: the
        payloads' values there, added in the payloads' order, as ``sparse_added``'s mean), and
        nothing elsewhere: h + the mean of the sparse payloads where h holds no negative zero, since
        h_i + (0 + 0) / n is h_i then. O(n k) instead of a pass over h: a merge of the ascending
        supports into the union's indices and sums, read in order; then the additions into h, one
        independent read and write each, which the processor overlaps (done in the merge, whose
        branches made each wait for the last, they took twice as long)."""
        total = 0
        for k in range(len(supports)):
            total += supports[k].size
        union = np.empty(total, np.int64)
        sums = np.empty(total, h.dtype)
        at = np.zeros(len(supports), np.int64)
        none = np.int64(2**62)
        count = 0
        while True:
            i = none
            for k in range(len(supports)):
                if at[k] < supports[k].size:
                    i = min(i, supports[k][at[k]])
            if i == none:
                break
            t = zero
            for k in range(len(supports)):
                a = at[k]
                if a < supports[k].size and supports[k][a] == i:
                    t = values[k][a] if k == 0 else t + values[k][a]
                    at[k] = a + 1
            union[count] = i - offset
            sums[count] = t
            count += 1
        for u in range(count):
            j = union[u]
            h[j] = h[j] + (sums[u] + zero) / n

    @jit(error_model="numpy")
    def mean_descend(x, rows, zero, n, lr, cut, out):
        """out_i = x_i - lr ((rows_0i + rows_1i + ...) + 0) / n: the running mean of ``base.mean_of``
        (rows added one after the other, +0 so that a sum of -0s is +0, then one division) and the
        step x - lr * mean, each operation rounded as torch rounds it, in one pass. From i = ``cut``
        on the rows are summed as ATen sums the last columns of 5 or more rows
        (``row_order.interleaved_sum``: four partial sums from 0, rows k, k + 4, ... in sum k, the
        rows past the last multiple of 4 in sum 0, then sums 1, 2, 3 into sum 0). Returns whether an
        out_i is inf or NaN, as ``descend``."""
        first, second = rows[0], rows[1]
        bad = False
        head = min(max(cut, 0), x.size)
        for i in range(head):
            total = first[i] + second[i]
            for k in range(2, len(rows)):
                total += rows[k][i]
            o = x[i] - lr * ((total + zero) / n)
            out[i] = o
            bad |= (o - o) != 0
        full = len(rows) // 4 * 4
        for i in range(head, x.size):
            s0, s1, s2, s3 = zero, zero, zero, zero
            for k in range(0, full, 4):
                s0 += rows[k][i]
                s1 += rows[k + 1][i]
                s2 += rows[k + 2][i]
                s3 += rows[k + 3][i]
            for k in range(full, len(rows)):
                s0 += rows[k][i]
            o = x[i] - lr * (((((s0 + s1) + s2) + s3) + zero) / n)
            out[i] = o
            bad |= (o - o) != 0
        return bad

    @jit()
    def feistel(start, low, a_size, t0, t1, t2, t3, dim, rotation, out):
        """out_j = pi(start + j), ``indices.keyed_permutation`` of consecutive positions, one position at
        a time (``kernel_parts.keyed_image``)."""
        for j in range(out.size):
            out[j] = kernel_parts.keyed_image(np.int64(start + j), low, a_size, t0, t1, t2, t3, dim, rotation)

    @jit()
    def mark_rest(starts, ends, lows, highs, dim, low, a_size, t0, t1, t2, t3, rotation, words):
        """Sets in words[k] (a bitmap of dim bits) the images of the positions of block k = [starts[k],
        ends[k]) that ``mark_rows_banded`` leaves out of its full rows [lows[k], highs[k]) (starts[k]
        <= lows[k] <= highs[k] <= ends[k], the blocks in increasing order): those of the partial rows
        at its two ends, and those of the full rows whose first pass through the network leaves
        [0, dim), found as the network's inverse of each value of [dim, A 2^low), whose image is
        the rest of that value's cycle walk."""
        for u in range(dim, np.int64(a_size) << low):
            p = kernel_parts.network_back(u, low, a_size, t0, t1, t2, t3)
            for k in range(starts.size):
                if lows[k] <= p < highs[k]:
                    v = kernel_parts.keyed_image(u, low, a_size, t0, t1, t2, t3, dim, rotation)
                    words[k, v >> 6] |= u64(1) << u64(v & 63)
        for k in range(starts.size):
            for a, b in ((starts[k], lows[k]), (highs[k], ends[k])):
                for p in range(a, b):
                    v = kernel_parts.keyed_image(p, low, a_size, t0, t1, t2, t3, dim, rotation)
                    words[k, v >> 6] |= u64(1) << u64(v & 63)

    @jit()
    def mark_rows_banded(band_a, band_b, first_rows, end_rows, low, a_size, t1, t2, t3, dim, out):
        """out[k, w] for every block k and the words w of the bands [band_a, band_b): bit j of out[k, w]
        is set where v = 64 w + j < dim and the Feistel network's last three rounds, undone on v
        (left = (left - T3[right]) mod A; right ^= T2[left]; left = (left - T1[right]) mod A), leave a
        left in the full rows [first_rows[k], end_rows[k]): the bitmap in the order of v, before the
        keyed rotation (``rotated_bits`` then moves it to the coordinates), of the images of those
        rows, except the positions whose image needed a cycle walk (see ``marked_rows``).

        Band b is the 64 columns (right halves) 64 b .. 64 b + 63 of every row: word b of each row of
        the A x 2^low bit matrix of v = left 2^low + right. No table is read at a computed index
        for each v, in three steps a band:
        - the band of the matrix M of (left after round 3 undone, right): M[l][r] = P[l][r ^ T2[l]],
          where P[l][r] tells whether (l - T1[r]) mod A is in the rows. For a row l, P's 64 bits of
          the columns (64 b) ^ (T2[l] with its low 6 bits cleared) come from 16 lanes of T1 at a
          time (``kernel_parts.rows_word``), and the low 6 bits of T2[l] permute them within the
          word (``xor_bits``);
        - undoing round 3 shifts each column r of M down by T3[r] mod A, cyclically: the band is
          transposed 64 rows at a time (``transpose64``), each column's A bits rotated, and
          transposed back;
        - the words are written, each row's at its place.
        One thread at d = 1e7, half the rows: 9.8 ms for the earlier pass (two table gathers a
        coordinate) -> 2.6 ms."""
        per_row = (np.int64(1) << low) >> 6  # words of a row: bands
        blocks = (a_size + 63) >> 6  # 64-row blocks of a band
        pad = blocks << 6
        band = np.zeros(pad, dtype=np.uint64)  # one band of a matrix, a word a row
        columns = np.zeros(64 * blocks, dtype=np.uint64)  # column c's A bits at [blocks c, blocks (c + 1))
        words = out.shape[1]
        for k in range(first_rows.size):
            first, rows = first_rows[k], max(end_rows[k] - first_rows[k], 0)
            for b in range(band_a, band_b):
                for row in range(a_size):
                    c = np.int64(t2[row])
                    p = kernel_parts.rows_word(t1, (np.int64(b) ^ (c >> 6)) << 6, row, a_size, first, rows)
                    band[row] = kernel_parts.xor_bits(p, c & 63)
                for row in range(a_size, pad):
                    band[row] = u64(0)
                for q in range(blocks):
                    kernel_parts.transpose64(band, q << 6)
                    for i in range(64):
                        columns[i * blocks + q] = band[(q << 6) + i]
                for i in range(64):  # row l of column i after round 3 is undone: row (l - T3[i] - A) mod A of M
                    shift = np.int64(t3[(np.int64(b) << 6) + i]) + a_size
                    column = columns[i * blocks:(i + 1) * blocks]
                    for q in range(blocks):
                        start = (q << 6) - shift
                        if start < 0:
                            start += a_size
                        word = kernel_parts.bits_from(column, start)
                        if start + 64 > a_size:  # the column's bits from its start follow its bit A - 1
                            seam = u64(a_size - start)
                            word = (word & ((u64(1) << seam) - u64(1))) | (column[0] << seam)
                        band[(q << 6) + i] = word
                for q in range(blocks):
                    kernel_parts.transpose64(band, q << 6)
                    for r in range(64):
                        row = (q << 6) + r
                        w = row * per_row + b
                        if row < a_size and w < words:
                            word = band[row]
                            v = np.int64(w) << 6
                            if v + 64 > dim:
                                word &= (u64(1) << u64(max(dim - v, 0))) - u64(1)
                            out[k, w] = word

    @jit()
    def rotated_bits(source, dim, rotation, word_a, word_b, out):
        """out[w] for w in [word_a, word_b) of the bitmap whose bit u (< dim) is bit (u - rotation) mod
        dim of ``source`` (0 <= rotation < dim; bits from dim on are 0): the keyed rotation
        (v + rotation) mod dim applied to a bitmap in v's order. Three runs of words: those below
        u = rotation (bits from dim - rotation on), the word of the seam, those above (bits from 0
        on); the runs move whole words by fixed shifts (``shifted_words``: 0.9 -> 0.1 ms at d = 1e7 on
        one thread, where a test of each word's place kept the loop scalar)."""
        below = min(word_b, rotation >> 6)  # words wholly below the seam
        if word_a < below:
            kernel_parts.shifted_words(source, dim - rotation, word_a, below, out)
        above = max(word_a, -(-rotation // 64))  # words wholly above it
        if above < word_b:
            kernel_parts.shifted_words(source, -rotation, above, word_b, out)
        seam = rotation >> 6
        if rotation & 63 and word_a <= seam < word_b:
            u = np.int64(seam) << 6
            cut = u64(rotation - u)
            out[seam] = (kernel_parts.bits_from(source, u + dim - rotation) & ((u64(1) << cut) - u64(1))) | (kernel_parts.bits_from(source, 0) << cut)
        last = (dim - 1) >> 6  # bits from dim on are 0
        if word_a <= last < word_b and dim & 63:
            out[last] &= (u64(1) << u64(dim & 63)) - u64(1)

    @jit()
    def ascending(values, words, out, lowest_bit):
        """The distinct ``values`` (in [0, 64 words.size)) in increasing order: each sets its bit in the
        zeroed bitmap ``words``, then the set bits are read word by word, lowest first (the lowest set
        bit's position from a de Bruijn multiply and ``lowest_bit``, a table of 64: Numba's
        count-trailing-zeros intrinsic is not found in its disk cache). Returns how many bits were
        set (fewer than values.size where two values are equal). Perm-K's block of 1e6 positions at
        d = 1e7: 3.0 ms against 3.9 for NumPy's sort and the int64 copy."""
        for i in range(values.size):
            v = np.int64(values[i])
            words[v >> 6] |= u64(1) << u64(v & 63)
        count = 0
        for w in range(words.size):
            word = words[w]
            while word != u64(0):
                low = word & (~word + u64(1))
                if count < out.size:
                    out[count] = (np.int64(w) << 6) + lowest_bit[(low * u64(DE_BRUIJN)) >> u64(58)]
                count += 1
                word ^= low
        return count

    @jit()
    def mark(values, words):
        """Set bit v of the zeroed bitmap ``words`` for each v in ``values`` (in [0, 64 words.size)).
        Threads must not share ``words`` (they would race on a word): see ``marked``."""
        for i in range(values.size):
            v = np.int64(values[i])
            words[v >> 6] |= u64(1) << u64(v & 63)

    @jit()
    def count_marked(words):
        """The number of set bits (a SWAR population count of each word)."""
        c = np.int64(0)
        for w in range(words.size):
            b = words[w]
            b = b - ((b >> u64(1)) & u64(0x5555555555555555))
            b = (b & u64(0x3333333333333333)) + ((b >> u64(2)) & u64(0x3333333333333333))
            b = (b + (b >> u64(4))) & u64(0x0F0F0F0F0F0F0F0F)
            c += np.int64((b * u64(0x0101010101010101)) >> u64(56))
        return c

    @jit()
    def gather_marked(words, first, x, minus, scale, vector, lowest_bit, out):
        """out_c = x[p] * scale for the set bits p of ``words`` in increasing order, where bit j of
        words[w] stands for p = 64 (first + w) + j: x.index_select(0, support) * scale, with the
        product rounded in x's precision as torch rounds it. Returns 1 if, for a coordinate of x that
        the words cover (64 first .. 64 (first + words.size), within x), x_i * scale is NaN or inf
        (x_i is, or the product overflows), else 0: the gather reads nearly every cache line of x
        anyway, so each block of 4096 is checked (v - v is 0 only for a finite v; a max of int32
        flags keeps the loop vectorized) just before it is gathered; 0 thus also says that every
        value written is finite.
        With ``minus`` (an array; else None) all of this is of x - minus, formed as it is read (the
        bits of torch's x - minus), never written: a Markov message C(target - h).
        With ``vector`` (AVX-512), each whole word moves 16 coordinates at a time, in four vector
        compressions and masked stores (``kernel_parts.compress_scaled``), instead of one set bit at
        a time (d = 1e7, 2 threads, on an Intel host: half the bits set 11.3 -> 2.8 ms, a tenth
        5.0 -> 2.8 ms; on AMD Zen 4: half 8.3 -> 1.5 ms, a tenth 2.5 -> 2.5 ms)."""
        c = 0
        bad = np.int32(0)
        for w0 in range(0, words.size, 64):
            w1 = min(words.size, w0 + 64)
            lo = (np.int64(first) + w0) << 6
            hi = min(x.size, (np.int64(first) + w1) << 6)
            xb = x[lo:hi]  # (x[lo + i] was not vectorized)
            if minus is None:
                for i in range(xb.size):
                    v = xb[i] * scale
                    bad = max(bad, np.int32(v - v != 0))
            else:
                mb = minus[lo:hi]
                for i in range(xb.size):
                    v = (xb[i] - mb[i]) * scale
                    bad = max(bad, np.int32(v - v != 0))
            for w in range(w0, w1):
                word = words[w]
                base = np.int64(first + w) << 6
                if vector and base + 64 <= x.size:  # 16 coordinates at a time, through a vector compression
                    for q in range(4):
                        lanes = (word >> u64(16 * q)) & u64(0xFFFF)
                        kernel_parts.compress_scaled(x, minus, base + 16 * q, scale, lanes, out, c)
                        c += kernel_parts.popcount(lanes)
                    continue
                while word != u64(0):
                    low = word & (~word + u64(1))
                    p = base + lowest_bit[(low * u64(DE_BRUIJN)) >> u64(58)]
                    if minus is None:
                        out[c] = x[p] * scale
                    else:
                        out[c] = (x[p] - minus[p]) * scale
                    c += 1
                    word ^= low
        return bad

    @jit()
    def scatter_marked(words, values, h, use_h, vector, lowest_bit, out):
        """The dense form of ``values`` on the set bits of ``words`` (bit j of words[w] is out[64 w + j]),
        written over all of ``out``: 0 off the support and values_c on it, or with ``use_h``
        h_i + 0 off it and h_i + values_c on it (h + the dense form, as torch adds them: -0 + 0 is +0,
        -0 + -0 is -0). Block by block of 64 words: the sums on the support are taken first, from h
        as it was (``out`` may be h itself), then the block is filled, then the sums written. With
        ``vector`` (AVX-512), a block of whole words is written 16 coordinates at a time from
        expanding loads of the values instead (d = 1e7, half the bits set, 2 threads: the dense
        form 16.0 -> 2.3 ms, h + it 19.2 -> 3.5 ms; a tenth: 5.9 -> 2.0 and 8.2 -> 3.4 ms)."""
        zero = out.dtype.type(0.0)
        sums = np.empty(4096, dtype=out.dtype)
        spots = np.empty(4096, dtype=np.int64)
        c = 0
        for w0 in range(0, words.size, 64):
            w1 = min(words.size, w0 + 64)
            if vector and out.size >= np.int64(w1) << 6:  # whole words: 16 coordinates at a time
                for w in range(w0, w1):
                    word = words[w]
                    for q in range(4):
                        lanes = (word >> u64(16 * q)) & u64(0xFFFF)
                        kernel_parts.expand_added(values, c, lanes, h, (np.int64(w) << 6) + 16 * q, use_h, out)
                        c += kernel_parts.popcount(lanes)
                continue
            k = 0
            for w in range(w0, w1):
                word = words[w]
                while word != u64(0):
                    low = word & (~word + u64(1))
                    p = (np.int64(w) << 6) + lowest_bit[(low * u64(DE_BRUIJN)) >> u64(58)]
                    sums[k] = h[p] + values[c] if use_h else values[c]
                    spots[k] = p
                    k += 1
                    c += 1
                    word ^= low
            lo, hi = np.int64(w0) << 6, min(out.size, np.int64(w1) << 6)
            ob = out[lo:hi]  # (out[lo + i] was not vectorized)
            if use_h:
                hb = h[lo:hi]
                for i in range(ob.size):
                    ob[i] = hb[i] + zero
            else:
                for i in range(ob.size):
                    ob[i] = zero
            for i in range(k):
                out[spots[i]] = sums[i]

    @jit()
    def gap_quotient_sums(idx, shifts, sums):
        """sums[c] = the sum of g_j >> shifts[c] over the gaps g_0 = idx_0, g_j = idx_j - idx_(j-1) - 1
        of sorted indices; returns False where a gap is negative (indices not strictly increasing)."""
        prev = np.int64(-1)
        for c in range(shifts.size):
            sums[c] = 0
        for j in range(idx.size):
            g = np.int64(idx[j]) - prev - 1
            if g < 0:
                return False
            prev = np.int64(idx[j])
            for c in range(shifts.size):
                sums[c] += g >> shifts[c]
        return True

    @jit()
    def rice_write(idx, r, out, unary_at):
        """The Rice frame of ``common.wire.indexcode``: the gaps' r-bit remainders from byte 0, then
        their quotients in unary (q zero bits and a one bit each) from byte ``unary_at``, least
        significant bit first, each section zero-padded to a byte (``out`` starts zeroed)."""
        mask = (np.int64(1) << r) - 1
        acc, nbits, at, prev = u64(0), np.int64(0), np.int64(0), np.int64(-1)
        if r > 0:
            for j in range(idx.size):
                g = np.int64(idx[j]) - prev - 1
                prev = np.int64(idx[j])
                acc |= u64(g & mask) << u64(nbits)
                nbits += r
                while nbits >= 8:
                    out[at] = np.uint8(acc & u64(0xFF))
                    acc >>= u64(8)
                    nbits -= 8
                    at += 1
            if nbits > 0:
                out[at] = np.uint8(acc & u64(0xFF))
        bit, prev = unary_at * 8, np.int64(-1)
        for j in range(idx.size):
            g = np.int64(idx[j]) - prev - 1
            prev = np.int64(idx[j])
            bit += g >> r  # the zeros of the quotient, then its one bit
            out[bit >> 3] |= np.uint8(1 << (bit & 7))
            bit += 1

    @jit()
    def bitmap_write(idx, out):
        """Bit i of ``out`` (zeroed, least significant bit first) set for each index i."""
        for j in range(idx.size):
            i = np.int64(idx[j])
            out[i >> 3] |= np.uint8(1 << (i & 7))

    @jit()
    def rice_read(data, rem_bytes, k, r, dim, out, lowest_bit):
        """Decodes the Rice frame of ``common.wire.indexcode`` (``data``: remainders, then the unary
        section) into ``out`` (k int64 indices), checking it as the NumPy version does and in its
        order. Returns (status, value): 0 decoded; 1 the unary section holds ``value`` one bits, not
        k; 2 bytes after the last one bit; 3 a gap exceeds d; 4 the last index ``value`` is >= d.
        A one bit's place in its byte comes from the de Bruijn table of ``ascending``."""
        n = data.size
        ones, last = np.int64(0), np.int64(-1)
        for b in range(rem_bytes, n):
            v = np.int64(data[b])
            if v != 0:
                last = b
                while v != 0:
                    v &= v - 1
                    ones += 1
        if ones != k:
            return 1, ones
        if last != n - 1:
            return 2, np.int64(0)
        mask = (np.int64(1) << r) - 1
        acc, nbits, at = u64(0), np.int64(0), np.int64(0)
        bad, prev_one, index, j = False, np.int64(-1), np.int64(-1), 0
        for b in range(rem_bytes, n):
            v = np.int64(data[b])
            while v != 0:
                low = v & -v
                one = np.int64(8 * (b - rem_bytes)) + lowest_bit[(u64(low) * u64(DE_BRUIJN)) >> u64(58)]
                v ^= low
                q = one - prev_one - 1
                prev_one = one
                rem = np.int64(0)
                if r > 0:
                    while nbits < r:
                        acc |= u64(data[at]) << u64(nbits)
                        at += 1
                        nbits += 8
                    rem = np.int64(acc & u64(mask))
                    acc >>= u64(r)
                    nbits -= r
                bad |= q > (dim >> r)
                gap = (q << r) | rem
                bad |= gap >= dim
                index += gap + 1
                out[j] = index
                j += 1
        if bad:
            return 3, np.int64(0)
        if index >= dim:
            return 4, index
        return 0, np.int64(0)

    @jit()
    def kth_largest_bits(bits, k, total, digit):
        """The k-th largest (k >= 1) of the unsigned integers ``bits`` (``total`` bits wide), digit by
        digit from the top (a radix selection): a histogram of the top ``digit`` bits picks the bucket
        that holds it, that bucket's values are copied out, and each further digit narrows them the
        same way. Two passes over all values and a few over one bucket, whatever the ties (NumPy's
        selection took 95 ms for the 1%-largest of 1e6 magnitudes mostly zero, 6 ms otherwise)."""
        hist = np.zeros(np.int64(1) << digit, np.int64)
        shift = u64(total - digit)
        for i in range(bits.size):
            hist[np.int64(u64(bits[i]) >> shift)] += 1
        bucket, k = kernel_parts.bucket_of(hist, hist.size - 1, k)
        prefix = u64(bucket)
        kept = np.empty(hist[bucket], bits.dtype)
        m = 0
        for i in range(bits.size):
            v = bits[i]
            if u64(v) >> shift == prefix:
                kept[m] = v
                m += 1
        while shift > u64(0):
            width = min(u64(digit), shift)
            shift -= width
            mask = (u64(1) << width) - u64(1)
            for b in range(np.int64(mask) + 1):
                hist[b] = 0
            for i in range(m):
                hist[np.int64((u64(kept[i]) >> shift) & mask)] += 1
            bucket, k = kernel_parts.bucket_of(hist, np.int64(mask), k)
            prefix = (prefix << width) | u64(bucket)
            left = 0
            for i in range(m):
                v = kept[i]
                if u64(v) >> shift == prefix:
                    kept[left] = v
                    left += 1
            m = left
        return prefix

    @jit()
    def pick_top(mag, threshold, k, out):
        """Positions of the values > threshold and of the first k - (their count) values ==
        threshold, in order; ``out`` holds mag.size entries (each position is written, and the count
        moves by whether it is kept: no branch). Returns the count."""
        above = np.int64(0)
        for i in range(mag.size):
            above += np.int64(mag[i] > threshold)
        ties = k - above
        c = 0
        for i in range(mag.size):
            v = mag[i]
            tie = np.int64(v == threshold) & np.int64(ties > 0)
            ties -= tie
            out[c] = i
            c += np.int64(v > threshold) | tie
        return c

    @jit()
    def keyed_subsets(counts, starts, key, dim, chunk_bits, first, stop, words, lowest_bit, out, marked):
        """Rand-K's support, chunks ``first`` .. ``stop`` - 1 (``indices.randk_support``): chunk c holds
        coordinates [c 2^chunk_bits, (c + 1) 2^chunk_bits) of [0, dim), and ``counts[c]`` of them go
        to ``out[starts[c]:]`` in increasing order. A uniform subset of t of the chunk's s
        coordinates: its draws are the 16-bit fields of SplitMix64's outputs z_j = mix(key_c + (j + 1)
        golden), key_c = mix(key + (c + 1) golden), lowest field first, each cut to the b bits of
        s - 1; a field is taken where it is below s and not taken yet, until t are (distinct uniform
        draws: a uniform t-subset). Where the count is above s / 2, the s - count coordinates left
        out are drawn that way instead. The taken ones are bits of ``words`` (2^chunk_bits bits,
        zeroed per chunk, in the L1 cache), read back lowest first as ``ascending`` reads them; or,
        where ``marked`` has words (a bitmap of d bits, chunk_bits >= 6), the chunk's bits are
        written there (those of its subset: flipped where the left-out ones were drawn) and ``out``
        is not used."""
        size = np.int64(1) << chunk_bits
        for c in range(first, stop):
            count = counts[c]
            base = np.int64(c) << chunk_bits
            s = min(size, dim - base)
            at = starts[c]
            if count == 0:
                continue
            if count == s and marked.size == 0:
                for i in range(s):
                    out[at + i] = base + i
                continue
            flip = count > s // 2
            wanted = s - count if flip else count
            used = (s + 63) >> 6
            for w in range(used):
                words[w] = u64(0)
            b = 0
            while (np.int64(1) << b) < s:
                b += 1
            mask = (u64(1) << u64(b)) - u64(1)
            chunk_key = kernel_parts.splitmix(key + u64(c + 1) * golden)
            taken = np.int64(0)
            j = u64(0)
            while taken < wanted:
                j += u64(1)
                z = kernel_parts.splitmix(chunk_key + j * golden)
                for q in range(4):
                    v = np.int64((z >> u64(16 * q)) & mask)
                    if v < s:
                        bit = u64(1) << u64(v & 63)
                        word = words[v >> 6]
                        taken += np.int64((word & bit) == u64(0))
                        words[v >> 6] = word | bit
                        if taken == wanted:
                            break
            o = at
            for w in range(used):
                word = words[w]
                if flip:
                    word = ~word
                    if w == used - 1 and s & 63 != 0:
                        word &= (u64(1) << u64(s & 63)) - u64(1)
                if marked.size:
                    marked[(base >> 6) + w] = word
                    continue
                while word != u64(0):
                    low = word & (~word + u64(1))
                    out[o] = base + (np.int64(w) << 6) + lowest_bit[(low * u64(DE_BRUIJN)) >> u64(58)]
                    o += 1
                    word ^= low

    return {np.float32: quantize32, np.float64: quantize64, "uniform32": quantize_uniform32, "powers32": quantize_powers32, "pairs32": quantize_pairs32, "pairs32_windowed": quantize_pairs32_windowed, "small32": quantize_small32, "code_range": code_range, "magnitude_bits": magnitude_bits,
            "pack_small": pack_small, "pack_words": pack_words, "pack_vectors": pack_vectors, "unpack_small": unpack_small, "unpack_words": unpack_words, "unpack_vectors": unpack_vectors, "dequantize": dequantize, "dequantize_stacked": dequantize_stacked, "dequantize_uniform32": dequantize_uniform32, "dequantize_powers32": dequantize_powers32,
            "block_sums": block_sums, "at_least": at_least, "signs": signs, "add_signs": add_signs, "add_signs_to": add_signs_to, "below_zero": below_zero,
            "amsgrad_moments": amsgrad_moments, "amsgrad_apply": amsgrad_apply,
            "descend": descend, "blend": blend, "mean_descend": mean_descend, "signs_mean_added": signs_mean_added, "sparse_added": sparse_added, "add_on_support": add_on_support, "marked_mean_added": marked_mean_added, "mean_added_on_union": mean_added_on_union, "feistel": feistel, "mark_rest": mark_rest, "ascending": ascending,
            "mark": mark, "mark_rows_banded": mark_rows_banded, "rotated_bits": rotated_bits, "count_marked": count_marked, "gather_marked": gather_marked, "scatter_marked": scatter_marked,
            "gap_quotient_sums": gap_quotient_sums, "rice_write": rice_write, "bitmap_write": bitmap_write,
            "rice_read": rice_read, "pick_top": pick_top, "kth_largest_bits": kth_largest_bits,
            "keyed_subsets": keyed_subsets}


_LITTLE_ENDIAN = sys.byteorder == "little"  # ``pack_words`` reads codes as native 64-bit words
BLOCK = 4096  # coordinates a kernel handles per inner loop (its temporaries stay in the L1/L2 cache)
MIN_CHUNK = 1 << 18  # coordinates below which a second thread costs more than it saves
# Coordinates from which the one-pass elementwise kernels (the mean and step, AMSGrad's step, a scaled
# sign's dense form and sum) replace torch's separate operations, on one thread below MIN_CHUNK: one
# thread at 2^15..2^17 coordinates, float32, 1.4-4x faster than torch (the mean and step of 2 rows 35
# -> 23 us at 2^16, a sign's dense form 25 -> 6 us, AMSGrad's step 111 -> 81 us); below, the call's
# fixed cost (about 8 us) is most of it. ``descend`` alone (x - lr g: two torch operations) gains
# nothing below MIN_CHUNK and starts there.
MIN_COMPILED = 1 << 15
# The float32 tables that ``quantize_small32`` takes (its comparisons grow with the table, where the
# windows' and the powers-of-two kernel's cost does not): any of at most 16 levels whose binades hold
# several levels (bases below 2, which the general loop scans: 112-171 ms on one thread at d = 1e7,
# against 11-15) or, where the host lacks AVX-512, that would be gathered (compiled for AVX2, with
# ``NUMBA_CPU_FEATURES`` the host's without its avx512 features: ``NUMBA_CPU_NAME`` alone keeps them;
# base-3 dithering s = 4, ``benchmarks/bench_kernel_paths.py``: 21.7-25.0 ms against 9.9-10.0);
# tables of one level a binade up to SMALL_TOP_OVER_WINDOWS, and of powers of two up to
# SMALL_TOP_OVER_POWERS. One thread at d = 1e7 on AMD Zen 4, two alternating runs, routed -> small
# kernel, ms: base-3 dithering s = 6 11.4 / 10.9 -> 10.2 / 9.5, s = 8 11.1 / 10.9 -> 11.3 / 10.6, s = 11
# 11.1 / 10.4 -> 12.6 / 11.8; natural dithering s = 2 9.4 / 8.6 -> 7.9 / 7.2, s = 4 9.6 / 8.6 -> 9.0 /
# 8.3, s = 8 9.6 / 8.6 -> 11.3 / 10.5.
SMALL_TOP_OVER_WINDOWS = 7
SMALL_TOP_OVER_POWERS = 3


def _small_table_pays(top: int, scan: int, powers: bool) -> bool:
    """Whether a float32 table with codes 0 .. ``top`` goes to ``quantize_small32`` (see
    ``SMALL_TOP_OVER_WINDOWS``); ``scan`` as ``binade_starts``, ``powers``: levels 0 and powers of two."""
    from common.compressors import kernel_parts  # (imports Numba: only where the kernels exist)

    if top > kernel_parts.SMALL_TOP:
        return False
    if powers:
        return top <= SMALL_TOP_OVER_POWERS
    return scan == 2 or top <= SMALL_TOP_OVER_WINDOWS or not vector_compress()


STACKED_TABLE = 2048  # entries of a signed level table that ``dequantize`` copies onto its stack (16 KB of float64)
PIECES_PER_THREAD = 4  # pieces of a long vector per thread (see ``_chunks``)
MEAN_ROWS = range(2, 5)  # rows that ``mean_descend`` averages by a running sum (where that is torch's mean)
# Rows that it averages with ATen's order in the last columns (``interleaved_from``): at d = 1e7 and
# n = 8 in 13 ms against 62-270 ms for the stack, its mean and the step; from 15 rows (17 streams of
# reads and writes) the pass took 66-91 ms, no faster than the stack, so those rows take torch's ops.
ORDERED_MEAN_ROWS = range(5, 15)


def available() -> bool:
    return _kernels() is not None


@functools.lru_cache(maxsize=64)
def binade_starts(levels_bytes: bytes, np_dtype) -> tuple[np.ndarray, np.ndarray, int]:
    """For each exponent field E of ``np_dtype``: the index of the largest level <= the smallest
    non-negative number with field E (0 for E = 0), clamped to [0, top - 1]; and whether the binade
    of E holds more than one level above that one (then one step up may not reach t's level); and
    which of the two the kernel must test."""
    levels = np.frombuffer(levels_bytes, dtype=np_dtype)
    top = len(levels) - 1
    fields, bias = (256, 127) if np_dtype == np.float32 else (2048, 1023)
    lows = np.concatenate([[0.0], np.ldexp(1.0, np.arange(1, fields - 1) - bias), [np.inf]])  # exact in float64
    starts = np.clip(np.searchsorted(levels, lows, side="right") - 1, 0, top - 1)
    ends = np.append(starts[1:], top - 1)  # the lower level of the next binade's smallest number
    crowded = ends - starts > 1
    # which binades need the scan: none (0), only the subnormal one (1: rounding tables), any (2: bases
    # below 2); the kernel tests the cheap condition that applies
    scan = 0 if not crowded.any() else 1 if not crowded[1:].any() else 2
    return starts.astype(np.int32), crowded, scan


@functools.lru_cache(maxsize=64)
def small_levels(levels_bytes: bytes) -> np.ndarray:
    """A float32 table of at most 16 levels as the 16 entries ``kernel_parts.small_table_codes`` loads
    (the last level repeated past the top)."""
    levels = np.frombuffer(levels_bytes, dtype=np.float32)
    out = np.full(16, levels[-1], dtype=np.float32)
    out[:levels.size] = levels
    return out


@functools.lru_cache(maxsize=64)
def binade_windows(levels_bytes: bytes) -> np.ndarray:
    """``binade_pairs`` as the seven float32 rows of 256 entries (one per exponent field) that
    ``kernel_parts.window_pairs`` reads: above; the lower level for t below above[E], then at or
    above it; the same for the upper level and for the lower code (its int32 bits)."""
    above, codes, lows, highs = binade_pairs(levels_bytes)
    rows = [above, lows[0::2], lows[1::2], highs[0::2], highs[1::2], codes[0::2].view(np.float32), codes[1::2].view(np.float32)]
    return np.ascontiguousarray(np.stack(rows).reshape(-1), dtype=np.float32)


@functools.lru_cache(maxsize=64)
def binade_pairs(levels_bytes: bytes) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """For a float32 table, per exponent field E: ``above[E]``, the level after ``binade_starts``'s
    lower level k_E; and for the entries 2E (t below it) and 2E + 1 (t at or above it) the code
    (k_E, or k_E + 1 clamped to top - 1) and that code's two levels. Where a binade holds one level
    at most, t's code and levels are one lookup away, with the clamps of the general loop built in."""
    levels = np.frombuffer(levels_bytes, dtype=np.float32)
    top = len(levels) - 1
    starts = binade_starts(levels_bytes, np.float32)[0].astype(np.int64)
    pair_codes = np.stack([starts, np.minimum(starts + 1, top - 1)], axis=1).reshape(-1).astype(np.int32)
    return levels[starts + 1], pair_codes, levels[pair_codes], levels[pair_codes + 1]


@functools.lru_cache(maxsize=64)
def uniform_levels_are_quotients(levels_bytes: bytes, s: int) -> bool:
    """Whether a float32 table holds exactly the float32 quotients k / s, k = 0..s, that the uniform
    kernel computes (and, for s a power of two, the products k * (1 / s)), so that it gives the
    codes that the table would. The tables of ``LevelTable`` round the float64 k / s to float32,
    which is the same number: k / s is either exact in float32, or its binary expansion, with a
    period that divides the order of 2 modulo an odd factor of s < 2^16, has no run of 28 equal bits
    that the float64 rounding would need to land on a float32 midpoint. Checked, not assumed."""
    levels = np.frombuffer(levels_bytes, dtype=np.float32)
    if len(levels) != s + 1:
        return False
    k = np.arange(s + 1, dtype=np.float32)
    if not np.array_equal(k / np.float32(s), levels):
        return False
    return s & (s - 1) != 0 or np.array_equal(k * (np.float32(1.0) / np.float32(s)), levels)


@functools.lru_cache(maxsize=64)
def power_levels(levels_bytes: bytes) -> tuple[int, bool] | None:
    """(c, fixups) for a float32 table [0, 2^(1 + c), 2^(2 + c), ..., 2^(top + c)] (natural compression,
    base-2 exponential rounding, natural dithering), None for any other: the levels that
    ``quantize_powers32`` computes from exponent fields. ``fixups``: whether the lowest levels are
    subnormal, so that a subnormal t must be looked up in the table."""
    levels = np.frombuffer(levels_bytes, dtype=np.float32).astype(np.float64)
    if len(levels) < 2 or levels[0] != 0.0 or not levels[1] > 0.0:
        return None
    mantissa, exponent = np.frexp(levels[1])  # levels[1] = 2^(exponent - 1) when it is a power of two
    c = int(exponent) - 2
    if mantissa != 0.5 or not np.array_equal(levels[1:], np.ldexp(1.0, np.arange(1, len(levels)) + c)):
        return None
    return c, bool(levels[1] < 2.0 ** -126)


def _chunks(n: int, align: int) -> list[tuple[int, int]]:
    """Contiguous pieces of range(n), up to ``PIECES_PER_THREAD`` per torch CPU thread (one piece where
    there is one thread), each at least ``MIN_CHUNK`` long and starting at a multiple of ``align``.
    The pool hands the pieces out as its threads come free, so a thread that other work on the
    machine slows down takes fewer of them; with one piece per thread every call waited for the
    slower one (about a tenth of the median time of a quantizer at d = 1e7 on a shared 2-core VM)."""
    threads = _threads()
    parts = max(1, min(threads * PIECES_PER_THREAD, n // MIN_CHUNK)) if threads > 1 else 1
    step = -(-n // parts // align) * align if parts > 1 else n
    return [(a, min(n, a + step)) for a in range(0, n, max(step, 1))] or [(0, 0)]


def _run(n: int, align: int, fn) -> list:
    """``fn(start, stop)`` over the pieces of ``_chunks``, in parallel threads (the kernels release the
    GIL); the results in order. Every piece computes what one call over range(n) would, so the
    result does not depend on the number of threads."""
    return _run_pieces(_chunks(n, align), fn)


_threads_here: contextvars.ContextVar[int | None] = contextvars.ContextVar("compiled_threads", default=None)


@contextlib.contextmanager
def compiled_threads(count: int | None):
    """The compiled passes' thread count within the block, torch's own ops keeping theirs; ``None``
    leaves it as torch's. ``psc launch``'s server, which keeps cores / (N + 1) threads while the
    workers compute, takes every core for its step and encodes, while the workers wait for their
    downlinks or finish what they left for after sending (``runtime.server_core``)."""
    token = _threads_here.set(count)
    try:
        yield
    finally:
        _threads_here.reset(token)


def _threads() -> int:
    """As many as torch uses for its CPU ops (``torch.set_num_threads`` limits both), or what
    ``compiled_threads`` set for the block that runs."""
    return _threads_here.get() or torch.get_num_threads()


def _pool() -> ThreadPoolExecutor:
    """A pool as large as torch's thread count now (``psc launch`` sets the server's for a run)."""
    return _pool_of(max(2, _threads()))


@functools.lru_cache(maxsize=2)
def _pool_of(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="psc-codec")


def quantize(x: torch.Tensor, levels: torch.Tensor, uniform_s: int, key: int, stochastic: bool,
             divisor: torch.Tensor | None = None, sign_bits: bool = False,
             ) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int, int], bool] | None:
    """(x < 0, codes, (min, max, smallest nonzero code or -1), whether every x_i is finite) for a CPU
    vector ``x`` against ``levels`` (float32 or float64: the arithmetic dtype), or None when Numba is
    missing. x < 0 comes as bool flags of x's shape; with ``sign_bits``, where the kernel writes them
    so (every float32 one: each block's flags go from a scratch in the cache into the bitmap,
    ``kernel_parts.pack_signs``, or for small tables each group's comparison mask straight into it,
    ``kernel_parts.small_table_codes``), as their bitmap instead (a uint8 tensor of ceil(n / 8) bytes in
    ``common.wire.bitpack``'s layout, the sign frame of the wire: no vector of flags is written, and
    the encoder sends it as it is). The encoder uses the code range to choose the field width (no second pass over the
    codes); exponential rounding raises for a NaN or inf from the flag, which the pass computes as
    it reads x (no pass of its own; the codes of such an x mean nothing). The flag is read where it
    costs nothing: by the kernels of power-of-two levels and of one level a binade (with a divisor
    it says whether every |x_i| / divisor is finite), the small-table kernel and the float64 one; the
    uniform and the general float32 tables' main loops lost speed with it (QSGD at d = 1e7: 13.7-19.3 ms -> 21.3-22.0), so
    there it is None: their callers check x by its norm or in a pass. ``uniform_s`` > 0 for the
    uniform tables l_k = k / s; ``divisor`` (a 0-d tensor) divides |x| first (dithering); ``key``
    names the draws."""
    kernels = _kernels()
    if kernels is None:
        return None
    work = levels.dtype
    np_work = np.float32 if work == torch.float32 else np.float64
    xs = x.detach().contiguous()
    if xs.dtype != work:
        xs = xs.to(work)
    flat = xs.numpy().reshape(-1)
    lv = levels.contiguous().numpy()
    top = len(lv) - 1
    starts, crowded, scan = binade_starts(lv.tobytes(), np_work)
    from common.compressors.payloads import code_dtype  # (payloads imports this module)

    codes = torch.empty(flat.size, dtype=code_dtype(top)).numpy()
    div = np_work(1.0 if divisor is None else float(divisor))
    draws_key, rounding = np.uint64(key), bool(stochastic)
    powers = power_levels(lv.tobytes()) if np_work == np.float32 and uniform_s == 0 else None
    # x < 0: the float32 kernels write its bitmap, and their pieces start at a multiple of 64 (a whole
    # byte of it); the float64 one its flags, with pieces that start at an even coordinate (the draws
    # of 2p and 2p + 1 share an output)
    bitmap = np_work == np.float32
    neg = np.empty(0 if bitmap else flat.size, dtype=np.bool_)
    signs = np.empty((flat.size + 7) // 8 if bitmap else 0, dtype=np.uint8)
    align = 64 if bitmap else 2

    def signs_of(a, b):  # the bytes of the piece [a, b) (a is a multiple of 64: byte a / 8)
        return signs[a // 8:(b + 7) // 8]

    if np_work == np.float32 and uniform_s > 0 and uniform_levels_are_quotients(lv.tobytes(), int(uniform_s)):
        uniform, s = kernels["uniform32"], int(uniform_s)
        power_of_two = s & (s - 1) == 0

        def piece(a, b):  # levels computed as k / s
            return uniform(flat[a:b], a, div, s, power_of_two, draws_key, rounding, signs_of(a, b), codes[a:b])
    elif np_work == np.float32 and uniform_s == 0 and _small_table_pays(top, scan, powers is not None):
        small, padded = kernels["small32"], small_levels(lv.tobytes())

        def piece(a, b):  # at most 16 levels, counted in registers
            return small(flat[a:b], a, div, padded, top, draws_key, rounding, signs_of(a, b), codes[a:b])
    elif powers is not None:
        binary, (c, fixups) = kernels["powers32"], powers

        def piece(a, b):  # levels 0 and powers of two, read off the exponent
            return binary(flat[a:b], a, div, c, top, fixups, lv, starts, draws_key, rounding,
                          signs_of(a, b), codes[a:b])
    elif np_work == np.float32 and uniform_s == 0 and scan < 2 and vector_compress():
        windowed, pairs, windows = kernels["pairs32_windowed"], binade_pairs(lv.tobytes()), binade_windows(lv.tobytes())

        def piece(a, b):  # one level at most a binade, looked up in windows of the tables held in registers
            return windowed(flat[a:b], a, div, *pairs, windows, lv, scan, top, draws_key, rounding, signs_of(a, b), codes[a:b])
    elif np_work == np.float32 and uniform_s == 0 and scan < 2:
        paired, pairs = kernels["pairs32"], binade_pairs(lv.tobytes())

        def piece(a, b):  # one level at most a binade: t's code and levels from its exponent field
            return paired(flat[a:b], a, div, *pairs, lv, scan, top, draws_key, rounding, signs_of(a, b), codes[a:b])
    elif np_work == np.float32:
        table = kernels[np_work]

        def piece(a, b):  # any other table, looked up
            return table(flat[a:b], a, div, int(uniform_s), starts, crowded, lv, top, draws_key, rounding,
                         signs_of(a, b), codes[a:b])
    else:
        table = kernels[np_work]

        def piece(a, b):  # any table, looked up
            return table(flat[a:b], a, div, int(uniform_s), starts, crowded, scan, lv, top, draws_key,
                         rounding, neg[a:b], codes[a:b])

    pieces = _run(flat.size, align, piece)
    flags = [int(p[3]) for p in pieces]  # 1: a NaN or inf, 0: none, -1: not read
    finite = None if min(flags) < 0 else not any(flags)
    if not bitmap:
        negative = torch.from_numpy(neg).view(x.shape)
    elif sign_bits:
        negative = torch.from_numpy(signs)
    else:
        negative = sign_flags(signs, flat.size).view(x.shape)
    return negative, torch.from_numpy(codes).view(x.shape), _span(pieces), finite


def _span(pieces) -> tuple[int, int, int]:
    """(min, max, smallest nonzero or -1) over the pieces' (min, max, smallest nonzero) triples."""
    least = min(int(p[0]) for p in pieces)
    most = max(int(p[1]) for p in pieces)
    nonzero = min(int(p[2]) for p in pieces)
    return least, most, (nonzero if nonzero < 2**62 else -1)


def largest_magnitude(x: torch.Tensor) -> float | None:
    """max |x_i| of a contiguous CPU float32 or float64 vector of at least ``MIN_COMPILED``
    coordinates, exactly (a NaN where some x_i is a NaN, inf where the largest is one), from
    ``magnitude_bits`` over its pieces in parallel threads; None for other vectors or without Numba.
    One thread at d = 1e7, interleaved calls: float32 2.2-2.6 ms against 3.0-3.3 for ``torch.aminmax``
    (a float32 sum: 1.7), float64 7.6 against 12.6 on the loaded host."""
    kernels = _long_cpu_floats([x])
    if kernels is None:
        return None
    flat = x.detach().numpy().reshape(-1)
    unsigned = np.uint32 if flat.dtype == np.float32 else np.uint64
    bits = flat.view(unsigned)
    mask = unsigned(np.iinfo(unsigned).max >> 1)
    most = max(int(m) for m in _run(bits.size, 1, lambda a, b: kernels["magnitude_bits"](bits[a:b], mask)))
    return float(np.array(most, dtype=unsigned).view(flat.dtype))


def code_range(codes: torch.Tensor) -> tuple[int, int, int] | None:
    """(min, max, smallest nonzero or -1) of a CPU code vector; None without Numba."""
    kernels = _kernels()
    if kernels is None or codes.device.type != "cpu" or codes.numel() == 0:
        return None
    flat = codes.contiguous().numpy()
    return _span(_run(flat.size, 1, lambda a, b: kernels["code_range"](flat[a:b])))


def _word_lanes(codes: np.ndarray, packed: np.ndarray) -> int:
    """The lanes (8 or 16 bits) in which ``pack_words`` / ``unpack_words`` read ``codes`` as 64-bit
    words beside the ``packed`` bytes, or 0 where they cannot: other codes, a big-endian host, or an
    array that does not start on an 8-byte boundary."""
    lane_bits = 8 * codes.itemsize
    aligned = codes.ctypes.data % 8 == 0 and packed.ctypes.data % 8 == 0
    return lane_bits if lane_bits in (8, 16) and _LITTLE_ENDIAN and aligned else 0


def pack_codes(codes: torch.Tensor, minus: int, clamp: bool, width: int) -> torch.Tensor | None:
    """The packed fields codes - minus (clamped at 0) of ``width`` in 1..8 bits (``common.wire.bitpack``
    layout) for a CPU code vector; None where this kernel does not apply. One-bit fields are
    NumPy's ``packbits`` of the codes (a field is 1 where the code is not ``minus``, or not 0 with
    ``clamp``); wider fields of uint8 or 16-bit codes go through ``pack_words`` 64 fields at a time
    and ``pack_small`` for each piece's last few, other codes through ``pack_small``."""
    kernels = _kernels()
    if kernels is None or codes.device.type != "cpu" or not 1 <= width <= 8:
        return None
    flat = codes.contiguous().numpy()
    if width == 1:
        if flat.dtype == np.uint8 and not clamp and minus == 0:
            return torch.from_numpy(np.packbits(flat, bitorder="little"))  # the codes are the fields
        return torch.from_numpy(np.packbits(flat != (0 if clamp else minus), bitorder="little"))
    out = np.empty((flat.size * width + 7) // 8, dtype=np.uint8)
    lane_bits = _word_lanes(flat, out)

    vectors = lane_bits and width < 8 and vector_pack()

    def piece(a, b):  # a is a multiple of 64 fields: byte a * width / 8 starts a whole word
        m = a + (b - a) // 64 * 64 if lane_bits else a
        if m > a and vectors:
            kernels["pack_vectors"](flat[a:m], int(minus), bool(clamp), int(width), PACK_INDEX[width],
                                    out[a * width // 8:m * width // 8])
        elif m > a:
            kernels["pack_words"](flat[a:m].view(np.uint64), lane_bits, int(minus), bool(clamp), int(width),
                                  out[a * width // 8:m * width // 8].view(np.uint64))
        if b > m:
            kernels["pack_small"](flat[m:b], int(minus), bool(clamp), int(width), out[m * width // 8:(b * width + 7) // 8])

    _run(flat.size, 64, piece)
    return torch.from_numpy(out)


def unpack_codes(data: np.ndarray, n: int, width: int, offset: int, escape: bool,
                 dtype: torch.dtype) -> tuple[torch.Tensor, int] | None:
    """(codes, largest code) from ``n`` packed fields of ``width`` in 1..8 bits, whose padding bits are
    zero (the decoder checks them first); None where this kernel does not apply. One-bit fields are
    NumPy's ``unpackbits``; wider fields into uint8 or 16-bit codes go through ``unpack_words`` 64
    fields at a time (then NumPy's maximum), other codes and each piece's last few fields through
    ``unpack_small``."""
    kernels = _kernels()
    if kernels is None or not 1 <= width <= 8:
        return None
    if width == 1 and n and dtype in (torch.uint8, torch.int16, torch.int32, torch.int64):
        bits = np.unpackbits(data, count=n, bitorder="little")
        codes = torch.from_numpy(bits).to(dtype)
        if escape:  # field 1 is code ``offset``
            return (codes.mul_(offset) if offset != 1 else codes), (offset if data.any() else 0)
        return (codes.add_(offset) if offset else codes), offset + int(data.any())
    codes = torch.empty(n, dtype=dtype).numpy()
    # a lane must hold every code the fields allow: one that wrapped would hide a code beyond the table
    # (a malformed frame) from the maximum, where ``unpack_small`` reports it before it is stored
    fits = codes.dtype.kind in "iu" and offset + (1 << width) - 1 <= np.iinfo(codes.dtype).max
    lane_bits = _word_lanes(codes, data) if fits else 0

    vectors = lane_bits and width < 8 and vector_pack()

    def piece(a, b):  # a is a multiple of 64 fields: byte a * width / 8 starts a whole word
        m = a + (b - a) // 64 * 64 if lane_bits else a
        largest = 0
        if m > a and vectors:
            largest = int(kernels["unpack_vectors"](data[a * width // 8:m * width // 8], int(width), int(offset),
                                                    bool(escape), SPREAD_INDEX[width], codes[a:m]))
        elif m > a:
            words = codes[a:m].view(np.uint64)
            kernels["unpack_words"](data[a * width // 8:m * width // 8].view(np.uint64), lane_bits, int(width),
                                    int(offset), bool(escape), words)
            largest = int(codes[a:m].max())
        if b > m:
            largest = max(largest, int(kernels["unpack_small"](data[m * width // 8:(b * width + 7) // 8], b - m, width,
                                                                offset, escape, codes[m:b])))
        return largest

    return torch.from_numpy(codes), max(_run(n, 64, piece))


def sign_flags(bits: np.ndarray, n: int) -> torch.Tensor:
    """The bool flags x < 0 of n coordinates from their sign bitmap (``common.wire.bitpack``'s layout;
    NumPy's ``unpackbits``): the inverse of ``sign_bitmap``. ValueError where the bitmap is not
    ceil(n / 8) bytes long."""
    if bits.size != (n + 7) // 8:
        raise ValueError(f"a sign bitmap of {bits.size} bytes for {n} codes")
    return torch.from_numpy(np.unpackbits(bits, count=n, bitorder="little").view(np.bool_))


def sign_bitmap(signs: torch.Tensor, n: int) -> np.ndarray:
    """x < 0 of n coordinates as the wire's sign bitmap: a ``Quantized.signs`` bitmap as it is, bool
    flags packed; ValueError where the length is not n's (the kernels would read past it)."""
    bitmap = signs.dtype == torch.uint8
    if signs.numel() != ((n + 7) // 8 if bitmap else n):
        raise ValueError(f"{signs.numel()} {'bytes of sign bitmap' if bitmap else 'sign flags'} for {n} codes")
    if bitmap:
        return signs.contiguous().numpy().reshape(-1)
    return np.packbits(signs.contiguous().numpy().reshape(-1), bitorder="little")


def dequantize(codes: torch.Tensor, signs: torch.Tensor, signed: torch.Tensor) -> torch.Tensor | None:
    """signed[code + L negative] for CPU tensors (``signed`` = [levels, -levels]); ``signs``: x < 0 as
    flags or as the sign bitmap (``Quantized.signs``); None without Numba."""
    kernels = _kernels()
    if kernels is None or codes.device.type != "cpu" or signed.dtype not in (torch.float32, torch.float64):
        return None
    c, table = codes.contiguous().numpy().reshape(-1), signed.contiguous().numpy()
    bits = sign_bitmap(signs, c.size)
    out = np.empty(c.size, dtype=table.dtype)
    gather = kernels["dequantize_stacked" if table.size <= STACKED_TABLE else "dequantize"]
    _run(c.size, 64, lambda a, b: gather(c[a:b], bits[a // 8:], table, out[a:b]))
    return torch.from_numpy(out)


def dequantize_computed(codes: torch.Tensor, signs: torch.Tensor, levels: torch.Tensor, uniform_s: int,
                        norm: torch.Tensor | None) -> torch.Tensor | None:
    """sign * level[code] * norm (norm 1 where None) for CPU tensors whose float32 ``levels`` (unscaled)
    are the uniform quotients k / s or 0 and powers of two, with the levels computed instead of read
    (the same products as the scaled table's); None for any other table, dtype or device. ``signs``:
    x < 0 as the sign bitmap (``Quantized.signs``), which the kernels read a block at a time (no flag
    vector of n bytes is written or read), or as flags, packed first (``sign_bitmap``)."""
    kernels = _kernels()
    if kernels is None or codes.device.type != "cpu" or levels.dtype != torch.float32:
        return None
    table = levels.contiguous().numpy().tobytes()
    powers = None if uniform_s > 0 else power_levels(table)
    if powers is None and not (uniform_s > 0 and uniform_levels_are_quotients(table, int(uniform_s))):
        return None
    c = codes.contiguous().numpy().reshape(-1)
    bits = sign_bitmap(signs, c.size)
    scale = np.float32(1.0 if norm is None else float(norm))
    out = np.empty(c.size, dtype=np.float32)
    if powers is not None:
        kernel = kernels["dequantize_powers32"]
        lv = levels.contiguous().numpy()
        _run(c.size, 64, lambda a, b: kernel(c[a:b], bits[a // 8:], powers[0], scale, lv, out[a:b]))
    else:
        kernel, power_of_two = kernels["dequantize_uniform32"], uniform_s & (uniform_s - 1) == 0
        _run(c.size, 64, lambda a, b: kernel(c[a:b], bits[a // 8:], int(uniform_s), power_of_two, scale, out[a:b]))
    return torch.from_numpy(out)


def signs_to_dense(negative: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """A ``Signs`` payload as a dense CPU vector, -scale where negative and scale elsewhere, in one
    pass; None without Numba or for other devices and dtypes."""
    kernels = _kernels()
    if kernels is None or negative.device.type != "cpu" or dtype not in (torch.float32, torch.float64):
        return None
    neg = negative.contiguous().numpy()
    out = np.empty(neg.size, dtype=np.float32 if dtype == torch.float32 else np.float64)
    value = out.dtype.type(scale.to(dtype).item())
    _run(neg.size, 1, lambda a, b: kernels["signs"](neg[a:b], value, out[a:b]))
    return torch.from_numpy(out)


def signs_added(h: torch.Tensor, negative: torch.Tensor, scale: torch.Tensor, inplace: bool = False) -> torch.Tensor | None:
    """h + (a ``Signs`` payload's dense form) in one pass, without that dense form: a new vector, or
    h itself with ``inplace``; the bits of torch's addition. None without Numba, for other devices or
    dtypes, and unless h and the flags are 1-D of one length and h is contiguous."""
    kernels = _kernels()
    if (kernels is None or h.dtype not in (torch.float32, torch.float64) or h.device.type != "cpu"
            or negative.device.type != "cpu" or h.dim() != 1 or negative.dim() != 1 or h.numel() != negative.numel()
            or not h.is_contiguous()):
        return None
    neg = negative.contiguous().numpy()
    ha = h.detach().numpy()
    value = ha.dtype.type(scale.to(h.dtype).item())
    if inplace:
        _forget_marks(h)  # written through NumPy: torch's version counter does not move
        _run(neg.size, 1, lambda a, b: kernels["add_signs_to"](ha[a:b], neg[a:b], value))
        return h
    out = np.empty_like(ha)
    _run(neg.size, 1, lambda a, b: kernels["add_signs"](ha[a:b], neg[a:b], value, out[a:b]))
    return torch.from_numpy(out)


class TensorMarks:
    """Vectors known to have some property since the pass that wrote them, the last few: data
    pointer -> (a weak reference to the tensor, its length, dtype and torch version counter then).
    A mark holds for the tensor and any contiguous view of all of its memory (``detach``, ``view``:
    they share the version counter) while the tensor lives, so that its memory cannot have gone to
    another. It assumes what the rules do: a marked vector changes only through torch ops on
    tensors that share its counter, which move the counter and so drop the mark. Writes that bypass
    the counter (through ``.numpy()``, ``.data``, ``set_`` or a ``from_numpy`` alias) would not; this
    module's own in-place writers, which write through NumPy, drop the marks of every vector that
    shares memory with what they write (``_forget_marks``). An inference tensor, which has no
    version counter, is never marked."""

    def __init__(self, kept: int = 8):
        self.entries: dict[int, tuple] = {}
        self.kept = kept

    def note(self, t: torch.Tensor) -> None:
        if t.is_inference():
            return
        ptr = t.data_ptr()
        self.entries.pop(ptr, None)
        self.entries[ptr] = (weakref.ref(t), t.numel(), t.dtype, t._version)
        for old in list(self.entries)[:-self.kept]:  # the oldest beyond the last few
            self.entries.pop(old, None)

    def drop(self, t: torch.Tensor) -> None:
        self.entries.pop(t.data_ptr(), None)

    def drop_overlapping(self, t: torch.Tensor) -> None:
        """Drop the marks of every vector whose memory meets ``t``'s."""
        start = t.data_ptr()
        end = start + t.numel() * t.element_size()
        for ptr, (_, numel, dtype, _) in list(self.entries.items()):
            if ptr < end and start < ptr + numel * dtype.itemsize:
                self.entries.pop(ptr, None)

    def holds(self, t: torch.Tensor) -> bool:
        """Whether ``t`` is (a contiguous view of all of) a marked vector, unchanged since: the marked
        tensor alive at the same memory, the same length and dtype, the version counter unmoved on
        both."""
        if t.device.type != "cpu" or t.layout != torch.strided or t.is_inference() or not self.entries:
            return False
        entry = self.entries.get(t.data_ptr())
        if entry is None:
            return False
        marked = entry[0]()
        return (marked is not None and marked.data_ptr() == t.data_ptr() and entry[1:] == (t.numel(), t.dtype, t._version)
                and marked._version == entry[3] and t.is_contiguous())


# Vectors that a compiled pass wrote and saw finite as it wrote them (``descend``, ``mean_descend``,
# ``amsgrad_step``'s x). ``base.all_finite`` asks ``known_finite`` before it reads a vector: the
# server's check of its new model each round (4 ms at d = 1e7 on one thread) becomes the flag of the
# pass that wrote it (0.3-0.9 ms).
_finite = TensorMarks()
# Vectors known to hold no negative zero (``payloads.add_dense``): h + 0 is then h itself, and a
# sparse payload is added to such a vector in place, on its support alone.
without_negative_zero = TensorMarks()


def _noting_finite(t: torch.Tensor, bad: list) -> torch.Tensor:
    """``t``, marked finite where no piece of the pass that wrote it saw an inf or NaN (``bad``: the
    pieces' flags)."""
    return note_finite(t) if not any(bad) else t


def _forget_marks(t: torch.Tensor) -> None:
    """Drop the marks of every vector that shares memory with ``t``, which a kernel writes in place
    through NumPy (the version counter does not move): ``t`` may be a marked vector or any part of
    one."""
    _finite.drop_overlapping(t)
    without_negative_zero.drop_overlapping(t)


def note_finite(t: torch.Tensor) -> torch.Tensor:
    """``t``, marked finite (``known_finite``) by a caller that has just seen every value of it finite,
    or made it from values it saw finite without changing them (a copy, a cast that did not
    overflow): the encoder then does not read it again."""
    _finite.note(t)
    return t


def known_finite(t: torch.Tensor) -> bool:
    """Whether ``t`` is a vector that a compiled pass found finite as it wrote it, unchanged since
    (``TensorMarks.holds``)."""
    return _finite.holds(t)


def signs_mean_added(h: torch.Tensor, negatives: list[torch.Tensor], scales: list[torch.Tensor],
                     interleaved_from: int | None = None) -> torch.Tensor | None:
    """h + the mean of scaled-sign payloads (their flags and 0-d float32 scales) as a new tensor, with
    the bits of ``base.mean_of``'s running sum and torch's h + mean, in one pass without the dense
    forms, the sum or the mean as vectors. For 2..4 payloads (``MEAN_ROWS``), and for 5..14 given
    ``interleaved_from`` (as ``mean_descend``); None otherwise, and where ``_long_cpu_floats``
    refuses h or a flag vector is not a CPU bool vector of h's length."""
    rows = len(negatives)
    fits = rows in MEAN_ROWS or (rows in ORDERED_MEAN_ROWS and interleaved_from is not None)
    kernels = _long_cpu_floats((h,), MIN_CHUNK) if fits else None
    if kernels is None or h.dim() != 1 or any(
            f.device.type != "cpu" or f.dtype != torch.bool or f.shape != h.shape for f in negatives):
        return None
    ha = h.detach().numpy()
    flags = tuple(f.contiguous().numpy() for f in negatives)
    kind = ha.dtype.type
    values = np.array([kind(s.to(h.dtype).item()) for s in scales], dtype=ha.dtype)  # as ``signs_added`` rounds them
    out = np.empty_like(ha)
    zero, n = kind(0.0), kind(len(negatives))
    cut = ha.size if interleaved_from is None else interleaved_from
    _run(ha.size, 1, lambda a, b: kernels["signs_mean_added"](ha[a:b], tuple(f[a:b] for f in flags), values, zero, n,
                                                             cut - a, out[a:b]))
    return torch.from_numpy(out)


def marked_mean_added(h: torch.Tensor, words: list[np.ndarray], values: list[torch.Tensor],
                      inplace: bool = False) -> tuple[torch.Tensor, bool] | None:
    """(h + the mean of sparse payloads whose supports are bitmaps of len(h) bits, whether the result
    holds a -0) with the bits of ``sparse_mean_added`` (``marked_mean_added``): a new tensor, or h
    itself with ``inplace``; one pass over h, the pieces in parallel, no index array. For 2..4
    payloads (``MEAN_ROWS``); None otherwise, where ``_long_cpu_floats`` refuses h, or where a
    payload's values are not a CPU vector of h's dtype as long as its bitmap's set bits."""
    kernels = _long_cpu_floats((h,), MIN_CHUNK) if len(words) == len(values) else None
    if (kernels is None or h.dim() != 1 or len(words) not in MEAN_ROWS
            or any(w.dtype != np.uint64 or w.ndim != 1 or w.size * 64 < h.numel() for w in words)):
        return None
    words = [w.view() for w in words]
    for w in words:
        w.setflags(write=False)  # one array type for the kernel's tuple (the kept bitmaps are read-only)
    pieces = [(a // 64, -(-b // 64)) for a, b in _chunks(h.numel(), 64)]
    per_piece = np.array([[kernels["count_marked"](w[a:b]) for w in words] for a, b in pieces], dtype=np.int64)
    before = np.cumsum(per_piece, axis=0) - per_piece  # each bitmap's set bits before each piece
    if any(v.device.type != "cpu" or v.dtype != h.dtype or v.dim() != 1 or v.numel() != c
           for v, c in zip(values, per_piece.sum(axis=0))):
        return None
    ha = h.detach().numpy()
    kept = tuple(v.contiguous().numpy() for v in values)
    if inplace:
        _forget_marks(h)  # written through NumPy: torch's version counter does not move
    out = ha if inplace else np.empty_like(ha)
    kind = ha.dtype.type
    bad = _run_pieces([(a, b, i) for i, (a, b) in enumerate(pieces)], lambda a, b, i: kernels["marked_mean_added"](
        ha[64 * a:64 * b], tuple(w[a:b] for w in words), kept, before[i], kind(0.0), kind(len(words)), LOWEST_BIT, out[64 * a:64 * b]))
    return (h if inplace else torch.from_numpy(out)), any(bad)


def sparse_mean_added(h: torch.Tensor, supports: list[torch.Tensor], values: list[torch.Tensor],
                      inplace: bool = False, running: bool = False) -> torch.Tensor | None:
    """h + the mean of sparse payloads (each an ascending int64 support and its values of h's dtype)
    with the bits of ``base.mean_of``'s running sum and torch's h + mean: as a new tensor, in one
    compiled pass over h that adds the payloads' values a block at a time (at d = 1e7 with two
    Top-1% payloads one pass where the dense mean took five: the first dense form, +0 twice, the
    division, the sum with h); or with ``inplace``, for an h that holds no negative zero (the
    caller's word: ``without_negative_zero``), into h on the union of the supports alone
    (``mean_added_on_union``: h_i + 0 is h_i elsewhere), O(n k). For 2..4 payloads (``MEAN_ROWS``),
    and with ``running`` for 5..14 (``ORDERED_MEAN_ROWS``): the running sum in every column, where
    ATen sums the last columns of stacked rows in another order, which the caller puts there
    (``memory.shift_by_mean``). None otherwise, and where ``_sparse_pass`` refuses the vectors."""
    if not (len(supports) in MEAN_ROWS or (running and len(supports) in ORDERED_MEAN_ROWS)):
        return None
    return _sparse_pass(h, supports, values, True, inplace)


SUPPORT_AHEAD = 16  # entries of a support between a prefetch and its addition (8: 0.52 ms, 16-64: 0.47)


def add_on_support(h: torch.Tensor, support: torch.Tensor, values: torch.Tensor) -> bool | None:
    """h_i + v_i written in place at each index i of ``support`` (ascending int64) and nowhere else:
    what EF21's Markov states do with a sparse payload once h holds no negative zero. One compiled
    loop with the bits of torch's ``h.index_copy_(0, support, h.index_select(0, support).add_(values))``;
    at d = 1e7 and k = 1e5 on one thread, 0.47 ms against 1.4 (and 3.9 within a round, with the
    caches cold). Returns whether a sum is -0; None (h unchanged) without Numba, for a short or
    non-CPU h, values of another dtype or length, or a support that is not strictly increasing in
    [0, len(h)) (the torch path then says what is wrong)."""
    kernels = _long_cpu_floats((h,), MIN_COMPILED)
    if (kernels is None or h.dim() != 1 or h.requires_grad or support.device.type != "cpu"
            or support.dtype != torch.int64 or support.dim() != 1 or values.device.type != "cpu"
            or values.dtype != h.dtype or values.shape != support.shape
            or any(_overlap(h, t) for t in (support, values))):  # (torch reads every value before it writes)
        return None
    index = support.contiguous().numpy()
    if not _ascending_within(index, h.numel()):
        return None
    _forget_marks(h)  # written through NumPy: torch's version counter does not move
    return bool(kernels["add_on_support"](h.numpy(), index, values.detach().contiguous().numpy(), SUPPORT_AHEAD))


def _ascending_within(index: np.ndarray, n: int) -> bool:
    """Whether a support's indices are strictly increasing within [0, n)."""
    return not index.size or (index[0] >= 0 and index[-1] < n and bool(np.all(index[1:] > index[:-1])))


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the memory spans of two CPU tensors meet."""
    a0, b0 = a.data_ptr(), b.data_ptr()
    return a0 < b0 + b.numel() * b.element_size() and b0 < a0 + a.numel() * a.element_size()


def sparse_added(h: torch.Tensor, support: torch.Tensor, values: torch.Tensor, inplace: bool = False) -> torch.Tensor | None:
    """h + (a sparse payload's dense form: ``values`` on ``support``, ascending int64, +0 elsewhere)
    in one compiled pass, without that dense form: a new vector, or h itself with ``inplace``; the
    bits of torch's addition. None where ``_sparse_pass`` refuses the vectors."""
    return _sparse_pass(h, [support], [values], False, inplace)


def _sparse_pass(h, supports, values, mean: bool, inplace: bool, rate: float | None = None) -> torch.Tensor | None:
    """``sparse_added``'s kernel over pieces of h in parallel (with ``rate``, the mean's step
    h - rate * mean, marked finite where it is); None where ``_long_cpu_floats`` refuses h, a support
    or its values are not CPU vectors of the same length and the right dtypes, or a support is not
    strictly increasing within [0, len(h)) (the reference path then says what is wrong)."""
    kernels = _long_cpu_floats((h,), MIN_CHUNK) if len(values) == len(supports) else None
    if kernels is None or h.dim() != 1 or any(
            s.device.type != "cpu" or s.dtype != torch.int64 or s.dim() != 1 or v.device.type != "cpu"
            or v.dtype != h.dtype or v.shape != s.shape for s, v in zip(supports, values)):
        return None
    ha = h.detach().numpy()
    index = [s.contiguous().numpy() for s in supports]
    if not all(_ascending_within(i, ha.size) for i in index):
        return None
    kept = [v.detach().contiguous().numpy() for v in values]
    if inplace:
        _forget_marks(h)  # written through NumPy: torch's version counter does not move
    out = ha if inplace else np.empty_like(ha)
    kind = ha.dtype.type
    descend, step = rate is not None, kind(0.0 if rate is None else rate)  # (the step rounded as torch rounds it)

    def piece(a, b):
        cut = [(int(np.searchsorted(i, a)), int(np.searchsorted(i, b))) for i in index]
        cut_index, cut_kept = tuple(i[c:e] for i, (c, e) in zip(index, cut)), tuple(v[c:e] for v, (c, e) in zip(kept, cut))
        if mean and inplace:  # the union of the supports alone (``sparse_mean_added``)
            kernels["mean_added_on_union"](ha[a:b], cut_index, cut_kept, a, kind(0.0), kind(len(index)))
            return False
        return kernels["sparse_added"](ha[a:b], cut_index, cut_kept, a, kind(0.0), kind(len(index)), mean, descend, step, out[a:b])

    bad = _run(ha.size, 1, piece)
    if inplace:
        return h
    return _noting_finite(torch.from_numpy(out), bad) if descend else torch.from_numpy(out)


def sparse_mean_descend(x: torch.Tensor, lr: float, supports: list[torch.Tensor], values: list[torch.Tensor]) -> torch.Tensor | None:
    """x - lr * (the mean of 2..4 sparse payloads: ascending int64 supports, values of x's dtype) as
    a new tensor, with the bits of ``base.mean_of``'s running sum and torch's x - lr * mean, in one
    compiled pass over x that adds the payloads' values a block at a time (EF-SGD's server at
    d = 1e7 with two Top-1% uplinks: one pass where the dense mean and the step took five), marked
    finite where it is. None for a step that is not a Python number, other counts of payloads, and
    where ``_sparse_pass`` refuses the vectors."""
    if not _is_number(lr) or len(supports) not in MEAN_ROWS:
        return None
    return _sparse_pass(x, supports, values, True, False, lr)


def _long_cpu_floats(tensors, least: int = MIN_COMPILED):
    """The kernels, where every tensor is a contiguous CPU float32/float64 tensor of the first one's
    dtype and shape with at least ``least`` coordinates; else None. Small vectors take torch's
    ops, and then, like other tensors, load no compiled code (Numba is not even imported)."""
    x = tensors[0]
    if (x.numel() < least or x.dtype not in (torch.float32, torch.float64)
            or any(t.device.type != "cpu" or t.dtype != x.dtype or t.shape != x.shape or not t.is_contiguous()
                   for t in tensors)):
        return None
    return _kernels()


def descend(x: torch.Tensor, lr: float, g: torch.Tensor) -> torch.Tensor | None:
    """x - lr * g as a new tensor in one pass instead of two (and one new vector instead of two), the
    same bits; None without Numba, for a step size that is not a Python number, and where
    ``_long_cpu_floats`` refuses the tensors."""
    kernels = _long_cpu_floats((x, g), MIN_CHUNK) if _is_number(lr) else None
    if kernels is None:
        return None
    xa, ga = (t.detach().numpy().reshape(-1) for t in (x, g))
    out = np.empty_like(xa)
    rate = xa.dtype.type(lr)  # rounded to the vectors' precision, as torch does
    bad = _run(xa.size, 1, lambda a, b: kernels["descend"](xa[a:b], ga[a:b], rate, out[a:b]))
    return _noting_finite(torch.from_numpy(out).view(x.shape), bad)


def blend(y: torch.Tensor, a: float, x: torch.Tensor, b: float) -> torch.Tensor | None:
    """a * y + b * x as a new tensor in one pass instead of three (a running average's
    (1 - lam) x_bar + lam x), the same bits, marked finite where it is; None without Numba, for
    weights that are not Python numbers, and where ``_long_cpu_floats`` refuses the tensors."""
    kernels = _long_cpu_floats((y, x), MIN_CHUNK) if _is_number(a) and _is_number(b) else None
    if kernels is None:
        return None
    ya, xa = (t.detach().numpy().reshape(-1) for t in (y, x))
    out = np.empty_like(ya)
    kind = ya.dtype.type  # the weights rounded to the vectors' precision, as torch does
    wa, wb = kind(a), kind(b)
    bad = _run(ya.size, 1, lambda i, j: kernels["blend"](ya[i:j], wa, xa[i:j], wb, out[i:j]))
    return _noting_finite(torch.from_numpy(out).view(y.shape), bad)


def mean_descend(x: torch.Tensor, lr: float, rows: list[torch.Tensor],
                 interleaved_from: int | None = None) -> torch.Tensor | None:
    """x - lr * mean(rows) in one pass, with the bits of ``base.mean_of``'s running sum followed by
    x - lr * mean: at d = 1e7 and n = 2 one pass and one new vector instead of five passes and three.
    For 2..4 rows (``MEAN_ROWS``, as ``base.RUNNING_SUM_ROWS``: where the running sum is torch's mean),
    and for 5..14 rows (``ORDERED_MEAN_ROWS``) given ``interleaved_from``, the first of the last
    columns that ATen sums in four partial sums (``row_order.first_interleaved``): torch's mean of the
    stacked rows without the stack. None otherwise, and as ``descend``."""
    if not (len(rows) in MEAN_ROWS or (len(rows) in ORDERED_MEAN_ROWS and interleaved_from is not None)):
        return None
    kernels = _long_cpu_floats((x, *rows)) if _is_number(lr) else None
    if kernels is None:
        return None
    xa = x.detach().numpy().reshape(-1)
    arrays = tuple(r.detach().numpy().reshape(-1) for r in rows)
    kind = xa.dtype.type
    zero, n, rate = kind(0.0), kind(len(rows)), kind(lr)
    out = np.empty_like(xa)
    cut = xa.size if interleaved_from is None else interleaved_from
    bad = _run(xa.size, 1, lambda a, b: kernels["mean_descend"](xa[a:b], tuple(r[a:b] for r in arrays), zero, n, rate,
                                                               cut - a, out[a:b]))
    return _noting_finite(torch.from_numpy(out).view(x.shape), bad)


def warm_descent(dtype: torch.dtype, rows: int) -> None:
    """Load ``descend`` and ``mean_descend`` (for ``rows`` rows, where that applies) for ``dtype`` from
    Numba's disk cache, or compile them, on a few coordinates: the signature does not depend on the
    length, so a run's first step pays nothing."""
    kernels = _kernels() if dtype in (torch.float32, torch.float64) else None
    if kernels is None:
        return
    a = np.zeros(4, dtype=np.float32 if dtype == torch.float32 else np.float64)
    kind = a.dtype.type
    kernels["descend"](a, a, kind(0.0), np.empty_like(a))
    if rows in MEAN_ROWS or rows in ORDERED_MEAN_ROWS:
        kernels["mean_descend"](a, (a,) * rows, kind(0.0), kind(rows), kind(0.0), a.size, np.empty_like(a))


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


AMSGRAD_GROUP = 1 << 16  # coordinates of ``amsgrad_step``'s groups (a multiple of 64)


def amsgrad_step(x, m, v, v_hat, g, beta1: float, beta2: float, lr: float, nu: float):
    """(x, m, v, v_hat) after AMSGrad's lines 13-16 for CPU vectors of one float dtype, as new tensors
    with the bits of the torch expressions in ``amsgrad_state``; None without Numba, for other
    tensors, or below ``MIN_COMPILED`` coordinates. One pass instead of about 14, a group of
    ``AMSGRAD_GROUP`` coordinates at a time: a compiled loop for lines 13-15 and v_hat + nu, torch's
    own square root of that group (its vectorized sqrt is not always the correctly rounded one: 9 in
    524,288 float32 values differ, so only torch.sqrt gives its bits; groups of a multiple of 64
    coordinates give it the same vectors and the same tail as the whole vector), and a compiled loop
    for line 16 while the group's square roots and m are in the cache. Against three passes over the
    whole vector (the square roots as a vector of their own), at d = 1e7, medians of 25 interleaved
    calls: one thread 51.5 / 53.2 -> 44.3 / 47.6 ms, two threads 31.0 / 27.6 -> 29.3 / 25.7."""
    tensors = (x, m, v, v_hat, g)
    kernels = _long_cpu_floats(tensors)
    if kernels is None:
        return None
    xa, ma, va, ha, ga = (t.detach().numpy().reshape(-1) for t in tensors)
    kind = xa.dtype.type  # the scalars rounded to the vectors' precision, as torch does
    b1, c1, b2, c2, rate, eps = (kind(c) for c in (beta1, 1 - beta1, beta2, 1 - beta2, lr, nu))
    m_out, v_out, h_out, x_out = (np.empty_like(xa) for _ in range(4))

    def piece(a, b):  # a group at a time: its square roots and m stay in the cache for the step
        root = np.empty(min(AMSGRAD_GROUP, b - a), dtype=xa.dtype)
        bad = False
        for g in range(a, b, AMSGRAD_GROUP):
            e = min(b, g + AMSGRAD_GROUP)
            r = root[:e - g]
            kernels["amsgrad_moments"](ma[g:e], va[g:e], ha[g:e], ga[g:e], b1, c1, b2, c2, eps,
                                       m_out[g:e], v_out[g:e], h_out[g:e], r)
            torch.sqrt_(torch.from_numpy(r))
            bad |= kernels["amsgrad_apply"](xa[g:e], m_out[g:e], r, rate, x_out[g:e])
        return bad

    bad = _run(xa.size, 64, piece)
    return (_noting_finite(torch.from_numpy(x_out).view(x.shape), bad),
            *(torch.from_numpy(o).view(x.shape) for o in (m_out, v_out, h_out)))


def float64_sum(x: torch.Tensor, p: int, size: int, negative: np.ndarray | None = None,
                minus: torch.Tensor | None = None) -> float | None:
    """The sum of |x_i|^p (p = 1 or 2) of a CPU float32 or float64 vector as ``base.float64_norm``
    adds it: torch's float64 sum of each block of ``size`` coordinates, the blocks one after another;
    the same bits, in one pass over x without float64 copies, and the blocks in parallel threads.
    None without Numba, for other vectors, or where torch's sum adds in another order than this
    kernel (checked once, by ``_lanes``). ``negative``, ``minus``: see ``float64_block_sums``."""
    sums = float64_block_sums(x, p, size, negative, minus)
    if sums is None:
        return None
    total = 0.0
    for s in sums.tolist():
        total += s
    return total


def float64_block_sums(x: torch.Tensor, p: int, size: int, negative: np.ndarray | None = None,
                       minus: torch.Tensor | None = None) -> np.ndarray | None:
    """The float64 sums of |x_i|^p (p = 1 or 2) over the consecutive blocks of ``size`` coordinates,
    each the bits of torch's float64 sum of that block (``block_sums``); None where ``float64_sum``
    is. With ``negative`` (a bool array of x's length), x < 0 is written into it in the same sweep:
    each group of ``FLAG_GROUP`` blocks is summed and then flagged while it is still in the cache,
    instead of a second pass over all of x from memory. At d = 1e7 on 2 cores with a cold cache that
    took 0.4 ms off sign's compress + encode (9.5 ms), in medians of 25 interleaved calls.

    With ``minus`` (a CPU vector of x's dtype and length), all of this is of x - minus, which is
    never formed whole: each group of blocks is subtracted into a buffer that stays in the cache
    (the bits of torch's x - minus) and summed and flagged there. A Markov message C(target - h)
    with the scaled sign (``Sign.compress_difference``) then reads target and h once and writes only
    the flags, instead of writing the difference and reading it back."""
    kernels = _kernels()
    if (kernels is None or x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64)
            or _lanes() is None or (minus is not None and (minus.device.type != "cpu" or minus.dtype != x.dtype
                                                              or minus.numel() != x.numel()))):
        return None
    flat = x.detach().contiguous().numpy().reshape(-1)
    other = None if minus is None else minus.detach().contiguous().numpy().reshape(-1)
    sums = np.empty(-(-flat.size // size))
    grouped = negative is not None or other is not None  # else the piece is one group
    group = size * (FLAG_GROUP if grouped else max(1, -(-flat.size // size)))  # never 0

    def piece(a, b):  # a is a multiple of size: block a / size starts the piece
        buffer = None if other is None else np.empty(min(group, b - a), dtype=flat.dtype)
        for g in range(a, b, group):
            e = min(b, g + group)
            values = flat[g:e] if other is None else subtract(flat[g:e], other[g:e], buffer[:e - g])
            kernels["block_sums"](values, size, _lanes(), p == 2, sums[g // size:-(-e // size)])
            if negative is not None:
                kernels["below_zero"](values, negative[g:e])

    _run(flat.size, size, piece)
    return sums


FLAG_GROUP = 8  # blocks summed, then flagged, at a time: 1 MiB of float32, within a core's L2


@functools.lru_cache(maxsize=None)
def _lanes() -> int | None:
    """The float64 lanes of torch's CPU sum: 4 (AVX2's vector of doubles) or 8 (AVX-512's), whichever
    makes ``block_sums`` give torch's sum bit for bit (``_sums_like_torch``), the CPU capability's
    own width tried first; None where neither does (then ``float64_sum`` leaves the norm to torch).
    Found by trying, not from the capability alone: torch 2.13 reports "AVX512" on a CPU with
    AVX-512 and still adds a float64 sum in the 4-lane order."""
    widths = (8, 4) if torch.backends.cpu.get_cpu_capability() == "AVX512" else (4, 8)
    return next((lanes for lanes in widths if _sums_like_torch(lanes=lanes)), None)


def _sums_like_torch(lengths: tuple[int, ...] = (1 << 15, 4099, 1031, 523, 263, 61, 37, 19), lanes: int | None = None) -> bool:
    """Whether ``block_sums`` with ``lanes`` (default: ``_lanes()``) gives torch's float64 sum bit for
    bit on vectors of these lengths (every kind of remainder). float64 values of full precision round
    at almost every addition, so another order of the additions shows in the last bits (float32
    squares and a few binades add exactly too often); a float32 input only adds its exact conversion."""
    lanes = _lanes() if lanes is None else lanes
    if lanes is None:
        return False
    gen = torch.Generator().manual_seed(0)
    for n in lengths:
        x = torch.randn(n, generator=gen, dtype=torch.float64) * torch.exp2(torch.randint(-8, 9, (n,), generator=gen))
        for square in (True, False):
            got = np.empty(1)
            _kernels()["block_sums"](x.numpy(), n, lanes, square, got)
            if got[0] != float((x.square() if square else x.abs()).sum()):
                return False
    return True


def keyed_range(start: int, size: int, dim: int, low: int, a_size: int, tables, rotation: int,
                dtype: torch.dtype) -> torch.Tensor | None:
    """``indices.keyed_permutation`` of the positions start, ..., start + size - 1 as a CPU tensor of
    ``dtype``, computed position by position in one compiled pass (the pieces in parallel threads)
    from the network's round tables; None without Numba or for another number of rounds. The torch
    version makes about twenty passes over the positions, four of them gathers."""
    kernels = _kernels()
    if kernels is None or len(tables) != 4:
        return None
    out = torch.empty(size, dtype=dtype)
    flat = out.numpy()
    arrays = [t.contiguous().numpy() for t in tables]

    def piece(a, b):
        kernels["feistel"](start + a, low, a_size, *arrays, dim, rotation, flat[a:b])

    _run(size, 1, piece)
    return out


DE_BRUIJN = 0x03F79D71B4CB0A89  # a de Bruijn sequence B(2, 6): the top 6 bits of DE_BRUIJN << i are distinct
LOWEST_BIT = np.zeros(64, dtype=np.int64)
LOWEST_BIT[[((DE_BRUIJN << i) & 0xFFFFFFFFFFFFFFFF) >> 58 for i in range(64)]] = np.arange(64)


def sorted_distinct(values: torch.Tensor, dim: int) -> torch.Tensor | None:
    """Distinct CPU integers in [0, dim) in increasing order as int64 through a bitmap of dim bits
    (``ascending``); None without Numba, on another device, or where two values are equal."""
    kernels = _kernels()
    if kernels is None or values.device.type != "cpu":
        return None
    out = np.empty(values.numel(), dtype=np.int64)
    words = np.zeros((dim + 63) // 64, dtype=np.uint64)
    count = kernels["ascending"](values.contiguous().numpy().reshape(-1), words, out, LOWEST_BIT)
    return torch.from_numpy(out) if count == out.size else None


def keyed_subsets(counts: np.ndarray, key: int, dim: int, chunk_bits: int, marked: bool = False) -> np.ndarray | None:
    """Rand-K's support from its chunks' counts (``keyed_subsets``, ``indices.randk_support``): int64,
    increasing; or, ``marked``, as a bitmap of ``dim`` bits (uint64 words, bit j of word w for
    coordinate 64 w + j, as ``marked`` writes them; chunk_bits >= 6). The chunks run in parallel
    pieces of whole chunks (``_run``), each piece with its own bitmap; every chunk's subset depends
    only on the key and the chunk, so the result does not depend on the number of threads. None
    without Numba."""
    if not (6 if marked else 0) <= chunk_bits <= 16:  # a chunk's draws are 16-bit fields; a bitmap's chunks are whole words
        raise ValueError(f"keyed_subsets: chunks of 2^{chunk_bits} coordinates")
    kernels = _kernels()
    if kernels is None:
        return None
    counts = np.ascontiguousarray(counts, dtype=np.int64)
    starts = np.zeros(counts.size, dtype=np.int64)
    np.cumsum(counts[:-1], out=starts[1:])
    out = np.empty(0 if marked else int(counts.sum()), dtype=np.int64)
    words_out = np.zeros((dim + 63) // 64 if marked else 0, dtype=np.uint64)
    size = 1 << chunk_bits

    def piece(a, b):
        words = np.empty(max(size >> 6, 1), dtype=np.uint64)
        kernels["keyed_subsets"](counts, starts, np.uint64(key), dim, chunk_bits, a >> chunk_bits, -(-b >> chunk_bits),
                                 words, LOWEST_BIT, out, words_out)

    _run(dim, size, piece)
    return words_out if marked else out


MARKED_DTYPES = (torch.float32, torch.float64)  # what ``gather_marked`` and ``scatter_marked`` read and write


# For 64 fields of w bits (2..7) packed 8 to a 64-bit word in its low w bytes: the byte positions
# that put the 8 words' w low bytes side by side (``kernel_parts.pack64``'s permutation)
PACK_INDEX = {w: np.array([(k // w) * 8 + k % w if k < 8 * w else 0 for k in range(64)], dtype=np.uint8)
              for w in range(2, 8)}
# and the inverse: byte b < w of group g from byte g w + b, the others from byte 63 (beyond the
# 8 w bytes that ``kernel_parts.unpack64`` loads, so 0)
SPREAD_INDEX = {w: np.array([(k // 8) * w + k % 8 if k % 8 < w else 63 for k in range(64)], dtype=np.uint8)
                for w in range(2, 8)}


def _host_features() -> dict | None:
    """LLVM's features of this host, where Numba compiles for it (no ``NUMBA_CPU_NAME``); else None."""
    try:
        import numba
        from llvmlite import binding
    except ImportError:
        return None
    return binding.get_host_cpu_features() if numba.config.CPU_NAME is None else None


@functools.lru_cache(maxsize=None)
def vector_pack() -> bool:
    """Whether the kernels can pack 64 fields at a time in vector registers (``pack_vectors``): the
    byte permutation of AVX-512 VBMI compiled for this host."""
    features = _host_features() or {}
    return all(features.get(f, False) for f in ("avx512f", "avx512bw", "avx512vbmi"))


@functools.lru_cache(maxsize=None)
def vector_compress() -> bool:
    """Whether the kernels are compiled for AVX-512 (this host has it, and Numba targets the host),
    whose vector compression moves a marked block's values and Top-K's candidates 16 coordinates at
    a time (``kernel_parts.compress_scaled``, ``compress_found``) and whose two-source permutation
    reads the base-3 tables' windows (``quantize_pairs32_windowed``); elsewhere the compiler would
    store lane by lane, and the kernels scan the set bits or flags one by one and gather instead."""
    return bool((_host_features() or {}).get("avx512f", False))


def marked(values: torch.Tensor, dim: int) -> np.ndarray | None:
    """A bitmap of ``dim`` bits (uint64 words, bit v of word v >> 6) with the bits of the distinct CPU
    integers ``values`` in [0, dim) set: a support in increasing order without sorting it, for
    ``gather_marked`` and ``scatter_marked``. None without Numba, on another device, or where two
    values are equal (fewer bits are set than there are values)."""
    kernels = _kernels()
    if kernels is None or values.device.type != "cpu":
        return None
    flat = values.contiguous().numpy().reshape(-1)
    # threads that set bits in one bitmap would race on its words: each marks a share of the values
    # in a bitmap of its own, and the bitmaps are merged by OR (a collision there is a repeated value)
    parts = max(1, min(_threads(), flat.size // MIN_CHUNK))
    bounds = [(flat.size * i // parts, flat.size * (i + 1) // parts) for i in range(parts)]
    maps = [np.zeros((dim + 63) // 64, dtype=np.uint64) for _ in bounds]
    _run_pieces([(a, b, m) for (a, b), m in zip(bounds, maps)], lambda a, b, m: kernels["mark"](flat[a:b], m))
    words = maps[0]
    for other in maps[1:]:
        np.bitwise_or(words, other, out=words)
    return words if kernels["count_marked"](words) == values.numel() else None


def _rows_marked(first_rows: np.ndarray, end_rows: np.ndarray, dim: int, low: int, a_size: int, tables) -> np.ndarray | None:
    """Row k: the bitmap, in the order of the values before the keyed rotation, of the coordinates
    whose preimage lies in the full rows first_rows[k], ..., end_rows[k] - 1 (``mark_rows_banded``,
    the bands shared among the threads). None without Numba, for another number of rounds, for
    int64 tables (a domain of 2^31 values or more) or rows of fewer than 64 values."""
    kernels = _kernels()
    if kernels is None or len(tables) != 4 or tables[1].dtype != torch.int32 or low < 6:
        return None
    before = np.empty((first_rows.size, (dim + 63) // 64), dtype=np.uint64)
    arrays = [t.contiguous().numpy() for t in tables[1:]]
    firsts, ends = first_rows.astype(np.int64), end_rows.astype(np.int64)
    band = a_size * 64  # values of a band
    _run(((1 << low) >> 6) * band, band, lambda a, b: kernels["mark_rows_banded"](
        a // band, -(-b // band), firsts, ends, low, a_size, *arrays, dim, before))
    return before


def marked_blocks(first_rows: np.ndarray, end_rows: np.ndarray, dim: int, low: int, a_size: int, tables) -> np.ndarray | None:
    """``marked_rows`` for several blocks of rows at once, before the rotation: row k of the result
    is the bitmap, in the order of the values before the keyed rotation, of the coordinates whose
    preimage lies in the full rows first_rows[k], ..., end_rows[k] - 1 (``_rows_marked``: a pass over
    d for each block, in one call); ``rotate_marked`` then moves each to the coordinates. The caller marks the positions of partial rows and those whose first pass leaves
    [0, d) (``indices.marked_blocks``). None where ``_rows_marked`` does not apply."""
    return _rows_marked(first_rows, end_rows, dim, low, a_size, tables)


def rotate_marked(before: np.ndarray, dim: int, rotation: int) -> np.ndarray:
    """Each row of ``before`` (bitmaps in the order before the keyed rotation) rotated to the
    coordinates: bit u of a result row is bit (u - rotation) mod dim of its source row."""
    kernels = _kernels()
    words = np.empty_like(before)
    for k in range(before.shape[0]):
        _run(dim, 64, lambda a, b, k=k: kernels["rotated_bits"](before[k], dim, rotation, a // 64, -(-b // 64), words[k]))
    return words


def marked_rows(first_row: int, end_row: int, dim: int, low: int, a_size: int, tables, rotation: int) -> np.ndarray | None:
    """The bitmap of ``indices.keyed_permutation``'s image of the full rows first_row, ...,
    end_row - 1 of its Feistel domain (positions row 2^low + r), found from the other side: each of
    the d coordinates is mapped back through the network (``_rows_marked``) and kept if it lands in
    those rows. A coordinate whose preimage needed a cycle walk maps back to a value of at least d,
    in no full row, so the images of the positions whose first pass through the network left
    [0, d) are missing: the caller marks them (``indices.marked_from_the_image``). The values are
    taken in their order before the keyed rotation, and the bitmap rotated after
    (``rotated_bits``). None where ``_rows_marked`` does not apply."""
    before = _rows_marked(np.array([first_row]), np.array([end_row]), dim, low, a_size, tables)
    return None if before is None else rotate_marked(before, dim, rotation)[0]


def mark_rest(words: np.ndarray, blocks, full, dim: int, low: int, a_size: int, tables, rotation: int) -> None:
    """Sets in ``words[k]`` the images of the positions of block k = (start, size) of ``blocks`` that
    the full rows ``full[k]`` = (lo, hi) of ``_rows_marked`` leave out (``mark_rest``: the partial
    rows, and the positions whose first pass through the network leaves [0, dim)); one thread."""
    starts, sizes = (np.array(column, dtype=np.int64) for column in zip(*blocks))
    lows, highs = (np.array(column, dtype=np.int64) for column in zip(*full))
    arrays = [t.contiguous().numpy() for t in tables]
    _kernels()["mark_rest"](starts, starts + sizes, lows, highs, dim, low, a_size, *arrays, rotation, words)


def count_marked(words: np.ndarray) -> int:
    """The number of set bits of a bitmap."""
    return int(_kernels()["count_marked"](words))


def _marked_pieces(words: np.ndarray, dim: int):
    """The pieces of ``_chunks(dim, 64)`` as (first word, last word + 1, set bits before the piece)."""
    kernels = _kernels()
    pieces = [(a // 64, -(-b // 64)) for a, b in _chunks(dim, 64)]
    counts = [int(kernels["count_marked"](words[a:b])) for a, b in pieces]
    return [(a, b, int(c)) for (a, b), c in zip(pieces, np.cumsum([0] + counts[:-1]))]


def gather_marked(x: torch.Tensor, words: np.ndarray, count: int, scale: float,
                  minus: torch.Tensor | None = None) -> tuple[torch.Tensor, bool] | None:
    """(x.index_select(0, support) * scale, whether every x_i * scale is finite: then every x_i is,
    and the values are marked finite, ``known_finite``, which spares the encoder its pass over them:
    0.7 ms for Perm-K's 5e6 values at d = 1e7, n = 2) for the support of the bitmap ``words``
    (``marked``, ``count`` bits set), in one pass over x and the bitmap (the pieces in parallel
    threads), the values with the same bits; with ``minus``, of x - minus without forming it (the
    kernel reads both). Where it says False, x itself may still be finite (a product overflowed):
    the caller checks x, and the values are checked where they are encoded. None without Numba, for other than a CPU float32/float64 vector of
    64 ``words.size`` coordinates or fewer, or for a ``minus`` of another dtype, length or device."""
    kernels = _kernels()
    if (kernels is None or x.device.type != "cpu" or x.dtype not in MARKED_DTYPES
            or x.dim() != 1 or x.numel() > 64 * words.size):
        return None
    if minus is not None and (minus.device != x.device or minus.dtype != x.dtype or minus.shape != x.shape):
        return None
    flat = x.detach().contiguous().numpy()
    less = None if minus is None else minus.detach().contiguous().numpy()
    out = np.empty(count, dtype=flat.dtype)
    factor = flat.dtype.type(scale)  # rounded to x's precision, as torch does with a Python scalar
    bad = _run_pieces(_marked_pieces(words, flat.size),
                      lambda a, b, c: kernels["gather_marked"](words[a:b], a, flat, less, factor, vector_compress(), LOWEST_BIT, out[c:]))
    return _noting_finite(torch.from_numpy(out), bad), not any(bad)


def scatter_marked(words: np.ndarray, values: torch.Tensor, dim: int, h: torch.Tensor | None = None,
                   inplace: bool = False) -> torch.Tensor | None:
    """The dense vector of ``dim`` coordinates holding ``values`` on the support of the bitmap ``words``
    (in increasing order) and 0 elsewhere, or with ``h``, h + that dense vector (h_i + 0 off the
    support; into h itself with ``inplace``), written in one pass (the pieces in parallel threads) with
    the bits of torch's zeros, ``index_copy_`` and addition; None without Numba or for other than CPU
    float32/float64 vectors of one dtype (h contiguous)."""
    kernels = _kernels()
    tensors = (values,) if h is None else (values, h)
    if (kernels is None or values.dtype not in MARKED_DTYPES
            or any(t.device.type != "cpu" or t.dtype != values.dtype or t.dim() != 1 for t in tensors)
            or (h is not None and (h.numel() != dim or not h.is_contiguous()))):
        return None
    kept = values.detach().contiguous().numpy()
    base = h.detach().numpy() if h is not None else None
    out = base if inplace and base is not None else np.empty(dim, dtype=kept.dtype)
    if inplace and h is not None:
        _forget_marks(h)  # written through NumPy: torch's version counter does not move
    base = out if base is None else base
    _run_pieces(_marked_pieces(words, dim), lambda a, b, c: kernels["scatter_marked"](
        words[a:b], kept[c:], base[64 * a:64 * b], h is not None, vector_compress(), LOWEST_BIT, out[64 * a:64 * b]))
    return h if inplace and h is not None else torch.from_numpy(out)


def _run_pieces(pieces, fn) -> list:
    """``fn(*piece)`` for each piece, in parallel threads where there are several; the results in order.
    The calling thread takes pieces too, beside one fewer pool thread than torch's thread count, each
    taking the next piece as it comes free (a shared counter): one pool thread woken a call instead
    of one task handed over a piece (on 2 threads, 8 pieces that do nothing: about 100 us a call
    through the pool's map, against 20-30 this way). An exception from a piece is raised once every
    thread has stopped taking pieces."""
    if len(pieces) == 1:
        return [fn(*pieces[0])]
    results = [None] * len(pieces)
    taken = itertools.count()  # (its next() holds the GIL: each piece is taken once)

    def take() -> None:
        for i in iter(taken.__next__, None):
            if i >= len(pieces):
                return
            results[i] = fn(*pieces[i])

    helpers = [_pool().submit(take) for _ in range(min(_threads(), len(pieces)) - 1)]
    try:
        take()
    finally:
        errors = [helper.exception() for helper in helpers]  # (waits for each)
    for error in errors:
        if error is not None:
            raise error
    return results


def gap_quotient_sums(idx: torch.Tensor, shifts: list[int]) -> list[int] | None:
    """For sorted CPU int64 indices: the sums of their gaps >> r for each r in ``shifts`` (the unary
    lengths of ``common.wire.indexcode``'s Rice candidates) in one pass; None without Numba, on
    another device, or where the indices are not strictly increasing."""
    kernels = _kernels()
    if kernels is None or idx.device.type != "cpu":
        return None
    sums = np.zeros(len(shifts), dtype=np.int64)
    if not kernels["gap_quotient_sums"](idx.contiguous().numpy(), np.array(shifts, dtype=np.int64), sums):
        return None
    return [int(v) for v in sums]


def rice_frame(idx: torch.Tensor, r: int, remainder_bytes: int, unary_bytes: int) -> torch.Tensor | None:
    """The Rice frame of strictly increasing CPU int64 indices with parameter ``r`` (the remainders'
    section of ``remainder_bytes``, then the unary section of ``unary_bytes``); None without Numba."""
    kernels = _kernels()
    if kernels is None or idx.device.type != "cpu":
        return None
    out = np.zeros(remainder_bytes + unary_bytes, dtype=np.uint8)
    kernels["rice_write"](idx.contiguous().numpy(), int(r), out, remainder_bytes)
    return torch.from_numpy(out)


def bitmap_frame(idx: torch.Tensor, dim: int) -> torch.Tensor | None:
    """d bits, bit i set for each of the CPU int64 indices in [0, dim); None without Numba."""
    kernels = _kernels()
    if kernels is None or idx.device.type != "cpu":
        return None
    out = np.zeros((dim + 7) // 8, dtype=np.uint8)
    kernels["bitmap_write"](idx.contiguous().numpy(), out)
    return torch.from_numpy(out)


def rice_indices(data: np.ndarray, rem_bytes: int, k: int, r: int, dim: int) -> tuple[int, int, torch.Tensor] | None:
    """(status, value, indices) of ``rice_read`` for a Rice frame whose sizes and padding the caller
    has checked; None without Numba."""
    kernels = _kernels()
    if kernels is None:
        return None
    out = np.empty(k, dtype=np.int64)
    status, value = kernels["rice_read"](data, int(rem_bytes), int(k), int(r), int(dim), out, LOWEST_BIT)
    return int(status), int(value), torch.from_numpy(out)


def kth_largest(mag: torch.Tensor, k: int) -> torch.Tensor | None:
    """The k-th largest (1 <= k <= mag.size) of a CPU float32/float64 vector of magnitudes (>= 0, or
    NaN, which counts as the largest, as in NumPy's order) as a 0-d tensor, exactly, by a radix
    selection over their bits (``kth_largest_bits``: non-negative floats order as their bits); None
    without Numba or for other tensors."""
    kernels = _kernels()
    if kernels is None or mag.device.type != "cpu" or mag.dtype not in (torch.float32, torch.float64):
        return None
    values = mag.contiguous().numpy().reshape(-1)
    unsigned, total, digit = (np.uint32, 32, 11) if values.dtype == np.float32 else (np.uint64, 64, 16)
    found = kernels["kth_largest_bits"](values.view(unsigned), int(k), total, digit)
    return torch.from_numpy(np.array(found, dtype=unsigned).view(values.dtype)).reshape(())


def pick_top(mag: torch.Tensor, threshold: torch.Tensor, k: int) -> torch.Tensor | None:
    """Top-K's rule given the k-th largest value ``threshold`` of a CPU float32/float64 ``mag``: the
    positions of the values above it and of the first ties, in order, in two compiled passes; None
    without Numba or for other tensors."""
    kernels = _kernels()
    if kernels is None or mag.device.type != "cpu" or mag.dtype not in (torch.float32, torch.float64):
        return None
    values = mag.contiguous().numpy()
    out = np.empty(values.size, dtype=np.int64)
    count = kernels["pick_top"](values, values.dtype.type(threshold), int(k), out)
    return torch.from_numpy(out[:count])


def subtract(a: np.ndarray, b: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """a - b (into ``out``), the bits of torch's a - b, without NumPy's warning for an inf or NaN
    that it makes: the callers' passes report those as torch's would (a NaN norm, a flag)."""
    with np.errstate(over="ignore", invalid="ignore"):
        return np.subtract(a, b, out=out)


DIFFERENCE_GROUP = 1 << 18  # coordinates of x - minus formed at a time: 1 MiB of float32, within a core's L2


def _at_least_of_difference(kernels, flat, other, a, b, level, largest, out, values):
    """``indices_at_least``'s piece [a, b) of flat - other: with AVX-512 the difference formed in
    registers by the candidate pass itself; elsewhere a group at a time in a buffer, each group's
    candidates appended to ``out`` and ``values`` (grown and the group run again when they lack
    room)."""
    vector = vector_compress()
    if vector:  # the difference formed in registers, 16 coordinates at a time
        parts = [(a, flat[a:b], other[a:b])]
    else:  # a group at a time, in a buffer that stays in the cache
        buffer = np.empty(min(DIFFERENCE_GROUP, b - a), dtype=flat.dtype)
        parts = ((g, subtract(flat[g:e], other[g:e], buffer[:e - g]), None)
                 for g, e in ((g, min(b, g + DIFFERENCE_GROUP)) for g in range(a, b, DIFFERENCE_GROUP)))
    count, bad = 0, False
    for g, x, minus in parts:
        found, group_bad = kernels["at_least"](x, minus, level, largest, g, vector, out[count:], values[count:])
        if found > out.size - count:
            size = max(2 * out.size, count + found)
            out, values = np.resize(out, size), np.resize(values, size)
            kernels["at_least"](x, minus, level, largest, g, vector, out[count:], values[count:])
        count += found
        bad = bad or bool(group_bad)
    return out[:count], values[:count], not bad


def indices_at_least(x: torch.Tensor, level: float, expect: int,
                     minus: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, bool] | None:
    """(ascending int64 indices of the |x_i| >= ``level``, those x_i, whether every x_i is finite) for
    a CPU float vector, in one pass (the pieces in parallel threads); ``expect``: about how many there
    are, to size the output (a piece that finds more runs again with room for all). None without
    Numba or for other vectors. With ``minus`` (a vector of x's dtype and length) all of this is of
    x - minus, formed a group of ``DIFFERENCE_GROUP`` coordinates at a time in a buffer that stays in
    the cache (the bits of torch's x - minus), never whole (``TopK.compress_difference``)."""
    kernels = _kernels()
    if (kernels is None or x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64)
            or (minus is not None and (minus.device.type != "cpu" or minus.dtype != x.dtype or minus.numel() != x.numel()))):
        return None
    flat = x.detach().contiguous().numpy().reshape(-1)
    other = None if minus is None else minus.detach().contiguous().numpy().reshape(-1)
    level = flat.dtype.type(level)  # compared in x's precision, as torch compares with a 0-d tensor of x's dtype
    largest = np.finfo(flat.dtype).max

    def piece(a, b):
        room = min(b - a, 2 * expect * (b - a) // max(flat.size, 1) + 1024)
        out, values = np.empty(room, dtype=np.int64), np.empty(room, dtype=flat.dtype)
        if other is not None:
            return _at_least_of_difference(kernels, flat, other, a, b, level, largest, out, values)
        count, bad = kernels["at_least"](flat[a:b], None, level, largest, a, vector_compress(), out, values)
        if count > out.size:
            out, values = np.empty(count, dtype=np.int64), np.empty(count, dtype=flat.dtype)
            kernels["at_least"](flat[a:b], None, level, largest, a, vector_compress(), out, values)
        return out[:count], values[:count], not bad

    parts = _run(flat.size, 1, piece)
    if len(parts) == 1:
        indices, values = parts[0][0], parts[0][1]
    else:
        indices, values = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    return torch.from_numpy(indices), torch.from_numpy(values), all(p[2] for p in parts)
