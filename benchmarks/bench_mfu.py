"""Measured MFU of the training step (issue 16, item 1): achieved FLOP/s over the device's matmul peak, same run.

For each shape (``tiny`` preset; ``small`` = ViT-S/14; ViT-B/14 and ViT-L/14 paper shapes) it times
``franca.train.loop.train_step`` (teacher + Sinkhorn-Knopp, student, losses, backward, clipping, AdamW, EMA) on
pre-collated random batches, and divides ``franca.flops.training_step_flops`` (what ``franca plan`` counts: teacher
forward, student forward and backward, Sinkhorn-Knopp; per device) by the median step time. The peak is measured in
the same run, right before every timed step and after the last: fp32 sgemm (``torch.mm`` of two n x n matrices) on the
CPU with the given threads, bf16 on CUDA; an entry's MFU divides by the median of its own peak measurements (on a
shared CPU the available peak changes by several times within minutes), and ``mfu_vs_best_peak`` by the run's best.
Where ``--loop-shapes`` names a shape, the loop also runs with its real data path (generated shards ->
``DataPipeline`` -> ``train_step``, the body of ``franca.train.loop.train``) and reports the share of the iteration
spent waiting for ``next_batch``.

    python benchmarks/bench_mfu.py --threads 2 --shapes tiny small vitb14 vitl14 \
        --batch tiny=32 small=4 vitb14=2 vitl14=2

Writes ``benchmarks/results/mfu-<device kind>-<date>.json`` (``--out`` to override); ``franca plan`` reads these.
Batch sizes are per device and reduced from the paper's on small machines (stated in every entry).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import platform
import random
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from franca import flops
from franca.config import compose, stage_config
from franca.plan import GPU_PEAK_FLOPS

logger = logging.getLogger("bench_mfu")
RESULTS = Path(__file__).resolve().parent / "results"
SHAPES = {"tiny": "tiny", "small": "small", "vitb14": "paper_vitb14_in21k", "vitl14": "paper_vitl14_in21k"}
CUDA = torch.cuda.is_available()


def device_kind(device: torch.device) -> str:
    """``cpu``, or the GPU_PEAK_FLOPS key in the CUDA device name (``H100``), else the name itself."""
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device)
    return next((k for k in GPU_PEAK_FLOPS if k in name), name)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, n: int, repeats: int = 5) -> float:
    """Best FLOP/s of an n x n matmul (fp32 on CPU, bf16 on CUDA): 2 n^3 per product."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    inner = 20 if device.type == "cuda" else 1
    a @ b
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        for _ in range(inner):
            a @ b
        _sync(device)
        best = min(best, (time.perf_counter() - start) / inner)
    return 2 * n**3 / best


def shape_config(name: str, batch: int | None, device: torch.device) -> dict:
    """The pretrain stage config of the shape at ``batch`` per device, one device, bf16 on CUDA / fp32 on CPU."""
    cfg = stage_config(compose(SHAPES[name], "franca"), "pretrain")
    train = cfg["train"]
    if batch is not None:
        train["batch_size_per_gpu"] = int(batch)
    train["world_size"] = 1
    train["precision"] = "bf16" if device.type == "cuda" else "fp32"
    train["distributed"] = "ddp"
    return cfg


def random_batch(cfg: dict, seed: int, device: torch.device) -> dict:
    """A collated batch of random crops with the collate function's masks (docs/interfaces.md batch dict)."""
    from franca.data.collate import collate_data_and_cast
    from franca.data.masking import MaskingGenerator

    g = torch.Generator().manual_seed(seed)
    c, b = cfg["crops"], int(cfg["train"]["batch_size_per_gpu"])
    gs, ls, nl = c["global_crops_size"], c["local_crops_size"], c["local_crops_number"]
    samples = [
        {
            "global_crops": [torch.randn(3, gs, gs, generator=g) for _ in range(2)],
            "local_crops": [torch.randn(3, ls, ls, generator=g) for _ in range(nl)],
        }
        for _ in range(b)
    ]
    grid = gs // cfg["model"]["patch_size"]
    masks = MaskingGenerator(
        (grid, grid), rng=random.Random(seed), np_rng=np.random.default_rng(seed), **cfg["masking"]
    )
    out = collate_data_and_cast(
        samples, tuple(cfg["ibot"]["mask_ratio_min_max"]), float(cfg["ibot"]["mask_sample_probability"]),
        torch.float32, grid * grid, masks, rng=random.Random(seed),
    )  # fmt: skip
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in out.items()}


