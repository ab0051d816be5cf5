"""The runtime's protocol on ROUTER/DEALER sockets: explicit frames and a version in every message.

Every multipart message a worker or the server sends is

    [MAGIC, kind, header (msgpack map), *body frames]

``MAGIC`` carries the protocol version. Kinds:

* worker -> server: HELLO {version, rank (-1: any), host, pid}, READY {rank, dim}, UP {t, compute_s,
  compress_s} + the algorithm's message frames, HEARTBEAT {rank}, BYE {rank, reason} (also a
  worker's confirmation, after the final STOP, that the run's last messages arrived)
* server -> worker: WELCOME {rank, config}, REFUSE {reason}, DOWN {t} + message frames,
  HEARTBEAT {}, STOP {reason, ok}
* checkpoints (``runtime.checkpoint``): server -> worker SAVE {t} (upload your state once round t-1
  is applied), RESTORE {t, fresh} + state frames (roll back to round t); worker -> server STATE {t}
  + state frames

Byte counts in the metrics are the lengths of all frames of an UP or DOWN message (this envelope
included), i.e. what is handed to the socket. ``parse`` trusts nothing and raises ``ProtocolError``;
each received message is parsed once, where it is received, and travels on as an ``Envelope``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import msgpack

from common.wire import message_bytes as size  # noqa: F401 (the bytes a message costs)

VERSION = 1
MAGIC = b"PSC%d" % VERSION
KINDS = (b"HELLO", b"READY", b"UP", b"HEARTBEAT", b"BYE", b"WELCOME", b"REFUSE", b"DOWN", b"STOP",
         b"SAVE", b"STATE", b"RESTORE")


class ProtocolError(ValueError):
    pass


def pack(kind: bytes, header: dict[str, Any], body: list[bytes] = (), version: int = VERSION) -> list[bytes]:
    return [b"PSC%d" % version, kind, msgpack.packb(header, use_bin_type=True), *body]


def refusal_reason(frames: list[bytes]) -> str | None:
    """The reason of a REFUSE message, readable whatever protocol version either side speaks."""
    if len(frames) >= 3 and bytes(frames[1]) == b"REFUSE":
        try:
            return str(msgpack.unpackb(bytes(frames[2]), raw=False, max_bin_len=0).get("reason", "refused"))
        except Exception:
            return "refused (unreadable reason)"
    return None


@dataclass(frozen=True)
class Envelope:
    """A parsed message: its kind, its header, the algorithm's frames, and what all its frames cost."""

    kind: bytes
    header: dict[str, Any]
    body: list[bytes]
    nbytes: int

    def round_of(self, kind: bytes) -> int:
        """The round ``t`` of an UP or DOWN message of ``kind``; ``ProtocolError`` otherwise."""
        t = self.header.get("t")
        if self.kind != kind or isinstance(t, bool) or not isinstance(t, int):
            raise ProtocolError(f"expected {kind.decode()}, got {self.kind.decode()} with t={t!r}")
        return t

    def seconds(self, name: str) -> float:
        """A non-negative, finite duration from the header (0 when absent); ``ProtocolError`` otherwise."""
        value = self.header.get(name, 0.0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ProtocolError(f"{self.kind.decode()} field {name}={str(value)[:40]!r} is not a duration")
        return float(value)


def parse(frames: list[bytes]) -> Envelope:
    if len(frames) < 3:
        raise ProtocolError(f"message of {len(frames)} frame(s); expected at least 3")
    magic, kind, header = bytes(frames[0]), bytes(frames[1]), frames[2]
    if not magic.startswith(b"PSC"):
        raise ProtocolError("not a psc message (bad magic)")
    if magic != MAGIC:
        raise ProtocolError(f"protocol version {magic[3:19].decode(errors='replace')!r}, this side speaks {VERSION}")
    if kind not in KINDS:
        raise ProtocolError(f"unknown message kind {kind[:16]!r}")
    try:
        data = msgpack.unpackb(bytes(header), raw=False, strict_map_key=True, max_str_len=1 << 16, max_bin_len=0, max_array_len=1 << 12, max_map_len=256)
    except Exception as exc:
        raise ProtocolError(f"malformed {kind.decode()} header ({exc.__class__.__name__})") from None
    if not isinstance(data, dict):
        raise ProtocolError(f"{kind.decode()} header is not a map")
    return Envelope(kind, data, [bytes(f) for f in frames[3:]], size(frames))

