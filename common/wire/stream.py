"""Lean messages on a link: a few bytes of overhead, because both ends remember what was said.

A link is one direction between the server and one worker (worker i's uplinks, or its downlinks).
ZeroMQ delivers a link's messages in order and whole, so the encoder and the decoder of a link can
keep the same memory: the header tree of the messages sent so far. A message's header tree is

    [meta, [name_1, node_1, name_2, node_2, ...], [length of each binary frame]]

(``meta``: the message's scalar flags; ``node_j``: payload j's header node, ``common.wire.codec``;
then the byte lengths of the payloads' binary frames, in order). Its *shape* is the tree without its
scalar leaves (list lengths, map keys); its *leaves* are the scalars in pre-order (payload kinds,
dims, dtypes, scales as float32 bit patterns, Rand-K/Perm-K stream fields, frame lengths ...).

Each link keeps up to ``SLOTS`` shapes (MARINA's uplink alternates between two: a compressed
difference and, on a sync round, the full gradient). For each the decoder predicts every leaf from
the last two messages of that shape, linearly in the round number: a constant stays, a Perm-K
``step`` that advances with the round is extrapolated exactly. Only leaves that differ from their
prediction travel. A message is one frame,

    FULL   flags, round (LEB128 varint), msgpack(tree), binary data     first message of a shape
    SAME   flags, round & 0xFF, binary data                             every leaf as predicted
    DELTA  flags, round & 0xFF, mask, changed leaves (msgpack), data    the leaves in the mask

where ``flags`` = form (bits 7-6: 1 FULL, 2 SAME, 3 DELTA) | direction (bit 5: 0 up, 1 down) | slot
(bits 3-0), bit 4 is zero. The change mask is short because most leaves never change: a slot
remembers which leaves have ever differed from their prediction (its *volatile* leaves: a Top-K
Rice parameter, a quantizer's code width, a scale). The mask is a bit string (bit j is bit j % 8 of
byte j // 8, zero-padded to whole bytes): bit 0 says whether a non-volatile leaf changed, bits 1..V
whether each volatile leaf did; if bit 0 is set, a second bit string with one bit per non-volatile
leaf follows. Then the changed leaves' values, msgpack, in leaf order.

When the binary data is larger than ``SPLIT_BYTES`` it goes in separate frames, one per binary frame,
after this head frame (no copy of large vectors into the head; their lengths come from the
headers). The receiver knows the round it expects, so a low byte suffices to check it. Steady-state
overhead: 2 bytes, plus a mask byte or two and a type byte per changed leaf when something changed
(a scale of scaled sign: 1 + 1 + 5 bytes for its 32 bits).

Everything decodes through the same checks as the self-describing form (``codec.plan_node`` /
``build_node``), so a lean message that does not match what was agreed raises ``WireError``; the
link's memory changes only when a message decoded completely.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Sequence

import msgpack

from common.compressors.message import Message
from common.wire.codec import build_node, content_bits, encode_node, plan_node
from common.wire.header import MAX_DIM, WireError

FULL, SAME, DELTA = 1, 2, 3
UP, DOWN = 0, 1
SLOTS = 16
SPLIT_BYTES = 1 << 14
MAX_TREE_BYTES = 8192
MAX_LEAVES = 2048
MAX_PAYLOADS = 64
MAX_ROUND = 1 << 62
_META = (bool, int, float, str)  # what a meta value may be
_SCALARS = (*_META, type(None))  # what a header leaf may be


def flags_of(frame) -> tuple[int, int, int]:
    """(form, direction, slot) of a lean head frame; ``WireError`` if it is not one."""
    if not len(frame):
        raise WireError("lean message: empty head frame")
    flags = frame[0]
    form, direction, slot = flags >> 6, (flags >> 5) & 1, flags & 0x0F
    if form == 0 or flags & 0x10:
        raise WireError(f"lean message: bad flags byte 0x{flags:02x}")
    return form, direction, slot


def round_field(frame) -> tuple[int, bool]:
    """(round, complete): the full round of a FULL message, else its low byte (complete False)."""
    form, _, _ = flags_of(frame)
    if form == FULL:
        return _varint(memoryview(frame), 1)[0], True
    if len(frame) < 2:
        raise WireError("lean message: no round byte")
    return frame[1], False


# ----------------------------------------------------------------------------------------------
# the header tree: shape and leaves
# ----------------------------------------------------------------------------------------------


def _flatten(obj, leaves: list) -> Any:
    if isinstance(obj, dict):
        return ("m", tuple(obj), tuple(_flatten(v, leaves) for v in obj.values()))
    if isinstance(obj, (list, tuple)):
        return ("a", tuple(_flatten(v, leaves) for v in obj))
    leaves.append(obj)
    return None


def _unflatten(shape, leaves) -> Any:
    if shape is None:
        return next(leaves)
    if shape[0] == "m":
        return {k: _unflatten(s, leaves) for k, s in zip(shape[1], shape[2])}
    return [_unflatten(s, leaves) for s in shape[1]]


def _same(a, b) -> bool:
    return type(a) is type(b) and a == b


class _Slot:
    """One shape's memory: its leaves in the last three messages of that shape, with their rounds."""

    def __init__(self, shape, leaves: list, t: int):
        self.shape = shape
        self.history: list[tuple[int, list]] = [(t, leaves)]  # newest first, at most three
        self.volatile = [False] * len(leaves)
        self.planned: tuple[list, int, _Planned] | None = None  # the decoder's last checked plan: leaves, max_dim, plan

    def predict(self, t: int) -> list:
        """Each integer leaf whose last three values lie on a line in the round (a Perm-K ``step``)
        extrapolated along it where that is exact; every other leaf as last time."""
        (ta, last), *older = self.history
        if len(older) < 2:
            return list(last)
        (tb, before), (tc, oldest) = older
        out = []
        for a, b, c in zip(last, before, oldest):
            if type(a) is int and type(b) is int and type(c) is int and a != b and (a - b) * (tb - tc) == (b - c) * (ta - tb):
                step, rest = divmod((a - b) * (t - ta), ta - tb)
                out.append(a + step if rest == 0 else a)
            else:
                out.append(a)
        return out

    def advance(self, leaves: list, t: int, changed: Sequence[int]) -> None:
        self.history = [(t, leaves), *self.history[:2]]
        for i in changed:
            self.volatile[i] = True

    def split(self) -> tuple[list[int], list[int]]:
        """(volatile leaves, the others), by index."""
        volatile = [i for i, v in enumerate(self.volatile) if v]
        return volatile, [i for i, v in enumerate(self.volatile) if not v]


