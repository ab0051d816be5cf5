"""Fuzzing ``decode``: random, truncated, mutated and re-headered messages only ever raise WireError.

Seeded and fast: about 13,000 messages in a few seconds. A decoded message must also be usable
(``to_dense`` works and has the claimed dimension), and no error may come from ``decode``'s
last-resort handler (an "internal error" means a check is missing).
"""
from __future__ import annotations

import random

import msgpack
import pytest
import torch

from common.compressors import build
from common.wire import WireError, decode, encode

SPECS = ["identity", "fp16", "bf16", "topk:ratio=0.01", "topk:ratio=0.6", "randk:ratio=0.1", "samerandk:k=3", "permk",
         "adaptive", "natural", "exprounding:base=3", "natdither:s=3,p=inf", "qsgd:s=300", "ternary", "sign",
         "scale:lambda=0.5", "topk:ratio=0.1+natural", "permk+natural", "topk:ratio=0.2+randk:k=2",
         "natural+scale:lambda=0.888", "topk:ratio=0.05+sign"]

WEIRD = [0, 1, -1, 2, 3, 6, 7, 31, 32, 33, 255, 2**15, 2**16, 2**31 - 1, 2**31, 2**32, 2**63 - 1, 2**64 - 1, -2**63,
         0.5, -0.0, 1.0000001, 1e308, float("inf"), float("nan"), None, True, False, "", "x" * 10, b"", b"\x00" * 4,
         [], [0], [1, [0, 0, 1, 4]], {}, 0x7FC00000, 0x7F800000, 0xFF800000]


def _corpus(rng: random.Random) -> list[list[bytes]]:
    out = []
    for spec in SPECS:
        for d in (1, 2, 9, 64, 257, 1000):
            for n in (1, 3):
                try:
                    c = build(spec, d, n, rng.randrange(1000))
                except ValueError:
                    continue
                x = torch.randn(d, generator=torch.Generator().manual_seed(rng.randrange(2**31)))
                if rng.random() < 0.3:
                    x[::3] = 0.0
                out.append(encode(c.compress(x, worker=n - 1, step=rng.randrange(10))))
    return out


def _mutate_bytes(b: bytes, rng: random.Random) -> bytes:
    b = bytearray(b)
    op = rng.randrange(5)
    if op == 0 and b:  # flip bits
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
    elif op == 1 and b:  # overwrite a byte
        b[rng.randrange(len(b))] = rng.randrange(256)
    elif op == 2:  # truncate
        del b[rng.randint(0, len(b)):]
    elif op == 3:  # extend
        b += bytes(rng.randrange(256) for _ in range(rng.randint(1, 9)))
    else:  # drop a slice from the middle
        if b:
            i = rng.randrange(len(b))
            del b[i:i + rng.randint(1, 8)]
    return bytes(b)


def _mutate_node(node, rng: random.Random):
    """Replace one field somewhere in the nested header node with a weird value."""
    if not isinstance(node, list) or not node:
        return rng.choice(WEIRD)
    node = list(node)
    i = rng.randrange(len(node))
    if isinstance(node[i], list) and rng.random() < 0.6:
        node[i] = _mutate_node(node[i], rng)
    elif rng.random() < 0.1:
        node.insert(i, rng.choice(WEIRD))
    elif rng.random() < 0.1:
        del node[i]
    elif isinstance(node[i], int) and not isinstance(node[i], bool) and rng.random() < 0.5:
        node[i] = node[i] + rng.choice([-2, -1, 1, 2, 8, 1000, -1000])
    else:
        node[i] = rng.choice(WEIRD)
    return node


def _mutate(frames: list[bytes], rng: random.Random) -> list:
    frames = list(frames)
    op = rng.randrange(9)
    if op <= 2:  # byte-level damage to one frame
        i = rng.randrange(len(frames))
        frames[i] = _mutate_bytes(frames[i], rng)
    elif op <= 4:  # a well-formed header with a wrong field
        head = msgpack.unpackb(frames[0], raw=False)
        head = _mutate_node(head, rng) if rng.random() < 0.9 else [rng.choice(WEIRD), head[1]]
        try:
            frames[0] = msgpack.packb(head, use_bin_type=True)
        except (TypeError, ValueError, OverflowError):
            frames[0] = b"\xc1"
    elif op == 5:  # drop, duplicate or swap frames
        if len(frames) > 1 and rng.random() < 0.4:
            del frames[rng.randrange(1, len(frames))]
        elif rng.random() < 0.5:
            frames.append(rng.choice(frames))
        elif len(frames) > 2:
            i, j = rng.sample(range(1, len(frames)), 2)
            frames[i], frames[j] = frames[j], frames[i]
        else:
            frames = frames[:1]
    elif op == 6:  # damage to several frames at once
        frames = [_mutate_bytes(f, rng) if rng.random() < 0.5 else f for f in frames]
    elif op == 7:  # a data frame replaced by random bytes of the same length
        i = rng.randrange(len(frames))
        frames[i] = bytes(rng.randrange(256) for _ in range(len(frames[i])))
    else:  # not frames at all
        frames = rng.choice([[], None, b"abc", "text", [None], [1, 2], [b""], frames[0], [frames[0], 7], [bytearray(frames[0])]])
    return frames


