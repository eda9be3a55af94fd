"""LayerScale (spec 1.1): a learned per-channel gain on each residual branch, initialised to 1e-5."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["LayerScale"]


class LayerScale(nn.Module):
    """x -> gamma * x with gamma of shape (D,) filled with ``init_values``; the name ``gamma`` marks it for no wd."""

    def __init__(self, dim: int, init_values: float = 1e-5) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma
