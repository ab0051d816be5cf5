"""Neural-network models and the problem that wraps them: forward/backward, the flat view, the oracle,
the server's evaluation, the user's own model, and a short run that learns."""
from __future__ import annotations

import sys
import types

import pytest
import torch
import torch.nn.functional as F

from common.config import RunConfig
from common.problems import PROBLEMS, build_problem
from common.problems import models
from common.problems.nn import flat_views
from runtime.engine import run_inproc


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # the CI box has 2 cores shared by several jobs
    yield
    torch.set_num_threads(old)


IMAGE_MODELS = {
    "cnn": lambda c, k, s: models.SmallCNN(c, k, 8, s),
    "resnet18": lambda c, k, s: models.resnet18(c, k),
    "resnet20": lambda c, k, s: models.resnet20(c, k),
    "vgg11": lambda c, k, s: models.VGG("vgg11", c, k, s),
    "vgg16": lambda c, k, s: models.VGG("vgg16", c, k, s),
}


@pytest.mark.parametrize("name", sorted(IMAGE_MODELS))
@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 32, 32)])
def test_image_models_forward_and_backward(name, shape):
    if shape[1] == 32 and name in ("resnet18", "vgg16"):
        shape = (3, 16, 16)  # the same code path, a quarter of the work
    torch.manual_seed(0)
    model = IMAGE_MODELS[name](shape[0], 10, shape[1])
    x = torch.randn(2, *shape)
    out = model(x)
    assert out.shape == (2, 10)
    F.cross_entropy(out, torch.tensor([1, 7])).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_parameter_counts_match_the_papers_models():
    assert models.count_parameters(models.resnet20(3, 10)) == 269_722  # He et al.: 0.27M
    assert 11_100_000 < models.count_parameters(models.resnet18(3, 10)) < 11_200_000  # 11.17M
    assert models.count_parameters(models.LinearAutoencoder(784, 16)) == 25_088  # F.2: d = 25088


def test_mlp_and_autoencoder_forward_backward():
    mlp = models.MLP(30, 2, hidden=16, layers=2)
    F.cross_entropy(mlp(torch.randn(4, 30)), torch.tensor([0, 1, 1, 0])).backward()
    ae = models.LinearAutoencoder(64, 4, lam=1e-3)
    b = torch.rand(5, 64)
    loss = ae.objective(b)
    loss.backward()
    de = ae.D @ ae.E
    direct = ((b @ de.T - b) ** 2).sum(1).mean() + 0.5e-3 * ((de - torch.eye(64)) ** 2).sum()
    assert torch.allclose(loss, direct, rtol=1e-5)


