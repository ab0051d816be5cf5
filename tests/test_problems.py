"""The problems (common/problems/) on their own: objectives, gradient oracles, data readers and the
constants the step sizes are built from.

The neural-network problems have their own files: tests/test_nn_models.py (models, the flat
vector, the oracle) and tests/test_nn_data.py (sharding, batch order, the file readers)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from common.config import RunConfig
from common.problems import build_problem
from runtime.engine import run_inproc


# -- least squares and logistic regression (NEOLITHIC, section 3) --------------------------------

@pytest.mark.parametrize("name", ["least-squares:d=7,m=30", "logistic:d=7,m=30"])
def test_problem_oracle_is_unbiased_and_constants_bound_the_curvature(name):
    p = build_problem(name, 3, seed=4)
    x = p.initial_point()
    full_grad = torch.zeros(p.dim, dtype=torch.float64)
    for i in range(3):
        f = p.oracle(i, torch.device("cpu"), torch.float64)
        # every row equally likely: the mean over all rows is the worker's full gradient
        rows = torch.from_numpy(p.A[i])
        z = rows @ x
        full_grad += rows.T @ p.dloss(z, torch.from_numpy(p.y[i])) / rows.shape[0] / 3
        loss, g = f(x, 11)
        assert g.shape == (p.dim,) and torch.isfinite(loss)
        assert torch.equal(f(x, 11)[1], g)  # the same step draws the same row
    got = p.evaluate(x)
    assert got["grad_norm_sq"] == pytest.approx(float(full_grad @ full_grad), rel=1e-10)
    # L bounds the curvature along random directions: |<grad f(x+h) - grad f(x), h>| <= L ||h||^2
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        h = torch.randn(p.dim, generator=gen, dtype=torch.float64) * 1e-3
        g1 = p._A_all.T @ p.dloss(p._A_all @ (x + h), p._y_all) / p._y_all.numel()
        g0 = p._A_all.T @ p.dloss(p._A_all @ x, p._y_all) / p._y_all.numel()
        assert float((g1 - g0) @ h) <= p.constants["L"] * float(h @ h) * (1 + 1e-6)
    assert p.constants["L"] <= p.constants["L_max"] <= p.constants["L_sample"]


# -- nonconvex logistic regression (CD-Adam) and its data readers ------------------------------

def test_nonconvex_logistic_gradient_and_constants():
    p = build_problem("nonconvex-logistic:dataset=digits,lam=0.1", 20, seed=2)
    assert p.dim == 64 and p.A.shape == (20, 1797 // 20, 64)
    x = torch.randn(64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    # the workers' full local gradients average to the server's exact gradient
    g = sum(p.oracle(i, torch.device("cpu"), torch.float64)(x, 0)[1] for i in range(20)) / 20
    assert p.evaluate(x)["grad_norm_sq"] == pytest.approx(float(g @ g), rel=1e-10)
    # finite differences of the loss
    h = 1e-6
    e = torch.zeros(64, dtype=torch.float64)
    e[5] = 1.0
    fd = (p.evaluate(x + h * e)["loss"] - p.evaluate(x - h * e)["loss"]) / (2 * h)
    assert fd == pytest.approx(float(g[5]), rel=1e-5, abs=1e-8)
    assert p.constants["L"] <= p.constants["L_max"] and p.constants["L"] > 0.2  # 2 lam from the regulariser


def test_libsvm_reader_and_missing_file(tmp_path):
    path = tmp_path / "Tiny.svm"  # upper case: the path is not lower-cased
    rng = np.random.default_rng(0)
    lines = []
    for j in range(41):
        feats = " ".join(f"{k + 1}:{rng.normal():.4f}" for k in range(5) if rng.random() < 0.7)
        lines.append(f"{1 if j % 2 else 0} {feats}")
    path.write_text("\n".join(lines) + "\n")
    p = build_problem(f"nonconvex-logistic:dataset=libsvm,path={path},features=6", 4, seed=0)
    assert p.dim == 6 and p.A.shape == (4, 10, 6) and set(np.unique(p.y)) == {-1.0, 1.0}
    server = run_inproc(RunConfig(algorithm="cd-adam", workers=4, rounds=5, lr="0.01",
                                  problem=f"nonconvex-logistic:dataset=libsvm,path={path}"), None, progress=False)
    assert math.isfinite(server.last["grad_norm_sq"])
    missing = tmp_path / "no_such_file"
    with pytest.raises(ValueError, match="no_such_file"):
        build_problem(f"nonconvex-logistic:dataset=libsvm,path={missing}", 4)


# -- the examples of the biased-compression paper and the identity quadratics (MARINA-P) ----------

def test_problem_constants():
    ex1 = build_problem("biased-example1", 3)
    assert ex1.constants["L_max"] == pytest.approx(34.5)  # 2 ||a_i||^2 + 1/2
    x = torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64)
    assert torch.allclose(ex1.oracle(0, torch.device("cpu"), torch.float64)(x, 0)[1], 0.5 * torch.tensor([-11.0, 9.0, 9.0], dtype=torch.float64))
    q = build_problem("identity-quadratic:d=20", 50, seed=1)
    assert q.constants["L"] == pytest.approx(q.a.mean()) and q.constants["L_max"] == pytest.approx(q.a.max())
    assert q.constants["L_A"] == pytest.approx(math.sqrt(2) * abs(q.a - q.a.mean()).max())
    with pytest.raises(ValueError, match="3 workers"):
        build_problem("biased-example3", 4)


@pytest.mark.parametrize("spec", ["identity-quadratic:d=300", "quadratic:d=300"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gradient_only_entry_point_gives_the_oracles_gradient_bit_for_bit(spec, dtype):
    """The quadratics' gradient-only entry point skips the loss (common.oracle); a rule calling it
    must see exactly the bits of the oracle's second result, so no trajectory changes, and it must
    refuse what the whole oracle refuses."""
    from common.oracle import gradient_entry

    p = build_problem(spec, 3, seed=5)
    x = torch.randn(p.dim, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype)
    for i in range(3):
        f = p.oracle(i, torch.device("cpu"), dtype)
        loss, g = f(x, 2)
        assert loss.dtype == dtype and torch.equal(gradient_entry(f)(x, 2).view(torch.uint8), g.view(torch.uint8))
    other = torch.float32 if dtype == torch.float64 else torch.float64
    for bad in (x[:1], x.to(other), x.reshape(1, -1)):
        with pytest.raises((RuntimeError, ValueError)):
            f(bad, 0)
        with pytest.raises(ValueError, match="expected"):
            gradient_entry(f)(bad, 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_identity_quadratics_compiled_gradient_has_torchs_bits_and_marks_only_finite_results(dtype):
    """Long CPU vectors take one compiled pass, b - (-a) x, for a x + b: the bits of torch's two
    operations (signed zeros, magnitudes from 1e-30 to 1e30), and the result is marked finite so that
    sending it skips the check; an inf in x gives a gradient that is not marked, which the sender's
    check then refuses."""
    from common.compressors import cpu_kernels
    from common.compressors.base import all_finite

    d = cpu_kernels.MIN_CHUNK + 3
    p = build_problem(f"identity-quadratic:d={d}", 2, seed=3)
    gen = torch.Generator().manual_seed(2)
    x = (torch.randn(d, generator=gen, dtype=torch.float64)
         * 10.0 ** torch.randint(-30, 31, (d,), generator=gen).double()).to(dtype)
    x[::7], x[::11] = 0.0, -0.0
    bits = torch.int32 if dtype == torch.float32 else torch.int64
    for i in range(2):
        g = p.oracle(i, torch.device("cpu"), dtype)(x, 0)[1]
        b = torch.from_numpy(p.b[i]).to(dtype)
        assert torch.equal(g.view(bits), (float(p.a[i]) * x).add_(b).view(bits))
        assert cpu_kernels.known_finite(g)
    x[5] = math.inf
    g = p.oracle(0, torch.device("cpu"), dtype)(x, 0)[1]
    assert not cpu_kernels.known_finite(g) and not all_finite(g)


def test_a_wrapper_that_copies_an_oracles_attributes_is_still_called_whole():
    """functools.wraps copies the oracle's attributes: the wrapper must not inherit the gradient-only
    entry point (which would skip the wrapper), so rules call it whole."""
    import functools

    from common.oracle import gradient_entry, gradient_of

    f = build_problem("quadratic:d=10", 2, seed=1).oracle(0, torch.device("cpu"), torch.float64)

    @functools.wraps(f)
    def shifted(x, step=0):
        loss, g = f(x, step)
        return loss, g + 100.0

    x = torch.zeros(10, dtype=torch.float64)
    assert gradient_entry(f) is not None and gradient_entry(shifted) is None
    assert torch.equal(gradient_of(shifted, x, 0), f(x, 0)[1] + 100.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("d", [1, 7, (1 << 18) + 3])
def test_the_quadratics_gradient_in_place_has_the_bits_of_the_plain_expression(d, dtype):
    """The quadratic's gradient c X x + b and loss, computed in place on X x's new vector, are the
    bits of the plain out-of-place expression, and x is left as it was."""
    from common.oracle import gradient_entry
    from common.problems.quadratic import apply_x

    problem = build_problem(f"quadratic:d={d}", 3, 2)
    x = (torch.randn(d, generator=torch.Generator().manual_seed(d), dtype=torch.float64) * 1e3).to(dtype)
    kept = x.clone()
    oracle = problem.oracle(2, "cpu", dtype)
    c, b = float(problem.c[2]), torch.from_numpy(problem.b[2]).to(dtype)
    ax = 2.0 * x
    ax[1:] -= x[:-1]
    ax[:-1] -= x[1:]
    ax = c * (ax * 0.25)
    loss, g = oracle(x, 0)
    assert g.view(torch.uint8).equal((ax + b).view(torch.uint8))
    assert loss.reshape(1).view(torch.uint8).equal((0.5 * torch.dot(x, ax) + torch.dot(b, x)).reshape(1).view(torch.uint8))
    assert gradient_entry(oracle)(x, 0).view(torch.uint8).equal((ax + b).view(torch.uint8))
    assert torch.equal(x, kept) and apply_x(x) is not x
