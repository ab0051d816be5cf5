"""The quantizers' compiled CPU pass against their torch version: the same codes from the same draws,
the same packed bytes, the same decoded vectors; and the counter-based draws themselves."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from common.algorithms import row_order
from common.compressors import build, cpu_kernels, draws, indices
from common.compressors.base import FLOAT64_BLOCK, float64_norm
from common.compressors.dithering import norm_float32_up
from common.compressors.payloads import LevelTable
from common.compressors import rounding
from common.keys import MASK64
from common.wire import bitpack, decode, encode
from common.wire.header import WireError

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="numba is not installed")

SPECS = [
    "natural", "exprounding:base=3", "exprounding:base=1.5", "exprounding:base=2,biased=true",
    "exprounding:base=3,biased=true", "natdither:s=2,p=inf", "natdither:s=8,p=2", "expdither:base=3,s=4,p=2",
    "expdither:base=1.1,s=300,p=inf", "natdither:s=140,p=2", "qsgd:s=16", "qsgd:s=7", "qsgd:s=1000", "qsgd:s=65535", "ternary", "ternary:p=2",
]


def _splitmix_reference(key: int, j: int) -> int:
    z = (key + (j + 1) * draws.GOLDEN) & MASK64
    z = ((z ^ (z >> 30)) * draws.MIX1) & MASK64
    z = ((z ^ (z >> 27)) * draws.MIX2) & MASK64
    return z ^ (z >> 31)


def test_torch_splitmix_wraps_like_unsigned_64_bit_arithmetic():
    key = 0xDEADBEEFCAFEBABE
    got = draws.splitmix64(torch.arange(2000), key)
    assert [int(v) & MASK64 for v in got] == [_splitmix_reference(key, j) for j in range(2000)]


def test_float32_draws_take_two_24_bit_halves_of_each_output():
    key = 12345
    k = draws.uniform_bits(key, 7, torch.float32, "cpu")
    want = []
    for j in range(4):
        z = _splitmix_reference(key, j)
        want += [z & 0xFFFFFF, (z >> 32) & 0xFFFFFF]
    assert k.tolist() == want[:7]
    k64 = draws.uniform_bits(key, 3, torch.float64, "cpu")
    assert k64.tolist() == [_splitmix_reference(key, j) >> 11 for j in range(3)]


def _awkward(dtype: torch.dtype, n: int = 50_001) -> torch.Tensor:
    """Values over many binades, zeros of both signs, level boundaries, subnormals where the dtype has them."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(n, generator=gen, dtype=torch.float64) * torch.logspace(-30, 30, n, dtype=torch.float64)
    x = x.to(dtype)
    special = [0.0, -0.0, 1.0, -0.5, 2.0 ** -3, 3.0, 1 / 3]
    if dtype == torch.float32:
        special += [1e-45, -3e-40, 1.17e-38, 3e38]
    x[: len(special)] = torch.tensor(special, dtype=dtype)
    return x


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("spec", SPECS)
def test_compiled_pass_gives_the_torch_codes(spec, dtype, monkeypatch):
    x = _awkward(dtype)
    c = build(spec, x.numel(), 4, seed=9)
    fast = c.compress(x, worker=2, step=17)
    monkeypatch.setattr(rounding.cpu_kernels, "quantize", lambda *a, **k: None)
    slow = c.compress(x, worker=2, step=17)
    assert torch.equal(fast.negative, slow.negative)
    assert fast.codes.dtype == slow.codes.dtype
    assert torch.equal(fast.codes, slow.codes)


@pytest.mark.parametrize("s", [1, 2, 3, 7, 16, 1000, 4096, 65535])
@pytest.mark.parametrize("stochastic", [True, False])
def test_uniform_levels_from_arithmetic_give_the_torch_codes(s, stochastic):
    """The uniform kernel computes l_k = k / s instead of reading the table: on values spread over
    [0, 1], the levels themselves, their neighbours and 1, it gives the torch version's codes, both
    stochastic and to the nearest level, and the same (min, max, smallest nonzero)."""
    table = LevelTable("uniform", 1.0, s)
    levels = table.values(torch.float32, "cpu")
    assert cpu_kernels.uniform_levels_are_quotients(levels.numpy().tobytes(), s)
    gen = torch.Generator().manual_seed(s)
    exact = levels[torch.randint(0, s + 1, (3000,), generator=gen)]
    t = torch.cat([torch.rand(20_000, generator=gen), exact, torch.nextafter(exact, torch.tensor(2.0)),
                   torch.nextafter(exact, torch.tensor(-1.0)).clamp_min(0), torch.tensor([0.0, 1.0, 1e-40])])
    x = torch.where(torch.rand(t.numel(), generator=gen) < 0.5, -t, t)
    key = 0x1234_5678_9ABC_DEF1
    negative, codes, span, finite = cpu_kernels.quantize(x, levels, s, key, stochastic)
    assert finite is None  # the uniform kernel leaves finiteness to the caller's norm
    want = rounding.stochastic_codes(x.abs(), table, levels, key if stochastic else None)
    assert torch.equal(negative, x < 0) and torch.equal(codes, want)
    wide = want.long()
    assert span == (int(wide.min()), int(wide.max()), int(wide[wide > 0].min()))


@pytest.mark.parametrize("s", [1, 7, 16])
def test_the_uniform_kernel_counts_no_code_past_the_end(s):
    """Lengths that end inside a vector's group of 16 and inside a block: where no code is 0, the
    span starts above 0, as the torch version's codes do (lanes past the end would count as code
    0), and the sign bitmap's padding bits are 0."""
    table = LevelTable("uniform", 1.0, s)
    levels = table.values(torch.float32, "cpu")
    gen = torch.Generator().manual_seed(s)
    for n in (37, 4096 + 21, cpu_kernels.MIN_CHUNK + 5):
        t = 0.5 + 0.5 * torch.rand(n, generator=gen)  # codes of s / 2 and up
        x = torch.where(torch.rand(n, generator=gen) < 0.5, -t, t)
        for stochastic in (True, False):
            signs, codes, span, _ = cpu_kernels.quantize(x, levels, s, 77, stochastic, sign_bits=True)
            want = rounding.stochastic_codes(x.abs(), table, levels, 77 if stochastic else None).long()
            assert torch.equal(codes.long(), want) and span == (int(want.min()), int(want.max()), int(want[want > 0].min()))
            assert signs.numpy().tobytes() == np.packbits((x < 0).numpy(), bitorder="little").tobytes()


def test_a_uniform_table_that_is_not_the_quotients_is_read_as_a_table():
    levels = LevelTable("uniform", 1.0, 7).values(torch.float32, "cpu").numpy().copy()
    assert cpu_kernels.uniform_levels_are_quotients(levels.tobytes(), 7)
    levels[3] = np.nextafter(levels[3], np.float32(1))
    assert not cpu_kernels.uniform_levels_are_quotients(levels.tobytes(), 7)
    assert not cpu_kernels.uniform_levels_are_quotients(levels[:-1].tobytes(), 7)
    x = torch.rand(5000, generator=torch.Generator().manual_seed(7))
    table = LevelTable("uniform", 1.0, 7)
    _, codes, _, _ = cpu_kernels.quantize(x, torch.from_numpy(levels), 7, 3, True)
    assert torch.equal(codes, rounding.stochastic_codes(x, table, torch.from_numpy(levels), 3))


@pytest.mark.parametrize("spec, dtype", [("qsgd:s=16", torch.uint8), ("natdither:s=8,p=2", torch.uint8),
                                         ("qsgd:s=255", torch.uint8), ("qsgd:s=256", torch.int16),
                                         ("natural", torch.int16), ("qsgd:s=65535", torch.int32)])
def test_codes_take_the_smallest_integer_dtype_of_their_table_on_both_sides(spec, dtype, monkeypatch):
    """A byte a code up to 255 levels: the compiled pass, the torch version and the decoder agree."""
    x = torch.randn(5000, generator=torch.Generator().manual_seed(1))
    c = build(spec, x.numel(), 2)
    p = c.compress(x)
    assert p.codes.dtype == dtype and decode(encode(p)).codes.dtype == dtype
    monkeypatch.setattr(rounding.cpu_kernels, "quantize", lambda *a, **k: None)
    monkeypatch.setattr(cpu_kernels, "unpack_codes", lambda *a, **k: None)
    p = c.compress(x)
    assert p.codes.dtype == dtype and decode(encode(p)).codes.dtype == dtype


def test_tables_of_powers_of_two_are_found_and_their_levels_are_the_exponent_fields():
    """Only [0, 2^(1 + c), ..., 2^(top + c)] qualifies: base-2 rounding (natural compression, for
    float32 with subnormal lowest levels and for float16 without) and natural dithering, not base 3
    and not uniform tables; natural dithering with s = 200 has levels that float32 rounds to 0."""
    tables = {("rounding", 2.0, 0, "float32"): (-150, True), ("rounding", 2.0, 0, "float16"): (-25, False),
              ("exp", 2.0, 8, None): (-8, False), ("exp", 2.0, 140, None): (-140, True),
              ("exp", 2.0, 200, None): None, ("rounding", 3.0, 0, "float32"): None, ("exp", 3.0, 4, None): None,
              ("uniform", 1.0, 16, None): None}
    for (kind, base, s, dtype_name), want in tables.items():
        table = LevelTable(kind, base, s, dtype_name=dtype_name) if dtype_name else LevelTable(kind, base, s)
        levels = table.values(torch.float32, "cpu").numpy()
        got = cpu_kernels.power_levels(levels.tobytes())
        assert got == want, (kind, base, s, dtype_name)
        if want is not None:
            c = want[0]
            assert levels[0] == 0 and all(levels[k] == 2.0 ** (k + c) for k in range(1, len(levels)))


