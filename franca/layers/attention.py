"""Multi-head self-attention of the ViT block (spec 1.1).

Two numerically equivalent paths, selected by ``attn_impl``: ``"sdpa"`` calls
``torch.nn.functional.scaled_dot_product_attention`` (the fused kernel; it replaces xFormers' memory-efficient
attention of the official code), ``"explicit"`` computes softmax(q k^T / sqrt(d_h)) v step by step as a reference.
There is no attention or projection dropout in any Franca config.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ATTN_IMPLS", "Attention"]

ATTN_IMPLS = ("sdpa", "explicit")


class Attention(nn.Module):
    """qkv Linear(D, 3D) -> per-head attention -> proj Linear(D, D); both Linears with bias by default."""

    def __init__(
        self, dim: int, num_heads: int, qkv_bias: bool = True, proj_bias: bool = True, attn_impl: str = "sdpa"
    ) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"embed dim {dim} is not divisible by num_heads {num_heads}")
        if attn_impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {attn_impl!r}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.attn_impl = attn_impl
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)

    def attend(self, qkv: torch.Tensor) -> torch.Tensor:
        """Per-head attention of one group of equal-length sequences: qkv (B, N, 3D) -> (B, N, D), before proj."""
        b, n, d3 = qkv.shape
        qkv = qkv.reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, H, N, d_h)
        if self.attn_impl == "sdpa":
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)  # (B, H, N, N)
            out = attn.softmax(dim=-1) @ v
        return out.transpose(1, 2).reshape(b, n, d3 // 3)  # (B, N, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.attend(self.qkv(x)))
