"""Supports that both ends of a link regenerate from a key instead of sending them.

Rand-K (Beznosikov et al. eq. 8) draws k of d coordinates uniformly without replacement. Perm-K
(Gruntkowska et al. Def. 4.1, and spec/marina-p-m3.md section 1 for n not dividing d and for d < n)
gives worker i block i of one random permutation shared by all workers at a step.

Both ends must get the same indices bit for bit, also when one is a CPU server and the other a CUDA
worker. Two constructions guarantee it:

* Rand-K (``randk_support``): NumPy's PCG64 keyed by the rule's 64-bit code splits the k
  coordinates over chunks of 2^16, and counter-based SplitMix64 draws keyed by the code and the
  chunk pick each chunk's, in compiled passes on the host; Perm-K for d <= ``PERMK_HOST_MAX_DIM`` or
  d < n: a PCG64 permutation on the host. Only the (small) index array is copied to the tensor's
  device. The last few results are cached: a server that compresses n Perm-K messages at one step
  draws the permutation once.
* Perm-K for d > ``PERMK_HOST_MAX_DIM`` (and d >= n): the permutation is a keyed bijection of [0, d)
  (``keyed_permutation``: a Feistel network with keyed round tables and cycle walking, then a keyed
  rotation), evaluated pointwise in integer torch arithmetic on the tensor's device (on the CPU
  for d >= ``cpu_kernels.MIN_CHUNK``, the same arithmetic in one compiled pass). Integer arithmetic
  without overflow gives the same result on every device, and worker i evaluates it only at the d/n positions of its
  own block: O(d/n) work instead of a host permutation of all d coordinates (O(d), serial, and
  slow for d = 1e7). The assignment of blocks to workers is a PCG64 permutation of the n workers.
"""
from __future__ import annotations

import collections
import contextlib
import contextvars
import functools
import threading

import numpy as np
import torch

from common.compressors import cpu_kernels
from common.compressors.draws import splitmix64
from common.keys import MASK64, mix, numpy_rng

PERMK_HOST_MAX_DIM = 1 << 16  # Perm-K of larger d uses the keyed bijection (``keyed_permutation``)
FEISTEL_ROUNDS = 4
# A block asked for alone is marked from the image side (``marked_from_the_image``, a pass over d) for
# up to this many workers, above from its d / n positions (``keyed_block``, about 4 ns a position on
# 2 cores at d = 1e7). On 2 cores, the image side against the positions, ms: d = 1e7, n = 3 / 6 / 8 /
# 16: 1.8 / 1.9 / 1.9 / 2.0 against 7.3 / 3.8 / 2.9 / 1.7; d = 1e6, n = 3 / 6 / 8: 0.53 / 0.65 /
# 0.54 against 1.30 / 0.74 / 0.51; d = 2^18, n = 3 / 6: 0.30 / 0.30 against 0.35 / 0.19.
IMAGE_SIDE_MAX_N = 6
# Up to this many workers, a second block of one step asked for marks every block at once
# (``marked_blocks``: a server's; the blocks share one pass's overheads, each its own bands, so the
# pass costs about d n: at d = 1e7 on 2 cores 1.7-1.9 ms a block for n = 3 to 16, against 1.7-7.3
# for a block's positions)
BLOCKS_AT_ONCE_MAX_N = 8
_MASK32 = (1 << 32) - 1


def regenerate(rule) -> np.ndarray:
    if rule.kind == "randk":
        return randk_support(rule.dim, rule.count, rule.key)
    if rule.kind == "permk":
        return permk_support(rule.dim, rule.count, rule.worker, rule.key)
    raise ValueError(f"unknown index rule {rule.kind!r}")


def support_on(rule, device) -> torch.Tensor:
    """The rule's sorted support as a private int64 tensor on ``device`` (computed there when the
    construction allows it, so that no index array crosses from the host)."""
    if rule.kind == "permk" and _permk_on_device(rule.dim, rule.count):
        return permk_support_tensor(rule.dim, rule.count, rule.worker, rule.key, torch.device(device))
    return support_tensor(regenerate(rule), device)


