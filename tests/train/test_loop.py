"""The training loop (spec 2.5, 2.6, 4): determinism, exact resume, NaN stop, parameter groups, stage init."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from franca.data.shards import list_shards
from franca.data.synthetic import generate
from franca.train import checkpoint as ck
from franca.train.highres import init_from_checkpoint, resize_for_highres
from franca.train.loop import train
from franca.train.optim import apply_schedules, build_optimizer
from franca.train.ssl_meta_arch import SSLMetaArch

_HEAD = {
    "head_n_prototypes": 64,
    "head_bottleneck_dim": 16,
    "head_nlayers": 3,
    "head_hidden_dim": 32,
    "MRL": True,
    "n_levels": 5,
    "mrl_mode": "projection",
    "loss_weight": 1.0,
}

TINY_CFG = {
    "model": {
        "arch": "vit_custom",
        "patch_size": 4,
        "embed_dim": 32,
        "depth": 2,
        "num_heads": 2,
        "ffn_layer": "swiglu",
        "drop_path_rate": 0.1,
        "layerscale": 1e-5,
        "img_size": 32,
        "interpolate_offset": 0.1,
        "interpolate_antialias": False,
        "attn_impl": "sdpa",
    },
    "dino": {**_HEAD, "koleo_loss_weight": 0.1},
    "ibot": {
        **_HEAD,
        "mask_sample_probability": 0.5,
        "mask_ratio_min_max": [0.1, 0.65],
        "separate_head": True,
        "sk_padding_rows": True,
    },
    "masking": {"use_block_masking": True, "use_inverse_block": True, "roll": True, "min_aspect": 0.3},
    "crops": {
        "global_crops_scale": [0.32, 1.0],
        "local_crops_number": 2,
        "local_crops_scale": [0.05, 0.32],
        "global_crops_size": 32,
        "local_crops_size": 16,
        "blur_probs": "effective",
    },
    "teacher": {
        "momentum_teacher": 0.994,
        "final_momentum_teacher": 1.0,
        "warmup_teacher_temp": 0.04,
        "teacher_temp": 0.07,
        "warmup_teacher_temp_iters": 3,
        "student_temp": 0.1,
    },
    "optim": {
        "iterations": 6,
        "warmup_iters": 2,
        "base_lr": 4e-3,
        "scaling_rule": "sqrt_wrt_1024",
        "min_lr": 1e-6,
        "weight_decay": 0.04,
        "weight_decay_end": 0.2,
        "clip_grad": 3.0,
        "freeze_last_layer_iters": 1,
        "patch_embed_lr_mult": 0.2,
        "layerwise_decay": 1.0,
        "betas": [0.9, 0.999],
    },
    "train": {"batch_size_per_gpu": 4, "centering": "sinkhorn_knopp", "precision": "fp32", "distributed": "ddp"},
    "seed": 0,
    "run": {"device": "cpu", "checkpoint_period": 2, "log_period": 1, "keep_checkpoints": 2, "num_workers": 0},
}


@pytest.fixture
def tiny_cfg():
    return copy.deepcopy(TINY_CFG)


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    generate(out, seed=0, n_train=48, n_val=0, n_test=0, image_size=32, n_classes=4, shard_size=12)
    return [str(p) for p in list_shards(out / "shards", "train")]


def _run(cfg, shards, root, **kw):
    """One training run on a single thread (bitwise comparisons need the same reduction order in every run)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        dirs = {"out_dir": root / "out", "ckpt_dir": root / "ckpt"}
        return train(cfg, shards=shards, kept_keys=None, progress=False, **dirs, **kw)
    finally:
        torch.set_num_threads(threads)


def _weights(path):
    ckpt = ck.load_checkpoint(path)
    return {f"{tree}.{k}": v for tree in ("student", "teacher") for k, v in ckpt[tree].items()}


def _assert_same_weights(a, b):
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def _metrics(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


class _Interrupt(Exception):
    pass


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, tiny_shards):
    """An uninterrupted 6-iteration run (checkpoints every 2)."""
    root = tmp_path_factory.mktemp("reference")
    summary = _run(copy.deepcopy(TINY_CFG), tiny_shards, root)
    return root, summary


