"""SwiGLU feed-forward network (``ffn_layer: swiglufused`` of the official configs, spec 1.1)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SwiGLUFFN", "swiglu_hidden_dim"]


def swiglu_hidden_dim(dim: int, mlp_ratio: float = 4.0) -> int:
    """h = ((int(4D * 2/3) + 7) // 8) * 8: 2048 for D=768, 2736 for D=1024, 4096 for D=1536."""
    hidden = int(dim * mlp_ratio)
    return ((int(hidden * 2 / 3) + 7) // 8) * 8


class SwiGLUFFN(nn.Module):
    """Packed ``w12`` Linear(D, 2h) -> silu(x1) * x2 -> ``w3`` Linear(h, D); the unfused form of the official one.

    The state-dict keys (``w12``, ``w3``) are those of the official ``SwiGLUFFNFused``.
    """

    def __init__(self, dim: int, mlp_ratio: float = 4.0, bias: bool = True) -> None:
        super().__init__()
        self.hidden_features = swiglu_hidden_dim(dim, mlp_ratio)
        self.w12 = nn.Linear(dim, 2 * self.hidden_features, bias=bias)
        self.w3 = nn.Linear(self.hidden_features, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = self.w12(x).chunk(2, dim=-1)  # (..., h) each
        return self.w3(F.silu(x1) * x2)
