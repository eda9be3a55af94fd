"""Matryoshka DINO (CLS) loss of Franca (spec 2.3), summed over levels with weight 1.0.

CE(t, s) = -sum_k t_k log softmax(s / tau_s)_k with tau_s = 0.1. With n_g = 2 global and n_l local crops and the
denominator n_terms = n_g (n_g - 1) + max(n_g n_l, 1) (18 for 2 + 8 crops; the max(., 1) is the official code's):

* local:  L_local  = (1/n_terms) sum_l sum_{j local} sum_{g global} mean_b CE(t^l_{g,b}, s^l_{j,b});
* global: L_global = (n_g/n_terms) sum_l mean_{n_g B} CE(t^l_swapped, s^l_global), the teacher targets being in
  swapped crop order [crop 2; crop 1] so that each student crop meets the other crop's target. For n_g = 2 this is
  (1/n_terms) times the sum over the two cross-view pairs of the per-pair mean.

Inputs are per-level sequences (one tensor per level), crop-major: student local (n_l B, K_l), student global
(n_g B, K_l), teacher targets (n_g B, K_l).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MRLDINOLoss", "dino_loss_terms"]


def dino_loss_terms(n_global_crops: int, n_local_crops: int) -> int:
    """n_g (n_g - 1) + max(n_g n_l, 1): 18 for 2 global and 8 local crops."""
    return n_global_crops * (n_global_crops - 1) + max(n_global_crops * n_local_crops, 1)


class MRLDINOLoss(nn.Module):
    """Cross-entropy between Sinkhorn-Knopp teacher targets and student logits, per level (spec 2.3)."""

    def __init__(self, student_temp: float = 0.1) -> None:
        super().__init__()
        self.student_temp = student_temp

    def log_probs(self, student_logits: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(student_logits.float() / self.student_temp, dim=-1)

    def local_level(self, student_local: torch.Tensor, targets: torch.Tensor, n_local_crops: int) -> torch.Tensor:
        """sum_j sum_g mean_b CE for one level: local logits (n_l B, K), targets (n_g B, K)."""
        b = student_local.shape[0] // n_local_crops
        lsm = self.log_probs(student_local).reshape(n_local_crops, b, -1)  # (n_l, B, K)
        t = targets.float().reshape(-1, b, targets.shape[-1])  # (n_g, B, K)
        ce = -torch.einsum("gbk,jbk->gjb", t, lsm)  # (n_g, n_l, B)
        return ce.mean(dim=-1).sum()

    def global_level(self, student_global: torch.Tensor, targets_swapped: torch.Tensor) -> torch.Tensor:
        """mean over the n_g B rows of CE(aligned target, student) for one level."""
        return -(targets_swapped.float() * self.log_probs(student_global)).sum(dim=-1).mean()

    def forward(
        self,
        student_global: Sequence[torch.Tensor],
        student_local: Sequence[torch.Tensor] | None,
        targets_swapped: Sequence[torch.Tensor],
        n_local_crops: int,
        n_global_crops: int = 2,
    ) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        """{"local", "global": scalars; "local_levels", "global_levels": per-level lists}, all / n_terms."""
        if len(student_global) != len(targets_swapped):
            raise ValueError(f"{len(student_global)} student levels but {len(targets_swapped)} target levels")
        n_terms = dino_loss_terms(n_global_crops, n_local_crops)
        global_levels = [
            self.global_level(s, t) * n_global_crops / n_terms
            for s, t in zip(student_global, targets_swapped, strict=True)
        ]
        if n_local_crops > 0:
            if student_local is None or len(student_local) != len(targets_swapped):
                raise ValueError("student local logits must have one tensor per level when n_local_crops > 0")
            local_levels = [
                self.local_level(s, t, n_local_crops) / n_terms
                for s, t in zip(student_local, targets_swapped, strict=True)
            ]
        else:
            local_levels = [torch.zeros((), device=t.device) for t in targets_swapped]
        return {
            "local": torch.stack(local_levels).sum(),
            "global": torch.stack(global_levels).sum(),
            "local_levels": local_levels,
            "global_levels": global_levels,
        }
