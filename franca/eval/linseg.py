"""Linear semantic segmentation on frozen patch tokens (spec 7.5; the protocol is inferred, not in the repo).

A 1x1 linear classifier (Linear(D -> C) per patch) on the final-norm patch tokens; its (C, h, w) logits are
bilinearly upsampled (align_corners False) to the mask size and trained with cross-entropy (255 ignored).
Tokens are standardised with the train mean / std per channel first (``standardize=True``), the fixed-statistics
analogue of the BatchNorm in DINOv2's linear ("BNHead") segmentation head.  Optimiser: AdamW, cosine to 0.
Evaluation: argmax of the upsampled logits, mIoU with 255 ignored.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

from franca.eval.miou import confusion_matrix, segmentation_scores

logger = logging.getLogger(__name__)

__all__ = ["LinearSegHead", "train_linseg", "linseg_eval"]


class LinearSegHead(nn.Module):
    """Per-patch linear classifier: (n, h, w, D) tokens -> (n, C, H, W) logits upsampled to ``size``."""

    def __init__(
        self, embed_dim: int, num_classes: int, mean: torch.Tensor | None = None, std: torch.Tensor | None = None
    ):
        super().__init__()
        self.register_buffer("mean", torch.zeros(embed_dim) if mean is None else mean.clone())
        self.register_buffer("std", torch.ones(embed_dim) if std is None else std.clone())
        self.classifier = nn.Linear(embed_dim, num_classes)

    def forward(self, tokens: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        logits = self.classifier((tokens.float() - self.mean) / self.std)  # (n, h, w, C)
        return F.interpolate(logits.permute(0, 3, 1, 2), size=size, mode="bilinear", align_corners=False)


def train_linseg(
    tokens: torch.Tensor,
    segs: torch.Tensor,
    num_classes: int,
    epochs: int = 20,
    batch_size: int = 16,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    standardize: bool = True,
    ignore_index: int = 255,
    seed: int = 0,
) -> LinearSegHead:
    """Fit a LinearSegHead on (n, h, w, D) tokens and (n, H, W) masks."""
    torch.manual_seed(seed)
    dim = tokens.shape[-1]
    flat = tokens.reshape(-1, dim).float()
    mean, std = (flat.mean(0), flat.std(0).clamp_min(1e-6)) if standardize else (None, None)
    head = LinearSegHead(dim, num_classes, mean, std)
    segs = segs.long()
    size = tuple(segs.shape[1:])
    n = tokens.shape[0]
    optim = torch.optim.AdamW(head.classifier.parameters(), lr=lr, weight_decay=weight_decay)
    total = max(1, epochs * math.ceil(n / batch_size))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(optim, T_max=total, eta_min=0.0)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            loss = F.cross_entropy(head(tokens[idx], size), segs[idx], ignore_index=ignore_index)
            optim.zero_grad(set_to_none=True)
            loss.backward()
            optim.step()
            sched.step()
    return head


@torch.no_grad()
def _predict(head: LinearSegHead, tokens: torch.Tensor, size: tuple[int, int], batch_size: int) -> torch.Tensor:
    return torch.cat([head(tokens[i : i + batch_size], size).argmax(1) for i in range(0, tokens.shape[0], batch_size)])


def linseg_eval(
    train_tokens: torch.Tensor,
    train_segs: torch.Tensor,
    val_tokens: torch.Tensor,
    val_segs: torch.Tensor,
    num_classes: int,
    epochs: int = 20,
    batch_size: int = 16,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    standardize: bool = True,
    ignore_index: int = 255,
    seed: int = 0,
) -> dict:
    """Linear segmentation mIoU -> {"metrics": {miou, pixel_acc, train_miou}, "details": {per_class_iou, ...}}."""
    train_segs, val_segs = torch.as_tensor(train_segs), torch.as_tensor(val_segs)
    head = train_linseg(
        train_tokens, train_segs, num_classes, epochs, batch_size, lr, weight_decay, standardize, ignore_index, seed
    )
    pred = _predict(head, val_tokens, tuple(val_segs.shape[1:]), batch_size)
    scores = segmentation_scores(confusion_matrix(pred, val_segs, num_classes, ignore_index))
    train_pred = _predict(head, train_tokens, tuple(train_segs.shape[1:]), batch_size)
    train_scores = segmentation_scores(confusion_matrix(train_pred, train_segs, num_classes, ignore_index))
    metrics = {"miou": scores["miou"], "pixel_acc": scores["pixel_acc"], "train_miou": train_scores["miou"]}
    details = {"per_class_iou": scores["per_class_iou"], "epochs": epochs, "lr": lr, "standardize": standardize}
    logger.info("linear segmentation: %s", metrics)
    return {"metrics": metrics, "details": details}
