"""Matryoshka iBOT masked-patch loss of Franca (spec 2.2 iBOT targets, 2.3 loss; quirks Q3, Q4).

L_ibot = sum_l [ sum_{p masked} w_p CE(t^l_p, s^l_p) ] / (2 B_g), w_p = 1 / (#masked patches of p's image); images
without a mask still count in the 2 B_g denominator. (The official factors loss_scales = 2 and 1/2 cancel.)

Teacher targets (``teacher_targets``): the teacher head runs on the masked teacher patch tokens and Sinkhorn-Knopp
(iBOT variant) runs per level. Quirk Q3, ``sk_padding_rows``: the official code slices the head's *tuple* output,
so each level keeps ``upperbound`` rows, the n_masked real rows followed by (upperbound - n_masked) rows of the head
applied to zero features, and Sinkhorn-Knopp sees them all (they take part of every prototype's mass). True
(faithful) reproduces this; False runs Sinkhorn-Knopp on the real rows only. Either way only the real rows are
returned and enter the loss. B_tot (all-reduced masked count) is computed once by the caller (Q4).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from franca.loss.sinkhorn_knopp import SinkhornKnopp

__all__ = ["MRLiBOTPatchLoss"]


class MRLiBOTPatchLoss(nn.Module):
    """Weighted cross-entropy on masked patches, per level, and the padded Sinkhorn-Knopp targets."""

    def __init__(self, student_temp: float = 0.1, sk_padding_rows: bool = True) -> None:
        super().__init__()
        self.student_temp = student_temp
        self.sk_padding_rows = sk_padding_rows

    @torch.no_grad()
    def teacher_targets(
        self,
        head: Callable[[torch.Tensor], Sequence[torch.Tensor]],
        masked_tokens: torch.Tensor,
        upperbound: int,
        teacher_temp: float,
        sinkhorn: SinkhornKnopp,
        n_masked_total: torch.Tensor | float,
    ) -> list[torch.Tensor]:
        """Per-level targets (M, K_l) for the M masked teacher patch tokens (M, D)."""
        n_masked = masked_tokens.shape[0]
        if self.sk_padding_rows:
            if upperbound < n_masked:
                raise ValueError(f"batch 'upperbound' {upperbound} is below the {n_masked} masked patches")
            buffer = masked_tokens.new_zeros(upperbound, masked_tokens.shape[-1])  # (upperbound, D)
            buffer[:n_masked] = masked_tokens
            masked_tokens = buffer
        logits = head(masked_tokens)  # per level (rows, K_l)
        return [sinkhorn.ibot_targets(z, teacher_temp, n_masked_total)[:n_masked] for z in logits]

    def level_loss(
        self, student_logits: torch.Tensor, targets: torch.Tensor, masks_weight: torch.Tensor, n_images: int
    ) -> torch.Tensor:
        """sum_p w_p CE(t_p, s_p) / n_images for one level; logits and targets (M, K), weights (M,)."""
        lsm = F.log_softmax(student_logits.float() / self.student_temp, dim=-1)
        ce = -(targets.float() * lsm).sum(dim=-1)  # (M,)
        return (ce * masks_weight.float()).sum() / n_images

    def forward(
        self,
        student_levels: Sequence[torch.Tensor],
        target_levels: Sequence[torch.Tensor],
        masks_weight: torch.Tensor,
        n_images: int,
    ) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        """{"loss": sum over levels, "levels": per-level list}; n_images = 2 B_g (all global crops)."""
        if len(student_levels) != len(target_levels):
            raise ValueError(f"{len(student_levels)} student levels but {len(target_levels)} target levels")
        levels = [
            self.level_loss(s, t, masks_weight, n_images) for s, t in zip(student_levels, target_levels, strict=True)
        ]
        return {"loss": torch.stack(levels).sum(), "levels": levels}
