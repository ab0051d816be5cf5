"""Message envelopes: round trip, exact byte counts, and nothing but WireError from garbage."""
from __future__ import annotations

import random

import msgpack
import pytest
import torch

from common.compressors import build
from common.wire.message import Message, decode_message, encode_message, message_bytes
from common.wire import WireError, encode


def sample_message():
    x = torch.randn(200, generator=torch.Generator().manual_seed(0))
    return Message(
        {"g": build("topk:k=10", 200).compress(x), "delta": build("permk", 200, 4).compress(x, worker=2, step=3)},
        {"sync": False, "round": 7},
    )


def test_round_trip_and_byte_count():
    msg = sample_message()
    frames = encode_message(msg)
    assert message_bytes(frames) == sum(len(f) for f in frames)
    assert message_bytes(frames) == len(frames[0]) + sum(message_bytes(encode(p)) for p in msg.payloads.values())
    back = decode_message(frames)
    assert back.meta == msg.meta and list(back.payloads) == ["g", "delta"]
    for name in msg.payloads:
        assert torch.equal(back.payloads[name].to_dense(), msg.payloads[name].to_dense())


def test_max_dim_bounds_what_a_message_may_claim():
    with pytest.raises(WireError):
        decode_message(encode_message(sample_message()), max_dim=100)


def test_only_scalars_travel_in_meta():
    with pytest.raises(ValueError):
        encode_message(Message({}, {"bad": [1, 2]}))


def test_garbage_gives_only_wire_errors():
    rng = random.Random(1)
    good = encode_message(sample_message())
    cases = [[], [b""], [b"\x00"], [msgpack.packb([2, {}])], [msgpack.packb({"v": 1})], [msgpack.packb([1, {"a": [1]}])],
             [msgpack.packb([1, {}, "g", 99])], [msgpack.packb([1, {}, "g"])], good[:2], good + [b"extra"],
             [msgpack.packb([1, {}, "g", 2, "g", 2])] + good[1:3] * 2]
    for _ in range(3000):
        frames = [bytearray(f) for f in good]
        i = rng.randrange(len(frames))
        action = rng.random()
        if action < 0.4 and frames[i]:
            frames[i][rng.randrange(len(frames[i]))] = rng.randrange(256)
        elif action < 0.7:
            frames[i] = frames[i][: rng.randrange(len(frames[i]) + 1)]
        else:
            frames.insert(i, bytearray(rng.randbytes(rng.randrange(12))))
        cases.append([bytes(f) for f in frames])
    for frames in cases:
        try:
            decode_message(frames, max_dim=200)
        except WireError:
            pass


def test_trailing_frames_after_a_message_are_rejected():
    """A frame that no payload claims is an error, never silently dropped: garbage, an empty frame,
    and a copy of one of the message's own frames."""
    good = encode_message(sample_message())
    assert len(decode_message(good, max_dim=200).payloads) == 2
    for extra in ([b"extra"], [b""], [good[-1]], good[1:]):
        with pytest.raises(WireError, match="trailing"):
            decode_message(good + extra, max_dim=200)
    bare = encode_message(Message({}, {"sync": True}))  # meta only: the envelope is the whole message
    assert decode_message(bare).meta == {"sync": True}
    with pytest.raises(WireError, match="trailing"):
        decode_message(bare + [b"\x00"])
