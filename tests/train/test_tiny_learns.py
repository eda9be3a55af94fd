"""The tiny recipe's own terms learn (issue 13 "done when"), on a shortened run: the DINO and iBOT terms end below their
uniform-target values, the teacher k-NN is >= 3x chance and beats the same seed's random-init backbone.

No tiny recipe measured so far meets all four (docs/tiny-evidence.md): as configured the DINO term ends at its uniform
value; with teacher temperature 0.02 both terms fall below (DINO 19.17 / 20.79, iBOT 6.66 / 10.40 after 100 it) but
the k-NN drops to 0.255 (0.455 as configured). The criteria test is therefore a strict xfail: it fails loudly (XPASS)
once a recipe meets them, and then the marker goes.

The run is config/train/tiny.yaml and config/model/tiny.yaml as composed for the workflow, shortened to ITERATIONS on
N_TRAIN generated images (one thread). Uniform values: a target that is the same for every image is uniform, and the
cross-entropy is then sum_l log K_l (K_l = 16 ... 256 for the 5 MRL levels); the DINO local and global weights sum
to 1 for 2 global and 4 local crops, and iBOT averages over the masked half of the global crops. Bounds: see MEASURED.
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
from franca.layers.mrl_dino_head import nesting_dims
from franca.train.checkpoint import load_backbone
from franca.train.loop import train
from franca.train.ssl_meta_arch import SSLMetaArch

ITERATIONS, N_TRAIN, N_VAL, N_CLASSES, K = 40, 640, 160, 8, 20
MEASURED = (
    "measured on this run with teacher temperature 0.02 and no LayerScale: DINO 19.889 / 20.794, iBOT 7.323 / 10.397, "
    "k-NN 0.169 vs init 0.181; as configured the DINO term stays at its uniform value (docs/tiny-evidence.md)"
)
MAX_DINO_RATIO = 0.97  # end / uniform
MAX_IBOT_RATIO = 0.90
MIN_KNN_FACTOR = 3.0  # x chance
MIN_KNN_GAIN = 0.15  # over random init: > 3 binomial std of the difference at 160 queries (<= 0.056)


def _uniform(section: dict, embed_dim: int) -> float:
    k, dims = int(section["head_n_prototypes"]), nesting_dims(embed_dim, int(section["n_levels"]))
    return sum(math.log(int(k * d / dims[-1])) for d in dims)


def _knn(backbone, shards: Path) -> float:
    kw = {"resize_size": 32, "crop_size": 32, "batch_size": 160}
    bank = extract_cls_features(backbone, iter_samples(list_shards(shards, "train")), **kw)
    query = extract_cls_features(backbone, iter_samples(list_shards(shards, "val")), **kw)
    out = knn_classify(bank["features"], bank["labels"], query["features"], query["labels"], ks=(K,))
    return float(out["metrics"][f"top1_k{K}"])


def test_logged_uniform_values_of_the_tiny_heads():
    """The ``*_uniform`` metrics the page draws: sum_l log K_l with the DINO crop weights, iBOT times the share of
    global crops that carry a mask."""
    torch.manual_seed(0)
    stage = stage_config(compose("tiny", "franca"), "pretrain")
    model = SSLMetaArch(stage)
    masks = torch.zeros(64, 64, dtype=torch.bool)
    masks[:16, :5] = True  # 16 of 64 global crops carry a mask
    out = model._uniform_values({"collated_masks": masks}, n_local=4)
    s = _uniform(stage["dino"], int(stage["model"]["embed_dim"]))
    assert s == pytest.approx(20.794, abs=1e-3)  # K_l = 16, 32, 64, 128, 256
    assert float(out["dino_local_crops_uniform"]) == pytest.approx(0.8 * s)  # 2 x 4 of 10 crop pairs
    assert float(out["dino_global_crops_uniform"]) == pytest.approx(0.2 * s)
    assert float(out["ibot_uniform"]) == pytest.approx(0.25 * s)


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="issue 13: no measured tiny recipe meets all learning criteria (MEASURED)")
def test_tiny_recipe_terms_learn_on_a_short_run(tmp_path):
    torch.set_num_threads(1)
    cfg = compose("tiny", "franca")
    synth = cfg["data"]["datasets"]["synth"]
    generate(tmp_path / "data", seed=77, n_train=N_TRAIN, n_val=N_VAL, n_test=0, image_size=synth["image_size"],
             n_classes=N_CLASSES, shard_size=N_TRAIN, position_bias=synth["position_bias"])  # fmt: skip
    shards = tmp_path / "data" / "shards"
    stage = stage_config(cfg, "pretrain")
    stage["optim"]["iterations"] = ITERATIONS
    stage["run"] = {**cfg["run"], "num_threads": 1, "checkpoint_period": 0, "log_period": 1}
    torch.manual_seed(int(stage["seed"]))  # the loop builds its model right after the same seeding
    initial = SSLMetaArch(stage).teacher["backbone"]
    summary = train(stage, shards=[str(p) for p in list_shards(shards, "train")], kept_keys=None,
                    out_dir=tmp_path / "out", ckpt_dir=tmp_path / "ckpt", progress=False)  # fmt: skip
    rows = [json.loads(line) for line in Path(summary["metrics"]).read_text().splitlines()]
    last = rows[-5:]
    d = int(stage["model"]["embed_dim"])
    dino_u = _uniform(stage["dino"], d)
    ibot_u = _uniform({**stage["dino"], **stage["ibot"]}, d) * float(stage["ibot"]["mask_sample_probability"])
    logged = sum(r["dino_local_crops_uniform"] + r["dino_global_crops_uniform"] for r in rows) / len(rows)
    assert logged == pytest.approx(dino_u, rel=1e-6)
    dino = sum(r["dino_local_crops_loss"] + r["dino_global_crops_loss"] for r in last) / len(last)
    ibot = sum(r["ibot_loss"] for r in last) / len(last)
    knn_init, knn = _knn(initial, shards), _knn(load_backbone(summary["checkpoint"])[0], shards)
    report = (f"DINO {dino:.3f} (uniform {dino_u:.3f}), iBOT {ibot:.3f} (uniform {ibot_u:.3f}), k-NN {knn:.3f} "
              f"(init {knn_init:.3f}, chance {1 / N_CLASSES:.3f}); {MEASURED}")  # fmt: skip
    assert dino < MAX_DINO_RATIO * dino_u, report
    assert ibot < MAX_IBOT_RATIO * ibot_u, report
    assert knn >= MIN_KNN_FACTOR / N_CLASSES, report
    assert knn - knn_init >= MIN_KNN_GAIN, report
