"""Messages on the wire: a ``Message`` (``common.compressors.message``) as frames, and back.

A message is a few named payloads and a few scalar flags (``meta``). On the wire it is an envelope frame,
the msgpack array ``[version, meta, name_1, frames_1, name_2, frames_2, ...]``, followed by each
payload's frames. Its size is the sum of the frame lengths, envelope included (about 15 bytes).
"""
from __future__ import annotations

import msgpack
import torch

from common.compressors.message import Message
from common.wire.codec import decode, encode, message_bytes  # noqa: F401 (message_bytes re-exported)
from common.wire.header import WireError

ENVELOPE_VERSION = 1
MAX_PAYLOADS = 64
_SCALARS = (bool, int, float, str)


def encode_message(msg: Message) -> list[bytes]:
    for key, value in msg.meta.items():
        if not isinstance(key, str) or not isinstance(value, _SCALARS):
            raise ValueError(f"message meta {key!r}={value!r}: only str keys and scalar values travel")
    parts = [(name, encode(p)) for name, p in msg.payloads.items()]
    envelope = [ENVELOPE_VERSION, msg.meta]
    for name, frames in parts:
        envelope += [name, len(frames)]
    out = [msgpack.packb(envelope, use_bin_type=True)]
    for _, frames in parts:
        out.extend(frames)
    return out


def decode_message(frames: list[bytes], device: torch.device | str | None = None, max_dim: int | None = None) -> Message:
    """Decode an encoded message; anything malformed raises ``WireError``.

    ``max_dim`` (the run's dimension) bounds what a payload may claim, so a small hostile message
    cannot make the receiver allocate more than the run's vectors."""
    if not isinstance(frames, (list, tuple)) or not frames:
        raise WireError("message: no frames")
    try:
        env = msgpack.unpackb(bytes(frames[0]), raw=False, strict_map_key=True, max_str_len=4096, max_array_len=4 * MAX_PAYLOADS, max_map_len=64, max_bin_len=0, max_ext_len=0)
    except Exception as exc:  # msgpack raises several types on garbage
        raise WireError(f"message: malformed envelope ({exc.__class__.__name__})") from None
    if not isinstance(env, list) or len(env) < 2 or env[0] != ENVELOPE_VERSION:
        raise WireError(f"message: unsupported envelope {str(env)[:40]!r}")
    meta, listing = env[1], env[2:]
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, _SCALARS) for k, v in meta.items()):
        raise WireError("message: meta must map names to scalars")
    if len(listing) % 2 or len(listing) > 2 * MAX_PAYLOADS:
        raise WireError("message: bad payload listing")
    payloads, pos = {}, 1
    for name, count in zip(listing[::2], listing[1::2]):
        if not (isinstance(name, str) and isinstance(count, int) and not isinstance(count, bool)):
            raise WireError("message: bad payload listing entry")
        if count < 1 or pos + count > len(frames) or name in payloads:
            raise WireError(f"message: payload {name!r} claims {count} frames, {len(frames) - pos} remain")
        kwargs = {} if max_dim is None else {"max_dim": max_dim}
        payloads[name] = decode(list(frames[pos:pos + count]), device=device, **kwargs)
        pos += count
    if pos != len(frames):
        raise WireError(f"message: {len(frames) - pos} unexpected trailing frame(s)")
    return Message(payloads, meta)

