"""Schedules of spec 2.5 at their endpoints and known midpoints; optimizer group application."""

from __future__ import annotations

import math

import pytest
import torch

from franca.train.optim import apply_schedules, build_optimizer, clip_gradients, fuse_param_groups
from franca.train.schedules import CosineScheduler, build_schedules, scaled_lr


def _cfg(**optim):
    base = {
        "iterations": 1000,
        "warmup_iters": 100,
        "base_lr": 4e-3,
        "scaling_rule": "sqrt_wrt_1024",
        "min_lr": 1e-6,
        "weight_decay": 0.04,
        "weight_decay_end": 0.2,
        "freeze_last_layer_iters": 10,
        "betas": [0.9, 0.999],
        "clip_grad": 3.0,
    }
    base.update(optim)
    return {
        "optim": base,
        "teacher": {
            "momentum_teacher": 0.994,
            "final_momentum_teacher": 1.0,
            "warmup_teacher_temp": 0.04,
            "teacher_temp": 0.07,
            "warmup_teacher_temp_iters": 300,
        },
        "train": {"batch_size_per_gpu": 64},
    }


def test_sqrt_scaling_rule():
    # spec 1.2: lr = base_lr * sqrt(B_g * W / 1024); B/14 recipe 7.07e-4 at 2048 -> 1.0e-3
    assert scaled_lr(7.07e-4, "sqrt_wrt_1024", 32, 64) == pytest.approx(7.07e-4 * math.sqrt(2.0))
    assert scaled_lr(2e-4, "sqrt_wrt_1024", 32, 96) == pytest.approx(3.4641e-4, rel=1e-4)
    assert scaled_lr(1e-3, "none", 32, 96) == 1e-3
    with pytest.raises(ValueError, match="scaling_rule"):
        scaled_lr(1e-3, "linear", 32, 1)


def test_lr_warmup_then_cosine():
    s = build_schedules(_cfg(), world_size=4)  # B*W = 256 -> lr = 4e-3 * 0.5 = 2e-3
    peak = 2e-3
    assert s.peak_lr == pytest.approx(peak)
    assert s.lr[0] == 0.0
    assert s.lr[50] == pytest.approx(peak * 50 / 99)  # linspace(0, peak, 100) includes both ends
    assert s.lr[99] == pytest.approx(peak)
    assert s.lr[100] == pytest.approx(peak)  # cosine step 0
    # cosine over 900 steps: midpoint (step 450) is the mean of peak and min_lr
    assert s.lr[550] == pytest.approx((peak + 1e-6) / 2)
    assert s.lr[999] == pytest.approx(1e-6 + 0.5 * (peak - 1e-6) * (1 + math.cos(math.pi * 899 / 900)))
    assert s.lr[1000] == 1e-6 and s.lr[10**6] == 1e-6


def test_weight_decay_cosine_up():
    s = build_schedules(_cfg(), world_size=1)
    assert s.wd[0] == pytest.approx(0.04)
    assert s.wd[500] == pytest.approx(0.12)  # (0.04 + 0.2) / 2 at T/2
    assert s.wd[250] == pytest.approx(0.2 - 0.16 * (1 + math.cos(math.pi / 4)) / 2)
    assert s.wd[1000] == pytest.approx(0.2)


def test_teacher_momentum_formula():
    s = build_schedules(_cfg(), world_size=1)
    for it in (0, 1, 137, 500, 999):
        expected = 1 - (1 - 0.994) * (1 + math.cos(math.pi * it / 1000)) / 2
        assert s.momentum[it] == pytest.approx(expected, abs=1e-15)
    assert s.momentum[0] == pytest.approx(0.994)
    assert s.momentum[500] == pytest.approx(0.997)
    assert s.momentum[1000] == 1.0


def test_teacher_temperature_warmup_then_constant():
    s = build_schedules(_cfg(), world_size=1)
    assert s.teacher_temp[0] == pytest.approx(0.04)
    assert s.teacher_temp[299] == pytest.approx(0.07)
    assert s.teacher_temp[150] == pytest.approx(0.04 + 0.03 * 150 / 299)
    assert s.teacher_temp[300] == pytest.approx(0.07) and s.teacher_temp[999] == pytest.approx(0.07)
    # no warmup at all: constant
    no_warm = build_schedules({**_cfg(), "teacher": {**_cfg()["teacher"], "warmup_teacher_temp_iters": 0}})
    assert no_warm.teacher_temp[0] == pytest.approx(0.07)


