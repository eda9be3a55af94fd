"""DINOv2-style Vision Transformer used by Franca (spec 1.1).

[CLS] + patch tokens, no register tokens, a learned absolute position embedding built for ``img_size`` and resized
bicubically at run time (DINO's offset trick), a mask token that replaces masked patch embeddings before the
position embedding is added, pre-norm blocks with LayerScale, and a final LayerNorm on all tokens.

The official code batches crops of two resolutions into one xFormers "nested" sequence with a block-diagonal
attention mask. ``multicrop_forward`` (config ``model.multicrop_forward``) picks how ``forward_features_list`` runs
the list of crop tensors: ``packed`` (default) passes all groups through each block together (token-wise ops on the
concatenated tokens, attention per group, which is what the block-diagonal mask computes), ``per_resolution`` runs
one full pass per tensor (the reference). Both give the same result, drop-path draws included.
``block_chunks`` (FSDP grouping only) is not reproduced; ``franca.models.official_keys`` maps chunked state dicts.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.init import trunc_normal_

from franca.layers.block import Block
from franca.layers.dino_head import init_linear_trunc_normal
from franca.layers.patch_embed import PatchEmbed

__all__ = [
    "ARCHS",
    "MULTICROP_FORWARDS",
    "DinoVisionTransformer",
    "build_backbone",
    "vit_base",
    "vit_giant2",
    "vit_large",
    "vit_small",
    "vit_tiny",
]

logger = logging.getLogger(__name__)

MULTICROP_FORWARDS = ("packed", "per_resolution")


class DinoVisionTransformer(nn.Module):
    """The backbone; ``forward(x)`` returns the normalised CLS token (B, D), ``forward(..., is_training=True)`` the
    feature dict(s) of ``forward_features`` (the DDP-friendly entry point used by the meta-architecture)."""

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 14,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        ffn_layer: str = "mlp",
        qkv_bias: bool = True,
        proj_bias: bool = True,
        ffn_bias: bool = True,
        drop_path_rate: float = 0.0,
        drop_path_mode: str = "per_sample",
        layerscale: float | None = 1e-5,
        interpolate_offset: float = 0.1,
        interpolate_antialias: bool = False,
        attn_impl: str = "sdpa",
        multicrop_forward: str = "packed",
    ) -> None:
        super().__init__()
        if multicrop_forward not in MULTICROP_FORWARDS:
            raise ValueError(f"model.multicrop_forward must be one of {MULTICROP_FORWARDS}, got {multicrop_forward!r}")
        self.multicrop_forward = multicrop_forward
        self.embed_dim = self.num_features = embed_dim
        self.patch_size = patch_size
        self.n_blocks = depth
        self.num_heads = num_heads
        self.interpolate_offset = interpolate_offset
        self.interpolate_antialias = interpolate_antialias
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.patch_embed.num_patches, embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))
        # drop_path_uniform: the same rate in every block (true in every config).
        self.blocks = nn.ModuleList(
            Block(
                embed_dim,
                num_heads,
                mlp_ratio=mlp_ratio,
                ffn_layer=ffn_layer,
                qkv_bias=qkv_bias,
                proj_bias=proj_bias,
                ffn_bias=ffn_bias,
                drop_path=drop_path_rate,
                drop_path_mode=drop_path_mode,
                layerscale=layerscale,
                attn_impl=attn_impl,
            )
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.init_weights()

    def init_weights(self) -> None:
        """pos_embed trunc_normal(0.02), cls_token normal(1e-6), mask_token 0, Linears trunc_normal(0.02) + 0 bias."""
        trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        nn.init.zeros_(self.mask_token)
        self.apply(init_linear_trunc_normal)

    def interpolate_pos_encoding(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Position embedding (1, 1 + N, D) for tokens x (B, 1 + N, D) of an image of height x width pixels.

        At the build size pos_embed is returned unchanged; otherwise the patch part is resized bicubically with
        scale_factor ((rows + offset) / M, (cols + offset) / M) (DINO's offset work-around; size-based when the
        offset is 0). The CLS position embedding is not interpolated.
        """
        n_patch = x.shape[1] - 1
        n_pos = self.pos_embed.shape[1] - 1
        if n_patch == n_pos and height == width:
            return self.pos_embed
        pos_embed = self.pos_embed.float()
        cls_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:]
        rows, cols = height // self.patch_size, width // self.patch_size
        m = math.isqrt(n_pos)
        if m * m != n_pos:
            raise ValueError(f"pos_embed has {n_pos} patch positions, not a square grid")
        if self.interpolate_offset:
            kwargs = {"scale_factor": ((rows + self.interpolate_offset) / m, (cols + self.interpolate_offset) / m)}
        else:
            kwargs = {"size": (rows, cols)}
        grid = patch_pos.reshape(1, m, m, -1).permute(0, 3, 1, 2)  # (1, D, M, M)
        grid = F.interpolate(grid, mode="bicubic", antialias=self.interpolate_antialias, **kwargs)
        if tuple(grid.shape[-2:]) != (rows, cols):
            raise RuntimeError(f"interpolated grid {tuple(grid.shape[-2:])} != {(rows, cols)}")
        patch_pos = grid.permute(0, 2, 3, 1).reshape(1, rows * cols, -1)  # row-major, as the tokens
        return torch.cat((cls_pos, patch_pos), dim=1).to(x.dtype)

    def prepare_tokens_with_masks(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        """Image (B, 3, H, W) [+ masks (B, N) bool] -> tokens (B, 1 + N, D) with the mask token and pos embed."""
        _, _, height, width = x.shape
        x = self.patch_embed(x)  # (B, N, D)
        if masks is not None:
            # masked patches take the mask token BEFORE the position embedding is added (spec 1.1)
            x = torch.where(masks.unsqueeze(-1), self.mask_token.to(x.dtype).unsqueeze(0), x)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x), dim=1)
        return x + self.interpolate_pos_encoding(x, height, width)

    def _output_dict(self, x: torch.Tensor, masks: torch.Tensor | None, rasa_head: Callable | None) -> dict:
        x_norm = self.norm(x)  # (B, 1 + N, D)
        out = {
            "x_norm_clstoken": x_norm[:, 0],
            "x_norm_patchtokens": x_norm[:, 1:],
            "x_prenorm": x,
            "masks": masks,
        }
        if rasa_head is not None:
            out["patch_token_rasa"] = rasa_head(out["x_norm_patchtokens"])  # (B, N, D)
        return out

    def forward_features(
        self,
        x: torch.Tensor | Sequence[torch.Tensor],
        masks: torch.Tensor | Sequence[torch.Tensor | None] | None = None,
        rasa_head: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> dict | list[dict]:
        """Feature dict of one batch; a list of crops (one tensor per resolution) gives a list of dicts."""
        if isinstance(x, (list, tuple)):
            return self.forward_features_list(x, masks, rasa_head=rasa_head)
        x = self.prepare_tokens_with_masks(x, masks)
        for blk in self.blocks:
            x = blk(x)
        return self._output_dict(x, masks, rasa_head)

    def forward_features_list(
        self,
        x_list: Sequence[torch.Tensor],
        masks_list: Sequence[torch.Tensor | None] | None = None,
        rasa_head: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> list[dict]:
        """One feature dict per crop tensor: all tensors through each block together (``packed``, the official
        nested pass) or one pass per tensor (``per_resolution``); the same maths and the same drop-path draws."""
        if masks_list is None:
            masks_list = [None] * len(x_list)
        if len(masks_list) != len(x_list):
            raise ValueError(f"{len(x_list)} crop tensors but {len(masks_list)} masks")
        if self.multicrop_forward == "per_resolution" or len(x_list) == 1:
            return [self.forward_features(x, m, rasa_head=rasa_head) for x, m in zip(x_list, masks_list, strict=True)]
        xs = [self.prepare_tokens_with_masks(x, m) for x, m in zip(x_list, masks_list, strict=True)]  # (B_g, N_g, D)
        drops = self._draw_drops(xs)
        for blk, blk_drops in zip(self.blocks, drops, strict=True):
            xs = blk(xs, drops=blk_drops)
        return [self._output_dict(x, m, rasa_head) for x, m in zip(xs, masks_list, strict=True)]

    def _draw_drops(self, xs: list[torch.Tensor]) -> list[list[tuple]]:
        """drops[block][group] = (attn draw, ffn draw), drawn group by group, block by block: the order in which the
        per-resolution path draws them, so both paths consume the RNG identically."""
        per_group = [[(blk.draw_drop(x.shape[0], x), blk.draw_drop(x.shape[0], x)) for blk in self.blocks] for x in xs]
        return [list(group_draws) for group_draws in zip(*per_group, strict=True)]

    def get_intermediate_layers(
        self,
        x: torch.Tensor,
        n: int | Sequence[int] = 1,
        reshape: bool = False,
        return_class_token: bool = False,
        norm: bool = True,
    ) -> tuple:
        """Patch tokens (B, N, D) of the last ``n`` blocks (or of the block indices in ``n``), as in DINOv2.

        ``reshape`` gives (B, D, H/P, W/P); ``return_class_token`` gives (patch_tokens, cls_token) pairs.
        """
        take = set(range(self.n_blocks - n, self.n_blocks)) if isinstance(n, int) else set(n)
        if not take <= set(range(self.n_blocks)):
            raise ValueError(f"block indices {sorted(take)} outside 0..{self.n_blocks - 1}")
        tokens = self.prepare_tokens_with_masks(x)
        outputs = []
        for i, blk in enumerate(self.blocks):
            tokens = blk(tokens)
            if i in take:
                outputs.append(self.norm(tokens) if norm else tokens)
        class_tokens = [out[:, 0] for out in outputs]
        patches = [out[:, 1:] for out in outputs]
        if reshape:
            b, _, height, width = x.shape
            rows, cols = height // self.patch_size, width // self.patch_size
            patches = [p.reshape(b, rows, cols, -1).permute(0, 3, 1, 2).contiguous() for p in patches]
        if return_class_token:
            return tuple(zip(patches, class_tokens, strict=True))
        return tuple(patches)

    def forward(self, x, masks=None, is_training: bool = False, rasa_head=None):
        """CLS token (B, D); with ``is_training=True`` the ``forward_features`` output (dict or list of dicts)."""
        out = self.forward_features(x, masks, rasa_head=rasa_head)
        if is_training:
            return out
        if isinstance(out, list):
            return [o["x_norm_clstoken"] for o in out]
        return out["x_norm_clstoken"]


def vit_tiny(patch_size: int = 14, **kwargs) -> DinoVisionTransformer:
    return DinoVisionTransformer(patch_size=patch_size, embed_dim=192, depth=12, num_heads=3, **kwargs)


def vit_small(patch_size: int = 14, **kwargs) -> DinoVisionTransformer:
    return DinoVisionTransformer(patch_size=patch_size, embed_dim=384, depth=12, num_heads=6, **kwargs)


def vit_base(patch_size: int = 14, **kwargs) -> DinoVisionTransformer:
    return DinoVisionTransformer(patch_size=patch_size, embed_dim=768, depth=12, num_heads=12, **kwargs)


def vit_large(patch_size: int = 14, **kwargs) -> DinoVisionTransformer:
    return DinoVisionTransformer(patch_size=patch_size, embed_dim=1024, depth=24, num_heads=16, **kwargs)


def vit_giant2(patch_size: int = 14, ffn_layer: str = "swiglu", **kwargs) -> DinoVisionTransformer:
    kwargs.update(embed_dim=1536, depth=40, num_heads=24, ffn_layer=ffn_layer)
    return DinoVisionTransformer(patch_size=patch_size, **kwargs)


ARCHS = {
    "vit_tiny": vit_tiny,
    "vit_small": vit_small,
    "vit_base": vit_base,
    "vit_large": vit_large,
    "vit_giant2": vit_giant2,
}

# config key -> constructor argument (every one optional; the constructor's default applies when absent)
_MODEL_KEYS = (
    "patch_size",
    "ffn_layer",
    "drop_path_rate",
    "drop_path_mode",
    "layerscale",
    "img_size",
    "interpolate_offset",
    "interpolate_antialias",
    "attn_impl",
    "multicrop_forward",
)


def build_backbone(model_cfg: Mapping, drop_path_rate: float | None = None) -> DinoVisionTransformer:
    """Backbone from the ``model`` config section (docs/interfaces.md); ``drop_path_rate`` overrides the config's
    (the teacher is built with 0). ``arch: vit_custom`` reads embed_dim, depth and num_heads from the config."""
    if "arch" not in model_cfg:
        raise KeyError("model config has no 'arch' key (model.arch)")
    arch = model_cfg["arch"]
    # a null layerscale means "no LayerScale"; other null keys mean "use the default"
    kwargs = {k: model_cfg[k] for k in _MODEL_KEYS if k in model_cfg}
    kwargs = {k: v for k, v in kwargs.items() if v is not None or k == "layerscale"}
    if "ffn_layer" in kwargs and kwargs["ffn_layer"] == "swiglufused":
        kwargs["ffn_layer"] = "swiglu"
    if drop_path_rate is not None:
        kwargs["drop_path_rate"] = drop_path_rate
    if arch == "vit_custom":
        missing = [k for k in ("embed_dim", "depth", "num_heads") if k not in model_cfg]
        if missing:
            raise KeyError(f"model.arch=vit_custom needs model.{missing[0]} (missing: {missing})")
        dims = {k: int(model_cfg[k]) for k in ("embed_dim", "depth", "num_heads")}
        model = DinoVisionTransformer(**dims, **kwargs)
    elif arch in ARCHS:
        model = ARCHS[arch](**kwargs)
    else:
        raise ValueError(f"model.arch must be one of {sorted(ARCHS) + ['vit_custom']}, got {arch!r}")
    logger.info("built %s: D=%d depth=%d heads=%d", arch, model.embed_dim, model.n_blocks, model.num_heads)
    return model
