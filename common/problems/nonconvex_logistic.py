"""Nonconvex-regularized logistic regression (CD-Adam paper section 7.1 / App. D.1; spec/cd-adam.md 3.1).

f(x) = (1/N) sum_j log(1 + exp(-y_j a_j^T x)) + lam sum_k x_k^2 / (1 + x_k^2), lam = 0.1, y in {-1, +1},
the data split equally across the n workers (shuffled with the seed; N mod n rows dropped so that
f = (1/n) sum_i f_i exactly). Data: ``dataset=breast_cancer`` (standardized) or ``digits``
(binarized: digit >= 5, pixels / 16), both offline from scikit-learn, or ``dataset=libsvm,path=FILE``
(read with sklearn's svmlight reader; nothing is downloaded). The oracle is the full local gradient
by default (batch=0; the paper does not say), or ``batch`` rows keyed by (seed, step, worker).
The regulariser r(x) = x^2/(1+x^2) has |r''| <= 2, so L = lambda_max(A^T A/N)/4 + 2 lam.
"""
from __future__ import annotations

from common.options import Param
from common.problems.base import register
from common.problems.tabular_data import LogisticLoss, RowProblem, load_tabular, split_equally


@register
class NonconvexLogistic(LogisticLoss, RowProblem):
    name = "nonconvex-logistic"
    summary = "logistic loss + lam sum x^2/(1+x^2) (CD-Adam sec. 7.1) on breast_cancer, digits or a LIBSVM file"
    params = (
        Param("dataset", str, "breast_cancer", lambda v: v in ("breast_cancer", "digits", "libsvm"), "breast_cancer, digits or libsvm", "breast_cancer (standardized), digits (binarized: >= 5) or libsvm (path=)"),
        Param("path", str, "", None, "", "the LIBSVM file (dataset=libsvm)"),
        Param("features", int, 0, lambda v: v >= 0, "a non-negative integer", "LIBSVM feature count (0: from the file)"),
        Param("lam", float, 0.1, lambda v: v >= 0, "non-negative", "regularisation weight lambda"),
        Param("batch", int, 0, lambda v: v >= 0, "a non-negative integer", "rows per oracle call (0: full local gradient)"),
    )

    def __init__(self, n_workers, seed, options):
        super().__init__(n_workers, seed, options)
        o = self.options
        X, y = load_tabular(o["dataset"], o["path"], o["features"])
        self.A, self.y = split_equally(X, y, n_workers, self.seed)
        self.reg_smoothness = 2.0 * o["lam"]
        self.finish()

    def reg(self, x):
        lam, sq = self.options["lam"], x * x
        return lam * (sq / (1 + sq)).sum(), lam * 2 * x / (1 + sq) ** 2