def _bits_to_bytes(flags: Sequence[bool]) -> bytes:
    out = bytearray((len(flags) + 7) // 8)
    for j, on in enumerate(flags):
        if on:
            out[j // 8] |= 1 << (j % 8)
    return bytes(out)


def _bytes_to_bits(head: memoryview, pos: int, count: int) -> tuple[list[bool], int]:
    size = (count + 7) // 8
    data = bytes(head[pos:pos + size])
    if len(data) != size:
        raise WireError("lean message: change mask cut short")
    if count % 8 and data[-1] >> (count % 8):
        raise WireError("lean message: change mask has bits past its last field")
    return [bool(data[j // 8] >> (j % 8) & 1) for j in range(count)], pos + size


# ----------------------------------------------------------------------------------------------
# encoding
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Encoded:
    """A message encoded once (a broadcast is wrapped for each link): its header tree, its binary
    frames, and its content bits (``codec.content_bits``)."""

    tree: list
    data: list[memoryview]  # read-only views of the packed tensors (``codec.encode_node``)
    bits: int


def encode_parts(msg: Message) -> Encoded:
    """Encode ``msg``'s payloads (on their device; only packed bytes reach the host)."""
    for key, value in msg.meta.items():
        if not isinstance(key, str) or not isinstance(value, _META):
            raise ValueError(f"message meta {key!r}={value!r}: only str keys and scalar values travel")
    if len(msg.payloads) > MAX_PAYLOADS:
        raise ValueError(f"a message carries at most {MAX_PAYLOADS} payloads")
    listing, data, varying, bits = [], [], [], 0
    for name, payload in msg.payloads.items():
        node, frames = encode_node(payload)
        listing += [name, node]
        bits += content_bits(node, [len(f) for f in frames])
        data += frames
        varying += [len(f) for f, (_, lo, hi) in zip(frames, plan_node(node).frames) if lo != hi]
    return Encoded([dict(msg.meta), listing, varying], data, bits)


class LinkEncoder:
    """The sending end of one link (``UP`` or ``DOWN``)."""

    def __init__(self, direction: int):
        self.direction = direction
        self.slots: dict[int, _Slot] = {}
        self.slot_of: OrderedDict[Any, int] = OrderedDict()  # shape -> slot, least recently used first

    def encode(self, t: int, msg: Message | Encoded) -> list[bytes]:
        """The frames of ``msg`` for round ``t`` on this link."""
        enc = msg if isinstance(msg, Encoded) else encode_parts(msg)
        if not 0 <= t < MAX_ROUND:
            raise ValueError(f"round {t} out of range")
        leaves: list = []
        shape = _flatten(enc.tree, leaves)
        index = self.slot_of.get(shape)
        if index is None:
            index = self._new_slot(shape)
            slot = self.slots[index] = _Slot(shape, leaves, t)
            head = bytearray([FULL << 6 | self.direction << 5 | index]) + _leb128(t)
            head += msgpack.packb(enc.tree, use_bin_type=True)
        else:
            self.slot_of.move_to_end(shape)
            slot = self.slots[index]
            predicted = slot.predict(t)
            changed = [i for i, (a, b) in enumerate(zip(leaves, predicted)) if not _same(a, b)]
            head = bytearray([(DELTA if changed else SAME) << 6 | self.direction << 5 | index, t & 0xFF])
            if changed:
                volatile, stable = slot.split()
                is_changed = set(changed).__contains__
                escape = any(map(is_changed, stable))
                head += _bits_to_bytes([escape, *map(is_changed, volatile)])
                if escape:
                    head += _bits_to_bytes(list(map(is_changed, stable)))
                for i in changed:
                    head += msgpack.packb(leaves[i], use_bin_type=True)
            slot.advance(leaves, t, changed)
        if sum(len(f) for f in enc.data) > SPLIT_BYTES:
            return [bytes(head), *enc.data]
        return [b"".join([head, *enc.data])]

    def _new_slot(self, shape) -> int:
        if len(self.slot_of) < SLOTS:
            index = len(self.slot_of)
        else:
            _, index = self.slot_of.popitem(last=False)
        self.slot_of[shape] = index
        return index


def _leb128(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _varint(mv: memoryview, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= len(mv) or shift > 63:
            raise WireError("lean message: bad round varint")
        byte = mv[pos]
        value |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if not byte & 0x80:
            return value, pos


# ----------------------------------------------------------------------------------------------
# decoding
# ----------------------------------------------------------------------------------------------


class LinkDecoder:
    """The receiving end of one link. ``decode`` returns the message and its content bits."""

    def __init__(self, direction: int):
        self.direction = direction
        self.slots: dict[int, _Slot] = {}

    def decode(self, frames: Sequence, t: int, device=None, max_dim: int = MAX_DIM) -> tuple[Message, int]:
        try:
            return self._decode(frames, t, device, max_dim)
        except WireError:
            raise
        except Exception as exc:  # decoding never raises anything but WireError
            raise WireError(f"lean message: {type(exc).__name__}: {exc}") from None

    def _decode(self, frames, t, device, max_dim):
        if not isinstance(frames, (list, tuple)) or not 1 <= len(frames) <= 1 + 4 * MAX_PAYLOADS:
            raise WireError("lean message: expected a head frame and at most a few data frames")
        views = [memoryview(f).cast("B") for f in frames]
        head = views[0]
        form, direction, index = flags_of(head)
        if direction != self.direction:
            raise WireError(f"lean message: a {('up', 'down')[direction]}link on a {('up', 'down')[self.direction]}link")
        if form == FULL:
            sent_t, pos = _varint(head, 1)
            if sent_t != t:
                raise WireError(f"lean message: round {sent_t}, expected {t}")
            tree, pos = _unpack_tree(head, pos)
            leaves: list = []
            shape = _flatten(tree, leaves)
            if len(leaves) > MAX_LEAVES:
                raise WireError(f"lean message: {len(leaves)} header fields, more than {MAX_LEAVES}")
            slot = None
        else:
            slot = self.slots.get(index)
            if slot is None:
                raise WireError(f"lean message: slot {index} was never described on this link")
            if len(head) < 2 or head[1] != t & 0xFF:
                raise WireError(f"lean message: round byte {head[1] if len(head) > 1 else None}, expected round {t}")
            leaves, pos, changed = slot.predict(t), 2, []
            if form == DELTA:
                pos, changed = _apply_changes(head, pos, leaves, slot)
            shape = slot.shape
        cached = slot.planned if slot is not None else None
        if cached is not None and cached[1] == max_dim and len(cached[0]) == len(leaves) and all(map(_same, cached[0], leaves)):
            planned = cached[2]  # the same header as last time: its checks gave this plan then
        else:
            planned = _plan(tree if slot is None else _unflatten(shape, iter(leaves)), max_dim)
        msg, bits = _payloads(planned, head[pos:], views[1:], device)
        if slot is None:
            slot = self.slots[index] = _Slot(shape, leaves, t)
        else:
            slot.advance(leaves, t, changed)
        slot.planned = (leaves, max_dim, planned)
        return msg, bits


def _unpack_tree(head: memoryview, pos: int):
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=True, max_buffer_size=MAX_TREE_BYTES + len(head),
                                max_str_len=256, max_bin_len=0, max_ext_len=0, max_array_len=MAX_LEAVES,
                                max_map_len=MAX_PAYLOADS)
    unpacker.feed(head[pos:pos + MAX_TREE_BYTES])
    try:
        tree = unpacker.unpack()
    except msgpack.OutOfData:
        raise WireError("lean message: header tree cut short") from None
    except Exception as exc:  # msgpack raises several types on garbage
        raise WireError(f"lean message: malformed header tree ({type(exc).__name__})") from None
    return tree, pos + unpacker.tell()


def _apply_changes(head: memoryview, pos: int, leaves: list, slot: _Slot) -> tuple[int, list[int]]:
    volatile, stable = slot.split()
    first, pos = _bytes_to_bits(head, pos, 1 + len(volatile))
    changed = [i for i, on in zip(volatile, first[1:]) if on]
    if first[0]:
        second, pos = _bytes_to_bits(head, pos, len(stable))
        if not any(second):
            raise WireError("lean message: a change mask that names no field")
        changed += [i for i, on in zip(stable, second) if on]
    if not changed:
        raise WireError("lean message: a change mask that names no field")
    changed.sort()
    unpacker = msgpack.Unpacker(raw=False, max_buffer_size=len(head), max_str_len=256, max_bin_len=0,
                                max_ext_len=0, max_array_len=0, max_map_len=0)
    unpacker.feed(head[pos:])
    try:
        for i in changed:
            value = unpacker.unpack()
            if not isinstance(value, _SCALARS):
                raise WireError("lean message: a changed field is not a scalar")
            leaves[i] = value
    except msgpack.OutOfData:
        raise WireError("lean message: changed fields cut short") from None
    except WireError:
        raise
    except Exception as exc:
        raise WireError(f"lean message: malformed changed field ({type(exc).__name__})") from None
    return pos + unpacker.tell(), changed


@dataclass(frozen=True)
class _Planned:
    """A header tree, checked: its meta, each payload's name and plan, and its binary frames' lengths."""

    meta: dict
    plans: list
    lengths: list[int]


def _plan(tree, max_dim) -> _Planned:
    """Check a message's header tree (``WireError`` if it is not one) and plan its payloads. Pure:
    the same tree and ``max_dim`` give the same plan, which is why a link reuses it while the
    header does not change."""
    if not isinstance(tree, list) or len(tree) != 3:
        raise WireError("lean message: the header tree is not [meta, payloads, lengths]")
    meta, listing, varying = tree
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, _META) for k, v in meta.items()):
        raise WireError("lean message: meta must map names to scalars")
    if not isinstance(listing, list) or len(listing) % 2 or len(listing) > 2 * MAX_PAYLOADS:
        raise WireError("lean message: bad payload listing")
    if not isinstance(varying, list) or not all(type(n) is int and n >= 0 for n in varying):
        raise WireError("lean message: bad frame lengths")
    plans, lengths, varying = [], [], iter(varying)
    for name, node in zip(listing[::2], listing[1::2]):
        if not isinstance(name, str) or any(name == other for other, _ in plans):
            raise WireError(f"lean message: bad or repeated payload name {str(name)[:40]!r}")
        plan = plan_node(node, max_dim)
        plans.append((name, plan))
        lengths += [lo if lo == hi else next(varying, -1) for _, lo, hi in plan.frames]
    if next(varying, None) is not None or -1 in lengths:
        raise WireError("lean message: the frame lengths do not match the payloads")
    return _Planned(meta, plans, lengths)


def _payloads(planned: _Planned, rest: memoryview, data: list[memoryview], device) -> tuple[Message, int]:
    lengths = planned.lengths
    if data:
        if rest.nbytes or len(data) != len(lengths):
            raise WireError(f"lean message: trailing frame(s) or bytes: {len(data)} data frame(s) and {rest.nbytes} "
                            f"bytes after the head, the payloads have {len(lengths)} frame(s)")
        views = data
    else:
        if sum(lengths) != rest.nbytes:
            raise WireError(f"lean message: {rest.nbytes} data bytes, the header implies {sum(lengths)}")
        views, pos = [], 0
        for n in lengths:
            views.append(rest[pos:pos + n])
            pos += n
    payloads, bits, used = {}, 0, 0
    for name, plan in planned.plans:
        mine = views[used:used + len(plan.frames)]
        payloads[name] = build_node(plan, mine, device)  # checks each frame's length against the plan
        bits += content_bits(plan.node, [v.nbytes for v in mine])
        used += len(plan.frames)
    return Message(payloads, dict(planned.meta)), bits
