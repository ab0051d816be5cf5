"""Fixed-width bit packing with vectorized torch ops (no Python loop over elements).

Bit order (used by every frame of the wire format): a packed stream is a sequence of bits; bit ``j``
of the stream is bit ``j % 8`` (least significant first) of byte ``j // 8``. A field of width ``w``
holding the value ``v`` occupies stream bits ``[i*w, (i+1)*w)`` for the ``i``-th field, least
significant bit first. The last byte is padded with zero bits. So ``n`` fields of width ``w`` take
exactly ``ceil(n*w/8)`` bytes, and ``w = 1`` is a plain little-endian bitmap (numpy's
``packbits(bitorder="little")``).

``pack`` runs on whatever device its input is on (a CUDA tensor is packed on the GPU) and returns a
uint8 tensor on that device; ``unpack``, ``unpack_u8`` and ``unpack_flags`` likewise (the decoder
unpacks on the host, or on the GPU a payload is decoded for). Widths 1..32 are supported; odd widths work on 32-bit words, 8 fields at a time.
"""
from __future__ import annotations

import sys

import numpy as np
import torch

_LITTLE = sys.byteorder == "little"
# Byte j of this mask has only bit j set: selects bit j of a byte replicated into all 8 bytes.
_SPREAD_MASK = 0x8040201008040201 - (1 << 64)  # as a signed int64
_REPLICATE = 0x0101010101010101
# Multiplying a word whose byte j is 0 or 1 by this moves byte j's bit to bit 56 + j (no carries).
_GATHER = 0x0102040810204080


def packed_len(n: int, width: int) -> int:
    """Bytes taken by ``n`` fields of ``width`` bits."""
    return (n * width + 7) // 8


