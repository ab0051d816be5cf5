"""Data for the neural-network problems: sharding, the per-worker order, the file readers (on small files
written here in the real formats) and the errors when files are missing."""
from __future__ import annotations

import gzip
import pickle
import struct

import numpy as np
import pytest
import torch

from common.problems import build_problem
from common.problems import datasets as ds


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _labels(n=1000, classes=10, seed=0):
    return np.random.default_rng(seed).integers(0, classes, n)


def _assert_partition(shards, n):
    allidx = np.concatenate(shards)
    assert len(allidx) == n and len(np.unique(allidx)) == n  # covers everything, no overlap
    assert all(len(s) > 0 for s in shards)


@pytest.mark.parametrize("n_workers", [1, 3, 7, 16])
def test_iid_shards_partition_the_data_evenly(n_workers):
    shards = ds.shard_indices(_labels(), n_workers, seed=0, kind="iid")
    _assert_partition(shards, 1000)
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


@pytest.mark.parametrize("alpha", [0.05, 1.0, 10.0])
@pytest.mark.parametrize("n_workers", [2, 5, 16])
def test_dirichlet_shards_partition_the_data(alpha, n_workers):
    labels = _labels()
    shards = ds.shard_indices(labels, n_workers, seed=3, kind="dirichlet", alpha=alpha)
    _assert_partition(shards, 1000)
    assert ds.shard_indices(labels, n_workers, seed=3, kind="dirichlet", alpha=alpha)[0].tolist() == shards[0].tolist()


def test_dirichlet_small_alpha_is_heterogeneous_large_alpha_is_not():
    labels = _labels(5000)

    def skew(alpha):  # mean over workers of the largest class share
        shards = ds.shard_indices(labels, 5, seed=1, kind="dirichlet", alpha=alpha)
        return np.mean([np.bincount(labels[s], minlength=10).max() / len(s) for s in shards])

    assert skew(0.1) > 0.4 and skew(100.0) < 0.2


def test_sharding_errors():
    with pytest.raises(ValueError, match="cannot be shared"):
        ds.shard_indices(_labels(3), 5, seed=0)
    with pytest.raises(ValueError, match="sharding"):
        ds.shard_indices(_labels(), 2, seed=0, kind="pathological")


def test_batch_order_is_keyed_and_every_worker_takes_the_same_steps():
    labels = _labels(1000)
    shards = ds.shard_indices(labels, 4, seed=0, kind="dirichlet", alpha=0.3)
    steps = ds.steps_per_epoch(1000, 4, 32)
    assert steps == 8
    for w, shard in enumerate(shards):
        order = ds.BatchOrder(len(shard), 32, steps, seed=9, worker=w)
        e0 = order.epoch_order(0)
        assert len(e0) == steps * 32 and e0.max() < len(shard)
        assert np.array_equal(e0, ds.BatchOrder(len(shard), 32, steps, seed=9, worker=w).epoch_order(0))
        assert not np.array_equal(e0, order.epoch_order(1))
        if len(shard) >= steps * 32:
            assert len(np.unique(e0)) == len(e0)  # no repeats within an epoch when the shard is big enough
    assert order.locate(0) == (0, slice(0, 32)) and order.locate(steps + 2) == (1, slice(64, 96))
    a = ds.BatchOrder(250, 32, steps, seed=9, worker=0).epoch_order(0)
    b = ds.BatchOrder(250, 32, steps, seed=9, worker=1).epoch_order(0)
    assert not np.array_equal(a, b)


def test_problem_shards_cover_the_training_set_and_test_is_held_out():
    p = build_problem("mlp:dataset=digits,shard=dirichlet,alpha=0.5", 6, seed=2)
    _assert_partition(p.shards, len(p.data.y_train))
    assert len(p.data.y_train) + len(p.data.y_test) == 1797 and len(p.data.y_test) == 359
    tr = {bytes(r) for r in p.data.x_train.numpy().reshape(len(p.data.y_train), -1)}
    held = [bytes(r) for r in p.data.x_test.numpy().reshape(len(p.data.y_test), -1)]
    assert sum(h in tr for h in held) < 10  # (digits has a few duplicate images)


def test_breast_cancer_is_standardized_features():
    d = ds.load_dataset("breast_cancer")
    assert d.x_train.shape[1:] == (30,) and d.n_classes == 2 and not d.is_image
    assert torch.allclose(d.x_train.mean(0), torch.zeros(30), atol=1e-4)


# -- MNIST: IDX ---------------------------------------------------------------------------------
def write_idx(path, array: np.ndarray, gz: bool):
    codes = {np.dtype(np.uint8): 0x08}
    header = bytes([0, 0, codes[array.dtype], array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.tobytes()
    if gz:
        path = str(path) + ".gz"
        with gzip.open(path, "wb") as fh:
            fh.write(data)
    else:
        with open(path, "wb") as fh:
            fh.write(data)


def make_mnist(folder, gz: bool, n_train=40, n_test=12):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    x_tr = rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8)
    y_tr = (np.arange(n_train) % 10).astype(np.uint8)
    x_te = rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8)
    y_te = (np.arange(n_test) % 10).astype(np.uint8)
    for name, arr in (("train-images-idx3-ubyte", x_tr), ("train-labels-idx1-ubyte", y_tr),
                      ("t10k-images-idx3-ubyte", x_te), ("t10k-labels-idx1-ubyte", y_te)):
        write_idx(folder / name, arr, gz)
    return x_tr, y_tr, x_te, y_te


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_reader_reads_idx_files(tmp_path, gz):
    x_tr, y_tr, x_te, y_te = make_mnist(tmp_path / "MNIST" / "raw", gz)
    d = ds.load_mnist_set(str(tmp_path))
    assert d.x_train.shape == (40, 1, 28, 28) and d.x_test.shape == (12, 1, 28, 28)
    assert np.array_equal(d.x_train[:, 0].numpy(), x_tr) and np.array_equal(d.y_test.numpy(), y_te)
    assert d.n_classes == 10


