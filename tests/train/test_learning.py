"""The tiny preset learns (issue 3; spec 10.1 rows 8-9): a short pretraining run on the generated shapes lowers the
optimised loss, and the teacher's k-NN accuracy on held-out images ends far above the same network's at init.

The run is the workflow's tiny pretraining, unchanged: config/train/tiny.yaml, config/model/tiny.yaml (100
iterations at batch 32) on a generated set of the size of config/data/synth.yaml (2000 train / 200 val images), one
thread as in the workflow. (60 iterations on 1000 images reach only 0.25 k-NN, too close to the margin.)
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from franca.config import compose, stage_config
from franca.data.shards import iter_samples, list_shards
from franca.data.synthetic import generate
from franca.eval.features import extract_cls_features
from franca.eval.knn import knn_classify
from franca.train.checkpoint import load_backbone
from franca.train.loop import train
from franca.train.ssl_meta_arch import SSLMetaArch

N_TRAIN, N_VAL, N_CLASSES = 2000, 200, 8
WINDOW = 10  # iterations per loss window (log_period 1): the first 10 against the last 10
K = 20
# Margin on the k-NN gain (teacher after - same teacher at init), from the binomial noise of N_VAL queries: each
# accuracy has std <= sqrt(0.25 / 200) = 0.035, their difference <= 0.05, so 0.20 is 4 sigma of pure noise. The
# measured gains are 0.42 and 0.52 (MEASURED), >= 4.5 sigma above the margin, while a run that does not learn sits
# 4 sigma below it.
MIN_KNN_GAIN = 0.20
MEASURED = (
    "measured with this test, 1 thread: seed 0 k-NN 0.135 -> 0.555, loss windows 35.9 -> 30.5 (-15%); "
    "seed 1 k-NN 0.130 -> 0.650, loss 37.2 -> 30.4 (-18%); with lr ~0 the loss windows move 0.7%"
)
# The loss falls by 15-18% over the run; with lr ~0 (no optimisation) the first and last windows differ by 0.7%
# (measured, 40 iterations: 45.66 -> 45.32), so a 5% drop separates the two.
MIN_LOSS_DROP = 0.05


def _pretrain_config() -> dict:
    cfg = compose("tiny", "franca")
    stage = stage_config(cfg, "pretrain")
    stage["run"] = {**cfg["run"], "num_threads": 1, "checkpoint_period": 0, "log_period": 1}
    return stage


def _knn_top1(backbone: torch.nn.Module, shards: Path) -> float:
    kwargs = {"resize_size": 32, "crop_size": 32, "batch_size": 200}  # the tiny eval resolution (global crop size)
    bank = extract_cls_features(backbone, iter_samples(list_shards(shards, "train")), **kwargs)
    query = extract_cls_features(backbone, iter_samples(list_shards(shards, "val")), **kwargs)
    out = knn_classify(bank["features"], bank["labels"], query["features"], query["labels"], ks=(K,))
    return out["metrics"][f"top1_k{K}"]


@pytest.mark.slow  # ~100 s with 1 busy core (data 5 s, training 80 s, two feature passes 10 s)
def test_tiny_pretraining_learns(tmp_path):
    torch.set_num_threads(1)
    generate(tmp_path / "data", seed=1234, n_train=N_TRAIN, n_val=N_VAL, n_test=0, image_size=64,
             n_classes=N_CLASSES, shard_size=500, position_bias=0.8)  # fmt: skip
    shards = tmp_path / "data" / "shards"
    cfg = _pretrain_config()

    torch.manual_seed(int(cfg["seed"]))  # the loop builds its model right after the same seeding
    initial = SSLMetaArch(cfg).teacher["backbone"]
    knn_before = _knn_top1(initial, shards)

    summary = train(cfg, shards=[str(p) for p in list_shards(shards, "train")], kept_keys=None,
                    out_dir=tmp_path / "out", ckpt_dir=tmp_path / "ckpt", progress=False)  # fmt: skip
    trained, _ = load_backbone(summary["checkpoint"])
    knn_after = _knn_top1(trained, shards)

    rows = [json.loads(line) for line in Path(summary["metrics"]).read_text().splitlines()]
    iterations = int(cfg["optim"]["iterations"])
    assert [r["iteration"] for r in rows] == list(range(iterations))
    assert all(math.isfinite(r["loss"]) for r in rows)
    first = sum(r["loss"] for r in rows[:WINDOW]) / WINDOW
    last = sum(r["loss"] for r in rows[-WINDOW:]) / WINDOW
    assert last < (1 - MIN_LOSS_DROP) * first, (
        f"optimised loss did not fall: mean of iterations 0-{WINDOW - 1} = {first:.3f}, "
        f"of the last {WINDOW} = {last:.3f} (need a drop of >= {MIN_LOSS_DROP:.0%}); {MEASURED}"
    )
    sigma = math.sqrt(knn_before * (1 - knn_before) / N_VAL + knn_after * (1 - knn_after) / N_VAL)
    assert knn_after - knn_before >= MIN_KNN_GAIN, (
        f"teacher k-NN top-1 (k={K}) on {N_VAL} held-out images: {knn_before:.3f} at init -> {knn_after:.3f} "
        f"after {iterations} iterations; gain {knn_after - knn_before:.3f} < margin {MIN_KNN_GAIN} "
        f"(binomial std of the gain {sigma:.3f}; chance {1 / N_CLASSES:.3f}); {MEASURED}"
    )
