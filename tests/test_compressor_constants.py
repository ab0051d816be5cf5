"""Every declared constant of every compressor, checked by Monte Carlo on random and tight inputs.

Bounds are checked as "mean <= bound + 4 standard errors" on fixed seeds (shared/spec
biased-compression.md section 4 and marina-p-m3.md section 5 give the tight inputs). Where a paper
states an equality (Rand-K's variance, Perm-K's mean, natural compression at 4/3 2^m, ...) the
equality itself is tested, so a constant declared too loose or too tight both fail.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from common.compressors import build
from tests.montecarlo import collection_error, draw, equal_ok, upper_ok

N_SAMPLES = 2000
N_COLLECTION = 500


def make_input(kind: str, d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + seed)
    signs = torch.where(torch.rand(d, generator=g) < 0.5, -1.0, 1.0).double()
    if kind == "gauss":
        return torch.randn(d, generator=g, dtype=torch.float64)
    if kind == "equal":  # tight for Top-K, adaptive, l1 sign (best case), l2 sign
        return 0.7 * signs
    if kind == "onehot":  # tight for scaled sign's alpha = 1/d and l2 sign's beta = sqrt(d)
        x = torch.zeros(d, dtype=torch.float64)
        x[d // 2] = -2.5
        return x
    if kind == "spiky":
        x = 0.01 * torch.randn(d, generator=g, dtype=torch.float64)
        x[0] = 10.0
        return x
    if kind == "pow43":  # tight for natural compression: E C^2 / x^2 = 9/8
        m = torch.randint(-6, 6, (d,), generator=g).double()
        return signs * 4 / 3 * 2.0**m
    if kind == "mid":  # the midpoint of biased rounding with b = 2: error ratio 1/9
        m = torch.randint(-6, 6, (d,), generator=g).double()
        return signs * 1.5 * 2.0**m
    if kind == "withzeros":
        x = torch.randn(d, generator=g, dtype=torch.float64)
        x[::3] = 0.0
        return x
    raise KeyError(kind)


CASES = [
    # spec, d, n, inputs
    ("identity", 6, 3, ["gauss"]),
    ("topk:k=3", 10, 3, ["gauss", "equal", "spiky"]),
    ("topk:ratio=0.5", 7, 2, ["gauss", "equal"]),
    ("randk:k=3", 10, 4, ["gauss", "spiky"]),
    ("randk:k=3,scaled=false", 10, 4, ["gauss", "equal"]),
    ("samerandk:k=3", 10, 4, ["gauss"]),
    ("samerandk:k=2,scaled=false", 10, 3, ["gauss"]),
    ("permk", 12, 4, ["gauss", "spiky"]),
    ("permk", 10, 4, ["gauss"]),  # n does not divide d
    ("permk", 3, 7, ["gauss"]),  # d < n, n = q d + r with r != 0
    ("permk", 3, 6, ["gauss"]),  # d < n, r = 0
    ("adaptive", 8, 3, ["gauss", "equal", "spiky"]),
    ("exprounding:base=3", 8, 3, ["gauss", "spiky"]),
    ("exprounding:base=2,biased=true", 8, 3, ["gauss", "mid"]),
    ("exprounding:base=4,biased=true", 8, 3, ["gauss", "spiky"]),
    ("natural", 8, 3, ["gauss", "pow43", "withzeros"]),
    ("expdither:base=3,s=3,p=2", 10, 3, ["gauss", "spiky"]),
    ("natdither:s=2,p=inf", 20, 3, ["gauss", "equal"]),
    ("natdither:s=8,p=2", 20, 3, ["gauss"]),
    ("qsgd:s=2", 10, 3, ["gauss", "equal"]),
    ("ternary", 10, 3, ["gauss", "equal"]),
    ("ternary:p=2", 10, 3, ["gauss", "equal"]),
    ("sign", 9, 3, ["gauss", "onehot", "withzeros"]),
    ("sign:scale=l2", 9, 3, ["gauss", "onehot", "equal"]),
    ("sign:scale=l2", 3, 2, ["gauss", "onehot"]),  # d < 4: l2 sign is contractive
    ("scale:lambda=0.5", 5, 2, ["gauss"]),
    ("topk:k=2+natdither:s=10,p=2", 3, 2, ["equal", "gauss"]),  # pitfall 4's counterexample input
    ("topk:k=3+natural", 10, 3, ["gauss", "pow43"]),
    ("permk+natural", 10, 4, ["gauss", "pow43"]),
    ("randk:k=3+natural", 10, 4, ["gauss"]),
    ("samerandk:k=3+natural", 10, 4, ["gauss"]),
    ("natural+scale:lambda=0.888", 8, 3, ["gauss", "pow43"]),
    ("randk:k=3+scale:lambda=0.3", 10, 3, ["gauss"]),  # (1+omega)^-1 scaling as NEOLITHIC uses it
    ("topk:k=4+randk:k=2", 10, 3, ["gauss", "equal"]),
    ("adaptive+natural", 6, 3, ["gauss"]),
    ("topk:k=2+sign", 6, 3, ["gauss"]),
]


def _check(ok_msg, what, spec, kind):
    ok, msg = ok_msg
    assert ok, f"{spec} on {kind}: {what}: {msg}"


@pytest.mark.parametrize("spec,d,n,inputs", CASES, ids=[f"{c[0]}-d{c[1]}-n{c[2]}" for c in CASES])
def test_declared_constants_hold(spec, d, n, inputs):
    c = build(spec, d, n, seed=7)
    cst = c.constants
    assert set(cst) == {"unbiased", "omega", "alpha", "b1", "b2", "theta"}
    for kind in inputs:
        x = make_input(kind, d)
        sq = float(x @ x)
        m = draw(c, x, N_SAMPLES, worker=n - 1)
        if cst["unbiased"]:
            mean = m.samples.mean(0)
            se = m.samples.std(0) / math.sqrt(m.n)
            # An outcome of probability below ~4/N may never show up in N draws, and then the sample
            # standard error is 0: allow a bias of that size (rule of three) besides 4.5 standard errors.
            rare = 4.0 / m.n * m.samples.abs().max(0).values
            dev = (mean - x).abs()
            assert bool((dev <= 4.5 * se + rare + 1e-9 * x.abs().max()).all()), f"{spec} on {kind}: biased mean, max dev {float(dev.max()):.3g}"
        if cst["omega"] is not None:
            _check(upper_ok(m.err(), cst["omega"] * sq, sq), "omega", spec, kind)
        if cst["alpha"] is not None:
            assert 0 < cst["alpha"] <= 1
            _check(upper_ok(m.err(), (1 - cst["alpha"]) * sq, sq), "alpha", spec, kind)
        if cst["b1"] is not None:
            a, b = cst["b1"]
            _check(upper_ok(-m.sq_norm(), -a * sq, sq), "b1 lower", spec, kind)
            _check(upper_ok(m.sq_norm() - b * m.inner(), 0.0, sq), "b1 upper", spec, kind)
        if cst["b2"] is not None:
            g, b = cst["b2"]
            _check(upper_ok(g * sq - m.inner(), 0.0, sq), "b2 gamma", spec, kind)
            _check(upper_ok(m.sq_norm() - b * m.inner(), 0.0, sq), "b2 beta", spec, kind)
        if cst["theta"] is not None:
            _check(upper_ok(collection_error(c, x, N_COLLECTION), cst["theta"] * sq, sq), "theta", spec, kind)


def test_every_registered_compressor_has_a_constants_case():
    from common.compressors import REGISTRY

    covered = {spec.split(":")[0].split("+")[0] for spec, *_ in CASES}
    assert set(REGISTRY) - {"fp16", "bf16"} <= covered


# ---- equalities: the constants are tight where the papers say so ------------------------------------


def test_randk_variance_and_theta_are_exact():
    d, k, n = 10, 3, 4
    x = make_input("gauss", d)
    sq = float(x @ x)
    c = build(f"randk:k={k}", d, n, seed=1)
    omega = d / k - 1
    assert c.constants["omega"] == pytest.approx(omega)
    _check(equal_ok(draw(c, x, N_SAMPLES).err(), omega * sq), "E||C-x||^2 = (d/k-1)||x||^2", "randk", "gauss")
    _check(equal_ok(collection_error(c, x, N_COLLECTION), omega / n * sq), "theta = omega/n", "randk", "gauss")
    same = build(f"samerandk:k={k}", d, n, seed=1)
    _check(equal_ok(collection_error(same, x, N_COLLECTION), omega * sq), "theta = omega", "samerandk", "gauss")
    biased = build(f"randk:k={k},scaled=false", d, n, seed=1)
    _check(equal_ok(draw(biased, x, N_SAMPLES).err(), (1 - k / d) * sq), "(1-k/d)", "randk biased", "gauss")


@pytest.mark.parametrize("d,n", [(12, 4), (10, 4), (3, 7), (3, 6), (1000, 7)])
def test_permk_variance_is_exact(d, n):
    x = make_input("gauss", d)
    sq = float(x @ x)
    c = build("permk", d, n, seed=3)
    omega = (n - 1) if d >= n else n / (n // d) - 1
    assert c.constants["omega"] == pytest.approx(omega)
    for worker in (0, n - 1):
        _check(equal_ok(draw(c, x, 1500 if d < 100 else 300, worker=worker).err(), omega * sq), "omega exact", "permk", f"worker {worker}")


def test_natural_is_tight_at_four_thirds_powers_of_two():
    x = make_input("pow43", 8)
    c = build("natural", 8, 1, seed=0)
    _check(equal_ok(draw(c, x, N_SAMPLES).sq_norm(), 9 / 8 * float(x @ x)), "E||C||^2 = 9/8 ||x||^2", "natural", "pow43")
    powers = torch.tensor([1.0, -0.25, 8.0, 2.0**-20, 2.0**100], dtype=torch.float32)
    exact = build("natural", 5, 1, seed=0)
    assert torch.equal(exact.decompress(exact.compress(powers)), powers)


def test_biased_rounding_midpoint_error_is_one_ninth():
    x = make_input("mid", 8)
    c = build("exprounding:base=2,biased=true", 8, 1)
    y = c.decompress(c.compress(x))
    assert float(((y - x) ** 2).sum() / (x @ x)) == pytest.approx(1 / 9)
    assert c.constants["alpha"] == pytest.approx(8 / 9)


def test_topk_and_adaptive_are_tight_on_equal_magnitudes():
    d, k = 10, 3
    x = make_input("equal", d)
    top = build(f"topk:k={k}", d)
    y = top.decompress(top.compress(x))
    assert float(y @ y) == pytest.approx(k / d * float(x @ x))
    ada = build("adaptive", d)
    m = draw(ada, x, 200)
    assert np.allclose(m.sq_norm(), float(x @ x) / d)


def test_scaled_sign_identity_and_worst_case():
    d = 9
    c = build("sign", d)
    for kind in ("gauss", "withzeros", "onehot"):
        x = make_input(kind, d)
        y = c.decompress(c.compress(x))
        l1, l2sq = float(x.abs().sum()), float(x @ x)
        assert float(((y - x) ** 2).sum()) == pytest.approx((1 - l1**2 / (d * l2sq)) * l2sq, rel=1e-6)
    x = make_input("onehot", d)
    y = c.decompress(c.compress(x))
    assert float(((y - x) ** 2).sum()) == pytest.approx((1 - 1 / d) * float(x @ x), rel=1e-6)
    l2 = build("sign:scale=l2", d)
    y2 = l2.decompress(l2.compress(x))
    assert float(y2 @ y2) == pytest.approx(l2.constants["b1"][1] * float(y2 @ x), rel=1e-6)  # beta = sqrt(d) is attained


def test_sign_of_zero_is_plus_one():
    c = build("sign", 4)
    y = c.decompress(c.compress(torch.tensor([0.0, -2.0, 0.0, 2.0])))
    assert y.tolist() == [1.0, -1.0, 1.0, 1.0]


def test_topk_plus_dithering_needs_the_one_over_zeta_scaling():
    """Pitfall 4: x = (1,1,1), k = 2, natural dithering p = 2, s = 10 is not in B3((d/k) zeta) unscaled."""
    x = torch.ones(3, dtype=torch.float64)
    c = build("topk:k=2+natdither:s=10,p=2", 3, 1, seed=0)
    ratio = draw(c, x, 20000).err().mean() / 3
    assert ratio == pytest.approx(0.4142, abs=0.004)
    assert ratio > 1 - 16 / 27  # B3(zeta_b d/k) with zeta_b ~ 9/8 would promise 0.4074
    assert 1 - c.constants["alpha"] >= ratio  # what is declared holds
    zeta = c.tail.constants["omega"] + 1
    scaled = build(f"topk:k=2+natdither:s=10,p=2+scale:lambda={1 / zeta}", 3, 1, seed=0)
    scaled_ratio = draw(scaled, x, 20000).err().mean() / 3
    assert scaled_ratio == pytest.approx(0.4054, abs=0.004)
    assert scaled_ratio <= 1 - 2 / (3 * zeta) + 0.003


def test_neolithic_scaled_randk_is_contractive():
    """(1+omega)^-1 Rand-K, i.e. unscaled Rand-K, has alpha = k/d (NEOLITHIC Corollary 3)."""
    d, k = 10, 2
    c = build(f"randk:k={k}+scale:lambda={k / d}", d, 1)
    assert c.constants["alpha"] == pytest.approx(k / d, rel=1e-6)
    x = make_input("gauss", d)
    _check(equal_ok(draw(c, x, N_SAMPLES).err(), (1 - k / d) * float(x @ x)), "error", "scaled randk", "gauss")


def test_permk_plus_natural_theta_is_one_eighth():
    d, n = 12, 4
    c = build("permk+natural", d, n, seed=2)
    assert c.constants["theta"] == pytest.approx(1 / 8)
    assert c.constants["omega"] == pytest.approx(n * 9 / 8 - 1)
    x = make_input("pow43", d)  # natural compression is tight there, and n * x keeps the form 4/3 2^m
    _check(equal_ok(collection_error(c, x, 2000), float(x @ x) / 8), "theta = 1/8", "permk+natural", "pow43")
