"""Backbones: the DINOv2-style ViT, its size factories and the official state-dict key mapping."""

from franca.models.vision_transformer import (
    ARCHS,
    DinoVisionTransformer,
    build_backbone,
    vit_base,
    vit_giant2,
    vit_large,
    vit_small,
    vit_tiny,
)

__all__ = [
    "ARCHS",
    "DinoVisionTransformer",
    "build_backbone",
    "vit_base",
    "vit_giant2",
    "vit_large",
    "vit_small",
    "vit_tiny",
]
