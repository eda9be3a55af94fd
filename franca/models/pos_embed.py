"""Offline resize of a checkpoint's learned position embedding (spec section 4, stage 2 step 1).

`scripts/modify_ckpt_highres.py` of the official code resizes the teacher's ``backbone.pos_embed`` from the
pretraining grid (16x16 at 224 px, P = 14) to the fine-tuning grid (37x37 at 518 px) before the high-resolution
stage, because loading a state dict with a differently shaped ``pos_embed`` raises.  The resize differs from the
run-time interpolation of the backbone (spec 1.1: offset 0.1, no antialias): here it is

* bicubic, **antialiased**, **size-based** (``size=(h, w)``, no scale factor, no offset),
* ``align_corners=False`` (pixel-centre convention: patch i of M sits at (i + 0.5) / M),
* applied to the patch part only; the CLS position embedding is kept as it is.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

__all__ = ["grid_of", "resize_pos_embed", "resize_checkpoint_pos_embed", "resize_checkpoint_file"]


def _as_hw(new_grid: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(new_grid, int):
        return new_grid, new_grid
    h, w = (int(v) for v in new_grid)
    return h, w


def grid_of(pos_embed: torch.Tensor) -> int:
    """Side M of the square patch grid of a (1, 1 + M*M, D) position embedding."""
    if pos_embed.ndim != 3 or pos_embed.shape[0] != 1:
        raise ValueError(f"pos_embed must have shape (1, 1 + M*M, D), got {tuple(pos_embed.shape)}")
    n_patches = pos_embed.shape[1] - 1
    side = math.isqrt(n_patches)
    if side * side != n_patches or side == 0:
        raise ValueError(f"pos_embed has {n_patches} patch positions, which is not a square grid M*M")
    return side


def resize_pos_embed(pos_embed: torch.Tensor, new_grid: int | tuple[int, int], antialias: bool = True) -> torch.Tensor:
    """Resize the patch part of ``pos_embed`` (1, 1 + M*M, D) to ``new_grid`` -> (1, 1 + h*w, D).

    The CLS row (index 0) is copied unchanged.  Resizing to the same grid returns a copy of the input.
    The interpolation runs in float32 and the result is cast back to the input dtype.
    """
    side = grid_of(pos_embed)
    h, w = _as_hw(new_grid)
    if h <= 0 or w <= 0:
        raise ValueError(f"new_grid must be positive, got {new_grid}")
    if (h, w) == (side, side):
        return pos_embed.clone()
    dim = pos_embed.shape[-1]
    cls_pos = pos_embed[:, :1]  # (1, 1, D)
    patch_pos = pos_embed[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2)  # (1, D, M, M)
    patch_pos = F.interpolate(
        patch_pos.float(), size=(h, w), mode="bicubic", antialias=antialias, align_corners=False
    )  # (1, D, h, w)
    patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, h * w, dim).to(pos_embed.dtype)
    return torch.cat([cls_pos, patch_pos], dim=1)


def resize_checkpoint_pos_embed(
    state_dict: Mapping[str, torch.Tensor],
    key: str = "backbone.pos_embed",
    new_grid: int | tuple[int, int] = 16,
    antialias: bool = True,
) -> dict[str, torch.Tensor]:
    """Return a shallow copy of ``state_dict`` whose ``key`` is resized to ``new_grid``; other entries are shared."""
    if key not in state_dict:
        candidates = [k for k in state_dict if k.endswith("pos_embed")]
        raise KeyError(f"position embedding key {key!r} not in the state dict (keys ending in pos_embed: {candidates})")
    out = dict(state_dict)
    old = state_dict[key]
    out[key] = resize_pos_embed(old, new_grid, antialias=antialias)
    logger.info("resized %s from %s to %s", key, tuple(old.shape), tuple(out[key].shape))
    return out


def resize_checkpoint_file(
    src: str | Path,
    dst: str | Path,
    new_grid: int | tuple[int, int],
    key: str = "backbone.pos_embed",
    state_keys: Iterable[str] = ("teacher", "student"),
    antialias: bool = True,
) -> dict:
    """Resize ``key`` in every state dict ``ckpt[s]`` (s in ``state_keys`` present in the file) and save to ``dst``.

    The official script only rewrites ``ckpt["teacher"]``; the student is resized too when it is present, so the
    saved file stays loadable as a whole.  Other top-level entries are kept.  Returns the new checkpoint dict.
    """
    src = Path(src)
    ckpt = torch.load(src, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict):
        raise ValueError(f"{src}: expected a checkpoint dict, got {type(ckpt).__name__}")
    present = [s for s in state_keys if s in ckpt]
    if not present:
        raise KeyError(f"{src}: none of the state dict keys {list(state_keys)} found (keys: {list(ckpt)})")
    out = dict(ckpt)
    for s in present:
        try:
            out[s] = resize_checkpoint_pos_embed(ckpt[s], key=key, new_grid=new_grid, antialias=antialias)
        except KeyError as err:
            raise KeyError(f"{src}[{s!r}]: {err.args[0]}") from err
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    torch.save(out, dst)
    return out
