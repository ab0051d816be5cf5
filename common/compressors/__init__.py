"""The compressor layer: every compressor of the four papers, built by name.

    from common.compressors import build
    c = build("topk:ratio=0.01+natural", dim=d, n_workers=n, seed=0)
    p = c.compress(x, worker=i, step=t)
    y = c.decompress(p)
    c.constants

A SPEC is ``name[:key=value,...]`` and stages compose with ``+``, left to right: every stage but the
last must be a sparsifier (identity, topk, randk, samerandk, permk, adaptive), whose kept values the
next stages compress; trailing ``scale:lambda=L`` stages multiply everything before them.
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import Any

import torch

from common import spec as specs
from common.compressors.base import REGISTRY, Compressor, Constants, Sparsifier, register
# Each compressor registers itself (``@register``) when its module is imported; this import order is
# the order of ``psc list compressors``. A module added to this package is imported below and listed
# after these, so adding a compressor means adding one file.
from common.compressors.identity import Identity
from common.compressors.casts import Bf16, Fp16
from common.compressors.topk import TopK
from common.compressors.randk import RandK, SameRandK
from common.compressors.permk import PermK
from common.compressors.adaptive import Adaptive
from common.compressors.rounding import ExpRounding, Natural
from common.compressors.dithering import QSGD, ExpDither, NatDither, Ternary
from common.compressors.sign import Sign
from common.compressors.scale import Scale, ScaledCompressor
from common.compressors.chain import Chain
from common.compressors.payloads import Dense, IndexRule, LevelTable, Payload, Quantized, Scaled, Signs, Sparse

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "build", "REGISTRY", "register", "Compressor", "Constants", "Payload", "Dense", "Sparse", "Signs", "Quantized",
    "Scaled", "IndexRule", "LevelTable", "describe", "uses_compiled_kernels",
]


def build(spec: str, dim: int, n_workers: int = 1, seed: int = 0, *, purpose: str = "compress") -> Compressor:
    """Build the compressor named by ``spec`` for vectors of dimension ``dim`` and ``n_workers`` workers.

    ``seed`` keys all randomness together with (step, worker); ``purpose`` separates the streams of
    two compressors of one run (e.g. "uplink" and "downlink"). Raises ``ValueError`` on a bad spec.
    """
    stages = specs.parse_chain(spec)
    factors = []
    while len(stages) > 1 and stages[-1].name == "scale":
        factors.insert(0, stages.pop())
    if any(s.name == "scale" for s in stages[:-1]):
        raise ValueError(f"in {spec!r}: 'scale' may only come last in a '+' chain (it multiplies what precedes it)")
    if any(s.name == "identity" for s in stages) and len(stages) > 1:
        stages = [s for s in stages if s.name != "identity"]  # the neutral element of composition

    compressor = _build_chain(stages, dim, n_workers, seed, purpose, spec)
    for item in factors:
        lam = REGISTRY.build(item, dim, n_workers, seed, purpose=purpose).factor
        compressor = ScaledCompressor(compressor, lam)
    return compressor


def uses_compiled_kernels(spec: str) -> bool:
    """Whether a compressor of ``spec`` (any stage of a ``+`` chain) runs ``cpu_kernels`` on the CPU."""
    return any(REGISTRY.lookup(stage.name).compiled for stage in specs.parse_chain(spec))


def _build_chain(stages, dim, n_workers, seed, purpose, text) -> Compressor:
    head = REGISTRY.build(stages[0], dim, n_workers, seed, purpose=purpose)
    if len(stages) == 1:
        return head
    if not isinstance(head, Sparsifier):
        sparsifiers = ", ".join(n for n, c in REGISTRY.items() if c.is_sparsifier)
        raise ValueError(
            f"in {text!r}: {head.name!r} cannot be followed by another compressor; only a sparsifier "
            f"({sparsifiers}) can, and 'scale' may end any chain"
        )
    tail = _build_chain(stages[1:], head.selection.max_out, n_workers, seed, purpose + "/stage", text)
    return Chain(head, tail)


def describe(spec: str, dim: int, n_workers: int = 1, seed: int = 0) -> dict[str, Any]:
    """Constants and the payload's nominal bits per coordinate for one random N(0,1) vector of ``dim``."""
    c = build(spec, dim, n_workers, seed)
    x = torch.randn(dim, generator=torch.Generator().manual_seed(seed))
    payload = c.compress(x, worker=0, step=0)
    return {
        "spec": c.spec,
        "constants": c.constants,
        "nominal_bits_per_coord": payload.nominal_bits() / dim,
    }