def test_run_outputs_and_metrics(reference_run):
    root, summary = reference_run
    assert summary["iterations"] == 6 and summary["start_iteration"] == 0
    final = ck.load_checkpoint(root / "out" / "checkpoint.pt")
    assert final["iteration"] == 6 and final["config"]["model"]["embed_dim"] == 32
    assert any(k.startswith("ibot_head.") for k in final["student"])
    lines = _metrics(root / "out" / "metrics.jsonl")
    assert [m["iteration"] for m in lines] == list(range(6))
    first = lines[0]
    for key in ("loss", "dino_local_crops_loss", "dino_global_crops_loss", "koleo_loss", "ibot_loss", "lr", "wd",
                "momentum", "teacher_temp", "last_layer_lr", "images_per_s", "dino_level4", "ibot_level0",
                "koleo_loss_logged", "ibot_loss_logged", "total_loss_logged", "grad_norm_backbone"):  # fmt: skip
        assert key in first and math.isfinite(first[key]), key
    assert first["lr"] == 0.0 and first["last_layer_lr"] == 0.0 and first["teacher_temp"] == pytest.approx(0.04)
    assert first["ibot_loss_logged"] == pytest.approx(first["ibot_loss"] / 2)
    # at initialisation student == teacher and the heads are near uniform: level i's DINO loss is about log K_i
    for i, k in enumerate((4, 8, 16, 32, 64)):
        assert first[f"dino_level{i}"] == pytest.approx(math.log(k), rel=0.05)
    # rolling checkpoints: iterations 2 and 4 (6 is the final one), both kept
    assert sorted(int(p.stem.split("-")[-1]) for p in (root / "ckpt").glob("ckpt-*.pt")) == [2, 4]


def test_same_seed_gives_identical_weights(reference_run, tiny_shards, tmp_path):
    root, _ = reference_run
    _run(copy.deepcopy(TINY_CFG), tiny_shards, tmp_path)
    _assert_same_weights(_weights(root / "out" / "checkpoint.pt"), _weights(tmp_path / "out" / "checkpoint.pt"))
    other = copy.deepcopy(TINY_CFG) | {"seed": 1}
    _run(other, tiny_shards, tmp_path / "seed1")
    a, b = _weights(root / "out" / "checkpoint.pt"), _weights(tmp_path / "seed1" / "out" / "checkpoint.pt")
    assert not torch.equal(a["student.backbone.pos_embed"], b["student.backbone.pos_embed"])


def test_interrupted_then_resumed_equals_uninterrupted(reference_run, tiny_shards, tmp_path):
    root, _ = reference_run

    def crash_at_3(step, metrics):
        if step == 3:  # after the rolling checkpoint of iteration 2, before the one of iteration 4
            raise _Interrupt

    with pytest.raises(_Interrupt):
        _run(copy.deepcopy(TINY_CFG), tiny_shards, tmp_path, log_fn=crash_at_3)
    assert not (tmp_path / "out" / "checkpoint.pt").exists()
    summary = _run(copy.deepcopy(TINY_CFG), tiny_shards, tmp_path)
    assert summary["start_iteration"] == 2 and summary["resumed_from"].endswith("000000002.pt")
    _assert_same_weights(_weights(root / "out" / "checkpoint.pt"), _weights(tmp_path / "out" / "checkpoint.pt"))
    ref, got = _metrics(root / "out" / "metrics.jsonl"), _metrics(tmp_path / "out" / "metrics.jsonl")
    assert [m["iteration"] for m in got] == list(range(6))  # lines logged after the checkpoint were redone once
    for a, b in zip(ref, got, strict=True):
        a.pop("images_per_s"), b.pop("images_per_s")
        assert a == b


