"""Throughput of one pretraining iteration of the ``tiny`` preset (spec 10 "Throughput", issue 3 "Done when").

Measures images/s of franca.train.loop.train_step (teacher + Sinkhorn-Knopp, student, losses, backward, per-module
clipping, AdamW, EMA) on pre-collated batches, and of the data pipeline alone (ShardStream -> multi-crop
augmentation -> masks and collation), on generated shapes data. Run on the 2-core development machine:

    .venv/bin/python benchmarks/bench_train_step.py --threads 2 --steps 20

Prints one JSON object (also written to ``--out`` when given). Numbers are wall-clock and noisy on a shared CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import platform
import tempfile
import time
from pathlib import Path

import torch

from franca.config import compose, stage_config
from franca.data.shards import list_shards
from franca.data.synthetic import generate
from franca.train import distributed as D
from franca.train.loop import DataPipeline, _build_model, train_step
from franca.train.optim import build_optimizer
from franca.train.schedules import build_schedules

logger = logging.getLogger("bench_train_step")


def _time_data(data: DataPipeline, n: int) -> tuple[list, float]:
    start = time.perf_counter()
    batches = [data.next_batch() for _ in range(n)]
    return batches, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--experiment", default="franca")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20, help="timed iterations (after 3 warm-up ones)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    full = compose(args.preset, args.experiment)
    cfg = stage_config(full, "pretrain")
    size = int(full["data"]["datasets"].get(cfg["data"]["dataset"], {}).get("image_size", 64))
    info = D.DistInfo(0, 1, 0, torch.device("cpu"), None)
    B = int(cfg["train"]["batch_size_per_gpu"])
    warmup = 3
    with tempfile.TemporaryDirectory() as tmp:
        n_images = B * (args.steps + warmup)
        generate(tmp, seed=0, n_train=n_images, n_val=0, n_test=0, image_size=size, n_classes=8, shard_size=256)
        shards = [str(p) for p in list_shards(Path(tmp) / "shards", "train")]
        data = DataPipeline(cfg, shards, None, seed=0, rank=0, world_size=1, start_sample=0)
        batches, data_s = _time_data(data, args.steps + warmup)
    model = _build_model(cfg, info, seed=0)
    optimizer = build_optimizer(model.param_groups(), cfg)
    schedules = build_schedules(cfg)
    clip = cfg["optim"]["clip_grad"]
    times = []
    for it, batch in enumerate(batches):
        start = time.perf_counter()
        train_step(model, batch, optimizer, None, schedules.at(it), clip, contextlib.nullcontext, it)
        times.append(time.perf_counter() - start)
    step_s = sum(times[warmup:])
    n_params = sum(p.numel() for p in model.student["backbone"].parameters())
    result = {
        "preset": args.preset,
        "experiment": args.experiment,
        "threads": args.threads,
        "batch_size": B,
        "local_crops": cfg["crops"]["local_crops_number"],
        "global_crops_size": cfg["crops"]["global_crops_size"],
        "image_size": size,
        "backbone_params": n_params,
        "timed_steps": args.steps,
        "train_step_images_per_s": B * args.steps / step_s,
        "data_pipeline_images_per_s": B * len(batches) / data_s,
        "end_to_end_images_per_s": B * args.steps / (step_s + data_s * args.steps / len(batches)),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
