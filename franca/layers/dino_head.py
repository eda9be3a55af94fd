"""DINOv2 projection head and the weight-normalised prototype layer shared with the MRL head (spec 2.1).

``WeightNormLinear`` keeps the official state-dict keys ``weight_g`` (K, 1) and ``weight_v`` (K, d) of
``torch.nn.utils.weight_norm(nn.Linear(d, K, bias=False))`` with ``weight_g`` filled with 1: the effective weight is
weight_g * weight_v / ||weight_v|| (row norm), so every prototype starts as a unit vector and its norm stays
trainable. ``weight_v`` keeps nn.Linear's default init, because the official head initialises the last layer before
wrapping it (its trunc_normal pass no longer reaches ``weight_v``).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.init import trunc_normal_

__all__ = ["DINOHead", "WeightNormLinear", "build_head_mlp", "init_linear_trunc_normal"]


class WeightNormLinear(nn.Module):
    """Linear(in_features -> out_features) without bias, weight-normalised per output row (dim 0)."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight_v = nn.Parameter(torch.empty(out_features, in_features))
        self.weight_g = nn.Parameter(torch.ones(out_features, 1))
        nn.init.kaiming_uniform_(self.weight_v, a=math.sqrt(5))  # nn.Linear's default

    @property
    def weight(self) -> torch.Tensor:
        return self.weight_v * (self.weight_g / self.weight_v.norm(dim=1, keepdim=True))  # (K, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


def init_linear_trunc_normal(module: nn.Module, std: float | str = 0.02) -> None:
    """trunc_normal(std 0.02) weights and zero bias for every nn.Linear (spec 1.1 / 2.1).

    `std="fan_in"` uses 1/sqrt(fan_in) instead: at tiny widths (32-128) the faithful 0.02 shrinks the signal by
    ~0.2x per layer, so the head outputs barely vary across images and the DINO/iBOT losses sit at log K.
    """
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=module.in_features**-0.5 if std == "fan_in" else float(std))
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def build_head_mlp(
    nlayers: int, in_dim: int, hidden_dim: int, bottleneck_dim: int, act_after_bottleneck: bool, bias: bool = True
) -> nn.Sequential:
    """Linear(in, h) GELU [Linear(h, h) GELU]*(nlayers-2) Linear(h, bottleneck) [GELU]; nlayers=1: Linear(in, b).

    Indices 0, 2, 4 are the Linears for nlayers = 3, which gives the official keys ``mlp.0``, ``mlp.2``, ``mlp.4``.
    """
    if nlayers < 1:
        raise ValueError(f"head_nlayers must be >= 1, got {nlayers}")
    dims = [in_dim] + [hidden_dim] * (nlayers - 1) + [bottleneck_dim]
    layers: list[nn.Module] = []
    for i in range(nlayers):
        layers.append(nn.Linear(dims[i], dims[i + 1], bias=bias))
        if i < nlayers - 1 or act_after_bottleneck:
            layers.append(nn.GELU())
    return nn.Sequential(*layers)


class DINOHead(nn.Module):
    """DINOv2 head: MLP -> L2 normalise -> weight-normalised last layer; returns a 1-tuple (one "level").

    Returning a tuple lets the meta-architecture and the losses treat single and Matryoshka heads alike.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        nlayers: int = 3,
        init_std: float | str = 0.02,
    ) -> None:
        super().__init__()
        self.mlp = build_head_mlp(nlayers, in_dim, hidden_dim, bottleneck_dim, act_after_bottleneck=False)
        self.apply(functools.partial(init_linear_trunc_normal, std=init_std))
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)
        self.out_dims = (out_dim,)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
        x = self.mlp(x)  # (n, bottleneck)
        eps = 1e-6 if x.dtype == torch.float16 else 1e-12
        x = F.normalize(x, dim=-1, p=2, eps=eps)
        return (self.last_layer(x),)  # ((n, K),)
