"""The two references every trained row is read against (issue 13): its own random-init backbone and raw pixels.

* ``init``: the backbone pretraining starts from. ``franca.train.loop`` seeds torch with the run seed
  (``franca.config.train_seed``) and builds ``SSLMetaArch``, whose first random draw is the student backbone; the
  teacher is a copy of it. So the teacher at iteration 0 is ``build_backbone(model)`` right after
  ``torch.manual_seed(seed)`` (tests/eval/test_baselines.py checks it against ``SSLMetaArch``). Its features are the
  final-norm CLS token, as the k-NN of the trained teacher.
* ``pixels``: the evaluation crop itself (the same resize, centre crop and normalisation), flattened to 3 x H x W.

Both are extracted from the same samples as the trained features, so a k-NN on them differs from the trained row
only in the representation.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from franca.eval.features import _EvalMode, eval_transform, iter_batches

__all__ = ["BASELINES", "extract_baseline_features", "init_backbone", "knn_baselines"]

BASELINES = ("init", "pixels")


def init_backbone(model_cfg: Mapping, seed: int) -> nn.Module:
    """The teacher backbone of a pretraining run with this model and seed, before its first step (eval mode)."""
    from franca.models.vision_transformer import build_backbone

    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(int(seed))
        backbone = build_backbone(dict(model_cfg))
    finally:
        torch.random.set_rng_state(state)
    backbone.eval().requires_grad_(False)
    return backbone


def baseline_batch_features(init: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
    """{"init": (b, D), "pixels": (b, 3 crop^2)} of one eval batch (the init backbone in eval mode, no grad)."""
    return {
        "init": init.forward_features(batch["images"])["x_norm_clstoken"].float(),
        "pixels": batch["images"].flatten(1).float(),
    }


def collect_baselines(parts: list[dict], labels: list[torch.Tensor]) -> dict[str, dict]:
    """{"init" | "pixels": {features, labels}} of the batches' :func:`baseline_batch_features`."""
    if not labels:
        raise ValueError("extract_baseline_features: the sample iterable was empty")
    return {name: {"features": torch.cat([p[name] for p in parts]), "labels": torch.cat(labels)} for name in BASELINES}


def extract_baseline_features(
    init: nn.Module, samples: Iterable[dict], resize_size: int, crop_size: int, batch_size: int
) -> dict[str, dict]:
    """{"init": {features (n, D), labels}, "pixels": {features (n, 3 crop^2), labels}} of one sample iterable."""
    parts, labels = [], []
    with _EvalMode(init):
        for batch in iter_batches(samples, batch_size, lambda im: eval_transform(im, resize_size, crop_size)):
            parts.append(baseline_batch_features(init, batch))
            labels.append(batch["labels"])
    return collect_baselines(parts, labels)


def knn_baselines(feats: Mapping, kwargs: Mapping) -> dict[str, float]:
    """k-NN (same keyword arguments as the trained row) of each baseline: metrics named ``<baseline>_<metric>``."""
    from franca.eval.knn import knn_classify

    out = {}
    for name in BASELINES:
        train, val = feats[name]["train"], feats[name]["val"]
        result = knn_classify(train["features"], train["labels"], val["features"], val["labels"], **kwargs)
        out |= {f"{name}_{metric}": value for metric, value in result["metrics"].items()}
    return out
