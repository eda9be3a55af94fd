"""Building blocks of the DINOv2-style ViT and of the DINO / Matryoshka heads (names follow DINOv2 and Franca)."""

from franca.layers.attention import Attention
from franca.layers.block import Block
from franca.layers.dino_head import DINOHead, WeightNormLinear
from franca.layers.drop_path import DropPath
from franca.layers.layer_scale import LayerScale
from franca.layers.mlp import Mlp
from franca.layers.mrl_dino_head import MRLDINOHead, nesting_dims
from franca.layers.patch_embed import PatchEmbed
from franca.layers.swiglu_ffn import SwiGLUFFN, swiglu_hidden_dim

__all__ = [
    "Attention",
    "Block",
    "DINOHead",
    "DropPath",
    "LayerScale",
    "MRLDINOHead",
    "Mlp",
    "PatchEmbed",
    "SwiGLUFFN",
    "WeightNormLinear",
    "nesting_dims",
    "swiglu_hidden_dim",
]
