"""Structure, determinism and argument checking of the compressors (constants: test_compressor_constants)."""
from __future__ import annotations


import pytest
import torch

from common.compressors import REGISTRY, build, cpu_kernels
from common.compressors.indices import permk_blocks

ALL_SPECS = [cls.example for cls in REGISTRY.values()] + [
    "randk:k=7,scaled=false", "exprounding:base=3,biased=true", "sign:scale=l2", "ternary:p=2",
    "topk:ratio=0.05+natdither:s=2,p=inf", "permk+natural", "randk:k=9+natural", "samerandk:k=9+natural",
    "natural+scale:lambda=0.888", "topk:k=20+randk:k=5+qsgd:s=4", "adaptive+sign",
]


def vec(d, seed=0, dtype=torch.float32, device="cpu"):
    return torch.randn(d, generator=torch.Generator().manual_seed(seed), dtype=dtype).to(device)


@pytest.mark.parametrize("spec", ALL_SPECS)
def test_same_key_same_output_and_fresh_steps(spec):
    d, n = 257, 5
    c = build(spec, d, n, seed=11)
    x = vec(d)
    y1 = c.decompress(c.compress(x, worker=2, step=9))
    y2 = build(spec, d, n, seed=11).decompress(build(spec, d, n, seed=11).compress(x, worker=2, step=9))
    assert torch.equal(y1, y2)
    assert y1.dtype == x.dtype and y1.device == x.device and y1.shape == x.shape
    random = not (spec.startswith(("identity", "fp16", "bf16", "topk:ratio=0.01", "sign", "scale"))) or "+" in spec
    if random and spec not in ("exprounding:base=3,biased=true",):
        outputs = {tuple(c.decompress(c.compress(x, worker=2, step=t)).tolist()) for t in range(4)}
        assert len(outputs) > 1, "a fresh step must draw fresh randomness"


@pytest.mark.parametrize("d", [100, 70_000])  # 70 000: the CPU paths' blocks of 2^15 and their last partial one
def test_input_is_not_modified_and_float64_round_trips(d):
    x = vec(d, dtype=torch.float64)
    before = x.clone()
    for spec in ALL_SPECS:
        c = build(spec, d, 4)
        y = c.decompress(c.compress(x, worker=1, step=3))
        assert y.dtype == torch.float64
        assert torch.equal(x, before), spec


def test_workers_draw_independently_except_samerandk():
    d, n = 100, 4
    x = vec(d)
    indep = build("randk:k=10", d, n, seed=0)
    same = build("samerandk:k=10", d, n, seed=0)
    supp = lambda c, w: tuple(torch.nonzero(c.decompress(c.compress(x, worker=w, step=5))).flatten().tolist())
    assert len({supp(indep, w) for w in range(n)}) > 1
    assert len({supp(same, w) for w in range(n)}) == 1
    chain = build("samerandk:k=10+natural", d, n, seed=0)
    assert len({tuple(chain.decompress(chain.compress(x, worker=w, step=5)).tolist()) for w in range(n)}) == 1


def test_seed_and_purpose_separate_streams():
    x = vec(1000)
    a = build("randk:k=10", 1000, 2, seed=1).compress(x, 0, 0)
    b = build("randk:k=10", 1000, 2, seed=2).compress(x, 0, 0)
    c = build("randk:k=10", 1000, 2, seed=1, purpose="downlink").compress(x, 0, 0)
    assert len({tuple(p.rule.indices()) for p in (a, b, c)}) == 3


