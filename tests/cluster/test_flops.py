"""franca.flops against torch's FLOP counter, hand-computed values, the collate function and the spec's sizes.

The measured counts use ``torch.utils.flop_counter.FlopCounterMode`` on the real modules with the explicit
attention path (its q k^T and attn v matmuls are counted; the fused SDPA kernel on CPU is not). Paper-size modules
are built on the meta device: shapes only, no memory, no arithmetic.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from franca import flops
from franca.config import compose, stage_config
from franca.data.collate import collate_data_and_cast
from franca.models.vision_transformer import build_backbone
from franca.train.ssl_meta_arch import SSLMetaArch, build_head

torch.set_num_threads(1)


def _counted(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def _pretrain_cfg(preset: str, experiment: str = "franca") -> dict:
    cfg = stage_config(compose(preset, experiment), "pretrain")
    cfg["model"] = {**cfg["model"], "attn_impl": "explicit"}
    return cfg


def test_backbone_flops_by_hand():
    # D=8, depth 1, 2 heads, P=2 on a 4x4 image: 4 patches, T=5 tokens, SwiGLU h=((int(32*2/3)+7)//8)*8=24.
    # patch embed 2*4*(3*2*2)*8=768; qkv 2*5*8*24=1920; q k^T + attn v 2*(2*25*8)=800; proj 2*5*8*8=640;
    # w12 2*5*8*48=3840; w3 2*5*24*8=1920 -> 768 + 9120 = 9888 per image.
    shape = flops.ViTShape(embed_dim=8, depth=1, num_heads=2, patch_size=2, ffn_layer="swiglu")
    assert shape.ffn_hidden == 24
    assert flops.backbone_forward_flops(shape, 4, batch=3) == 3 * 9888
    mlp = flops.ViTShape(embed_dim=8, depth=1, num_heads=2, patch_size=2, ffn_layer="mlp")  # h=32: fc1+fc2 2*2*5*8*32
    assert flops.backbone_forward_flops(mlp, 4) == 768 + 1920 + 800 + 640 + 5120


@pytest.mark.parametrize(("arch", "size"), [("vit_base", 224), ("vit_base", 98), ("vit_large", 224)])
def test_backbone_forward_matches_flop_counter(arch, size):
    model_cfg = {"arch": arch, "patch_size": 14, "ffn_layer": "swiglu", "img_size": 224, "attn_impl": "explicit"}
    with torch.device("meta"):
        model = build_backbone(model_cfg)
        x = torch.empty(2, 3, size, size)
    measured = _counted(lambda: model(x))
    expected = flops.backbone_forward_flops(flops.ViTShape.from_config(model_cfg), size, batch=2)
    assert measured == pytest.approx(expected, rel=1e-3)


@pytest.mark.parametrize(
    ("mrl", "mode"), [(True, "projection"), (True, "slice"), (True, "slice_projection"), (False, "")]
)
def test_head_forward_matches_flop_counter(mrl, mode):
    section = {"head_n_prototypes": 4096, "head_bottleneck_dim": 96, "head_hidden_dim": 256, "head_nlayers": 3}
    if mrl:
        section.update(MRL=True, n_levels=5, mrl_mode=mode)
    head = build_head(section, 160, mrl)
    x = torch.randn(7, 160)
    measured = _counted(lambda: head(x))
    shape = flops.heads_from_config({"dino": {**section, "MRL": mrl}, "ibot": {"separate_head": False}}, 160)[0]
    assert measured == pytest.approx(flops.head_forward_flops(shape, 7), rel=1e-3)
    assert sum(p.numel() for p in head.parameters()) == flops.head_params(shape)


def test_param_counts_match_modules_and_spec():
    cfg = _pretrain_cfg("paper_vitb14_in21k")
    with torch.device("meta"):
        backbone = build_backbone(cfg["model"])
        dino = build_head(cfg["dino"], 768, True)
        ibot = build_head(cfg["ibot"], 768, True, fallback=cfg["dino"])
    counts = flops.model_params(cfg)
    assert counts["backbone"] == sum(p.numel() for p in backbone.parameters())
    assert counts["dino_head"] == sum(p.numel() for p in dino.parameters())
    assert counts["ibot_head"] == sum(p.numel() for p in ibot.parameters())
    # spec 1.1 / 2.1: B backbone 86 M (README), DINO MRL head ~127 M (98 M in the last layers), iBOT MRL head ~93 M
    assert counts["backbone"] == pytest.approx(86e6, rel=0.01)
    assert counts["dino_head"] == pytest.approx(127e6, rel=0.01)
    assert counts["ibot_head"] == pytest.approx(93e6, rel=0.01)
    # README sizes of L (300 M) and g ("1,100 M"; the exact ViT-g/14 count is 1.136 B)
    for preset, params in (("paper_vitl14_in21k", 300e6), ("paper_vitg14_in21k", 1.1e9)):
        assert flops.model_params(_pretrain_cfg(preset))["backbone"] == pytest.approx(params, rel=0.04)


def test_masked_patch_expectation_matches_collate():
    n_tokens, batch = 256, 32
    samples = [{"global_crops": [torch.zeros(1, 1, 1)] * 2, "local_crops": []} for _ in range(batch)]
    rng = random.Random(0)
    counts, upperbounds = [], set()
    for _ in range(200):
        out = collate_data_and_cast(
            samples, (0.1, 0.65), 0.5, torch.float32, n_tokens, lambda n: np.arange(n_tokens) < n, rng=rng
        )
        counts.append(int(out["n_masked_patches"]))
        upperbounds.add(out["upperbound"])
    expected = flops.expected_masked_patches(2 * batch, n_tokens, 0.5, (0.1, 0.65))
    # 32 masked images, ratios stratified over [0.1, 0.65]: about 2B * 0.5 * 0.375 * N = 3072 minus the int() floors
    assert 3000 < expected < 3072
    assert np.mean(counts) == pytest.approx(expected, abs=4 * np.std(counts) / np.sqrt(len(counts)) + 0.5)
    assert upperbounds == {flops.mask_upperbound(2 * batch, n_tokens, 0.5, (0.1, 0.65))}


def _synthetic_batch(cfg: dict, batch: int, device: str) -> dict:
    g, loc, n_local = (cfg["crops"][k] for k in ("global_crops_size", "local_crops_size", "local_crops_number"))
    n_patch = (g // cfg["model"]["patch_size"]) ** 2
    masks = torch.zeros(2 * batch, n_patch, dtype=torch.bool)
    masks[0, : n_patch // 3] = True
    masks[-1, n_patch // 2 :] = True
    idx = masks.flatten().nonzero().flatten()
    weight = (1.0 / masks.sum(-1).clamp(min=1)).unsqueeze(-1).expand_as(masks)[masks]
    return {
        "collated_global_crops": torch.randn(2 * batch, 3, g, g, device=device),
        "collated_local_crops": torch.randn(n_local * batch, 3, loc, loc, device=device),
        "collated_masks": masks.to(device),
        "mask_indices_list": idx.to(device),
        "masks_weight": weight.to(device),
        "n_masked_patches": torch.tensor([idx.numel()], device=device),
        "upperbound": idx.numel() + 5,  # padding rows for the teacher's iBOT Sinkhorn-Knopp (Q3)
    }


def _check_step(cfg: dict, batch_size: int, device: str) -> None:
    with torch.device(device):
        model = SSLMetaArch(cfg)
    batch = _synthetic_batch(cfg, batch_size, device)

    def step():
        model(batch, 0.04)["loss"].backward()

    measured = _counted(step)
    m = batch["mask_indices_list"].shape[0]
    analytic = flops.training_step_flops(cfg, batch_size, 1, n_masked=m, upperbound=batch["upperbound"])
    assert analytic.ibot_teacher_rows == m + 5
    assert measured == pytest.approx(analytic.matmul_per_gpu, rel=0.01)


@pytest.mark.parametrize("drop_path_mode", ["per_sample", "batch_subset"])
def test_training_step_matches_flop_counter_tiny(drop_path_mode):
    """Teacher + student forward, losses and backward of the tiny preset on CPU, against the analytic count.
    With batch-subset stochastic depth (Q10) the student's residual branches see int(b * 0.6) of b images."""
    cfg = _pretrain_cfg("tiny")
    cfg["model"].update(drop_path_mode=drop_path_mode, drop_path_rate=0.4)
    _check_step(cfg, 3, "cpu")


def test_training_step_matches_flop_counter_paper_b():
    """The full Franca-B/14 step (MRL heads with 253,952 prototypes per head) on the meta device.
    KoLeo is switched off: its autocast guard does not accept meta tensors."""
    cfg = _pretrain_cfg("paper_vitb14_in21k")
    cfg["dino"] = {**cfg["dino"], "koleo_loss_weight": 0.0}
    _check_step(cfg, 2, "meta")


def test_paper_b_step_breakdown():
    step = flops.training_step_flops(_pretrain_cfg("paper_vitb14_in21k"))
    # student fwd + bwd ~ 3x its forward; the teacher sees only the 2 global crops
    assert step.student_backbone_bwd == pytest.approx(2 * step.student_backbone_fwd, rel=0.01)
    assert step.teacher_backbone_fwd < step.student_backbone_fwd
    # iBOT: M ~ 64 * 0.5 * 0.375 * 256 masked patches per GPU, the teacher head sees the padded upperbound rows
    assert 3000 < step.n_masked < step.ibot_teacher_rows
    assert step.sinkhorn < 0.01 * step.per_gpu
    assert step.total == step.per_gpu * 64
