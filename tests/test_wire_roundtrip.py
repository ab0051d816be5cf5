"""Exact round trip: decompress(decode(encode(p))) equals decompress(p) bit for bit, dtype included."""
from __future__ import annotations

import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.compressors import Dense, IndexRule, LevelTable, Quantized, Scaled, Signs, Sparse, build
from common.wire import WireError, decode, encode, message_bytes

PRIMES = [2, 3, 5, 7, 13, 97, 101, 997, 1009, 7919, 10007, 65537, 99991]
DIMS = st.one_of(st.integers(1, 100_000), st.sampled_from(PRIMES), st.integers(1, 64))
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _k_option(name: str, d: int, data) -> str:
    if data.draw(st.booleans(), label="use k"):
        return f"{name}:k={data.draw(st.integers(1, d), label='k')}"
    ratio = data.draw(st.sampled_from([0.001, 0.01, 0.1, 0.5, 1.0]), label="ratio")
    return f"{name}:ratio={ratio}"


def _vector(d: int, data) -> torch.Tensor:
    seed = data.draw(st.integers(0, 2**31 - 1), label="x seed")
    g = torch.Generator().manual_seed(seed)
    dtype = data.draw(st.sampled_from([torch.float32, torch.float32, torch.float64]), label="dtype")
    style = data.draw(st.sampled_from(["normal", "zeros", "wide", "ties"]), label="style")
    x = torch.randn(d, generator=g, dtype=torch.float64)
    if style == "zeros":  # exact zeros (ReLU-like gradients): exercises the zero-escape code mode
        x[torch.rand(d, generator=g) < 0.5] = 0.0
    elif style == "wide":  # magnitudes over 80 binades (wider overflows float32 norms in the compressors)
        x = x * torch.exp2(torch.randint(-40, 40, (d,), generator=g).double())
    elif style == "ties":
        x = torch.round(x * 2) / 2
    return x.to(dtype)


def _check(spec: str, d: int, n: int, data) -> None:
    c = build(spec, d, n, data.draw(st.integers(0, 2**32), label="seed"))
    x = _vector(d, data)
    worker = data.draw(st.integers(0, n - 1), label="worker")
    step = data.draw(st.integers(0, 1000), label="step")
    p = c.compress(x, worker=worker, step=step)
    frames = encode(p)
    assert all(isinstance(f, bytes) for f in frames)
    q = decode(frames)
    a, b = c.decompress(p), c.decompress(q)
    assert a.dtype == b.dtype == x.dtype
    assert torch.equal(a, b)
    assert torch.equal(torch.signbit(a), torch.signbit(b))  # -0.0 survives too
    assert message_bytes(frames) == sum(len(f) for f in frames)
    assert encode(q) == frames  # canonical: re-encoding the decoded payload gives the same bytes


PLAIN = ["identity", "fp16", "bf16", "adaptive", "natural", "exprounding:biased=true", "ternary", "ternary:p=2",
         "sign", "sign:scale=l2", "scale:lambda=0.25", "permk"]


@pytest.mark.parametrize("spec", PLAIN)
@SETTINGS
@given(d=DIMS, n=st.integers(1, 9), data=st.data())
def test_plain(spec, d, n, data):
    _check(spec, d, n, data)


@pytest.mark.parametrize("name", ["topk", "randk", "samerandk"])
@SETTINGS
@given(d=DIMS, n=st.integers(1, 9), data=st.data())
def test_sparsifiers(name, d, n, data):
    spec = _k_option(name, d, data)
    if name == "randk" and data.draw(st.booleans(), label="unscaled"):
        spec += ",scaled=false"
    _check(spec, d, n, data)


@SETTINGS
@given(d=DIMS, n=st.integers(1, 5), data=st.data())
def test_parametrized_quantizers(d, n, data):
    spec = data.draw(st.one_of(
        st.builds("exprounding:base={}".format, st.sampled_from([1.5, 2.0, 3.0, 10.0])),
        st.builds("expdither:base={},s={},p={}".format, st.sampled_from([1.5, 2.0, 4.0]), st.integers(1, 40),
                  st.sampled_from(["2", "inf", "1"])),
        st.builds("natdither:s={},p={}".format, st.integers(1, 12), st.sampled_from(["2", "inf"])),
        st.builds("qsgd:s={}".format, st.sampled_from([1, 2, 7, 16, 255, 256, 40000])),
    ), label="spec")
    _check(spec, d, n, data)


CHAINS = ["topk:ratio=0.01+natural", "topk:ratio=0.05+natdither:s=2,p=inf", "permk+natural", "randk:k={k7}+natural",
          "natural+scale:lambda=0.888", "topk:ratio=0.2+randk:k={k3}", "samerandk:ratio=0.1+sign",
          "topk:ratio=0.1+fp16", "adaptive+ternary", "topk:ratio=0.3+qsgd:s=4+scale:lambda=0.5", "permk+bf16"]


@pytest.mark.parametrize("spec", CHAINS)
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(d=DIMS, n=st.integers(1, 9), data=st.data())
def test_chains(spec, d, n, data):
    kept = max(1, min(d, round(0.2 * d)))
    _check(spec.format(k7=min(7, d), k3=min(3, kept)), d, n, data)


def test_permk_fewer_coordinates_than_workers():
    """d < n: some workers get an empty block; the empty message still round-trips."""
    c = build("permk+natural", 3, 8, 5)
    x = torch.tensor([1.0, -2.0, 3.0])
    for w in range(8):
        p = c.compress(x, worker=w, step=2)
        assert torch.equal(c.decompress(decode(encode(p))), c.decompress(p))


def test_hand_built_payloads():
    """Payloads no compressor makes today but the format allows: empty supports, deep nesting, fp16 values."""
    idx = torch.tensor([0, 5, 9], dtype=torch.int64)
    cases = [
        Sparse(10, Dense(torch.empty(0), torch.float32), torch.empty(0, dtype=torch.int64), None, torch.float32),
        Sparse(10, Dense(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float16), torch.float64), idx, None, torch.float64),
        Scaled(torch.tensor(0.5), Scaled(torch.tensor(-3.0), Signs(torch.tensor([True, False]), torch.tensor(2.0), torch.float32))),
        Sparse(10, Sparse(3, Quantized(LevelTable("uniform", 1.0, 3), torch.tensor([True]), torch.tensor([3], dtype=torch.int16),
                                       torch.tensor(1.5), torch.float32), torch.tensor([1]), None, torch.float32),
               None, IndexRule("randk", 10, 3, 0, 2**64 - 1, 2**64 - 1, 2**24 - 1, 2**64 - 1), torch.float32),
        Quantized(LevelTable("rounding", 2.0, 0, "float64"), torch.tensor([False, True, True]),
                  torch.tensor([0, 2000, 5], dtype=torch.int16), None, torch.float64),
        Dense(torch.tensor([-0.0, 0.0, 1e-45]), torch.float32),
    ]
    for p in cases:
        q = decode(encode(p))
        a, b = p.to_dense(), q.to_dense()
        assert a.dtype == b.dtype and torch.equal(a, b) and torch.equal(torch.signbit(a), torch.signbit(b))


def test_encode_rejects_non_payloads():
    with pytest.raises(WireError):
        encode(torch.zeros(3))
    with pytest.raises(WireError):
        encode(Dense(torch.tensor([1.0, float("nan")]), torch.float32))


def test_decode_to_device_cpu_and_writable_frames():
    c = build("topk:ratio=0.1+natural", 1000, 1, 0)
    p = c.compress(torch.randn(1000), 0, 0)
    frames = [bytearray(f) for f in encode(p)]  # writable frames are read in place
    q = decode(frames, device="cpu")
    assert torch.equal(c.decompress(q), c.decompress(p))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("spec", ["identity", "bf16", "topk:ratio=0.01", "topk:ratio=0.6", "randk:ratio=0.01", "permk",
                                  "natural", "natdither:s=3,p=inf", "qsgd:s=300", "ternary", "sign",
                                  "topk:ratio=0.01+natural", "permk+natural", "natural+scale:lambda=0.888"])