def test_dataloader_workers_are_deterministic(tiny_cfg, tiny_shards, tmp_path):
    tiny_cfg["run"]["num_workers"] = 2
    tiny_cfg["optim"].update(iterations=3, warmup_iters=1)
    for name in ("a", "b"):
        _run(copy.deepcopy(tiny_cfg), tiny_shards, tmp_path / name)
    a, b = (_weights(tmp_path / name / "out" / "checkpoint.pt") for name in ("a", "b"))
    _assert_same_weights(a, b)
    rolling = ck.load_checkpoint(next((tmp_path / "a" / "ckpt").glob("ckpt-*.pt")))
    assert rolling["data_position"] == [2 * tiny_cfg["train"]["batch_size_per_gpu"]]


def test_resume_refuses_other_world_size(reference_run, tiny_shards, tmp_path):
    root, _ = reference_run
    ckpt_file = max((root / "ckpt").glob("ckpt-*.pt"))
    state = ck.load_checkpoint(ckpt_file)
    state["world_size"] = 2
    ck.atomic_torch_save(state, tmp_path / "ckpt" / ckpt_file.name)
    with pytest.raises(ValueError, match="world size 2"):
        _run(copy.deepcopy(TINY_CFG), tiny_shards, tmp_path)


def test_nan_loss_raises_naming_iteration_and_terms(tiny_cfg, tiny_shards, tmp_path, monkeypatch):
    original = SSLMetaArch.compute_losses
    calls = []

    def poisoned(self, student_out, targets, batch):
        losses = original(self, student_out, targets, batch)
        calls.append(1)
        if len(calls) == 3:  # iteration 2
            losses["ibot_loss"] = losses["ibot_loss"] * float("nan")
            losses["loss"] = losses["loss"] + losses["ibot_loss"]
        return losses

    monkeypatch.setattr(SSLMetaArch, "compute_losses", poisoned)
    with pytest.raises(FloatingPointError, match=r"iteration 2 .*ibot_loss=nan"):
        _run(tiny_cfg, tiny_shards, tmp_path)


def test_param_groups_applied_no_decay_on_bias_norm_gamma(tiny_cfg):
    torch.manual_seed(0)
    model = SSLMetaArch(tiny_cfg)
    opt = build_optimizer(model.param_groups(), tiny_cfg)
    apply_schedules(opt, lr=1e-3, wd=0.1, last_layer_lr=0.0)
    group_of = {id(p): g for g in opt.param_groups for p in g["params"]}
    names = dict(model.student.named_parameters())
    assert set(map(id, names.values())) == set(group_of)  # every student parameter is optimised exactly once
    n_checked = {"no_wd": 0, "patch": 0, "last": 0}
    for name, p in names.items():
        g = group_of[id(p)]
        no_wd = name.endswith(".bias") or "norm" in name or "gamma" in name
        n_checked["no_wd"] += no_wd
        assert g["weight_decay"] == (0.0 if no_wd else 0.1), name
        if "last_layer" in name:
            n_checked["last"] += 1
            assert g["lr"] == 0.0, name
        elif "patch_embed" in name:
            n_checked["patch"] += 1
            assert g["lr"] == pytest.approx(2e-4), name
        else:
            assert g["lr"] == 1e-3, name
    assert all(v > 0 for v in n_checked.values()), n_checked
    assert not any(p.requires_grad for p in model.teacher.parameters())


