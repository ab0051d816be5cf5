"""Strictness of the wire format and of the float32 scalars that travel in it.

* Padding bits are zero: the encoder writes ``ceil(n w / 8)`` bytes with the unused bits of the last
  byte cleared (``common/wire/__init__.py``), so a decoder that ignores a set padding bit would accept
  two byte strings for one payload (and a corrupted frame as a valid one). ``decode`` must reject a
  set padding bit in a sign bitmap, in a quantized-code frame and in the Rice remainder section.
* Dithering and ternary norms are rounded UP to float32 (never to nearest): the codes are computed
  against the rounded norm, and |x_i| <= norm is what keeps every level ratio in [0, 1] and the
  declared omega valid (Beznosikov et al. eq. 14 with t_i = |x_i| / ||x||_p).
"""
from __future__ import annotations

import math
from fractions import Fraction

import msgpack
import numpy as np
import pytest
import torch

from common.compressors import build
from common.wire import WireError, decode, encode
from common.wire.indexcode import RICE


def _set_last_bit(frame: bytes) -> bytes:
    b = bytearray(frame)
    b[-1] |= 0x80
    return bytes(b)


def test_sign_bitmap_padding_bit_is_rejected():
    d = 13  # 13 signs: 3 padding bits in the second byte
    frames = encode(build("sign", d).compress(torch.randn(d, generator=torch.Generator().manual_seed(1))))
    assert len(frames[1]) == 2
    decode(frames)
    with pytest.raises(WireError, match="padding"):
        decode([frames[0], _set_last_bit(frames[1])])


@pytest.mark.parametrize("spec", ["natural", "qsgd:s=16", "natdither:s=3,p=inf", "ternary"])
def test_quantized_code_padding_bit_is_rejected(spec):
    d = 11
    x = torch.randn(d, generator=torch.Generator().manual_seed(2))
    frames = encode(build(spec, d).compress(x))
    head = msgpack.unpackb(frames[0])
    width = head[1][10]
    if width == 0 or d * width % 8 == 0:
        pytest.skip("no padding bits in this frame")
    decode(frames)
    with pytest.raises(WireError, match="padding"):
        decode([frames[0], frames[1], _set_last_bit(frames[2])])
    # and the sign frame of the same message (11 signs: 5 padding bits)
    with pytest.raises(WireError, match="padding"):
        decode([frames[0], _set_last_bit(frames[1]), frames[2]])


def test_rice_remainder_padding_bit_is_rejected():
    d, k = 10_000, 7  # r > 0 and k r not a multiple of 8
    x = torch.zeros(d)
    x[torch.arange(k) * 1400 + 3] = 1.0
    frames = encode(build(f"topk:k={k}", d).compress(x))
    head = msgpack.unpackb(frames[0])
    method, r = head[1][3], head[1][4]
    assert method == RICE and r > 0 and k * r % 8
    rem_bytes = (k * r + 7) // 8
    decode(frames)
    bad = bytearray(frames[1])
    bad[rem_bytes - 1] |= 0x80
    with pytest.raises(WireError, match="padding"):
        decode([frames[0], bytes(bad)] + frames[2:])


def _exact_norm(x: torch.Tensor, p: float) -> Fraction | float:
    values = [Fraction(float(v)) for v in x.tolist()]
    if p == math.inf:
        return max(abs(v) for v in values)
    return sum(v * v for v in values)  # the squared 2-norm, exactly


def _norm_at_least(norm32: float, exact, p: float) -> bool:
    n = Fraction(norm32)
    return n >= exact if p == math.inf else n * n >= exact


def _one_ulp_above(f: float) -> float:
    """A float64 one float64-ulp above the float32 value ``f``."""
    assert float(np.float32(f)) == f
    return float(np.nextafter(f, math.inf))


@pytest.mark.parametrize("spec,p", [
    ("ternary", math.inf), ("ternary:p=2", 2.0), ("natdither:s=3,p=inf", math.inf), ("natdither:s=3,p=2", 2.0),
    ("qsgd:s=4", 2.0), ("expdither:base=3,s=3,p=2", 2.0),
])
@pytest.mark.parametrize("base", [1.0, 0.7, 3.0e-20, 1.5e30])
def test_norms_are_rounded_up_to_float32(spec, p, base):
    f = float(np.float32(base))
    x = torch.tensor([_one_ulp_above(f), -0.25 * f, 0.0], dtype=torch.float64)
    if p == 2.0:
        x = x[:1].clone()  # one coordinate: the 2-norm is |x_0| itself
    payload = build(spec, x.numel()).compress(x)
    norm32 = float(payload.norm)
    assert payload.norm.dtype == torch.float32
    exact = _exact_norm(x, p)
    assert _norm_at_least(norm32, exact, p), (norm32, float(x[0]))
    assert norm32 == float(np.nextafter(np.float32(f), np.float32(np.inf)))  # the next float32 up, not f
    # and the decoded vector stays within the norm: every level is at most 1
    y = build(spec, x.numel()).decompress(decode(encode(payload)))
    assert float(y.abs().max()) <= norm32