def _setup(cfg: dict, device: torch.device):
    from franca.train import distributed as D
    from franca.train.loop import _build_model, _precision
    from franca.train.optim import build_optimizer
    from franca.train.schedules import build_schedules

    info = D.DistInfo(0, 1, 0, device, None)
    model = _build_model(cfg, info, seed=0)
    optimizer = build_optimizer(model.param_groups(), cfg)
    _, autocast = _precision(cfg, device)
    return model, optimizer, build_schedules(cfg), autocast


def time_steps(cfg: dict, device: torch.device, steps: int, warmup: int, peak) -> tuple[list[float], list[float]]:
    """Seconds of each timed train_step on pre-collated batches (``warmup`` untimed steps first), and the matmul peak
    ``peak()`` measured right before every timed step and after the last (the steps' own machine conditions)."""
    from franca.train.loop import train_step

    model, optimizer, schedules, autocast = _setup(cfg, device)
    batches = [random_batch(cfg, i, device) for i in range(min(steps + warmup, 3))]
    clip = cfg["optim"]["clip_grad"]
    times, peaks = [], []
    for it in range(steps + warmup):
        if it >= warmup:
            peaks.append(peak())
        _sync(device)
        start = time.perf_counter()
        train_step(model, batches[it % len(batches)], optimizer, None, schedules.at(it), clip, autocast, it)
        _sync(device)
        times.append(time.perf_counter() - start)
    return times[warmup:], peaks + [peak()]


