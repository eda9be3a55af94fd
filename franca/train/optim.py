"""AdamW over the SSLMetaArch parameter groups, the per-iteration schedule application and per-module clipping.

Spec 2.5: AdamW (betas 0.9, 0.999); every iteration sets each group's lr to ``lr * lr_multiplier`` (``last_layer_lr``
for the prototype layers, 0 while they are frozen) and its weight decay to ``wd * wd_multiplier`` (the multiplier is
0 for biases, norms and LayerScale gammas); the gradient norm is clipped to ``clip_grad`` separately for each student
sub-module (backbone, dino_head, ibot_head) after unscaling.

``optim.adamw_impl`` picks torch's AdamW kernel, the same update in every case: ``fused`` (default: one kernel per
fused group and dtype, on CUDA and on CPU), ``foreach`` (multi-tensor ops) or ``for_loop`` (the per-parameter
reference). The per-group lr and weight decay, and so every multiplier, apply identically in the three.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from franca.train.schedules import cfg_get

__all__ = ["ADAMW_IMPLS", "apply_schedules", "build_optimizer", "clip_gradients", "fuse_param_groups"]

logger = logging.getLogger(__name__)

_GROUP_KEYS = ("wd_multiplier", "lr_multiplier", "is_last_layer")
ADAMW_IMPLS = ("fused", "foreach", "for_loop")


def fuse_param_groups(groups: Iterable[Mapping]) -> list[dict]:
    """Merge groups that share (wd_multiplier, lr_multiplier, is_last_layer), keeping the first-seen order.

    The optimizer then holds a handful of groups instead of one per tensor; parameter order inside a fused group
    follows the input order, so the optimizer state is deterministic.
    """
    fused: dict[tuple, dict] = {}
    for group in groups:
        missing = [k for k in ("params", *_GROUP_KEYS) if k not in group]
        if missing:
            raise KeyError(f"parameter group {group.get('name', '?')!r} lacks keys {missing}")
        key = tuple(group[k] for k in _GROUP_KEYS)
        params = group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        names = group.get("name", [])
        names = [names] if isinstance(names, str) else list(names)
        if key not in fused:
            fused[key] = {k: group[k] for k in _GROUP_KEYS} | {
                "params": [],
                "names": [],
            }
        fused[key]["params"].extend(params)
        fused[key]["names"].extend(names)
    return list(fused.values())


def build_optimizer(param_groups: Iterable[Mapping], cfg: Mapping) -> torch.optim.AdamW:
    """AdamW over the fused groups; lr and weight decay are set by :func:`apply_schedules` before every step."""
    betas = tuple(float(b) for b in cfg_get(cfg, "optim.betas", (0.9, 0.999)))
    impl = str(cfg_get(cfg, "optim.adamw_impl", "fused"))
    if impl not in ADAMW_IMPLS:
        raise ValueError(f"config key optim.adamw_impl must be one of {ADAMW_IMPLS}, got {impl!r}")
    groups = fuse_param_groups(param_groups)
    for g in groups:
        g["lr"], g["weight_decay"] = 0.0, 0.0
    logger.info("AdamW (%s) betas=%s over %d fused groups", impl, betas, len(groups))
    kernel = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for_loop": {"foreach": False}}[impl]
    return torch.optim.AdamW(groups, lr=0.0, betas=betas, weight_decay=0.0, **kernel)


def apply_schedules(optimizer: torch.optim.Optimizer, lr: float, wd: float, last_layer_lr: float) -> None:
    """Set every group's lr and weight decay for this iteration (DINOv2 ``apply_optim_scheduler``)."""
    for group in optimizer.param_groups:
        base = last_layer_lr if group["is_last_layer"] else lr
        group["lr"] = base * group["lr_multiplier"]
        group["weight_decay"] = wd * group["wd_multiplier"]


def _module_grad_norm_clip(module: nn.Module, max_norm: float) -> torch.Tensor:
    # FSDP shards gradients: its own method reduces the norm across ranks before clipping
    if hasattr(module, "clip_grad_norm_") and callable(module.clip_grad_norm_):
        return module.clip_grad_norm_(max_norm)
    params = [p for p in module.parameters() if p.grad is not None]
    if not params:
        return torch.zeros(())
    return torch.nn.utils.clip_grad_norm_(params, max_norm)


def clip_gradients(
    student: Mapping[str, nn.Module],
    max_norm: float | None,
    optimizer=None,
    scaler=None,
) -> dict[str, torch.Tensor]:
    """Unscale (when a GradScaler is active) then clip each student sub-module's gradient norm to ``max_norm``.

    Returns the pre-clip total norm of each sub-module (``grad_norm_<name>``) for logging. ``max_norm`` None or <= 0
    disables clipping (the norms are still reported).
    """
    if scaler is not None and scaler.is_enabled():
        scaler.unscale_(optimizer)
    norms = {}
    for name, module in student.items():
        if max_norm is not None and max_norm > 0:
            norm = _module_grad_norm_clip(module, float(max_norm))
        else:
            grads = [p.grad.detach().norm() for p in module.parameters() if p.grad is not None]
            norm = torch.linalg.vector_norm(torch.stack(grads)) if grads else torch.zeros(())
        norms[f"grad_norm_{name}"] = norm.detach()
    return norms
