"""Reductions the papers state, checked round by round in one process (``runtime.engine.Engine``: the
same rules and wire format as the real processes), the invariant of M3's momentum, and the one
options-and-registry mechanism shared by compressors, algorithms and problems."""
from __future__ import annotations

import ast
import pathlib

import pytest
import torch

from common.config import RunConfig
from common.options import Param, Registry
from common.compressors import cpu_kernels
from runtime.engine import Engine

QUAD = "quadratic:d=40,la2=4,lb2=400"
ROOT = pathlib.Path(__file__).resolve().parent.parent


def run(config: RunConfig):
    """Yield (t, server_core, worker_cores) after each round."""
    engine = Engine(config)
    try:
        for t, _ in engine.rounds():
            yield t, engine.server, engine.workers
    finally:
        engine.close()


def gd_iterates(**common) -> list[torch.Tensor]:
    return [server.rule.x.clone() for _, server, _ in run(RunConfig(algorithm="gd", **common))]


# --- the mean of the uplinks ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("dim", [1, 7, 1000, 65537, 300_001])
def test_mean_of_the_uplinks_is_bit_identical_to_stacking_them(dtype, dim):
    """The running sum that mean_of uses for up to 4 vectors gives torch.stack(...).mean(0)'s bits,
    with values of very different magnitudes (where the order of additions shows) and zeros of both
    signs (torch's sum is +0 where every row is -0), for every n."""
    from common.algorithms.base import full, mean_of
    from common.compressors.message import Message

    g = torch.Generator().manual_seed(dim)
    for n in range(1, 19):  # 5 to 17 long vectors: ATen's order without the stack (row_order)
        vectors = [(torch.randn(dim, generator=g) * 10.0 ** torch.randint(-3, 4, (dim,), generator=g)).to(dtype)
                   for _ in range(n)]
        for i, v in enumerate(vectors):
            v[::5] = -0.0  # -0 in every row
            v[1::5] = -0.0 if i % 2 else 0.0  # zeros of both signs
        got = mean_of([Message({"g": full(v)}) for v in vectors], "g")
        assert torch.equal(got.view(torch.uint8), torch.stack(vectors).mean(0).view(torch.uint8)), (n, dtype, dim)