@pytest.mark.parametrize("d,n", [(12, 4), (10, 4), (1000, 7), (7, 7), (3, 7), (3, 6), (1, 5), (5, 1)])
def test_permk_partition_and_exact_mean(d, n):
    c = build("permk", d, n, seed=5)
    x = vec(d, dtype=torch.float64)
    for step in range(5):
        payloads = [c.compress(x, worker=i, step=step) for i in range(n)]
        supports = [set(p.rule.indices().tolist()) for p in payloads]
        sizes = sorted(len(s) for s in supports)
        if d >= n:
            assert sizes == sorted(permk_blocks(d, n))
            assert set().union(*supports) == set(range(d))
            assert sum(sizes) == d  # disjoint
        else:
            q, r = divmod(n, d)
            assert sizes == [0] * r + [1] * (q * d)
            for j in range(d):
                assert sum(j in s for s in supports) == q
        mean = sum(c.decompress(p) for p in payloads) / n
        assert torch.allclose(mean, x, rtol=1e-12, atol=1e-12)
        msgs = {tuple(c.decompress(p).tolist()) for p in payloads}
        assert len(msgs) == (n if d >= n else d + (1 if n % d else 0))


def test_topk_breaks_ties_towards_lower_indices():
    x = torch.tensor([1.0, -3.0, 3.0, 2.0, -3.0, 0.5])
    c = build("topk:k=2", 6)
    p = c.compress(x)
    assert p.indices.tolist() == [1, 2]
    assert c.decompress(p).tolist() == [0.0, -3.0, 3.0, 0.0, 0.0, 0.0]
    assert build("topk:ratio=0.5", 6).compress(x).indices.tolist() == [1, 2, 4]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("ratio", [0.01, 0.1, 0.25])
def test_topk_of_a_long_vector_with_many_ties_is_the_lowest_index_rule(ratio, dtype):
    """Through the candidate pass (a vector of 2^17 + 3, k up to a quarter of it) and the selection of
    the k-th largest: the indices of a stable sort by decreasing magnitude, cut at k and sorted. The
    third vector is large exactly where the strided sample looks (1 in 16 here), so its level lets
    fewer than k candidates through, and the whole vector is searched instead."""
    gen = torch.Generator().manual_seed(11)
    x = torch.randn((1 << 17) + 3, generator=gen)
    sampled_large = x.clone()
    sampled_large[::16] *= 100
    vectors = [x, (x * 4).round(), sampled_large]  # distinct where the dtype allows; a few dozen; large where sampled
    for share in (0.001, 0.005, 0.03, 0.2):  # mostly zeros (the sample's level is 0): fewer or more nonzeros than k
        sparse = torch.where(torch.rand(x.numel(), generator=gen) < share, x, torch.zeros(()))
        sparse[torch.rand(x.numel(), generator=gen) < 0.3] *= -0.0  # zeros of either sign, kept as they are
        vectors.append(sparse)
    for values in (v.to(dtype) for v in vectors):
        c = build(f"topk:ratio={ratio}", values.numel())
        order = torch.sort(values.abs().double(), descending=True, stable=True).indices
        want = torch.sort(order[: c.k]).values
        got = c.compress(values)
        assert torch.equal(got.indices, want)
        assert torch.equal(got.values.to_dense().view(torch.uint8), values[want].view(torch.uint8))  # (the bits: -0.0 too)


def test_natural_handles_zero_subnormals_and_the_top_binade():
    c = build("natural", 5)
    tiny = torch.finfo(torch.float32).smallest_normal * torch.finfo(torch.float32).eps
    x = torch.tensor([0.0, -tiny, tiny * 3, 3e38, -1.0])
    for step in range(20):
        y = c.decompress(c.compress(x, step=step))
        assert torch.isfinite(y).all()
        assert y[0] == 0 and y[1] == -tiny and y[4] == -1.0
        assert y[2] in (2 * tiny, 4 * tiny)
        assert y[3] == 2.0**127


