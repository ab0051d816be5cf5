"""The quantizers' compiled CPU pass against their torch version: the same codes from the same draws,
the same packed bytes, the same decoded vectors; and the counter-based draws themselves."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from common.compressors import build, cpu_kernels, draws
from common.compressors import rounding
from common.keys import MASK64
from common.wire import bitpack, decode, encode
from common.wire.header import WireError

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="numba is not installed")

SPECS = [
    "natural", "exprounding:base=3", "exprounding:base=1.5", "exprounding:base=2,biased=true",
    "exprounding:base=3,biased=true", "natdither:s=2,p=inf", "natdither:s=8,p=2", "expdither:base=3,s=4,p=2",
    "expdither:base=1.1,s=300,p=inf", "qsgd:s=16", "qsgd:s=65535", "ternary", "ternary:p=2",
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


@pytest.mark.parametrize("width", range(1, 9))
@pytest.mark.parametrize("escape", [False, True])
def test_pack_and_unpack_kernels_follow_the_bitpack_layout(width, escape):
    gen = torch.Generator().manual_seed(width)
    n = 1003
    offset = 5
    fields = torch.randint(0, 1 << width, (n,), generator=gen)
    if escape:  # field 0 is code 0, field f > 0 is code f + offset - 1
        codes = torch.where(fields == 0, 0, fields + offset - 1).to(torch.int16)
        minus, clamp = offset - 1, True
    else:
        codes = (fields + offset).to(torch.int16)
        minus, clamp = offset, False
    packed = cpu_kernels.pack_codes(codes, minus, clamp, width)
    assert torch.equal(packed, bitpack.pack(fields, width))
    back, largest = cpu_kernels.unpack_codes(packed.numpy(), n, width, offset, escape, torch.int16)
    assert torch.equal(back, codes) and largest == int(codes.max())


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


@pytest.mark.parametrize("spec", ["natural", "natdither:s=8,p=2", "qsgd:s=16", "exprounding:base=3"])
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
    assert len(cpu_kernels._chunks(x.numel(), 8)) == 3
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


def test_dequantize_kernel_matches_the_gather():
    gen = torch.Generator().manual_seed(0)
    levels = torch.tensor([0.0, 0.25, 0.5, 1.0], dtype=torch.float64)
    signed = torch.cat([levels, -levels])
    codes = torch.randint(0, 4, (999,), generator=gen).to(torch.int16)
    negative = torch.rand(999, generator=gen) < 0.5
    want = signed[codes.long() + 4 * negative.long()]
    assert torch.equal(cpu_kernels.dequantize(codes, negative, signed), want)
