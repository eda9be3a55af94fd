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


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_packed_flash_attention_in_bf16_equals_the_reference_on_cuda():
    """The GPU fast path (packed multi-crop, SDPA restricted to the FlashAttention kernel, bf16 autocast) against the
    reference path (per resolution, explicit attention) in bf16 autocast, both judged against float64."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    # head_dim 64: a FlashAttention shape; no drop path (CUDA draws float32 and float64 masks differently; the
    # draws of both paths are shown equal on the CPU above)
    cfg = {**CFG, "embed_dim": 128}
    model = build_backbone(cfg).train()
    with torch.autocast("cuda", dtype=torch.bfloat16), sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        fast = run_backbone(model, torch.float32, device="cuda")
    model.multicrop_forward = "per_resolution"
    for blk in model.blocks:
        blk.attn.attn_impl = "explicit"
    with torch.autocast("cuda", dtype=torch.bfloat16):
        reference = run_backbone(model, torch.float32, device="cuda")
    reference64 = run_backbone(model, torch.float64, device="cuda")
    assert_matches_float64("packed + flash, bf16, cuda", fast, reference, reference64)
