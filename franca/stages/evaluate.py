"""`franca features | rasa | eval`: frozen-backbone stages (franca/eval, franca/rasa).

features runs the frozen teacher once per checkpoint over the evaluation sets and caches what every benchmark needs
(normalised CLS of the last blocks, mean patch token, final-norm patch tokens with masks); RASA and each benchmark
then work on the cache. RASA is linear on the final-norm patch tokens, so applying the head to cached tokens equals
`forward_features(x, rasa_head=head)["patch_token_rasa"]`.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

from franca.stages.common import add_config_args, full_config, job, set_threads, shard_files

BENCH_FUNCS = ("knn", "linear", "logreg", "hummingbird", "linseg", "overcluster", "position_probe")


def add_arguments(name: str, parser: argparse.ArgumentParser) -> None:
    add_config_args(parser)
    if name == "features":
        parser.add_argument("--checkpoint", required=True)
        parser.add_argument("--ckpt-kind", default="pretrain")
        parser.add_argument("--out", required=True)
        parser.set_defaults(func=run_features)
    elif name == "rasa":
        parser.add_argument("--features", required=True)
        parser.add_argument("--checkpoint", required=True, help="the backbone the head belongs to (provenance)")
        parser.add_argument("--out", required=True)
        parser.set_defaults(func=run_rasa)
    else:
        parser.add_argument("benchmarks", nargs="+", choices=BENCH_FUNCS)
        parser.add_argument("--features", required=True)
        parser.add_argument("--rasa-head", default=None, help="evaluate with this RASA head (dense benchmarks)")
        parser.add_argument("--out-dir", required=True, help="writes <bench>.json (<bench>_rasa.json with a head)")
        parser.set_defaults(func=run_eval)


def _samples(dataset: str, split: str, limit: int | None):
    from franca.data.shards import iter_samples

    samples = iter_samples([str(p) for p in shard_files(f"data/{dataset}/shards", split)])
    return itertools.islice(samples, limit) if limit else samples


def run_features(args: argparse.Namespace) -> int:
    import torch

    from franca import config as fc
    from franca.eval.features import extract_linear_features, extract_patch_features
    from franca.train.checkpoint import load_backbone

    set_threads(args)
    cfg = full_config(args)
    sc = fc.stage_config(cfg, "features")
    ev, dense = sc["eval"], sc["data"]["dense"]
    cls_sources = fc.classification_sources(cfg)  # split -> (dataset, split): val/test from val_dataset if given
    backbone, ckpt_cfg = load_backbone(args.checkpoint)
    size = int(ev.get("img_size") or ckpt_cfg["model"]["img_size"])  # the checkpoint's own resolution on tiny
    geo = {"resize_size": size, "crop_size": size, "batch_size": int(ev["batch_size"])}
    n_blocks = max(ev.get("linear", {}).get("n_last_blocks_list", [4]) or [4])
    out = Path(args.out)
    inputs = [args.checkpoint, *(p for ds in fc.eval_datasets(cfg) for p in shard_files(f"data/{ds}/shards", "*"))]
    with job("features", args, {**sc, "img_size": size}, out, inputs, {"ckpt": args.ckpt_kind}) as current:
        limits = {
            "train": ev.get("max_train_images"),
            "val": ev.get("max_eval_images"),
            "test": ev.get("max_eval_images"),
        }
        linear = {
            split: extract_linear_features(
                backbone, _samples(*cls_sources[split], limits[split]), n_last_blocks=n_blocks, **geo
            )
            for split in ("train", "val", "test")
        }
        dense_limits = {"train": ev.get("max_dense_train_images"), "val": ev.get("max_eval_images")}
        patches = {
            split: extract_patch_features(
                backbone, _samples(dense["dataset"], dense[split], dense_limits[split]), **geo
            )
            for split in ("train", "val")
        }
        features = {
            "linear": linear,
            "linear_sources": {split: list(source) for split, source in cls_sources.items()},
            "dense": patches,
            "num_classes": int(dense["n_classes"]),
            "checkpoint": str(args.checkpoint),
            "img_size": size,
        }
        torch.save(features, out / "features.pt")
        n = int(ev.get("pca_images", 4))
        pca_images = _pca_images(dense["dataset"], dense["val"], n, size)
        torch.save(
            {"pca_images": pca_images, "pca_patch_tokens": patches["val"]["patch_tokens"][:n].clone()}, out / "pca.pt"
        )
        current.outputs = [out / "features.pt", out / "pca.pt"]
    return 0


def _pca_images(dataset: str, split: str, n: int, size: int):
    """The first n images as the model saw them (resize + centre crop), uint8 (n, size, size, 3)."""
    import numpy as np
    import torch

    from franca.eval.features import _center_crop, _resize_shorter

    images = [np.asarray(_center_crop(_resize_shorter(s["image"], size, 3), size)) for s in _samples(dataset, split, n)]
    return torch.from_numpy(np.stack(images)).to(torch.uint8)


def _load(path: str) -> dict:
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


def run_rasa(args: argparse.Namespace) -> int:
    from franca import config as fc
    from franca.rasa.train import train_rasa_from_config

    set_threads(args)
    sc = fc.stage_config(full_config(args), "rasa")
    feats = _load(args.features)["dense"]
    tokens = {s: feats[s]["patch_tokens"].flatten(1, 2) for s in ("train", "val")}  # (n, N, D)
    out = Path(args.out)
    rasa = sc["rasa"]
    with job("rasa", args, sc, out, [args.features, args.checkpoint], {"checkpoint": args.checkpoint}) as current:
        head, rounds = train_rasa_from_config(tokens["train"], rasa, eval_tokens=tokens["val"])
        head.save(out / "rasa_head.pt", checkpoint=str(args.checkpoint))
        (out / "report.json").write_text(json.dumps(rounds, indent=1))
        for i, row in enumerate(rounds):
            current.log_metrics({k: v for k, v in row.items() if isinstance(v, int | float)}, step=i)
        current.outputs = [out / "rasa_head.pt", out / "report.json"]
    return 0


def evaluate(bench: str, feats: dict, cfg: dict, rasa_head=None) -> dict:
    """Run one benchmark on cached features -> {"metrics", "details"}. Imports only that benchmark's module (the
    dense-only RASA jobs then never import sklearn, ~3 s of CPU)."""
    import importlib

    if bench not in BENCH_FUNCS:
        raise ValueError(f"unknown benchmark {bench!r} (one of {sorted(BENCH_FUNCS)})")
    module = importlib.import_module(f"franca.eval.{bench}")
    kw = dict(cfg.get(bench) or {})
    lin, dense, n_cls = feats["linear"], feats["dense"], feats["num_classes"]
    if bench in ("knn", "logreg"):
        tr, va = lin["train"], lin["val"]  # last block's normalised CLS = x_norm_clstoken
        fn = module.knn_classify if bench == "knn" else module.logreg_eval
        return fn(tr["cls_tokens"][:, -1], tr["labels"], va["cls_tokens"][:, -1], va["labels"], **kw)
    if bench == "linear":
        return module.linear_probe(lin["train"], lin["val"], lin["test"], **kw)
    head = rasa_head or (lambda x: x)
    tr, va = (head(dense[s]["patch_tokens"]) for s in ("train", "val"))
    if bench == "position_probe":
        return module.evaluate_position_probe(
            dense["train"]["patch_tokens"], dense["val"]["patch_tokens"], rasa_head=rasa_head, **kw
        )
    if bench == "overcluster":
        return module.overcluster_eval(va, dense["val"]["segs"], n_cls, **kw)
    fn = module.hummingbird_eval if bench == "hummingbird" else module.linseg_eval
    return fn(tr, dense["train"]["segs"], va, dense["val"]["segs"], n_cls, **kw)


def run_eval(args: argparse.Namespace) -> int:
    """All requested benchmarks of one checkpoint in one job (one process start instead of one per benchmark);
    each benchmark still writes its own JSON with its own provenance record."""
    from franca import config as fc
    from franca.eval.result import write_eval_json
    from franca.rasa.rasa_head import RASAHead

    set_threads(args)
    cfg = full_config(args)
    slices = {b: fc.stage_config(cfg, f"eval:{b}") for b in args.benchmarks}
    feats = _load(args.features)
    out = Path(args.out_dir)
    suffix = "_rasa" if args.rasa_head else ""
    inputs = [args.features, *([args.rasa_head] if args.rasa_head else [])]
    head = RASAHead.load(args.rasa_head).eval() if args.rasa_head else None
    for bench, sc in slices.items():
        path = out / f"{bench}{suffix}.json"
        tags = {"benchmark": bench, "rasa": head is not None, "out": path.name}
        with job("eval", args, sc, out, inputs, tags, record=f"{path.stem}.provenance.json") as current:
            result = evaluate(bench, feats, sc["eval"], rasa_head=head)
            write_eval_json(path, bench, feats["checkpoint"], head is not None, result)
            current.outputs = [path]
            current.log_metrics(result["metrics"])
    return 0
