"""Frame 0 of every message: a small msgpack header, and the checks ``decode`` applies to it.

The header is the msgpack array ``[FORMAT_VERSION, node]``. A node is a msgpack array whose first
element is the payload kind; its other elements are positional (no map keys, so a header stays well
under 64 bytes). Nested payloads (chains) appear as the node's last element. Float32 scalars
(scales, norms, factors) travel as their IEEE-754 bit pattern, an unsigned 32-bit integer, so they
round-trip bit for bit. Dtypes travel as small integers (``DTYPES``).
"""
from __future__ import annotations

import struct

import msgpack
import torch

FORMAT_VERSION = 1
MAX_HEADER_BYTES = 512
MAX_DIM = 2**31
MAX_DEPTH = 8
MAX_WORKERS = 2**24
MAX_LEVELS = 2**20

# Payload kinds (first element of a node).
DENSE, SIGNS, QUANTIZED, SPARSE_SENT, SPARSE_RANDK, SPARSE_PERMK, SCALED = range(7)
KIND_NAMES = ("Dense", "Signs", "Quantized", "Sparse(indices)", "Sparse(randk)", "Sparse(permk)", "Scaled")

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
DTYPE_CODE = {dt: i for i, dt in enumerate(DTYPES)}
DTYPE_NAMES = tuple(str(dt).removeprefix("torch.") for dt in DTYPES)

TABLE_KINDS = ("exp", "uniform", "rounding")


class WireError(ValueError):
    """A message that cannot be encoded, or a received message that is malformed."""


def pack_header(node: list) -> bytes:
    return msgpack.packb([FORMAT_VERSION, node], use_bin_type=True)


def unpack_header(frame) -> list:
    """Parse frame 0 and check the version; return the root node (not yet validated)."""
    if len(frame) > MAX_HEADER_BYTES:
        raise WireError(f"header frame has {len(frame)} bytes, more than the limit {MAX_HEADER_BYTES}")
    try:
        obj = msgpack.unpackb(
            frame, raw=False, strict_map_key=True, use_list=True,
            max_str_len=64, max_bin_len=64, max_array_len=32, max_map_len=0, max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises several types (ValueError, FormatError, StackError, ...)
        raise WireError(f"header is not valid msgpack: {type(exc).__name__}: {exc}") from None
    if not isinstance(obj, list) or len(obj) != 2:
        raise WireError("header must be a msgpack array [version, payload]")
    version = obj[0]
    if type(version) is not int:
        raise WireError(f"header version must be an integer, got {type(version).__name__}")
    if version != FORMAT_VERSION:
        raise WireError(f"unsupported wire format version {version} (this side speaks {FORMAT_VERSION})")
    return obj[1]


def f32_bits(t: torch.Tensor) -> int:
    """The bit pattern of a 0-d float32 tensor as an unsigned int."""
    return struct.unpack("<I", struct.pack("<f", float(t)))[0]


def f32_from_bits(bits: int) -> torch.Tensor:
    return torch.tensor(struct.unpack("<f", struct.pack("<I", bits))[0], dtype=torch.float32)


class Fields:
    """Positional reader of one header node with type and range checks; errors name the field."""

    def __init__(self, node, what: str, size: int):
        if not isinstance(node, list):
            raise WireError(f"{what}: header node must be an array, got {type(node).__name__}")
        if len(node) != size:
            raise WireError(f"{what}: header node has {len(node)} fields, expected {size}")
        self.node, self.what, self.pos = node, what, 1

    def _next(self):
        value = self.node[self.pos]
        self.pos += 1
        return value

    def int(self, name: str, lo: int, hi: int) -> int:
        v = self._next()
        if type(v) is not int:
            raise WireError(f"{self.what}: {name} must be an integer, got {type(v).__name__}")
        if not lo <= v <= hi:
            raise WireError(f"{self.what}: {name}={v} outside [{lo}, {hi}]")
        return v

    def dtype(self, name: str) -> torch.dtype:
        return DTYPES[self.int(name, 0, len(DTYPES) - 1)]

    def f32(self, name: str, allow_none: bool = False) -> torch.Tensor | None:
        v = self._next()
        if v is None and allow_none:
            return None
        if type(v) is not int or not 0 <= v < 2**32:
            raise WireError(f"{self.what}: {name} must be a float32 bit pattern (uint32)")
        t = f32_from_bits(v)
        if not bool(torch.isfinite(t)):
            raise WireError(f"{self.what}: {name} is not finite ({float(t)})")
        return t

    def number(self, name: str) -> float:
        v = self._next()
        if type(v) not in (int, float):
            raise WireError(f"{self.what}: {name} must be a number, got {type(v).__name__}")
        try:
            return float(v)
        except OverflowError:
            raise WireError(f"{self.what}: {name}={v} is out of range") from None

    def raw(self):
        return self._next()
