"""Does the tiny recipe learn? One tiny pretraining with Hydra overrides, measured as docs/tiny-evidence.md reports.

    python benchmarks/tiny_evidence.py NAME [override ...] [--iters N] [--data DIR] [--seed S]

Prints one JSON line: DINO (local + global) and iBOT loss, mean of the first 5 / last 10 iterations, against their
uniform-target values (DINO: sum_l log K_l; iBOT: (masked images / global crops) sum_l log K_l), teacher k-NN top-1
(k = 20, the val split against the train split at the tiny eval resolution) after training and at init, and raw-pixel
k-NN on the same images. The data is generated once per DIR with config/data/synth.yaml's sizes.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

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

K = 20
EVAL = {"resize_size": 32, "crop_size": 32, "batch_size": 200}


def uniform_value(section: dict, embed_dim: int) -> float:
    """sum_l log K_l of a head section (one level log K without MRL)."""
    k = int(section["head_n_prototypes"])
    if not section.get("MRL", True):
        return math.log(k)
    dims = nesting_dims(embed_dim, int(section.get("n_levels", 5)))
    return sum(math.log(int(k * d / dims[-1])) for d in dims)


def knn(backbone: torch.nn.Module | None, shards: Path) -> float:
    """Teacher CLS k-NN; with backbone None, raw pixels (the 32x32 eval crop, flattened)."""
    if backbone is None:
        backbone = _Pixels()
    bank = extract_cls_features(backbone, iter_samples(list_shards(shards, "train")), **EVAL)
    query = extract_cls_features(backbone, iter_samples(list_shards(shards, "val")), **EVAL)
    out = knn_classify(bank["features"], bank["labels"], query["features"], query["labels"], ks=(K,))
    return float(out["metrics"][f"top1_k{K}"])


class _Pixels(torch.nn.Module):
    """A backbone stand-in whose CLS feature is the normalised image itself."""

    def forward_features(self, x):
        return {"x_norm_clstoken": x.flatten(1), "x_norm_patchtokens": x.flatten(2).transpose(1, 2)}

    def forward(self, x):
        return x.flatten(1)


def make_data(root: Path, synth_kwargs: dict) -> Path:
    if not (root / "manifest.parquet").exists():
        generate(root, **synth_kwargs)
    return root / "shards"


def window(rows: list[dict], key: str, sl: slice) -> float:
    vals = [r[key] for r in rows[sl]]
    return sum(vals) / len(vals)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("name")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--iters", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--experiment", default="franca")
    ap.add_argument("--data", default="/tmp/evidence/data")
    ap.add_argument("--style", default="", help="generator style (franca.data.synthetic.STYLES); default the config's")
    ap.add_argument("--out", default="/tmp/evidence/runs")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = compose("tiny", args.experiment, args.seed, args.overrides)
    ds = dict(cfg["data"]["datasets"]["synth"])
    synth = {k: ds[k] for k in ("seed", "n_train", "n_val", "image_size", "n_classes", "position_bias", "shard_size")}
    synth["n_test"] = 0
    synth["style"] = args.style or ds.get("style", "shapes")
    shards = make_data(Path(args.data), synth)
    stage = stage_config(cfg, "pretrain")
    if args.iters:
        stage["optim"]["iterations"] = args.iters
    stage["run"] = {**cfg["run"], "num_threads": 1, "checkpoint_period": 0, "log_period": 1}
    out = Path(args.out) / f"{args.name}-s{args.seed}"
    t0 = time.perf_counter()
    torch.manual_seed(int(stage.get("seed", cfg["seed"])))
    initial = SSLMetaArch(stage).teacher["backbone"]
    summary = train(stage, shards=[str(p) for p in list_shards(shards, "train")], kept_keys=None,
                    out_dir=out, ckpt_dir=out / "ckpt", progress=False)  # fmt: skip
    t_train = time.perf_counter() - t0
    rows = [json.loads(line) for line in Path(summary["metrics"]).read_text().splitlines()]
    d = int(cfg["model"]["embed_dim"])
    u_dino = uniform_value(stage["dino"], d)
    u_ibot = uniform_value({**stage["dino"], **stage["ibot"]}, d) * float(stage["ibot"]["mask_sample_probability"])
    for r in rows:
        r["dino"] = r["dino_local_crops_loss"] + r["dino_global_crops_loss"]
    backbone, _ = load_backbone(summary["checkpoint"])
    res = {
        "name": args.name,
        "seed": args.seed,
        "overrides": args.overrides,
        "iters": len(rows),
        "dino_uniform": round(u_dino, 3),
        "dino_start": round(window(rows, "dino", slice(0, 5)), 3),
        "dino_end": round(window(rows, "dino", slice(-10, None)), 3),
        "ibot_uniform": round(u_ibot, 3),
        "ibot_start": round(window(rows, "ibot_loss", slice(0, 5)), 3),
        "ibot_end": round(window(rows, "ibot_loss", slice(-10, None)), 3),
        "koleo_end": round(window(rows, "koleo_loss", slice(-10, None)), 4),
        "knn": knn(backbone, shards),
        "knn_init": knn(initial, shards),
        "knn_pixels": knn(None, shards),
        "chance": 1 / int(synth["n_classes"]),
        "train_s": round(t_train, 1),
    }
    print(json.dumps(res), flush=True)
    with (Path(args.out) / "results.jsonl").open("a") as fh:
        fh.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    main()
