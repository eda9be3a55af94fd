"""Training schedules of spec 2.5: lr, weight decay, teacher momentum, teacher temperature, last-layer lr.

Every schedule is a DINOv2-style ``CosineScheduler``: an optional run of zeros (``freeze_iters``), a linear warmup
that includes both endpoints (``np.linspace(start, base, warmup_iters)``), then a half cosine from ``base`` to
``final`` over the remaining iterations, evaluated at ``it / n_cosine`` so that the final value is approached but
reached only at ``total_iters`` (and returned for every iteration beyond it). With no warmup this is exactly

    m(it) = final - (final - base) * (1 + cos(pi * it / T)) / 2,

the teacher-momentum formula of spec 2.5. The learning rate itself is scaled by the square-root rule of spec 1.2
(``lr = base_lr * sqrt(B_g * W / 1024)``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

__all__ = [
    "CosineScheduler",
    "TrainSchedules",
    "build_schedules",
    "cfg_get",
    "scaled_lr",
]

_MISSING = object()


def cfg_get(cfg: Mapping, dotted: str, default=_MISSING):
    """Read ``cfg["a"]["b"]`` for ``dotted = "a.b"``; a missing key without default raises a KeyError naming it."""
    node = cfg
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            if default is _MISSING:
                raise KeyError(f"config key '{dotted}' is missing (needed by franca.train)")
            return default
        node = node[part]
    return node


class CosineScheduler:
    """Piecewise schedule ``[0]*freeze_iters + linspace(start, base, warmup_iters) + cosine(base -> final)``."""

    def __init__(
        self,
        base_value: float,
        final_value: float,
        total_iters: int,
        warmup_iters: int = 0,
        start_warmup_value: float = 0.0,
        freeze_iters: int = 0,
    ) -> None:
        if total_iters < 0 or warmup_iters < 0 or freeze_iters < 0:
            raise ValueError(f"schedule lengths must be >= 0, got {total_iters=}, {warmup_iters=}, {freeze_iters=}")
        if freeze_iters + warmup_iters > total_iters:
            raise ValueError(
                f"freeze ({freeze_iters}) + warmup ({warmup_iters}) exceed total iterations ({total_iters})"
            )
        self.final_value = float(final_value)
        self.total_iters = int(total_iters)
        n_cos = total_iters - warmup_iters - freeze_iters
        steps = np.arange(n_cos, dtype=np.float64)
        # cosine from base (step 0) towards final (step n_cos, never reached inside the array)
        cosine = final_value + 0.5 * (base_value - final_value) * (1.0 + np.cos(np.pi * steps / max(n_cos, 1)))
        self.schedule = np.concatenate(
            [
                np.zeros(freeze_iters),
                np.linspace(start_warmup_value, base_value, warmup_iters),
                cosine,
            ]
        )
        assert len(self.schedule) == self.total_iters

    def __getitem__(self, it: int) -> float:
        if it >= self.total_iters:
            return self.final_value
        return float(self.schedule[it])

    def __len__(self) -> int:
        return self.total_iters


def scaled_lr(base_lr: float, scaling_rule: str, batch_size_per_gpu: int, world_size: int) -> float:
    """Spec 1.2: ``sqrt_wrt_1024`` gives ``base_lr * sqrt(B_g * W / 1024)``; ``none`` keeps ``base_lr``."""
    if scaling_rule == "sqrt_wrt_1024":
        return base_lr * math.sqrt(batch_size_per_gpu * world_size / 1024.0)
    if scaling_rule in ("none", None):
        return base_lr
    raise ValueError(f"config key 'optim.scaling_rule' has unknown value {scaling_rule!r} (sqrt_wrt_1024|none)")


@dataclass
class TrainSchedules:
    """All per-iteration values of spec 2.5, indexed by the iteration number."""

    lr: CosineScheduler
    wd: CosineScheduler
    momentum: CosineScheduler
    teacher_temp: CosineScheduler
    last_layer_lr: CosineScheduler
    peak_lr: float

    def at(self, it: int) -> dict[str, float]:
        return {
            "lr": self.lr[it],
            "wd": self.wd[it],
            "momentum": self.momentum[it],
            "teacher_temp": self.teacher_temp[it],
            "last_layer_lr": self.last_layer_lr[it],
        }


def build_schedules(cfg: Mapping, world_size: int = 1) -> TrainSchedules:
    """Build the schedules of spec 2.5 from the resolved config (keys of docs/interfaces.md, horizons in iterations)."""
    total = int(cfg_get(cfg, "optim.iterations"))
    warmup = int(cfg_get(cfg, "optim.warmup_iters"))
    peak = scaled_lr(
        float(cfg_get(cfg, "optim.base_lr")),
        cfg_get(cfg, "optim.scaling_rule", "sqrt_wrt_1024"),
        int(cfg_get(cfg, "train.batch_size_per_gpu")),
        world_size,
    )
    min_lr = float(cfg_get(cfg, "optim.min_lr"))
    lr = CosineScheduler(peak, min_lr, total, warmup_iters=warmup, start_warmup_value=0.0)
    wd = CosineScheduler(
        float(cfg_get(cfg, "optim.weight_decay")),
        float(cfg_get(cfg, "optim.weight_decay_end")),
        total,
    )
    momentum = CosineScheduler(
        float(cfg_get(cfg, "teacher.momentum_teacher")),
        float(cfg_get(cfg, "teacher.final_momentum_teacher", 1.0)),
        total,
    )
    # teacher temperature: linear warmup then constant (the cosine part has base == final)
    tt_warm = int(cfg_get(cfg, "teacher.warmup_teacher_temp_iters"))
    tt = float(cfg_get(cfg, "teacher.teacher_temp"))
    teacher_temp = CosineScheduler(
        tt,
        tt,
        tt_warm,
        warmup_iters=tt_warm,
        start_warmup_value=float(cfg_get(cfg, "teacher.warmup_teacher_temp")),
    )
    # last layer: the lr schedule with its first freeze_last_layer_iters values set to 0
    last_layer_lr = CosineScheduler(peak, min_lr, total, warmup_iters=warmup, start_warmup_value=0.0)
    freeze = int(cfg_get(cfg, "optim.freeze_last_layer_iters"))
    last_layer_lr.schedule[: min(freeze, total)] = 0.0
    return TrainSchedules(
        lr=lr,
        wd=wd,
        momentum=momentum,
        teacher_temp=teacher_temp,
        last_layer_lr=last_layer_lr,
        peak_lr=peak,
    )
