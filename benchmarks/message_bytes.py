"""Bytes of one algorithm message per compressor, beside the papers' content bits.

    python benchmarks/message_bytes.py [--settings 300:100 1e6:10] [--rounds 8] [--specs ...]

For each compressor and each (d, n): a worker's uplink of a Gaussian vector is compressed and sent
over a fresh link (``common.wire.stream``) for ``--rounds`` rounds, exactly as ``WorkerCore`` sends it.
Printed: the first message (which describes the shape), the mean of the steady-state messages (from
the fourth on), the mean content bits (``payload_bits``: what the papers count) and the mean steady-state
overhead in bytes (message bytes minus content bits / 8, rounded up). Also the STATS
control message that carries the round's timing. Prints a markdown table.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common.compressors import build  # noqa: E402
from common.compressors.message import Message  # noqa: E402
from common.wire.stream import UP, LinkEncoder, encode_parts  # noqa: E402
from runtime import protocol  # noqa: E402

SPECS = ["identity", "fp16", "bf16", "topk:ratio=0.01", "randk:ratio=0.01", "samerandk:ratio=0.01", "permk",
         "adaptive", "natural", "exprounding:base=3", "natdither:s=4,p=inf", "expdither:base=2,s=4,p=2",
         "qsgd:s=16", "ternary", "sign", "sign:scale=l2", "topk:ratio=0.01+natural", "permk+natural"]


def measure(spec: str, d: int, n: int, rounds: int) -> dict:
    c = build(spec, dim=d, n_workers=n, seed=0)
    link = LinkEncoder(UP)
    sizes, bits = [], []
    for t in range(rounds):
        x = torch.randn(d, generator=torch.Generator().manual_seed(t))
        parts = encode_parts(Message({"g": c.compress(x, worker=3, step=t)}))
        sizes.append(protocol.size(link.encode(t, parts)))
        bits.append(parts.bits)
    steady = slice(3, None) if rounds > 3 else slice(None)
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    overhead = [size - math.ceil(b / 8) for size, b in zip(sizes[steady], bits[steady])]
    return {"first": sizes[0], "steady": mean(sizes[steady]), "bits": mean(bits[steady]), "overhead": mean(overhead)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--settings", nargs="+", default=["300:100", "1e6:10"], help="d:n pairs")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--specs", nargs="+", default=SPECS)
    args = parser.parse_args()
    stats = protocol.pack(b"STATS", {"t": 57, "compute_s": 0.0123456, "compress_s": 0.00123456})
    print(f"STATS control message (timing, once a round): {protocol.size(stats)} bytes\n")
    print("| d | n | compressor | first message (B) | steady message (B) | payload bits | overhead (B) |")
    print("|---|---|---|---|---|---|---|")
    for setting in args.settings:
        d, n = (int(float(v)) for v in setting.split(":"))
        for spec in args.specs:
            r = measure(spec, d, n, args.rounds)
            print(f"| {d} | {n} | `{spec}` | {r['first']} | {r['steady']:.1f} | {r['bits']:.0f} | {r['overhead']:.1f} |")


if __name__ == "__main__":
    main()
