"""``Message``: what one side of a round sends the other, as the rules see it.

A message is a few named payloads (what compressors produce) and a few scalar flags (``meta``: the
sync coin of MARINA-P, ...). Rules build and read messages and know nothing of bytes; the wire layer
(``common.wire.message``) turns a message into frames and back.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(eq=False)
class Message:
    payloads: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
