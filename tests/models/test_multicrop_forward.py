"""model.multicrop_forward (issue 16 item 2): the packed multi-crop pass (every group through each block at once, as
DINOv2's nested pass) equals one pass per resolution: features and gradients, with and without drop path.

Tolerance from the numerics (tests/fastpath.py): against a float64 run of the per-resolution path, SPREAD_FACTOR
times the per-resolution float32 run's own spread. Drop path draws the same masks in both paths (same seed), so any
mix-up of groups or draws shows as an O(1) difference.
"""

import pytest
import torch
from fastpath import assert_matches_float64, run_backbone
from numerics import relative_spread

from franca.models.vision_transformer import build_backbone

torch.set_num_threads(1)
CFG = {
    "arch": "vit_custom", "patch_size": 4, "embed_dim": 32, "depth": 3, "num_heads": 2, "ffn_layer": "swiglu",
    "img_size": 16, "layerscale": 0.5,  # a large LayerScale so that every block changes the tokens
}  # fmt: skip


@pytest.mark.parametrize("mode,rate", [("per_sample", 0.0), ("per_sample", 0.3), ("batch_subset", 0.4)])
def test_packed_multicrop_equals_per_resolution(mode, rate):
    torch.manual_seed(0)
    model = build_backbone({**CFG, "drop_path_rate": rate, "drop_path_mode": mode}).train()
    assert model.multicrop_forward == "packed"  # the default
    calls = []
    hooks = [blk.register_forward_hook(lambda *_: calls.append(1)) for blk in model.blocks]
    packed = run_backbone(model, torch.float32)
    assert len(calls) == model.n_blocks  # one call per block for both resolutions
    model.multicrop_forward = "per_resolution"
    calls.clear()
    reference = run_backbone(model, torch.float32)
    assert len(calls) == 2 * model.n_blocks
    for h in hooks:
        h.remove()
    reference64 = run_backbone(model, torch.float64)
    assert_matches_float64(f"packed multicrop {mode} {rate}", packed, reference, reference64)
    if rate > 0:  # the draws matter: another seed gives another result
        model.multicrop_forward = "packed"
        other = run_backbone(model, torch.float64, seed=4)
        assert relative_spread(other, reference64) > 1e-3


def test_unknown_multicrop_forward_names_the_key():
    with pytest.raises(ValueError, match="model.multicrop_forward"):
        build_backbone({**CFG, "multicrop_forward": "nested"})
