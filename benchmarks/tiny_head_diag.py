"""Why does a DINO term sit at its uniform value? Teacher CLS and head statistics of a tiny checkpoint (or its init).

    python benchmarks/tiny_head_diag.py RUN_DIR [--init]

On 256 val-split eval crops (32 px) it prints: the spread of the teacher CLS across images (mean pairwise cosine,
and the ratio of across-image std to the feature norm), and per DINO level the across-image std of the teacher logits
against their across-prototype std, the entropy of the Sinkhorn-Knopp targets (teacher temperature 0.07) against
log K and the batch floor log(K / n) -- a target that is the same for every image is uniform, and then CE = log K.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
from pathlib import Path

import torch

from franca.data.shards import iter_samples, list_shards
from franca.eval.features import eval_transform, iter_batches
from franca.loss.sinkhorn_knopp import SinkhornKnopp
from franca.train.checkpoint import load_checkpoint
from franca.train.ssl_meta_arch import SSLMetaArch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("--init", action="store_true")
    ap.add_argument("--data", default="/tmp/evidence/data")
    ap.add_argument("--temp", type=float, default=0.07)
    args = ap.parse_args()
    ckpt = load_checkpoint(Path(args.run) / "checkpoint.pt")
    cfg = ckpt["config"]
    torch.manual_seed(int(cfg.get("seed", 0)))
    model = SSLMetaArch(cfg)
    if not args.init:
        model.teacher.load_state_dict(ckpt["teacher"])
    model.eval()
    samples = itertools.islice(iter_samples(list_shards(Path(args.data) / "shards", "val")), 256)
    batch = next(iter(iter_batches(samples, 256, lambda im: eval_transform(im, 32, 32))))
    sk = SinkhornKnopp(n_iterations=int(cfg["train"]["sk_iterations"]))
    with torch.no_grad():
        cls = model.teacher["backbone"].forward_features(batch["images"])["x_norm_clstoken"]  # (n, D)
        levels = model.teacher["dino_head"](cls)
        cn = torch.nn.functional.normalize(cls, dim=-1)
        out = {
            "run": args.run,
            "init": args.init,
            "cls_mean_pairwise_cos": round(float((cn @ cn.t()).mean()), 4),
            "cls_across_image_std_over_norm": round(float(cls.std(0).norm() / cls.norm(dim=-1).mean()), 4),
            "levels": [],
        }
        n = cls.shape[0]
        head = model.teacher["dino_head"]
        gs = [float(last.weight_g.abs().mean()) for last in head.last_layers] if hasattr(head, "last_layers") else []
        out["weight_g_mean_per_level"] = [round(g, 4) for g in gs]
        for z in levels:
            t = sk.dino_targets(z, args.temp)
            ent = float(-(t * t.clamp_min(1e-12).log()).sum(-1).mean())
            k = z.shape[1]
            out["levels"].append(
                {
                    "K": k,
                    "logit_std_across_images": round(float(z.std(0).mean()), 4),
                    "logit_std_across_protos": round(float(z.std(1).mean()), 4),
                    "target_entropy": round(ent, 3),
                    "log_K": round(math.log(k), 3),
                    "batch_floor": round(max(0.0, math.log(k / n)), 3),
                }
            )
    print(json.dumps(out))


if __name__ == "__main__":
    main()