def test_fp16_saturates_instead_of_overflowing():
    c = build("fp16", 3)
    y = c.decompress(c.compress(torch.tensor([1e6, -1e6, 1.0])))
    assert torch.isfinite(y).all() and y[0] == 65504.0 and y[2] == 1.0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_casts_are_clamped_casts_bit_for_bit(dtype):
    """The CPU casts once and clamps only where a value left the format's range: the same bits as
    clamping every value first, for values inside the range, at its edge (rounding to the largest
    finite value or beyond it), far beyond it, subnormal in the format, and zeros of both signs."""
    name = "fp16" if dtype == torch.float16 else "bf16"
    top = float(torch.finfo(dtype).max)
    edge = [top, -top, top * 1.0001, -top * 1.0001, 3e38, -3.4e38, 65519.0, 65520.0, 1e-7, -6e-8, 0.0, -0.0]
    x = torch.randn(1 << 16, generator=torch.Generator().manual_seed(1)) * 100
    for values in ([], edge):
        y = x.clone()
        y[: len(values)] = torch.tensor(values)
        got = build(name, y.numel()).compress(y).values
        want = y.clamp(-top, top).to(dtype)
        assert torch.equal(got.view(torch.int16), want.view(torch.int16)), values
        assert cpu_kernels.known_finite(got)  # (checked as the cast; the encoder does not read it again)