def test_mnist_problem_with_a_data_dir_in_mixed_case(tmp_path):
    make_mnist(tmp_path / "Data" / "MNIST", gz=True)
    p = build_problem(f"autoencoder:dataset=mnist,data_dir={tmp_path / 'Data'}", 4, seed=0)
    assert p.dim == 25_088  # F.2's d
    loss, g = p.oracle(3, torch.device("cpu"), torch.float32)(p.initial_point().float(), 0)
    assert torch.isfinite(g).all()
    assert "grad_norm_sq" in p.evaluate(p.initial_point().float())
    q = build_problem(f"cnn:dataset=mnist,data_dir={tmp_path / 'Data'},batch=4", 2, seed=0)
    assert 0 <= q.evaluate(q.initial_point().float())["test_accuracy"] <= 1


def test_idx_reader_rejects_corrupt_files(tmp_path):
    path = tmp_path / "bad-idx"
    path.write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">I", 10) + b"\x00" * 7)
    with pytest.raises(ValueError, match="IDX header"):
        ds.read_idx(str(path))
    path.write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="magic"):
        ds.read_idx(str(path))


# -- CIFAR-10: python batches -------------------------------------------------------------------
def make_cifar(folder, per_batch=6):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    written = {}
    for name in ds.CIFAR_TRAIN + (ds.CIFAR_TEST,):
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, per_batch)]
        with open(folder / name, "wb") as fh:  # the real files: pickled dicts with bytes keys
            pickle.dump({b"batch_label": name.encode(), b"labels": labels, b"data": data, b"filenames": [b"x.png"] * per_batch}, fh)
        written[name] = (data, labels)
    return written


def test_cifar_reader_reads_python_batches(tmp_path):
    written = make_cifar(tmp_path / "cifar-10-batches-py")
    d = ds.load_cifar10_set(str(tmp_path))
    assert d.x_train.shape == (30, 3, 32, 32) and d.x_test.shape == (6, 3, 32, 32)
    data, labels = written["data_batch_2"]
    assert np.array_equal(d.x_train[6:12].numpy().reshape(6, 3072), data)  # channel-major, row-major rows
    assert d.y_train[6:12].tolist() == labels
    assert len(d.transform.mean) == 3


def test_resnet20_on_cifar_files(tmp_path):
    make_cifar(tmp_path / "cifar-10-batches-py")
    p = build_problem(f"resnet20:dataset=cifar10,data_dir={tmp_path},batch=2,bn_samples=4", 3, seed=0)
    loss, g = p.oracle(2, torch.device("cpu"), torch.float32)(p.initial_point().float(), 5)
    assert g.shape == (p.dim,) and torch.isfinite(g).all()


# -- missing files ---------------------------------------------------------------------------------
def test_missing_mnist_names_the_expected_files(tmp_path):
    with pytest.raises(ds.DataMissing) as err:
        build_problem(f"cnn:dataset=mnist,data_dir={tmp_path / 'nowhere'}", 2)
    msg = str(err.value)
    assert "train-images-idx3-ubyte" in msg and "t10k-labels-idx1-ubyte" in msg and "nowhere" in msg


def test_missing_cifar_names_the_expected_files(tmp_path):
    (tmp_path / "cifar-10-batches-py").mkdir()
    with pytest.raises(ds.DataMissing, match="data_batch_1.*test_batch"):
        build_problem(f"resnet18:dataset=cifar10,data_dir={tmp_path}", 2)


def test_data_dir_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("PSC_DATA_DIR", str(tmp_path / "env-dir"))
    with pytest.raises(ds.DataMissing, match="env-dir"):
        build_problem("mlp:dataset=mnist", 2)


# -- LIBSVM ---------------------------------------------------------------------------------------------
def test_libsvm_files(tmp_path):
    rng = np.random.default_rng(0)
    lines = []
    for i in range(50):
        label = 1 if i % 2 else -1
        feats = " ".join(f"{j + 1}:{rng.normal() + label:.4f}" for j in range(4) if rng.random() < 0.9)
        lines.append(f"{label} {feats}")
    (tmp_path / "a1a.txt").write_text("\n".join(lines) + "\n")
    p = build_problem(f"mlp:dataset=libsvm,data_dir={tmp_path},file=a1a.txt,hidden=4", 2, seed=0)
    assert p.data.n_classes == 2 and set(p.data.y_train.tolist()) <= {0, 1}
    assert len(p.data.y_train) == 40 and len(p.data.y_test) == 10
    assert "test_accuracy" in p.evaluate(p.initial_point().float())
    with pytest.raises(ds.DataMissing, match="nope.txt"):
        build_problem(f"mlp:dataset=libsvm,data_dir={tmp_path},file=nope.txt", 2)
    with pytest.raises(ValueError, match="file="):
        build_problem(f"mlp:dataset=libsvm,data_dir={tmp_path}", 2)
