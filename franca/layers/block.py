"""Pre-norm transformer block of the DINOv2-style ViT (spec 1.1).

x = x + DropPath(LS1(Attn(LN1(x)))); x = x + DropPath(LS2(FFN(LN2(x)))), LayerNorm eps 1e-6, LayerScale on both
residuals. The two residuals draw their drop masks independently (``drop_path1`` / ``drop_path2``, same rate).
"""

from __future__ import annotations

import torch
from torch import nn

from franca.layers.attention import Attention
from franca.layers.drop_path import DROP_PATH_MODES, DropPath, batch_subset_residual
from franca.layers.layer_scale import LayerScale
from franca.layers.mlp import Mlp
from franca.layers.swiglu_ffn import SwiGLUFFN

__all__ = ["FFN_LAYERS", "Block"]

# "swiglufused" is the official config's name; the maths is the same unfused.
FFN_LAYERS = {"mlp": Mlp, "swiglu": SwiGLUFFN, "swiglufused": SwiGLUFFN}


class Block(nn.Module):
    """One ViT block; ``layerscale`` None or 0 turns LayerScale off (identity), as in DINOv2."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        ffn_layer: str = "mlp",
        qkv_bias: bool = True,
        proj_bias: bool = True,
        ffn_bias: bool = True,
        drop_path: float = 0.0,
        drop_path_mode: str = "per_sample",
        layerscale: float | None = 1e-5,
        attn_impl: str = "sdpa",
    ) -> None:
        super().__init__()
        if ffn_layer not in FFN_LAYERS:
            raise ValueError(f"model.ffn_layer must be one of {sorted(FFN_LAYERS)}, got {ffn_layer!r}")
        if drop_path_mode not in DROP_PATH_MODES:
            raise ValueError(f"model.drop_path_mode must be one of {DROP_PATH_MODES}, got {drop_path_mode!r}")
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, proj_bias=proj_bias, attn_impl=attn_impl)
        self.ls1 = LayerScale(dim, layerscale) if layerscale else nn.Identity()
        self.drop_path1 = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = FFN_LAYERS[ffn_layer](dim, mlp_ratio=mlp_ratio, bias=ffn_bias)
        self.ls2 = LayerScale(dim, layerscale) if layerscale else nn.Identity()
        self.drop_path2 = DropPath(drop_path)
        self.drop_path_rate = float(drop_path)
        self.drop_path_mode = drop_path_mode

    def attn_residual(self, x: torch.Tensor) -> torch.Tensor:
        return self.ls1(self.attn(self.norm1(x)))

    def ffn_residual(self, x: torch.Tensor) -> torch.Tensor:
        return self.ls2(self.mlp(self.norm2(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, D) -> (B, N, D)
        if self.training and self.drop_path_rate > 0 and self.drop_path_mode == "batch_subset":
            x = batch_subset_residual(x, self.attn_residual, self.drop_path_rate)
            return batch_subset_residual(x, self.ffn_residual, self.drop_path_rate)
        x = x + self.drop_path1(self.attn_residual(x))
        return x + self.drop_path2(self.ffn_residual(x))