def _frozen(a: np.ndarray) -> np.ndarray:
    """Cached results are shared: they are read-only, and ``support_tensor`` copies them."""
    a.setflags(write=False)
    return a


def support_tensor(indices: np.ndarray, device) -> torch.Tensor:
    """A private int64 tensor copy of a (cached, read-only) support on ``device``."""
    return torch.tensor(indices, dtype=torch.int64, device=device)


RANDK_CHUNK_BITS = 16  # Rand-K draws its supports in chunks of 2^16 coordinates (``randk_support``)
# The largest d of a Rand-K support: ``chunk_counts``'s first split gives each side up to 2^29
# coordinates, and NumPy's hypergeometric takes fewer than 1e9 on each side (no split of d > 2e9 does)
RANDK_MAX_DIM = 1 << 30
RANDK_MARKED_RATIO = 16  # Rand-K supports of at least d / 16 coordinates are read as bitmaps (``marked_support``)
SUPPORTS_KEPT = 64  # the most Rand-K supports ``randk_support`` (and ``randk_marked``, apart) keeps for reuse
# and the most bytes they hold together (the oldest go first; the newest stays, whatever its size):
# one step of an M3 server with Rand-K of k = d / n holds n supports, 8 d bytes (80 MB at d = 1e7)
SUPPORT_BYTES_KEPT = 256 << 20


def _recent_supports(draw):
    """``draw``'s last results (read-only arrays), reused for the same arguments: at most
    ``SUPPORTS_KEPT`` of them and ``SUPPORT_BYTES_KEPT`` bytes. A cache of 64 entries whatever their
    size held 1.28 GB in every process of an M3 run at d = 1e7 and n = 4 once it had drawn 64
    supports of 20 MB (each worker's own at each step, the server's four a step), and each new
    support's pages were fresh memory. Threads of an in-process run share it (a lock around the
    table; two threads may both draw one missing support, and the second result is kept)."""
    kept: collections.OrderedDict = collections.OrderedDict()
    lock = threading.Lock()

    @functools.wraps(draw)
    def recent(*args):
        with lock:
            found = kept.get(args)
            if found is not None:
                kept.move_to_end(args)
                return found
        result = draw(*args)
        with lock:
            kept[args] = result
            kept.move_to_end(args)
            held = sum(a.nbytes for a in kept.values())
            while len(kept) > 1 and (len(kept) > SUPPORTS_KEPT or held > SUPPORT_BYTES_KEPT):
                held -= kept.popitem(last=False)[1].nbytes
        return result

    recent.kept = kept
    return recent


@_recent_supports
def randk_support(dim: int, k: int, key: int) -> np.ndarray:
    """Sorted k-subset of range(dim), uniform over all k-subsets, drawn from ``key`` in chunks of
    2^``RANDK_CHUNK_BITS`` coordinates:

    1. How many of the k fall in each chunk (``chunk_counts``): the counts of a uniform k-subset,
       drawn exactly by NumPy's hypergeometric draws from the PCG64 generator keyed by ``key``.
    2. Which ones (``cpu_kernels.keyed_subsets``, or ``_chunk_subset`` without Numba, with the same
       result): a uniform subset of that count in each chunk, from counter-based draws keyed by
       (``key``, chunk), independent of every other chunk.

    Given its count a chunk's subset is uniform and independent of the others, and the counts are
    those of a uniform k-subset, so the union is one (every coordinate kept with probability k/d,
    as Rand-K's omega = d/k - 1 needs). Each chunk's draws set bits of a bitmap that stays in the L1
    cache and the chunks run in parallel, so nothing waits on memory: at d = 1e7, k = d / 4 (M3's
    uplink with 4 workers, which its server regenerates for every worker at every step) a support
    takes a few milliseconds; NumPy's ``Generator.choice``, which shuffles the tail of an arange of
    d (a cache miss a swap), took 110-180 ms. For d up to ``RANDK_MAX_DIM``.

    Both ends must draw the same counts: NumPy's hypergeometric for samples above 10 is a rejection
    method in floating point (log, sqrt, its own log-gamma), so two ends agree where they run the
    same NumPy release (as NumPy's ``choice`` required too: its algorithms may change between
    releases) on libraries that round log and sqrt alike; the chunks' own draws are integers."""
    if k == dim:
        return _frozen(np.arange(dim, dtype=np.int64))
    counts = _randk_counts(dim, k, key)
    drawn = cpu_kernels.keyed_subsets(counts, key, dim, RANDK_CHUNK_BITS)
    if drawn is None:
        drawn = np.concatenate([_chunk_subset(c, int(n), key, dim, RANDK_CHUNK_BITS) for c, n in enumerate(counts)])
    return _frozen(drawn)