def pack(values: torch.Tensor, width: int) -> torch.Tensor:
    """Pack the low ``width`` bits of each integer (or bool) in ``values`` (1-D) into a uint8 tensor.

    The caller guarantees 0 <= values < 2**width.
    """
    n = values.numel()
    device = values.device
    if width == 0 or n == 0:
        return torch.empty(0, dtype=torch.uint8, device=device)
    if not 1 <= width <= 32:
        raise ValueError(f"bit width {width} outside 1..32")
    nbytes = packed_len(n, width)
    if width == 8:
        return values.to(torch.uint8)
    if width == 1 and device.type == "cpu" and values.dtype in (torch.bool, torch.uint8):
        # numpy's little-endian packbits is this layout (any nonzero byte is a one bit)
        return torch.from_numpy(np.packbits(values.contiguous().numpy(), bitorder="little"))
    if width == 1 and _LITTLE:
        padded = torch.zeros(-(-n // 64) * 64, dtype=torch.uint8, device=device)
        padded[:n] = values.to(torch.uint8)
        words = padded.view(torch.int64)  # byte j of each word is 0 or 1
        packed = ((words * _GATHER) >> 56) & 0xFF
        # each int64 word of 8 flags gave one byte; 8 words -> 8 bytes
        return packed.to(torch.uint8)[:nbytes]
    if width in (16, 32) and _LITTLE:
        dt = torch.int16 if width == 16 else torch.int32
        v = values.to(torch.int64)
        v = torch.where(v >= 1 << (width - 1), v - (1 << width), v)
        return v.to(dt).view(torch.uint8)
    if width < 8 and _LITTLE:
        return _pack_small(values, n, width)
    # Any other width (<= 31): 8 fields make exactly ``width`` bytes. Field j of a group starts at bit
    # j*width of the group, inside 32-bit word (j*width)//32; a field that crosses a word boundary
    # puts its high bits into the next word. One vectorized step per j (8 steps), over all groups.
    if not _LITTLE:
        raise NotImplementedError("bit packing needs a little-endian host")
    groups = -(-n // 8)
    v = torch.zeros(groups * 8, dtype=torch.int32, device=device)
    v[:n] = values
    v = v.view(groups, 8)
    nwords = -(-width // 4)
    words = torch.zeros(groups, nwords, dtype=torch.int32, device=device)
    for j in range(8):
        wi, shift = divmod(j * width, 32)
        col = v[:, j]
        words[:, wi] |= col << shift
        if shift + width > 32:
            words[:, wi + 1] |= col >> (32 - shift)
    return words.view(torch.uint8).view(groups, nwords * 4)[:, :width].reshape(-1)[:nbytes]


def unpack(data: torch.Tensor, n: int, width: int) -> torch.Tensor:
    """Inverse of ``pack``: ``n`` fields of ``width`` bits from the uint8 tensor ``data`` (int64 for
    widths 1, 8, 16 and 32, int32 otherwise).

    ``data`` must hold exactly ``packed_len(n, width)`` bytes (the caller checks it).
    """
    device = data.device
    if width == 0 or n == 0:
        return torch.zeros(n, dtype=torch.int64, device=device)
    if width == 8:
        return data[:n].to(torch.int64)
    if width == 1 and _LITTLE:
        words = data.to(torch.int64) * _REPLICATE & _SPREAD_MASK
        return (words.view(torch.uint8) != 0).to(torch.int64)[:n]
    if width in (16, 32) and _LITTLE:
        dt = torch.int16 if width == 16 else torch.int32
        return data.view(dt).to(torch.int64) & ((1 << width) - 1)
    if width < 8 and _LITTLE:
        return unpack_small(data, n, width).to(torch.int64)
    if not _LITTLE:
        raise NotImplementedError("bit unpacking needs a little-endian host")
    groups = -(-n // 8)
    nwords = -(-width // 4)
    flat = torch.zeros(groups * width, dtype=torch.uint8, device=device)
    flat[: data.numel()] = data
    if nwords * 4 == width:
        buf = flat.view(groups, width)
    else:
        buf = torch.zeros(groups, nwords * 4, dtype=torch.uint8, device=device)
        buf[:, :width] = flat.view(groups, width)
    words = buf.view(torch.int32)
    out = torch.empty(groups, 8, dtype=torch.int32, device=device)
    mask = (1 << width) - 1
    for j in range(8):
        wi, shift = divmod(j * width, 32)
        low = words[:, wi] >> shift
        if shift + width > 32:
            low = (low & ((1 << (32 - shift)) - 1)) | (words[:, wi + 1] << (32 - shift))
        out[:, j] = low & mask
    return out.view(-1)[:n]


def _lane_masks(width: int) -> list[tuple[int, int, int]]:
    """For the three merge steps of ``_pack_small`` (lanes of 16, 32, 64 bits holding two fields of
    ``f`` = width, 2 width, 4 width bits): (lane bits, mask of the low field, f) with the masks
    replicated over the 64-bit word, as signed int64 constants."""
    out = []
    for lane, f in ((16, width), (32, 2 * width), (64, 4 * width)):
        low = sum(((1 << f) - 1) << (lane * j) for j in range(64 // lane))
        out.append((lane, low - (1 << 64) if low >= 1 << 63 else low, f))
    return out


def _pack_small(values: torch.Tensor, n: int, width: int) -> torch.Tensor:
    """Widths 2..7: the 8 fields of a group sit in the 8 bytes of one int64 word; three SWAR steps
    merge neighbouring fields (bytes, then 16-bit lanes, then 32-bit lanes) until the group's
    8 * width bits are the low bits of the word, whose first ``width`` bytes are the packed group."""
    groups = -(-n // 8)
    if values.dtype == torch.uint8 and n == groups * 8 and values.is_contiguous():
        buf = values.clone()
    else:
        buf = torch.zeros(groups * 8, dtype=torch.uint8, device=values.device)
        buf[:n] = values
    words = buf.view(torch.int64)
    masks = _lane_masks(width)
    block = _block(groups, values.device)
    high = torch.empty(block, dtype=torch.int64, device=values.device)
    for start in range(0, groups, block):  # in place, in blocks that stay in a CPU's cache
        w = words[start:start + block]
        h = high[: w.numel()]
        for lane, low, f in masks:
            # the high field of each lane starts at lane/2 and moves down to f: shift by lane/2 - f
            torch.bitwise_right_shift(w, lane // 2 - f, out=h).bitwise_and_(low << f)
            w.bitwise_and_(low).bitwise_or_(h)
    return buf.view(groups, 8)[:, :width].reshape(-1)[: packed_len(n, width)]


_WORDS = 1 << 15  # int64 words ``_pack_small`` and ``unpack_small`` work on at a time on a CPU


def _block(groups: int, device: torch.device) -> int:
    """Words per step: cache-sized blocks on a CPU; on a GPU all of them (each step is a kernel
    launch of some microseconds, so blocks would make d = 1e7 cost hundreds of launches)."""
    return max(1, min(groups, _WORDS) if device.type == "cpu" else groups)


def unpack_u8(data: torch.Tensor, n: int, width: int) -> torch.Tensor:
    """``unpack`` for widths 1..8, as a uint8 tensor (no int64 temporaries)."""
    if width == 8:
        return data[:n]
    if width == 1 and data.device.type == "cpu":
        return torch.from_numpy(np.unpackbits(data.numpy(), count=n, bitorder="little"))
    if width == 1:
        return unpack_flags(data, n).view(torch.uint8)
    return unpack_small(data, n, width)


def unpack_flags(data: torch.Tensor, n: int) -> torch.Tensor:
    """The ``n`` one-bit fields of ``data`` as a bool tensor, in torch on ``data``'s device: each byte
    spread over the 8 bytes of an int64 word (a temporary of n bytes, not the 8 n of ``unpack``)."""
    if not _LITTLE:
        raise NotImplementedError("bit unpacking needs a little-endian host")
    words = data.to(torch.int64, copy=True).mul_(_REPLICATE).bitwise_and_(_SPREAD_MASK)
    return (words.view(torch.uint8) != 0)[:n]


def unpack_small(data: torch.Tensor, n: int, width: int) -> torch.Tensor:
    """Inverse of ``_pack_small`` for widths 2..7: the ``n`` fields as a uint8 tensor."""
    groups = -(-n // 8)
    buf = torch.zeros(groups, 8, dtype=torch.uint8, device=data.device)
    flat = buf[:, :width]
    full = data.numel() // width
    flat[:full] = data[: full * width].view(full, width)
    if full < groups:
        tail = torch.zeros(width, dtype=torch.uint8, device=data.device)
        tail[: data.numel() - full * width] = data[full * width:]
        flat[full] = tail
    words = buf.view(torch.int64).view(-1)
    masks = list(reversed(_lane_masks(width)))
    block = _block(groups, data.device)
    high = torch.empty(block, dtype=torch.int64, device=data.device)
    for start in range(0, groups, block):  # in place, in blocks that stay in a CPU's cache
        w = words[start:start + block]
        h = high[: w.numel()]
        for lane, low, f in masks:
            torch.bitwise_right_shift(w, f, out=h).bitwise_and_(low).bitwise_left_shift_(lane // 2)
            w.bitwise_and_(low).bitwise_or_(h)
    return buf.view(-1)[:n]


def padding_is_zero(data: torch.Tensor, nbits: int) -> bool:
    """True when the bits after the first ``nbits`` of ``data`` (the last byte's padding) are zero."""
    rem = nbits % 8
    if rem == 0 or data.numel() == 0:
        return True
    return int(data[-1]) >> rem == 0


def width_for(count: int) -> int:
    """Bits needed to tell ``count`` different values apart: ceil(log2(count)), 0 for count <= 1."""
    return max(0, (count - 1).bit_length())
