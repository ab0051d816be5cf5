"""Messages: what one side sends the other in one round, and their bytes.

A message is a few named payloads (``common.compressors`` payloads, encoded by ``common.wire``) and a
few scalar flags (``meta``: the sync coin of MARINA-P, ...). On the wire it is an envelope frame
(msgpack: version, meta, payload names and frame counts) followed by each payload's frames. Its size
is the sum of the frame lengths, envelope included.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgpack
import torch

from common.wire import WireError, decode, encode

ENVELOPE_VERSION = 1
MAX_PAYLOADS = 64
_SCALARS = (bool, int, float, str)


@dataclass(eq=False)
class Message:
    payloads: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


def encode_message(msg: Message) -> list[bytes]:
    for key, value in msg.meta.items():
        if not isinstance(key, str) or not isinstance(value, _SCALARS):
            raise ValueError(f"message meta {key!r}={value!r}: only str keys and scalar values travel")
    parts = [(name, encode(p)) for name, p in msg.payloads.items()]
    envelope = {"v": ENVELOPE_VERSION, "meta": msg.meta, "payloads": [[name, len(frames)] for name, frames in parts]}
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
    if not isinstance(env, dict) or env.get("v") != ENVELOPE_VERSION:
        raise WireError(f"message: unsupported envelope version {env.get('v') if isinstance(env, dict) else env!r}")
    meta, listing = env.get("meta"), env.get("payloads")
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, _SCALARS) for k, v in meta.items()):
        raise WireError("message: meta must map names to scalars")
    if not isinstance(listing, list) or len(listing) > MAX_PAYLOADS:
        raise WireError("message: bad payload listing")
    payloads, pos = {}, 1
    for entry in listing:
        if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str) and isinstance(entry[1], int) and not isinstance(entry[1], bool)):
            raise WireError("message: bad payload listing entry")
        name, count = entry
        if count < 1 or pos + count > len(frames) or name in payloads:
            raise WireError(f"message: payload {name!r} claims {count} frames, {len(frames) - pos} remain")
        payloads[name] = decode(list(frames[pos:pos + count]), device=device, **({} if max_dim is None else {"max_dim": max_dim}))
        pos += count
    if pos != len(frames):
        raise WireError(f"message: {len(frames) - pos} unexpected trailing frame(s)")
    return Message(payloads, meta)


def message_bytes(frames: list[bytes]) -> int:
    return sum(len(f) for f in frames)
