"""Initialising a training stage from a previous one (spec 4, stages 1 -> n and stage 2 high-resolution fine-tune).

* :func:`resize_for_highres` is the offline step of ``scripts/modify_ckpt_highres.py``: it reads the *teacher* of a
  franca checkpoint, resizes its ``backbone.pos_embed`` to the new patch grid with a bicubic, antialiased,
  size-based interpolation (:func:`franca.models.pos_embed.resize_checkpoint_pos_embed`; the CLS position is kept)
  and writes a franca checkpoint holding that teacher.
* :func:`init_from_checkpoint` loads a previous stage into an SSLMetaArch: ``mode="full"`` copies student and
  teacher (a further pretraining stage); ``mode="backbone"`` loads only the teacher's ``backbone.*`` into both the
  student and the teacher backbones and leaves the freshly initialised DINO/iBOT heads alone (the high-resolution
  fine-tune). Optimizer and schedules are always fresh: the caller builds them after this.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from franca.models.pos_embed import grid_of, resize_checkpoint_pos_embed
from franca.train.checkpoint import FORMAT_TAG, CheckpointFormatError, atomic_torch_save, load_checkpoint
from franca.train.distributed import unwrap

__all__ = ["init_from_checkpoint", "load_prefixed", "resize_for_highres", "resized_teacher"]

logger = logging.getLogger(__name__)

POS_EMBED_KEY = "backbone.pos_embed"


def resized_teacher(src: str | os.PathLike, target_img_size: int, patch_size: int | None = None) -> dict:
    """The checkpoint :func:`resize_for_highres` writes, in memory: the teacher of ``src`` with its position
    embedding resized to ``target_img_size / patch``.

    ``patch_size`` defaults to the source config's ``model.patch_size``. The config has ``model.img_size`` and
    ``crops.global_crops_size`` set to ``target_img_size``.
    """
    ckpt = load_checkpoint(src)
    if "teacher" not in ckpt:
        raise CheckpointFormatError(f"{src} has no 'teacher' state dict")
    cfg = copy.deepcopy(dict(ckpt.get("config") or {}))
    patch = int(patch_size or cfg.get("model", {}).get("patch_size", 0))
    if patch <= 0:
        raise KeyError(f"{src}: patch size unknown (pass patch_size or store model.patch_size in the config)")
    if target_img_size % patch:
        raise ValueError(f"target image size {target_img_size} is not a multiple of the patch size {patch}")
    grid = target_img_size // patch
    old_grid = grid_of(ckpt["teacher"][POS_EMBED_KEY]) if POS_EMBED_KEY in ckpt["teacher"] else None
    teacher = resize_checkpoint_pos_embed(ckpt["teacher"], key=POS_EMBED_KEY, new_grid=grid, antialias=True)
    cfg.setdefault("model", {})["img_size"] = int(target_img_size)
    cfg.setdefault("crops", {})["global_crops_size"] = int(target_img_size)
    logger.info("pos_embed of %s: %s -> %dx%d grid", src, old_grid, grid, grid)
    return {
        "format": FORMAT_TAG,
        "teacher": teacher,
        "config": cfg,
        "iteration": int(ckpt.get("iteration", 0)),
        "resized_from": {"path": str(src), "grid": old_grid, "new_grid": grid},
    }


def resize_for_highres(
    src: str | os.PathLike, dst: str | os.PathLike, target_img_size: int, patch_size: int | None = None
) -> Path:
    """Write ``dst``: :func:`resized_teacher` of ``src`` (the offline step of the official script)."""
    return atomic_torch_save(resized_teacher(src, target_img_size, patch_size), dst)


def load_prefixed(target: nn.Module, state: Mapping[str, torch.Tensor], prefix: str, where: str) -> None:
    """Load the ``prefix``-keys of ``state`` into ``target`` (strict on that module); clear errors on mismatch."""
    sub = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    own = target.state_dict()
    missing = sorted(set(own) - set(sub))
    unexpected = sorted(set(sub) - set(own))
    if missing or unexpected:
        raise KeyError(f"{where}: '{prefix}*' keys do not match the model (missing {missing[:5]}, unexpected "
                       f"{unexpected[:5]})")  # fmt: skip
    for k, v in sub.items():
        if own[k].shape != v.shape:
            hint = " (run franca.train.highres.resize_for_highres first)" if k.endswith("pos_embed") else ""
            shapes = f"has shape {tuple(v.shape)}, model has {tuple(own[k].shape)}"
            raise ValueError(f"{where}: '{prefix}{k}' {shapes}{hint}")
    target.load_state_dict(sub, strict=True)


def init_from_checkpoint(model: nn.Module, path: str | os.PathLike, mode: str = "full") -> dict:
    """Load a previous stage's weights into ``model`` (an SSLMetaArch); returns the checkpoint's config.

    ``mode="highres"`` is ``"backbone"`` from :func:`resized_teacher` of ``path`` at the model's own resolution: the
    offline resize done in memory, so the fine-tune starts from the pretraining checkpoint itself."""
    if mode == "highres":
        backbone = unwrap(model.teacher["backbone"])
        ckpt = resized_teacher(path, grid_of(backbone.pos_embed) * backbone.patch_size, backbone.patch_size)
        mode = "backbone"
    else:
        ckpt = load_checkpoint(path)
    if mode == "full":
        for tree in ("student", "teacher"):
            if tree not in ckpt:
                raise CheckpointFormatError(f"{path} has no '{tree}' state dict (needed by init_mode='full')")
            modules = getattr(model, tree)
            for name in modules:
                load_prefixed(unwrap(modules[name]), ckpt[tree], f"{name}.", f"{path} [{tree}]")
    elif mode == "backbone":
        if "teacher" not in ckpt:
            raise CheckpointFormatError(f"{path} has no 'teacher' state dict (needed by init_mode='backbone')")
        for tree in ("student", "teacher"):
            load_prefixed(unwrap(getattr(model, tree)["backbone"]), ckpt["teacher"], "backbone.", f"{path} [teacher]")
    else:
        raise ValueError(f"init_mode must be 'full', 'backbone' or 'highres', got {mode!r}")
    logger.info("initialised %s weights from %s", mode, path)
    return dict(ckpt.get("config") or {})
