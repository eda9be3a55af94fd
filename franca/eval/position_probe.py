"""Position probe: how linearly decodable is a patch's absolute grid position from its token (spec 5, 10.1 row 11).

The probe is a least-squares linear map (with intercept) from patch tokens to the normalised position
(row / (n - 1), col / (n - 1)) of each patch, the same targets RASA regresses.  Its R^2 (the mean over the two
outputs of 1 - SS_res / SS_tot) answers "is absolute position linearly decodable": 1 means exactly, 0 means no
better than predicting the mean position.  Unlike the sigmoid head RASA trains, a fresh closed-form fit cannot be
fooled by a badly trained regressor, so the number measures the features, not the optimiser.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch

logger = logging.getLogger(__name__)

__all__ = [
    "position_targets",
    "flatten_patch_tokens",
    "fit_linear_probe",
    "predict_linear_probe",
    "regression_scores",
    "position_variance_fraction",
    "position_r2",
    "evaluate_position_probe",
]


def position_targets(grid: int | tuple[int, int]) -> torch.Tensor:
    """(N, 2) float targets (row / (h - 1), col / (w - 1)) in row-major patch order, N = h * w."""
    h, w = (grid, grid) if isinstance(grid, int) else grid
    if h < 2 or w < 2:
        raise ValueError(f"position targets need a grid of at least 2x2, got {h}x{w}")
    rows = torch.arange(h, dtype=torch.float32) / (h - 1)
    cols = torch.arange(w, dtype=torch.float32) / (w - 1)
    rr, cc = torch.meshgrid(rows, cols, indexing="ij")
    return torch.stack([rr.reshape(-1), cc.reshape(-1)], dim=-1)  # (N, 2)


def flatten_patch_tokens(tokens: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """Accept (n, N, D) with square N or (n, h, w, D); return (n, N, D) and the grid (h, w)."""
    if tokens.ndim == 4:
        n, h, w, d = tokens.shape
        return tokens.reshape(n, h * w, d), (h, w)
    if tokens.ndim == 3:
        side = math.isqrt(tokens.shape[1])
        if side * side != tokens.shape[1]:
            raise ValueError(f"cannot infer a square grid from {tokens.shape[1]} patches; pass (n, h, w, D)")
        return tokens, (side, side)
    raise ValueError(f"patch tokens must be (n, N, D) or (n, h, w, D), got {tuple(tokens.shape)}")


def fit_linear_probe(x: torch.Tensor, y: torch.Tensor, ridge: float = 1e-8) -> torch.Tensor:
    """Least-squares fit of y (M, k) from x (M, D) with intercept -> weights (D + 1, k), last row = bias.

    Solved in float64 through the normal equations with a tiny ridge relative to the mean feature variance, so
    that rank-deficient inputs (features with RASA directions removed) stay well posed.  The ridge is kept tiny
    on purpose: least squares is invariant to any invertible linear map of the features, so a direction that is
    only *shrunk* (not removed) stays decodable, and a large ridge would hide that by regularising it away.
    """
    x64 = torch.cat([x.double(), torch.ones(x.shape[0], 1, dtype=torch.float64)], dim=1)  # (M, D + 1)
    gram = x64.T @ x64  # (D + 1, D + 1)
    reg = ridge * gram.diagonal().mean().clamp_min(1e-12)
    eye = torch.eye(gram.shape[0], dtype=torch.float64)
    eye[-1, -1] = 0.0  # never shrink the intercept
    return torch.linalg.solve(gram + reg * eye, x64.T @ y.double())


def predict_linear_probe(weights: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(M, D) -> (M, k) predictions of a probe from :func:`fit_linear_probe`."""
    return x.double() @ weights[:-1] + weights[-1]


def regression_scores(pred: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """MSE and per-output R^2 of pred vs target (M, 2); ``r2`` is the mean over the outputs."""
    pred, target = pred.double(), target.double()
    ss_res = ((pred - target) ** 2).sum(0)  # (2,)
    ss_tot = ((target - target.mean(0)) ** 2).sum(0).clamp_min(1e-12)
    r2 = 1.0 - ss_res / ss_tot
    return {
        "mse": float(((pred - target) ** 2).mean()),
        "mse_baseline": float(((target - target.mean(0)) ** 2).mean()),
        "r2": float(r2.mean()),
        "r2_row": float(r2[0]),
        "r2_col": float(r2[1]),
    }


def position_variance_fraction(tokens: torch.Tensor) -> float:
    """Share of the token variance explained by the patch position: between-position / total variance.

    tokens (n, N, D) or (n, h, w, D).  Unlike the probe R^2 this is scale-sensitive: it falls when RASA only
    shrinks the position directions, which is what distance-based methods (k-NN, k-means, Hummingbird) feel.
    """
    x, _ = flatten_patch_tokens(tokens)
    x = x.double()
    mean = x.mean(dim=(0, 1))  # (D,)
    between = ((x.mean(0) - mean) ** 2).sum(-1).mean()  # per-position means (N, D)
    total = ((x - mean) ** 2).sum(-1).mean().clamp_min(1e-30)
    return float(between / total)


def position_r2(tokens: torch.Tensor, fit_tokens: torch.Tensor | None = None, ridge: float = 1e-8) -> dict[str, float]:
    """R^2 / MSE of a least-squares linear probe from patch tokens to normalised (row, col).

    tokens: (n, N, D) or (n, h, w, D), scored.  fit_tokens: the same layout, used to fit the probe (held-out
    evaluation); when None the probe is fitted on ``tokens`` itself (in-sample, fine when n * N >> D).
    """
    x, grid = flatten_patch_tokens(tokens)
    xf, grid_f = flatten_patch_tokens(fit_tokens) if fit_tokens is not None else (x, grid)
    if grid_f != grid:
        raise ValueError(f"fit tokens grid {grid_f} differs from the scored grid {grid}")
    target = position_targets(grid)  # (N, 2)
    d = x.shape[-1]
    weights = fit_linear_probe(xf.reshape(-1, d), target.repeat(xf.shape[0], 1), ridge=ridge)
    pred = predict_linear_probe(weights, x.reshape(-1, d))
    out = regression_scores(pred, target.repeat(x.shape[0], 1))
    out["pos_var_frac"] = position_variance_fraction(x)
    return out


def evaluate_position_probe(
    train_tokens: torch.Tensor,
    test_tokens: torch.Tensor,
    rasa_head: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ridge: float = 1e-8,
) -> dict:
    """Position probe fitted on train patch tokens, scored on test ones, with and without a RASA head.

    Returns {"metrics": {"r2", "mse", ...; with a head also "r2_rasa", "mse_rasa", "r2_drop"}, "details": {...}}.
    """
    plain = position_r2(test_tokens, fit_tokens=train_tokens, ridge=ridge)
    metrics = dict(plain)
    details: dict = {"grid": list(flatten_patch_tokens(test_tokens)[1]), "n_train": int(train_tokens.shape[0])}
    if rasa_head is not None:
        with torch.no_grad():
            debiased = position_r2(rasa_head(test_tokens), fit_tokens=rasa_head(train_tokens), ridge=ridge)
        metrics.update({f"{k}_rasa": v for k, v in debiased.items()})
        metrics["r2_drop"] = (plain["r2"] - debiased["r2"]) / max(abs(plain["r2"]), 1e-12)
    logger.info("position probe: %s", {k: round(v, 4) for k, v in metrics.items()})
    return {"metrics": metrics, "details": details}
