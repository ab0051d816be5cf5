"""SPEC strings: ``name[:key=value,...]``, chained with ``+`` for compressors.

Used for compressors, algorithms and problems alike (the command line and TOML files pass them).
Values are parsed as bool (``true``/``false``), int, float (``inf`` included) or left as strings.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Spec:
    name: str
    options: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        if not self.options:
            return self.name
        return self.name + ":" + ",".join(f"{k}={_format_value(v)}" for k, v in self.options.items())


def _format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def parse_value(text: str) -> Any:
    low = text.strip().lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    if low in ("inf", "+inf", "infinity"):
        return math.inf
    try:
        return int(low)
    except ValueError:
        pass
    try:
        return float(low)
    except ValueError:
        return text.strip()


def parse(text: str) -> Spec:
    """Parse one ``name:key=value,...`` item; raise ``ValueError`` naming what is malformed."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"empty spec {text!r}: expected name[:key=value,...]")
    name, _, rest = text.strip().partition(":")
    name = name.strip().lower()
    if not name or not all(ch.isalnum() or ch in "-_" for ch in name):
        raise ValueError(f"bad name {name!r} in spec {text!r}: expected name[:key=value,...]")
    options: dict[str, Any] = {}
    if rest.strip():
        for item in rest.split(","):
            key, eq, value = item.partition("=")
            key = key.strip().lower()
            if not eq or not key or not value.strip():
                raise ValueError(f"bad option {item.strip()!r} in spec {text!r}: expected key=value")
            if key in options:
                raise ValueError(f"option {key!r} given twice in spec {text!r}")
            options[key] = parse_value(value)
    return Spec(name, options)


def parse_chain(text: str) -> list[Spec]:
    """Parse ``a:...+b:...`` into its stages, left to right."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"empty spec {text!r}")
    parts = text.split("+")
    if any(not p.strip() for p in parts):
        raise ValueError(f"empty stage in chain {text!r}")
    return [parse(p) for p in parts]