def _random_message(rng: random.Random) -> list:
    kind = rng.randrange(3)
    if kind == 0:
        return [bytes(rng.randrange(256) for _ in range(rng.randint(0, 40))) for _ in range(rng.randint(1, 5))]
    if kind == 1:  # valid msgpack, random structure
        def obj(depth):
            if depth > 3 or rng.random() < 0.5:
                return rng.choice(WEIRD)
            return [obj(depth + 1) for _ in range(rng.randint(0, 12))]
        try:
            head = msgpack.packb([1, obj(0)])
        except (TypeError, ValueError, OverflowError):
            head = b"\x90"
        return [head] + [bytes(rng.randint(0, 40)) for _ in range(rng.randint(0, 4))]
    # a plausible header of each kind with random fields
    k = rng.randrange(8)
    fields = [rng.choice(WEIRD + [0, 1, 2, 3, 5, 100, 2**20]) for _ in range(rng.randint(2, 11))]
    return [msgpack.packb([1, [k] + fields])] + [bytes(rng.randint(0, 200)) for _ in range(rng.randint(0, 3))]


def _decode_checked(frames):
    try:
        p = decode(frames)
    except WireError as exc:
        assert "internal error" not in str(exc), str(exc)
        assert str(exc)
        return False
    if p.dim <= 10**6:
        dense = p.to_dense()
        assert dense.numel() == p.dim and bool(torch.isfinite(dense).all())
    return True


@pytest.mark.parametrize("seed", range(4))
def test_fuzz_decode_only_raises_wire_error(seed):
    rng = random.Random(seed)
    corpus = _corpus(rng)
    for frames in corpus:  # the originals decode
        assert _decode_checked(frames)
    count = 0
    for _ in range(2500):
        _decode_checked(_mutate(rng.choice(corpus), rng))
        count += 1
    for _ in range(800):
        _decode_checked(_random_message(rng))
        count += 1
    assert count >= 3300  # 4 seeds: > 13,000 messages in all


def test_specific_rejections():
    good = encode(build("topk:ratio=0.1+natural", 100, 1, 0).compress(torch.randn(100)))
    head = msgpack.unpackb(good[0])
    cases = {
        "version": [msgpack.packb([2, head[1]])] + good[1:],
        "msgpack": [b"\xc1"] + good[1:],
        "kind": [msgpack.packb([1, [99] + head[1][1:]])] + good[1:],
        "frames": good[:-1],
        "bytes": good[:-1] + [good[-1] + b"\x00"],
        "dimension": [msgpack.packb([1, [head[1][0], 0, 2**40] + head[1][3:]])] + good[1:],
    }
    for name, frames in cases.items():
        with pytest.raises(WireError):
            decode(frames)
    # indices out of order / out of range: a bitmap with a bit past d
    sign = encode(build("topk:k=3", 10, 1, 0).compress(torch.arange(10.0)))
    h = msgpack.unpackb(sign[0])
    h[1][3] = 1  # force bitmap coding
    with pytest.raises(WireError, match="bitmap"):
        decode([msgpack.packb(h), b"\x00\xff"] + sign[2:])
    # non-finite value
    dense = encode(build("identity", 2, 1, 0).compress(torch.ones(2)))
    with pytest.raises(WireError, match="non-finite"):
        decode([dense[0], torch.tensor([1.0, float("inf")]).numpy().tobytes()])
    # code outside the table
    nat = encode(build("ternary", 8, 1, 0).compress(torch.tensor([1.0, 0.0] * 4)))
    h = msgpack.unpackb(nat[0])
    h[1][9] = 1  # offset 1 on 1-bit codes {0, 1}: code 2 is past the top level
    with pytest.raises(WireError):
        decode([msgpack.packb(h)] + nat[1:])
    # nesting too deep
    node = [0, 0, 0, 1]
    for _ in range(20):
        node = [6, 0x3F800000, node]
    with pytest.raises(WireError, match="deeper"):
        decode([msgpack.packb([1, node]), b"\x00" * 4])
