"""The references of the trained rows (issue 13): the run's own random-init backbone and raw pixels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from franca.config import compose, stage_config, train_seed
from franca.eval.baselines import extract_baseline_features, init_backbone, knn_baselines
from franca.eval.features import eval_transform
from franca.train.distributed import DistInfo
from franca.train.loop import _build_model


@pytest.mark.parametrize("experiment", ["franca", "dinov2"])
def test_init_backbone_is_the_teacher_pretraining_starts_from(experiment):
    """The same weights as the teacher of the training loop's model before its first step, for heads of any kind,
    and the global RNG is left as it was."""
    cfg = stage_config(compose("tiny", experiment, seed=3), "pretrain")
    assert train_seed(cfg) == 3
    model = _build_model(cfg, DistInfo(0, 1, 0, torch.device("cpu"), None), 3)
    teacher = model.teacher["backbone"].state_dict()
    torch.manual_seed(11)
    before = torch.rand(4)
    torch.manual_seed(11)
    ours = init_backbone(cfg["model"], train_seed(cfg)).state_dict()
    assert torch.equal(torch.rand(4), before)
    assert ours.keys() == teacher.keys()
    assert all(torch.equal(ours[k], teacher[k]) for k in ours)
    other = init_backbone(cfg["model"], 4).state_dict()
    assert not torch.equal(other["pos_embed"], ours["pos_embed"])


def _samples(n: int, seed: int) -> list[dict]:
    """Two classes told apart by colour alone: raw pixels separate them, a random ViT barely does."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        label = i % 2
        base = np.array([200, 40, 40] if label else [40, 40, 200], dtype=np.int16)
        pixels = np.clip(base + rng.integers(-30, 30, (32, 32, 3)), 0, 255).astype(np.uint8)
        out.append({"image": Image.fromarray(pixels), "label": label, "key": f"k{i}"})
    return out


def test_pixel_features_are_the_eval_crop_and_knn_names_each_baseline():
    cfg = compose("tiny", "franca")
    init = init_backbone(cfg["model"], 0)
    samples = {"train": _samples(40, 0), "val": _samples(20, 1)}
    feats = {split: extract_baseline_features(init, s, 32, 32, 16) for split, s in samples.items()}
    pixels = feats["val"]["pixels"]["features"]
    assert pixels.shape == (20, 3 * 32 * 32) and feats["val"]["init"]["features"].shape == (20, 64)
    assert torch.equal(pixels[3], eval_transform(samples["val"][3]["image"], 32, 32).flatten())
    assert torch.equal(feats["val"]["init"]["labels"], torch.tensor([i % 2 for i in range(20)]))
    by_name = {name: {split: feats[split][name] for split in feats} for name in ("init", "pixels")}
    metrics = knn_baselines(by_name, {"ks": [5], "temperature": 0.07})
    assert set(metrics) == {"init_top1_k5", "init_top5_k5", "pixels_top1_k5", "pixels_top5_k5"}
    assert metrics["pixels_top1_k5"] == 1.0


def test_one_pass_equals_the_separate_extractions():
    """The features job's single pass per split (linear features and baselines on the same decoded batches) equals
    the linear and baseline extractions run one after the other, batch by batch, and leaves the test split's
    baselines out."""
    from franca.eval.features import extract_linear_features, extract_patch_features
    from franca.eval.run import extract_eval_features

    cfg = compose("tiny", "franca")
    torch.manual_seed(0)
    backbone, init = init_backbone(cfg["model"], 5), init_backbone(cfg["model"], 0)
    samples = {"train": _samples(24, 0), "val": _samples(10, 1), "test": _samples(6, 2)}
    geometry = {"resize_size": 32, "crop_size": 32, "batch_size": 8}
    feats = extract_eval_features(backbone, samples, {"val": samples["val"]}, geometry, 4, init=init)
    for split, split_samples in samples.items():
        ref = extract_linear_features(backbone, split_samples, n_last_blocks=4, **geometry)
        assert all(torch.equal(feats["linear"][split][k], ref[k]) for k in ("cls_tokens", "patch_mean", "labels"))
        if split == "test":
            assert all(split not in feats["baselines"][name] for name in ("init", "pixels"))
            continue
        alone = extract_baseline_features(init, split_samples, 32, 32, 8)
        for name in ("init", "pixels"):
            assert torch.equal(feats["baselines"][name][split]["features"], alone[name]["features"])
            assert torch.equal(feats["baselines"][name][split]["labels"], alone[name]["labels"])
    dense = extract_patch_features(backbone, samples["val"], **geometry)
    assert torch.equal(feats["dense"]["val"]["patch_tokens"], dense["patch_tokens"])
    assert "baselines" not in extract_eval_features(backbone, samples, {}, geometry, 4)


def test_absolute_input_paths_give_valid_mlflow_tag_names():
    from mlflow.utils.validation import _validate_tag_name

    from franca.stages.common import input_hash_tags

    tags = input_hash_tags({"/tmp/x/features.pt": {"sha256": "0" * 64}, "results/a.pt": {"sha256": "1" * 64}})
    for key in tags:
        _validate_tag_name(key)
    assert "input_sha256/tmp/x/features.pt" in tags and "input_sha256/results/a.pt" in tags
