"""The runtime's protocol on ROUTER/DEALER sockets: control messages and lean algorithm messages.

A control message is the multipart message

    [MAGIC, kind, header (msgpack map), *body frames]

``MAGIC`` carries the protocol version, which changes with what the messages mean as well as with
their layout: version 3 draws Rand-K's supports, which both ends regenerate from a key, in chunks
(``common.compressors.indices.randk_support``), where version 2 used NumPy's ``Generator.choice``, so
a server and a worker of the two versions would disagree on every Rand-K message. Kinds:

* worker -> server: HELLO {version, rank (-1: any), host, pid}, READY {rank, dim}, STATS {t,
  compute_s, compress_s} (a round's telemetry, sent just before its UP), HEARTBEAT {rank}, BYE
  {rank, reason} (also a worker's confirmation, after the final STOP, that the run's last messages
  arrived)
* server -> worker: WELCOME {rank, config}, REFUSE {reason}, HEARTBEAT {}, STOP {reason, ok}
* checkpoints (``runtime.checkpoint``): server -> worker SAVE {t} (upload your state once round t-1
  is applied), RESTORE {t, fresh, seq} + state frames (roll back to round t; seq is new for each rollback); worker -> server STATE {t}
  + state frames, RESTORED {rank, t, seq} (the worker's answer to RESTORE: everything it sends after it
  belongs to the restored run, so the server drops what came before it, and both ends of each link
  start again from an empty memory)

The algorithm's messages, UP (worker -> server) and DOWN (server -> worker), are lean link messages
(``common.wire.stream``): one frame (or a head frame and the data frames of a large message) that
starts with a flags byte, never with ``MAGIC``, and carries the round compactly (its low byte once
the link has described the message's shape). They hold nothing but the algorithm's content and a
few bytes to rebuild its header; telemetry and heartbeats travel as control messages.

Byte counts in the metrics are the lengths of all frames of an UP or DOWN message (``bytes_up``,
``bytes_down``) and of the control messages of the round (``control_bytes``), i.e. what is handed to
the socket. ``parse`` trusts nothing and raises ``ProtocolError``; each received message is parsed
once, where it is received, and travels on as an ``Envelope``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import msgpack

from common.wire import WireError, message_bytes as size  # noqa: F401 (the bytes a message costs)
from common.wire import stream

VERSION = 3
MAGIC = b"PSC%d" % VERSION
KINDS = (b"HELLO", b"READY", b"STATS", b"HEARTBEAT", b"BYE", b"WELCOME", b"REFUSE", b"STOP",
         b"SAVE", b"STATE", b"RESTORE", b"RESTORED")
DATA_KINDS = {stream.UP: b"UP", stream.DOWN: b"DOWN"}


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

    def is_round(self, kind: bytes, t: int) -> bool:
        """Whether this is an UP, DOWN or STATS message of ``kind`` for round ``t`` (a lean message
        whose link knows the shape carries the round's low byte only; ``stream`` checks it in full)."""
        if self.kind != kind:
            return False
        if "t8" in self.header:
            return self.header["t8"] == t & 0xFF
        sent = self.header.get("t")
        return type(sent) is int and sent == t

    @property
    def round_text(self) -> str:
        """The round this message says it belongs to, for error messages."""
        return f"{self.header['t8']} (mod 256)" if "t8" in self.header else repr(self.header.get("t"))

    def seconds(self, name: str) -> float:
        """A non-negative, finite duration from the header (0 when absent); ``ProtocolError`` otherwise."""
        value = self.header.get(name, 0.0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ProtocolError(f"{self.kind.decode()} field {name}={str(value)[:40]!r} is not a duration")
        return float(value)


def parse(frames: list[bytes]) -> Envelope:
    if not frames:
        raise ProtocolError("empty message")
    if bytes(memoryview(frames[0])[:3]) != b"PSC":
        return _parse_data(frames)
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



def _parse_data(frames: list[bytes]) -> Envelope:
    """An UP or DOWN lean message: its direction and round from the head frame; the body is decoded
    by the receiving link (``stream.LinkDecoder``), which knows what the link agreed on."""
    try:
        head = memoryview(frames[0]).cast("B")
        _, direction, _ = stream.flags_of(head)
        t, complete = stream.round_field(head)
    except (WireError, TypeError, ValueError) as exc:
        raise ProtocolError(f"neither a control message nor an algorithm message ({exc})") from None
    header = {"t": t} if complete else {"t8": t}
    return Envelope(DATA_KINDS[direction], header, list(frames), size(frames))