def test_norm_options():
    for norm in ("batch", "group", "none"):
        m = models.resnet20(1, 10, norm=norm)
        assert m(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    with pytest.raises(ValueError, match="norm"):
        models.norm_layer("layer", 8)


def test_every_nn_problem_is_registered():
    assert {"mlp", "cnn", "resnet18", "resnet20", "vgg11", "vgg16", "autoencoder", "custom"} <= set(PROBLEMS)


def test_flat_vector_round_trips_the_parameters_exactly():
    p = build_problem("cnn:dataset=digits,width=4", 3, seed=5)
    x0 = p.initial_point()
    assert x0.dtype == torch.float64 and x0.numel() == p.dim
    views = flat_views(x0.float(), p.shapes)
    for (name, param) in p.model.named_parameters():
        assert torch.equal(views[name], param.detach())
    back = torch.cat([v.reshape(-1) for v in views.values()])
    assert torch.equal(back, x0.float())
    # the server's model loads x exactly
    y = torch.randn(p.dim)
    model = p._server_model(y)
    assert torch.equal(torch.nn.utils.parameters_to_vector(model.parameters()), y)


def test_initialization_is_seeded_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a = build_problem("mlp:hidden=8", 2, seed=1).initial_point()
    after = torch.rand(3)
    assert torch.equal(before, after)
    assert torch.equal(a, build_problem("mlp:hidden=8", 4, seed=1).initial_point())
    assert not torch.equal(a, build_problem("mlp:hidden=8", 2, seed=2).initial_point())


def test_oracle_gradient_matches_autograd_on_the_module():
    p = build_problem("cnn:dataset=digits,width=4,batch=8", 2, seed=0)
    x = p.initial_point().float()
    f = p.oracle(1, torch.device("cpu"), torch.float32)
    loss, g = f(x, 3)
    assert loss.dim() == 0 and g.shape == (p.dim,) and g.dtype == torch.float32
    # the same minibatch by hand
    from common.problems.datasets import BatchOrder

    order = BatchOrder(len(p.shards[1]), 8, p.steps_per_epoch, p.seed, 1)
    epoch, window = order.locate(3)
    pos = torch.from_numpy(order.epoch_order(epoch))[window]
    idx = torch.from_numpy(p.shards[1])[pos]
    xb = p.data.transform.apply(p.data.x_train[idx], torch.float32)
    model = p._server_model(x).train()
    model.zero_grad()
    ref = F.cross_entropy(model(xb), p.data.y_train[idx])
    ref.backward()
    g_ref = torch.cat([q.grad.reshape(-1) for q in model.parameters()])
    assert torch.allclose(loss, ref) and torch.allclose(g, g_ref, atol=1e-6)
    # same step, same batch; another step, another batch
    assert torch.equal(f(x, 3)[1], g)
    assert not torch.equal(f(x, 4)[1], g)


def test_oracle_float64_and_full_batch():
    p = build_problem("mlp:dataset=breast_cancer,hidden=4,batch=0", 3, seed=0)
    f = p.oracle(0, torch.device("cpu"), torch.float64)
    loss, g = f(p.initial_point(), 0)
    assert g.dtype == torch.float64
    assert torch.equal(f(p.initial_point(), 17)[1], g)  # batch=0: the whole shard at every step


def test_batchnorm_statistics_stay_local_and_are_not_in_the_vector():
    p = build_problem("resnet20:dataset=digits,batch=4,bn_samples=16", 2, seed=0)
    n_params = sum(q.numel() for q in p.model.parameters())
    assert p.dim == n_params  # running means/vars are buffers, not parameters
    f = p.oracle(0, torch.device("cpu"), torch.float32)
    x = p.initial_point().float()
    f(x, 0)
    out = p.evaluate(x)
    assert 0.0 <= out["test_accuracy"] <= 1.0 and out["loss"] > 0
    # the server's statistics come from its own pass over training samples, not from a worker
    assert p.evaluate(x) == out


def test_evaluate_every_k_rounds_and_eval_size():
    p = build_problem("mlp:hidden=4,eval_every=3,eval_size=50", 2, seed=0)
    x = p.initial_point().float()
    got = [p.evaluate(x) for _ in range(7)]
    assert [bool(g) for g in got] == [True, False, False, True, False, False, True]
    assert round(got[0]["test_accuracy"] * 50) == got[0]["test_accuracy"] * 50


def test_autoencoder_reports_the_f2_objective_and_gradient_norm():
    p = build_problem("autoencoder:dataset=digits,code=4", 3, seed=0)
    assert p.dim == 2 * 64 * 4
    out = p.evaluate(p.initial_point().float())
    assert {"loss", "train_loss", "grad_norm_sq"} <= set(out) and "test_accuracy" not in out


def test_images_needed_for_conv_models():
    with pytest.raises(ValueError, match="image data"):
        build_problem("cnn:dataset=breast_cancer", 2)


def test_unknown_options_are_rejected():
    with pytest.raises(ValueError, match="unknown option"):
        build_problem("cnn:depth=3", 2)
    with pytest.raises(ValueError, match="dataset"):
        build_problem("cnn:dataset=imagenet", 2)


def _user_factory(width=8):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 5, generator=g)
    y = (x[:, 0] + x[:, 1] > 0).long()
    model = torch.nn.Sequential(torch.nn.Linear(5, int(width)), torch.nn.Tanh(), torch.nn.Linear(int(width), 2))
    return {"model": model, "train": (x[:160], y[:160]), "test": (x[160:], y[160:])}


def test_custom_model_entry_point(monkeypatch):
    mod = types.ModuleType("psc_test_user_models")
    mod.make = _user_factory
    monkeypatch.setitem(sys.modules, "psc_test_user_models", mod)
    p = build_problem("custom:factory=psc_test_user_models:make,width=6,batch=16", 4, seed=0)
    assert p.dim == 5 * 6 + 6 + 6 * 2 + 2
    assert torch.equal(p.initial_point(), build_problem("custom:factory=psc_test_user_models:make,width=6", 2, seed=0).initial_point())
    loss, g = p.oracle(2, torch.device("cpu"), torch.float32)(p.initial_point().float(), 0)
    assert g.shape == (p.dim,)
    assert "test_accuracy" in p.evaluate(p.initial_point().float())
    with pytest.raises(ValueError, match="package.module:function"):
        build_problem("custom:factory=nothing", 2)
    with pytest.raises(ValueError, match="cannot load factory"):
        build_problem("custom:factory=psc_test_user_models:missing", 2)


def test_short_inproc_run_of_the_cnn_on_digits_learns():
    config = RunConfig(algorithm="gd", problem="cnn:dataset=digits,width=8,batch=32", workers=3, rounds=60, lr="0.5", seed=0)
    losses = []
    server = run_inproc(config, None, progress=False, until=lambda r: losses.append(r["loss"]) and False)
    assert losses[-1] < 0.5 * losses[0]
    assert server.last["test_accuracy"] > 0.7
