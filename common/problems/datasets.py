"""Data sets for the neural-network problems, sharding across workers and the per-worker batch order.

Everything works offline. ``digits`` and ``breast_cancer`` ship with scikit-learn; ``mnist``
(IDX files, gzipped or not), ``cifar10`` (the python pickle batches) and ``libsvm`` (svmlight text
files) are read from a local folder (``data_dir``). Nothing is downloaded.

A ``DataSet`` keeps its inputs compactly (images as uint8) plus an affine ``Transform`` applied per
batch on the batch's device, so a worker holding CIFAR-10 on a GPU stores 150 MB of bytes, not 600 MB
of floats.

Sharding (``shard_indices``): ``iid`` deals a keyed permutation of the training set into n near-equal
shards; ``dirichlet`` draws, for every class, worker proportions p ~ Dir(alpha 1_n) and splits that
class's samples by them (the heterogeneous split of NEOLITHIC's Table 4; small alpha: each worker
sees few classes). Either way the shards partition the training set: every sample is on exactly one
worker.

Order (``BatchOrder``): every worker takes the same number of steps per epoch,
``steps_per_epoch = max(1, round(N_train / (n * batch)))`` (the i.i.d. count). Worker i's epoch e is
the concatenation of permutations of its own shard keyed by (seed, e, i) until it has
``steps_per_epoch * batch`` indices; step s uses batch ``s mod steps_per_epoch`` of epoch
``s // steps_per_epoch``. A worker with a large Dirichlet shard sees part of it each epoch, a small one
repeats samples; the oracle is deterministic in (seed, step, worker).
"""
from __future__ import annotations

import functools
import gzip
import os
import pickle
import struct
from dataclasses import dataclass

import numpy as np
import torch

from common.keys import StreamKey, numpy_rng

DATASETS = ("digits", "breast_cancer", "mnist", "cifar10", "libsvm")
SPLIT_SEED = 20240607  # the held-out split of the offline sets does not depend on the run's seed


class DataMissing(FileNotFoundError):
    """A file data set is not where ``data_dir`` says; the message names the files expected."""


@dataclass(frozen=True)
class Transform:
    """x -> (x * scale - mean) / std, per channel for images (mean/std of length C) or scalar."""

    scale: float = 1.0
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)

    def apply(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        x = x.to(dtype) * self.scale
        if x.dim() == 4 and len(self.mean) == x.shape[1] > 1:
            shape = (1, -1, 1, 1)
        elif x.dim() == 2 and len(self.mean) == x.shape[1] > 1:
            shape = (1, -1)
        else:
            shape = (-1,) if len(self.mean) == 1 else None
            if shape is None:
                raise ValueError("transform: mean/std do not match the input's channels")
        mean = torch.tensor(self.mean, dtype=dtype, device=x.device).view(shape)
        std = torch.tensor(self.std, dtype=dtype, device=x.device).view(shape)
        return (x - mean) / std


@dataclass
class DataSet:
    """Train and test inputs (uint8 images or float32 features) and int64 labels, on the CPU."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    n_classes: int
    transform: Transform  # for classifiers (standardized inputs)
    raw: Transform  # inputs scaled to [0, 1] without centring (the autoencoder's)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    @property
    def is_image(self) -> bool:
        return self.x_train.dim() == 4


# -- the held-out split ------------------------------------------------------------------------
def split_indices(n: int, test_fraction: float, purpose: str) -> tuple[np.ndarray, np.ndarray]:
    """A fixed train/test split of n samples (keyed by a constant seed and the data set's name)."""
    perm = numpy_rng(StreamKey(SPLIT_SEED, 0, 0, f"split/{purpose}").code).permutation(n)
    n_test = max(1, int(round(test_fraction * n)))
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])


