"""The wire layer: payloads <-> frames of bytes whose lengths are exactly what a message costs.

    from common.wire import encode, decode, WireError, message_bytes
    frames = encode(p)          # list[bytes]: frame 0 a msgpack header, then packed binary frames
    p2 = decode(frames)         # raises WireError on anything malformed
    message_bytes(frames)       # sum of the frame lengths, header included

Frame 0 is the msgpack array ``[version, node]`` (``header.py``); a node is a positional msgpack
array, nested for chains. The binary frames follow in pre-order (a node's own frames, then its
child's). Bit packing is LSB-first (``bitpack.py``): field i of width w occupies stream bits
[i w, (i+1) w), stream bit j is bit j % 8 of byte j // 8, the last byte is zero-padded. Float32
scalars travel in the header as their uint32 bit pattern. Dtype codes: 0 float32, 1 float64,
2 float16, 3 bfloat16.

Layout per payload kind (n = number of coordinates, d = dimension, k = number of kept values):

* ``Dense``: node ``[0, dtype, value_dtype, n]``; one frame: the n values as little-endian IEEE
  numbers of ``value_dtype`` (4 bytes for float32, 2 for fp16/bf16, 8 for float64): n * size bytes.
* ``Signs``: node ``[1, dtype, n, scale_bits]``; one frame: n sign bits (1 = negative),
  ceil(n/8) bytes.
* ``Quantized``: node ``[2, dtype, n, table_kind, base, s, table_dtype, norm_bits or nil, mode,
  offset, w]`` with table_kind 0 "exp", 1 "uniform", 2 "rounding"; two frames: n sign bits
  (ceil(n/8) bytes), then n code fields of w bits (ceil(n w/8) bytes). Mode 0 (plain): code =
  field + offset, offset = the smallest code present, w = ceil(log2(max - min + 1)). Mode 1 (zero
  escape, used when code 0 (the level 0) occurs and it makes w smaller): field 0 is code 0, field
  f >= 1 is code offset + f - 1 with offset the smallest non-zero code present, w =
  ceil(log2(max - offset + 2)). Natural compression of real data: 1 + 5 or 6 bits a coordinate.
* ``Sparse`` with sent indices: node ``[3, dtype, d, coding, r, child]``; one frame with the
  support (``indexcode.py``: coding 0 = Golomb-Rice gaps with parameter r, 1 = d-bit bitmap,
  whichever is smaller), then the child payload's frames (k = child's length).
* ``Sparse`` with a Rand-K rule: node ``[4, dtype, d, seed, step, key_worker, purpose, child]``; no
  index frame (k = child's length, the receiver regenerates the support from d, k and the stream key
  ``mix(seed, step, key_worker, purpose)``, ``common.keys``).
* ``Sparse`` with a Perm-K rule: node ``[5, dtype, d, n_workers, worker, seed, step, key_worker,
  purpose, child]``; no index frame.
* ``Scaled``: node ``[6, factor_bits, child]``; no frame of its own.

Between the server and a worker the runtime does not send this self-describing form: each link
sends lean messages (``stream.py``) that carry a header tree of these nodes once and then only the
fields that change. ``codec.content_bits`` counts a node's content as the papers do.
"""
from common.wire.codec import decode, encode, message_bytes
from common.wire.header import FORMAT_VERSION, MAX_DIM, WireError

__all__ = ["encode", "decode", "message_bytes", "WireError", "FORMAT_VERSION", "MAX_DIM"]
