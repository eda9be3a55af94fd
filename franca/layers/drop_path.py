"""Stochastic depth (spec 1.1 and quirk Q10).

``DropPath`` is the per-sample form: each sample's residual is kept with probability 1 - p and rescaled by
1 / (1 - p), so its expectation equals the residual. ``batch_subset_residual`` is DINOv2's batch-subset form used by
the official training path: the residual is computed for a random subset of floor(b (1 - p)) samples only and added
scaled by b / subset. Both have the same expectation; Q10 picks the per-sample form as the default.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

__all__ = ["DROP_PATH_MODES", "DropPath", "batch_subset_residual", "drop_path", "subset_size"]

DROP_PATH_MODES = ("per_sample", "batch_subset")


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Zero whole samples of x (B, ...) with probability p and rescale the kept ones by 1 / (1 - p)."""
    if p == 0.0 or not training:
        return x
    keep = 1.0 - p
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    mask = x.new_empty(shape).bernoulli_(keep)
    return x * mask / keep


class DropPath(nn.Module):
    """Per-sample stochastic depth with rate ``drop_prob``; identity in eval mode or at rate 0."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= drop_prob < 1.0:
            raise ValueError(f"drop path rate must be in [0, 1), got {drop_prob}")
        self.drop_prob = float(drop_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.drop_prob, self.training)

    def extra_repr(self) -> str:
        return f"p={self.drop_prob}"


def subset_size(b: int, p: float) -> int:
    """floor(b (1 - p)) samples, at least one."""
    return max(int(b * (1 - p)), 1)


def batch_subset_residual(
    x: torch.Tensor, residual_fn: Callable[[torch.Tensor], torch.Tensor], p: float
) -> torch.Tensor:
    """x + residual on a random subset of floor(b (1 - p)) samples, scaled by b / subset (DINOv2's form)."""
    b = x.shape[0]
    subset = subset_size(b, p)
    idx = torch.randperm(b, device=x.device)[:subset]
    residual = residual_fn(x[idx])  # (subset, N, D)
    return torch.index_add(x, 0, idx, residual.to(x.dtype), alpha=b / subset)