def _channel_stats(x: np.ndarray, scale: float) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images (N, C, H, W) scaled by ``scale``."""
    xs = x.astype(np.float64) * scale
    axes = (0, 2, 3)
    mean = xs.mean(axis=axes)
    std = xs.std(axis=axes)
    return tuple(float(m) for m in mean), tuple(float(max(s, 1e-8)) for s in std)


# -- scikit-learn's offline sets -----------------------------------------------------------------
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits (1797 8x8 images, values 0..16). Read straight from the CSV that
    scikit-learn ships when it can be found (importing sklearn.datasets costs each worker process
    about 1.5 s of CPU); else through ``load_digits``."""
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    for root in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(root, "datasets", "data", "digits.csv.gz")
        if os.path.isfile(path):
            data = np.loadtxt(path, delimiter=",")
            if data.shape == (1797, 65):
                return data[:, :-1].reshape(-1, 8, 8), data[:, -1]
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images, d.target


def load_digits_set(test_fraction: float) -> DataSet:
    images, target = _digits_arrays()
    x = images.astype(np.uint8).reshape(-1, 1, 8, 8)  # values 0..16
    y = target.astype(np.int64)
    tr, te = split_indices(len(y), test_fraction, "digits")
    mean, std = _channel_stats(x[tr], 1.0 / 16.0)
    return DataSet("digits", torch.from_numpy(x[tr]), torch.from_numpy(y[tr]), torch.from_numpy(x[te]),
                   torch.from_numpy(y[te]), 10, Transform(1.0 / 16.0, mean, std), Transform(1.0 / 16.0))


def _features_set(name: str, x: np.ndarray, y: np.ndarray, test_fraction: float,
                  test: tuple[np.ndarray, np.ndarray] | None = None) -> DataSet:
    if test is None:
        tr, te = split_indices(len(y), test_fraction, name)
        x_tr, y_tr, x_te, y_te = x[tr], y[tr], x[te], y[te]
    else:
        x_tr, y_tr, (x_te, y_te) = x, y, test
    mean = x_tr.mean(0)
    std = np.maximum(x_tr.std(0), 1e-8)
    classes = np.unique(np.concatenate([y_tr, y_te]))
    lookup = {c: i for i, c in enumerate(classes.tolist())}
    relabel = lambda v: np.array([lookup[c] for c in v.tolist()], dtype=np.int64)
    to_t = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
    # Features are stored standardized; ``raw`` then is the identity (documented: the autoencoder on
    # feature data reconstructs standardized features).
    xs_tr, xs_te = (x_tr - mean) / std, (x_te - mean) / std
    return DataSet(name, to_t(xs_tr), torch.from_numpy(relabel(y_tr)), to_t(xs_te), torch.from_numpy(relabel(y_te)),
                   max(2, len(classes)), Transform(), Transform())


def load_breast_cancer_set(test_fraction: float) -> DataSet:
    from sklearn.datasets import load_breast_cancer

    d = load_breast_cancer()
    return _features_set("breast_cancer", d.data.astype(np.float64), d.target.astype(np.int64), test_fraction)


# -- MNIST: IDX files ----------------------------------------------------------------------------
MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte",
}