@pytest.mark.parametrize("spec", ["topk:ratio=0.05", "randk:ratio=0.1", "permk", "topk:ratio=0.05+natural", "sign"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_mean_of_sparse_and_sign_uplinks_is_bit_identical_to_stacking_their_dense_forms(spec, dtype):
    """Sparse and sign payloads are summed without their dense forms (``add_dense``): the same bits
    as stacking the dense forms, with zeros of both signs among the kept values, for n = 2..9 (from 5
    on with ATen's last columns from their dense forms alone)."""
    from common.algorithms.base import mean_of
    from common.compressors import build
    from common.compressors.message import Message
    from common.wire import decode, encode

    from common.compressors import cpu_kernels

    dim = cpu_kernels.MIN_CHUNK + 3001  # where the sign payloads take the compiled pass
    g = torch.Generator().manual_seed(8)
    compressor = build(spec, dim, n_workers=9)
    payloads = []
    for worker in range(9):
        x = torch.randn(dim, generator=g, dtype=dtype) * 10.0 ** (worker % 5)
        x[::3] = -0.0
        x[-40:] *= 1e6  # in every Top-K's support: ATen's last columns
        payloads.append(decode(encode(compressor.compress(x, worker=worker, step=2))))
    other = build("sign" if spec != "sign" else "topk:ratio=0.05", dim, n_workers=9)
    payloads.insert(1, other.compress(torch.randn(dim, generator=g, dtype=dtype), worker=1, step=2))  # kinds mixed
    for n in range(2, 10):
        got = mean_of([Message({"c": p}) for p in payloads[:n]], "c")
        expected = torch.stack([p.to_dense() for p in payloads[:n]]).mean(0)
        assert torch.equal(got.view(torch.uint8), expected.view(torch.uint8)), n


def test_mean_of_refuses_uplinks_of_different_lengths_instead_of_broadcasting():
    from common.algorithms.base import full, mean_of
    from common.compressors.message import Message

    with pytest.raises(RuntimeError, match="equal size"):
        mean_of([Message({"g": full(torch.ones(5))}), Message({"g": full(torch.ones(1))})], "g")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_step_by_the_mean_of_dense_uplinks_is_the_step_by_the_stacked_mean(dtype):
    """descend_by_mean (one compiled pass for long dense uplinks) gives x - lr * stack(...).mean(0)'s
    bits for n = 1..16 (5..14 in ATen's order, 15 and 16 by torch's ops), short and long vectors, and
    refuses different lengths as before."""
    from common.algorithms.base import descend_by_mean, full
    from common.compressors import cpu_kernels
    from common.compressors.message import Message

    g = torch.Generator().manual_seed(9)
    for dim in (1000, cpu_kernels.MIN_COMPILED + 7, cpu_kernels.MIN_CHUNK + 11):
        x = torch.randn(dim, generator=g, dtype=dtype)
        vectors = [(torch.randn(dim, generator=g) * 10.0 ** torch.randint(-6, 7, (dim,), generator=g)).to(dtype)
                   for _ in range(16)]
        for v in vectors:
            v[::5] = -0.0
        for n in range(1, 17):
            got = descend_by_mean(x, 0.3, [Message({"g": full(v)}) for v in vectors[:n]], "g")
            expected = x - 0.3 * torch.stack(vectors[:n]).mean(0)
            assert got.numpy().tobytes() == expected.numpy().tobytes(), (dim, n)
        with pytest.raises(RuntimeError, match="equal size"):
            descend_by_mean(x, 0.3, [Message({"g": full(v)}) for v in (vectors[0], vectors[1][:-1])], "g")


def test_a_step_by_the_mean_of_long_dense_uplinks_takes_the_one_pass(monkeypatch):
    from common.algorithms.base import descend_by_mean, full
    from common.compressors import cpu_kernels
    from common.compressors.message import Message

    fused = []
    real = cpu_kernels.mean_descend
    monkeypatch.setattr(cpu_kernels, "mean_descend", lambda *args: fused.append(real(*args)) or fused[-1])
    x = torch.ones(cpu_kernels.MIN_COMPILED)
    descend_by_mean(x, 0.1, [Message({"g": full(x)})] * 3, "g")
    assert len(fused) == 1 and fused[0] is not None
    descend_by_mean(x, 0.1, [Message({"g": full(x.double())})] * 3, "g")  # another dtype than x: torch's ops
    assert len(fused) == 1


@pytest.mark.parametrize("rows", [5, 8, 14])
def test_a_step_by_the_mean_of_5_to_14_long_dense_uplinks_takes_the_one_pass_in_atens_order(rows, monkeypatch):
    """For 5 to 14 uplinks the server's step is one compiled pass too, told where ATen's last columns
    start, and never stacks the uplinks."""
    from common.algorithms import row_order
    from common.algorithms.base import descend_by_mean, full
    from common.compressors.message import Message

    if row_order.group(torch.float32) is None:
        pytest.skip("this torch build sums stacked rows in an order row_order does not know: the rules stack")
    dim = cpu_kernels.MIN_CHUNK + 45  # ends in a part-filled group of ATen's columns
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(dim, generator=g)
    vectors = [torch.randn(dim, generator=g) * 10.0 ** torch.randint(-6, 7, (dim,), generator=g) for _ in range(rows)]
    expected = x - 0.1 * torch.stack(vectors).mean(0)
    calls = []
    real = cpu_kernels.mean_descend
    monkeypatch.setattr(cpu_kernels, "mean_descend", lambda *args, **kw: calls.append(kw) or real(*args, **kw))
    monkeypatch.setattr(torch, "stack", lambda *args, **kw: pytest.fail("stacked the uplinks"))
    got = descend_by_mean(x, 0.1, [Message({"g": full(v)}) for v in vectors], "g")
    assert calls == [{"interleaved_from": dim - dim % row_order.group(torch.float32)}]
    assert got.numpy().tobytes() == expected.numpy().tobytes()


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_the_sum_of_5_to_17_rows_in_atens_order_is_torchs_for_any_thread_count(threads):
    """row_order.ordered_sum gives torch.stack(rows).sum(0)'s bits for 5..17 rows of float32 and
    float64, lengths that fill their last group of columns or not, zeros of both signs and magnitudes
    from 1e-6 to 1e6, whatever torch's thread count; outside those cases it declines."""
    from common.algorithms import row_order

    if row_order.group(torch.float32) is None or row_order.group(torch.float64) is None:
        pytest.skip("this torch build sums stacked rows in an order row_order does not know: the rules stack")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(threads)
        for dtype in (torch.float32, torch.float64):
            for dim in (row_order.MIN_ORDERED, row_order.MIN_ORDERED + 45, (1 << 18) + 77):
                pool = [(torch.randn(dim, generator=g, dtype=torch.float64)
                         * 10.0 ** torch.randint(-6, 7, (dim,), generator=g)).to(dtype) for _ in range(17)]
                for i, v in enumerate(pool):
                    v[::3] = -0.0
                    v[1::7] = 0.0 if i % 2 else -0.0
                for n in (5, 6, 8, 9, 13, 16, 17):
                    got = row_order.ordered_sum(pool[:n])
                    assert torch.equal(got.view(torch.uint8), torch.stack(pool[:n]).sum(0).view(torch.uint8)), (dtype, dim, n)
                assert row_order.ordered_sum(pool[:4]) is None and row_order.ordered_sum(pool * 2) is None
        short = [torch.ones(row_order.MIN_ORDERED - 1)] * 5
        assert row_order.ordered_sum(short) is None
        assert row_order.ordered_sum([torch.ones(row_order.MIN_ORDERED)] * 4 + [torch.ones(row_order.MIN_ORDERED + 1)]) is None
        assert row_order.ordered_sum([torch.ones(row_order.MIN_ORDERED, dtype=torch.float16)] * 5) is None
    finally:
        torch.set_num_threads(before)


def test_an_order_that_does_not_give_torchs_bits_is_not_used(monkeypatch):
    """row_order.group keeps a group of columns only where it reproduces torch's own sums: with only
    wrong candidates it finds none, and the mean of the uplinks stacks them as before."""
    from common.algorithms import row_order
    from common.algorithms.base import full, mean_of
    from common.compressors.message import Message

    right = row_order.group(torch.float32) or 0
    monkeypatch.setattr(row_order, "GROUP_BYTES", tuple(b for b in (16, 64, 256, 512) if b != 4 * right))
    row_order.group.cache_clear()
    try:
        assert row_order.group(torch.float32) is None
        g = torch.Generator().manual_seed(3)
        vectors = [torch.randn(row_order.MIN_ORDERED + 45, generator=g) * 10.0 ** torch.randint(-6, 7, (row_order.MIN_ORDERED + 45,), generator=g)
                   for _ in range(6)]
        assert row_order.ordered_sum(vectors) is None
        got = mean_of([Message({"g": full(v)}) for v in vectors], "g")
        assert torch.equal(got.view(torch.uint8), torch.stack(vectors).mean(0).view(torch.uint8))
    finally:
        row_order.group.cache_clear()


@pytest.mark.parametrize("algorithm, dim", [(a, "MIN_CHUNK") for a in ("gd", "marina-p", "m3", "ef21", "marina", "ef21-p", "ef-sgd", "mem-sgd",
                                                                        "ef21-sgd", "double-squeeze", "neolithic")]
                         + [(a, "MIN_COMPILED") for a in ("gd", "marina-p", "ef21-p")])
def test_the_compiled_step_leaves_every_trajectory_as_it_was(algorithm, dim, monkeypatch):
    """Runs long enough for the compiled step (and mean) end at the model torch's ops give, bit for
    bit: from ``MIN_COMPILED`` the mean and step of dense uplinks run compiled on one thread (GD,
    MARINA-P, EF21-P), from ``MIN_CHUNK`` the step alone too (M3, EF21, MARINA and the SGD methods), in pieces."""
    from common.compressors import cpu_kernels
    from runtime.engine import run_inproc

    config = RunConfig(algorithm=algorithm, workers=3, rounds=4, lr="0.01", eval_every=100,
                       problem=f"identity-quadratic:d={getattr(cpu_kernels, dim) + 3}")
    ran = []
    for name in ("descend", "mean_descend"):
        real = getattr(cpu_kernels, name)
        monkeypatch.setattr(cpu_kernels, name, lambda *args, real=real: ran.append(real(*args)) or ran[-1])
    compiled = run_inproc(config, None, progress=False).model_digest()
    assert any(out is not None for out in ran)  # the compiled pass did run
    monkeypatch.setattr(cpu_kernels, "descend", lambda *args: None)
    monkeypatch.setattr(cpu_kernels, "mean_descend", lambda *args: None)
    assert run_inproc(config, None, progress=False).model_digest() == compiled


@pytest.mark.parametrize("algorithm, options", [("gd", {}), ("cd-adam", {"uplink": "sign", "downlink": "sign"}),
                                                ("ef21", {"uplink": "topk:ratio=0.01", "downlink": "topk:ratio=0.01"}),
                                                ("dcgd", {"uplink": "randk:ratio=0.1"})])
def test_eight_workers_means_in_atens_order_leave_the_trajectory_as_stacking_does(algorithm, options, monkeypatch):
    """With 8 workers the server's means (the step, the shift by signs or sparse uplinks, mean_of)
    take ATen's order without the stack (``row_order``); the run ends at the model of the run that
    stacks every mean, bit for bit."""
    from common.algorithms import row_order
    from runtime.engine import run_inproc

    # 31 last columns, and a step large enough that a mean's last bit moves the model there
    config = RunConfig(algorithm=algorithm, workers=8, rounds=4, lr="0.5", eval_every=100,
                       problem=f"identity-quadratic:d={cpu_kernels.MIN_CHUNK + 31}", **options)
    ordered = []
    real = row_order.first_interleaved
    monkeypatch.setattr(row_order, "first_interleaved", lambda vectors: ordered.append(real(vectors)) or ordered[-1])
    fast = run_inproc(config, None, progress=False).model_digest()
    assert any(cut is not None for cut in ordered)  # the ordered paths ran
    monkeypatch.setattr(row_order, "first_interleaved", lambda vectors: None)
    assert run_inproc(config, None, progress=False).model_digest() == fast


# --- MARINA with an identity uplink is GD ----------------------------------------------------------

def test_marina_with_identity_uplink_is_gd_round_for_round():
    """MARINA (eq. 5) with Q = identity: g^{t+1} = g^t + (1/n) sum_i (grad f_i(x^{t+1}) - grad f_i(x^t))
    = grad f(x^{t+1}) whatever the coin says, so x^t is GD's x^t. p = 0.3: most rounds send differences.
    Equal up to the rounding of the telescoping sum (float64)."""
    common = dict(workers=5, rounds=60, dtype="float64", problem=QUAD, lr="0.01")
    gd = gd_iterates(**common)
    differences = 0
    for t, server, workers in run(RunConfig(algorithm="marina:p=0.3", uplink="identity", **common)):
        assert torch.allclose(server.rule.x, gd[t], rtol=1e-12, atol=1e-12), f"round {t}"
        assert all(torch.equal(w.rule.x, server.rule.x) for w in workers), f"round {t}"
        differences += not server.rule.sync  # round t + 1 sends differences
    assert differences > 20


# --- EF-SGD with an identity uplink is GD ----------------------------------------------------------

@pytest.mark.parametrize("average", ["none", "uniform"])
def test_ef_sgd_with_identity_uplink_is_gd_round_for_round(average):
    """Beznosikov et al. Alg. 1 with C = identity: g~_i = e_i + eta g_i, e_i stays 0, and
    x^{k+1} = x^k - (1/n) sum_i eta g_i^k is GD's step. The iterate x^k is compared (eq. 23); with
    average=uniform the server's model is the average x_bar^K of eq. 20, which must be GD's average."""
    eta = 0.01
    common = dict(workers=4, rounds=40, dtype="float64", problem=QUAD, lr=str(eta))
    gd = gd_iterates(**common)
    x0 = Engine(RunConfig(algorithm="gd", **common)).setup.x0.double()
    for t, server, workers in run(RunConfig(algorithm=f"ef-sgd:average={average}", uplink="identity", **common)):
        assert torch.allclose(server.rule.x, gd[t], rtol=1e-12, atol=1e-12), f"round {t}"
        assert all(torch.equal(w.rule.e, torch.zeros_like(w.rule.e)) for w in workers), f"round {t}"
        if average == "uniform":
            expect = torch.stack([x0] + gd[: t + 1]).mean(0)
            assert torch.allclose(server.rule.model, expect, rtol=1e-12, atol=1e-12), f"round {t}"
        else:
            assert server.rule.model is server.rule.x


# --- M3's momentum -------------------------------------------------------------------------------

@pytest.mark.parametrize("beta", [0.3, 0.75])
def test_m3_keeps_z_the_momentum_average_of_w_every_round(beta):
    """M3 (Alg. 2 line 3): z_i^{t+1} = beta w_i^{t+1} + (1 - beta) z_i^t on every worker, every round,
    sync or not, and the uplink is measured at z_i (not at w_i)."""
    config = RunConfig(algorithm=f"m3:beta={beta}", uplink="randk:k=8", downlink="permk", workers=4, rounds=40,
                       dtype="float64", problem=QUAD, lr="0.005")
    engine = Engine(config)
    try:
        z_prev = [engine.setup.x0.double().clone() for _ in engine.workers]   # z_i^0 = x^0
        apart = 0
        for t, _ in engine.rounds():
            for i, w in enumerate(engine.workers):
                expect = beta * w.rule.x + (1.0 - beta) * z_prev[i]
                assert torch.equal(w.rule.z, expect), f"round {t}, worker {i}"
                apart += not torch.equal(w.rule.z, w.rule.x)
                z_prev[i] = w.rule.z.clone()
    finally:
        engine.close()
    assert apart > 0
    assert all(w.rule.beta == beta for w in engine.workers) and engine.server.rule.beta == beta


# --- one options-and-registry mechanism -----------------------------------------------------------

def test_each_family_builds_by_spec_through_one_registry():
    from common.algorithms import ALGORITHMS, Algorithm
    from common.compressors import REGISTRY, build
    from common.compressors.topk import TopK
    from common.problems import PROBLEMS, Problem, build_problem
    from common.problems.quadratic import Quadratic

    assert all(type(r) is Registry for r in (REGISTRY, ALGORITHMS, PROBLEMS))
    c = REGISTRY.build("topk:k=3", 10, 2, 0, purpose="uplink")
    assert isinstance(c, TopK) and c.k == 3 and c.spec == build("topk:k=3", 10, 2, 0).spec
    a = ALGORITHMS.build("marina:p=0.3")
    assert isinstance(a, Algorithm) and a.name == "marina" and a.options == {"p": 0.3}
    assert ALGORITHMS.build("m3").options == {"p_p": None, "p_d": None, "beta": None}
    p = PROBLEMS.build("quadratic:d=7", 3, 1)
    assert isinstance(p, Quadratic) and isinstance(p, Problem) and p.dim == 7
    assert torch.equal(p.initial_point(), build_problem("quadratic:d=7", 3, 1).initial_point())
    for family in (REGISTRY, ALGORITHMS, PROBLEMS):
        for cls in family.values():
            assert all(type(q) is Param for q in cls.params), cls


@pytest.mark.parametrize("build, message", [
    (lambda: __import__("common.compressors", fromlist=["build"]).build("nosuch", 5), r"unknown compressor 'nosuch' \(known: .*topk"),
    (lambda: __import__("common.compressors", fromlist=["build"]).build("topk:kk=3", 5), r"topk: unknown option 'kk' \(options: k, ratio\)"),
    (lambda: __import__("common.algorithms", fromlist=["x"]).ALGORITHMS.build("nosuch"), r"unknown algorithm 'nosuch' \(known: .*marina"),
    (lambda: __import__("common.algorithms", fromlist=["x"]).ALGORITHMS.build("marina:y=1"), r"algorithm marina: unknown option 'y' \(options: p\)"),
    (lambda: __import__("common.algorithms", fromlist=["x"]).ALGORITHMS.build("gd:y=1"), r"algorithm gd: unknown option 'y' \(options: none\)"),
    (lambda: __import__("common.algorithms", fromlist=["x"]).ALGORITHMS.build("marina:p=2"), r"algorithm marina: option p=2.0 must be in \(0, 1\]"),
    (lambda: __import__("common.problems", fromlist=["x"]).build_problem("nosuch", 2), r"unknown problem 'nosuch' \(known: .*quadratic"),
    (lambda: __import__("common.problems", fromlist=["x"]).build_problem("quadratic:d=x", 2), r"problem quadratic: option d='x' must be an integer"),
])
def test_bad_specs_get_the_same_clear_errors_in_every_family(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_a_name_is_registered_once():
    from common.algorithms import ALGORITHMS, register
    from common.algorithms.gd import GD
    from common.compressors import REGISTRY
    from common.compressors import register as register_compressor
    from common.problems import PROBLEMS
    from common.problems import register as register_problem

    class Again(GD):
        name = "gd"

    with pytest.raises(ValueError, match="algorithm 'gd' registered twice"):
        register(Again)
    assert ALGORITHMS["gd"] is GD
    with pytest.raises(ValueError, match="compressor 'topk' registered twice"):
        register_compressor(type("TopKAgain", (REGISTRY["topk"],), {}))
    with pytest.raises(ValueError, match="problem 'quadratic' registered twice"):
        register_problem(type("QuadraticAgain", (PROBLEMS["quadratic"],), {}))

    fresh = Registry("widget")

    @fresh.register
    class Widget:
        name = "widget"
        params = (Param("size", int, 3),)

        def __init__(self, *, options):
            self.options = options

    with pytest.raises(ValueError, match="widget 'widget' registered twice"):
        fresh.register(Widget)
    with pytest.raises(ValueError, match="name ''"):
        fresh.register(type("Nameless", (), {"name": ""}))
    assert list(fresh) == ["widget"] and fresh.build("widget:size=4").options == {"size": 4}


def _imported_names(path: pathlib.Path) -> set[tuple[str, str | None]]:
    """(module, name) for each ``from module import name``; (module, None) for ``import module``."""
    pairs = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            pairs.update((a.name, None) for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            pairs.update((node.module, a.name) for a in node.names)
    return pairs


def _imports(path: pathlib.Path) -> set[str]:
    return {module for module, _ in _imported_names(path)}


def test_the_layers_import_downwards_only():
    """Algorithms name the oracle without importing problems; problems take Param from common.options
    and, of the compressors' package, only its compiled vector passes (``cpu_kernels``: a gradient
    computed in one pass and marked finite there, as the rules' steps are)."""
    for path in (ROOT / "common" / "algorithms").glob("*.py"):
        assert not any(m == "common.problems" or m.startswith("common.problems.") for m in _imports(path)), path
    for path in (ROOT / "common" / "problems").glob("*.py"):
        assert not any((m == "common.compressors" and name != "cpu_kernels") or
                       (m.startswith("common.compressors.") and m != "common.compressors.cpu_kernels")
                       for m, name in _imported_names(path)), path
    assert not any(m.startswith("common.") and m not in ("common.spec",) for m in _imports(ROOT / "common" / "options.py"))


@pytest.mark.parametrize("dim", [4001, (1 << 18) + 4001])
@pytest.mark.parametrize("spec", ["topk:ratio=0.05", "randk:ratio=0.1", "permk", "topk:ratio=0.05+natural", "handmade"])
def test_a_sparse_payload_shifts_a_vector_to_the_bits_of_adding_its_dense_form(spec, dim, monkeypatch):
    """The Markov shift h + c of a sparse c without c's dense form (``add_dense``): h + 0 off the
    support (-0 becomes +0, as adding the dense form's zeros does), h_i + c_i on it; in place too.
    Long CPU vectors take one compiled pass (``cpu_kernels.sparse_added``), except where the support
    is regenerated as a bitmap (Perm-K, Rand-K of at least d / 16 coordinates)."""
    from common.compressors import build, cpu_kernels
    from common.compressors.payloads import Dense, Sparse, add_dense
    from common.wire import decode, encode

    g = torch.Generator().manual_seed(9)
    h = torch.randn(dim, generator=g)
    h[::4] = -0.0
    x = torch.randn(dim, generator=g)
    x[::3] = -0.0
    if spec == "handmade":  # -0 + -0 on the support, -0 + +0, a value on the last index
        values = torch.tensor([-0.0, 0.0, -0.0, 2.5, -1.0])
        c = Sparse(dim, Dense(values, torch.float32), torch.tensor([0, 4, 8, 9, dim - 1]), None, torch.float32)
    else:
        c = decode(encode(build(spec, dim, n_workers=3).compress(x, worker=1, step=5)))
    expected = (h + c.to_dense()).view(torch.uint8)
    used = []
    real = cpu_kernels.sparse_added
    monkeypatch.setattr(cpu_kernels, "sparse_added", lambda *a: used.append(real(*a)) or used[-1])
    assert torch.equal(add_dense(h, c).view(torch.uint8), expected)
    inplace = h.clone()
    assert add_dense(inplace, c, inplace=True) is inplace and torch.equal(inplace.view(torch.uint8), expected)
    compiled = [u is not None for u in used]
    assert compiled == ([] if spec in ("permk", "randk:ratio=0.1") and dim > 4001 else [dim > 4001] * 2), compiled
    with pytest.raises(RuntimeError):
        add_dense(torch.zeros(dim + 1), c)  # another length is refused, not broadcast


def test_a_sparse_payload_whose_values_and_support_disagree_is_refused_as_before():
    """A payload with more support indices than values (a faulty compressor; the decoder refuses
    such frames) raises in add_dense as in to_dense, instead of spreading a value over the support."""
    from common.compressors.payloads import Dense, Sparse, add_dense

    bad = Sparse(10, Dense(torch.ones(1), torch.float32), torch.tensor([1, 4, 7]), None, torch.float32)
    with pytest.raises((RuntimeError, IndexError)):
        bad.to_dense()
    with pytest.raises((RuntimeError, IndexError)):
        add_dense(torch.zeros(10), bad)


# --- a fresh gradient is sent as it is ----------------------------------------------------------------

@pytest.mark.parametrize("algorithm, name", [("gd", "g"), ("amsgrad", "g"), ("marina-p", "g"), ("ef21-p", "g"),
                                             ("marina", "g"), ("ef21", "c"), ("onebit-adam", "g")])
def test_a_worker_sends_its_fresh_gradient_without_a_copy(algorithm, name):
    """The workers whose uplink is the gradient itself put the oracle's tensor in the message (the link
    then sends its memory as it is): no copy of d values a round. The oracle's gradient is a tensor of
    its own (``common.oracle``), which the run then leaves alone."""
    engine = Engine(RunConfig(algorithm=algorithm, workers=2, rounds=2, dtype="float64", problem=QUAD, lr="0.005"))
    try:
        rule = engine.workers[0].rule
        real, given = rule.oracle, []

        def recording(x, step):
            loss, g = real(x, step)
            given.append(g)
            return loss, g

        rule.oracle = recording
        sent = rule.uplink(0).payloads[name]  # (round 0: MARINA's and EF21's full gradient, 1-bit Adam's warm-up)
        assert len(given) == 1 and torch.equal(sent.values, given[0])
        assert sent.values.data_ptr() == given[0].data_ptr()
    finally:
        engine.close()


@pytest.mark.parametrize("algorithm, name, state", [
    ("gd", "x", "x"), ("dcgd", "x", "x"), ("amsgrad", "x", "x"), ("marina", "x", "x"), ("psgd", "x", "x"),
    ("ef-sgd", "x", "x"), ("ef21-sgd", "g", "g")])
def test_a_server_sends_its_new_vector_without_a_copy(algorithm, name, state):
    """The servers that broadcast a vector they replace every round (never update in place) put that
    vector itself in the downlink: no copy of d values on the server's critical path, and the
    encoder finds it marked finite by the pass that computed it where that pass was compiled."""
    engine = Engine(RunConfig(algorithm=algorithm, workers=2, rounds=2, dtype="float64", problem=QUAD, lr="0.005"))
    try:
        server = engine.server.rule
        downs = server.step(0, [w.rule.uplink(0) for w in engine.workers])
        sent = downs[0].payloads[name]
        assert all(d.payloads[name] is sent for d in downs)
        assert sent.values.data_ptr() == getattr(server, state).data_ptr()
        before = sent.values.clone()
        server.step(1, [w.rule.uplink(1) for w in engine.workers])
        assert torch.equal(sent.values, before)  # the next round replaces the vector, never writes into it
    finally:
        engine.close()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_sparse_shift_in_place_on_its_support_has_the_bits_of_h_plus_the_dense_form(dtype):
    """``shift(h, c, owned=True)`` with sparse c: where h holds no negative zero only the support
    changes (O(k)); the bits are those of h + c.to_dense() at every step: negative zeros in h at the
    start (a whole pass turns them into +0 off the support), -0 sent onto them (-0 + -0 stays -0 on
    the support, so the next shift makes a whole pass again), and a + (-a) on the support (+0); the
    state is h itself, updated in place."""
    from common.algorithms.memory import shift
    from common.compressors.payloads import Dense, Sparse

    gen = torch.Generator().manual_seed(3)
    n = cpu_kernels.MIN_COMPILED + 5
    h = torch.randn(n, generator=gen, dtype=dtype)
    h[::97] = -0.0
    reference = h.clone()
    support_only = []
    for step in range(12):
        support = torch.randperm(n, generator=gen)[: n // 50]
        if step == 0:
            support[:5] = torch.arange(0, 5 * 97, 97)  # onto h's negative zeros
        support = support.unique()
        values = torch.randn(support.numel(), generator=gen, dtype=dtype)
        if step == 0:
            values[:5] = -0.0  # -0 + -0: -0 on the support
        if step % 4 == 2:
            values[:9] = -h[support[:9]]  # a + (-a) = +0
        c = Sparse(n, Dense(values, dtype), support, None, dtype)
        reference = reference + c.to_dense()
        support_only.append(cpu_kernels.without_negative_zero.holds(h))
        before = h
        h = shift(h, c, owned=True)
        assert h is before  # in place
        assert torch.equal(h.view(torch.uint8), reference.view(torch.uint8)), step
    assert support_only[:2] == [False, False] and all(support_only[2:])  # whole passes until h held no -0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n_uplinks", [2, 3, 6, 9])
def test_a_shift_by_the_mean_of_sparse_uplinks_in_place_has_the_bits_of_h_plus_the_mean(dtype, n_uplinks):
    """``shift_by_mean(h, uplinks, owned=True)`` with Top-K-like uplinks (supports that overlap):
    once h is known to hold no negative zero, only the union of the supports is written, into h
    (O(n k)); the bits are those of h + the mean of the stacked dense forms at every step: negative
    zeros in h at the start, a mean that underflows to -0 onto them (-0 + -0), values that cancel
    (+0), uplinks whose supports do not meet, and for 6 and 9 uplinks supports that all hold the last
    columns, which ATen sums in another order."""
    from common.algorithms.memory import shift_by_mean
    from common.compressors.message import Message
    from common.compressors.payloads import Dense, Sparse

    gen = torch.Generator().manual_seed(4)
    n = cpu_kernels.MIN_CHUNK + 7
    tiny = torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps  # the smallest subnormal
    h = torch.randn(n, generator=gen, dtype=dtype)
    h[::89] = -0.0
    reference = h.clone()
    marked, same = [], []
    for step in range(10):
        uplinks = []
        for w in range(n_uplinks):
            support = torch.randperm(n, generator=gen)[: n // 40]
            if step in (0, 1) and w == 0:
                support[:6] = torch.arange(0, 6 * 89, 89)  # onto h's negative zeros
            if n_uplinks > 4:
                support = torch.cat([support, torch.arange(n - 7, n)])
            support = support.unique()
            values = torch.randn(support.numel(), generator=gen, dtype=dtype) * 10.0 ** (w % 5)
            if step in (0, 1) and w == 0:
                values[:6] = -tiny  # (t + 0) / n rounds to -0: -0 + -0 stays -0 where h held -0
            if step % 3 == 2:
                values[:11] = -reference[support[:11]] * n_uplinks  # cancellations to +0, where no other uplink adds
            uplinks.append(Message({"c": Sparse(n, Dense(values, dtype), support, None, dtype)}))
        reference = reference + torch.stack([u.payloads["c"].to_dense() for u in uplinks]).mean(0)
        marked.append(cpu_kernels.without_negative_zero.holds(h))
        before = h
        h = shift_by_mean(h, uplinks, "c", owned=True)
        same.append(h is before)
        assert torch.equal(h.view(torch.uint8), reference.view(torch.uint8)), step
    assert marked[:3] == [False] * 3 and all(marked[3:])  # -0 stayed on the supports after steps 0 and 1
    assert same == [False] * 3 + [True] * 7  # then into h itself


@pytest.mark.parametrize("algorithm", ["ef21", "ef21-sgd"])
def test_ef21_with_top_k_shifts_its_states_in_place_to_the_same_model(monkeypatch, algorithm):
    """EF21 with Top-K both ways (and EF21-SGD with Top-K up), its Markov states shifted in place on
    their supports (the server's g by the mean of the uplinks on their union), ends at the model of
    the run where every shift makes a whole pass (no state marked free of negative zeros)."""
    from common.compressors import cpu_kernels
    from runtime.engine import run_inproc

    down = {"downlink": "topk:ratio=0.01"} if algorithm == "ef21" else {}
    config = RunConfig(algorithm=algorithm, workers=3, rounds=8, lr="0.05", eval_every=100, uplink="topk:ratio=0.01",
                       problem=f"identity-quadratic:d={cpu_kernels.MIN_CHUNK + 3}", **down)
    held = []
    real = cpu_kernels.without_negative_zero.holds
    monkeypatch.setattr(cpu_kernels.without_negative_zero, "holds", lambda t: held.append(real(t)) or held[-1])
    in_place = run_inproc(config, None, progress=False).model_digest()
    assert any(held)  # the support-only shift did run
    monkeypatch.setattr(cpu_kernels.without_negative_zero, "holds", lambda t: False)
    assert run_inproc(config, None, progress=False).model_digest() == in_place


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_blend_has_the_bits_of_the_torch_expression_and_says_when_it_is_finite(dtype):
    """``cpu_kernels.blend(y, a, x, b)``: the bytes of ``a * y + b * x`` (each product rounded, then
    the sum) for running-average weights, including weights that do not round exactly to the
    vectors' precision, signed zeros, and products that overflow; marked finite exactly where every
    value is."""
    gen = torch.Generator().manual_seed(8)
    d = cpu_kernels.MIN_CHUNK * 2 + 11
    y = torch.randn(d, generator=gen, dtype=dtype) * 1e3
    x = torch.randn(d, generator=gen, dtype=dtype)
    y[::101], x[::103] = -0.0, -0.0
    for k in (1, 2, 3, 7, 1000):
        lam = 1.0 / (k + 1)
        for a, b in ((1.0 - lam, lam), (0.1, 0.7), (1.0 - 1e-9, 1e-9)):
            want = a * y + b * x
            got = cpu_kernels.blend(y, a, x, b)
            assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), (k, a, b)
            assert cpu_kernels.known_finite(got)
    huge = y.clone()
    huge[5] = torch.finfo(dtype).max
    got = cpu_kernels.blend(huge, 3.0, x, 0.5)
    assert torch.isinf(got[5]) and not cpu_kernels.known_finite(got)
    assert torch.equal(got.view(torch.uint8), (3.0 * huge + 0.5 * x).view(torch.uint8))
    assert cpu_kernels.blend(y[:100], 0.5, x[:100], 0.5) is None  # short: torch's ops


def test_error_feedback_on_an_owned_vector_takes_a_top_k_message_off_in_place():
    """``error_feedback(..., owned=True)`` with Top-K: e is v itself, with C(v) taken off on the
    support alone, and has the bytes of v - C(v)'s dense form (-0 off the support stays -0, since
    v_i - 0 = v_i); a compressor whose message is not sparse with sent indices, and a vector too short
    for the compiled loop, take the difference as before."""
    from common.algorithms.memory import error_feedback
    from common.compressors import build

    gen = torch.Generator().manual_seed(9)
    d = cpu_kernels.MIN_COMPILED + 77
    for spec in ("topk:ratio=0.01", "topk:ratio=0.3", "sign", "randk:ratio=0.1"):
        c = build(spec, d, 1, seed=0)
        v = torch.randn(d, generator=gen)
        v[::13] = -0.0
        want = v - c.compress(v.clone(), worker=0, step=4).to_dense()
        payload, e = error_feedback(c, v, 0, 4, owned=True)
        assert torch.equal(e.view(torch.uint8), want.view(torch.uint8)), spec
        assert (e is v) == spec.startswith("topk"), spec
    c = build("topk:ratio=0.1", 100, 1, seed=0)
    v = torch.randn(100, generator=gen)
    payload, e = error_feedback(c, v, 0, 1, owned=True)
    assert e is not v and torch.equal(e, v - payload.to_dense())


def test_ef_sgd_with_top_k_and_its_compiled_passes_ends_at_the_model_of_torch_s_ops(monkeypatch):
    """EF-SGD with Top-K at a length where its compiled passes run (e + eta g in one pass, the error
    taken off on the support in place, the eq. 20 average in one pass, after the downlinks are sent)
    ends at the model of the run where each of them is torch's ops, for the uniform and the
    exponential average and for none."""
    from runtime.engine import run_inproc

    for option in ("", ":average=exp,mu=0.5", ":average=none"):
        config = RunConfig(algorithm="ef-sgd" + option, workers=2, rounds=6, lr="0.05", eval_every=100,
                           uplink="topk:ratio=0.02", problem=f"identity-quadratic:d={cpu_kernels.MIN_CHUNK + 3}")
        calls = {"blend": 0, "add_on_support": 0, "descend": 0}
        real = {name: getattr(cpu_kernels, name) for name in calls}

        def counted(name):
            def call(*args):
                calls[name] += 1
                return real[name](*args)
            return call

        with monkeypatch.context() as patch:
            for name in calls:
                patch.setattr(cpu_kernels, name, counted(name))
            compiled = run_inproc(config, None, progress=False).model_digest()
        assert calls["add_on_support"] >= 12 and calls["descend"] >= 12, (option, calls)
        assert (calls["blend"] >= 6) == (option != ":average=none"), (option, calls)
        with monkeypatch.context() as patch:
            for name in calls:
                patch.setattr(cpu_kernels, name, lambda *args: None)
            assert run_inproc(config, None, progress=False).model_digest() == compiled, option


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n_uplinks", [2, 3, 4])
def test_a_step_by_the_mean_of_top_k_uplinks_in_one_pass_has_the_bits_of_the_dense_mean(dtype, n_uplinks):
    """``descend_by_mean`` with Top-K-like uplinks (indices sent; supports that overlap, and that
    hold the last index): one compiled pass (``cpu_kernels.sparse_mean_descend``) with the bytes of
    x - lr * mean_of(...) (torch's ops), for -0 in x and in the values, values that cancel, step sizes
    that are not exact in the vectors' precision and a step of 1; a new vector, marked finite
    exactly where it is; 5 uplinks take the other path."""
    from common.algorithms.base import descend, descend_by_mean, mean_of
    from common.compressors.message import Message
    from common.compressors.payloads import Dense, Sparse

    gen = torch.Generator().manual_seed(12)
    n = cpu_kernels.MIN_CHUNK * 2 + 9
    calls = []
    real = cpu_kernels.sparse_mean_descend
    for step, lr in enumerate((0.1, 1.0, 0.07, 3e-5)):
        x = torch.randn(n, generator=gen, dtype=dtype)
        x[::37] = -0.0
        uplinks = []
        for w in range(n_uplinks):
            support = torch.cat([torch.randperm(n, generator=gen)[: n // 60], torch.arange(0, 40 * 37, 37), torch.tensor([n - 1])]).unique()
            values = torch.randn(support.numel(), generator=gen, dtype=dtype) * 10.0 ** w
            values[:7] = -0.0
            if step == 2:
                values[10:20] = -x[support[10:20]] / lr * n_uplinks  # steps that cancel to 0
            uplinks.append(Message({"g": Sparse(n, Dense(values, dtype), support, None, dtype)}))
        want = descend(x, lr, mean_of(uplinks, "g"))
        calls.clear()
        cpu_kernels.sparse_mean_descend = lambda *a: calls.append(real(*a)) or calls[-1]
        try:
            got = descend_by_mean(x, lr, uplinks, "g")
        finally:
            cpu_kernels.sparse_mean_descend = real
        assert calls and calls[0] is not None and got is not x
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), (step, lr)
        assert cpu_kernels.known_finite(got)
    big = torch.finfo(dtype).max
    uplinks[0].payloads["g"].values.values[0] = -big  # x - lr * mean overflows where the first index is
    got = descend_by_mean(x, 1e30 if dtype == torch.float64 else 1e3, uplinks, "g")
    assert not torch.isfinite(got).all() and not cpu_kernels.known_finite(got)
    five = (uplinks * 5)[:5]  # 5 rows: not a running sum's count (ATen orders them otherwise)
    assert real(x, 0.1, [u.payloads["g"].indices for u in five], [u.payloads["g"].values.values for u in five]) is None


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")  # a step of 1e39 in float32
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_step_by_a_top_k_payload_steps_the_support_of_a_copy_with_the_bits_of_the_dense_step(dtype):
    """``descend_by(x, lr, payload)`` for a Top-K payload (indices sent) on a long CPU x: a new vector,
    x itself untouched, with the bytes of ``descend(x, lr, dense(payload))`` for steps 0, 1 and
    inexact ones, -0 in x and in the values; a negative step (x_i - lr * 0 would turn -0 into +0), a
    payload that is not sparse with indices, and a short x take the dense step."""
    from common.algorithms.base import dense, descend, descend_by
    from common.compressors import build
    from common.compressors.payloads import Dense, Sparse

    gen = torch.Generator().manual_seed(13)
    d = cpu_kernels.MIN_CHUNK + 21
    x = torch.randn(d, generator=gen, dtype=dtype)
    x[::29] = -0.0
    before = x.clone()
    support = torch.cat([torch.arange(0, 29 * 50, 29), torch.randperm(d, generator=gen)[: d // 50]]).unique()
    values = torch.randn(support.numel(), generator=gen, dtype=dtype)
    values[:9] = -0.0
    topk = Sparse(d, Dense(values, dtype), support, None, dtype)
    calls = []
    real = cpu_kernels.add_on_support
    cpu_kernels.add_on_support = lambda *a: calls.append(real(*a)) or calls[-1]
    try:
        huge = 1e39 if dtype == torch.float32 else 1e300  # float32: rounds to inf
        for lr, fast in ((0.1, True), (1.0, True), (0.0, True), (0.0731, True), (-0.5, False), (-0.0, False),
                         (huge, dtype == torch.float64)):
            calls.clear()
            got = descend_by(x, lr, topk)
            want = descend(x, lr, dense(topk))
            assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), lr
            assert got is not x and torch.equal(x.view(torch.uint8), before.view(torch.uint8))
            assert bool(calls) == fast, lr
        signs = build("sign", d, 1, seed=0).compress(x, worker=0, step=0)
        short = Sparse(100, Dense(values[:5], dtype), torch.tensor([1, 5, 9, 50, 99]), None, dtype)
        for vector, payload in ((x, signs), (x[:100].clone(), short)):
            calls.clear()
            got = descend_by(vector, 0.1, payload)
            assert torch.equal(got.view(torch.uint8), descend(vector, 0.1, dense(payload)).view(torch.uint8))
            assert not any(c is not None for c in calls)
    finally:
        cpu_kernels.add_on_support = real


def test_ef_sgd_without_an_average_does_not_send_a_model_that_is_no_longer_finite(monkeypatch):
    """EF-SGD leaves its average to ``settle`` (after the downlinks are sent); with ``average=none``
    its model is its downlink x, which is then not yet checked when it is encoded: finite uplinks
    whose mean overflows stop the run at the server, which says why, and no worker receives an inf."""
    import torch
    from common.algorithms import ef_sgd
    from common.compressors.message import Message
    from common.compressors.payloads import Dense
    from runtime.engine import run_inproc
    from runtime.server_core import RunFailed

    received, uplink = [], ef_sgd.EFSGDWorker.uplink

    def overflowing(self, t):
        if t == 2:
            g = torch.zeros(self.x.numel())
            g[0] = 3e38  # each finite; their mean's step is not
            return Message({"g": Dense(g, torch.float32)})
        return uplink(self, t)

    def downlink(self, t, msg):
        received.append(bool(torch.isfinite(msg.payloads["x"].to_dense()).all()))
        self.x = msg.payloads["x"].to_dense()

    monkeypatch.setattr(ef_sgd.EFSGDWorker, "uplink", overflowing)
    monkeypatch.setattr(ef_sgd.EFSGDWorker, "downlink", downlink)
    for option in (":average=none", ""):
        received.clear()
        config = RunConfig(algorithm="ef-sgd" + option, workers=2, rounds=6, lr="0.05", eval_every=100,
                           uplink="identity", problem=f"identity-quadratic:d={cpu_kernels.MIN_CHUNK + 1}")
        with pytest.raises(RunFailed, match="round 2: .*not (all )?finite.*smaller --lr"):
            run_inproc(config, None, progress=False)
        assert received and all(received), option
