"""Matryoshka (MRL) multi-level projection head of Franca (spec 2.1, quirks Q1 and Q2).

For each level i with nested dimension d_i (``nesting_list = [D/16, D/8, D/4, D/2, D]`` for 5 levels):

1. ``matryoshka_projections[i]``: the level's input feature, chosen by ``mode`` (Q1):
   * ``"projection"`` (faithful default, official v1.0.0): Linear(D -> d_i) with bias on the whole feature;
   * ``"slice"`` (the paper's description): the first d_i coordinates x[:, :d_i], no parameters;
   * ``"slice_projection"`` (later official repository, commit 7a1acd6): Linear(d_i -> d_i) on x[:, :d_i].
2. ``mlps[i]``: Linear(d_i, h) GELU Linear(h, h) GELU Linear(h, bottleneck) GELU (a GELU after the bottleneck, Q2).
3. ``last_layers[i]``: weight-normalised Linear(bottleneck -> K_i = int(K * d_i / D)) without bias, weight_g = 1;
   no L2 normalisation before it (Q2), so the logits are not cosine similarities.

No parameter is shared between levels. The forward returns the tuple (out_1, ..., out_L), out_i of shape (n, K_i).
Parameter names contain ``last_layer`` for every prototype layer, so the freeze-last-layer rule matches them.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from franca.layers.dino_head import WeightNormLinear, build_head_mlp, init_linear_trunc_normal

__all__ = ["MRL_MODES", "MRLDINOHead", "nesting_dims"]

MRL_MODES = ("projection", "slice", "slice_projection")


def nesting_dims(embed_dim: int, n_levels: int = 5) -> list[int]:
    """[D / 2^(L-1), ..., D / 2, D]; e.g. D = 768, L = 5 -> [48, 96, 192, 384, 768]."""
    if n_levels < 1:
        raise ValueError(f"n_levels must be >= 1, got {n_levels}")
    factor = 2 ** (n_levels - 1)
    if embed_dim % factor != 0:
        raise ValueError(f"embed_dim {embed_dim} is not divisible by 2^(n_levels-1) = {factor}")
    return [embed_dim // 2**k for k in range(n_levels - 1, -1, -1)]


class MRLDINOHead(nn.Module):
    """Franca's Matryoshka head; returns one logit tensor per nesting level (spec 2.1)."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 384,
        nlayers: int = 3,
        n_levels: int = 5,
        nesting_list: Sequence[int] | None = None,
        mode: str = "projection",
        normalize_bottleneck: bool = False,
        act_after_bottleneck: bool = True,
        init_std: float | str = 0.02,
    ) -> None:
        super().__init__()
        if mode not in MRL_MODES:
            raise ValueError(f"mrl_mode must be one of {MRL_MODES}, got {mode!r}")
        self.nesting_list = list(nesting_list) if nesting_list is not None else nesting_dims(in_dim, n_levels)
        if max(self.nesting_list) > in_dim:
            raise ValueError(f"nesting_list {self.nesting_list} exceeds the input dim {in_dim}")
        self.mode = mode
        self.normalize_bottleneck = normalize_bottleneck
        top = self.nesting_list[-1]
        self.out_dims = tuple(int(out_dim * (d / top)) for d in self.nesting_list)  # K_i
        if mode == "projection":
            projections = [nn.Linear(in_dim, d) for d in self.nesting_list]
        elif mode == "slice_projection":
            projections = [nn.Linear(d, d) for d in self.nesting_list]
        else:
            projections = [nn.Identity() for _ in self.nesting_list]
        self.matryoshka_projections = nn.ModuleList(projections)
        self.mlps = nn.ModuleList(
            build_head_mlp(nlayers, d, hidden_dim, bottleneck_dim, act_after_bottleneck) for d in self.nesting_list
        )
        self.apply(functools.partial(init_linear_trunc_normal, std=init_std))
        self.last_layers = nn.ModuleList(WeightNormLinear(bottleneck_dim, k) for k in self.out_dims)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs = []
        for d, proj, mlp, last in zip(
            self.nesting_list, self.matryoshka_projections, self.mlps, self.last_layers, strict=True
        ):
            h = proj(x) if self.mode == "projection" else proj(x[..., :d])  # (n, d_i)
            h = mlp(h)  # (n, bottleneck)
            if self.normalize_bottleneck:
                h = F.normalize(h, dim=-1, p=2, eps=1e-6 if h.dtype == torch.float16 else 1e-12)
            outputs.append(last(h))  # (n, K_i)
        return tuple(outputs)