@pytest.mark.parametrize("spec", ["natural", "exprounding:base=2,biased=true", "natdither:s=8,p=inf", "natdither:s=2,p=2"])
def test_blocks_of_powers_of_two_and_blocks_of_others_give_the_torch_codes(spec, monkeypatch):
    """A block whose coordinates lie in binades of powers of two takes lo and hi from t's bits; one
    with more than a quarter elsewhere (zeros, subnormals, the lowest levels) reads the table; one
    with a few elsewhere does both. Each gives the torch version's codes."""
    gen = torch.Generator().manual_seed(3)
    block = cpu_kernels.BLOCK
    normal = torch.randn(block, generator=gen)
    crowded = torch.randn(block, generator=gen) * 1e-39  # subnormal, and far below every dithering level
    crowded[::10] = torch.randn(block, generator=gen)[::10]
    mixed = torch.randn(block, generator=gen)
    mixed[::6] = torch.randn(block, generator=gen)[::6] * 1e-39
    mixed[1::6] = 0.0
    x = torch.cat([normal, crowded, mixed, normal[: block // 3]])
    x[5] = 40.0  # the largest |x| (dithering's norm) in the first block
    c = build(spec, x.numel(), 4, seed=9)
    fast = c.compress(x, worker=1, step=5)
    monkeypatch.setattr(rounding.cpu_kernels, "quantize", lambda *a, **k: None)
    slow = c.compress(x, worker=1, step=5)
    assert torch.equal(fast.negative, slow.negative) and torch.equal(fast.codes, slow.codes)


@pytest.mark.parametrize("stochastic", [True, False])
def test_powers_of_two_round_up_only_past_the_boundary_where_a_draw_equals_the_probability(stochastic, monkeypatch):
    """Between two powers of two the compiled pass compares integers: the draw u (24 bits) against
    twice t's mantissa field, and the field against 2^22 for the nearest level. Coordinates built so
    that u 2^-24 = (t - lo) / gap exactly (and t exactly half-way, for the nearest level) must not round
    up, as in the torch version; one past the boundary must."""
    key, n = 0x5EED, 4096
    u = draws.uniform_bits(key, n, torch.float32, "cpu")
    half = (u // 2) if stochastic else torch.full((n,), 1 << 22)  # mantissa fields
    half[1::2] += 1  # one step past the boundary
    exponents = torch.arange(n) % 60 - 30
    t = (1.0 + half.to(torch.float64) / 2.0**23) * torch.pow(2.0, exponents.to(torch.float64))
    x = (t * torch.where(torch.arange(n) % 3 == 0, -1.0, 1.0)).to(torch.float32)
    table = LevelTable("rounding", 2.0, dtype_name="float32")
    levels = table.values(torch.float32, x.device)
    stream = key if stochastic else None
    fast = rounding.quantize(x, table, levels, stream)
    monkeypatch.setattr(rounding.cpu_kernels, "quantize", lambda *a, **k: None)
    slow = rounding.quantize(x, table, levels, stream)
    assert torch.equal(fast[0], slow[0]) and torch.equal(fast[1], slow[1])
    exact = (u % 2 == 0) if stochastic else torch.ones(n, dtype=torch.bool)
    floor = exponents + 150  # the code of 2^e (level k is 2^(k - 150))
    on_boundary = exact & (torch.arange(n) % 2 == 0)
    assert on_boundary.sum() > 500
    assert torch.equal(fast[1][on_boundary].to(torch.int64), floor[on_boundary])


@pytest.mark.parametrize("table", [LevelTable("rounding", 3.0, dtype_name="float32"),
                                   LevelTable("rounding", 5.5, dtype_name="float32"),
                                   LevelTable("exp", 3.0, 4), LevelTable("exp", 2.5, 30)])
@pytest.mark.parametrize("stochastic", [True, False])
@pytest.mark.parametrize("vector", [True, False])
def test_tables_of_one_level_a_binade_read_from_the_stack_give_the_torch_codes(table, stochastic, vector, monkeypatch):
    """Bases above 2 (one level at most in each binade): the kernel that reads its tables from stack
    copies, and with AVX-512 (``vector``) the one that reads windows of them from registers, give the
    torch version's codes on every level, its float32 neighbours, subnormal t (between rounding
    tables' subnormal levels: redone after the loop), zeros and values above the top level, values
    of a narrow range (inside a block's window) and of a wide one (outside it), in pieces over
    threads (the draws named by each coordinate's place), and the span."""
    has_vectors = cpu_kernels.vector_compress()
    monkeypatch.setattr(cpu_kernels, "vector_compress", lambda: vector and has_vectors)
    levels = table.values(torch.float32, "cpu")
    assert cpu_kernels.binade_starts(levels.numpy().tobytes(), np.float32)[2] < 2  # the kernel that applies
    gen = torch.Generator().manual_seed(int(table.base * 10) + table.s)
    top = float(levels[-1])
    spread = torch.exp(torch.empty(200_000).uniform_(-100.0, 90.0, generator=gen)).clamp_max(min(top * 2, 3.4e38))
    exact = levels[torch.randint(0, levels.numel(), (20_000,), generator=gen)]
    t = torch.cat([spread, exact, torch.nextafter(exact, torch.tensor(float("inf"))),
                   torch.nextafter(exact, torch.tensor(0.0)), torch.tensor([0.0, 1e-45, 3e-40, 1.1e-38, 3e38]),
                   torch.rand(5_000, generator=gen) * 1e-38])
    t = t[torch.randperm(t.numel(), generator=gen)]
    narrow = torch.cat([torch.randn(100_000, generator=gen).abs().clamp_max(top), levels[60:90].repeat(100)])
    t = torch.cat([narrow[torch.randperm(narrow.numel(), generator=gen)], t])  # whole blocks of a narrow range
    x = torch.where(torch.rand(t.numel(), generator=gen) < 0.5, -t, t)
    key = 0x0FED_CBA9_8765_4321
    monkeypatch.setattr(cpu_kernels, "MIN_CHUNK", 1 << 14)  # several pieces, each with its draws
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        negative, codes, span, finite = cpu_kernels.quantize(x, levels, 0, key, stochastic)
    finally:
        torch.set_num_threads(before)
    want = rounding.stochastic_codes(x.abs(), table, levels, key if stochastic else None)
    assert torch.equal(negative, x < 0) and torch.equal(codes, want)
    wide = want.long()
    assert span == (int(wide.min()), int(wide.max()), int(wide[wide > 0].min()))
    assert finite is True  # read in the same loop: exponential rounding skips a pass of its own
    for bad in (float("nan"), -float("inf")):
        y = x.clone()
        y[-3] = bad
        assert cpu_kernels.quantize(y, levels, 0, key, stochastic)[3] is False


@pytest.mark.parametrize("table", [LevelTable("exp", 3.0, 4), LevelTable("exp", 3.0, 2), LevelTable("exp", 2.0, 2), LevelTable("exp", 1.5, 7),
                                   LevelTable("exp", 1.1, 15), LevelTable("exp", 2.5, 15)])
@pytest.mark.parametrize("stochastic", [True, False])
def test_small_tables_counted_in_registers_give_the_torch_codes(table, stochastic, monkeypatch):
    """Tables of at most 16 levels (``quantize_small32``: t's code is the number of levels it reaches):
    the torch version's codes on every level, its float32 neighbours, subnormal t, zeros, values
    above the top level, the span, in pieces whose lengths are not multiples of 16 (the last group's
    lanes past the end are neither stored nor counted), and the flag of an inf or NaN."""
    monkeypatch.setattr(cpu_kernels, "SMALL_TOP_OVER_WINDOWS", 15)  # base 2.5's 15 levels too
    levels = table.values(torch.float32, "cpu")
    gen = torch.Generator().manual_seed(int(table.base * 10) + table.s)
    exact = levels[torch.randint(0, levels.numel(), (20_000,), generator=gen)]
    t = torch.cat([torch.rand(100_003, generator=gen), torch.exp(torch.empty(50_000).uniform_(-100.0, 2.0, generator=gen)),
                   exact, torch.nextafter(exact, torch.tensor(float("inf"))), torch.nextafter(exact, torch.tensor(0.0)),
                   torch.tensor([0.0, 1e-45, 3e-40, 1.1e-38, 3e38]), torch.rand(5_001, generator=gen) * 1e-38])
    t = t[torch.randperm(t.numel(), generator=gen)]
    x = torch.where(torch.rand(t.numel(), generator=gen) < 0.5, -t, t)
    x[7] = -0.0
    key = 0x0123_4567_89AB_CDEF
    used = []
    small = cpu_kernels._kernels()["small32"]
    monkeypatch.setitem(cpu_kernels._kernels(), "small32", lambda *a: used.append(1) or small(*a))
    monkeypatch.setattr(cpu_kernels, "MIN_CHUNK", 1 << 14)  # several pieces, each with its draws
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        for n in (x.numel(), 4096 * 3 + 13, 37, 5):
            negative, codes, span, finite = cpu_kernels.quantize(x[:n], levels, 0, key, stochastic)
            want = rounding.stochastic_codes(x[:n].abs(), table, levels, key if stochastic else None)
            assert torch.equal(negative, x[:n] < 0) and torch.equal(codes, want), n
            wide = want.long()
            nonzero = wide[wide > 0]
            assert span == (int(wide.min()), int(wide.max()), int(nonzero.min()) if nonzero.numel() else -1), n
            assert finite is True
        for bad in (float("nan"), -float("inf")):
            y = x[:4096 * 3 + 13].clone()
            y[-3] = bad
            assert cpu_kernels.quantize(y, levels, 0, key, stochastic)[3] is False
    finally:
        torch.set_num_threads(before)
    assert used
    # a short vector whose codes are all above 0: the lanes past its end (t = 0, code 0) are not counted,
    # and the codes after it are not written
    padded = cpu_kernels.small_levels(levels.numpy().tobytes())
    high = torch.full((37,), float(levels[-1]) * 0.99)
    high[1::3] *= -1
    out = np.full(48, 0xAB, dtype=np.uint8)
    signs = np.full(6, 0xCD, dtype=np.uint8)
    least = small(high.numpy(), 0, np.float32(1.0), padded, levels.numel() - 1, np.uint64(key), stochastic, signs[:5], out[:37])[0]
    assert int(least) == int(out[:37].min()) > 0 and (out[37:] == 0xAB).all()
    assert np.array_equal(signs[:5], np.packbits((high < 0).numpy(), bitorder="little")) and signs[5] == 0xCD


SIGN_FRAME_TABLES = {  # a table for each float32 kernel: small, uniform, powers of two, windows (or pairs), any
    "small": (LevelTable("exp", 3.0, 4), 50.0, "expdither:base=3,s=4,p=2"),
    "uniform": (LevelTable("uniform", 1.0, 16), 50.0, "qsgd:s=16"),
    "powers": (LevelTable("rounding", 2.0, dtype_name="float32"), None, "natural"),
    "windows": (LevelTable("rounding", 3.0, dtype_name="float32"), None, "exprounding:base=3"),
    "any": (LevelTable("rounding", 1.5, dtype_name="float32"), None, "exprounding:base=1.5"),
}


@pytest.mark.parametrize("kind", sorted(SIGN_FRAME_TABLES))
@pytest.mark.parametrize("n", [1, 37, 4096 * 3 + 13, (1 << 18) + 5])
def test_the_float32_kernels_write_the_sign_frame(kind, n, monkeypatch):
    """With ``sign_bits`` a float32 kernel's x < 0 is the wire's sign frame (little-endian bits, zero
    padding; -0 and NaN are not below 0), over pieces in threads; without it, the flags. A payload
    that holds the bitmap encodes to the frames of the same payload with flags, and decodes (to the
    host, which keeps the bitmap) to the same vector; a bitmap of the wrong length or with padding
    bits set is refused."""
    table, norm, spec = SIGN_FRAME_TABLES[kind]
    monkeypatch.setattr(cpu_kernels, "MIN_CHUNK", 1 << 14)
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=gen)
    x[:3] = torch.tensor([-0.0, float("nan"), -1e-40])[:n]
    levels = table.values(torch.float32, "cpu")
    uniform_s = table.s if table.kind == "uniform" else 0
    divisor = None if norm is None else torch.tensor(norm)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        bits, codes, _, _ = cpu_kernels.quantize(x, levels, uniform_s, 99, True, divisor, sign_bits=True)
        flags, same_codes, _, _ = cpu_kernels.quantize(x, levels, uniform_s, 99, True, divisor)
    finally:
        torch.set_num_threads(before)
    assert bits.dtype == torch.uint8 and np.array_equal(bits.numpy(), np.packbits((x < 0).numpy(), bitorder="little"))
    assert torch.equal(flags, x < 0) and torch.equal(codes, same_codes)
    if n < 64:
        return
    c = build(spec, n, 4, seed=1)
    p = c.compress(x.nan_to_num(), worker=1, step=2)
    assert p.signs.dtype == torch.uint8 and torch.equal(p.negative, x.nan_to_num() < 0)
    with_flags = dataclasses.replace(p, signs=p.negative.clone())
    assert [bytes(f) for f in encode(p)] == [bytes(f) for f in encode(with_flags)]
    assert torch.equal(c.decompress(decode(encode(p))), with_flags.to_dense())
    for received in (decode([bytearray(f) for f in encode(p)]), decode([bytearray(f) for f in encode(p)], "cpu")):
        # the host's decoder keeps the frame's bitmap, which the dequantizing kernels read block by block
        assert received.signs.dtype == torch.uint8 and torch.equal(received.negative, p.negative)
        assert torch.equal(c.decompress(received), with_flags.to_dense())
    with pytest.raises(WireError, match="sign bitmap"):
        encode(dataclasses.replace(p, signs=p.signs[:-1]))
    for wrong in (p.signs[:-1], p.negative.to(torch.uint8)):  # short, or flags as uint8: not a bitmap of n
        with pytest.raises(ValueError, match="sign bitmap"):
            dataclasses.replace(p, signs=wrong).to_dense()
        with pytest.raises(ValueError, match="sign bitmap"):
            dataclasses.replace(p, signs=wrong).negative
    if n % 8:
        tail = p.signs.clone()
        tail[-1] |= 0x80
        with pytest.raises(WireError, match="padding"):
            encode(dataclasses.replace(p, signs=tail))


@pytest.mark.parametrize("spec", ["natural", "natdither:s=2,p=inf", "qsgd:s=16", "ternary", "exprounding:base=3"])
def test_packed_codes_and_decoded_vector_match_the_torch_codec(spec, monkeypatch):
    x = _awkward(torch.float32, 30_011)
    c = build(spec, x.numel(), 4, seed=2)
    p = c.compress(x, worker=0, step=3)
    fast_frames = encode(p)
    fast_dense = c.decompress(decode(fast_frames))
    codes = p.codes.long()
    assert p.span == (int(codes.min()), int(codes.max()), int(codes[codes > 0].min()) if bool((codes > 0).any()) else -1)
    for name in ("code_range", "pack_codes", "unpack_codes", "dequantize"):
        monkeypatch.setattr(cpu_kernels, name, lambda *a, **k: None)
    slow_frames = encode(dataclasses.replace(p, span=None))  # the width chosen from the codes themselves
    assert [bytes(f) for f in fast_frames] == [bytes(f) for f in slow_frames]
    assert torch.equal(fast_dense, c.decompress(decode(slow_frames)))


@pytest.mark.parametrize("vector", [False, pytest.param(True, marks=pytest.mark.skipif(
    not cpu_kernels.vector_pack(), reason="the kernels are not compiled for AVX-512 VBMI here"))])
@pytest.mark.parametrize("dtype", [torch.int16, torch.uint8])
@pytest.mark.parametrize("width", range(1, 9))
@pytest.mark.parametrize("escape", [False, True])
def test_pack_and_unpack_kernels_follow_the_bitpack_layout(width, escape, dtype, vector, monkeypatch):
    """Lengths with every kind of last group, and long ones cut into pieces in several threads (a
    group's 8-byte load must stay inside its piece's bytes; a piece's whole 64-field groups go
    through the word kernel, or 64 fields at a time through vector registers, its last fields
    through the byte kernel), also from codes that do not start on an 8-byte boundary (the byte
    kernel only)."""
    monkeypatch.setattr(cpu_kernels, "vector_pack", lambda: vector)
    gen = torch.Generator().manual_seed(width)
    offset = 5 if dtype == torch.int16 or width < 8 else int(escape)  # the largest code fits a uint8
    for n, threads, skew in ((1, 1, 0), (7, 1, 0), (8, 1, 0), (9, 1, 0), (17, 1, 0), (64, 1, 0), (65, 1, 0),
                             (1003, 1, 0), (1003, 3, 0), (5000, 3, 0), (5000, 3, 1)):
        monkeypatch.setattr(cpu_kernels, "_threads", lambda: threads)
        monkeypatch.setattr(cpu_kernels, "MIN_CHUNK", 100)
        fields = torch.randint(0, 1 << width, (n,), generator=gen)
        if escape:  # field 0 is code 0, field f > 0 is code f + offset - 1
            codes = torch.where(fields == 0, 0, fields + offset - 1).to(dtype)
            minus, clamp = offset - 1, True
        else:
            codes = (fields + offset).to(dtype)
            minus, clamp = offset, False
        if skew:
            codes = torch.cat([codes.new_zeros(skew), codes])[skew:]
        packed = cpu_kernels.pack_codes(codes, minus, clamp, width)
        assert torch.equal(packed, bitpack.pack(fields, width)), n
        for into in (torch.int16, dtype):
            back, largest = cpu_kernels.unpack_codes(packed.numpy(), n, width, offset, escape, into)
            assert torch.equal(back, codes.to(into)) and largest == int(codes.max()), (n, into)
        if skew:  # packed bytes that do not start on an 8-byte boundary
            moved = torch.cat([packed.new_zeros(skew), packed])[skew:]
            assert torch.equal(cpu_kernels.unpack_codes(moved.numpy(), n, width, offset, escape, dtype)[0], codes)


def test_one_bit_fields_of_codes_zero_and_one_are_the_codes_packed():
    """QSGD and ternary at large d have codes 0 and 1 only: the uint8 codes are packed as they are."""
    codes = torch.randint(0, 2, (10_001,), generator=torch.Generator().manual_seed(3)).to(torch.uint8)
    assert torch.equal(cpu_kernels.pack_codes(codes, 0, False, 1), bitpack.pack(codes, 1))
    assert torch.equal(cpu_kernels.pack_codes(codes + 7, 7, False, 1), bitpack.pack(codes, 1))
    packed = bitpack.pack(codes, 1).numpy()
    back, largest = cpu_kernels.unpack_codes(packed, codes.numel(), 1, 7, False, torch.uint8)
    assert torch.equal(back, codes + 7) and largest == 8
    back, largest = cpu_kernels.unpack_codes(np.zeros_like(packed), codes.numel(), 1, 7, True, torch.int16)
    assert not back.any() and largest == 0


def test_fields_that_overflow_the_code_dtype_are_reported_not_wrapped():
    """A malformed frame's field plus the offset can pass the codes' dtype (8-bit fields of 255 with an
    offset of 200 into uint8 codes): the largest code reported is the true one, so the decoder refuses
    it, whichever kernel unpacks it."""
    n = 1024  # whole 64-field groups only: no last fields for the byte kernel
    data = np.full(n, 0xFF, dtype=np.uint8)  # n 8-bit fields of 255
    for escape in (False, True):
        codes, largest = cpu_kernels.unpack_codes(data, n, 8, 200, escape, torch.uint8)
        assert largest == 255 + 200 - int(escape)


def test_a_code_beyond_the_table_is_still_refused():
    """A frame whose fields decode past the top level is a WireError, also through the compiled path:
    natural dithering with s = 2 has codes 0..2 in 2-bit fields, and a field of 3 is no level."""
    x = torch.randn(4000, generator=torch.Generator().manual_seed(1))  # 4000 2-bit fields: 1000 bytes
    c = build("natdither:s=2,p=inf", x.numel(), 4, seed=1)
    frames = encode(c.compress(x, worker=0, step=1))
    sizes = [len(f) for f in frames]
    assert 1000 in sizes
    frames[sizes.index(1000)] = b"\xff" * 1000
    with pytest.raises(WireError, match="outside the table"):
        decode(frames)


def test_draws_do_not_depend_on_block_boundaries():
    """A counter-based draw is a function of (key, coordinate): a prefix of a vector is compressed
    exactly as the same coordinates of the longer vector."""
    x = _awkward(torch.float32, 10_001)
    long = build("natural", x.numel(), 4, seed=5).compress(x, worker=1, step=2)
    short = build("natural", 4_001, 4, seed=5).compress(x[:4_001].clone(), worker=1, step=2)
    assert torch.equal(long.codes[:4_001], short.codes)


@pytest.mark.parametrize("spec", ["natural", "natdither:s=8,p=2", "qsgd:s=16", "qsgd:s=7", "exprounding:base=3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_result_does_not_depend_on_how_many_threads_share_the_vector(spec, dtype, monkeypatch):
    """Codes, frames and decoded vectors are the same whether one thread or three handle pieces of
    the vector (pieces of at least 1000 coordinates here instead of 2^18, so that a small vector splits)."""
    x = _awkward(dtype, 10_007)
    c = build(spec, x.numel(), 4, seed=6)

    def run(threads):
        monkeypatch.setattr(cpu_kernels, "_threads", lambda: threads)
        p = c.compress(x, worker=3, step=11)
        frames = encode(p)
        return p, [bytes(f) for f in frames], c.decompress(decode(frames))

    monkeypatch.setattr(cpu_kernels, "MIN_CHUNK", 1000)
    one, many = run(1), run(3)
    assert len(cpu_kernels._chunks(x.numel(), 8)) >= 3
    assert torch.equal(one[0].codes, many[0].codes) and torch.equal(one[0].negative, many[0].negative)
    assert one[1] == many[1]
    assert torch.equal(one[2], many[2])


@pytest.mark.cuda
@pytest.mark.parametrize("spec", ["natural", "natdither:s=2,p=inf", "qsgd:s=16", "ternary"])
def test_cuda_and_cpu_compress_to_the_same_codes(spec):
    x = _awkward(torch.float32)
    c = build(spec, x.numel(), 4, seed=9)
    cpu = c.compress(x, worker=1, step=3)
    gpu = c.compress(x.cuda(), worker=1, step=3)
    assert torch.equal(gpu.codes.cpu(), cpu.codes) and torch.equal(gpu.negative.cpu(), cpu.negative)


@pytest.mark.parametrize("spec", ["natural", "exprounding:base=2,biased=true", "natdither:s=2,p=inf",
                                  "natdither:s=140,p=2", "qsgd:s=16", "qsgd:s=7", "qsgd:s=65535", "ternary"])
def test_levels_computed_in_the_decoder_give_the_table_s_bits(spec, monkeypatch):
    """Uniform and power-of-two tables are decoded without reading the table: bit for bit the scaled
    table's values (subnormal levels and -0.0 included), also split over threads."""
    x = _awkward(torch.float32, 30_011)
    x[100:110] = torch.tensor([1e-45, -1e-45, 3e-44, -2e-39, 1.5e-38, 0.0, -0.0, 5e-41, 7e-46, -8e-40])
    c = build(spec, x.numel(), 4, seed=2)
    p = c.compress(x, worker=0, step=3)
    monkeypatch.setattr(cpu_kernels, "_threads", lambda: 3)
    monkeypatch.setattr(cpu_kernels, "MIN_CHUNK", 1000)
    uniform_s = p.table.s if p.table.kind == "uniform" else 0
    assert cpu_kernels.dequantize_computed(p.codes, p.negative, p.table.values(torch.float32, "cpu"), uniform_s, p.norm) is not None
    fast = p.to_dense()
    monkeypatch.setattr(cpu_kernels, "dequantize_computed", lambda *a: None)
    table = p.to_dense()
    monkeypatch.setattr(cpu_kernels, "dequantize", lambda *a: None)
    torch_path = p.to_dense()
    assert torch.equal(table.view(torch.int32), torch_path.view(torch.int32))
    assert torch.equal(fast.view(torch.int32), table.view(torch.int32))


@pytest.mark.parametrize("stacked", [0, cpu_kernels.STACKED_TABLE])
def test_dequantize_kernel_matches_the_gather(stacked, monkeypatch):
    """The table read from the arguments, or (up to ``STACKED_TABLE`` entries) from a copy on the
    kernel's stack: torch's gather, -0.0 included, for small and large tables of both dtypes."""
    monkeypatch.setattr(cpu_kernels, "STACKED_TABLE", stacked)
    gen = torch.Generator().manual_seed(0)
    for count in (4, 177, 1024, 1500):  # 1024 levels fill the stack copy; 1500 do not fit it
        for dtype in (torch.float64, torch.float32):
            levels = torch.cat([torch.zeros(1), torch.rand(count - 1, generator=gen).sort().values]).to(dtype)
            signed = torch.cat([levels, -levels])
            codes = torch.randint(0, count, (9999,), generator=gen).to(torch.int16)
            negative = torch.rand(9999, generator=gen) < 0.5
            want = signed[codes.long() + count * negative.long()]
            got = cpu_kernels.dequantize(codes, negative, signed)
            assert got.numpy().tobytes() == want.numpy().tobytes(), (count, dtype)


def _norm_inputs(n: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=gen, dtype=torch.float64)
    wide = x * torch.exp2(torch.randint(-120, 120, (n,), generator=gen))  # sums that depend on the order
    return {"normal": x.to(dtype), "wide": wide.to(dtype), "zeros": torch.zeros(n, dtype=dtype),
            "subnormal": (x * 1e-41).to(dtype), "large": (x * 3e37).to(dtype)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [1 << 18, (1 << 18) + 4_099, (1 << 20) + 1, 3 * (1 << 20) + 61, 1 << 21])
def test_compiled_norm_is_the_torch_norm_bit_for_bit(n, dtype, monkeypatch):
    """float64_norm's compiled sum and its torch block loop give the same bits (the dithering norm
    and sign's scale, hence the codes, depend on them), on lengths with every kind of remainder."""
    assert cpu_kernels._sums_like_torch()
    xs = _norm_inputs(n, dtype)
    fast = {(name, p): float64_norm(x, p) for name, x in xs.items() for p in (1, 2)}
    monkeypatch.setattr(cpu_kernels, "float64_sum", lambda *a: None)
    for (name, p), got in fast.items():
        want = float64_norm(xs[name], p)
        assert got.dtype == want.dtype == torch.float64 and got.shape == want.shape == ()
        assert torch.equal(got, want), (name, p)


def test_compiled_norm_does_not_depend_on_how_many_threads_share_the_vector(monkeypatch):
    x = _norm_inputs(3 * (1 << 20) + 61, torch.float32)["wide"]
    one = float64_norm(x, 2)
    monkeypatch.setattr(cpu_kernels, "_threads", lambda: 3)
    monkeypatch.setattr(cpu_kernels, "MIN_CHUNK", 1 << 15)
    assert len(cpu_kernels._chunks(x.numel(), FLOAT64_BLOCK)) >= 3
    assert torch.equal(float64_norm(x, 2), one)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("threads", [1, 3])
def test_the_maximum_norm_from_the_bits_is_torchs(dtype, threads, monkeypatch):
    """``largest_magnitude`` (the dithering's maximum norm) gives max |x_i| exactly: over many
    binades with signed zeros and subnormals, at either end of the vector, for an inf and a NaN of
    either sign (then a NaN or inf norm, which makes the compressor check x and raise), for zeros only
    (+0), in one or three threads; and the norm that the codes are computed against is the one of
    torch's min and max."""
    monkeypatch.setattr(cpu_kernels, "_threads", lambda: threads)
    monkeypatch.setattr(cpu_kernels, "MIN_CHUNK", 1 << 15)
    n = (1 << 17) + 5
    x = _awkward(dtype, n)
    cases = {"awkward": x, "zeros": -torch.zeros(n, dtype=dtype)}
    for at in (0, n // 2, n - 1):
        cases[f"largest at {at}"] = torch.where(torch.arange(n) == at, -2 * x.abs().max(), x)
        for bad in (math.inf, -math.inf, math.nan, -math.nan):
            cases[f"{bad} at {at}"] = torch.where(torch.arange(n) == at, torch.tensor(bad, dtype=dtype), x)
    for name, v in cases.items():
        got = cpu_kernels.largest_magnitude(v)
        lo, hi = torch.aminmax(v)
        want = float(torch.maximum(-lo, hi).abs())
        assert (got == want and math.copysign(1, got) == 1) or (math.isnan(got) and math.isnan(want)), name
    fast = norm_float32_up(x, math.inf)
    monkeypatch.setattr(cpu_kernels, "largest_magnitude", lambda v: None)
    assert torch.equal(fast, norm_float32_up(x, math.inf))
    for spec in ("ternary", "natdither:s=2,p=inf"):
        with pytest.raises(ValueError):
            build(spec, n, 2).compress(cases[f"{-math.nan} at {n // 2}"], worker=0, step=1)
    assert cpu_kernels.largest_magnitude(x[::2]) is None  # not contiguous: torch's min and max


def test_block_sums_follow_torchs_order_on_short_blocks():
    """Every kind of remainder of the cascade (rows, vectors, coordinates) on blocks shorter than one
    cascade step and a few steps long."""
    assert cpu_kernels._sums_like_torch((1, 3, 4, 15, 16, 17, 63, 255, 256, 257, 4_095, 4_097, 32_767))


def test_a_nan_of_either_sign_looks_up_the_same_level():
    """t = |x| / divisor is a NaN with the sign bit set for such a divisor (x86's default NaN); its
    exponent field must still index the 256-entry binade table."""
    x = _awkward(torch.float32, 999)
    table = LevelTable("exp", 3.0, 4)
    levels = table.values(torch.float32, "cpu")
    plus, minus = (torch.tensor(v, dtype=torch.int32).view(torch.float32) for v in (0x7FC00000, -0x400000))
    assert minus.isnan() and minus.view(torch.int32) < 0
    a = cpu_kernels.quantize(x, levels, 0, 5, True, plus)
    b = cpu_kernels.quantize(x, levels, 0, 5, True, minus)
    assert torch.equal(a[1], b[1]) and a[2] == b[2]


def test_a_long_vector_splits_into_several_pieces_per_thread(monkeypatch):
    n = 10_000_019
    monkeypatch.setattr(cpu_kernels, "_threads", lambda: 1)
    assert cpu_kernels._chunks(n, 8) == [(0, n)]
    monkeypatch.setattr(cpu_kernels, "_threads", lambda: 2)
    pieces = cpu_kernels._chunks(n, 8)
    assert len(pieces) == 2 * cpu_kernels.PIECES_PER_THREAD
    assert pieces[0][0] == 0 and pieces[-1][1] == n
    assert all(a % 8 == 0 and b == c for (a, b), (c, _) in zip(pieces, pieces[1:]))


@pytest.mark.parametrize("threads", [1, 3])
def test_keyed_permutation_in_one_compiled_pass_is_the_torch_one(threads, monkeypatch):
    """Perm-K's keyed bijection, position by position: the same values and dtype as the torch
    version's passes for domains that need cycle walking or not, keys above 2^63, blocks that start
    anywhere, and pieces in several threads."""

    monkeypatch.setattr(cpu_kernels, "_threads", lambda: threads)
    monkeypatch.setattr(cpu_kernels, "MIN_CHUNK", 1000)
    cpu = torch.device("cpu")
    for dim in (65_537, 100_003, 1 << 18, 3_000_017):
        low, a_size, dtype, tables, rotation = indices._feistel_tables(dim, 5, cpu)
        assert (a_size << low != dim) == (dim != 1 << 18)  # cycle walking everywhere but the power of two
        for key in (5, 2**63 + 12_345):
            low, a_size, dtype, tables, rotation = indices._feistel_tables(dim, key, cpu)
            for start, size in ((0, dim), (dim // 3, dim // 7 + 1), (dim - 1, 1)):
                want = indices.keyed_permutation(torch.arange(start, start + size, dtype=torch.int32), dim, key)
                got = cpu_kernels.keyed_range(start, size, dim, low, a_size, tables, rotation, dtype)
                assert got.dtype == want.dtype and torch.equal(got, want), (dim, key, start)
                assert torch.equal(indices.keyed_block(start, size, dim, key, cpu), want)


@pytest.mark.parametrize("threads", [1, 3])
def test_a_keyed_block_s_bitmap_is_the_same_from_the_image(threads, monkeypatch):
    """Perm-K's support bitmap built without the block's values, by mapping every coordinate back
    (``marked_from_the_image``, with the partial rows and the positions that need a cycle walk mapped
    forward), is the bitmap of the block's values: domains with and without cycle walking, blocks that start and end inside a
    row or on a row's edge, with no full row, every Perm-K block for several n, one thread or more."""

    monkeypatch.setattr(cpu_kernels, "_threads", lambda: threads)
    monkeypatch.setattr(cpu_kernels, "MIN_CHUNK", 1000)
    cpu = torch.device("cpu")
    for dim in (100_003, 1 << 18, 3_000_017):
        for key in (5, 2**63 + 12_345):
            low, a_size, _, tables, rotation = indices._feistel_tables(dim, key, cpu)
            width = 1 << low
            blocks = [(0, dim), (dim // 3, dim // 7 + 1), (dim - 1, 1), (width, 3 * width), (width + 1, width - 2),
                      (5, dim // 2)]
            for n in (2, 3, 4):
                blocks += zip(np.cumsum([0] + indices.permk_blocks(dim, n)[:-1]).tolist(), indices.permk_blocks(dim, n))
            for start, size in blocks:
                want = cpu_kernels.marked(indices.keyed_block(start, size, dim, key, cpu), dim)
                if size >= 2 * width:
                    assert np.array_equal(indices.marked_from_the_image(start, size, dim, key), want), (dim, key, start, size)


def test_a_bitmap_rotated_64_bits_at_a_time_is_rotated_bit_by_bit():
    """``rotated_bits``: bit u of the result is bit (u - rotation) mod dim of the source, for lengths
    with and without a partial last word, rotations at and near 0, a word's edges and dim, and a
    range of words at a time (as the threads take them)."""
    kernels = cpu_kernels._kernels()
    rng = np.random.default_rng(11)
    for dim in (64, 65, 127, 1000, 4096, 10_007):
        words = (dim + 63) // 64
        bits = rng.random(dim) < 0.5
        source = np.packbits(np.concatenate([bits, np.zeros(64 * words - dim, bool)]), bitorder="little").view(np.uint64)
        for rotation in sorted({0, 1, 63, 64, 65, dim // 2, dim - 64, dim - 1} & set(range(dim))):
            want = np.packbits(np.concatenate([np.roll(bits, rotation), np.zeros(64 * words - dim, bool)]),
                               bitorder="little").view(np.uint64)
            got = np.full(words, 0xDEAD, dtype=np.uint64)
            for a in range(0, words, 3):
                kernels["rotated_bits"](source, dim, rotation, a, min(words, a + 3), got)
            assert np.array_equal(got, want), (dim, rotation)


def test_distinct_values_come_out_of_the_bitmap_in_numpy_s_order():
    """Any dim (a partial last word too), both ends of the range, int32 and int64 values; two equal
    values are refused (None), so the caller sorts instead."""
    gen = torch.Generator().manual_seed(5)
    for dim in (1, 63, 64, 65, 1000, 100_003):
        for size in (0, 1, dim // 3, dim):
            values = torch.randperm(dim, generator=gen)[:size]  # size = dim holds both ends
            for dtype in (torch.int32, torch.int64):
                got = cpu_kernels.sorted_distinct(values.to(dtype), dim)
                assert got.dtype == torch.int64
                assert torch.equal(got, torch.from_numpy(np.sort(values.numpy())))
    assert cpu_kernels.sorted_distinct(torch.tensor([3, 5, 3], dtype=torch.int32), 10) is None


@pytest.mark.parametrize("chunk_bits", [2, 16])
def test_a_rand_k_support_is_uniform_over_all_k_subsets(monkeypatch, chunk_bits):
    """Over 12,000 keys each, every 4-subset and every 7-subset of range(11) comes up as often as a
    uniform draw says (chi-square over the 330 subsets, p above 1e-4): in one chunk (draws of 4 bits,
    those above 10 rejected), and in chunks of 4 coordinates (three chunks, the last of 3, whose
    draws of 2 bits reject 3; a chunk's count above half its size draws the coordinates left out),
    so the chunks' hypergeometric counts and their subsets are checked together."""
    import itertools
    from scipy import stats

    monkeypatch.setattr(indices, "RANDK_CHUNK_BITS", chunk_bits)
    draws_per = 12_000
    for k in (4, 7):
        subsets = {s: i for i, s in enumerate(itertools.combinations(range(11), k))}
        seen = np.zeros(len(subsets))
        for key in range(draws_per):
            support = indices.randk_support.__wrapped__(11, k, key * 7919 + k)
            seen[subsets[tuple(support.tolist())]] += 1
        assert stats.chisquare(seen).pvalue > 1e-4, (k, chunk_bits)


def test_every_coordinate_is_in_a_rand_k_support_with_probability_k_over_d():
    """At d = 2^17 + 1000 (two whole chunks and a partial one) and k = d / 4 and 3 d / 4, each of
    64 slices of the coordinates holds its share k/64 of the support on average over 400 keys
    (within 5 standard errors), and every support has k distinct sorted coordinates."""
    d = (2 << 16) + 1000
    for k in (d // 4, 3 * d // 4):
        hits = np.zeros(64)
        for key in range(400):
            support = indices.randk_support.__wrapped__(d, k, key)
            assert support.size == k and support[0] >= 0 and support[-1] < d and np.all(np.diff(support) > 0)
            hits += np.bincount(support * 64 // d, minlength=64)
        sizes = np.diff(-(-np.arange(65) * d // 64))  # coordinates j with j * 64 // d == i, for each slice i
        expected = 400 * sizes * k / d
        assert sizes.sum() == d
        assert np.all(np.abs(hits - expected) < 5 * np.sqrt(expected)), k


def test_the_compiled_rand_k_draw_gives_numpy_s_support(monkeypatch):
    """``cpu_kernels.keyed_subsets`` and the NumPy version (``_chunk_subset``, where Numba is missing)
    give the same support: one chunk and several, a partial last chunk, counts of 1, half a chunk
    and one more (the coordinates left out drawn), d - 1, in one piece and in several pieces on two
    threads, as indices and as a bitmap (for chunks of whole 64-bit words); and a support is fixed by its key (a change of the draw would make two versions of
    psc disagree on every Rand-K message: the protocol version says which one a side speaks)."""
    monkeypatch.setattr(cpu_kernels, "_threads", lambda: 2)
    monkeypatch.setattr(cpu_kernels, "MIN_CHUNK", 64)
    for chunk_bits in (3, 7, 16):
        for d in (5, 8, 200, 1000, 70_001):
            for k in sorted({1, (1 << chunk_bits) // 2, (1 << chunk_bits) // 2 + 1, d // 3, d - 1} & set(range(1, d))):
                for key in (3, 2 ** 63 + 11):
                    counts = indices.chunk_counts(d, k, indices.numpy_rng(key), chunk_bits)
                    assert counts.sum() == k and np.all(counts <= np.diff(np.minimum(np.arange(counts.size + 1) << chunk_bits, d)))
                    got = cpu_kernels.keyed_subsets(counts, key, d, chunk_bits)
                    want = np.concatenate([indices._chunk_subset(c, int(n), key, d, chunk_bits) for c, n in enumerate(counts)])
                    assert got.dtype == np.int64 and np.array_equal(got, want), (chunk_bits, d, k, key)
                    if chunk_bits >= 6:
                        words = cpu_kernels.keyed_subsets(counts, key, d, chunk_bits, marked=True)
                        bits = np.unpackbits(words.view(np.uint8), bitorder="little")
                        assert np.array_equal(np.flatnonzero(bits), got), (chunk_bits, d, k, key)
    assert indices.randk_support.__wrapped__(20, 5, 7).tolist() == [3, 5, 11, 14, 19]
    assert indices.randk_support.__wrapped__(200_000, 7, 7).tolist() == [74001, 122084, 171140, 175767, 177158, 187450, 190912]
    assert indices.randk_support.__wrapped__(9, 9, 1).tolist() == list(range(9))
    for d, k in ((10, 11), (indices.RANDK_MAX_DIM + 1, 1), (10, -1)):
        with pytest.raises(ValueError, match="Rand-K"):
            indices.randk_support.__wrapped__(d, k, 1)
    with pytest.raises(ValueError, match="at most 2\\^30"):
        build("randk:k=3+natural", dim=indices.RANDK_MAX_DIM + 1, n_workers=2)
    counts = np.array([3, 4])
    for bits, marked in ((17, False), (5, True)):  # a chunk's draws are 16-bit fields; a bitmap's chunks whole words
        with pytest.raises(ValueError, match="chunks of"):
            cpu_kernels.keyed_subsets(counts, 1, 100, bits, marked=marked)
    with pytest.raises(ValueError, match="chunks of"):
        indices._chunk_subset(0, 3, 1, 1 << 18, 17)


def test_rand_k_without_numba_draws_the_same_supports_and_compresses_to_the_same_message(monkeypatch):
    """Where Numba is missing, the support comes from the NumPy version, and a long Rand-K gathers
    by index instead of through a bitmap: the same support and the same message."""
    d = (1 << 18) + 4001
    x = torch.randn(d, generator=torch.Generator().manual_seed(6))
    results = []
    for compiled in (True, False):
        if not compiled:
            monkeypatch.setattr(cpu_kernels, "_kernels", lambda: None)
        indices.randk_support.kept.clear()
        indices.randk_marked.kept.clear()
        message = build("randk:ratio=0.25", dim=d, n_workers=2, seed=1).compress(x, worker=1, step=3)
        results.append((indices.randk_support(d, d // 4, 21), message.values.to_dense(), message.to_dense()))
        assert (len(indices.randk_marked.kept) == 1) == compiled
    for ours, theirs in zip(*results):
        assert np.array_equal(np.asarray(ours), np.asarray(theirs))
    indices.randk_support.kept.clear()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_long_rand_k_support_read_from_its_bitmap_gives_the_bits_of_the_index_arrays(monkeypatch, dtype):
    """Rand-K of at least d / ``RANDK_MARKED_RATIO`` coordinates compresses, decompresses and adds
    into a vector through its bitmap (``randk_marked``: the same set as ``randk_support``), with
    the bits of the index arrays' path (which sparser supports, and every support where the ratio is
    set out of reach, take): scaled and not, -0 and values that the scale rounds, in place too."""
    from common.compressors.payloads import add_dense

    d = (1 << 18) + 4001
    g = torch.Generator().manual_seed(4)
    x = (torch.randn(d, generator=g) * 1e3).to(dtype)
    x[::5] = -0.0
    h = torch.randn(d, generator=g).to(dtype)
    ratio_set = indices.RANDK_MARKED_RATIO
    for spec, marked in (("randk:ratio=0.25", True), ("randk:ratio=0.5,scaled=false", True), ("randk:ratio=0.7", True),
                         ("randk:ratio=0.01", False)):
        results = {}
        for ratio in (ratio_set, 1):
            monkeypatch.setattr(indices, "RANDK_MARKED_RATIO", ratio)
            indices.randk_support.kept.clear()
            indices.randk_marked.kept.clear()
            c = build(spec, dim=d, n_workers=2, seed=3).compress(x, worker=1, step=2)
            inplace = h.clone()
            add_dense(inplace, c, inplace=True)
            results[ratio] = [c.values.to_dense(), c.to_dense(), add_dense(h, c), inplace]
            assert (len(indices.randk_marked.kept) == 1) == (marked and ratio > 1), spec
        for ours, theirs in zip(*results.values()):
            assert torch.equal(ours.view(torch.uint8), theirs.view(torch.uint8)), spec
    monkeypatch.undo()
    k = d // 4
    bits = np.unpackbits(indices.randk_marked(d, k, 9).view(np.uint8), bitorder="little")[:d]
    assert np.array_equal(np.flatnonzero(bits), indices.randk_support(d, k, 9))
    rule = build("randk:ratio=0.25", dim=d, n_workers=2).compress(x).rule
    assert indices.marked_support(rule)[1] == rule.count


def test_the_rand_k_supports_kept_for_reuse_stay_within_their_count_and_bytes(monkeypatch):
    """A support asked for again is the one kept (the same array); the kept supports hold at most
    ``SUPPORT_BYTES_KEPT`` bytes and ``SUPPORTS_KEPT`` entries, the oldest going first, and the
    newest stays even where it alone is larger."""
    monkeypatch.setattr(indices, "SUPPORT_BYTES_KEPT", 3 * 8 * 5_000 + 1)
    monkeypatch.setattr(indices, "SUPPORTS_KEPT", 64)
    kept = indices.randk_support.kept
    kept.clear()
    first = indices.randk_support(50_000, 5_000, 1)
    assert indices.randk_support(50_000, 5_000, 1) is first
    for key in range(2, 6):
        indices.randk_support(50_000, 5_000, key)
    assert list(kept) == [(50_000, 5_000, key) for key in (3, 4, 5)]  # three of 40 KB fit
    indices.randk_support(50_000, 5_000, 3)  # used again: the newest
    indices.randk_support(50_000, 5_000, 6)
    assert list(kept) == [(50_000, 5_000, key) for key in (5, 3, 6)]
    assert indices.randk_support(50_000, 5_000, 1) is not first  # drawn again: the same set
    assert np.array_equal(indices.randk_support(50_000, 5_000, 1), first)
    indices.randk_support(50_000, 20_000, 9)
    assert list(kept) == [(50_000, 20_000, 9)]
    monkeypatch.setattr(indices, "SUPPORTS_KEPT", 2)
    for key in range(3):
        indices.randk_support(100, 3, key)
    assert list(kept) == [(100, 3, 1), (100, 3, 2)]
    kept.clear()


@pytest.mark.parametrize("threads, vector", [(1, True), (2, True), (2, False)])
def test_a_support_marked_in_a_bitmap_gathers_and_scatters_as_index_select_and_index_copy(monkeypatch, threads, vector):
    """``gather_marked`` gives x.index_select(0, support) * scale and says whether all of x is finite;
    ``scatter_marked`` gives zeros with index_copy_, or h + that (in place too): the same bytes,
    -0.0 included, for float32 and float64, lengths with a partial last word, one piece or several,
    16 coordinates at a time (compressing stores) and one set bit at a time. With ``minus``, the
    gather is that of x - minus (and sees an inf that only the difference holds)."""
    monkeypatch.setattr(cpu_kernels, "_threads", lambda: threads)
    monkeypatch.setattr(cpu_kernels, "vector_compress", lambda: vector)
    monkeypatch.setattr(cpu_kernels, "MIN_CHUNK", 1000)
    gen = torch.Generator().manual_seed(8)
    for dim in (1, 65, 4099, 100_003):
        for size in sorted({0, 1, dim // 3, dim}):
            support = torch.randperm(dim, generator=gen)[:size]
            words = cpu_kernels.marked(support.to(torch.int32), dim)
            ordered = torch.sort(support).values
            for dtype in (torch.float32, torch.float64):
                x = torch.randn(dim, generator=gen, dtype=dtype)
                x[::7] = -0.0
                h = torch.randn(dim, generator=gen, dtype=dtype)
                h[::5] = -0.0
                for scale in (3.0, 0.1):
                    got, finite = cpu_kernels.gather_marked(x, words, size, scale)
                    want = x.index_select(0, ordered).mul_(scale)
                    assert finite and got.dtype == dtype and got.numpy().tobytes() == want.numpy().tobytes()
                    assert cpu_kernels.known_finite(got)  # (the encoder reads it no more)
                    got, finite = cpu_kernels.gather_marked(x, words, size, scale, minus=h)
                    wanted = (x - h).index_select(0, ordered).mul_(scale)
                    assert finite and got.numpy().tobytes() == wanted.numpy().tobytes()
                dense = torch.zeros(dim, dtype=dtype).index_copy_(0, ordered, want)
                assert cpu_kernels.scatter_marked(words, want, dim).numpy().tobytes() == dense.numpy().tobytes()
                added = (h + dense).numpy().tobytes()
                assert cpu_kernels.scatter_marked(words, want, dim, h).numpy().tobytes() == added
                inplace = h.clone()
                assert cpu_kernels.scatter_marked(words, want, dim, inplace, inplace=True) is inplace
                assert inplace.numpy().tobytes() == added
            for bad in (float("nan"), float("inf"), -float("inf")):  # anywhere in x, on the support or not
                for spot in {0, dim // 2, dim - 1}:
                    x = torch.ones(dim)
                    x[spot] = bad
                    assert not cpu_kernels.gather_marked(x, words, size, 1.0)[1]
                    assert not cpu_kernels.gather_marked(torch.ones(dim), words, size, 1.0, minus=-x)[1]
            if dim > 1:  # both finite, their difference not
                big = torch.full((dim,), 3e38)
                assert not cpu_kernels.gather_marked(big, words, size, 1.0, minus=-big)[1]
                for spot in {0, dim - 1}:  # x finite, x_i * scale not: on the support or not, no mark
                    x = torch.ones(dim)
                    x[spot] = 3e38
                    got, finite = cpu_kernels.gather_marked(x, words, size, 2.0)
                    assert not finite and not cpu_kernels.known_finite(got)
                    assert got.numpy().tobytes() == x.index_select(0, ordered).mul_(2.0).numpy().tobytes()
                assert cpu_kernels.gather_marked(big, words, size, 1.0, minus=torch.ones(dim, dtype=torch.float64)) is None
    assert cpu_kernels.marked(torch.tensor([3, 5, 3], dtype=torch.int32), 10) is None  # equal values: refused
    repeated = torch.randperm(5000, generator=gen)[:3000]
    repeated[2999] = repeated[0]  # in another thread's share of the values where there are two
    assert cpu_kernels.marked(repeated, 5000) is None
    assert cpu_kernels.gather_marked(torch.ones(65), np.zeros(1, dtype=np.uint64), 0, 1.0) is None  # x beyond the bitmap
    assert cpu_kernels.scatter_marked(np.zeros(2, dtype=np.uint64), torch.ones(0), 100, torch.ones(99)) is None


def test_a_perm_k_value_that_overflows_is_refused_where_it_is_encoded():
    """Perm-K's gather marks its values finite only where every x_i * n is: a finite x_i whose
    product overflows on the block is still refused by the encoder (the values are read there), and
    one off the block leaves the message as it is."""
    dim = cpu_kernels.MIN_CHUNK + 1001
    c = build("permk", dim, 2, seed=4)
    x = torch.ones(dim)
    block = decode(encode(c.compress(x, worker=0, step=9))).support(torch.device("cpu"))
    outside = int(torch.ones(dim, dtype=torch.bool).index_fill_(0, block, False).nonzero()[0])
    x[int(block[5])] = 3e38
    with pytest.raises(WireError, match="not all finite"):
        encode(c.compress(x, worker=0, step=9))
    x[int(block[5])], x[outside] = 1.0, 3e38
    assert decode(encode(c.compress(x, worker=0, step=9))).to_dense().numpy().tobytes() == (
        torch.zeros(dim).index_fill_(0, block, 2.0).numpy().tobytes())


def _forget_marked_blocks():
    """Empty ``indices``' caches of the last step's bitmaps."""
    indices._last_image[0] = indices._last_blocks[0] = indices._last_asked[0] = None


@pytest.mark.parametrize("dim", [cpu_kernels.MIN_CHUNK, cpu_kernels.MIN_CHUNK + 1, 3 << 18, 1_000_003])
def test_every_block_marked_at_once_is_the_block_marked_alone(dim):
    """``indices.marked_blocks`` gives, for 3 to ``BLOCKS_AT_ONCE_MAX_N`` workers, each block's bitmap
    of the one-block way (its positions mapped forward): lengths that are a multiple of the
    network's rows (no cycle walk) or not, blocks that end on a row's edge or inside one."""
    for n in range(3, indices.BLOCKS_AT_ONCE_MAX_N + 1):
        key = dim * 31 + n
        blocks = indices.marked_blocks(dim, n, key)
        assert blocks is not None and blocks.shape[0] == n
        for k in range(n):
            start, size = indices._block(dim, n, k)
            alone = cpu_kernels.marked(indices.keyed_block(start, size, dim, key, torch.device("cpu")), dim)
            assert np.array_equal(blocks[k], alone), (dim, n, k)


def test_perm_k_marks_every_block_at_once_only_for_a_few_workers(monkeypatch):
    """Above ``BLOCKS_AT_ONCE_MAX_N`` workers each block is marked alone: the pass over every block
    costs about d n."""
    dim = cpu_kernels.MIN_CHUNK + 1001
    n = indices.BLOCKS_AT_ONCE_MAX_N + 1
    monkeypatch.setattr(cpu_kernels, "marked_blocks", lambda *a: pytest.fail("marked every block"))
    _forget_marked_blocks()
    c = build("permk", dim, n, seed=4)
    supports = [decode(encode(c.compress(torch.ones(dim), worker=w, step=3))).support(torch.device("cpu")) for w in range(n)]
    assert torch.equal(torch.sort(torch.cat(supports)).values, torch.arange(dim))


@pytest.mark.parametrize("n", [2, 3, 7])
def test_permk_messages_are_the_same_with_and_without_the_compiled_bijection(monkeypatch, n):
    """At a d where the compressor's path takes the compiled pass, every worker's message of a step
    has the same bytes as with the torch version, and the blocks still partition [d]; the bitmap's
    gather and scatter give the bytes of the sorted support's index_select and index_copy_. A block
    asked for alone is marked from the image side up to ``IMAGE_SIDE_MAX_N`` workers (n = 2 and 3),
    above from its values (n = 7); at n = 2 the second block is the first's complement; up to
    ``IMAGE_SIDE_MAX_N`` workers every block is marked alone, and above (n = 7) the second block
    asked for marks all of them from the image side (``marked_blocks``), where every other comes
    from; a block asked for again is not a second one. A MARINA-P server's downlinks
    (``every_block_asked``) mark every block at the first for n = 3 and 7, with the same bytes."""
    from types import SimpleNamespace

    from common.algorithms.marina_p_downlink import model_messages
    from common.compressors.payloads import add_dense

    dim = cpu_kernels.MIN_CHUNK + 1001
    x = torch.randn(dim, generator=torch.Generator().manual_seed(2))
    c = build("permk", dim, n, seed=4)
    calls = []
    alone_by = "marked_rows" if n <= indices.IMAGE_SIDE_MAX_N else "keyed_range"
    for name in ("marked_rows", "keyed_range", "marked_blocks"):
        real = getattr(cpu_kernels, name)
        monkeypatch.setattr(cpu_kernels, name, lambda *a, name=name, real=real: calls.append(name) or real(*a))
    _forget_marked_blocks()
    compiled = [encode(c.compress(x, worker=w, step=9)) for w in range(n)]
    if n == 2:
        assert calls == ["marked_rows"]  # the second block is the first's complement
    elif n <= indices.IMAGE_SIDE_MAX_N:  # each block alone
        assert calls == ["marked_rows"] * n
    else:  # the first block alone, then every block at once
        assert calls == [alone_by, "marked_blocks"]
    alone, before = [], len(calls)
    for w in range(n):
        _forget_marked_blocks()
        alone.append(encode(c.compress(x, worker=w, step=9)))
    assert alone == compiled and calls[before:] == [alone_by] * n
    assert [encode(c.compress(x, worker=w, step=10)) for w in range(n)] != compiled  # another step, another bitmap
    calls.clear()
    _forget_marked_blocks()
    twice = [encode(c.compress(x, worker=1, step=9)) for _ in range(2)]  # a worker's compress, then again
    assert twice == [compiled[1]] * 2 and "marked_blocks" not in calls
    calls.clear()
    _forget_marked_blocks()  # a MARINA-P server's downlinks: every block at the first (every_block_asked)
    downs = model_messages(SimpleNamespace(n=n), c, torch.zeros(dim), x, 9, sync=False)
    assert [encode(m.payloads["delta"]) for m in downs] == compiled
    if n > 2:
        assert calls == ["marked_blocks"]
    _forget_marked_blocks()
    monkeypatch.setattr(cpu_kernels, "marked_rows", lambda *a: None)
    monkeypatch.setattr(cpu_kernels, "keyed_range", lambda *a: None)
    monkeypatch.setattr(cpu_kernels, "marked_blocks", lambda *a: None)
    assert [encode(c.compress(x, worker=w, step=9)) for w in range(n)] == compiled
    monkeypatch.setattr(cpu_kernels, "sorted_distinct", lambda *a: None)  # torch's sort of the block
    assert [encode(c.compress(x, worker=w, step=9)) for w in range(n)] == compiled
    supports = [decode(f).support(torch.device("cpu")) for f in compiled]
    assert torch.equal(torch.sort(torch.cat(supports)).values, torch.arange(dim))
    h = torch.randn(dim, generator=torch.Generator().manual_seed(3))
    fused = [(decode(f).to_dense(), add_dense(h, decode(f))) for f in compiled]
    monkeypatch.setattr(indices, "marked_support", lambda rule: None)  # the sorted support, index_select and index_copy_
    assert [encode(c.compress(x, worker=w, step=9)) for w in range(n)] == compiled
    for f, (dense, added) in zip(compiled, fused):
        assert decode(f).to_dense().numpy().tobytes() == dense.numpy().tobytes()
        assert add_dense(h, decode(f)).numpy().tobytes() == added.numpy().tobytes()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("threads, vector", [(1, True), (3, True), (3, False)])
def test_topk_candidates_in_one_compiled_pass_are_the_torch_ones(dtype, threads, vector, monkeypatch):
    """Ties at the level, both zeros, NaN and inf, a level in x's own precision, and an ``expect`` far
    too small (the pieces run again with room for all); 16 coordinates at a time where the host has
    AVX-512 (``vector``), and a block's flags a word at a time."""
    from common.compressors import topk

    has_vectors = cpu_kernels.vector_compress()
    monkeypatch.setattr(cpu_kernels, "vector_compress", lambda: vector and has_vectors)
    monkeypatch.setattr(cpu_kernels, "_threads", lambda: threads)
    monkeypatch.setattr(cpu_kernels, "MIN_CHUNK", 1000)
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(50_001, generator=gen, dtype=dtype)
    x[::97] = 0.5
    x[1::97] = -0.5
    x[5] = float("nan")
    x[6] = float("-inf")
    x[7], x[8] = 0.0, -0.0
    level = torch.tensor(0.5, dtype=dtype)
    for expect in (1, 20_000):
        got, values, finite = cpu_kernels.indices_at_least(x, float(level), expect)
        assert got.dtype == torch.int64 and not finite
        assert torch.equal(got, torch.nonzero((x >= level).logical_or_(x <= -level)).flatten())
        assert values.dtype == dtype and torch.equal(values, x[got])
    assert torch.equal(topk._at_least(x, level, 10)[0], got)  # the compressor's path takes the compiled pass
    for bad in (5, 6):  # each of the NaN and the inf alone is seen, in whichever piece it lies
        y = x.clone()
        y[5 + 6 - bad] = 1.0
        for at in (bad, 49_000):
            z = y.clone()
            z[[bad, at]] = z[[at, bad]]
            assert not cpu_kernels.indices_at_least(z, float(level), 10)[2]
    y = x.clone()
    y[5], y[6] = 1.0, -torch.finfo(dtype).max
    assert cpu_kernels.indices_at_least(y, float(level), 10)[2]  # the largest finite value is finite
    monkeypatch.setattr(cpu_kernels, "indices_at_least", lambda *a: None)
    assert torch.equal(topk._at_least(x, level, 10)[0], got)  # and the block-wise torch pass agrees


def test_a_second_process_loads_every_kernel_from_the_disk_cache(tmp_path):
    """A kernel that Numba cannot find in its cache compiles again in every worker process (seconds
    at start-up): after one process has used every kernel, a second one must add no cache file."""
    import glob
    import os
    import subprocess
    import sys

    cache = os.path.join(os.path.dirname(cpu_kernels.__file__), "__pycache__")
    script = (
        "import torch\n"
        "from common.compressors import build\n"
        "from common.compressors.payloads import add_dense\n"
        "from common.wire import decode, encode\n"
        "x = torch.randn((1 << 20) + 5, generator=torch.Generator().manual_seed(0))\n"
        "for spec in ['natural', 'exprounding:base=3', 'natdither:s=2,p=inf', 'expdither:base=3,s=4,p=2',\n"
        "             'qsgd:s=16', 'ternary', 'sign:scale=l2', 'topk:ratio=0.01']:\n"
        "    for v in (x, x.double()):\n"
        "        c = build(spec, dim=v.numel(), n_workers=1, seed=0)\n"
        "        p = decode(encode(c.compress(v, worker=0, step=0)))\n"
        "        c.decompress(p)\n"
        "        add_dense(add_dense(v, p), p, inplace=True)\n"
        "from common.compressors import cpu_kernels\n"
        "for dtype in (torch.float32, torch.float64):\n"
        "    for rows in (2, 3, 4):\n"
        "        cpu_kernels.warm_descent(dtype, rows)\n"
        "        v = x.to(dtype)\n"
        "        cpu_kernels.mean_descend(v, 0.5, [v] * rows)\n"
        "        cpu_kernels.descend(v, 0.5, v)\n"
        "c = build('permk', dim=x.numel(), n_workers=4, seed=0)\n"
        "add_dense(x, c.compress(x, worker=1, step=0), inplace=True)\n"
        "c.compress(x, worker=2, step=0)\n"  # another block of the step: every block at once
        "for rows in (5, 8):\n"  # the mean of 5 to 14 rows, in ATen's order in the last columns
        "    cpu_kernels.mean_descend(x, 0.5, [x] * rows, interleaved_from=x.numel() - 5)\n"
        "from common.algorithms.memory import shift_by_mean\n"
        "from common.compressors.message import Message\n"
        "s = build('sign', dim=x.numel(), n_workers=8, seed=0).compress(x, worker=0, step=0)\n"
        "shift_by_mean(x, [Message({'c': s})] * 8, 'c')\n"
        "from common.compressors import indices\n"
        "indices.randk_support(x.numel(), x.numel() // 4, 5)\n"  # Rand-K's chunks
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root}
    subprocess.run([sys.executable, "-c", script], check=True, env=env, timeout=600)
    if not os.access(cache, os.W_OK):
        pytest.skip("the kernels' cache folder is not writable here")
    before = set(glob.glob(os.path.join(cache, "cpu_kernels.*.nbc")))
    subprocess.run([sys.executable, "-c", script], check=True, env=env, timeout=600)
    assert set(glob.glob(os.path.join(cache, "cpu_kernels.*.nbc"))) == before


@pytest.mark.parametrize("uplink, calls", [("topk:ratio=0.01", 2), ("identity", 0)])
def test_a_run_loads_its_compressors_kernels_before_the_clock_starts(uplink, calls, monkeypatch):
    """RunSetup.build runs the run's compressor once on the CPU (kernels load there, not in round 0),
    and once on a difference (a Markov message's fused pass: Top-K's candidates of x - h), and only
    for compressors that use the kernels."""
    from common.config import RunConfig
    from runtime.setup import RunSetup

    seen = []
    real = cpu_kernels.indices_at_least
    monkeypatch.setattr(cpu_kernels, "indices_at_least", lambda *a: seen.append(a) or real(*a))
    config = RunConfig(algorithm="ef21", uplink=uplink, downlink=uplink, workers=2, rounds=1, lr="0.1",
                       problem="quadratic:d=70000")
    RunSetup.build(config)
    assert len(seen) == calls
    assert [len(a) > 3 and a[3] is not None for a in seen] == [False, True][:calls]  # (the second with h)


@pytest.mark.parametrize("workers, at_once", [(2, 0), (4, 0), (8, 1)])
def test_a_perm_k_run_marks_every_block_at_once_before_the_clock_starts(workers, at_once, monkeypatch):
    """RunSetup.build compresses a second worker's block too where there are more than 2 workers,
    so that the pass that marks every Perm-K block of a step (a server's) loads before round 0: above
    ``IMAGE_SIDE_MAX_N`` workers through ``marked_blocks``; up to it the blocks are marked alone
    from the image side, by the same kernels."""
    from common.config import RunConfig
    from runtime.setup import RunSetup

    seen = []
    real = cpu_kernels.marked_blocks
    monkeypatch.setattr(cpu_kernels, "marked_blocks", lambda *a: seen.append(a) or real(*a))
    _forget_marked_blocks()
    RunSetup.build(RunConfig(algorithm="marina-p", workers=workers, rounds=1, lr="0.1",
                             problem=f"quadratic:d={cpu_kernels.MIN_CHUNK + 1}"))
    assert len(seen) == at_once


def test_a_sign_run_loads_the_shift_kernels_before_the_clock_starts(monkeypatch):
    """The Markov shift and the running mean of sign payloads (``add_dense``) are loaded by the
    warm-up too, both the kernel that writes a new vector and the one that adds in place, and the
    server's shift by the mean of the workers' signs."""
    from common.config import RunConfig
    from runtime.setup import RunSetup

    seen = []
    real = cpu_kernels.signs_added

    def spy(*args):
        result = real(*args)
        seen.append((args[-1], result is not None))  # (in place, the compiled pass ran)
        return result

    monkeypatch.setattr(cpu_kernels, "signs_added", spy)
    real_mean = cpu_kernels.signs_mean_added

    def mean_spy(*args):
        result = real_mean(*args)
        seen.append(("mean", result is not None))
        return result

    monkeypatch.setattr(cpu_kernels, "signs_mean_added", mean_spy)
    RunSetup.build(RunConfig(algorithm="cd-adam", workers=2, rounds=1, lr="0.01", problem=f"quadratic:d={cpu_kernels.MIN_CHUNK}"))
    assert sorted(seen, key=str) == sorted([(False, True), (True, True), ("mean", True)], key=str)


# --- the scaled-sign expansion and the AMSGrad step --------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scale", [0.0, 1.5, 1e-40, 3.0e38, float("inf")])
def test_signs_expand_to_the_bits_of_the_torch_path(dtype, scale):
    from common.compressors.payloads import Signs

    n = cpu_kernels.MIN_CHUNK + 12345
    negative = torch.rand(n, generator=torch.Generator().manual_seed(1)) < 0.5
    payload = Signs(negative, torch.tensor(scale, dtype=torch.float32), dtype)
    fused = cpu_kernels.signs_to_dense(negative, payload.scale, dtype)
    reference = torch.where(negative, -payload.scale.to(dtype), payload.scale.to(dtype))
    assert fused.dtype == dtype and torch.equal(fused.view(torch.uint8), reference.view(torch.uint8))
    assert torch.equal(payload.to_dense().view(torch.uint8), reference.view(torch.uint8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_sign_payload_adds_to_a_vector_and_into_a_mean_with_the_torch_bits(dtype):
    """``add_dense`` (the Markov shift) and ``mean_of`` add a scaled-sign payload without its dense
    form; the result must be h + to_dense() and torch.stack(...).mean(0) bit for bit, with zeros of
    both signs, values over many magnitudes, infinities in h and sums that overflow to inf (a payload
    of scale near the dtype's largest value), in place or not, for n = 2..5."""
    from common.algorithms.base import mean_of
    from common.compressors.message import Message
    from common.compressors.payloads import add_dense

    n = cpu_kernels.MIN_CHUNK + 4097
    gen = torch.Generator().manual_seed(4)
    sign = build("sign", n, n_workers=5)
    h = (torch.randn(n, generator=gen, dtype=torch.float64) * 10.0 ** torch.randint(-30, 30, (n,), generator=gen)).to(dtype)
    big = torch.finfo(dtype).max
    h[:6] = torch.tensor([0.0, -0.0, big, -big, float("inf"), -float("inf")], dtype=dtype)
    payloads = []
    for worker in range(5):
        x = torch.randn(n, generator=gen, dtype=dtype)
        x[worker::9] = -0.0
        payloads.append(sign.compress(x, worker=worker, step=1))
    huge = sign.compress(torch.full((n,), big / 2, dtype=dtype), worker=0, step=1)
    assert torch.isinf(h + huge.to_dense()).sum() > 2  # big + big / 2 overflows
    for p in payloads + [huge]:
        expected = (h + p.to_dense()).view(torch.uint8)
        assert torch.equal(add_dense(h, p).view(torch.uint8), expected)
        inplace = h.clone()
        assert add_dense(inplace, p, inplace=True) is inplace and torch.equal(inplace.view(torch.uint8), expected)
    for k in range(2, 6):
        expected = torch.stack([p.to_dense() for p in payloads[:k]]).mean(0)
        got = mean_of([Message({"c": p}) for p in payloads[:k]], "c")
        assert torch.equal(got.view(torch.uint8), expected.view(torch.uint8)), k


def test_a_sign_payload_of_another_length_is_not_added_silently():
    from common.compressors.payloads import add_dense

    n = cpu_kernels.MIN_CHUNK + 1
    p = build("sign", n).compress(torch.randn(n), worker=0, step=0)
    with pytest.raises(RuntimeError):
        add_dense(torch.zeros(n + 1), p)


def _torch_amsgrad(x, m, v, v_hat, g, b1, b2, lr, nu):
    """amsgrad_state's torch expressions, verbatim."""
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    v_hat = torch.maximum(v_hat, v)
    return x - lr * m / torch.sqrt(v_hat + nu), m, v, v_hat


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_compiled_amsgrad_step_gives_the_bits_of_torch_over_many_steps(dtype):
    """Values over many magnitudes (where a fused multiply-add or another order would show), zeros,
    and 8 steps in a row, against the torch expressions it replaces; also through a rule."""
    n = cpu_kernels.MIN_CHUNK * 2 + 77
    gen = torch.Generator().manual_seed(3)

    def draw():
        return (torch.randn(n, generator=gen, dtype=torch.float64)
                * 10.0 ** torch.randint(-20, 6, (n,), generator=gen)).to(dtype)

    ours = theirs = (draw(), torch.zeros(n, dtype=dtype), torch.zeros(n, dtype=dtype), torch.zeros(n, dtype=dtype))
    for step in range(8):
        g = draw()
        g[::1000] = 0.0
        ours = cpu_kernels.amsgrad_step(*ours, g, 0.9, 0.99, 0.003, 1e-8)
        theirs = _torch_amsgrad(*theirs, g, 0.9, 0.99, 0.003, 1e-8)
        for a, b in zip(ours, theirs):
            assert a.dtype == dtype and torch.equal(a, b), step


def test_the_compiled_amsgrad_step_leaves_nan_and_small_vectors_as_torch_does():
    n = cpu_kernels.MIN_COMPILED
    x, m, v, v_hat = (torch.ones(n) for _ in range(4))
    g = torch.ones(n)
    g[5] = float("nan")
    ours = cpu_kernels.amsgrad_step(x, m, v, v_hat, g, 0.9, 0.99, 0.1, 1e-8)
    theirs = _torch_amsgrad(x, m, v, v_hat, g, 0.9, 0.99, 0.1, 1e-8)
    for a, b in zip(ours, theirs):
        assert torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0)) and a.isnan().equal(b.isnan())
    assert cpu_kernels.amsgrad_step(*(torch.ones(n - 1) for _ in range(5)), 0.9, 0.99, 0.1, 1e-8) is None
    assert cpu_kernels.amsgrad_step(x, m, v, v_hat, g.double(), 0.9, 0.99, 0.1, 1e-8) is None  # mixed dtypes


@pytest.mark.parametrize("dim", [cpu_kernels.MIN_COMPILED + 3, cpu_kernels.MIN_CHUNK + 3])
def test_cd_adam_runs_to_the_same_model_with_the_compiled_passes(dim, monkeypatch):
    """A CD-Adam run long enough for the compiled sign expansion and AMSGrad step (on one thread below
    ``MIN_CHUNK``) gives the model that the torch paths give, bit for bit."""
    from common.config import RunConfig
    from runtime.engine import run_inproc

    config = RunConfig(algorithm="cd-adam", workers=3, rounds=4, problem=f"identity-quadratic:d={dim}",
                       lr="0.01", eval_every=100)
    fused = run_inproc(config, None, progress=False).model_digest()
    monkeypatch.setattr(cpu_kernels, "amsgrad_step", lambda *args: None)
    monkeypatch.setattr(cpu_kernels, "signs_to_dense", lambda *args: None)
    monkeypatch.setattr(cpu_kernels, "signs_added", lambda *args: None)
    monkeypatch.setattr(cpu_kernels, "signs_mean_added", lambda *args: None)
    assert run_inproc(config, None, progress=False).model_digest() == fused


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [(1 << 20) + 4_099, 9 * FLOAT64_BLOCK * cpu_kernels.FLAG_GROUP + 61])
def test_the_norm_writes_negative_flags_in_its_pass_as_torch_lt_and_keeps_its_bits(n, dtype, threads, monkeypatch):
    """Sign's flags come from the norm's compiled pass, a group of blocks at a time: x < 0 exactly
    (False for NaN and -0), in every group, last piece and thread's share, and the norm unchanged."""
    monkeypatch.setattr(cpu_kernels, "_threads", lambda: threads)
    x = _norm_inputs(n, dtype)["wide"]
    x[:4] = torch.tensor([0.0, -0.0, 1.0, -1.0], dtype=dtype)
    x[n // 3] = -0.0
    x[-2:] = torch.tensor([-3.0, 0.0], dtype=dtype)
    for p in (1, 2):
        negative = torch.ones(n, dtype=torch.bool)
        got = float64_norm(x, p, negative)
        assert torch.equal(negative, x < 0)
        assert torch.equal(got, float64_norm(x, p))
    for bad in (float("nan"), -float("nan"), float("inf"), -float("inf")):  # flags of non-finite values too
        y = x.clone()
        y[n // 2] = bad
        negative = torch.zeros(n, dtype=torch.bool)
        float64_norm(y, 1, negative)
        assert torch.equal(negative, y < 0)


def _difference_inputs(n: int, dtype, gen) -> tuple[torch.Tensor, torch.Tensor]:
    """A target and an h of magnitudes 1e-8 to 1e8 with equal coordinates (a difference of +0) and
    signed zeros on both sides."""
    target, h = (torch.randn(n, generator=gen, dtype=torch.float64) * 10.0 ** torch.randint(-8, 8, (n,), generator=gen)
                 for _ in range(2))
    target, h = target.to(dtype), h.to(dtype)
    h[::7] = target[::7]
    target[::11], h[::11] = -0.0, 0.0
    target[5::13], h[5::13] = 0.0, -0.0
    return target, h


def _a_difference_refuses_what_the_formed_difference_refuses(c, target, h):
    """``c.compress_difference`` raises as ``c.compress(target - h)`` for a NaN or inf in either
    vector, a difference that overflows, another length and a worker out of range."""
    largest = torch.finfo(target.dtype).max
    for bad_target, bad_h in ((float("nan"), 0.0), (0.0, float("inf")), (largest, -largest)):
        t, g = target.clone(), h.clone()
        t[t.numel() // 2 + 1], g[t.numel() // 2 + 1] = bad_target, bad_h
        with pytest.raises(ValueError, match="1 non-finite value"):
            c.compress(t - g)
        with pytest.raises(ValueError, match="1 non-finite value"):
            c.compress_difference(t, g)
    with pytest.raises(ValueError, match="coordinates"):
        c.compress_difference(target, h[1:])
    with pytest.raises(ValueError, match="worker"):
        c.compress_difference(target, h, worker=c.n_workers)


@pytest.mark.parametrize("n", [5_003, (1 << 18) + 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_identity_of_a_difference_is_the_difference_without_a_copy(dtype, n):
    """``Identity.compress_difference`` (EF21's default downlink) sends target - h itself: the same
    bytes as ``compress(target - h)``, a vector that aliases neither input, the promoted dtype of
    mixed inputs, and the same refusals; long vectors from the compiled step, marked finite."""
    gen = torch.Generator().manual_seed(3)
    target, h = torch.randn(n, generator=gen, dtype=dtype), torch.randn(n, generator=gen, dtype=dtype)
    target[:3] = torch.tensor([0.0, -0.0, 1.0], dtype=dtype)
    h[:3] = torch.tensor([-0.0, -0.0, 1.0], dtype=dtype)
    c = build("identity", n, 3)
    got = c.compress_difference(target, h, worker=2, step=4)
    assert encode(got) == encode(c.compress(target - h, worker=2, step=4))
    assert cpu_kernels.known_finite(got.values) == (n > cpu_kernels.MIN_CHUNK)
    kept = got.values.clone()
    target.add_(1.0), h.sub_(1.0)  # the sender's state moves on; the message does not
    assert torch.equal(got.values, kept)
    mixed = c.compress_difference(target.to(torch.float32), h.to(torch.float64))
    assert mixed.dtype == mixed.values.dtype == torch.float64
    assert encode(mixed) == encode(c.compress(target.to(torch.float32) - h.to(torch.float64)))
    _a_difference_refuses_what_the_formed_difference_refuses(c, target, h)


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_scaled_sign_of_a_difference_is_the_sign_of_the_difference_formed_first(dtype, threads, monkeypatch):
    """``Sign.compress_difference`` (the Markov message C(target - h), the difference formed a few
    blocks at a time in the norm's pass) gives the bytes of ``compress(target - h)``: both scales,
    vectors shorter than, at and beyond ``MIN_CHUNK`` (one group, several, a last partial one), equal
    coordinates and signed zeros, other dtypes (formed first); the same errors for bad input."""
    monkeypatch.setattr(cpu_kernels, "_threads", lambda: threads)
    gen = torch.Generator().manual_seed(8)
    calls = []
    real = cpu_kernels.float64_sum
    monkeypatch.setattr(cpu_kernels, "float64_sum", lambda *a: calls.append(len(a) > 4 and a[4] is not None) or real(*a))
    for n in (cpu_kernels.MIN_CHUNK - 1, cpu_kernels.MIN_CHUNK, 9 * FLOAT64_BLOCK * cpu_kernels.FLAG_GROUP + 61):
        target, h = _difference_inputs(n, dtype, gen)
        for scale in ("l1", "l2"):
            c = build(f"sign:scale={scale}", n, 3)
            calls.clear()
            assert encode(c.compress_difference(target, h, worker=2, step=4)) == encode(c.compress(target - h, worker=2, step=4))
            assert any(calls) == (n >= cpu_kernels.MIN_CHUNK)  # the difference in the pass where it is long
        other = h.double() if dtype == torch.float32 else h.float()  # promoted by torch: formed first
        assert encode(c.compress_difference(target, other)) == encode(c.compress(target - other))
    _a_difference_refuses_what_the_formed_difference_refuses(c, target, h)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rand_k_of_a_difference_is_rand_k_of_the_difference_formed_first(dtype, monkeypatch):
    """``RandK.compress_difference`` (MARINA's and M3's uplink, Q(grad - grad_prev)) gives the bytes
    of ``compress(target - h)``: through the bitmap with the difference formed in the gather (long
    supports, scaled or not, same-Rand-K, signed zeros, equal coordinates), and formed first
    elsewhere (a short support, another dtype); the same errors for bad input."""
    gen = torch.Generator().manual_seed(12)
    n = (1 << 18) + 4099
    target, h = _difference_inputs(n, dtype, gen)
    used = []
    real = cpu_kernels.gather_marked
    monkeypatch.setattr(cpu_kernels, "gather_marked", lambda *a: used.append(len(a) > 4 and a[4] is not None) or real(*a))
    for spec, bitmap in (("randk:ratio=0.25", True), ("randk:ratio=0.5,scaled=false", True), ("samerandk:ratio=0.1", True),
                         ("randk:ratio=0.01", False)):
        c = build(spec, n, 3)
        used.clear()
        assert encode(c.compress_difference(target, h, worker=2, step=4)) == encode(c.compress(target - h, worker=2, step=4))
        assert used == ([True, False] if bitmap else []), spec
    other = h.double() if dtype == torch.float32 else h.float()  # promoted by torch: formed first
    assert encode(c.compress_difference(target, other)) == encode(c.compress(target - other))
    _a_difference_refuses_what_the_formed_difference_refuses(build("randk:ratio=0.25", n, 3), target, h)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_servers_shift_by_the_mean_of_signs_is_the_shift_by_the_mean_formed_first(dtype):
    """``memory.shift_by_mean`` (EF21's and CD-Adam's server state h + (1/n) sum_i c_i) in one
    compiled pass over scaled-sign payloads gives the bits of ``shift(h, mean_of(...))``, signed
    zeros included, for 2 to 4 uplinks, and for 5 to 14 with ATen's order in the last columns (the
    bits of stacking the dense forms); 15 uplinks, short vectors and other payloads take ``mean_of``
    and a shift by it."""
    from common.algorithms.base import mean_of
    from common.algorithms.memory import shift, shift_by_mean
    from common.compressors.message import Message

    gen = torch.Generator().manual_seed(12)
    for n in (cpu_kernels.MIN_CHUNK + 77, 5000):
        h = torch.randn(n, generator=gen, dtype=dtype) * 1e3
        h[:3] = torch.tensor([-0.0, 0.0, -0.0], dtype=dtype)
        for k in (2, 3, 4, 5, 8, 14, 15):
            xs = [torch.randn(n, generator=gen, dtype=dtype) * 10.0 ** (i % 7) for i in range(k)]
            if k == 2:
                xs[1] = -xs[0]  # sums of +s and -s: zeros
            ups = [Message({"c": decode(encode(build("sign", n, k).compress(x, worker=i, step=1)))}) for i, x in enumerate(xs)]
            calls = []
            real = cpu_kernels.signs_mean_added
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(cpu_kernels, "signs_mean_added", lambda *a: calls.append(1) or real(*a))
                got = shift_by_mean(h, ups, "c")
            stacked = torch.stack([u.payloads["c"].to_dense() for u in ups]).mean(0)
            assert got.view(torch.uint8).equal(shift(h, stacked).view(torch.uint8)), (n, k)
            assert bool(calls) == (k <= 14) and (real(h, [u.payloads["c"].negative for u in ups[:2]],
                                                      [u.payloads["c"].scale for u in ups[:2]]) is None) == (n < cpu_kernels.MIN_CHUNK)
    n = cpu_kernels.MIN_CHUNK + 77
    h = torch.randn(n, generator=gen, dtype=dtype)
    mixed = [Message({"c": decode(encode(build(spec, n, 2).compress(torch.randn(n, generator=gen, dtype=dtype), worker=i, step=1)))})
             for i, spec in enumerate(("sign", "topk:ratio=0.01"))]
    assert shift_by_mean(h, mixed, "c").view(torch.uint8).equal(shift(h, mean_of(mixed, "c")).view(torch.uint8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_servers_shift_by_the_mean_of_long_rand_k_uplinks_reads_their_bitmaps(dtype, monkeypatch):
    """``memory.shift_by_mean`` over 2 to 4 Rand-K uplinks of at least d / 16 coordinates (M3's
    uplink) adds them through their bitmaps (``cpu_kernels.marked_mean_added``), in several pieces,
    with the bits of h + the mean of the stacked dense forms and of the index arrays' pass (the
    bitmaps' ratio set out of reach): signed zeros in h and in the values, means that round to -0
    onto h's -0, in place wherever the caller owns h (the index arrays' pass only where h is marked
    free of -0) and not; a vector written in place loses its marks, and the result is marked free of
    negative zeros exactly where it holds none. Five uplinks take the index arrays."""
    from common.algorithms.memory import shift_by_mean
    from common.compressors.message import Message
    from common.compressors.payloads import Dense, Sparse

    monkeypatch.setattr(cpu_kernels, "_threads", lambda: 2)
    monkeypatch.setattr(cpu_kernels, "MIN_CHUNK", 4096)
    gen = torch.Generator().manual_seed(5)
    d = 70_001
    tiny = torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps  # the smallest subnormal
    ratio = indices.RANDK_MARKED_RATIO
    calls = []
    real = cpu_kernels.marked_mean_added
    monkeypatch.setattr(cpu_kernels, "marked_mean_added", lambda *a: calls.append(real(*a)) or calls[-1])
    for n in (2, 3, 4, 5):
        for underflow in (False, True):
            h = torch.randn(d, generator=gen, dtype=dtype) * 1e3
            h[::9] = -0.0
            c = build(f"randk:k={d // n}", dim=d, n_workers=n, seed=1)
            uplinks = []
            for i in range(n):
                x = torch.randn(d, generator=gen, dtype=dtype) * 10.0 ** i
                x[::5] = -0.0
                p = c.compress(x, worker=i, step=2)
                values = p.values.to_dense().clone()
                if underflow:  # (t + 0) / n rounds to -0 where h holds -0: -0 + -0 stays -0
                    values[torch.from_numpy(indices.randk_support(d, p.rule.count, p.rule.key) % 9 == 0)] = -tiny
                uplinks.append(Message({"c": Sparse(d, Dense(values, dtype), None, p.rule, dtype)}))
            mean = torch.stack([u.payloads["c"].to_dense() for u in uplinks]).mean(0)
            clean = h.clone()
            clean[::9] = 0.0
            for start, owned in ((h, False), (h, True), (clean, True)):
                want = (start + mean).view(torch.uint8)
                for marked in (ratio, 1):
                    monkeypatch.setattr(indices, "RANDK_MARKED_RATIO", marked)
                    calls.clear()
                    vector = start.clone()
                    if start is clean:
                        cpu_kernels.without_negative_zero.note(vector)  # then the index arrays' pass writes in place too
                    cpu_kernels._finite.note(vector)
                    got = shift_by_mean(vector, uplinks, "c", owned=owned)
                    bitmaps = marked == ratio and n <= 4
                    assert (got is vector) == (owned if bitmaps else start is clean), (n, marked)
                    assert got is not vector or not cpu_kernels.known_finite(got)  # written: its marks dropped
                    assert (len(calls) == 1 and calls[0] is not None) == (marked == ratio and n <= 4), (n, marked)
                    assert torch.equal(got.view(torch.uint8), want), (n, underflow, owned, marked)
                    holds_no_negative_zero = not bool(((got == 0) & got.signbit()).any())
                    assert cpu_kernels.without_negative_zero.holds(got) == holds_no_negative_zero
                    assert holds_no_negative_zero != (underflow and start is h), (n, underflow)
    monkeypatch.setattr(indices, "RANDK_MARKED_RATIO", ratio)
    rules = [u.payloads["c"].rule for u in uplinks[:2]]
    words = [indices.randk_marked(d, r.count, r.key) for r in rules]
    values = [u.payloads["c"].values.to_dense() for u in uplinks[:2]]
    kept, _ = real(h, words, values)
    mixed, _ = real(h, [words[0], words[1].copy()], values)  # a writable bitmap beside a kept, read-only one
    assert torch.equal(kept.view(torch.uint8), mixed.view(torch.uint8))
    assert real(h, [words[0], words[1].view(np.int64)], values) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_servers_shift_by_the_mean_of_sparse_uplinks_is_the_shift_by_the_mean_formed_first(dtype):
    """``memory.shift_by_mean`` over Top-K and Rand-K uplinks (h + 0, then the mean merged on the union
    of the supports) gives the bits of ``shift(h, mean_of(...))`` for 2 to 4 uplinks: supports that
    overlap or not, signed zeros in h and in the values, empty supports, values of a quantizer (a chain);
    and for 5 to 14 (the last columns in ATen's order) those of h + the mean of the stacked dense
    forms. 15 uplinks and short vectors take ``mean_of`` and a shift by it; a support out of order,
    repeated or out of range is refused by the merge and the reference path decides."""
    from common.algorithms.base import mean_of
    from common.algorithms.memory import shift, shift_by_mean
    from common.compressors.message import Message
    from common.compressors.payloads import Dense, Sparse

    def sparse(n, idx, vals):
        return Message({"c": Sparse(n, Dense(vals.to(dtype), dtype), torch.as_tensor(idx, dtype=torch.int64), dtype=dtype)})

    def same(h, ups):
        stacked = torch.stack([u.payloads["c"].to_dense() for u in ups]).mean(0)
        return (shift_by_mean(h, ups, "c").view(torch.uint8).equal(shift(h, stacked).view(torch.uint8))
                and shift(h, mean_of(ups, "c")).view(torch.uint8).equal(shift(h, stacked).view(torch.uint8)))

    gen = torch.Generator().manual_seed(21)
    n = cpu_kernels.MIN_CHUNK + 77
    h = torch.randn(n, generator=gen, dtype=dtype) * 1e3
    h[:6] = torch.tensor([-0.0, 0.0, -0.0, -0.0, 5.0, -0.0], dtype=dtype)
    calls = []
    real = cpu_kernels.sparse_mean_added
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cpu_kernels, "sparse_mean_added", lambda *a, **kw: calls.append(real(*a, **kw)) or calls[-1])
        for k in (2, 3, 4, 5, 9, 15):
            for ratio in (0.001, 0.05):
                xs = [torch.randn(n, generator=gen, dtype=dtype) * 10.0 ** (i % 5) for i in range(k)]
                xs[1][: n // 2] = xs[0][: n // 2]  # supports that overlap on the first half
                for x in xs:
                    x[-77:] *= 1e6  # every support holds the last columns, where ATen's order differs
                ups = [Message({"c": decode(encode(build(f"topk:ratio={ratio}", n, k).compress(x, worker=i, step=1)))})
                       for i, x in enumerate(xs)]
                calls.clear()
                assert same(h, ups), (k, ratio)
                assert (len(calls) == 1 and calls[0] is not None) == (k <= 14), (k, ratio)
        # signed zeros on the supports, a sum of opposite values, an empty support
        zeros = sparse(n, [0, 1, 2, 4, 9], torch.tensor([-0.0, -0.0, 0.0, -0.0, 3.0]))
        opposite = sparse(n, [0, 2, 3, 4, 9, n - 1], torch.tensor([-0.0, -0.0, -0.0, 0.0, -3.0, 1.0]))
        empty = sparse(n, [], torch.zeros(0))
        for ups in ([zeros, opposite], [opposite, zeros], [zeros, empty], [empty, empty], [zeros, opposite, empty]):
            calls.clear()
            assert same(h, ups)
            assert calls and calls[0] is not None
        chain = [Message({"c": decode(encode(build("topk:ratio=0.01+natdither:s=2,p=inf", n, 2).compress(
            torch.randn(n, generator=gen, dtype=dtype), worker=i, step=1)))}) for i in range(2)]
        calls.clear()
        assert same(h, chain) and calls and calls[0] is not None
        for bad in ([3, 2], [2, 2], [1, n]):
            ups = [sparse(n, bad, torch.ones(2)), zeros]
            assert real(h, [u.payloads["c"].indices for u in ups], [u.payloads["c"].values.values for u in ups]) is None
        calls.clear()
        unordered = [sparse(n, [3, 2], torch.tensor([1.0, 2.0])), zeros]
        assert same(h, unordered) and calls == [None]  # the merge refused it; the dense mean gave the state
        # Rand-K's supports come from its key (MARINA's and M3's g): merged too; Perm-K's keep the dense mean
        for spec, merged in (("randk:ratio=0.01", True), ("samerandk:ratio=0.05", True),
                             ("randk:ratio=0.01+natural", True), ("permk", False)):
            ups = [Message({"c": decode(encode(build(spec, n, 3).compress(torch.randn(n, generator=gen, dtype=dtype),
                                                                        worker=i, step=2)))}) for i in range(3)]
            calls.clear()
            assert same(h, ups), spec
            assert (len(calls) == 1 and calls[0] is not None) == merged, spec
    short = 5000
    hs = torch.randn(short, generator=gen, dtype=dtype)
    ups = [Message({"c": decode(encode(build("topk:ratio=0.01", short, 2).compress(torch.randn(short, generator=gen, dtype=dtype), worker=i, step=1)))})
           for i in range(2)]
    assert same(hs, ups) and real(hs, [u.payloads["c"].indices for u in ups], [u.payloads["c"].values.to_dense() for u in ups]) is None


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_top_k_of_a_difference_is_top_k_of_the_difference_formed_first(dtype, threads, monkeypatch):
    """``TopK.compress_difference`` (EF21's Markov message, the difference formed in the candidate
    pass's groups and at the sample) gives the bytes of ``compress(target - h)``: several k, short
    vectors and large k (formed first), ties, a difference of zeros, candidates far beyond the
    sample's estimate (the output grown and a group run again); the same errors for bad input."""
    monkeypatch.setattr(cpu_kernels, "_threads", lambda: threads)
    gen = torch.Generator().manual_seed(21)
    calls = []
    real = cpu_kernels.indices_at_least
    monkeypatch.setattr(cpu_kernels, "indices_at_least", lambda *a: calls.append(len(a) > 3 and a[3] is not None) or real(*a))
    n = 5 * cpu_kernels.DIFFERENCE_GROUP // 2 + 77
    target, h = (torch.randn(n, generator=gen, dtype=dtype) for _ in range(2))
    h[::7] = target[::7]  # zeros of the difference
    target[3::11] = h[3::11] + 0.75  # ties in |target - h|
    crowded = target.clone()
    region = slice(cpu_kernels.DIFFERENCE_GROUP, 2 * cpu_kernels.DIFFERENCE_GROUP)
    crowded[region] = h[region] + 50.0  # where the sample sees none of them:
    crowded[region][::16] = h[region][::16]  # the stride is 16 here
    cases = [(target, h, spec) for spec in ("topk:ratio=0.01", "topk:ratio=0.05", "topk:k=1", "topk:ratio=0.5")]
    cases += [(target[:5000], h[:5000], "topk:ratio=0.01"), (h, h, "topk:ratio=0.01"), (crowded, h, "topk:ratio=0.01")]
    for t, g, spec in cases:
        c = build(spec, t.numel(), 2)
        calls.clear()
        assert encode(c.compress_difference(t, g, worker=1, step=2)) == encode(c.compress(t - g, worker=1, step=2)), spec
        sampled = t.numel() >= 1 << 16 and c.k <= t.numel() // 4  # (a difference of zeros too: its nonzeros are the candidates)
        assert (True in calls) == sampled, (spec, t.numel())
    other = h.double() if dtype == torch.float32 else h.float()  # promoted by torch: formed first
    c = build("topk:ratio=0.01", n, 2)
    assert encode(c.compress_difference(target, other)) == encode(c.compress(target - other))
    _a_difference_refuses_what_the_formed_difference_refuses(c, target, h)


def test_the_norm_writes_negative_flags_where_it_is_not_compiled(monkeypatch):
    """Short vectors, and long ones without the kernel, get their flags from torch.lt."""
    gen = torch.Generator().manual_seed(5)
    for n in (1000, (1 << 20) + 7):
        x = torch.randn(n, generator=gen)
        x[:2] = torch.tensor([-0.0, float("nan")])
        for kernel in (True, False):
            if not kernel:
                monkeypatch.setattr(cpu_kernels, "float64_sum", lambda *a: None)
            negative = torch.zeros(n, dtype=torch.bool)
            float64_norm(x, 1, negative)
            assert torch.equal(negative, x < 0), (n, kernel)


# --- the step x - lr g and the mean of dense uplinks ------------------------------------------------


def _wide(n, gen, dtype):
    """Values over many magnitudes (where another rounding order would show), zeros of both signs, and
    a band large enough for x - lr * mean to overflow to -inf."""
    v = (torch.randn(n, generator=gen, dtype=torch.float64) * 10.0 ** torch.randint(-20, 20, (n,), generator=gen)).to(dtype)
    v[::7] = -0.0
    v[1::7] = 0.0
    v[2::97] = torch.finfo(dtype).max / 2
    return v


def _torch_mean_descend(x, lr, rows):
    total = torch.add(rows[0], rows[1])
    for r in rows[2:]:
        total.add_(r)
    return x - lr * total.add_(0.0).div_(len(rows))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_compiled_step_and_mean_give_the_bits_of_torch(dtype):
    """descend is x - lr * g and mean_descend is the running mean then x - lr * mean, bit for bit (the
    sign of zero included, inf where the step overflows), for 2..4 rows and several step sizes; and
    for 5..14 rows, told where ATen's last columns start, torch's mean of the stacked rows."""
    n = cpu_kernels.MIN_CHUNK * 2 + 77
    gen = torch.Generator().manual_seed(5)
    x = _wide(n, gen, dtype)
    x[2::97] = -torch.finfo(dtype).max  # x - lr * (large) overflows to -inf there
    rows = [_wide(n, gen, dtype) for _ in range(14)]
    group = row_order.group(dtype)  # None on a torch build whose order row_order does not know
    for k in cpu_kernels.ORDERED_MEAN_ROWS if group else ():
        cut = n - n % group
        want = x - 0.3 * torch.stack(rows[:k]).mean(0)
        got = cpu_kernels.mean_descend(x, 0.3, rows[:k], interleaved_from=cut)
        assert got.numpy().tobytes() == want.numpy().tobytes(), k
    for lr in (0.1, 3.0, 1e-30, 2):
        got = cpu_kernels.descend(x, lr, rows[0])
        assert got.dtype == dtype and got.numpy().tobytes() == (x - lr * rows[0]).numpy().tobytes(), lr
        for k in (2, 3, 4):
            want = _torch_mean_descend(x, lr, rows[:k])
            assert torch.isinf(want).any() or lr < 0.1  # the step (or, for 3 rows, the sum) overflows
            got = cpu_kernels.mean_descend(x, lr, rows[:k])
            assert got.dtype == dtype and got.numpy().tobytes() == want.numpy().tobytes(), (lr, k)


def test_the_compiled_step_leaves_what_it_cannot_do_to_torch():
    n = cpu_kernels.MIN_CHUNK
    x, g = torch.ones(n), torch.full((n,), float("nan"))
    assert torch.equal(cpu_kernels.descend(x, 0.5, g).isnan(), torch.ones(n, dtype=torch.bool))  # NaN goes through
    short = torch.ones(n - 1)
    assert cpu_kernels.descend(short, 0.5, short) is None  # small vectors: torch's ops
    assert cpu_kernels.descend(x, 0.5, g.double()) is None  # mixed dtypes
    assert cpu_kernels.descend(x.half(), 0.5, g.half()) is None
    assert cpu_kernels.descend(x, torch.tensor(0.5), g) is None  # a tensor step size
    assert cpu_kernels.descend(x, 0.5, torch.ones(2 * n)[::2]) is None  # not contiguous
    assert cpu_kernels.mean_descend(x, 0.5, [x]) is None
    assert cpu_kernels.mean_descend(x, 0.5, [x] * 5) is None  # where the running sum is not torch's mean
    assert cpu_kernels.mean_descend(x, 0.5, [x] * 15, interleaved_from=n) is None  # too many rows for one pass
    assert cpu_kernels.mean_descend(x, 0.5, [x, torch.ones(n + 1)]) is None  # different lengths


def test_a_long_run_loads_the_step_kernels_before_the_clock_starts(monkeypatch):
    """RunSetup.build loads descend and mean_descend for the run's dtype and number of workers, for a
    dense run too, and not for vectors that take torch's ops."""
    from common.config import RunConfig
    from runtime.setup import RunSetup

    seen = []
    monkeypatch.setattr(cpu_kernels, "warm_descent", lambda *args: seen.append(args))
    for d in (cpu_kernels.MIN_COMPILED, cpu_kernels.MIN_COMPILED - 1):
        RunSetup.build(RunConfig(algorithm="gd", workers=3, rounds=1, lr="0.1", problem=f"identity-quadratic:d={d}"))
    assert seen == [(torch.float32, 3)]
    monkeypatch.undo()
    kernels = cpu_kernels._kernels()
    cpu_kernels.warm_descent(torch.float64, 3)
    loaded = {name: set(kernels[name].signatures) for name in ("descend", "mean_descend")}
    x = torch.ones(cpu_kernels.MIN_CHUNK, dtype=torch.float64)
    assert cpu_kernels.mean_descend(x, 0.5, [x] * 3) is not None and cpu_kernels.descend(x, 0.5, x) is not None
    # the real calls needed nothing the warm-up had not loaded
    assert {name: set(kernels[name].signatures) for name in loaded} == loaded


def test_the_kernels_pool_follows_torchs_thread_count():
    """``psc launch`` sets the server's torch threads for a run and puts them back: the kernels' pool
    follows the count at each call instead of keeping the one it was first made with."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        assert cpu_kernels._pool()._max_workers == 3
        torch.set_num_threads(5)
        assert cpu_kernels._pool()._max_workers == 5
        torch.set_num_threads(1)
        assert cpu_kernels._pool()._max_workers == 2  # never fewer than two
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_kth_largest_by_its_bits_is_numpy_s(dtype):
    """``kth_largest`` (a radix selection over the magnitudes' bits) against NumPy's selection: every
    k of a short vector, and the ends and middle of long ones, with ties, mostly zeros, subnormals,
    inf and NaN (which counts as the largest)."""
    rng = np.random.default_rng(4)
    np_dtype = np.float32 if dtype == torch.float32 else np.float64
    tiny = np.finfo(np_dtype).smallest_subnormal
    short = np.abs(rng.standard_normal(300)).astype(np_dtype)
    short[:40] = 0.5
    short[40:50] = tiny
    short[50], short[51] = np.inf, np.nan
    long = np.abs(rng.standard_normal(200_000)).astype(np_dtype) * np.exp2(rng.integers(-60, 60, 200_000)).astype(np_dtype)
    sparse = np.where(rng.random(200_000) < 0.01, long, 0).astype(np_dtype)
    for values, ks in ((short, range(1, 301)), (long, (1, 2, 999, 100_000, 199_999, 200_000)),
                       (sparse, (1, 500, 1_999, 2_000, 2_100, 150_000, 200_000))):
        for k in ks:
            want = np.partition(values, values.size - k)[values.size - k]
            got = cpu_kernels.kth_largest(torch.from_numpy(values), k)
            assert got.dtype == dtype and got.dim() == 0
            assert np.array_equal(np.array(float(got), np_dtype), want, equal_nan=True), (k, float(got), want)


def test_pieces_run_once_each_in_order_and_a_piece_s_error_is_raised(monkeypatch):
    """The calling thread and the pool's threads share the pieces: each runs once, the results come
    back in the pieces' order, and an exception from any piece (the caller's or a pool thread's) is
    raised, after every thread has stopped."""
    import threading

    monkeypatch.setattr(cpu_kernels, "_threads", lambda: 3)
    pieces = [(a, a + 1) for a in range(40)]
    seen, threads = [], set()

    def piece(a, b):
        seen.append(a)
        threads.add(threading.get_ident())
        return a * a

    assert cpu_kernels._run_pieces(pieces, piece) == [a * a for a in range(40)]
    assert sorted(seen) == list(range(40))
    for bad in (0, 39):
        def failing(a, b, bad=bad):
            if a == bad:
                raise ValueError(f"piece {a}")
            return a

        with pytest.raises(ValueError, match=f"piece {bad}"):
            cpu_kernels._run_pieces(pieces, failing)


def test_adaptive_draws_from_the_compiled_block_sums_what_it_drew_from_torchs(monkeypatch):
    """Adaptive sparsification's block sums (float64, torch's order) in one compiled pass: the same
    sums bit for bit, so the same coordinate and the same message at every step."""
    from common.compressors import adaptive
    from common.compressors.base import float64_blocks

    n = 3 * adaptive._BLOCK + 1001
    x = torch.randn(n, generator=torch.Generator().manual_seed(5)) * torch.logspace(-12, 12, n)
    want = torch.stack([block.abs_().sum() for block in float64_blocks(x, adaptive._BLOCK)])
    assert torch.equal(torch.from_numpy(cpu_kernels.float64_block_sums(x, 1, adaptive._BLOCK)), want)
    c = build("adaptive", n, 1, seed=3)
    compiled = [encode(c.compress(x, worker=0, step=s)) for s in range(12)]
    monkeypatch.setattr(cpu_kernels, "float64_block_sums", lambda *a: None)
    assert [encode(c.compress(x, worker=0, step=s)) for s in range(12)] == compiled


def test_block_sums_of_an_empty_vector_are_empty_with_and_without_flags():
    for negative in (None, np.zeros(0, dtype=np.bool_)):
        sums = cpu_kernels.float64_block_sums(torch.empty(0), 1, FLOAT64_BLOCK, negative)
        assert sums is not None and sums.size == 0


def test_index_frames_from_the_compiled_passes_are_the_torch_ones(monkeypatch):
    """Rice frames for every parameter the candidates reach (r = 0 for a dense support, large
    quotients for a sparse one) and bitmaps, k = 1 at either end, and a support that is not strictly
    increasing (left to the torch version): the same method, parameter and bytes either way."""
    from common.wire import indexcode

    gen = torch.Generator().manual_seed(8)
    dim = 100_003
    cases = [torch.tensor([0]), torch.tensor([dim - 1]), torch.tensor([5, 5, 9])]
    for k in (2, 17, 300, 5_000, 40_000, 90_000, dim):
        cases.append(torch.sort(torch.randperm(dim, generator=gen)[:k]).values)
    cases.append(torch.tensor([3, 70_000, 70_001, dim - 1]))  # a quotient of thousands of zero bits
    seen = set()
    for idx in cases:
        fast = indexcode.encode_indices(idx, dim)
        with monkeypatch.context() as m:
            m.setattr(cpu_kernels, "gap_quotient_sums", lambda *a: None)
            slow = indexcode.encode_indices(idx, dim)
        assert fast[:2] == slow[:2] and torch.equal(fast[2], slow[2]), idx[:5]
        seen.add(fast[:2])
    assert (indexcode.BITMAP, 0) in seen and (indexcode.RICE, 0) in seen and len(seen) >= 5


def test_rice_frames_decode_and_fail_alike_compiled_and_in_numpy(monkeypatch):
    """Valid frames give the same indices; frames with flipped bytes, cut or lengthened give the same
    indices or the same WireError (message included) either way."""
    from common.wire import indexcode

    gen = torch.Generator().manual_seed(9)
    rng = np.random.default_rng(9)
    dim = 50_021

    def both(data, k, r):
        out = []
        for compiled in (True, False):
            with monkeypatch.context() as m:
                if not compiled:
                    m.setattr(cpu_kernels, "rice_indices", lambda *a: None)
                try:
                    out.append(indexcode.decode_indices(data, dim, k, indexcode.RICE, r, "x").tolist())
                except WireError as e:
                    out.append(str(e))
        return out

    outcomes = set()
    for k in (1, 7, 300, 2_000, 10_000):
        idx = torch.sort(torch.randperm(dim, generator=gen)[:k]).values
        method, r, frame = indexcode.encode_indices(idx, dim)
        assert method == indexcode.RICE, k
        data = frame.numpy()
        fast, slow = both(data, k, r)
        assert fast == slow == idx.tolist()
        fast, slow = both(np.concatenate([data, np.zeros(1, np.uint8)]), k, r)
        assert fast == slow == "x: Rice stream has trailing bytes after its last code"
        for trial in range(60):
            bad = data.copy()
            if trial % 3 == 0:
                bad = bad[: rng.integers(0, bad.size)] if bad.size > 1 else bad
            elif trial % 3 == 1:
                bad = np.concatenate([bad, rng.integers(0, 256, rng.integers(1, 4), dtype=np.uint8)])
            for at in rng.integers(0, max(bad.size, 1), 2):
                if bad.size:
                    bad[at] ^= np.uint8(1 << rng.integers(0, 8))
            fast, slow = both(bad, k, r)
            assert fast == slow, (k, trial)
            outcomes.add(fast if isinstance(fast, str) else "decoded")
    assert len(outcomes) >= 4  # several kinds of refusal were reached, not one


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_descents_mark_their_result_finite_only_while_it_is_what_they_wrote(dtype):
    """``descend``, ``mean_descend`` and AMSGrad's x are marked finite by their own pass, so that
    ``all_finite`` does not read them again; an inf or NaN in an input, a result that overflows, an
    in-place torch op and this module's in-place writers all leave ``all_finite`` reading the vector."""
    from common.compressors.base import all_finite
    from common.compressors.payloads import add_dense

    n = cpu_kernels.MIN_CHUNK + 5
    gen = torch.Generator().manual_seed(5)
    x, g, h = (torch.randn(n, generator=gen, dtype=dtype) for _ in range(3))
    ones = torch.ones(n, dtype=dtype)
    results = {
        "descend": lambda x, g: cpu_kernels.descend(x, 0.1, g),
        "mean of 2": lambda x, g: cpu_kernels.mean_descend(x, 0.1, [g, h]),
        "mean of 3": lambda x, g: cpu_kernels.mean_descend(x, 0.1, [h, g, h]),
        "amsgrad": lambda x, g: cpu_kernels.amsgrad_step(x, ones, ones, ones, g, 0.9, 0.99, 0.1, 1e-8)[0],
    }
    huge = torch.finfo(dtype).max
    for name, step in results.items():
        out = step(x, g)
        assert cpu_kernels.known_finite(out) and all_finite(out), name
        assert cpu_kernels.known_finite(out.detach().view(-1)) and not cpu_kernels.known_finite(out.clone())
        assert not cpu_kernels.known_finite(out[1:]) and not cpu_kernels.known_finite(out[::2])  # other memory
        out.mul_(2.0)  # torch moves the version counter
        assert not cpu_kernels.known_finite(out), name
        for bad in (float("inf"), float("nan")):
            for which in ("x", "g"):
                x2, g2 = x.clone(), g.clone()
                (x2 if which == "x" else g2)[n - 3] = bad
                out = step(x2, g2)
                assert not cpu_kernels.known_finite(out) and not all_finite(out), (name, bad, which)
        if name != "amsgrad":  # finite inputs, a result past the largest float
            out = step(torch.full((n,), huge, dtype=dtype), torch.full((n,), -huge, dtype=dtype))
            assert not cpu_kernels.known_finite(out) and not all_finite(out), name
    out = cpu_kernels.descend(x, 0.1, g)
    view = out.detach()
    del out  # the marked tensor is gone: its memory could be another's, so a view is read again
    assert not cpu_kernels.known_finite(view)
    from common.algorithms.base import full
    sent = full(cpu_kernels.descend(x, 0.1, g), copy=False)  # a fresh vector that only its payload holds
    assert cpu_kernels.known_finite(sent.values)  # is still known finite when it is encoded
    signs = build("sign", n).compress(torch.randn(n, dtype=dtype), worker=0, step=0)
    out = cpu_kernels.descend(x, 0.1, g)
    assert add_dense(out, signs, inplace=True) is out and not cpu_kernels.known_finite(out)  # written through NumPy
    permk = build("permk", n, 2).compress(torch.randn(n, dtype=dtype), worker=0, step=0)
    out = cpu_kernels.descend(x, 0.1, g)
    assert add_dense(out, permk, inplace=True) is out and not cpu_kernels.known_finite(out)
    out = cpu_kernels.descend(x, 0.1, g)  # an in-place writer given a part of a marked vector
    tail = out[64:]
    assert cpu_kernels.signs_added(tail, torch.zeros(n - 64, dtype=torch.bool), torch.tensor(float("inf")), inplace=True) is tail
    assert not cpu_kernels.known_finite(out) and not all_finite(out)
    out = cpu_kernels.descend(x, 0.1, g)
    alias = torch.from_numpy(out.numpy())  # memory shared, version counter not
    out.mul_(float("nan"))
    assert not cpu_kernels.known_finite(alias) and not all_finite(alias)
    with torch.inference_mode():  # inference tensors have no version counter: never marked
        out = cpu_kernels.descend(x, 0.1, g)
        assert not cpu_kernels.known_finite(out) and all_finite(out)


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")  # the step size 1e300 in float32
def test_a_compiled_descent_that_overflows_still_stops_the_run():
    """GD at d = MIN_CHUNK + 1 (the compiled mean and step, whose flag replaces the model check)
    with a step size that sends x past the largest float: the server stops the run."""
    from common.config import RunConfig
    from runtime import protocol
    from runtime.metrics import MetricsWriter
    from runtime.server_core import RunFailed, ServerCore
    from runtime.setup import RunSetup
    from runtime.worker_core import WorkerCore

    setup = RunSetup.build(RunConfig(algorithm="gd", workers=2, rounds=1, lr="1e300",
                                     problem=f"identity-quadratic:d={cpu_kernels.MIN_CHUNK + 1}"))
    server = ServerCore(setup, MetricsWriter(None))
    ups = [protocol.parse(WorkerCore(setup, r, torch.device("cpu")).uplink(0)[1]) for r in range(2)]
    with pytest.raises(RunFailed, match="no longer finite"):
        server.round(0, ups)


def test_the_kernels_name_the_kernel_parts_they_compile_against():
    """Numba's disk cache keys a kernel by cpu_kernels.py's content alone; a change of kernel_parts.py
    must change cpu_kernels.py too (its ``KERNEL_PARTS_DIGEST``), or processes load kernels cached
    from the older parts."""
    assert cpu_kernels.parts_digest() == cpu_kernels.KERNEL_PARTS_DIGEST, (
        f"kernel_parts.py changed: set cpu_kernels.KERNEL_PARTS_DIGEST = {cpu_kernels.parts_digest()!r}")



def test_fetch_ahead_reads_nothing_it_should_not_and_changes_nothing():
    """``kernel_parts.fetch_ahead`` (the quantizers' request for their next block's cache lines): any
    range, inside, across or past the end of x (the last block asks for lines beyond it), of any
    element size, compiles and leaves x as it was; a strided view is refused when the kernel is
    typed, since the intrinsic computes addresses for a C-contiguous array."""
    import numba

    from common.compressors import kernel_parts

    @numba.njit
    def ask(x, start, stop):
        kernel_parts.fetch_ahead(x, start, stop)
        return x.size

    for dtype in (np.float32, np.float64, np.uint8, np.uint16):
        x = np.arange(5000).astype(dtype)
        before = x.copy()
        for start, stop in ((0, 5000), (4096, 8192), (4999, 5000), (5000, 9096), (7000, 9000), (10, 10), (0, 0)):
            assert ask(x, start, stop) == 5000
        assert np.array_equal(x, before)
        assert ask(np.empty(0, dtype), 0, 4096) == 0
    with pytest.raises(numba.core.errors.TypingError):
        ask(np.arange(10.0)[::2], 0, 5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_sum_on_a_support_in_place_has_the_bits_of_index_select_add_and_index_copy(dtype):
    """``add_on_support`` (EF21's Markov state shifted by a sparse payload, in place): the bytes of
    torch's index_select, add_ and index_copy_ for supports from empty to every index, spread or in
    runs, with -0 + -0, a + (-a), NaN, inf and overflow among the sums; its flag says whether a sum
    is -0; and h is left as it was for a support that is not strictly increasing within [0, d),
    values of another dtype or length, or a short h."""
    gen = torch.Generator().manual_seed(11)
    d = cpu_kernels.MIN_COMPILED + 333
    big = torch.finfo(dtype).max
    h0 = torch.randn(d, generator=gen, dtype=dtype)
    h0[::41] = -0.0
    h0[5], h0[6], h0[7] = float("nan"), float("inf"), big
    bits = torch.int32 if dtype == torch.float32 else torch.int64
    quiet = 0x7FC00001 if dtype == torch.float32 else 0x7FF8000000000001
    h0[8:10] = torch.tensor([quiet, quiet], dtype=bits).view(dtype)  # NaNs with a payload
    supports = [torch.arange(0), torch.arange(d), torch.arange(0, d, 41), torch.arange(d - 40, d),
                torch.randperm(d, generator=gen)[: d // 30].sort().values]
    for support in supports:
        for negative_zeros in (False, True):
            values = torch.randn(support.numel(), generator=gen, dtype=dtype)
            on_grid = support % 41 == 0
            if negative_zeros:
                values[on_grid] = -0.0  # -0 + -0 = -0
            else:
                values[on_grid] = 1.0
            cancel = (support % 7 == 3) & ~on_grid
            values[cancel] = -h0[support[cancel]]  # a + (-a) = +0
            values[support == 7] = big  # overflow to inf
            values[support == 9] = -float("nan")  # NaN + NaN: torch keeps the value's NaN, not h's
            h, want = h0.clone(), h0.clone()
            want.index_copy_(0, support, want.index_select(0, support).add_(values))
            flag = cpu_kernels.add_on_support(h, support, values)
            assert torch.equal(h.view(torch.uint8), want.view(torch.uint8)), (support.numel(), negative_zeros)
            sums = want[support]
            assert flag == bool(((sums == 0) & sums.signbit()).any())
            assert flag == (negative_zeros and bool(on_grid.any()))
    support = torch.tensor([3, 9, 40, 1000])
    values = torch.ones(4, dtype=dtype)
    for bad in (torch.tensor([3, 9, 9, 1000]), torch.tensor([9, 3, 40, 1000]), torch.tensor([-1, 9, 40, 1000]),
                torch.tensor([3, 9, 40, d])):
        h = h0.clone()
        assert cpu_kernels.add_on_support(h, bad, values) is None
        assert torch.equal(h.view(torch.uint8), h0.view(torch.uint8))
    other = torch.float64 if dtype == torch.float32 else torch.float32
    h = h0.clone()
    for h, v in ((h0.clone(), values.to(other)), (h0.clone(), values[:3]), (h0[:100].clone(), values),
                 (h, h[996:1000]),  # values that are h's own memory (torch reads them all before it writes)
                 (h0.clone().requires_grad_(), values)):
        before = h.detach().clone()
        assert cpu_kernels.add_on_support(h, support, v) is None
        assert torch.equal(h.detach().view(torch.uint8), before.view(torch.uint8))
    h, want = h0.clone(), h0.clone()
    tracked = values.clone().requires_grad_()  # values that require grad: added as torch adds them
    want.index_copy_(0, support, want.index_select(0, support).add_(values))
    assert cpu_kernels.add_on_support(h, support, tracked) is False
    assert torch.equal(h.view(torch.uint8), want.view(torch.uint8))


def test_a_shift_in_place_on_a_support_runs_the_compiled_loop_and_drops_the_marks_it_invalidates(monkeypatch):
    """``payloads.add_dense`` in place into a state known to hold no negative zero goes through
    ``add_on_support``; a state marked finite loses that mark (a sum may overflow), and keeps or
    loses the no-negative-zero mark by the kernel's flag."""
    from common.compressors.payloads import Dense, Sparse, add_dense

    calls = []
    real = cpu_kernels.add_on_support
    monkeypatch.setattr(cpu_kernels, "add_on_support", lambda *a: calls.append(real(*a)) or calls[-1])
    d = cpu_kernels.MIN_COMPILED + 9
    h = torch.randn(d, generator=torch.Generator().manual_seed(2))
    cpu_kernels.without_negative_zero.note(h)
    cpu_kernels.note_finite(h)
    support = torch.tensor([1, 2, 50, d - 1])
    want = h.clone()
    values = torch.tensor([1.0, -h[2].item(), 3e38, 4.0])
    got = add_dense(h, Sparse(d, Dense(values, torch.float32), support, None, torch.float32), inplace=True)
    want[support] += values
    assert got is h and calls == [False]
    assert torch.equal(h, want)
    assert not cpu_kernels.known_finite(h) and cpu_kernels.without_negative_zero.holds(h)
    h[7] = -0.0  # (a torch write: the marks drop by the version counter)
    cpu_kernels.without_negative_zero.note(h)  # (as if it held none; the sum below writes one)
    add_dense(h, Sparse(d, Dense(torch.tensor([-0.0, 1.0]), torch.float32), torch.tensor([7, 8]), None, torch.float32), inplace=True)
    assert calls == [False, True] and not cpu_kernels.without_negative_zero.holds(h)
