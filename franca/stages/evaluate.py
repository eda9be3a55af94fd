"""`franca features | rasa | eval`: frozen-backbone stages (franca/eval, franca/rasa).

features runs the frozen teacher once per checkpoint over the evaluation sets and caches what every benchmark needs
(normalised CLS of the last blocks, mean patch token, final-norm patch tokens with masks); RASA and each benchmark
then work on the cache. RASA is linear on the final-norm patch tokens, so applying the head to cached tokens equals
`forward_features(x, rasa_head=head)["patch_token_rasa"]`.
"""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path

from franca.eval.run import BENCHMARKS
from franca.stages.common import add_job_args, add_pairs_arg, job, parse_pairs, shard_files, start


def add_arguments(name: str, parser: argparse.ArgumentParser) -> None:
    add_job_args(parser)
    if name == "features":
        parser.add_argument("--checkpoint", required=True)
        add_pairs_arg(parser, "--shards", "DIR", "shard directory of each dataset the config's splits name")
        parser.add_argument("--out", required=True, help="directory of features.pt and pca.pt")
        parser.add_argument(
            "--baselines",
            action="store_true",
            help="also cache the classification features of the run's random-init backbone and of raw pixels",
        )
        parser.set_defaults(func=run_features)
    elif name == "rasa":
        parser.add_argument("--features", required=True)
        parser.add_argument("--checkpoint", required=True, help="the backbone the head belongs to (provenance)")
        parser.add_argument("--out", required=True)
        parser.set_defaults(func=run_rasa)
    else:
        parser.add_argument("benchmarks", nargs="+", choices=BENCHMARKS)
        parser.add_argument("--features", required=True)
        parser.add_argument(
            "--rasa-benchmarks", nargs="+", default=[], choices=BENCHMARKS, help="run these again with --rasa-head"
        )
        parser.add_argument("--rasa-head", default=None, help="the checkpoint's RASA head (dense benchmarks)")
        parser.add_argument("--out-dir", required=True, help="writes <bench>.json and <bench>_rasa.json")
        parser.set_defaults(func=run_eval)


def run_features(args: argparse.Namespace) -> int:
    import torch

    from franca import config as fc
    from franca.config import train_seed
    from franca.data.sampling import shard_labels, stratified_keys
    from franca.data.shards import iter_samples
    from franca.eval.baselines import init_backbone
    from franca.eval.run import extract_eval_features, linear_blocks
    from franca.train.checkpoint import load_backbone

    sc = start(args)
    ev, data = sc["eval"], sc["data"]
    dirs = parse_pairs(args.shards, "--shards")
    backbone, ckpt_cfg = load_backbone(args.checkpoint)
    size = int(ev.get("img_size") or ckpt_cfg["model"]["img_size"])  # the checkpoint's own resolution on tiny
    geometry = {"resize_size": size, "crop_size": size, "batch_size": int(ev["batch_size"])}
    seed, caps_applied = int(ev.get("sample_seed", 0)), {}

    @functools.cache
    def labels(paths: tuple[str, ...]) -> dict:
        return shard_labels(paths)  # one read of a split's labels, whatever caps it is sampled under

    def samples(use: str, dataset: str, split: str, limit: int | None):
        """The split's samples for one use (classification | dense); over ``limit``, a class-stratified sample (never
        the first N: folder shards are sorted by class)."""
        if dataset not in dirs:
            raise SystemExit(
                f"--shards: no directory for dataset {dataset!r} (the config names it; have {sorted(dirs)})"
            )
        paths = tuple(str(p) for p in shard_files(dirs[dataset], split))
        keys = None
        if limit:
            keys, available = stratified_keys(labels(paths), int(limit), seed)
            if keys is not None:
                caps_applied[f"{dataset}:{split} ({use})"] = {"used": len(keys), "available": available}
        return iter_samples(list(paths), kept_keys=keys)

    cls_sources = fc.classification_sources(sc)
    # a test split that is the val split again (small preset: both in_val) would report on the images the linear
    # grid was selected on: it is left out, and the hold-out-selected accuracy is the one measured without that bias
    cls_splits = ["train", "val"] + (["test"] if cls_sources["test"] != cls_sources["val"] else [])
    caps = {"train": ev.get("max_train_images"), "val": ev.get("max_eval_images"), "test": ev.get("max_eval_images")}
    dense = data["dense"]
    dense_caps = {"train": ev.get("max_dense_train_images"), "val": ev.get("max_eval_images")}
    out = Path(args.out)
    inputs = [args.checkpoint, *(p for d in sorted(set(dirs.values())) for p in shard_files(d, "*"))]
    with job("features", args, {**sc, "img_size": size}, out, inputs) as current:
        # the references of the trained rows (random init, raw pixels) on the same decoded train and val batches
        init_seed = train_seed(ckpt_cfg)
        init = init_backbone(ckpt_cfg["model"], init_seed) if args.baselines else None
        feats = extract_eval_features(
            backbone,
            {s: samples("classification", *cls_sources[s], caps[s]) for s in cls_splits},
            {s: samples("dense", dense["dataset"], dense[s], dense_caps[s]) for s in ("train", "val")},
            geometry,
            linear_blocks(ev.get("linear")),
            init=init,
        )
        feats |= {
            "linear_sources": {split: list(source) for split, source in cls_sources.items()},
            "caps": {"applied": caps_applied, "seed": seed},
            "num_classes": int(dense["n_classes"]),
            "checkpoint": str(args.checkpoint),
            "img_size": size,
        }
        if init is not None:
            feats["baselines"]["seed"] = init_seed
        torch.save(feats, out / "features.pt")
        n = int(ev.get("pca_images", 4))
        pca_images = _pca_images(samples("dense", dense["dataset"], dense["val"], None), n, size)
        pca_tokens = feats["dense"]["val"]["patch_tokens"][:n].clone()
        torch.save({"pca_images": pca_images, "pca_patch_tokens": pca_tokens}, out / "pca.pt")
        current.outputs = [out / "features.pt", out / "pca.pt"]
        current.extra["caps"] = caps_applied
    return 0


