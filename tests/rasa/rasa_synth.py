"""Planted features and a tiny stand-in backbone for the RASA tests (helper module, imported by name)."""

import numpy as np
import torch
from PIL import Image
from torch import nn

from franca.eval.position_probe import position_targets


class PlantedTokens:
    """Tokens (n, side^2, D) = noise + semantic scalar s along B + linear position code along the plane A."""

    def __init__(self, dim=48, side=4, code=2.0, noise=0.5, seed=0):
        self.g = torch.Generator().manual_seed(seed)
        basis, _ = torch.linalg.qr(torch.randn(dim, dim, generator=self.g, dtype=torch.float64))
        self.code_plane, self.semantic_dir = basis[:2].float(), basis[2].float()
        self.dim, self.side, self.code, self.noise = dim, side, code, noise

    def sample(self, n):
        s = torch.rand(n, generator=self.g)
        pos = (position_targets(self.side) - 0.5) @ self.code_plane  # (N, D)
        noise = self.noise * torch.randn(n, self.side**2, self.dim, generator=self.g)
        return noise + 3.0 * (s[:, None, None] - 0.5) * self.semantic_dir + self.code * pos[None], s


class StandInBackbone(nn.Module):
    """DINOv2-API stand-in: patchify conv + a learned-looking position embedding + final LayerNorm."""

    def __init__(self, dim=16, patch=4, img=16, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.patch_embed = nn.Conv2d(3, dim, patch, patch)
        self.pos_embed = nn.Parameter(torch.randn(1, (img // patch) ** 2, dim))
        self.blocks = nn.ModuleList([nn.Linear(dim, dim) for _ in range(2)])
        self.norm = nn.LayerNorm(dim)

    def _tokens(self, x):
        return self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed  # (B, N, D)

    def forward_features(self, x, masks=None, rasa_head=None):
        t = self._tokens(x)
        for blk in self.blocks:
            t = t + torch.tanh(blk(t))
        t = self.norm(t)
        out = {"x_norm_clstoken": t.mean(1), "x_norm_patchtokens": t, "x_prenorm": t, "masks": masks}
        if rasa_head is not None:
            out["patch_token_rasa"] = rasa_head(t)
        return out


def image_samples(n=6):
    rng = np.random.default_rng(0)
    return [
        {
            "key": f"s{i}",
            "image": Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)),
            "label": i % 3,
            "seg": None,
        }
        for i in range(n)
    ]