@pytest.mark.parametrize("spec", ["ternary", "ternary:p=2", "natdither:s=2,p=2", "qsgd:s=8"])
def test_norm_round_up_on_random_float64_vectors(spec):
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(5, generator=g, dtype=torch.float64) * 10.0 ** float(torch.randint(-30, 30, (1,), generator=g))
        c = build(spec, 5)
        p = c.p
        norm32 = float(c.compress(x).norm)
        assert _norm_at_least(norm32, _exact_norm(x, p), p)


def test_large_permk_supports_partition_regenerate_and_are_uniform():
    """Perm-K above ``PERMK_HOST_MAX_DIM`` uses the keyed bijection: the n blocks of one step are
    disjoint, cover [d], have the sizes of spec/marina-p-m3.md section 1, are regenerated by the
    receiver from the header alone, and every coordinate lands in a given worker's block with
    probability |block| / d."""
    from common.compressors.indices import PERMK_HOST_MAX_DIM, permk_blocks

    d, n = PERMK_HOST_MAX_DIM + 37, 5
    c = build("permk", d, n, seed=3)
    x = torch.randn(d, generator=torch.Generator().manual_seed(0))
    hits = torch.zeros(d)
    steps = 40
    for step in range(steps):
        payloads = [c.compress(x, worker=w, step=step) for w in range(n)]
        supports = [p.support(torch.device("cpu")) for p in payloads]
        assert sorted(s.numel() for s in supports) == sorted(permk_blocks(d, n))
        assert torch.equal(torch.sort(torch.cat(supports)).values, torch.arange(d))
        assert all(bool((s[1:] > s[:-1]).all()) for s in supports)
        mean = sum(c.decompress(p) for p in payloads) / n
        assert torch.allclose(mean, x, rtol=1e-6, atol=0)
        again = decode(encode(payloads[0]))
        assert torch.equal(again.support(torch.device("cpu")), supports[0])
        hits[supports[0]] += 1
    # per-coordinate hit counts of worker 0 over the steps: Binomial(steps, ~1/n) on average
    p = 1.0 / n
    z = (hits.mean() - steps * p) / math.sqrt(steps * p * (1 - p) / d)
    assert abs(float(z)) < 5
    assert abs(float(hits.var()) / (steps * p * (1 - p)) - 1) < 0.1  # no coordinate favoured
    # neighbouring coordinates are not kept together more often than independent ones would be
    both = float((hits[1:] * hits[:-1]).mean())
    assert abs(both / (steps * p) ** 2 - 1) < 0.1


@pytest.mark.parametrize("spec", ["qsgd:s=40000", "natural", "natdither:s=3,p=inf", "sign", "permk", "topk:k=3+natural"])
def test_decompress_leaves_the_payload_unchanged(spec):
    """Decompressing twice gives the same vector and re-encodes to the same bytes (no in-place work on
    the payload's own tensors, e.g. int32 codes that a dtype conversion would hand back as is)."""
    x = torch.randn(70, generator=torch.Generator().manual_seed(4))
    c = build(spec, 70, 3)
    q = decode(encode(c.compress(x, worker=1, step=2)))
    frames = encode(q)
    first = c.decompress(q)
    assert torch.equal(c.decompress(q), first)
    assert encode(q) == frames


def test_checked_finite_skips_only_the_checked_memory(monkeypatch):
    """Inside ``checked_finite(m)`` a Dense of exactly m's memory is encoded without a second
    finiteness pass; any other vector (a slice of m, another dtype, a copy) is still checked, and a
    non-finite one is still refused. Outside the block m is checked again."""
    from common.compressors.payloads import Dense
    from common.wire import codec

    checked = []
    monkeypatch.setattr(codec, "_all_finite", lambda v: checked.append(v.numel()) or bool(torch.isfinite(v).all()))
    m = torch.arange(10, dtype=torch.float32)
    bad = m.clone()
    bad[3] = math.nan
    with codec.checked_finite(m):
        encode(Dense(m, m.dtype))
        assert checked == []
        encode(Dense(m[:5], m.dtype))
        encode(Dense(m.double(), m.dtype))
        assert checked == [5, 10]
        with pytest.raises(WireError, match="not all finite"):
            encode(Dense(bad, m.dtype))
    checked.clear()
    encode(Dense(m, m.dtype))
    assert checked == [10]
