"""Shared by the fast-path parity tests (issue 16 item 2): a training-mode multi-crop backbone run that returns its
features and parameter gradients, and the per-tensor comparison against a float64 reference.

Tolerance (tests/numerics.py): the float64 run of the reference path is the truth; a fast float32 path may differ
from it by SPREAD_FACTOR times what the reference float32 path itself differs by (its rounding, measured in the same
test), with a floor of 16 float32 units relative to each tensor's scale.
"""

from __future__ import annotations

import torch
from numerics import EPS32, SPREAD_FACTOR, relative_spread, report

FLOOR = 16 * EPS32


def crops(dtype, device="cpu"):
    """[globals (4, 3, 16, 16), locals (8, 3, 8, 8)] and their masks [(4, 16) bool, None] for patch size 4."""
    g = torch.Generator().manual_seed(0)
    x_g, x_l = torch.randn(4, 3, 16, 16, generator=g), torch.randn(8, 3, 8, 8, generator=g)
    masks = torch.rand(4, 16, generator=g) < 0.4
    return [x_g.to(device, dtype), x_l.to(device, dtype)], [masks.to(device), None]


def run_backbone(model, dtype, seed=3, device="cpu") -> dict[str, torch.Tensor]:
    """Features and parameter gradients (float64, on the CPU) of one forward on [masked globals, locals]; ``model``
    is moved to dtype and device. Runs under whatever autocast the caller has entered."""
    model = model.to(device, dtype)
    model.zero_grad(set_to_none=True)
    x, masks = crops(dtype, device)
    torch.manual_seed(seed)  # the drop-path draws
    outs = model(x, masks=masks, is_training=True)
    feats = {f"{k}{i}": o[k] for i, o in enumerate(outs) for k in ("x_norm_clstoken", "x_norm_patchtokens")}
    weights = torch.Generator().manual_seed(1)
    loss = sum((f.float() * torch.randn(f.shape, generator=weights).to(device)).sum() for f in feats.values())
    loss.backward()
    grads = {f"grad.{n}": p.grad for n, p in model.named_parameters()}
    return {k: v.detach().double().cpu() for k, v in {**feats, **grads}.items()}


def assert_matches_float64(name: str, candidate: dict, reference: dict, reference64: dict) -> None:
    """Per tensor: |candidate - ref64| / scale <= SPREAD_FACTOR max(|reference - ref64| / scale, FLOOR)."""
    worst = 0.0
    for key, ref in reference64.items():
        bound = SPREAD_FACTOR * max(relative_spread({key: reference[key]}, {key: ref}), FLOOR)
        measured = relative_spread({key: candidate[key]}, {key: ref})
        assert measured <= bound, (key, measured, bound)
        worst = max(worst, measured / bound)
    report(name, "max relative |fast - reference64| / bound", worst, 1.0)
