"""model.multicrop_forward (issue 16 item 2): the packed multi-crop pass (every group through each block at once, as
DINOv2's nested pass) equals one pass per resolution: features and gradients, with and without drop path.

Tolerance from the numerics (tests/numerics.py): a float64 run of the per-resolution path is the reference; the
packed float32 path may differ from it by SPREAD_FACTOR times what the per-resolution float32 path itself differs by
(its rounding, measured in the same test), with a floor of a few float32 units. Drop path draws the same masks in
both paths (same seed), so any mix-up of groups or draws shows as an O(1) difference.
"""

import pytest
import torch
from numerics import EPS32, SPREAD_FACTOR, relative_spread, report

from franca.models.vision_transformer import build_backbone

torch.set_num_threads(1)
CFG = {
    "arch": "vit_custom", "patch_size": 4, "embed_dim": 32, "depth": 3, "num_heads": 2, "ffn_layer": "swiglu",
    "img_size": 16, "layerscale": 0.5,  # a large LayerScale so that every block changes the tokens
}  # fmt: skip
FLOOR = 16 * EPS32  # a few units of float32 rounding, relative to the scale of each tensor


def _crops(dtype):
    g = torch.Generator().manual_seed(0)
    x_g, x_l = torch.randn(4, 3, 16, 16, generator=g), torch.randn(8, 3, 8, 8, generator=g)
    masks = torch.rand(4, 16, generator=g) < 0.4
    return [x_g.to(dtype), x_l.to(dtype)], [masks, None]


def _run(model, dtype, seed=3):
    """Features and parameter gradients of one training-mode forward on [masked globals, locals]."""
    model = model.to(dtype)
    model.zero_grad(set_to_none=True)
    crops, masks = _crops(dtype)
    torch.manual_seed(seed)  # the drop-path draws
    outs = model(crops, masks=masks, is_training=True)
    feats = {f"{k}{i}": o[k] for i, o in enumerate(outs) for k in ("x_norm_clstoken", "x_norm_patchtokens")}
    weights = torch.Generator().manual_seed(1)
    sum((f * torch.randn(f.shape, generator=weights).to(dtype)).sum() for f in feats.values()).backward()
    grads = {f"grad.{n}": p.grad for n, p in model.named_parameters()}
    return {k: v.detach().clone() for k, v in {**feats, **grads}.items()}


@pytest.mark.parametrize("mode,rate", [("per_sample", 0.0), ("per_sample", 0.3), ("batch_subset", 0.4)])
def test_packed_multicrop_equals_per_resolution(mode, rate):
    torch.manual_seed(0)
    model = build_backbone({**CFG, "drop_path_rate": rate, "drop_path_mode": mode}).train()
    assert model.multicrop_forward == "packed"  # the default
    calls = []
    hooks = [blk.register_forward_hook(lambda *_: calls.append(1)) for blk in model.blocks]
    packed = _run(model, torch.float32)
    assert len(calls) == model.n_blocks  # one call per block for both resolutions
    model.multicrop_forward = "per_resolution"
    calls.clear()
    reference = _run(model, torch.float32)
    assert len(calls) == 2 * model.n_blocks
    for h in hooks:
        h.remove()
    reference64 = _run(model, torch.float64)
    worst = 0.0
    for key, ref in reference64.items():  # per tensor: each feature and each parameter's gradient
        spread = relative_spread({key: reference[key]}, {key: ref})
        measured = relative_spread({key: packed[key]}, {key: ref})
        assert measured <= SPREAD_FACTOR * max(spread, FLOOR), (key, measured, spread)
        worst = max(worst, measured / (SPREAD_FACTOR * max(spread, FLOOR)))
    report(f"packed multicrop {mode} {rate}", "max relative |packed - per_resolution64| / bound", worst, 1.0)
    if rate > 0:  # the draws matter: another seed gives another result
        model.multicrop_forward = "packed"
        other = _run(model, torch.float64, seed=4)
        assert relative_spread(other, reference64) > 1e-3


def test_unknown_multicrop_forward_names_the_key():
    with pytest.raises(ValueError, match="model.multicrop_forward"):
        build_backbone({**CFG, "multicrop_forward": "nested"})
