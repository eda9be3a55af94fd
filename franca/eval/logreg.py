"""Logistic regression on frozen CLS features (spec 7.3; official franca/eval/log_regression.py, cuML on GPU).

* features: the raw CLS (not normalised), cast to float64;
* classifier: L2-penalised multinomial logistic regression with L-BFGS (scikit-learn, the CPU drop-in for cuML's
  ``LogisticRegression(penalty="l2", C, max_iter=1000, tol=1e-12)``);
* sweep: C in 10^linspace(-6, 5, n_c) (n_c = 45), chosen by top-1 on a random 10% hold-out of train (seed 0),
  or on val with ``finetune_on_val``;
* final: refit on all of train with the best C, evaluate top-1 (and mean per-class accuracy) on val.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression

logger = logging.getLogger(__name__)

__all__ = ["c_grid", "logreg_eval"]


def c_grid(n_c: int = 45, low: float = -6.0, high: float = 5.0) -> np.ndarray:
    """The inverse-regularisation sweep 10^linspace(low, high, n_c)."""
    return 10.0 ** np.linspace(low, high, n_c)


def _as_np(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _fit(x: np.ndarray, y: np.ndarray, c: float, max_iter: int, tol: float) -> LogisticRegression:
    clf = LogisticRegression(C=c, solver="lbfgs", max_iter=max_iter, tol=tol)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # tol 1e-12 rarely converges; max_iter bounds it
        clf.fit(x, y)
    return clf


def _scores(clf: LogisticRegression, x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    pred = clf.predict(x)
    per_class = [float(np.mean(pred[y == c] == c)) for c in np.unique(y)]
    return {"top1": float(np.mean(pred == y)), "mean_per_class": float(np.mean(per_class))}


def logreg_eval(
    train_features,
    train_labels,
    val_features,
    val_labels,
    n_c: int = 45,
    c_low: float = -6.0,
    c_high: float = 5.0,
    holdout_fraction: float = 0.1,
    seed: int = 0,
    finetune_on_val: bool = False,
    max_iter: int = 1000,
    tol: float = 1e-12,
) -> dict:
    """C sweep on a hold-out of train, refit on all of train -> {"metrics": {top1, mean_per_class}, "details"}."""
    x_tr, y_tr = _as_np(train_features).astype(np.float64), _as_np(train_labels).astype(np.int64)
    x_va, y_va = _as_np(val_features).astype(np.float64), _as_np(val_labels).astype(np.int64)
    if (y_tr < 0).any() or (y_va < 0).any():
        raise ValueError("logistic regression: a split has unlabeled samples (label -1)")
    if len(np.unique(y_tr)) < 2:
        raise ValueError("logistic regression needs at least two classes in train")
    grid = c_grid(n_c, c_low, c_high)
    if finetune_on_val:
        fit_x, fit_y, sel_x, sel_y = x_tr, y_tr, x_va, y_va
    else:
        perm = np.random.default_rng(seed).permutation(len(y_tr))
        n_hold = max(1, int(round(holdout_fraction * len(y_tr))))
        hold, rest = perm[:n_hold], perm[n_hold:]
        fit_x, fit_y, sel_x, sel_y = x_tr[rest], y_tr[rest], x_tr[hold], y_tr[hold]
    sweep = []
    for c in grid:
        sweep.append(_scores(_fit(fit_x, fit_y, c, max_iter, tol), sel_x, sel_y)["top1"])
    best = int(np.argmax(sweep))  # first of ties: the strongest regularisation among the best
    final = _fit(x_tr, y_tr, float(grid[best]), max_iter, tol)
    metrics = _scores(final, x_va, y_va)
    metrics["best_c"] = float(grid[best])
    details = {
        "c_grid": grid.tolist(),
        "selection_top1": sweep,
        "selected_on": "val" if finetune_on_val else f"holdout{holdout_fraction:g}",
        "n_train": int(len(y_tr)),
        "n_val": int(len(y_va)),
    }
    logger.info("logreg: %s", metrics)
    return {"metrics": metrics, "details": details}
