"""Shared pieces of the finite-sum problems (least squares, logistic, nonconvex logistic): data sets,
the per-worker split, a keyed row-sampling oracle and exact server-side metrics.

f(x) = (1/n) sum_i f_i(x), f_i(x) = (1/M) sum_m loss(a_{i,m}^T x, y_{i,m}) + r(x), every worker with
the same number M of rows (so f is also the mean over all nM rows). ``oracle(x, step)`` draws
``batch`` rows uniformly with replacement, keyed by (seed, step, worker) (batch=0: the full local
gradient). ``evaluate(x)`` is exact: loss, grad_norm_sq = ||grad f(x)||^2 and the training accuracy
where labels are classes. Constants: L (of f), L_max (max_i of f_i), L_sample (of one row's loss).
"""
from __future__ import annotations

import os

import numpy as np
import torch

from common.keys import StreamKey, numpy_rng
from common.problems.base import Problem


def heterogeneous_rows(seed: int, n: int, M: int, d: int, tag: int):
    """NEOLITHIC section 3: per worker x_i* ~ N(0, I_d), rows a ~ N(0, I_d) (M x d). Returns (A, x_star)."""
    rng = np.random.Generator(np.random.PCG64([seed, tag]))
    x_star = rng.standard_normal((n, d))
    A = rng.standard_normal((n, M, d))
    return rng, A, x_star


def load_tabular(dataset: str, path: str | None, n_features: int = 0):
    """(X, y) with y in {-1, +1}: scikit-learn's breast_cancer (features standardized), digits binarized
    (label +1 for digits >= 5, pixels / 16), or a LIBSVM-format file (labels mapped to -1/+1)."""
    if dataset == "breast_cancer":
        from sklearn.datasets import load_breast_cancer

        X, y = load_breast_cancer(return_X_y=True)
        X = (X - X.mean(0)) / X.std(0)
        return X, np.where(y == 1, 1.0, -1.0)
    if dataset == "digits":
        from sklearn.datasets import load_digits

        X, y = load_digits(return_X_y=True)
        return X / 16.0, np.where(y >= 5, 1.0, -1.0)
    if dataset == "libsvm":
        if not path:
            raise ValueError("dataset=libsvm needs path=FILE (a LIBSVM/svmlight-format file)")
        if not os.path.isfile(path):
            raise ValueError(f"LIBSVM file {path!r} does not exist (nothing is downloaded: put the file there)")
        from sklearn.datasets import load_svmlight_file

        try:
            X, y = load_svmlight_file(path, n_features=n_features or None)
        except Exception as exc:  # sklearn raises ValueError / OSError with its own words
            raise ValueError(f"cannot read LIBSVM file {path!r}: {exc}") from None
        classes = np.unique(y)
        if len(classes) != 2:
            raise ValueError(f"LIBSVM file {path!r}: expected 2 classes, found {len(classes)}")
        return np.asarray(X.todense(), dtype=np.float64), np.where(y == classes[1], 1.0, -1.0)
    raise ValueError(f"unknown dataset {dataset!r} (breast_cancer, digits, libsvm)")


def split_equally(X, y, n: int, seed: int):
    """Shuffle (keyed by seed) and give every worker floor(N/n) rows; the remainder is dropped."""
    M = X.shape[0] // n
    if M < 1:
        raise ValueError(f"{X.shape[0]} samples cannot be split across {n} workers")
    perm = np.random.Generator(np.random.PCG64([seed, 0x5B117])).permutation(X.shape[0])[: n * M]
    return X[perm].reshape(n, M, -1), y[perm].reshape(n, M)


def top_eig(gram: np.ndarray) -> float:
    return float(np.linalg.eigvalsh(gram)[-1])


class RowProblem(Problem):
    """A finite sum over rows; subclasses set self.A (n, M, d), self.y (n, M) and the loss."""

    curvature = 1.0  # sup of loss''(z): 1 for least squares, 1/4 for logistic
    reg_smoothness = 0.0
    classes = False  # report training accuracy

    def loss(self, z, y):
        raise NotImplementedError

    def dloss(self, z, y):
        raise NotImplementedError

    def reg(self, x):
        """(r(x), grad r(x)); zero by default."""
        return x.new_zeros(()), torch.zeros_like(x)

    def finish(self):
        n, M, d = self.A.shape
        self.dim = d
        flat = self.A.reshape(n * M, d)
        self._A_all = torch.from_numpy(flat)
        self._y_all = torch.from_numpy(self.y.reshape(-1))
        c, r = self.curvature, self.reg_smoothness
        self.constants = {
            "L": c * top_eig(flat.T @ flat / (n * M)) + r,
            "L_max": max(c * top_eig(a.T @ a / M) for a in self.A) + r,
            "L_sample": c * float((flat ** 2).sum(1).max()) + r,
        }

    def initial_point(self):
        """x^0 = x0 * N(0, I_d) keyed by the seed (option x0, where the problem has it), else 0."""
        std = self.options.get("x0", 0.0)
        if not std:
            return torch.zeros(self.dim, dtype=torch.float64)
        rng = np.random.Generator(np.random.PCG64([self.seed, 0xC0]))
        return torch.from_numpy(std * rng.standard_normal(self.dim))

    def oracle(self, worker, device, dtype):
        A = torch.from_numpy(self.A[worker]).to(device=device, dtype=dtype)
        y = torch.from_numpy(self.y[worker]).to(device=device, dtype=dtype)
        M, batch, tag = A.shape[0], self.options.get("batch", 0), f"{self.name}/rows"

        def f(x, step=0):
            if batch:
                idx = numpy_rng(StreamKey(self.seed, step, worker, tag).code).integers(M, size=batch)
                idx = torch.from_numpy(idx).to(device)
                a, b = A[idx], y[idx]
            else:
                a, b = A, y
            z = a @ x
            rv, rg = self.reg(x)
            return self.loss(z, b).mean() + rv, a.T @ self.dloss(z, b) / a.shape[0] + rg

        return f

    def evaluate(self, x):
        x = x.detach().to("cpu", torch.float64)
        z = self._A_all @ x
        rv, rg = self.reg(x)
        g = self._A_all.T @ self.dloss(z, self._y_all) / z.numel() + rg
        out = {"loss": float(self.loss(z, self._y_all).mean() + rv), "grad_norm_sq": float(g @ g)}
        if self.classes:
            out["accuracy"] = float(((z >= 0) == (self._y_all > 0)).double().mean())
        return out


class LogisticLoss:
    curvature = 0.25
    classes = True

    def loss(self, z, y):
        return torch.nn.functional.softplus(-y * z)

    def dloss(self, z, y):
        return -y * torch.sigmoid(-y * z)
