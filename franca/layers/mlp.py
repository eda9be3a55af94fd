"""Plain GELU MLP feed-forward network (``ffn_layer: mlp``, the DINOv2 default; spec 1.1)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["Mlp"]


class Mlp(nn.Module):
    """fc1 Linear(D, 4D) -> GELU -> fc2 Linear(4D, D); key names as in DINOv2."""

    def __init__(self, dim: int, mlp_ratio: float = 4.0, bias: bool = True) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))