def test_cuda_round_trip(spec):
    """A CUDA payload is packed on the GPU; the bytes equal those of the same payload packed on the CPU."""
    d = 100_003
    c = build(spec, d, 4, 0)
    x = torch.randn(d, device="cuda")
    p = c.compress(x, worker=1, step=0)
    frames = encode(p)
    q = decode(frames, device="cuda")
    a, b = c.decompress(p), c.decompress(q)
    assert b.device.type == "cuda" and a.dtype == b.dtype and torch.equal(a, b)
    from common.wire.codec import _to_device
    assert encode(_to_device(p, torch.device("cpu"))) == frames


@pytest.mark.parametrize("spec", ["identity", "bf16", "fp16", "natural", "natdither:s=3,p=inf", "qsgd:s=300", "ternary",
                                  "sign", "topk:ratio=0.01+natural", "permk+natural", "exprounding:base=2,biased=true"])
def test_the_gpu_decode_path_builds_the_same_payload(spec, monkeypatch):
    """A decode for a GPU moves frames as they came and unpacks them there (``codec._upload``); run
    with the CPU standing in for the GPU (and bit unpacking working on all words at once, as it does
    on a GPU), that path gives the host path's payload exactly."""
    from common.wire import bitpack, codec

    monkeypatch.setattr(bitpack, "_block", lambda groups, device: max(1, groups))

    d = 10_007
    c = build(spec, d, 4, 0)
    x = torch.randn(d, generator=torch.Generator().manual_seed(5))
    frames = encode(c.compress(x, worker=1, step=3))
    host = decode(frames)
    token = codec._gpu.set(torch.device("cpu"))
    try:
        moved = codec._decode(frames, None, codec.MAX_DIM)
    finally:
        codec._gpu.reset(token)
    a, b = c.decompress(host), c.decompress(moved)
    assert a.dtype == b.dtype and torch.equal(a, b)
    if hasattr(host, "codes"):
        assert torch.equal(host.codes, moved.codes) and torch.equal(host.negative, moved.negative)


def test_the_gpu_decode_path_refuses_what_the_host_path_refuses():
    from common.wire import codec

    frames = encode(build("natural", 1001, 1, 0).compress(torch.randn(1001), 0, 0))
    bad = [frames[0], frames[1][:-1] + bytes([frames[1][-1] | 0x80]), frames[2]]  # a padding bit set in the signs
    dense = encode(build("identity", 1000, 1, 0).compress(torch.randn(1000), 0, 0))
    nan = [dense[0], dense[1][:4] + struct.pack("<f", float("nan")) + dense[1][8:]]
    for broken, why in ((bad, "padding"), (nan, "non-finite")):
        with pytest.raises(WireError, match=why):
            decode(broken)
        token = codec._gpu.set(torch.device("cpu"))
        try:
            with pytest.raises(WireError, match=why):
                codec._decode(broken, None, codec.MAX_DIM)
        finally:
            codec._gpu.reset(token)


@pytest.mark.parametrize("width", [1, 2, 3, 5, 7])
def test_bit_packing_is_the_same_in_cache_blocks_and_all_at_once(width, monkeypatch):
    """The CPU packs 2..7-bit fields in cache-sized blocks, a GPU all at once (``bitpack._block``);
    both give the same bytes and fields, and the one-bit fields unpacked in torch (``unpack_flags``,
    the GPU's way) are NumPy's."""
    import numpy as np

    from common.wire import bitpack

    n = 8 * bitpack._WORDS + 13  # more than one block, and a partial group
    fields = torch.randint(0, 1 << width, (n,), generator=torch.Generator().manual_seed(width)).to(torch.uint8)
    blocked = bitpack.pack(fields, width)
    monkeypatch.setattr(bitpack, "_block", lambda groups, device: max(1, groups))
    at_once = bitpack.pack(fields, width)
    assert torch.equal(blocked, at_once)
    assert torch.equal(bitpack.unpack_u8(at_once, n, width), fields)
    if width == 1:
        want = np.unpackbits(at_once.numpy(), count=n, bitorder="little").astype(bool)
        assert torch.equal(bitpack.unpack_flags(at_once, n), torch.from_numpy(want))
