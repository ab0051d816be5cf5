"""Encoded size against the information each payload carries: payload bits within 1% of the formula
(plus the zero padding of each frame's last byte) and a header of at most 64 bytes."""
from __future__ import annotations

import math

import pytest
import torch

from common.compressors import build
from common.wire import encode, message_bytes

D = 100_000
HEADER_MAX = 64


def _x(d=D, seed=0):
    return torch.randn(d, generator=torch.Generator().manual_seed(seed))


def _data_bits(frames):
    return 8 * sum(len(f) for f in frames[1:])


def _within(frames, info_bits):
    """Header <= 64 bytes, data bits <= 1.01 * information + one padding byte per frame."""
    assert len(frames[0]) <= HEADER_MAX, len(frames[0])
    slack = 8 * (len(frames) - 1)
    assert info_bits <= _data_bits(frames) + 32 + slack  # not below the information either (sanity)
    assert _data_bits(frames) <= 1.01 * info_bits + slack, (_data_bits(frames), info_bits)


def _log2_binomial(d, k):
    return (math.lgamma(d + 1) - math.lgamma(k + 1) - math.lgamma(d - k + 1)) / math.log(2)


def _range_bits(codes: torch.Tensor) -> int:
    lo, hi = int(codes.min()), int(codes.max())
    return max(0, math.ceil(math.log2(hi - lo + 1)))


@pytest.mark.parametrize("spec,bits", [("identity", 32), ("fp16", 16), ("bf16", 16)])
def test_dense(spec, bits):
    p = build(spec, D).compress(_x())
    frames = encode(p)
    _within(frames, D * bits)
    assert _data_bits(frames) == D * bits


@pytest.mark.parametrize("spec", ["sign", "sign:scale=l2"])
def test_signs(spec):
    frames = encode(build(spec, D).compress(_x()))
    _within(frames, D)  # one bit a coordinate; the float32 scale is in the header


@pytest.mark.parametrize("spec", ["natural", "exprounding:base=3", "exprounding:biased=true", "natdither:s=4,p=2",
                                  "expdither:base=2,s=8,p=inf", "qsgd:s=16", "qsgd:s=1000", "ternary"])
def test_quantized(spec):
    p = build(spec, D).compress(_x())
    frames = encode(p)
    _within(frames, D * (1 + _range_bits(p.codes)))  # sign + ceil(log2(range of codes present))
    if p.table.kind != "rounding":
        assert _data_bits(frames) <= D * (1 + math.ceil(math.log2(p.table.s + 1))) + 16


def test_natural_at_most_9_bits_even_with_zeros():
    x = _x()
    x[::2] = 0.0  # zeros (code 0) next to codes near 127: the zero-escape mode keeps the width small
    frames = encode(build("natural", D).compress(x))
    assert message_bytes(frames) * 8 / D <= 9.0
    assert message_bytes(frames) * 8 / D <= 7.01  # sign + 6 bits here


def test_scaled_costs_only_the_factor():
    inner = encode(build("natural", D).compress(_x()))
    outer = encode(build("natural+scale:lambda=0.888", D).compress(_x()))
    assert outer[1:] == inner[1:]
    assert len(outer[0]) - len(inner[0]) <= 8  # [6, uint32] around the inner node
    assert len(outer[0]) <= HEADER_MAX


@pytest.mark.parametrize("spec", ["randk:ratio=0.01", "samerandk:ratio=0.1", "permk", "randk:k=100+natural", "permk+natural"])
def test_regenerated_supports_cost_nothing(spec):
    c = build(spec, D, 10, 0)
    p = c.compress(_x(), worker=3, step=1)
    frames = encode(p)
    value_frames = encode(p.values)[1:]
    assert frames[1:] == value_frames  # only the values travel
    assert len(frames[0]) <= HEADER_MAX


def _rice_bits(idx: torch.Tensor, r: int) -> int:
    gaps = torch.diff(idx, prepend=torch.tensor([-1])) - 1
    return idx.numel() * (r + 1) + int((gaps >> r).sum())


@pytest.mark.parametrize("ratio", [0.0005, 0.01, 0.05, 0.2, 0.5, 0.9])
def test_sent_indices(ratio):
    """Index bits are the smaller of the best Rice code and a bitmap; at 1% within 1% of log2 C(d, k)."""
    d = D
    p = build(f"topk:ratio={ratio}", d).compress(_x(d, 3))
    k = p.indices.numel()
    frames = encode(p)
    assert len(frames[0]) <= HEADER_MAX
    index_bits = 8 * len(frames[1])
    best = min(min(_rice_bits(p.indices, r) for r in range(0, 24)), d)
    assert index_bits <= best + 16  # two byte-aligned sections
    assert 8 * len(frames[2]) == 32 * k
    if ratio <= 0.01:
        assert index_bits <= 1.01 * _log2_binomial(d, k) + 16


def test_adaptive_single_index():
    frames = encode(build("adaptive", D).compress(_x()))
    assert len(frames[0]) <= HEADER_MAX
    assert 8 * len(frames[1]) <= math.ceil(math.log2(D)) + 8 and len(frames[2]) == 4


def test_requirement_scaled_sign_1e6():
    d = 1_000_000
    frames = encode(build("sign", d).compress(_x(d)))
    assert message_bytes(frames) * 8 / d <= 1.01


def test_requirement_top1pct_indices_1e6():
    d = 1_000_000
    p = build("topk:ratio=0.01", d).compress(_x(d, 7))
    k = p.indices.numel()
    frames = encode(p)
    bits_per_index = 8 * len(frames[1]) / k
    assert bits_per_index <= math.log2(d / k) + 2
    assert 8 * len(frames[1]) <= 1.01 * _log2_binomial(d, k)
