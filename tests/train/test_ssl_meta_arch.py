"""SSLMetaArch (spec 2.3-2.6): construction, gradients, crop swap, loss bookkeeping, EMA, parameter groups, DDP."""

import copy
import math
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from numerics import EPS32
from torch import nn

from franca.layers import DINOHead, MRLDINOHead
from franca.loss import KoLeoLoss, SinkhornKnopp
from franca.train.ssl_meta_arch import SSLMetaArch

torch.set_num_threads(1)


def tiny_cfg(**over):
    cfg = {
        "model": {
            "arch": "vit_custom", "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2,
            "ffn_layer": "swiglu", "drop_path_rate": 0.1, "layerscale": 1e-5, "img_size": 16,
            "interpolate_offset": 0.1, "interpolate_antialias": False, "attn_impl": "sdpa",
        },
        "dino": {
            "loss_weight": 1.0, "head_n_prototypes": 64, "head_bottleneck_dim": 16, "head_nlayers": 3,
            "head_hidden_dim": 32, "koleo_loss_weight": 0.1, "MRL": True, "n_levels": 5, "mrl_mode": "projection",
        },
        "ibot": {
            "loss_weight": 1.0, "separate_head": True, "head_n_prototypes": 48, "head_bottleneck_dim": 12,
            "head_nlayers": 3, "head_hidden_dim": 32, "MRL": True, "sk_padding_rows": True,
        },
        "teacher": {"student_temp": 0.1},
        "crops": {"local_crops_number": 2},
        "optim": {"patch_embed_lr_mult": 0.2, "layerwise_decay": 1.0},
    }  # fmt: skip
    for dotted, value in over.items():
        section, key = dotted.split(".")
        cfg[section][key] = value
    return cfg


