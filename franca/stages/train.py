"""`franca pretrain`, `franca resize-pos-embed`, `franca highres`: the training stages (franca/train).

Rolling checkpoints live in ``<run.rolling_dir>/<out>/<identity>/``, outside every declared output (Snakemake never
deletes them), keyed by the job's identity (config slice, input hashes, code digest): a killed job rerun with the
same inputs resumes; any change, or a rerun after the job finished (its state is removed once the checkpoint is
published, unless ``run.keep_rolling``), starts at iteration 0 or from ``--init``.
"""

from __future__ import annotations

import argparse
import logging
import shutil
from pathlib import Path

from franca.stages.common import add_job_args, job, run_settings, shard_files, start

log = logging.getLogger(__name__)


def add_arguments(name: str, parser: argparse.ArgumentParser) -> None:
    add_job_args(parser)
    parser.add_argument(
        "--init", default=None, help="checkpoint to start from (previous stage; highres: the pretraining checkpoint)"
    )
    if name == "resize-pos-embed":
        parser.add_argument("--out", required=True, help="the resized teacher checkpoint")
        parser.set_defaults(func=run_resize, command=name)
        return
    parser.add_argument("--out", required=True, help="output directory (checkpoint.pt, metrics.jsonl, provenance)")
    parser.add_argument("--shards", required=True, help="shard directory of the training dataset")
    parser.add_argument("--kept", default=None, help="dedup's kept.txt (keys to train on); all samples without it")
    parser.set_defaults(func=run_train, command=name)


def rolling_dir(root: str | Path, out: Path, identity: str) -> Path:
    """``<root>/<out>/<identity[:16]>``; other identities' directories of the same output are stale and removed."""
    base = Path(root) / Path(*[p for p in out.parts if p not in ("/", "..")])
    if base.is_dir():
        for stale in base.iterdir():
            if stale.is_dir() and stale.name != identity[:16]:
                log.info("removing rolling state of another job identity: %s", stale)
                shutil.rmtree(stale, ignore_errors=True)
    return base / identity[:16]


def read_kept(path: str | None) -> set[str] | None:
    if path is None:
        return None
    return {line.strip() for line in Path(path).read_text().splitlines() if line.strip()}


def run_train(args: argparse.Namespace) -> int:
    from franca.identity import job_identity
    from franca.train.distributed import launcher_rank
    from franca.train.loop import train

    sc, run = start(args), run_settings(args)
    stage, out = args.command, Path(args.out)
    shards = shard_files(args.shards, sc["data"]["split"])
    inputs = [*shards, *([args.kept] if args.kept else []), *([args.init] if args.init else [])]
    ckpt_dir = rolling_dir(run.get("rolling_dir", "work/ckpt"), out, job_identity(sc, inputs))
    with job(stage, args, sc, out, inputs) as current:
        summary = train(
            {**sc, "run": run},
            shards=[str(s) for s in shards],
            kept_keys=read_kept(args.kept),
            out_dir=out,
            ckpt_dir=ckpt_dir,
            init_from=args.init,
            init_mode="highres" if stage == "highres" else "full",  # highres: the teacher's pos_embed resized
            log_fn=lambda step, metrics: current.log_metrics(metrics, step),
            progress=bool(run.get("progress", False)),
        )
        current.outputs = [out / "checkpoint.pt", out / "metrics.jsonl"]
        current.extra["summary"] = {k: v for k, v in summary.items() if k != "last_metrics"}
        current.log_metrics({f"final_{k}": v for k, v in summary["last_metrics"].items()}, summary["iterations"])
    if launcher_rank() == 0 and not run.get("keep_rolling", False):  # published: a rerun starts over
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    return 0


def run_resize(args: argparse.Namespace) -> int:
    from franca.train.highres import resize_for_highres

    sc = start(args)
    out = Path(args.out)
    with job("resize-pos-embed", args, sc["model"], out.parent, [args.init]) as cur:
        resize_for_highres(args.init, out, sc["crops"]["global_crops_size"], sc["model"]["patch_size"])
        cur.outputs = [out]
    return 0
