"""Lean link messages (``common.wire.stream``): round trips for every compressor, the bytes they
cost beside the papers' content bits, shapes that alternate, and malformed messages that raise
``WireError`` and leave the link's memory as it was."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from common.compressors import build
from common.compressors.message import Message
from common.compressors.payloads import Dense
from common.wire import WireError, encode
from common.wire.codec import content_bits
from common.wire.header import unpack_header
from common.wire.stream import DOWN, SPLIT_BYTES, UP, LinkDecoder, LinkEncoder, Encoded, encode_parts

SPECS = ["identity", "fp16", "bf16", "topk:ratio=0.01", "randk:ratio=0.01", "samerandk:ratio=0.01", "permk",
         "adaptive", "natural", "exprounding:base=3", "natdither:s=4,p=inf", "expdither:base=2,s=4,p=2",
         "qsgd:s=16", "ternary", "sign", "sign:scale=l2", "topk:ratio=0.01+natural", "permk+natural",
         "topk:ratio=0.05+scale:lambda=0.5"]


def vector(d: int, t: int) -> torch.Tensor:
    return torch.randn(d, generator=torch.Generator().manual_seed(1000 + t))


def link(spec: str, d: int, n: int, rounds: int, worker: int = 3):
    """(frames, message sent, content bits) of ``rounds`` messages of one compressor on one link."""
    c = build(spec, dim=d, n_workers=n, seed=5)
    enc = LinkEncoder(UP)
    out = []
    for t in range(rounds):
        msg = Message({"g": c.compress(vector(d, t), worker=worker, step=t)})
        parts = encode_parts(msg)
        out.append((enc.encode(t, parts), msg, parts.bits))
    return out


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("d,n", [(300, 100), (5000, 10)])
def test_every_compressor_round_trips_with_at_most_8_bytes_of_overhead(spec, d, n):
    """Overhead: the bytes of a message beyond its content bits (rounded up to whole bytes). In the
    steady state (from the fourth message, once the link has seen the shape and the step's progression)
    it is at most 8 bytes on average; a header field that changes for the first time costs a few
    bytes more once."""
    dec = LinkDecoder(UP)
    steady = []
    for t, (frames, msg, bits) in enumerate(link(spec, d, n, 16)):
        got, got_bits = dec.decode(frames, t)
        assert torch.equal(got.payloads["g"].to_dense(), msg.payloads["g"].to_dense())
        assert got_bits == bits
        overhead = sum(len(f) for f in frames) - math.ceil(bits / 8)
        assert overhead <= (120 if t < 3 else 14), (t, overhead)
        if t >= 3:
            steady.append(overhead)
    assert sum(steady) / len(steady) <= 8, steady


def test_content_bits_follow_the_papers_count():
    d = 1000
    x = vector(d, 0)
    cases = {"identity": 32 * d, "fp16": 16 * d, "sign": d + 32, "randk:k=10": 10 * 32, "permk": (d // 10) * 32}
    for spec, bits in cases.items():
        p = build(spec, dim=d, n_workers=10, seed=0).compress(x, worker=0, step=0)
        assert encode_parts(Message({"g": p})).bits == bits, spec
    # Top-K: the values plus the index frame as sent (Golomb-Rice or bitmap, whichever is smaller)
    p = build("topk:k=10", dim=d, n_workers=10, seed=0).compress(x, worker=0, step=0)
    frames = encode(p)
    assert encode_parts(Message({"g": p})).bits == 10 * 32 + 8 * len(frames[1])
    # natural compression: one sign bit and the exponent field as wide as the data needs, per value
    p = build("natural", dim=d, n_workers=10, seed=0).compress(x, worker=0, step=0)
    width = unpack_header(encode(p)[0])[10]
    assert 1 <= width <= 6 and encode_parts(Message({"g": p})).bits == d * (1 + width)


def test_perm_k_stream_fields_are_predicted_so_a_steady_message_is_its_values_and_2_bytes():
    for t, (frames, msg, bits) in enumerate(link("permk", 300, 100, 10)):
        if t >= 3:
            assert len(frames) == 1 and len(frames[0]) == bits // 8 + 2


def test_alternating_shapes_keep_their_own_memory():
    """MARINA's uplink: a compressed difference most rounds, the full gradient on a sync round."""
    d = 200
    sparse = build("randk:k=5", dim=d, n_workers=4, seed=0)
    enc, dec = LinkEncoder(UP), LinkDecoder(UP)
    forms = []
    for t in range(30):
        if t % 4 == 3:
            msg = Message({"g": Dense(vector(d, t), torch.float32)}, {"sync": True})
        else:
            msg = Message({"delta": sparse.compress(vector(d, t), worker=1, step=t)}, {"sync": False})
        frames = enc.encode(t, msg)
        forms.append(frames[0][0] >> 6)
        got, _ = dec.decode(frames, t)
        assert got.meta == msg.meta and set(got.payloads) == set(msg.payloads)
    assert forms.count(1) == 2  # one full description per shape, then deltas only


def test_large_messages_send_their_data_in_separate_frames():
    d = SPLIT_BYTES  # 4 d bytes of float32 values: more than SPLIT_BYTES
    enc, dec = LinkEncoder(DOWN), LinkDecoder(DOWN)
    for t in range(3):
        x = vector(d, t)
        frames = enc.encode(t, Message({"x": Dense(x, torch.float32)}))
        assert len(frames) == 2 and len(frames[1]) == 4 * d
        got, bits = dec.decode(frames, t)
        assert torch.equal(got.payloads["x"].to_dense(), x) and bits == 32 * d


def test_a_large_dense_frame_is_a_read_only_view_of_the_payload_not_a_copy():
    """The link sends a dense payload's own memory (ZeroMQ keeps the view alive until it is sent);
    read-only, so a decoder in the same process copies instead of sharing the sender's memory."""
    x = vector(SPLIT_BYTES, 0)
    frames = LinkEncoder(DOWN).encode(0, Message({"x": Dense(x, torch.float32)}))
    view = frames[1]
    assert isinstance(view, memoryview) and view.readonly and len(view) == 4 * x.numel()
    assert torch.frombuffer(bytearray(view), dtype=torch.float32).equal(x)
    x[0] = 12345.0  # the frame is x's memory: what a rule must not do before the frame is sent
    assert torch.frombuffer(bytearray(view), dtype=torch.float32)[0] == 12345.0
    got, _ = LinkDecoder(DOWN).decode(frames, 0)
    got = got.payloads["x"].to_dense()
    got[1] = -1.0  # the decoded copy is the receiver's own
    assert x[1] != -1.0
    assert all(isinstance(f, bytes) for f in encode(Dense(x, torch.float32)))  # the public form owns its bytes


def steady(spec="topk:k=4", d=100, rounds=6):
    """An encoder and a decoder that have exchanged ``rounds`` messages, and the next message."""
    c = build(spec, dim=d, n_workers=4, seed=0)
    enc, dec = LinkEncoder(UP), LinkDecoder(UP)
    for t in range(rounds):
        dec.decode(enc.encode(t, Message({"g": c.compress(vector(d, t), worker=0, step=t)})), t)
    msg = Message({"g": c.compress(vector(d, rounds), worker=0, step=rounds)})
    return enc, dec, msg, enc.encode(rounds, msg)


def test_malformed_lean_messages_raise_wire_error_and_keep_the_link():
    _, dec, msg, frames = steady()
    t = 6
    head = frames[0]
    bad = {
        "empty": [b""],
        "reserved flag": [bytes([head[0] | 0x10]) + head[1:]],
        "wrong direction": [bytes([head[0] ^ 0x20]) + head[1:]],
        "unknown slot": [bytes([(head[0] & 0xF0) | 0x0F]) + head[1:]],
        "wrong round": [head[:1] + bytes([(t + 1) & 0xFF]) + head[2:]],
        "cut short": [head[:-1]],
        "extra byte": [head + b"\x00"],
        "trailing frame": [head, b"x"],
        "no frames": [],
    }
    for name, frames_bad in bad.items():
        with pytest.raises(WireError):
            dec.decode(frames_bad, t)
    got, _ = dec.decode(frames, t)  # the link's memory did not move
    assert torch.equal(got.payloads["g"].to_dense(), msg.payloads["g"].to_dense())


def test_a_header_that_stays_the_same_is_planned_once_and_still_checked():
    """The decoder reuses the plan of a header it has just checked; a tighter ``max_dim`` is checked
    again, the data's length always, and each message gets its own meta."""
    d = 50
    enc, dec = LinkEncoder(UP), LinkDecoder(UP)
    for t in range(4):
        dec.decode(enc.encode(t, Message({"g": Dense(vector(d, t), torch.float32)}, {"sync": True})), t)
    frames = enc.encode(4, Message({"g": Dense(vector(d, 4), torch.float32)}, {"sync": True}))
    assert frames[0][0] >> 6 == 2  # SAME: every header leaf as predicted
    with pytest.raises(WireError, match="length"):
        dec.decode(frames, 4, max_dim=d - 1)
    with pytest.raises(WireError):
        dec.decode([frames[0][:-4]], 4)
    got, _ = dec.decode(frames, 4)
    assert torch.equal(got.payloads["g"].values, vector(d, 4))
    got.meta["changed"] = 1
    again, _ = dec.decode(enc.encode(5, Message({"g": Dense(vector(d, 5), torch.float32)}, {"sync": True})), 5)
    assert again.meta == {"sync": True} and torch.equal(again.payloads["g"].values, vector(d, 5))


def test_a_delta_that_makes_a_header_invalid_is_refused():
    """A well-formed DELTA whose changed field breaks the payload's header (a dimension beyond the
    run's, a string, nil, a negative number) is refused, and the link goes on."""
    enc, dec, msg, frames = steady()
    t = 6
    parts = encode_parts(msg)
    for value in (2**40, "abc", None, -1):
        tree = copy.deepcopy(parts.tree)
        tree[1][1][2] = value  # Sparse's dimension
        bad = copy.deepcopy(enc).encode(t, Encoded(tree, parts.data, parts.bits))
        assert bad[0][0] >> 6 == 3  # a DELTA
        with pytest.raises(WireError):
            dec.decode(bad, t, max_dim=100)
    assert dec.decode(frames, t)[0].payloads["g"].dim == 100


LINKS = {spec: steady(spec, d=64, rounds=4)[1:] for spec in ("topk:k=4", "natural", "permk", "sign")}


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_mutated_lean_messages_raise_only_wire_error(data):
    for dec, _, frames in LINKS.values():
        head = bytearray(frames[0])
        for _ in range(data.draw(st.integers(1, 4))):
            i = data.draw(st.integers(0, len(head) - 1))
            head[i] = data.draw(st.integers(0, 255))
        cut = data.draw(st.integers(0, len(head)))
        try:
            copy.deepcopy(dec).decode([bytes(head[:cut])], 4)
        except WireError:
            pass


def test_content_bits_of_sparse_and_scaled_nodes():
    node = [6, 0x3F000000, [3, 0, 100, 0, 2, [0, 0, 0, 5]]]  # Scaled(Sparse(indices, Dense of 5 float32))
    assert content_bits(node, [4, 20]) == 32 + 8 * 4 + 5 * 32
