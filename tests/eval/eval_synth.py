"""Synthetic features, stripe segmentations and a DINOv2-API stand-in backbone for the evaluation tests.

A uniquely named helper module (not conftest) so that test files can import it under pytest's prepend mode.
"""

import numpy as np
import torch
from PIL import Image
from torch import nn


def separable(n_per_class, num_classes, dim=16, noise=0.05, seed=0):
    """Class centres on orthogonal axes (scaled) plus small noise -> (features (n, D), labels (n,))."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(num_classes).repeat_interleave(n_per_class)
    centres = torch.eye(num_classes, dim) * 3.0
    return centres[labels] + noise * torch.randn(len(labels), dim, generator=g), labels


def random_features(n, num_classes, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=g), torch.randint(0, num_classes, (n,), generator=g)


def binomial_bound(n, p, sigmas=4.5):
    return sigmas * (p * (1 - p) / n) ** 0.5


def stripe_scene(n, grid=4, patch=4, num_classes=3, dim=8, noise=0.1, seed=0):
    """Column-stripe masks aligned with the patch grid and tokens = random class centre + noise.

    Returns tokens (n, grid, grid, dim) and masks (n, grid*patch, grid*patch) uint8; every patch column has one
    class, so bilinear upsampling of per-patch predictions reproduces the masks exactly.  The class centres are
    spread over every dimension (like real features), so a per-dimension z-score does not blow up pure-noise dims.
    """
    g = torch.Generator().manual_seed(seed)
    centres = 2.0 * torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(1234))
    cols = torch.randint(0, num_classes, (n, grid), generator=g)  # class of each patch column
    patch_cls = cols[:, None, :].expand(n, grid, grid)  # (n, h, w)
    tokens = centres[patch_cls] + noise * torch.randn(n, grid, grid, dim, generator=g)
    masks = patch_cls.repeat_interleave(patch, 1).repeat_interleave(patch, 2).to(torch.uint8)
    return tokens, masks


class StandInBackbone(nn.Module):
    """DINOv2-API stand-in: patchify conv + position embedding, two residual 'blocks', final LayerNorm."""

    def __init__(self, dim=16, patch=4, img=16, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.patch_embed = nn.Conv2d(3, dim, patch, patch)
        self.pos_embed = nn.Parameter(torch.randn(1, (img // patch) ** 2, dim))
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.blocks = nn.ModuleList([nn.Linear(dim, dim) for _ in range(2)])
        self.norm = nn.LayerNorm(dim)

    def _run(self, x):
        t = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed
        t = torch.cat([self.cls_token.expand(t.shape[0], -1, -1) + t.mean(1, keepdim=True), t], dim=1)
        outs = []
        for blk in self.blocks:
            t = t + torch.tanh(blk(t))
            outs.append(t)
        return outs  # per block (B, 1 + N, D)

    def forward_features(self, x, masks=None, rasa_head=None):
        t = self.norm(self._run(x)[-1])
        out = {"x_norm_clstoken": t[:, 0], "x_norm_patchtokens": t[:, 1:], "x_prenorm": t, "masks": masks}
        if rasa_head is not None:
            out["patch_token_rasa"] = rasa_head(t[:, 1:])
        return out

    def get_intermediate_layers(self, x, n=1, return_class_token=False, norm=True):
        outs = self._run(x)[-n:]
        outs = [self.norm(o) if norm else o for o in outs]
        if return_class_token:
            return tuple((o[:, 1:], o[:, 0]) for o in outs)
        return tuple(o[:, 1:] for o in outs)


def make_samples(n, size=16, num_classes=3, seed=0):
    """Samples as iter_samples yields them: a coloured stripe image whose colour encodes the stripe's class."""
    rng = np.random.default_rng(seed)
    palette = np.array([[220, 30, 30], [30, 200, 40], [40, 40, 230], [200, 200, 30]], dtype=np.uint8)
    samples = []
    for i in range(n):
        cols = rng.integers(0, num_classes, size // 4)
        seg = np.repeat(np.repeat(cols[None], size, 0), 4, 1).astype(np.uint8)  # (size, size)
        img = palette[seg] + rng.integers(0, 20, (size, size, 3), dtype=np.uint8)
        samples.append(
            {"key": f"k{i:03d}", "image": Image.fromarray(img), "label": int(np.bincount(cols).argmax()), "seg": seg}
        )
    return samples
