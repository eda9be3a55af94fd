"""`franca pretrain`, `franca resize-pos-embed`, `franca highres`: the training stages (franca/train)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from franca.stages.common import add_config_args, full_config, job, set_threads, shard_files

KEPT = Path("data/dedup/kept.txt")


def add_arguments(name: str, parser: argparse.ArgumentParser) -> None:
    add_config_args(parser)
    parser.add_argument("--out", required=True, help="output directory (checkpoint.pt, metrics.jsonl, provenance)")
    parser.add_argument("--init", default=None, help="checkpoint to start from (previous stage / resized teacher)")
    if name == "pretrain":
        parser.add_argument("--stage-index", type=int, default=1, help="1-based index into pretrain.stages")
    parser.set_defaults(func=run_resize if name == "resize-pos-embed" else run_train, command=name)


def rolling_dir(out: Path) -> Path:
    """Rolling checkpoints: results/<x> -> work/ckpt/<x>; never a declared output, so never deleted on failure."""
    parts = out.resolve().relative_to(Path.cwd().resolve()).parts
    return Path("work/ckpt", *(parts[1:] if parts and parts[0] == "results" else parts))


def read_kept(path: Path = KEPT) -> set[str] | None:
    if not path.exists():
        return None
    return {line.strip() for line in path.read_text().splitlines() if line.strip()}


def run_train(args: argparse.Namespace) -> int:
    from franca import config as fc
    from franca.train.loop import train

    set_threads(args)
    cfg = full_config(args)
    stage = args.command
    sc = fc.stage_config(cfg, stage, getattr(args, "stage_index", 1))
    shards = shard_files(f"data/{sc['data']['dataset']}/shards", sc["data"]["split"])
    kept = read_kept()
    out = Path(args.out)
    inputs = [*shards, *([KEPT] if kept is not None else []), *([args.init] if args.init else [])]
    tags = {"experiment": args.experiment, "seed": args.seed, "stage_index": getattr(args, "stage_index", "")}
    with job(stage, args, sc, out, inputs, tags) as current:
        summary = train(
            {**sc, "run": cfg["run"]},
            shards=[str(s) for s in shards],
            kept_keys=kept,
            out_dir=out,
            ckpt_dir=rolling_dir(out),
            init_from=args.init,
            init_mode="backbone" if stage == "highres" else "full",
            log_fn=lambda step, metrics: current.log_metrics(metrics, step),
            progress=bool(cfg["run"]["progress"]) and os.environ.get("FRANCA_PROGRESS", "1") != "0",
        )
        current.outputs = [out / "checkpoint.pt", out / "metrics.jsonl"]
        current.extra["summary"] = {k: v for k, v in summary.items() if k != "last_metrics"}
        current.log_metrics({f"final_{k}": v for k, v in summary["last_metrics"].items()}, summary["iterations"])
    return 0


def run_resize(args: argparse.Namespace) -> int:
    from franca import config as fc
    from franca.train.highres import resize_for_highres

    cfg = full_config(args)
    sc = fc.stage_config(cfg, "highres")
    out = Path(args.out)
    with job("resize-pos-embed", args, sc["model"], out.parent, [args.init], {"experiment": args.experiment}) as cur:
        resize_for_highres(args.init, out, sc["crops"]["global_crops_size"], sc["model"]["patch_size"])
        cur.outputs = [out]
    return 0