def test_stage_init_full_and_highres_backbone(reference_run, tiny_cfg, tiny_shards, tmp_path):
    root, _ = reference_run
    final = root / "out" / "checkpoint.pt"
    saved = ck.load_checkpoint(final)
    torch.manual_seed(123)
    model = SSLMetaArch(tiny_cfg)
    init_from_checkpoint(model, final, "full")
    for tree in ("student", "teacher"):
        for k, v in getattr(model, tree).state_dict().items():
            assert torch.equal(v, saved[tree][k]), (tree, k)

    # stage 2: offline pos_embed resize 8x8 -> 16x16, then backbone-only init with fresh heads
    resized = resize_for_highres(final, tmp_path / "resized.pt", target_img_size=64)
    new = ck.load_checkpoint(resized)
    pe_old, pe_new = saved["teacher"]["backbone.pos_embed"], new["teacher"]["backbone.pos_embed"]
    assert pe_new.shape == (1, 1 + 16 * 16, 32) and torch.equal(pe_new[:, 0], pe_old[:, 0])
    assert new["config"]["model"]["img_size"] == 64
    hr_cfg = copy.deepcopy(tiny_cfg)
    hr_cfg["model"]["img_size"] = hr_cfg["crops"]["global_crops_size"] = 64
    torch.manual_seed(7)
    fresh = SSLMetaArch(hr_cfg)
    heads = {k: v.clone() for k, v in fresh.student.state_dict().items() if not k.startswith("backbone.")}
    init_from_checkpoint(fresh, resized, "backbone")
    for tree in ("student", "teacher"):
        state = getattr(fresh, tree).state_dict()
        for k, v in new["teacher"].items():
            if k.startswith("backbone."):
                assert torch.equal(state[k], v), (tree, k)
    for k, v in heads.items():
        assert torch.equal(fresh.student.state_dict()[k], v), k  # heads stay freshly initialised
    # the workflow's highres job does the same resize in memory, from the pretraining checkpoint itself
    torch.manual_seed(7)
    in_memory = SSLMetaArch(hr_cfg)
    init_from_checkpoint(in_memory, final, "highres")
    for tree in ("student", "teacher"):
        ref, got = getattr(fresh, tree).state_dict(), getattr(in_memory, tree).state_dict()
        assert all(torch.equal(got[k], ref[k]) for k in ref), tree
    # without the offline resize the backbone load refuses the 8x8 grid with a clear error
    with pytest.raises(ValueError, match="pos_embed.*resize_for_highres"):
        init_from_checkpoint(SSLMetaArch(hr_cfg), final, "backbone")
    # and the loop runs the fine-tune from the resized checkpoint
    hr_cfg["optim"].update(iterations=2, warmup_iters=1)
    summary = _run(hr_cfg, tiny_shards, tmp_path / "hr", init_from=resized, init_mode="backbone")
    assert ck.load_checkpoint(summary["checkpoint"])["teacher"]["backbone.pos_embed"].shape == (1, 257, 32)


def test_load_backbone_for_evaluation(reference_run):
    root, _ = reference_run
    backbone, cfg = ck.load_backbone(root / "out" / "checkpoint.pt")
    saved = ck.load_checkpoint(root / "out" / "checkpoint.pt")["teacher"]
    assert not backbone.training and cfg["model"]["depth"] == 2
    for k, v in backbone.state_dict().items():
        assert torch.equal(v, saved[f"backbone.{k}"]), k
    with torch.no_grad():
        out = backbone.forward_features(torch.randn(2, 3, 32, 32))
    assert out["x_norm_clstoken"].shape == (2, 32) and out["x_norm_patchtokens"].shape == (2, 64, 32)


@pytest.mark.slow
def test_tiny_pretraining_lowers_the_loss(tmp_path):
    generate(tmp_path / "data", seed=1, n_train=256, n_val=0, n_test=0, image_size=32, n_classes=4, shard_size=64)
    shards = [str(p) for p in list_shards(tmp_path / "data" / "shards", "train")]
    cfg = copy.deepcopy(TINY_CFG)
    cfg["optim"].update(iterations=60, warmup_iters=6, base_lr=4e-2, freeze_last_layer_iters=1)
    cfg["teacher"]["warmup_teacher_temp_iters"] = 18
    cfg["train"]["batch_size_per_gpu"] = 16
    cfg["run"]["checkpoint_period"] = 1000
    _run(cfg, shards, tmp_path)
    lines = _metrics(tmp_path / "out" / "metrics.jsonl")
    first, last = lines[:10], lines[-10:]

    def mean(rows, key):
        return sum(r[key] for r in rows) / len(rows)

    assert mean(last, "loss") < mean(first, "loss") - 0.5
    assert mean(last, "koleo_loss") < 0.5 * mean(first, "koleo_loss")  # the CLS tokens spread out
    # at these widths the heads start near-uniform (trunc_normal(0.02) over 32-wide layers): the DINO / iBOT terms
    # sit at their log K_l value and must at least not drift up
    for key in ("dino_local_crops_loss", "dino_global_crops_loss", "ibot_loss"):
        assert mean(last, key) <= mean(first, key) + 1e-3, key