def make_batch(b=3, n_local=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    masks = torch.zeros(2 * b, 16, dtype=torch.bool)
    masks[0, [0, 1, 5, 9]] = True
    masks[2 * b - 1, 3:10] = True
    idx = masks.flatten().nonzero().flatten()
    weights = (1 / masks.sum(1).clamp(min=1)).unsqueeze(1).expand_as(masks)[masks]
    return {
        "collated_global_crops": torch.randn(2 * b, 3, 16, 16, generator=g),
        "collated_local_crops": torch.randn(n_local * b, 3, 8, 8, generator=g),
        "collated_masks": masks,
        "mask_indices_list": idx,
        "masks_weight": weights,
        "n_masked_patches": torch.tensor([idx.numel()]),
        "upperbound": idx.numel() + 5,
    }


def build(seed=0, **over):
    torch.manual_seed(seed)
    return SSLMetaArch(tiny_cfg(**over))


def test_teacher_is_an_exact_frozen_copy_without_drop_path():
    model = build()
    assert set(model.student) == set(model.teacher) == {"backbone", "dino_head", "ibot_head"}
    s, t = model.student.state_dict(), model.teacher.state_dict()
    assert s.keys() == t.keys() and all(torch.equal(s[k], t[k]) for k in s)
    assert not any(p.requires_grad for p in model.teacher.parameters())
    model.train()
    assert model.student.training and not model.teacher.training
    assert all(b.drop_path1.drop_prob == 0.1 for b in model.student["backbone"].blocks)
    assert all(b.drop_path1.drop_prob == 0.0 for b in model.teacher["backbone"].blocks)
    dino, ibot = model.student["dino_head"], model.student["ibot_head"]
    assert isinstance(dino, MRLDINOHead) and dino.nesting_list == [2, 4, 8, 16, 32]
    assert dino.out_dims == (4, 8, 16, 32, 64) and ibot.out_dims == (3, 6, 12, 24, 48)


def test_every_student_parameter_gets_a_gradient_and_the_teacher_none():
    model = build().train()
    batch = make_batch()
    losses = model(batch, teacher_temp=0.04)
    losses["loss"].backward()
    missing = [n for n, p in model.student.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert missing == []
    assert all(p.grad is None for p in model.teacher.parameters())


def test_teacher_targets_swap_the_global_crops():
    model = build()
    batch = make_batch()
    targets = model.teacher_targets(batch, 0.05)
    with torch.no_grad():
        out = model.teacher["backbone"].forward_features(batch["collated_global_crops"])
        cls = out["x_norm_clstoken"]
        swapped = torch.cat((cls[3:], cls[:3]))
        sk = SinkhornKnopp()
        expected = [sk.dino_targets(z, 0.05) for z in model.teacher["dino_head"](swapped)]
        natural = [sk.dino_targets(z, 0.05) for z in model.teacher["dino_head"](cls)]
    for got, ref, nat in zip(targets["dino"], expected, natural, strict=True):
        torch.testing.assert_close(got, ref)
        torch.testing.assert_close(got[:3], nat[3:])  # SK is column-permutation equivariant: a pure swap
    m = batch["mask_indices_list"].numel()
    assert [t.shape for t in targets["ibot"]] == [(m, k) for k in (3, 6, 12, 24, 48)]
    torch.testing.assert_close(targets["ibot"][2].sum(1), torch.ones(m))
    assert targets["n_masked_total"].item() == m


def test_compute_losses_bookkeeping():
    model = build(**{"dino.loss_weight": 0.7, "ibot.loss_weight": 1.3}).eval()
    batch = make_batch()
    out = model.student_outputs(batch)
    assert out["cls_global"].shape == (6, 32)
    assert [z.shape for z in out["dino_local"]] == [(6, k) for k in (4, 8, 16, 32, 64)]
    assert [z.shape for z in out["dino_global"]] == [(6, k) for k in (4, 8, 16, 32, 64)]
    losses = model.compute_losses(out, model.teacher_targets(batch, 0.04), batch)
    koleo = 0.1 * (KoLeoLoss()(out["cls_global"][:3]) + KoLeoLoss()(out["cls_global"][3:]))
    torch.testing.assert_close(losses["koleo_loss"], koleo)
    dino = losses["dino_local_crops_loss"] + losses["dino_global_crops_loss"]
    torch.testing.assert_close(losses["loss"], 0.7 * dino + koleo + 1.3 * losses["ibot_loss"])
    torch.testing.assert_close(losses["koleo_loss_logged"], koleo.detach() / 2)
    torch.testing.assert_close(losses["ibot_loss_logged"], losses["ibot_loss"].detach() / 2)
    torch.testing.assert_close(
        losses["total_loss_logged"], dino.detach() + koleo.detach() / 2 + losses["ibot_loss"].detach() / 2
    )
    torch.testing.assert_close(sum(losses[f"dino_level{i}"] for i in range(5)), dino.detach())
    torch.testing.assert_close(sum(losses[f"ibot_level{i}"] for i in range(5)), losses["ibot_loss"].detach())
    # near-uniform heads at init: each level's DINO loss is close to log K_l (local + 2 global of 6 terms)
    for i, k in enumerate((4, 8, 16, 32, 64)):
        assert losses[f"dino_level{i}"].item() == pytest.approx(math.log(k), rel=0.02)


def test_single_head_baseline_and_shared_ibot_head():
    model = build(**{"dino.MRL": False, "ibot.MRL": False, "ibot.separate_head": False})
    assert isinstance(model.student["dino_head"], DINOHead) and "ibot_head" not in model.student
    assert model.student["dino_head"].out_dims == (64,)
    batch = make_batch()
    losses = model(batch, 0.04)
    assert "dino_level0" in losses and "dino_level1" not in losses
    losses["loss"].backward()
    assert all(p.grad is not None for p in model.student.parameters())


def test_no_local_crops_and_clean_padding_and_centering_guard():
    model = build(**{"crops.local_crops_number": 0, "ibot.sk_padding_rows": False})
    batch = make_batch(n_local=0)
    out = model.student_outputs(batch)
    assert out["dino_local"] is None
    losses = model.compute_losses(out, model.teacher_targets(batch, 0.04), batch)
    assert losses["dino_local_crops_loss"].item() == 0.0 and torch.isfinite(losses["loss"])
    cfg = tiny_cfg()
    cfg["train"] = {"centering": "centering"}
    with pytest.raises(ValueError, match="centering"):
        SSLMetaArch(cfg)


def test_update_teacher_is_an_exact_ema_over_parameters():
    model = build()
    with torch.no_grad():
        for p in model.student.parameters():
            p.add_(torch.randn_like(p))
    s = {k: v.clone() for k, v in model.student.state_dict().items()}
    t = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    model.update_teacher(0.9)
    # t m + (1 - m) s and the reference each round at most 3 times, by half a float32 unit of a value below
    # |t| + |s|: they differ by at most 2 EPS32 (|t| + |s|) per element, on any CPU (a fixed atol of 1e-6 is 2 units
    # at |w| = 4, where the student's perturbed weights reach)
    for k, v in model.teacher.state_dict().items():
        diff = (v.double() - (0.9 * t[k] + 0.1 * s[k]).double()).abs()
        assert bool((diff <= 2 * EPS32 * (t[k].double().abs() + s[k].double().abs())).all()), k
    model.update_teacher(1.0)  # m = 1 leaves the teacher unchanged bit for bit
    after = model.teacher.state_dict()
    model.update_teacher(1.0)
    assert all(torch.equal(after[k], v) for k, v in model.teacher.state_dict().items())
    model.update_teacher(0.0)  # m = 0 copies the student exactly
    assert all(torch.equal(s[k], v) for k, v in model.teacher.state_dict().items())


def test_param_groups_rules():
    model = build(**{"optim.layerwise_decay": 0.5})
    groups = model.param_groups()
    names = [g["name"] for g in groups]
    assert sorted(names) == sorted(f"{k}.{n}" for k, m in model.student.items() for n, _ in m.named_parameters())
    by_name = {g["name"]: g for g in groups}
    assert {tuple(sorted(g)) for g in groups} == {("is_last_layer", "lr_multiplier", "name", "params", "wd_multiplier")}
    for name, g in by_name.items():
        no_wd = name.endswith(".bias") or "norm" in name or "gamma" in name
        assert g["wd_multiplier"] == (0.0 if no_wd else 1.0)
        assert g["is_last_layer"] == (".last_layers." in name)
    assert by_name["backbone.pos_embed"]["wd_multiplier"] == 1.0
    assert by_name["backbone.blocks.0.ls1.gamma"]["wd_multiplier"] == 0.0
    # depth 2: embeddings are layer 0 -> 0.5^3, block i -> 0.5^(2 - i), final norm -> 1; patch embed x 0.2
    assert by_name["backbone.patch_embed.proj.weight"]["lr_multiplier"] == pytest.approx(0.2 * 0.125)
    assert by_name["backbone.cls_token"]["lr_multiplier"] == pytest.approx(0.125)
    assert by_name["backbone.blocks.1.attn.qkv.weight"]["lr_multiplier"] == pytest.approx(0.5)
    assert by_name["backbone.norm.weight"]["lr_multiplier"] == 1.0
    assert by_name["dino_head.mlps.0.0.weight"]["lr_multiplier"] == 1.0
    default = {g["name"]: g for g in build().param_groups()}
    assert default["backbone.patch_embed.proj.weight"]["lr_multiplier"] == pytest.approx(0.2)
    assert default["backbone.blocks.0.attn.qkv.weight"]["lr_multiplier"] == 1.0


class Wrapper(nn.Module):
    """Stands in for DDP: holds ``.module`` and forwards every call to it."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def test_wrapped_student_backbone_keeps_working():
    model = build().eval()
    batch = make_batch()
    ref = model.student_outputs(batch)
    model.student["backbone"] = Wrapper(model.student["backbone"])
    got = model.student_outputs(batch)
    torch.testing.assert_close(got["dino_global"][4], ref["dino_global"][4])
    assert not any(".module." in g["name"] for g in model.param_groups())
    model.update_teacher(0.5)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, state, out_path):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:

        def all_reduce(t):
            dist.all_reduce(t)
            return t

        model = SSLMetaArch(tiny_cfg(**{"model.drop_path_rate": 0.0}), all_reduce=all_reduce, world_size=world)
        model.load_state_dict(state)
        for key in list(model.student):
            model.student[key] = nn.parallel.DistributedDataParallel(model.student[key])
        losses = model(make_batch(seed=rank), 0.04)
        losses["loss"].backward()
        grads = {n: p.grad.clone() for n, p in model.student.named_parameters()}
        model.update_teacher(0.9)
        torch.save({"grads": grads, "loss": losses["loss"].detach()}, f"{out_path}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.ddp
@pytest.mark.slow  # ~15-35 s on 2 busy cores: two spawned interpreters import torch
def test_ddp_wrapped_student_in_a_two_process_gloo_group(tmp_path):
    state = copy.deepcopy(build().state_dict())
    out = str(tmp_path / "ddp")
    mp.spawn(_ddp_worker, args=(2, _free_port(), state, out), nprocs=2, join=True)
    r0, r1 = (torch.load(f"{out}.{r}") for r in range(2))
    assert torch.isfinite(r0["loss"]) and not torch.equal(r0["loss"], r1["loss"])  # different local batches
    assert r0["grads"].keys() == r1["grads"].keys() and len(r0["grads"]) > 0
    # DDP averaged the gradients: bit-identical on both ranks (gloo's all-reduce hands every rank the same reduced
    # buffer; any tolerance here would hide replicas drifting apart)
    for name, g in r0["grads"].items():
        assert torch.equal(g, r1["grads"][name]), name


def test_builds_from_an_omegaconf_config():
    omegaconf = pytest.importorskip("omegaconf")
    torch.manual_seed(0)
    model = SSLMetaArch(omegaconf.OmegaConf.create(tiny_cfg(**{"dino.mrl_mode": "slice"})))
    assert model.student["dino_head"].mode == "slice" and model.student["ibot_head"].mode == "slice"
    assert torch.isfinite(model(make_batch(), 0.04)["loss"])
