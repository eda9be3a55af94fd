"""KoLeo regulariser (spec 2.4): -mean_i log(||x_i - x_NN(i)||) on L2-normalised features, in fp32.

Follows DINOv2 / Franca ``koleo_loss.py``: normalise with eps 1e-8, nearest neighbour by the largest dot product
excluding the point itself, distance by ``pairwise_distance`` (which adds eps 1e-8 to the difference), and
-log(d + 1e-8). Autocast is disabled. Two antipodal points give -log 2.

One deliberate difference: the official code excludes the diagonal by setting it to -1, which ties with an exactly
antipodal neighbour (dot -1, or slightly below after rounding) and can then pick the point itself (d ~ 1e-8, a loss
of ~18). Here the diagonal is set to -inf, so the nearest *other* point is always chosen; both agree otherwise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["KoLeoLoss"]


class KoLeoLoss(nn.Module):
    """Kozachenko-Leonenko entropy estimator of a batch of features (B, D); computed per process, no gather."""

    def __init__(self, eps: float = 1e-8) -> None:
        super().__init__()
        self.eps = eps

    @staticmethod
    @torch.no_grad()
    def nearest_neighbours(x: torch.Tensor) -> torch.Tensor:
        """Index (B,) of each row's nearest neighbour among the other rows (largest dot product)."""
        dots = x @ x.t()  # (B, B)
        dots.fill_diagonal_(float("-inf"))
        return dots.argmax(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 2 or x.shape[0] < 2:
            raise ValueError(f"KoLeo needs features of shape (B >= 2, D), got {tuple(x.shape)}")
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = F.normalize(x.float(), p=2, dim=-1, eps=self.eps)
            nn_idx = self.nearest_neighbours(x)
            dist = F.pairwise_distance(x, x[nn_idx], p=2, eps=self.eps)  # (B,)
            return -torch.log(dist + self.eps).mean()
