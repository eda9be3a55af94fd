"""Eval transforms, extraction through a stand-in backbone, run_benchmark and the metrics JSON."""

import json

import numpy as np
import pytest
import torch
from eval_synth import make_samples
from PIL import Image

from franca.eval.features import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    eval_transform,
    extract_cls_features,
    extract_linear_features,
    extract_patch_features,
    seg_eval_transform,
)
from franca.eval.run import run_benchmark, write_eval_json
from franca.rasa import RASAHead


def test_eval_transform_resize_crop_normalise():
    img = np.zeros((20, 40, 3), dtype=np.uint8)
    img[:, 10:30] = 255  # white centre band, exactly the centre crop after resizing 20 -> 10 rows
    out = eval_transform(Image.fromarray(img), resize_size=10, crop_size=10)  # 10 x 20 -> centre 10 x 10
    assert out.shape == (3, 10, 10)
    white = (1.0 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(out[:, 5, 5], white, atol=0.02, rtol=0)
    seg = np.zeros((20, 40), dtype=np.uint8)
    seg[:, 20:] = 2
    seg[0, 0] = 255
    out_seg = seg_eval_transform(seg, 10, 10)
    assert out_seg.shape == (10, 10) and set(out_seg.unique().tolist()) == {0, 2}  # nearest: no new labels
    assert (out_seg[:, :5] == 0).all() and (out_seg[:, 5:] == 2).all()


def test_extractors_shapes_labels_and_mode(stand_in):
    samples = make_samples(5)
    stand_in.train()
    cls = extract_cls_features(stand_in, samples, resize_size=16, crop_size=16, batch_size=2)
    assert cls["features"].shape == (5, 16) and cls["keys"] == [s["key"] for s in samples]
    assert cls["labels"].tolist() == [s["label"] for s in samples]
    assert stand_in.training  # restored
    lin = extract_linear_features(stand_in, samples, n_last_blocks=4, resize_size=16, crop_size=16, batch_size=2)
    assert lin["cls_tokens"].shape == (5, 2, 16)  # clipped to the stand-in's 2 blocks
    torch.testing.assert_close(lin["cls_tokens"][:, -1], cls["features"])  # last block, normed = final CLS
    dense = extract_patch_features(stand_in, samples, resize_size=16, crop_size=16, batch_size=3)
    assert dense["patch_tokens"].shape == (5, 4, 4, 16) and dense["segs"].shape == (5, 16, 16)
    head = RASAHead(16, torch.randn(1, 2, 16))
    debiased = extract_patch_features(stand_in, samples, rasa_head=head, resize_size=16, crop_size=16)
    torch.testing.assert_close(debiased["patch_tokens"], head(dense["patch_tokens"]))
    unlabeled = [dict(s, label=None, seg=None) for s in samples[:2]]
    assert extract_cls_features(stand_in, unlabeled, 16, 16)["labels"].tolist() == [-1, -1]
    assert extract_patch_features(stand_in, unlabeled, resize_size=16, crop_size=16)["segs"] is None
    with pytest.raises(ValueError, match="seg"):
        extract_patch_features(stand_in, samples[:1] + unlabeled[:1], resize_size=16, crop_size=16)


@pytest.mark.parametrize("name", ["knn", "linear", "logreg", "hummingbird", "linseg", "overcluster", "position_probe"])
def test_run_benchmark_every_benchmark(stand_in, name, tmp_path):
    torch.set_num_threads(1)
    splits = {"train": make_samples(24, seed=0), "val": make_samples(12, seed=1)}
    cfg = {
        "resize_size": 16,
        "crop_size": 16,
        "batch_size": 8,
        "num_classes": 3,
        "knn": {"ks": [5, 20]},
        "linear": {"epochs": 2, "lrs": [1e-2, 0.1]},
        "logreg": {"n_c": 2, "max_iter": 100},
        "hummingbird": {"k": 5},
        "linseg": {"epochs": 2},
        "overcluster": {"mask_size": 16, "nredo": 1},
    }
    head = RASAHead(16, torch.randn(1, 2, 16)) if name in ("hummingbird", "position_probe") else None
    res = run_benchmark(name, stand_in, splits, cfg, rasa_head=head)
    metrics = res["metrics"]
    assert metrics and all(isinstance(v, float) for v in metrics.values())
    expected_key = {
        "knn": "top1_k20",
        "linear": "top1",
        "logreg": "top1",
        "hummingbird": "miou",
        "linseg": "miou",
        "overcluster": "miou",
        "position_probe": "r2_rasa",
    }[name]
    assert expected_key in metrics
    payload = write_eval_json(tmp_path / f"{name}.json", name, "ckpt.pth", head is not None, res)
    loaded = json.loads((tmp_path / f"{name}.json").read_text())
    assert loaded == payload and loaded["benchmark"] == name and loaded["rasa"] == (head is not None)


def test_run_benchmark_errors(stand_in):
    with pytest.raises(KeyError, match="unknown benchmark"):
        run_benchmark("nope", stand_in, {}, {})
    with pytest.raises(KeyError, match="val"):
        run_benchmark("knn", stand_in, {"train": []}, {})
    with pytest.raises(KeyError, match="num_classes"):
        run_benchmark(
            "linseg", stand_in, {"train": make_samples(2), "val": make_samples(2)}, {"resize_size": 16, "crop_size": 16}
        )


def test_real_backbone_integration():
    vit = pytest.importorskip("franca.models.vision_transformer")
    torch.manual_seed(0)
    model = vit.DinoVisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2)
    samples = make_samples(4)
    lin = extract_linear_features(model, samples, n_last_blocks=4, resize_size=16, crop_size=16)
    assert lin["cls_tokens"].shape == (4, 2, 32) and lin["patch_mean"].shape == (4, 32)
    cls = extract_cls_features(model, samples, resize_size=16, crop_size=16)
    # tolerance: the same network through two entry points (other batch layouts, hence other GEMM blocking): float32
    # rounding of LayerNorm'd O(1) values, a few units of 1.2e-7; 1e-5 = 84 units (measured: exact on this CPU)
    torch.testing.assert_close(lin["cls_tokens"][:, -1], cls["features"], atol=1e-5, rtol=1e-5)
    head = RASAHead(32, torch.randn(2, 2, 32))
    plain = extract_patch_features(model, samples, resize_size=16, crop_size=16)
    debiased = extract_patch_features(model, samples, rasa_head=head, resize_size=16, crop_size=16)
    assert plain["patch_tokens"].shape == (4, 4, 4, 32)
    torch.testing.assert_close(debiased["patch_tokens"], head(plain["patch_tokens"]), atol=1e-5, rtol=1e-5)