@_recent_supports
def randk_marked(dim: int, k: int, key: int) -> np.ndarray | None:
    """``randk_support(dim, k, key)`` as a bitmap of dim bits (``cpu_kernels.keyed_subsets``: each
    chunk's bits written where they were drawn, nothing sorted or extracted), for the compiled
    gather and scatter; None without Numba."""
    words = cpu_kernels.keyed_subsets(_randk_counts(dim, k, key), key, dim, RANDK_CHUNK_BITS, marked=True)
    return None if words is None else _frozen(words)


def check_randk_dim(dim: int) -> None:
    if dim > RANDK_MAX_DIM:
        raise ValueError(f"Rand-K draws supports of at most 2^30 = {RANDK_MAX_DIM} coordinates, not d = {dim}")


def _randk_counts(dim: int, k: int, key: int) -> np.ndarray:
    check_randk_dim(dim)
    if not 0 <= k <= dim:
        raise ValueError(f"Rand-K: cannot draw {k} of {dim} coordinates")
    return chunk_counts(dim, k, numpy_rng(key), RANDK_CHUNK_BITS)


def chunk_counts(dim: int, k: int, rng: np.random.Generator, chunk_bits: int) -> np.ndarray:
    """How many coordinates of a uniform k-subset of range(dim) fall in each chunk of 2^chunk_bits:
    the chunks are split in halves, level by level, and each half's share of its parent's count is
    a hypergeometric draw (the number of a uniform sample's members that fall in one part of a
    population), one vectorized NumPy call a level."""
    size = 1 << chunk_bits
    chunks = -(-dim // size)
    edges = np.minimum(np.arange(chunks + 1, dtype=np.int64) * size, dim)
    counts = np.empty(chunks, dtype=np.int64)
    low, high, count = np.array([0]), np.array([chunks]), np.array([k], dtype=np.int64)
    while low.size:
        leaf = high - low == 1
        counts[low[leaf]] = count[leaf]
        low, high, count = low[~leaf], high[~leaf], count[~leaf]
        if not low.size:
            break
        middle = (low + high) // 2
        left = rng.hypergeometric(edges[middle] - edges[low], edges[high] - edges[middle], count)
        low, high, count = np.concatenate([low, middle]), np.concatenate([middle, high]), np.concatenate([left, count - left])
    return counts


def _chunk_subset(chunk: int, count: int, key: int, dim: int, chunk_bits: int) -> np.ndarray:
    """Chunk ``chunk``'s part of ``randk_support`` in NumPy (where Numba is missing), the set that
    ``cpu_kernels.keyed_subsets`` draws: the first distinct fields below s of the chunk's stream
    of draws (a prefix of it, doubled until it holds enough)."""
    if not 0 <= chunk_bits <= 16:
        raise ValueError(f"Rand-K: chunks of 2^{chunk_bits} coordinates (its draws are 16-bit fields)")
    base = chunk << chunk_bits
    s = min(1 << chunk_bits, dim - base)
    if count in (0, s):
        return np.arange(base, base + count, dtype=np.int64)
    flip = count > s // 2
    wanted = s - count if flip else count
    mask = (1 << (s - 1).bit_length()) - 1
    chunk_key = int(splitmix64(torch.tensor([chunk]), key)[0]) & MASK64
    length = 2 * wanted + 64
    while True:
        z = splitmix64(torch.arange(-(-length // 4), dtype=torch.int64), chunk_key).numpy().view(np.uint64)
        fields = ((z[:, None] >> np.arange(0, 64, 16, dtype=np.uint64)) & np.uint64(mask)).reshape(-1).astype(np.int64)
        fields = fields[fields < s]
        _, first = np.unique(fields, return_index=True)
        if first.size >= wanted:
            taken = fields[np.sort(first)[:wanted]]
            break
        length *= 2
    keep = np.zeros(s, dtype=bool)
    keep[taken] = True
    return base + np.flatnonzero(~keep if flip else keep)


# ---------------------------------------------------------------------------------------------
# Perm-K
# ---------------------------------------------------------------------------------------------


def _permk_on_device(dim: int, n: int) -> bool:
    return dim > PERMK_HOST_MAX_DIM and dim >= n


@functools.lru_cache(maxsize=8)
def _permutations(dim: int, n: int, key: int) -> tuple[np.ndarray, np.ndarray]:
    rng = numpy_rng(key)
    coord_perm = rng.permutation(dim) if dim >= n else np.arange(dim)
    worker_perm = rng.permutation(n)
    return coord_perm, worker_perm


@functools.lru_cache(maxsize=64)
def _worker_slots(n: int, key: int) -> np.ndarray:
    """The block each worker gets, for the keyed-bijection construction: a PCG64 permutation of the
    n workers keyed by ``key`` (so every worker's block size is q + 1 with probability (d mod n)/n)."""
    return _frozen(numpy_rng(key).permutation(n))


def permk_blocks(dim: int, n: int) -> list[int]:
    """Block sizes for d >= n: ceil(d/n) for the first d mod n blocks, floor(d/n) for the rest."""
    q, r = divmod(dim, n)
    return [q + 1 if b < r else q for b in range(n)]


def permk_scale(dim: int, n: int) -> float:
    """The factor every kept value is multiplied by: n for d >= n, n/q for d < n with n = q d + r."""
    return float(n) if dim >= n else n / (n // dim)


def _slot(dim: int, n: int, worker: int, key: int) -> int:
    if _permk_on_device(dim, n):
        return int(_worker_slots(n, key)[worker])
    return int(_permutations(dim, n, key)[1][worker])


def _block(dim: int, n: int, slot: int) -> tuple[int, int]:
    """(start, size) of block ``slot`` in the permuted order (d >= n)."""
    q, r = divmod(dim, n)
    return slot * q + min(slot, r), q + (1 if slot < r else 0)


def permk_block_size(dim: int, n: int, worker: int, key: int) -> int:
    """The number of coordinates worker ``worker`` gets at the step keyed by ``key`` (no support is
    computed: the decoder checks a message's length with it)."""
    slot = _slot(dim, n, worker, key)
    if dim >= n:
        return _block(dim, n, slot)[1]
    return 1 if slot < (n // dim) * dim else 0


@functools.lru_cache(maxsize=64)
def _permk_support_host(dim: int, n: int, worker: int, key: int) -> np.ndarray:
    coord_perm, worker_perm = _permutations(dim, n, key)
    slot = int(worker_perm[worker])
    if dim >= n:
        start, size = _block(dim, n, slot)
        return _frozen(np.sort(coord_perm[start:start + size]).astype(np.int64))
    q = n // dim
    if slot < q * dim:
        return _frozen(np.array([slot % dim], dtype=np.int64))
    return _frozen(np.empty(0, dtype=np.int64))


def permk_support(dim: int, n: int, worker: int, key: int) -> np.ndarray:
    """Worker ``worker``'s sorted support for the step keyed by ``key``, as a host array.

    d >= n: a random permutation of the coordinates is cut into n blocks (sizes of ``permk_blocks``),
    and a random permutation of the workers assigns the blocks, so each worker's support is uniformly
    distributed whatever its index. The blocks are disjoint and cover range(d). For d above
    ``PERMK_HOST_MAX_DIM`` the coordinate permutation is ``keyed_permutation`` (see the module doc).
    d < n, n = q d + r: the workers are randomly ordered; positions 0..q d - 1 get coordinate
    position mod d (each coordinate goes to exactly q workers), the last r workers get nothing.
    """
    if _permk_on_device(dim, n):
        return _frozen(permk_support_tensor(dim, n, worker, key, torch.device("cpu")).numpy())
    return _permk_support_host(dim, n, worker, key)


def permk_support_tensor(dim: int, n: int, worker: int, key: int, device: torch.device) -> torch.Tensor:
    """``permk_support`` as a private int64 tensor on ``device``, computed there for large d."""
    if not _permk_on_device(dim, n):
        return support_tensor(_permk_support_host(dim, n, worker, key), device)
    start, size = _block(dim, n, _slot(dim, n, worker, key))
    if size == dim:
        return torch.arange(dim, dtype=torch.int64, device=device)
    return _sorted_distinct(keyed_block(start, size, dim, key, device), dim).to(torch.int64)


def marked_support(rule) -> tuple[np.ndarray, int] | None:
    """A keyed Perm-K rule's support on the CPU as a bitmap of d bits (up to ``IMAGE_SIDE_MAX_N``
    workers ``marked_from_the_image``, or at n = 2 the complement of the other block's bitmap of the
    same step; above, ``cpu_kernels.marked`` of the block's values; for 3 to
    ``BLOCKS_AT_ONCE_MAX_N`` workers, every block's bitmap at once, ``marked_blocks``, at the first
    block asked for within ``every_block_asked`` (a MARINA-P or M3 server), or, above
    ``IMAGE_SIDE_MAX_N`` workers, when another block of the same step than the last one is asked for
    (a server compressing each worker's block; a worker asks for its own only, maybe twice), and
    then each from that) and its size, for the compiled
    gather and scatter (``cpu_kernels.gather_marked``, ``scatter_marked``), which read it in
    increasing order without sorting the block. None where those do not apply: another rule, d
    below ``cpu_kernels.MIN_CHUNK``, the host construction, a block of all of [d], no Numba.

    A Rand-K rule's support comes as a bitmap too (``randk_marked``) where it holds at least
    d / ``RANDK_MARKED_RATIO`` coordinates (and not all): there the gather and scatter through
    the bitmap beat the index arrays, which sparser supports keep (an addition into a vector in
    place then writes the k coordinates alone)."""
    if rule.kind == "randk":
        if (rule.dim < cpu_kernels.MIN_CHUNK or rule.count * RANDK_MARKED_RATIO < rule.dim or rule.count == rule.dim
                or not cpu_kernels.available()):
            return None
        words = randk_marked(rule.dim, rule.count, rule.key)
        return None if words is None else (words, rule.count)
    if rule.kind != "permk" or not _permk_on_device(rule.dim, rule.count) or rule.dim < cpu_kernels.MIN_CHUNK:
        return None
    slot = _slot(rule.dim, rule.count, rule.worker, rule.key)
    start, size = _block(rule.dim, rule.count, slot)
    if size == rule.dim:
        return None
    step, words = (rule.dim, rule.count, rule.key), None
    if 2 < rule.count <= BLOCKS_AT_ONCE_MAX_N:
        last, asked = _last_blocks[0], _last_asked[0]
        if last is not None and last[0] == step:
            words = None if last[1] is None else last[1][slot]  # (None where marking them all failed: not tried again)
        elif _every_block.get() or (rule.count > IMAGE_SIDE_MAX_N and asked is not None and asked[0] == step
                                    and asked[1] != slot):
            blocks = marked_blocks(*step)  # every block will be asked for, or another than the last: all of them
            _last_blocks[0] = (step, blocks)
            words = None if blocks is None else blocks[slot]
    if words is None:
        _last_asked[0] = (step, slot)
        if rule.count <= IMAGE_SIDE_MAX_N:
            words = _from_the_last_image(rule.dim, rule.key, start, size)
            if words is None:
                words = marked_from_the_image(start, size, rule.dim, rule.key)
                _last_image[0] = None if words is None else (rule.dim, rule.key, start, size, words)
        if words is None:
            words = cpu_kernels.marked(keyed_block(start, size, rule.dim, rule.key, torch.device("cpu")), rule.dim)
    return None if words is None else (words, size)


_every_block = contextvars.ContextVar("every_block_asked", default=False)


@contextlib.contextmanager
def every_block_asked():
    """Within the block the caller asks for every Perm-K block of each step (a MARINA-P or M3 server
    compressing each worker's downlink), so that ``marked_support`` marks them all at once at the
    first block asked for, for 3 to ``BLOCKS_AT_ONCE_MAX_N`` workers: one call's overheads for all
    of them (at d = 1e6 on 2 cores 0.25-0.4 ms a block, against 0.5-0.7 alone from the image side),
    and above ``IMAGE_SIDE_MAX_N`` workers no forward pass over the first block's d / n positions.
    Only a hint: without it, above ``IMAGE_SIDE_MAX_N`` workers the second block asked for marks the
    rest at once, and up to it each block is marked alone."""
    token = _every_block.set(True)
    try:
        yield
    finally:
        _every_block.reset(token)


# (dim, key, start, size, bitmap) of the last block marked from the image side, replaced whole (one
# store, which threads of an in-process run see whole or not at all)
_last_image: list = [None]
# ((dim, n, key), bitmaps by block or None) of the last step whose blocks were marked all at once,
# and ((dim, n, key), block) of the last block marked alone; each replaced whole, as ``_last_image``.
# The bitmaps are only read, so the cached ones are shared.
_last_blocks: list = [None]
_last_asked: list = [None]


def marked_blocks(dim: int, n: int, key: int) -> np.ndarray | None:
    """The bitmaps of all n Perm-K blocks of the step keyed by ``key`` (row k: block k of the
    permuted order, ``_block``), each found as ``marked_from_the_image`` finds one (every coordinate
    mapped back through the network's rounds, ``cpu_kernels.marked_blocks``, a pass over d for each
    block), in one call: the threads, the rotations and the positions mapped forward (each block's
    partial rows at its two ends, and those of its full rows whose first pass through the network
    leaves [0, d), ``_mark_the_rest``) are shared by the blocks. A server that compresses the n
    blocks of a step (MARINA-P, M3) asks for them one after the other. None where the kernel does
    not apply, or if a bitmap does not hold its block's size."""
    low, a_size, _, tables, rotation = _feistel_tables(dim, key, torch.device("cpu"))
    width = 1 << low
    blocks = [_block(dim, n, slot) for slot in range(n)]
    first_rows = np.array([-(-start // width) for start, _ in blocks], dtype=np.int64)
    end_rows = np.maximum(np.array([(start + size) // width for start, size in blocks], dtype=np.int64), first_rows)
    before = cpu_kernels.marked_blocks(first_rows, end_rows, dim, low, a_size, tables)
    if before is None:
        return None
    words = cpu_kernels.rotate_marked(before, dim, rotation)
    full = [(int(a) * width, int(b) * width) if b > a else (start + size, start + size)
            for a, b, (start, size) in zip(first_rows, end_rows, blocks)]  # no full row: all mapped forward
    return words if _mark_the_rest(words, blocks, full, dim, key) else None


def _from_the_last_image(dim: int, key: int, start: int, size: int) -> np.ndarray | None:
    """The bitmap of a block from the last one marked from the image side at the same step (same d
    and key): the same array for the same block, its complement in [0, d) for the other block of a
    pair that covers [0, d). A MARINA-P or M3 server with Perm-K at n = 2 compresses both workers'
    blocks of one step: the second bitmap costs one pass over 1.25 MB instead of a pass over d
    (about 11 ms at d = 1e7). The bitmaps are only read (``cpu_kernels.gather_marked``,
    ``scatter_marked``), so the cached one is shared."""
    last = _last_image[0]
    if last is None:
        return None
    last_dim, last_key, last_start, last_size, words = last
    if (last_dim, last_key) != (dim, key):
        return None
    if (last_start, last_size) == (start, size):
        return words
    covers = (last_start == 0 and start == last_size) or (start == 0 and last_start == size)
    if size + last_size != dim or not covers:
        return None
    other = np.invert(words)
    if dim % 64:
        other[-1] &= np.uint64((1 << (dim % 64)) - 1)
    return other


def marked_from_the_image(start: int, size: int, dim: int, key: int) -> np.ndarray | None:
    """``marked_support``'s bitmap for a block, found by mapping every coordinate back
    (``cpu_kernels.marked_rows``: a pass over d, in bands of the network's domain, with no table
    read at a computed index) instead of every position forward (four dependent table reads and a
    bit set at a random word a position): at d = 1e7 on 2 cores 1.8-2.0 ms for any block, against
    11.3 ms for the d / 2 positions of n = 2 and 7.3 for the d / 3 of n = 3 (``IMAGE_SIDE_MAX_N``;
    docs/overhead.md). The positions that ``marked_rows`` leaves out are few and mapped forward
    (``_mark_the_rest``): those of the block's partial rows at its two ends, and those of its full
    rows whose first pass through the network leaves [0, dim). None where the block holds no full
    row or the compiled pass does not apply."""
    low, a_size, _, tables, rotation = _feistel_tables(dim, key, torch.device("cpu"))
    width = 1 << low
    first_row, end_row = -(-start // width), (start + size) // width
    if end_row <= first_row:
        return None
    words = cpu_kernels.marked_rows(first_row, end_row, dim, low, a_size, tables, rotation)
    if words is None:
        return None
    full = [(first_row * width, end_row * width)]
    return words if _mark_the_rest(words.reshape(1, -1), [(start, size)], full, dim, key) else None


def _mark_the_rest(words: np.ndarray, blocks, full, dim: int, key: int) -> bool:
    """Marks in ``words[k]``, the bitmap of block k = (start, size) of ``blocks`` (in increasing order)
    found from the coordinates that map back into its full rows (positions ``full[k]`` = (lo, hi),
    start <= lo <= hi <= start + size), the positions that way leaves out: those of the block's
    partial rows at its two ends, and those of its full rows whose first pass through the network
    leaves [0, d) (``cpu_kernels.mark_rest``, one compiled pass for every block: the few thousand
    positions took 0.3-0.5 ms in torch's operations, most of a block's time at d = 2^18). Returns
    whether every bitmap then holds its block's size."""
    low, a_size, _, tables, rotation = _feistel_tables(dim, key, torch.device("cpu"))
    cpu_kernels.mark_rest(words, blocks, full, dim, low, a_size, tables, rotation)
    return all(cpu_kernels.count_marked(words[k]) == size for k, (_, size) in enumerate(blocks))


def keyed_block(start: int, size: int, dim: int, key: int, device: torch.device) -> torch.Tensor:
    """``keyed_permutation`` of the positions start, ..., start + size - 1 on ``device`` (int32 where
    the domain fits): on the CPU for d of at least ``cpu_kernels.MIN_CHUNK`` in one compiled pass
    (``cpu_kernels.keyed_range``, the same values: at d = 1e7, n = 10 a block took 2.6 ms instead of
    5.5 on 2 cores); elsewhere, or without Numba, in torch's integer operations."""
    if device.type == "cpu" and dim >= cpu_kernels.MIN_CHUNK:
        low, a_size, dtype, tables, rotation = _feistel_tables(dim, key, device)
        out = cpu_kernels.keyed_range(start, size, dim, low, a_size, tables, rotation, dtype)
        if out is not None:
            return out
    dtype = torch.int32 if dim + (1 << 16) < 2**31 else torch.int64
    return keyed_permutation(torch.arange(start, start + size, dtype=dtype, device=device), dim, key)


BITMAP_SORT_RATIO = 2048  # sort k distinct values of [0, d) through a bitmap where k * this >= d


def _sorted_distinct(values: torch.Tensor, dim: int) -> torch.Tensor:
    """``values`` (distinct, in [0, dim)) in increasing order: Perm-K's block. On
    the CPU, where they are at least dim / ``BITMAP_SORT_RATIO``, through a bitmap of dim bits
    (``cpu_kernels.sorted_distinct``, int64: one pass over the values and one over d / 64 words, at
    0.5 ns a word); otherwise torch sorts, on the values' device. On the 2-core CI host NumPy's int64
    sort cost 25-40 ns a value (k = 1e5 at d = 1e7: 3.7 ms, the bitmap 0.9; k = 1e6: 51 ms, the
    bitmap 2.7) and torch's half that; below the ratio the sort is the cheaper (k = 1e3: 0.01 ms
    against 0.08)."""
    if values.device.type == "cpu" and values.numel() * BITMAP_SORT_RATIO >= dim:
        compiled = cpu_kernels.sorted_distinct(values, dim)
        if compiled is not None:
            return compiled
    return torch.sort(values).values


def _hash32(z: torch.Tensor, key: int) -> torch.Tensor:
    """A keyed 32-bit mix of non-negative int64 values below 2^32 (three multiply-xorshift rounds with
    odd multipliers below 2^31, so every product stays below 2^63: exact on every device)."""
    z = z ^ (mix(key, 0) & _MASK32)
    for j in (1, 2, 3):
        z = (z * ((mix(key, j) & 0x7FFFFFFF) | 1)) & _MASK32
        z = z ^ (z >> 16)
    return z


@functools.lru_cache(maxsize=16)
def _feistel_tables(dim: int, key: int, device: torch.device):
    """Round tables and constants of ``keyed_permutation`` for (dim, key), built on ``device``.

    The domain is Z_A x Z_(2^b) (value = left * 2^b + right) with b = floor(bits(d - 1) / 2) and
    A = ceil(d / 2^b), so it holds d and less than d + 2^b values (cycle walking is rare). Even
    rounds set right ^= T_r[left] (T_r uniform on [0, 2^b)), odd rounds left = (left + T_r[right])
    mod A (T_r uniform on [0, A)); each round is a bijection of the domain.
    """
    bits = max(2, (dim - 1).bit_length())
    low = bits // 2
    a_size = -(-dim // (1 << low))
    dtype = torch.int32 if a_size << low < 2**31 else torch.int64
    tables = []
    for r in range(FEISTEL_ROUNDS):
        sub = mix(key, 0x7AB1E, r)
        if r % 2 == 0:
            h = _hash32(torch.arange(a_size, dtype=torch.int64, device=device), sub)
            tables.append((h >> (32 - low)).to(dtype))
        else:  # stored minus A: left + T - A lies in [-A, A) and one sign test reduces it mod A
            h = _hash32(torch.arange(1 << low, dtype=torch.int64, device=device), sub)
            tables.append((((h * a_size) >> 32) - a_size).to(dtype))
    rotation = mix(key, 0x7AB1E, FEISTEL_ROUNDS) % dim
    return low, a_size, dtype, tuple(tables), rotation


def _feistel(v: torch.Tensor, low: int, a_size: int, tables) -> torch.Tensor:
    """One pass of the keyed Feistel network over Z_A x Z_(2^low) (``_feistel_tables``)."""
    left = v >> low
    right = v.bitwise_and_((1 << low) - 1)
    for r, table in enumerate(tables):
        if r % 2 == 0:
            right.bitwise_xor_(table.index_select(0, left))
        else:
            left.add_(table.index_select(0, right))
            left.add_((left >> (8 * left.element_size() - 1)).bitwise_and_(a_size))
    return left.bitwise_left_shift_(low).bitwise_or_(right)


def keyed_permutation(positions: torch.Tensor, dim: int, key: int) -> torch.Tensor:
    """pi_key(p) for integer positions p in [0, dim): a keyed bijection of [0, dim), as int32 where
    the domain fits (int64 otherwise).

    pi(p) = (F(p) + s) mod dim, where F is a 4-round Feistel network with random round tables on a
    domain of fewer than dim + 2^(bits/2) values, restricted to [0, dim) by cycle walking (a value
    >= dim goes through F again), and s is a keyed rotation in [0, dim). The rotation makes every
    coordinate equally likely at every position whatever F is (P(pi(p) = j) = 1/d for each p and j
    over s), which is what Perm-K's unbiasedness and omega = n - 1 rest on; F spreads a block over the
    coordinates. Integer arithmetic without overflow: the same on CPU and CUDA.
    """
    low, a_size, dtype, tables, rotation = _feistel_tables(dim, key, positions.device)
    out = _feistel(positions.to(dtype, copy=True), low, a_size, tables)  # (works in place)
    if a_size << low != dim:
        todo = torch.nonzero(out >= dim).flatten()
        while todo.numel():
            again = _feistel(out[todo], low, a_size, tables)
            out[todo] = again
            todo = todo[again >= dim]
    if rotation:  # (out + s) mod dim, with out + s - dim in [-dim, dim)
        out.add_(rotation - dim)
        out.add_((out >> (8 * out.element_size() - 1)).bitwise_and_(dim))
    return out
