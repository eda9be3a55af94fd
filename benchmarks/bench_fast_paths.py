"""The training step's fast paths against their reference paths, side by side in one run (issue 16 item 2).

Variants of ``franca.train.loop.train_step`` on the same model and pre-collated batches, timed round-robin (one step
of each variant per round, so a shared machine's load hits them alike):

* ``reference``: explicit softmax(q k^T) v attention, one backbone pass per crop resolution, per-parameter AdamW;
* ``+sdpa``, ``+packed``, ``+fused``: the reference with one fast path switched on (model.attn_impl sdpa,
  model.multicrop_forward packed, optim.adamw_impl fused);
* ``fast``: all three, the defaults;
* ``fast+compile`` (``--compile-shapes``): ``fast`` with train.compile (inductor) on its own copy of the model; its
  compile time is reported apart and left out of the step times.

The variants share one model (the attention and multi-crop switches are module attributes) and keep one optimizer
per AdamW kernel, so a large preset fits once in memory. MFU uses ``franca.flops.training_step_flops`` over the
sgemm (CPU) / bf16 matmul (CUDA) peak measured before every round, as benchmarks/bench_mfu.py. On CPU each step's
process CPU time is recorded too (with ``--threads 1``, the ratio least moved by other jobs on a shared machine), and
``mfu_cpu_s`` divides the FLOP per CPU-second of each variant by the sgemm FLOP per CPU-second.

    python benchmarks/bench_fast_paths.py --threads 1 --shapes tiny small --batch tiny=32 small=2 --steps 3

Writes ``benchmarks/results/fast-paths-<device kind>-<date>.json``.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import logging
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
from bench_mfu import (
    CUDA,
    RESULTS,
    SHAPES,
    _parse_batches,
    _sync,
    cpu_model,
    device_kind,
    matmul_peak,
    random_batch,
    shape_config,
)

from franca import flops

logger = logging.getLogger("bench_fast_paths")
REFERENCE = {"attn_impl": "explicit", "multicrop_forward": "per_resolution", "adamw_impl": "for_loop"}
VARIANTS = {
    "reference": REFERENCE,
    "+sdpa": {**REFERENCE, "attn_impl": "sdpa"},
    "+packed": {**REFERENCE, "multicrop_forward": "packed"},
    "+fused": {**REFERENCE, "adamw_impl": "fused"},
    "fast": {"attn_impl": "sdpa", "multicrop_forward": "packed", "adamw_impl": "fused"},
}


def sgemm_cpu_peak(n: int, repeats: int = 5) -> float:
    """Best FLOP per CPU-second of an n x n fp32 matmul (process CPU time: the other jobs' load moves it little)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        a @ b
        best = min(best, time.process_time() - start)
    return 2 * n**3 / best


def _set_paths(model, variant: dict) -> None:
    for part in (model.student, model.teacher):
        backbone = part["backbone"]
        backbone.multicrop_forward = variant["multicrop_forward"]
        for block in backbone.blocks:
            block.attn.attn_impl = variant["attn_impl"]


def _setup(cfg: dict, device: torch.device, compile_copy: bool):
    from franca.train import distributed as D
    from franca.train.loop import _build_model, _precision, compile_regions
    from franca.train.optim import build_optimizer
    from franca.train.schedules import build_schedules

    model = _build_model(cfg, D.DistInfo(0, 1, 0, device, None), seed=0)
    optimizers = {
        impl: build_optimizer(model.param_groups(), {**cfg, "optim": {**cfg["optim"], "adamw_impl": impl}})
        for impl in ("for_loop", "fused")
    }
    runs = {name: (model, optimizers[v["adamw_impl"]], v) for name, v in VARIANTS.items()}
    if compile_copy:
        compiled = compile_regions(copy.deepcopy(model), {"train": {"compile": True}})
        runs["fast+compile"] = (compiled, build_optimizer(compiled.param_groups(), cfg), VARIANTS["fast"])
    _, autocast = _precision(cfg, device)
    return runs, build_schedules(cfg), autocast


def run_shape(name: str, args, device: torch.device) -> dict:
    from franca.train.loop import train_step

    cfg = shape_config(name, args.batch.get(name, 2), device)
    b = int(cfg["train"]["batch_size_per_gpu"])
    step_flops = flops.training_step_flops(cfg, batch_per_gpu=b, world_size=1).per_gpu
    runs, schedules, autocast = _setup(cfg, device, name in args.compile_shapes)
    batches = [random_batch(cfg, i, device) for i in range(2)]
    clip = cfg["optim"]["clip_grad"]
    times, cpu_times = {v: [] for v in runs}, {v: [] for v in runs}
    compile_s, peaks, cpu_peaks = None, [], []
    for rnd in range(args.warmup + args.steps):
        peaks.append(matmul_peak(device, args.peak_n))
        if device.type == "cpu":
            cpu_peaks.append(sgemm_cpu_peak(args.peak_n))
        for variant, (model, optimizer, paths) in runs.items():
            _set_paths(model, paths)
            _sync(device)
            start, cpu_start = time.perf_counter(), time.process_time()
            train_step(model, batches[rnd % 2], optimizer, None, schedules.at(rnd), clip, autocast, rnd)
            _sync(device)
            elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
            if variant == "fast+compile" and rnd == 0:
                compile_s = elapsed
            if rnd >= args.warmup:
                times[variant].append(elapsed)
                cpu_times[variant].append(cpu)
    peak = statistics.median(peaks)
    medians = {v: statistics.median(t) for v, t in times.items()}
    cpu_medians = {v: statistics.median(t) for v, t in cpu_times.items()}
    entry = {
        "name": name,
        "preset": SHAPES[name],
        "shape": flops.step_shape_key(cfg),
        "batch_per_device": b,
        "precision": cfg["train"]["precision"],
        "flops_per_step": step_flops,
        "peak_flops_per_s": peak,
        "peak_measurements": peaks,
        "step_s": times,
        "step_s_median": medians,
        "speedup_vs_reference": {v: medians["reference"] / m for v, m in medians.items()},
        # CPU seconds of this process per step: on a CPU shared with other jobs, the measure least moved by their load
        "cpu_s": cpu_times,
        "cpu_s_median": cpu_medians,
        "cpu_speedup_vs_reference": {v: cpu_medians["reference"] / m for v, m in cpu_medians.items()},
        # FLOP per CPU-second of each variant over the sgemm FLOP per CPU-second (both in process CPU time)
        "sgemm_flops_per_cpu_s": statistics.median(cpu_peaks) if cpu_peaks else None,
        "mfu_cpu_s": {v: step_flops / m / statistics.median(cpu_peaks) for v, m in cpu_medians.items()}
        if cpu_peaks
        else None,
        "mfu": {v: step_flops / m / peak for v, m in medians.items()},
    }
    if compile_s is not None:
        entry["compile_first_step_s"] = compile_s
    logger.warning("%s: wall %s", name, {v: round(s, 3) for v, s in entry["speedup_vs_reference"].items()})
    logger.warning("%s: cpu-s %s", name, {v: round(s, 3) for v, s in entry["cpu_speedup_vs_reference"].items()})
    return entry


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["tiny"], choices=sorted(SHAPES))
    parser.add_argument("--batch", nargs="*", default=[], help="SHAPE=N per-device batch (default 2)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (CPU)")
    parser.add_argument("--steps", type=int, default=3, help="timed rounds")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--compile-shapes", nargs="*", default=[], help="shapes that also time fast+compile")
    parser.add_argument("--peak-n", type=int, default=None, help="matmul size (default 2048 CPU, 8192 CUDA)")
    parser.add_argument("--device", default="cuda" if CUDA else "cpu")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    args.batch = _parse_batches(args.batch)
    logging.basicConfig(level=logging.WARNING)
    device = torch.device(args.device)
    args.peak_n = args.peak_n or (8192 if device.type == "cuda" else 2048)
    torch.set_num_threads(args.threads)
    entries = [run_shape(name, args, device) for name in args.shapes]
    now, kind = dt.datetime.now(dt.UTC), device_kind(device)
    result = {
        "kind": "fast_paths",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "device_kind": kind,
        "cpu_model": cpu_model(),
        "threads": args.threads,
        "torch": torch.__version__,
        "date": now.isoformat(timespec="seconds"),
        "command": "python benchmarks/bench_fast_paths.py " + shlex.join(sys.argv[1:] if argv is None else argv),
        "variants": VARIANTS,
        "entries": entries,
    }
    out = args.out or RESULTS / f"fast-paths-{kind.lower().replace(' ', '_')}-{now:%Y%m%dT%H%M%S}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    speedups = {e["name"]: {"wall": e["speedup_vs_reference"], "cpu_s": e["cpu_speedup_vs_reference"]} for e in entries}
    print(json.dumps({"out": str(out), "speedup": speedups}))
    return result


if __name__ == "__main__":
    main()
