"""Iterative RASA training on frozen patch tokens (spec section 5; official experiments/train_rasa.py).

Round r (r = 0 .. R-1):
  * input  x_r = tokens with the r earlier directions removed (fixed for the round, computed once);
  * model  pos_pred = Linear(D -> 2, bias=False) with PyTorch's default init, then a sigmoid;
  * target (row / (n - 1), col / (n - 1)) of every patch, identical for every image;
  * loss   MSE; AdamW(lr, weight_decay=0); cosine schedule from lr to 0 over the round's steps;
  * steps  ``epochs`` passes over the images in shuffled mini-batches of ``batch_size`` images (each image
           contributes its N patches);
  * then   the trained (2, D) weight is appended to the head.

After R rounds the head holds R projections; with ``use_pos_pred=True`` (faithful) all R are applied at inference.

Orthogonality (``orthogonalize``, default False = faithful).  Round r's regressor only ever sees tokens with the
earlier planes removed, so the components of its weight along those planes are never fitted: they are what the
default init and AdamW's per-coordinate steps leave there.  Removing that weight's plane is then not an orthogonal
projection inside the remaining subspace: generically (I - P_r) is injective on it, so from round 1 on the rounds
*shrink* the residual position directions instead of removing them.  Least-squares decodability (invariant to
invertible linear maps) then stops falling after round 0, while the scale-sensitive numbers (the sigmoid
regressor's MSE, the position share of the variance, k-means, k-NN) keep falling.  ``orthogonalize=True`` drops
those unfitted components before storing the weight; the regressor's predictions on its training input are
unchanged, and each round then removes two more dimensions outright.

The official run trains on augmented crops (spec 5: RandomResizedCrop, jitter, flips, rotations) of VOC; this
module trains on whatever token tensor it is given, so augmentation happens at feature extraction
(``franca.rasa.data``).  With the faithful lr 2e-4 the regressor moves at most about lr per step per coordinate
(AdamW), so a tiny run needs enough steps (``epochs``) for the learned weight to dominate its random init; the
per-round report measures whether it did.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from franca.eval.position_probe import flatten_patch_tokens, position_targets
from franca.rasa.rasa_head import RASAHead
from franca.rasa.report import round_report

logger = logging.getLogger(__name__)

__all__ = ["RASATrainConfig", "train_rasa_round", "train_rasa", "train_rasa_from_config", "closed_form_rasa"]


@dataclass
class RASATrainConfig:
    """Faithful defaults from rasa_franca.yml (spec 5)."""

    rounds: int = 9
    epochs: int = 5
    batch_size: int = 128
    lr: float = 2e-4
    weight_decay: float = 0.0
    seed: int = 400
    use_pos_pred: bool = True
    orthogonalize: bool = False


def train_rasa_round(
    x: torch.Tensor,
    target: torch.Tensor,
    epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    generator: torch.Generator,
) -> tuple[torch.Tensor, list[float]]:
    """Train one sigmoid position regressor on x (n_img, N, D) with targets (N, 2) -> (weight (2, D), losses)."""
    n_img, _, dim = x.shape
    pos_pred = nn.Linear(dim, 2, bias=False)  # default nn.Linear init, as the official fresh pos_pred
    steps_per_epoch = math.ceil(n_img / batch_size)
    total_steps = max(1, epochs * steps_per_epoch)
    optim = torch.optim.AdamW(pos_pred.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda s: 0.5 * (1.0 + math.cos(math.pi * s / total_steps)))
    losses: list[float] = []
    for _ in range(epochs):
        order = torch.randperm(n_img, generator=generator)
        for start in range(0, n_img, batch_size):
            xb = x[order[start : start + batch_size]]  # (b, N, D)
            pred = torch.sigmoid(pos_pred(xb))  # (b, N, 2)
            loss = torch.mean((pred - target) ** 2)
            optim.zero_grad(set_to_none=True)
            loss.backward()
            optim.step()
            sched.step()
            losses.append(float(loss.detach()))
    return pos_pred.weight.detach().clone(), losses


def train_rasa(
    patch_tokens: torch.Tensor,
    grid: int | tuple[int, int] | None = None,
    rounds: int = 9,
    epochs: int = 5,
    batch_size: int = 128,
    lr: float = 2e-4,
    seed: int = 400,
    weight_decay: float = 0.0,
    use_pos_pred: bool = True,
    eval_tokens: torch.Tensor | None = None,
    orthogonalize: bool = False,
) -> tuple[RASAHead, list[dict]]:
    """Train a RASA head on frozen patch tokens (n_img, N, D) or (n_img, h, w, D).

    grid: checked against the token layout when given.  eval_tokens: held-out tokens for the per-round report
    (the least-squares probes are then fitted on ``patch_tokens`` and scored on ``eval_tokens``); default: the
    training tokens, in-sample.  Returns (head, reports), one report dict per round (see ``round_report``).
    """
    x, grid_hw = flatten_patch_tokens(patch_tokens.detach().float())
    if grid is not None and tuple((grid, grid) if isinstance(grid, int) else grid) != grid_hw:
        raise ValueError(f"grid {grid} does not match the token layout {grid_hw} of shape {tuple(patch_tokens.shape)}")
    x_eval = flatten_patch_tokens(eval_tokens.detach().float())[0] if eval_tokens is not None else None
    target = position_targets(grid_hw)  # (N, 2)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # the default nn.Linear init of each round's pos_pred
    head = RASAHead(x.shape[-1], use_pos_pred=use_pos_pred)
    reports: list[dict] = []
    for r in range(rounds):
        with torch.no_grad():
            x_round = head(x, use_pos_pred=True)  # (n_img, N, D), all earlier directions removed
        weight, losses = train_rasa_round(x_round, target, epochs, batch_size, lr, weight_decay, generator)
        if orthogonalize and head.n_projections:
            basis = head.removed_basis(use_pos_pred=True)  # (r, D) orthonormal
            weight = weight - (weight @ basis.T) @ basis
        head.add_projection(weight)
        report = round_report(head, weight, x, target, x_eval=x_eval)
        report.update({"round": r, "steps": len(losses), "train_loss_first": losses[0], "train_loss_last": losses[-1]})
        reports.append(report)
        logger.info(
            "RASA round %d: pred mse %.5f, probe r2 x %.3f / x_pos %.3f / x_no_pos %.3f, cos(x_no_pos, x) %.3f",
            r,
            report["pred_mse_x_round"],
            report["r2_x"],
            report["r2_x_pos"],
            report["r2_x_no_pos"],
            report["cos_x_no_pos_x"],
        )
    return head, reports


_CONFIG_KEYS = ("rounds", "epochs", "batch_size", "lr", "seed", "weight_decay", "use_pos_pred", "orthogonalize")


def train_rasa_from_config(
    patch_tokens: torch.Tensor, rasa_cfg: Mapping, eval_tokens: torch.Tensor | None = None
) -> tuple[RASAHead, list[dict]]:
    """:func:`train_rasa` with the keys of a ``rasa`` config section (config/rasa/*.yaml), as the rasa stage runs it."""
    missing = [k for k in _CONFIG_KEYS if k not in rasa_cfg]
    if missing:
        raise KeyError(f"rasa config is missing the key(s) {missing} (config/rasa/)")
    return train_rasa(patch_tokens, eval_tokens=eval_tokens, **{k: rasa_cfg[k] for k in _CONFIG_KEYS})


def closed_form_rasa(
    patch_tokens: torch.Tensor, rounds: int = 9, ridge: float = 1e-8, use_pos_pred: bool = True
) -> RASAHead:
    """Closed-form check of RASA: each round removes the span of the least-squares position regressor.

    Round r fits (row, col) ~ x_r W + b by least squares on the features with the earlier spans removed and appends
    the two columns of W as the next (2, D) projection.  This is the linear, optimiser-free analogue of the sigmoid
    regressor.  The least-squares weight of features with the earlier planes removed has (up to the tiny ridge) no
    component along them, so these rounds are orthogonal and each removes two dimensions.
    """
    from franca.eval.position_probe import fit_linear_probe

    x, grid_hw = flatten_patch_tokens(patch_tokens.detach().float())
    target = position_targets(grid_hw).repeat(x.shape[0], 1)  # (n_img * N, 2)
    head = RASAHead(x.shape[-1], use_pos_pred=use_pos_pred)
    for _ in range(rounds):
        with torch.no_grad():
            x_round = head(x, use_pos_pred=True).reshape(-1, x.shape[-1])
        weights = fit_linear_probe(x_round, target, ridge=ridge)  # (D + 1, 2)
        head.add_projection(weights[:-1].T.float())
    return head
