"""Per-round RASA report (spec section 5, "RASA evaluation" items 1-3 and 5).

For the head after round r (all r + 1 projections applied) and tokens x:
  x_no_pos = head(x), x_pos = x - x_no_pos (the total removed component).
Reported, each for x, x_pos and x_no_pos:
  * ``pred_mse_*``: MSE of the round's sigmoid regressor sigmoid(v W_r^T) to the targets (the official numbers);
  * ``probe_mse_*`` / ``r2_*``: MSE and R^2 of a fresh least-squares linear probe (with intercept), i.e. whether
    position is still *linearly decodable* by any linear map, not just by this round's regressor;
  * ``pos_var_frac_*``: the share of the token variance explained by position (scale-sensitive);
plus ``pred_mse_x_round`` (the regressor on its own training input: tokens with the earlier directions removed),
``mse_baseline`` (an uninformative predictor: the target variance), ``cos_x_no_pos_x`` and ``cos_x_pos_x`` (mean
per-token cosine to x), and ``removed_dims`` (see ``removed_energy_dims``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from franca.eval.position_probe import (
    fit_linear_probe,
    position_variance_fraction,
    predict_linear_probe,
    regression_scores,
)
from franca.rasa.rasa_head import RASAHead

__all__ = ["round_report", "removed_energy_dims"]


def removed_energy_dims(head: RASAHead) -> float:
    """D - ||M||_F^2 for the head's linear map M: the number of removed dimensions.

    Exact (an integer) when the removed planes are mutually orthogonal; when a later plane is not orthogonal to
    the earlier ones (its random init leaves components along them) the composed map is not a projection and only
    shrinks some directions, and this counts the lost energy instead of a rank that would not drop.
    """
    with torch.no_grad():
        mapped = head(torch.eye(head.embed_dim))  # (D, D), row i = M e_i
    return float(head.embed_dim - (mapped.double() ** 2).sum())


def _sigmoid_mse(weight: torch.Tensor, v: torch.Tensor, target: torch.Tensor) -> float:
    return float(torch.mean((torch.sigmoid(v @ weight.T) - target) ** 2))


def round_report(
    head: RASAHead,
    weight: torch.Tensor,
    x: torch.Tensor,
    target: torch.Tensor,
    x_eval: torch.Tensor | None = None,
    ridge: float = 1e-8,
) -> dict:
    """Report for ``head`` (with this round's ``weight`` (2, D) as its last projection).

    x: (n, N, D) tokens the probes are fitted on; x_eval: (m, N, D) tokens they are scored on (default x);
    target: (N, 2) normalised positions.
    """
    x_eval = x if x_eval is None else x_eval
    dim = x.shape[-1]
    with torch.no_grad():
        variants_fit = dict(zip(("x_pos", "x_no_pos"), head.decompose(x, use_pos_pred=True), strict=True))
        variants_fit["x"] = x
        variants_eval = dict(zip(("x_pos", "x_no_pos"), head.decompose(x_eval, use_pos_pred=True), strict=True))
        variants_eval["x"] = x_eval
        # input of this round's regressor: all projections but the last one
        x_round = head.decompose(x_eval, use_pos_pred=False)[1] if head.n_projections > 1 else x_eval
    tgt_fit = target.repeat(x.shape[0], 1)  # (n * N, 2)
    tgt_eval = target.repeat(x_eval.shape[0], 1)
    out: dict = {"pred_mse_x_round": _sigmoid_mse(weight, x_round, target)}
    for name in ("x", "x_pos", "x_no_pos"):
        probe = fit_linear_probe(variants_fit[name].reshape(-1, dim), tgt_fit, ridge=ridge)
        scores = regression_scores(predict_linear_probe(probe, variants_eval[name].reshape(-1, dim)), tgt_eval)
        out[f"probe_mse_{name}"] = scores["mse"]
        out[f"r2_{name}"] = scores["r2"]
        out[f"pred_mse_{name}"] = _sigmoid_mse(weight, variants_eval[name], target)
        out[f"pos_var_frac_{name}"] = position_variance_fraction(variants_eval[name])
        out["mse_baseline"] = scores["mse_baseline"]
    out["cos_x_no_pos_x"] = float(F.cosine_similarity(variants_eval["x_no_pos"], x_eval, dim=-1).mean())
    out["cos_x_pos_x"] = float(F.cosine_similarity(variants_eval["x_pos"], x_eval, dim=-1).mean())
    out["removed_dims"] = removed_energy_dims(head)
    return out