def time_loop(cfg: dict, device: torch.device, steps: int, warmup: int, workers: int) -> dict:
    """The loop's body with its real data path on generated shards: (median iteration s, data-wait share)."""
    from franca.data.shards import list_shards
    from franca.data.synthetic import generate
    from franca.train.loop import DataPipeline, _to_device, train_step

    cfg = json.loads(json.dumps(cfg))
    cfg.setdefault("run", {})["num_workers"] = workers
    b = int(cfg["train"]["batch_size_per_gpu"])
    size = max(64, int(cfg["crops"]["global_crops_size"]) * 8 // 7)  # source images a bit larger than the crops
    model, optimizer, schedules, autocast = _setup(cfg, device)
    clip = cfg["optim"]["clip_grad"]
    wait, total = [], []
    with tempfile.TemporaryDirectory() as tmp:
        n = b * (steps + warmup + 1)
        generate(tmp, seed=0, n_train=n, n_val=0, n_test=0, image_size=size, n_classes=8, shard_size=256)
        shards = [str(p) for p in list_shards(Path(tmp) / "shards", "train")]
        data = DataPipeline(cfg, shards, None, seed=0, rank=0, world_size=1, start_sample=0)
        try:
            for it in range(steps + warmup):
                _sync(device)
                start = time.perf_counter()
                batch = _to_device(data.next_batch(), device)
                _sync(device)
                got = time.perf_counter()
                train_step(model, batch, optimizer, None, schedules.at(it), clip, autocast, it)
                _sync(device)
                wait.append(got - start)
                total.append(time.perf_counter() - start)
        finally:
            data.close()
    wait, total = wait[warmup:], total[warmup:]
    return {
        "num_workers": workers,
        "source_image_size": size,
        "iteration_s": total,
        "iteration_s_median": statistics.median(total),
        "data_wait_s_median": statistics.median(wait),
        "data_wait_share": sum(wait) / sum(total),
        "images_per_s": b * len(total) / sum(total),
    }


def _parse_batches(items: list[str]) -> dict[str, int]:
    out = {}
    for item in items:
        name, _, value = item.partition("=")
        if name not in SHAPES or not value.isdigit():
            raise SystemExit(f"--batch expects SHAPE=N with SHAPE in {sorted(SHAPES)}, got {item!r}")
        out[name] = int(value)
    return out


def run_shape(name: str, args, device: torch.device, peaks: list[float]) -> dict:
    batch = args.batch.get(name, None if device.type == "cuda" else 2)
    cfg = shape_config(name, batch, device)
    b = int(cfg["train"]["batch_size_per_gpu"])
    step_flops = flops.training_step_flops(cfg, batch_per_gpu=b, world_size=1)
    times, local_peaks = time_steps(cfg, device, args.steps, args.warmup, lambda: matmul_peak(device, args.peak_n))
    peaks += local_peaks
    median = statistics.median(times)
    entry = {
        "name": name,
        "preset": SHAPES[name],
        "shape": flops.step_shape_key(cfg),
        "arch": cfg["model"]["arch"],
        "batch_per_device": b,
        "preset_batch_per_device": int(stage_config(compose(SHAPES[name], "franca"), "pretrain")["train"][
            "batch_size_per_gpu"]),
        "precision": cfg["train"]["precision"],
        "steps": args.steps,
        "warmup": args.warmup,
        "step_s": times,
        "step_s_median": median,
        "flops_per_step": step_flops.per_gpu,
        "matmul_flops_per_step": step_flops.matmul_per_gpu,
        "achieved_flops_per_s": step_flops.per_gpu / median,
        "images_per_s": b / median,
        "peak_measurements": local_peaks,
        "peak_flops_per_s": statistics.median(local_peaks),
    }  # fmt: skip
    if name in args.loop_shapes:
        entry["loop"] = time_loop(cfg, device, args.steps, args.warmup, args.workers)
        entry["loop"]["achieved_flops_per_s"] = step_flops.per_gpu / entry["loop"]["iteration_s_median"]
    logger.warning("%s: batch %d, %.3f s/step, %.2f GFLOP/s", name, b, median, entry["achieved_flops_per_s"] / 1e9)
    return entry


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["tiny", "small"], choices=sorted(SHAPES))
    parser.add_argument("--batch", nargs="*", default=[], help="SHAPE=N per-device batch (CPU default 2)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (CPU)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per shape")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--peak-n", type=int, default=None, help="matmul size (default 2048 CPU, 8192 CUDA)")
    parser.add_argument("--loop-shapes", nargs="*", default=["tiny"], help="shapes also run with the data path")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers of the loop measurement")
    parser.add_argument("--device", default="cuda" if CUDA else "cpu")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    args.batch = _parse_batches(args.batch)
    logging.basicConfig(level=logging.WARNING)
    device = torch.device(args.device)
    args.peak_n = args.peak_n or (8192 if device.type == "cuda" else 2048)
    torch.set_num_threads(args.threads)
    peaks = [matmul_peak(device, args.peak_n)]
    entries = [run_shape(name, args, device, peaks) for name in args.shapes]
    peak = max(peaks)
    for e in entries:  # mfu: against the median peak measured around the entry's own steps
        local = e["peak_flops_per_s"]
        e["mfu"] = e["achieved_flops_per_s"] / local
        e["mfu_matmul_only"] = e["matmul_flops_per_step"] / e["step_s_median"] / local
        e["mfu_vs_best_peak"] = e["achieved_flops_per_s"] / peak
        if "loop" in e:
            e["loop"]["mfu"] = e["loop"]["achieved_flops_per_s"] / local
    now = dt.datetime.now(dt.UTC)
    kind = device_kind(device)
    result = {
        "kind": "mfu",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "device_kind": kind,
        "cpu_model": cpu_model(),
        "threads": args.threads,
        "torch": torch.__version__,
        "date": now.isoformat(timespec="seconds"),
        "command": "python benchmarks/bench_mfu.py " + shlex.join(sys.argv[1:] if argv is None else argv),
        "peak_method": f"{'bf16' if device.type == 'cuda' else 'fp32'} {args.peak_n}x{args.peak_n} matmul, best of "
        "5, measured before every timed step and after the last; an entry's mfu uses the median of its own "
        "measurements (same machine conditions as its steps, which matters on a shared CPU), mfu_vs_best_peak the "
        "best of the run",
        "peak_flops_per_s": peak,
        "peak_measurements": peaks,
        "flops_source": "franca.flops.training_step_flops(cfg).per_gpu (franca plan's count)",
        "entries": entries,
    }
    out = args.out or RESULTS / f"mfu-{kind.lower().replace(' ', '_')}-{now:%Y%m%dT%H%M%S}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    summary = {e["name"]: round(e["mfu"], 4) for e in entries}
    print(json.dumps({"out": str(out), "peak_flops_per_s": peak, "mfu": summary}))
    return result


if __name__ == "__main__":
    main()