def test_top_k_values_are_marked_finite_once_x_is_checked():
    """Top-K's values are x's at the kept indices, so once x is found finite (by the candidate pass
    or the input check) they are marked finite for the encoder, also for a Markov message's
    difference; a NaN is still refused."""
    dim = 300_000
    c = build("topk:ratio=0.01", dim)
    x, h = torch.randn(dim), torch.randn(dim)
    assert cpu_kernels.known_finite(c.compress(x).values.values)
    assert cpu_kernels.known_finite(c.compress_difference(x, h).values.values)
    x[dim // 2] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        c.compress(x)


@pytest.mark.parametrize("name", ["fp16", "bf16", "identity"])
def test_a_cast_or_a_copy_refuses_what_is_not_finite_and_marks_what_is(name):
    """The casts check their cast, not x first, and the identity its input: either way a NaN or inf
    anywhere in x is refused with the input check's message (also beyond the 16-bit range, where a
    cast clamps); what they return is marked finite, so that the encoder reads it no more."""
    c = build(name, 1000)
    for bad in (float("nan"), float("inf"), -float("inf")):
        for spot in (0, 999):
            x = torch.full((1000,), 1e6 if name == "fp16" else 1.0)  # (fp16: every value beyond its range)
            x[spot] = bad
            with pytest.raises(ValueError, match="non-finite"):
                c.compress(x)
    payload = c.compress(torch.randn(1000))
    assert cpu_kernels.known_finite(payload.values)


def test_zero_vector_is_compressed_to_zero():
    for spec in ALL_SPECS:
        c = build(spec, 50, 3)
        y = c.decompress(c.compress(torch.zeros(50), worker=1, step=2))
        if spec.startswith("sign"):
            assert (y == 0).all()  # the scale is 0
        else:
            assert (y == 0).all(), spec


def test_chain_constants_follow_the_composition_rules():
    d, n = 1000, 10
    topnd = build("topk:ratio=0.1+natdither:s=2,p=inf", d, n)
    zeta = topnd.tail.constants["omega"] + 1
    assert topnd.constants["b1"] == pytest.approx([0.1, zeta])  # Lemma 16
    assert topnd.constants["b2"] == pytest.approx([0.1, zeta])
    pn = build("permk+natural", d, n).constants
    assert pn["omega"] == pytest.approx(n * 9 / 8 - 1) and pn["theta"] == pytest.approx(1 / 8)
    rn = build("randk:k=100+natural", d, n).constants
    assert rn["omega"] == pytest.approx(10 * 9 / 8 - 1) and rn["theta"] == pytest.approx(rn["omega"] / n)
    scaled = build("randk:k=100+scale:lambda=0.1", d, n).constants  # (1+omega)^-1 C: NEOLITHIC's scaling
    assert scaled["alpha"] == pytest.approx(0.1, rel=1e-6) and not scaled["unbiased"]


@pytest.mark.parametrize(
    "spec,kwargs,message",
    [
        ("topk:k=11", {}, "larger than the dimension"),
        ("topk:k=0", {}, "k=0"),
        ("randk:ratio=1.5", {}, "ratio"),
        ("topk", {}, "needs k="),
        ("topk:k=2,ratio=0.1", {}, "not both"),
        ("nosuch", {}, "unknown compressor 'nosuch'"),
        ("topk:kk=3", {}, "unknown option 'kk'"),
        ("topk:k", {}, "expected key=value"),
        ("topk:k=abc", {}, "must be an integer"),
        ("randk:k=2,scaled=maybe", {}, "true or false"),
        ("exprounding:base=1", {}, "base"),
        ("sign:scale=l3", {}, "l1 or l2"),
        ("natural+topk:k=2", {}, "cannot be followed"),
        ("scale:lambda=2+topk:k=2", {}, "may only come last"),
        ("scale", {}, "needs lambda"),
        ("topk:k=2++natural", {}, "empty stage"),
        ("", {}, "empty"),
        ("identity", {"dim": 0}, "dimension"),
        ("identity", {"n_workers": 0}, "n_workers"),
    ],
)
def test_bad_specs_raise_clear_value_errors(spec, kwargs, message):
    args = {"dim": 10, "n_workers": 2, **kwargs}
    with pytest.raises(ValueError, match=message):
        build(spec, args.pop("dim"), **args)


@pytest.mark.parametrize(
    "x,message",
    [
        (torch.randn(2, 5), "1-D"),
        (torch.arange(10), "float"),
        (torch.randn(9), "built for d=10"),
        (torch.tensor([1.0] * 9 + [float("nan")]), "non-finite"),
        (torch.tensor([1.0] * 9 + [float("inf")]), "non-finite"),
        ([1.0] * 10, "torch.Tensor"),
    ],
)
def test_bad_inputs_raise_clear_value_errors(x, message):
    for spec in ("topk:k=2", "natural", "permk", "sign", "sign:scale=l2", "qsgd:s=16", "ternary", "natdither:s=4,p=inf"):
        with pytest.raises(ValueError, match=message):
            build(spec, 10, 2).compress(x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_compressors_tell_a_non_finite_input_from_their_own_pass_on_long_and_short_vectors(dtype):
    """Sign and the dithering quantizers skip the separate finiteness pass and read it off the norm
    they compute anyway, Top-K off its candidate pass, Perm-K and a long Rand-K off their gathers
    (also at the head of a chain), exponential rounding off its quantizer's pass (every kernel: powers of two, other bases,
    float64): a NaN or inf still gets the input check's error, and a finite float64 vector whose
    norm overflows gets none."""
    for d in (10, (1 << 20) + 3):
        for spec in ("sign", "sign:scale=l2", "qsgd:s=16", "ternary", "natdither:s=4,p=inf", "expdither:base=3,s=4,p=3",
                     "topk:ratio=0.01", "permk", "permk+natural", "topk:ratio=0.01+natural", "natural",
                     "exprounding:base=3", "exprounding:base=2,biased=true", "randk:ratio=0.25", "randk:ratio=0.01",
                     "randk:ratio=0.5,scaled=false+natural"):
            c = build(spec, d, 2)
            for bad in (float("nan"), float("inf"), -float("inf")):
                x = torch.ones(d, dtype=dtype)
                x[d // 2] = bad
                with pytest.raises(ValueError, match="1 non-finite value"):
                    c.compress(x)
    huge = torch.full((10,), torch.finfo(torch.float64).max, dtype=torch.float64)
    assert build("sign", 10, 2).compress(huge).scale.isinf()  # as before: the scale overflows to inf
    for spec in ("qsgd:s=16", "ternary:p=2"):  # as before: the norm overflows and every code is 0
        assert not build(spec, 10, 2).compress(huge).codes.any()


@pytest.mark.parametrize("tail", ["sign", "qsgd", "natdither"])
def test_a_chain_whose_scaled_values_overflow_before_the_tail_is_refused_at_compress(tail):
    """Perm-K scales its values by n before the tail sees them; in float16 that can overflow. The
    tail's input is then not finite and it says so (this reached the wire as a non-finite scale or
    norm before, a WireError at encode)."""
    x = torch.full((8,), 20000.0, dtype=torch.float16)
    with pytest.raises(ValueError, match=f"{tail}: input has .* non-finite"):
        build(f"permk+{tail}", 8, 4, 0).compress(x)


def test_bad_worker_and_step():
    c = build("permk", 10, 2)
    with pytest.raises(ValueError, match="worker"):
        c.compress(torch.randn(10), worker=2)
    with pytest.raises(ValueError, match="step"):
        c.compress(torch.randn(10), step=-1)


# ---- CUDA ----------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("spec", ALL_SPECS)
def test_cuda_output_stays_on_the_gpu_and_is_repeatable(spec):
    d, n = 4099, 4
    c = build(spec, d, n, seed=3)
    x = vec(d, device="cuda")
    p = c.compress(x, worker=1, step=2)
    y = c.decompress(p)
    assert y.is_cuda and y.dtype == x.dtype
    assert torch.equal(y, c.decompress(c.compress(x, worker=1, step=2)))


@pytest.mark.cuda
def test_cuda_and_cpu_regenerate_the_same_supports():
    d, n = 1000, 7
    x = vec(d)
    for spec in ("randk:k=50", "samerandk:k=50", "permk"):
        c = build(spec, d, n, seed=4)
        cpu = c.compress(x, worker=3, step=8)
        gpu = c.compress(x.cuda(), worker=3, step=8)
        assert torch.equal(c.decompress(cpu), c.decompress(gpu).cpu())


@pytest.mark.cuda
@pytest.mark.parametrize("spec,d,n", [("natural", 8, 3), ("topk:k=3", 10, 3), ("permk", 10, 4), ("sign", 9, 3), ("natdither:s=2,p=inf", 20, 3)])
def test_cuda_constants_hold(spec, d, n):
    from tests.montecarlo import draw, upper_ok

    c = build(spec, d, n, seed=1)
    x = vec(d, dtype=torch.float64, device="cuda")
    m = draw(c, x, 1000)
    m.x = m.x.cpu()
    m.samples = m.samples.cpu()
    sq = float(m.x @ m.x)
    cst = c.constants
    if cst["omega"] is not None:
        assert upper_ok(m.err(), cst["omega"] * sq, sq)[0]
    if cst["alpha"] is not None:
        assert upper_ok(m.err(), (1 - cst["alpha"]) * sq, sq)[0]


def test_all_finite_is_exact_for_large_vectors_whose_sum_overflows():
    """Large vectors are checked by their sum first; a sum that overflows must not count as a NaN."""
    from common.compressors.base import all_finite

    x = torch.randn(1 << 17, generator=torch.Generator().manual_seed(0))
    assert all_finite(x)
    x[:4] = 3e38  # finite values whose float32 sum is inf
    assert all_finite(x)
    for bad in (float("nan"), float("inf"), float("-inf")):
        y = x.clone()
        y[77] = bad
        assert not all_finite(y)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_all_finite_of_16_bit_floats_reads_the_exponent_field(dtype):
    """The largest finite values (either sign), subnormals and zeros pass; an inf of either sign and
    a NaN of either sign, anywhere, do not."""
    from common.compressors.base import all_finite

    x = torch.randn(1 << 17, generator=torch.Generator().manual_seed(0)).to(dtype)
    top = torch.finfo(dtype).max
    x[:6] = torch.tensor([top, -top, torch.finfo(dtype).smallest_normal / 4, -0.0, 0.0, -1.0]).to(dtype)
    assert all_finite(x) and all_finite(x[:6])
    for bad in (float("nan"), -float("nan"), float("inf"), float("-inf")):
        for where in (0, 12_345, x.numel() - 1):
            y = x.clone()
            y[where] = bad
            assert not all_finite(y), (bad, where)