def _pca_images(samples, n: int, size: int):
    """The first n images as the model saw them (resize + centre crop), uint8 (n, size, size, 3)."""
    import itertools

    import numpy as np
    import torch

    from franca.eval.features import _center_crop, _resize_shorter

    images = [
        np.asarray(_center_crop(_resize_shorter(s["image"], size, 3), size)) for s in itertools.islice(samples, n)
    ]
    return torch.from_numpy(np.stack(images)).to(torch.uint8)


def _load(path: str) -> dict:
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


def run_rasa(args: argparse.Namespace) -> int:
    from franca.rasa.train import train_rasa_from_config

    sc = start(args)
    feats = _load(args.features)["dense"]
    tokens = {s: feats[s]["patch_tokens"].flatten(1, 2) for s in ("train", "val")}  # (n, N, D)
    out = Path(args.out)
    with job("rasa", args, sc, out, [args.features, args.checkpoint]) as current:
        head, rounds = train_rasa_from_config(tokens["train"], sc["rasa"], eval_tokens=tokens["val"])
        head.save(out / "rasa_head.pt", checkpoint=str(args.checkpoint))
        (out / "report.json").write_text(json.dumps(rounds, indent=1))
        for i, row in enumerate(rounds):
            current.log_metrics({k: v for k, v in row.items() if isinstance(v, int | float)}, step=i)
        current.outputs = [out / "rasa_head.pt", out / "report.json"]
    return 0


def run_eval(args: argparse.Namespace) -> int:
    """All benchmarks of one checkpoint on one load of its features, then the ``--rasa-benchmarks`` again with the
    RASA head; each (benchmark, head) writes its own JSON and provenance record."""
    from franca.rasa.rasa_head import RASAHead

    sc = start(args)
    missing = [b for b in [*args.benchmarks, *args.rasa_benchmarks] if b not in sc["eval"]]
    if missing:
        raise SystemExit(f"{args.config}: no eval.{missing[0]} block for the requested benchmark {missing[0]!r}")
    if bool(args.rasa_benchmarks) != bool(args.rasa_head):
        raise SystemExit("--rasa-benchmarks and --rasa-head go together")
    feats = _load(args.features)
    head = RASAHead.load(args.rasa_head).eval() if args.rasa_head else None
    for bench in args.benchmarks:
        _evaluate_one(args, sc, feats, bench, None)
    for bench in args.rasa_benchmarks:
        _evaluate_one(args, sc, feats, bench, head)
    return 0


def _evaluate_one(args: argparse.Namespace, sc: dict, feats: dict, bench: str, head) -> None:
    from franca.eval.run import evaluate, write_eval_json

    out = Path(args.out_dir)
    path = out / f"{bench}{'_rasa' if head is not None else ''}.json"
    inputs = [args.features, *([args.rasa_head] if head is not None else [])]
    tags = {"benchmark": bench, "rasa": head is not None, "out": path.name}
    bench_cfg = {"eval": {bench: sc["eval"][bench]}}
    with job("eval", args, bench_cfg, out, inputs, tags, record=f"{path.stem}.provenance.json") as current:
        result = evaluate(bench, feats, sc["eval"][bench], rasa_head=head)
        if bench == "knn" and head is None and feats.get("baselines"):
            result = _with_baselines(result, feats["baselines"], sc["eval"][bench])
        write_eval_json(path, bench, feats["checkpoint"], head is not None, result, feats.get("caps"))
        current.outputs = [path]
        current.log_metrics(result["metrics"])


def _with_baselines(result: dict, baselines: dict, kwargs: dict) -> dict:
    """The trained k-NN plus ``init_*`` and ``pixels_*`` metrics of the same protocol on the same images."""
    from franca.eval.baselines import knn_baselines

    details = {**result.get("details", {}), "baselines": {"init_seed": baselines["seed"], "pixels": "eval crop"}}
    return {"metrics": {**result["metrics"], **knn_baselines(baselines, kwargs)}, "details": details}