def read_idx(path: str) -> np.ndarray:
    """An IDX file (gzipped if its name ends in .gz): magic 0x0000 TT DD, DD big-endian int32 sizes."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as fh:
        data = fh.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path}: not an IDX file (bad magic number)")
    kinds = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if data[2] not in kinds:
        raise ValueError(f"{path}: unknown IDX element type 0x{data[2]:02x}")
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    dtype = np.dtype(kinds[data[2]])
    count = int(np.prod(shape)) if shape else 1
    body = data[4 + 4 * ndim:]
    if len(body) != count * dtype.itemsize:
        raise ValueError(f"{path}: IDX header says {shape} ({count * dtype.itemsize} bytes) but {len(body)} bytes follow")
    return np.frombuffer(body, dtype=dtype).reshape(shape)


def _find(data_dir: str, name: str, subdirs: tuple[str, ...]) -> str | None:
    for sub in ("",) + subdirs:
        for suffix in ("", ".gz"):
            path = os.path.join(data_dir, sub, name + suffix)
            if os.path.isfile(path):
                return path
    return None


def load_mnist_set(data_dir: str) -> DataSet:
    subdirs = ("mnist", "MNIST", os.path.join("MNIST", "raw"))
    paths = {k: _find(data_dir, v, subdirs) for k, v in MNIST_FILES.items()}
    missing = [MNIST_FILES[k] for k, p in paths.items() if p is None]
    if missing:
        raise DataMissing(
            f"dataset mnist: {', '.join(missing)} not found in {os.path.abspath(data_dir)!r} (or its mnist/, "
            f"MNIST/raw/ subfolders); expected the four IDX files {', '.join(MNIST_FILES.values())} "
            "(each may be .gz); set the folder with the problem option data_dir=PATH or PSC_DATA_DIR")
    x_tr = read_idx(paths["train_images"]).astype(np.uint8)
    y_tr = read_idx(paths["train_labels"]).astype(np.int64)
    x_te = read_idx(paths["test_images"]).astype(np.uint8)
    y_te = read_idx(paths["test_labels"]).astype(np.int64)
    if x_tr.ndim != 3 or x_te.ndim != 3 or len(x_tr) != len(y_tr) or len(x_te) != len(y_te):
        raise ValueError(f"dataset mnist in {data_dir!r}: image and label files do not match")
    x_tr, x_te = x_tr[:, None], x_te[:, None]
    mean, std = _channel_stats(x_tr, 1.0 / 255.0)
    return DataSet("mnist", torch.from_numpy(x_tr.copy()), torch.from_numpy(y_tr.copy()), torch.from_numpy(x_te.copy()),
                   torch.from_numpy(y_te.copy()), 10, Transform(1.0 / 255.0, mean, std), Transform(1.0 / 255.0))


# -- CIFAR-10: python pickle batches ---------------------------------------------------------------
CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST = "test_batch"


def read_cifar_batch(path: str) -> tuple[np.ndarray, np.ndarray]:
    with open(path, "rb") as fh:
        d = pickle.load(fh, encoding="bytes")
    data = d.get(b"data", d.get("data"))
    labels = d.get(b"labels", d.get("labels"))
    if data is None or labels is None:
        raise ValueError(f"{path}: not a CIFAR-10 python batch (no data/labels)")
    data = np.asarray(data, dtype=np.uint8)
    if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
        raise ValueError(f"{path}: CIFAR-10 batch data must be N x 3072 with N labels")
    return data.reshape(-1, 3, 32, 32), np.asarray(labels, dtype=np.int64)


def load_cifar10_set(data_dir: str) -> DataSet:
    names = CIFAR_TRAIN + (CIFAR_TEST,)
    folder = None
    for sub in ("", "cifar-10-batches-py", "cifar10", "cifar-10"):
        if all(os.path.isfile(os.path.join(data_dir, sub, n)) for n in names):
            folder = os.path.join(data_dir, sub)
            break
    if folder is None:
        raise DataMissing(
            f"dataset cifar10: the python batches {', '.join(names)} were not found in {os.path.abspath(data_dir)!r} "
            "(or its cifar-10-batches-py/ subfolder: unpack cifar-10-python.tar.gz there); "
            "set the folder with the problem option data_dir=PATH or PSC_DATA_DIR")
    parts = [read_cifar_batch(os.path.join(folder, n)) for n in CIFAR_TRAIN]
    x_tr = np.concatenate([p[0] for p in parts])
    y_tr = np.concatenate([p[1] for p in parts])
    x_te, y_te = read_cifar_batch(os.path.join(folder, CIFAR_TEST))
    mean, std = _channel_stats(x_tr, 1.0 / 255.0)
    return DataSet("cifar10", torch.from_numpy(x_tr), torch.from_numpy(y_tr), torch.from_numpy(x_te), torch.from_numpy(y_te),
                   10, Transform(1.0 / 255.0, mean, std), Transform(1.0 / 255.0))


# -- LIBSVM ------------------------------------------------------------------------------------------
def load_libsvm_set(data_dir: str, file: str, test_file: str, test_fraction: float) -> DataSet:
    from sklearn.datasets import load_svmlight_file, load_svmlight_files

    if not file:
        raise ValueError("dataset libsvm: give the file with the problem option file=NAME (relative to data_dir, or absolute)")
    path = file if os.path.isabs(file) else os.path.join(data_dir, file)
    if not os.path.isfile(path):
        raise DataMissing(f"dataset libsvm: file {os.path.abspath(path)!r} not found (file= is relative to data_dir={data_dir!r})")
    if test_file:
        tpath = test_file if os.path.isabs(test_file) else os.path.join(data_dir, test_file)
        if not os.path.isfile(tpath):
            raise DataMissing(f"dataset libsvm: test file {os.path.abspath(tpath)!r} not found")
        x, y, xt, yt = load_svmlight_files([path, tpath])
        return _features_set("libsvm", x.toarray(), y, test_fraction, (xt.toarray(), yt))
    x, y = load_svmlight_file(path)
    return _features_set("libsvm", x.toarray(), y, test_fraction)


@functools.lru_cache(maxsize=4)
def load_dataset(name: str, data_dir: str = "data", test_fraction: float = 0.2, file: str = "", test_file: str = "") -> DataSet:
    """The data set ``name`` (one of ``DATASETS``), cached per process."""
    if name == "digits":
        return load_digits_set(test_fraction)
    if name == "breast_cancer":
        return load_breast_cancer_set(test_fraction)
    if name == "mnist":
        return load_mnist_set(data_dir)
    if name == "cifar10":
        return load_cifar10_set(data_dir)
    if name == "libsvm":
        return load_libsvm_set(data_dir, file, test_file, test_fraction)
    raise ValueError(f"unknown dataset {name!r} (known: {', '.join(DATASETS)})")


# -- sharding and order ------------------------------------------------------------------------------
def shard_indices(labels: np.ndarray | torch.Tensor, n_workers: int, seed: int, kind: str = "iid",
                  alpha: float = 1.0) -> list[np.ndarray]:
    """Split sample indices 0..N-1 over n workers: a partition (every index on exactly one worker),
    every shard non-empty (needs N >= n)."""
    labels = np.asarray(labels)
    n_samples = len(labels)
    if n_samples < n_workers:
        raise ValueError(f"{n_samples} training samples cannot be shared by {n_workers} workers")
    rng = numpy_rng(StreamKey(seed, 0, 0, f"shard/{kind}").code)
    if kind == "iid":
        return [np.sort(s) for s in np.array_split(rng.permutation(n_samples), n_workers)]
    if kind != "dirichlet":
        raise ValueError(f"unknown sharding {kind!r} (iid or dirichlet)")
    if not alpha > 0:
        raise ValueError(f"dirichlet sharding: alpha={alpha} must be positive")
    parts: list[list[np.ndarray]] = [[] for _ in range(n_workers)]
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        p = rng.dirichlet(np.full(n_workers, float(alpha)))
        cuts = (np.cumsum(p)[:-1] * len(idx)).astype(np.int64)
        for w, piece in enumerate(np.split(idx, cuts)):
            parts[w].append(piece)
    shards = [np.sort(np.concatenate(p)) if p else np.zeros(0, np.int64) for p in parts]
    # An empty shard cannot train: give it one sample from the largest shard (still a partition).
    for w in range(n_workers):
        while len(shards[w]) == 0:
            big = int(np.argmax([len(s) for s in shards]))
            take = rng.integers(len(shards[big]))
            shards[w] = shards[big][take:take + 1].copy()
            shards[big] = np.delete(shards[big], take)
    return shards


class BatchOrder:
    """Worker ``worker``'s minibatch at any step: see the module docstring."""

    def __init__(self, shard_size: int, batch: int, steps_per_epoch: int, seed: int, worker: int):
        self.size, self.batch, self.steps, self.seed, self.worker = shard_size, batch, steps_per_epoch, seed, worker

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Positions into the shard for the whole epoch (steps * batch of them)."""
        need = self.steps * self.batch
        rng = numpy_rng(StreamKey(self.seed, epoch, self.worker, "nn/order").code)
        pieces, have = [], 0
        while have < need:
            pieces.append(rng.permutation(self.size))
            have += self.size
        return np.concatenate(pieces)[:need]

    def locate(self, step: int) -> tuple[int, slice]:
        epoch, j = divmod(int(step), self.steps)
        return epoch, slice(j * self.batch, (j + 1) * self.batch)


def steps_per_epoch(n_train: int, n_workers: int, batch: int) -> int:
    return max(1, int(round(n_train / (n_workers * batch))))
