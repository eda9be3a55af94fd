"""Pre-norm transformer block of the DINOv2-style ViT (spec 1.1).

x = x + DropPath(LS1(Attn(LN1(x)))); x = x + DropPath(LS2(FFN(LN2(x)))), LayerNorm eps 1e-6, LayerScale on both
residuals. The two residuals draw their drop masks independently (``drop_path1`` / ``drop_path2``, same rate).

``forward`` also takes a list of token tensors of different lengths (the crops of each resolution, DINOv2's nested
multi-crop pass): every token-wise op (LayerNorms, qkv, proj, FFN, LayerScale) runs once on all tokens of all groups
concatenated, attention runs per group. Same maths as one call per group; the drop-path draws are passed in
(:meth:`Block.draw_drop`), so the caller can draw them in the per-group order and reproduce that path exactly.
"""

from __future__ import annotations

import torch
from torch import nn

from franca.layers.attention import Attention
from franca.layers.drop_path import DROP_PATH_MODES, DropPath, batch_subset_residual, subset_size
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

    def forward(self, x: torch.Tensor | list[torch.Tensor], drops: list | None = None):
        """(B, N, D) -> (B, N, D); a list of (B_g, N_g, D) -> the list, packed (``drops``: see forward_packed)."""
        if isinstance(x, (list, tuple)):
            return self.forward_packed(list(x), drops)
        if self.training and self.drop_path_rate > 0 and self.drop_path_mode == "batch_subset":
            x = batch_subset_residual(x, self.attn_residual, self.drop_path_rate)
            return batch_subset_residual(x, self.ffn_residual, self.drop_path_rate)
        x = x + self.drop_path1(self.attn_residual(x))
        return x + self.drop_path2(self.ffn_residual(x))

    def draw_drop(self, b: int, like: torch.Tensor) -> torch.Tensor | None:
        """The random draw one residual of a (b, N, D) input makes in ``forward``, in the same call (so the same RNG
        stream): a keep mask (b, 1, 1) (per_sample), subset indices (batch_subset), or None (no drop path)."""
        if not self.training or self.drop_path_rate == 0:
            return None
        if self.drop_path_mode == "batch_subset":
            return torch.randperm(b, device=like.device)[: subset_size(b, self.drop_path_rate)]
        return like.new_empty((b, 1, 1)).bernoulli_(1.0 - self.drop_path_rate)

    def forward_packed(self, xs: list[torch.Tensor], drops: list | None = None) -> list[torch.Tensor]:
        """Groups xs[g] (B_g, N_g, D) through the block at once; ``drops[g]`` = (attn draw, ffn draw) of group g
        from :meth:`draw_drop` (None: no drop path, which is also what eval mode and rate 0 draw)."""
        drops = drops if drops is not None else [(None, None)] * len(xs)
        xs = self._packed_residual(xs, self._packed_attn, [d[0] for d in drops])
        return self._packed_residual(xs, self._packed_ffn, [d[1] for d in drops])

    def _packed_residual(self, xs: list, residual_fn, draws: list) -> list[torch.Tensor]:
        """x + residual per group, with each group's drop path applied exactly as ``forward`` applies it."""
        if self.drop_path_mode == "batch_subset" and draws[0] is not None:
            residuals = residual_fn([x[idx] for x, idx in zip(xs, draws, strict=True)])  # (subset_g, N_g, D)
            return [
                torch.index_add(x, 0, idx, r.to(x.dtype), alpha=x.shape[0] / idx.numel())
                for x, idx, r in zip(xs, draws, residuals, strict=True)
            ]
        residuals = residual_fn(xs)
        keep = 1.0 - self.drop_path_rate
        return [
            x + (r if mask is None else r * mask / keep)  # drop_path's arithmetic
            for x, r, mask in zip(xs, residuals, draws, strict=True)
        ]

    def _packed_attn(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        sizes = [x.shape[0] * x.shape[1] for x in xs]
        qkv = self.attn.qkv(self.norm1(torch.cat([x.flatten(0, 1) for x in xs])))  # (T, 3D), T = sum B_g N_g
        parts = zip(qkv.split(sizes), xs, strict=True)
        heads = [self.attn.attend(part.view(x.shape[0], x.shape[1], -1)).flatten(0, 1) for part, x in parts]
        out = self.ls1(self.attn.proj(torch.cat(heads)))  # (T, D)
        return [o.view(x.shape[0], x.shape[1], -1) for o, x in zip(out.split(sizes), xs, strict=True)]

    def _packed_ffn(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        sizes = [x.shape[0] * x.shape[1] for x in xs]
        out = self.ls2(self.mlp(self.norm2(torch.cat([x.flatten(0, 1) for x in xs]))))  # (T, D)
        return [o.view(x.shape[0], x.shape[1], -1) for o, x in zip(out.split(sizes), xs, strict=True)]