def test_last_layer_lr_frozen_then_follows_lr():
    s = build_schedules(_cfg(), world_size=1)
    assert all(s.last_layer_lr[it] == 0.0 for it in range(10))
    assert s.lr[5] > 0
    assert all(s.last_layer_lr[it] == s.lr[it] for it in range(10, 1000, 37))


def test_scheduler_validates_lengths():
    with pytest.raises(ValueError, match="exceed"):
        CosineScheduler(1.0, 0.0, total_iters=10, warmup_iters=8, freeze_iters=5)
    with pytest.raises(KeyError, match="optim.iterations"):
        build_schedules({"optim": {}})


def _toy_groups():
    torch.manual_seed(0)
    w, b, g, last = (torch.nn.Parameter(torch.randn(3)) for _ in range(4))
    groups = [
        {"params": [w], "wd_multiplier": 1.0, "lr_multiplier": 1.0, "is_last_layer": False, "name": "backbone.w"},
        {"params": [b], "wd_multiplier": 0.0, "lr_multiplier": 1.0, "is_last_layer": False, "name": "backbone.b"},
        {"params": [g], "wd_multiplier": 0.0, "lr_multiplier": 0.2, "is_last_layer": False, "name": "patch.bias"},
        {"params": [last], "wd_multiplier": 1.0, "lr_multiplier": 1.0, "is_last_layer": True, "name": "last_layer"},
    ]
    return groups, (w, b, g, last)


def test_fuse_and_apply_schedules():
    groups, _ = _toy_groups()
    groups.append({**groups[0], "params": [torch.nn.Parameter(torch.zeros(2))], "name": "backbone.w2"})
    fused = fuse_param_groups(groups)
    assert len(fused) == 4 and fused[0]["names"] == ["backbone.w", "backbone.w2"]
    opt = build_optimizer(groups, _cfg())
    assert opt.defaults["betas"] == (0.9, 0.999)
    apply_schedules(opt, lr=1e-3, wd=0.1, last_layer_lr=0.0)
    got = {tuple(g["names"]): (g["lr"], g["weight_decay"]) for g in opt.param_groups}
    assert got[("backbone.w", "backbone.w2")] == (1e-3, 0.1)
    assert got[("backbone.b",)] == (1e-3, 0.0)
    assert got[("patch.bias",)] == pytest.approx((2e-4, 0.0))
    assert got[("last_layer",)] == (0.0, 0.1)


def test_frozen_last_layer_does_not_move_and_no_decay_params_only_move_by_grad():
    groups, (w, b, g, last) = _toy_groups()
    opt = build_optimizer(groups, _cfg())
    before = [p.detach().clone() for p in (w, b, g, last)]
    apply_schedules(opt, lr=1e-2, wd=0.5, last_layer_lr=0.0)
    for p in (w, b, g, last):
        p.grad = torch.zeros_like(p)  # zero gradient: only weight decay can move a parameter
    opt.step()
    assert torch.equal(last, before[3])  # lr 0
    assert torch.equal(b, before[1]) and torch.equal(g, before[2])  # no weight decay on bias/norm/gamma groups
    assert torch.allclose(w, before[0] * (1 - 1e-2 * 0.5))  # decoupled decay: w <- w (1 - lr wd)


def test_clip_gradients_per_module():
    mods = {"backbone": torch.nn.Linear(4, 4), "dino_head": torch.nn.Linear(4, 2)}
    for m, scale in zip(mods.values(), (100.0, 0.01), strict=True):
        for p in m.parameters():
            p.grad = torch.full_like(p, scale)
    norms = clip_gradients(mods, 3.0)
    n_bb = math.sqrt(20) * 100.0
    assert float(norms["grad_norm_backbone"]) == pytest.approx(n_bb)
    clipped = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in mods["backbone"].parameters()]))
    assert float(clipped) == pytest.approx(3.0, rel=1e-5)
    # the small head is untouched: clipping is per module, not global
    assert all(torch.equal(p.grad, torch.full_like(p, 0.01)) for p in mods["dino_head"].parameters())
