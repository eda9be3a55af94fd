"""Planning before spending: every job of the DAG with its resources, FLOPs, GPU-hours and storage (issue 6).

``plan(preset, experiments, overrides)`` composes the Hydra config of each experiment (``franca.config``), walks the
stages of the workflow (fetch/shard per dataset, dedup, pretrain stages, highres, rasa, eval) and returns a
``Plan`` of rows. Training FLOPs come from ``franca.flops`` (analytic, per step, spec 2.6); GPU-hours are
total FLOPs / (peak dense bf16/fp16 FLOP/s x utilisation). The GPU type defaults to H100 SXM. The utilisation
(MFU) of a training row is, in this order: ``cluster.mfu`` / ``--mfu`` when given; else the measured rate of a
recorded ``benchmarks/bench_mfu.py`` result (``benchmarks/results/mfu-*.json``, the newest entry of the same step
shape on the same device kind: the GPU type, or ``cpu`` for a CPU run); else the stated default (0.4 of the peak on
GPUs, 30 GFLOP/s on the CPU). Every training row names its source (``MFU source`` lines of the table).
Evaluation and RASA cost only their frozen-backbone forward passes (feature extraction), which is small next to
pretraining.

Per-rule SLURM resources (``rule_resources``) come from the same numbers: one job asks for
``ceil(world_size / gpus_per_node)`` nodes and a runtime of the estimated time (with a margin), capped at the job
time limit (20 h on the Franca cluster, spec 4); longer trainings are resubmitted (``retries``) and resume from
their rolling checkpoint, so a row's ``jobs`` is the number of submissions it needs.

Optional config section ``cluster`` (any key may be absent): gpu_type, mfu, cpus_per_gpu, mem_mb_per_gpu,
job_time_limit_min, runtime_margin, cpu_flops (the achieved rate of a CPU-only run), mfu_results (the directory of
recorded MFU and fetch results), fetch_urls_per_core_s and shard_images_per_core_s (the unit jobs' rates; by default
the recorded bench_fetch mix and a stated shard rate), unit_cpus.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from franca import flops
from franca.config import compose, dedup_dataset, launch_shape, stage_config, used_datasets

__all__ = [
    "GPU_PEAK_FLOPS",
    "Plan",
    "PlanRow",
    "Utilisation",
    "cluster_settings",
    "dataset_storage",
    "format_plan",
    "main",
    "plan",
    "recorded_fetch_rate",
    "recorded_mfu",
    "rule_resources",
    "unit_jobs",
    "unit_rate",
    "unit_resources",
    "utilisation",
]

logger = logging.getLogger(__name__)

# Dense (no sparsity) bf16/fp16 tensor-core peak, FLOP/s, from the vendors' data sheets.
GPU_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MFU = 0.4  # of the dense peak, used for a GPU row only when no recorded result matches
DEFAULT_CPU_FLOPS = 30e9  # achieved rate on the 2-core development machine (spec 10), likewise
CLUSTER_DEFAULTS = {
    "gpu_type": "H100",
    "mfu": None,  # None: the recorded result of the row's shape on the GPU type, else DEFAULT_MFU
    "cpus_per_gpu": 12,  # Franca's sbatch headers: 4 GPUs and 12 CPUs per task, one task per GPU (spec 4)
    "mem_mb_per_gpu": 100_000,
    "job_time_limit_min": 20 * 60,  # the Franca cluster's 20 h limit (spec 4)
    "runtime_margin": 1.25,
    "cpu_flops": None,  # None: the recorded result of the row's shape on the CPU, else DEFAULT_CPU_FLOPS
    "mfu_results": str(REPO_ROOT / "benchmarks" / "results"),
    # Per-core throughput of the unit jobs (issue 17). fetch: None = the recorded bench_fetch result (its realistic
    # mix, the largest URL count, then the newest) in mfu_results, else DEFAULT_UNIT_RATES; shard (decode, pHash,
    # layout, canonical re-encode) as measured on the 2-core development machine.
    "fetch_urls_per_core_s": None,
    "shard_images_per_core_s": None,
    "unit_cpus": 4,  # CPUs of one fetch / shard unit job at paper scale
}
UNIT_STAGES = {"fetch": "fetch_urls_per_core_s", "shard": "shard_images_per_core_s"}
# the former fetcher's 300 URLs/s on 2 cores (issue 17, "Why"); the shard rate of the 2-core development machine
DEFAULT_UNIT_RATES = {"fetch_urls_per_core_s": 150.0, "shard_images_per_core_s": 100.0}
# Light CPU jobs: (cpus_per_task, mem_mb, runtime in minutes) at paper scale and on the tiny preset.
CPU_STAGES = {
    "fetch": ((16, 32_000, 24 * 60), (1, 2_000, 30)),
    "shard": ((8, 16_000, 12 * 60), (1, 2_000, 30)),
    "gather": ((1, 4_000, 60), (1, 2_000, 15)),
    "dedup": ((16, 64_000, 12 * 60), (1, 2_000, 30)),
    # one job of the dedup fan-out (eval index, dedup_unit, dedup_block): at 10^9 hashes a block job is ~2 GB and
    # ~40 CPU-s (bench_dedup_scale extrapolation, issue 17 note), a unit's band index ~1 CPU-s per 10^6 rows
    "dedup_part": ((2, 8_000, 60), (1, 2_000, 30)),
    "paper": ((1, 8_000, 60), (1, 2_000, 15)),
}
# (images, mean bytes per image) used when the dataset config has no n_images / mean_image_bytes.
DATASET_DEFAULTS = {
    "in21k": (13_153_499, 95_000),  # winter21_whole count (spec 6); the release is ~1.25 TB
    "in1k_train": (1_281_167, 110_000),  # ImageNet-1k train, ~140 GB
    "in1k_val": (50_000, 128_000),  # ~6.4 GB
    "in_train": (126_689, 110_000),  # ImageNet-100 train
    "in_val": (5_000, 128_000),
    "voc": (17_125, 110_000),  # VOC2012 JPEGImages (~1.9 GB) + class maps
    "laion": (600_000_000, 60_000),  # LAION-COCO 600M (spec 6), JPEG at <= 512 px side (img2dataset, keep ratio)
}
SYNTH_BYTES_PER_PIXEL = 1.0  # a generated PNG with textures compresses to ~1 byte/pixel (3 channels)
CKPT_BYTES_FINAL = 8  # fp32 student + teacher per parameter (the declared checkpoint.pt)
CKPT_BYTES_ROLLING = 16  # fp32 student + teacher + AdamW first and second moments
TRAIN_STAGES = ("pretrain", "highres")


def cluster_settings(cfg: Mapping, **overrides) -> dict:
    """CLUSTER_DEFAULTS < the config's ``cluster`` section < keyword overrides (None values ignored)."""
    out = dict(CLUSTER_DEFAULTS)
    out.update({k: v for k, v in (cfg.get("cluster") or {}).items() if v is not None})
    out.update({k: v for k, v in overrides.items() if v is not None})
    if out["gpu_type"] not in GPU_PEAK_FLOPS:
        raise ValueError(f"cluster.gpu_type must be one of {sorted(GPU_PEAK_FLOPS)}, got {out['gpu_type']!r}")
    if out["mfu"] is not None and not 0 < float(out["mfu"]) <= 1:
        raise ValueError(f"cluster.mfu must be in (0, 1], got {out['mfu']}")
    return out


def _gpus(stage_cfg: Mapping) -> tuple[int, int]:
    """(nodes, GPUs per node); (1, 0) for a CPU run."""
    nodes, per_node = launch_shape(stage_cfg)
    gpus = int((stage_cfg.get("train") or {}).get("gpus_per_node", 0))
    return (nodes, per_node) if gpus > 0 else (1, 0)


@dataclass(frozen=True)
class Utilisation:
    """Achieved FLOP/s of one device for a training row, and where the figure comes from."""

    rate: float  # FLOP/s per device (GPU) or of the CPU run
    mfu: float | None  # fraction of GPU_PEAK_FLOPS (GPU rows); None on the CPU
    source: str


def _display(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


@functools.lru_cache(maxsize=64)
def _load_json(path: str, mtime_ns: int) -> dict:
    """One parsed result file (cached per modification time: the resources run once per rule of the DAG)."""
    return json.loads(Path(path).read_text())


def _load_result(path: str, mtime_ns: int) -> dict:
    """One bench_mfu result file."""
    try:
        result = _load_json(path, mtime_ns)
        missing = {"entries", "device_kind", "date"} - set(result)
        missing |= {f"entries[].{k}" for e in result.get("entries", []) for k in ("name", "shape") if k not in e}
        if missing:
            raise KeyError(", ".join(sorted(missing)))
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: not a bench_mfu result ({type(exc).__name__}: {exc})") from exc
    return result


def recorded_mfu(directory: str | Path, device_kind: str, shape: Mapping) -> tuple[Path, dict, dict] | None:
    """(file, entry, result) of the newest ``bench_mfu`` entry of ``shape`` on ``device_kind`` in ``directory``."""
    found = []
    for path in sorted(Path(directory).glob("mfu-*.json")):
        result = _load_result(str(path), path.stat().st_mtime_ns)
        if result["device_kind"] != device_kind:
            continue
        for e in result["entries"]:
            if e["shape"] == dict(shape) and float(e.get("achieved_flops_per_s", 0)) > 0:
                found.append((result["date"], path, e, result))
    if not found:
        return None
    _, path, entry, result = max(found, key=lambda f: (f[0], str(f[1])))
    return path, entry, result


def utilisation(stage_cfg: Mapping, cluster: Mapping) -> Utilisation:
    """The explicit setting, else the recorded result of this shape and device kind, else the stated default."""
    gpu = _gpus(stage_cfg)[1] > 0
    gpu_type = cluster["gpu_type"]
    peak = GPU_PEAK_FLOPS[gpu_type]
    if gpu and cluster.get("mfu") is not None:
        return Utilisation(peak * float(cluster["mfu"]), float(cluster["mfu"]), "set by cluster.mfu / --mfu")
    if not gpu and cluster.get("cpu_flops") is not None:
        return Utilisation(float(cluster["cpu_flops"]), None, "set by cluster.cpu_flops")
    kind = gpu_type if gpu else "cpu"
    directory = Path(cluster.get("mfu_results") or CLUSTER_DEFAULTS["mfu_results"])
    found = recorded_mfu(directory, kind, flops.step_shape_key(stage_cfg))
    if found is None:
        what = f"no recorded result for this shape on {kind} in {_display(directory)}"
        if gpu:
            return Utilisation(peak * DEFAULT_MFU, DEFAULT_MFU, f"default {DEFAULT_MFU:.0%} ({what})")
        return Utilisation(DEFAULT_CPU_FLOPS, None, f"default {_si(DEFAULT_CPU_FLOPS, 'FLOP/s')} ({what})")
    path, entry, result = found
    rate = float(entry["achieved_flops_per_s"])
    where = f"{_display(path)} entry {entry['name']!r} (batch {entry['batch_per_device']}, {result['date']}"
    if gpu:
        measured = f"{entry['mfu']:.1%} of measured matmul peak"
        return Utilisation(rate, rate / peak, f"{where}, {result['device']}, {measured})")
    return Utilisation(rate, None, f"{where}, {result['threads']} threads, {result['cpu_model']})")


def _train_hours(stage_cfg: Mapping, cluster: Mapping) -> tuple[float, float, int]:
    """(FLOPs per step, total FLOPs, wall-clock hours) of a training stage on its configured devices."""
    step = flops.training_step_flops(stage_cfg)
    steps = int(stage_cfg["optim"]["iterations"])
    nodes, per_node = _gpus(stage_cfg)
    util = utilisation(stage_cfg, cluster)
    rate = nodes * per_node * util.rate if per_node else util.rate
    return step.total, step.total * steps, step.total * steps / rate / 3600


def _resources(nodes: int, per_node: int, cpus: int, mem_mb: int, minutes: int) -> dict:
    res = {"nodes": nodes, "tasks": nodes, "cpus_per_task": cpus, "mem_mb": mem_mb, "runtime": minutes}
    res["gpus_per_node"] = per_node
    res["slurm_extra"] = ""
    if per_node and nodes == 1:
        # --gpus=<n>; tasks_per_gpu 0 stops the plugin from adding --ntasks-per-gpu=<tasks> (1 task per GPU)
        res.update(gpu=per_node, tasks_per_gpu=0)
    elif per_node:
        # `mpi` makes the plugin run the rule's shell in the batch step (no `srun -n1` around it), so the rule's own
        # `srun --ntasks-per-node 1 torchrun ...` spans every node; the plugin's --gpus is a job total, hence the
        # per-node request in slurm_extra.
        res.update(mpi="srun", slurm_extra=f"--gpus-per-node={per_node} --ntasks-per-node=1")
    return res


def rule_resources(stage_cfg: Mapping, stage: str) -> dict:
    """Snakemake ``resources`` of one rule (the SLURM plugin's names; runtime in minutes, mem_mb per node).

    ``stage_cfg``: ``franca.config.stage_config(cfg, stage)`` for pretrain / highres; the full composed config for the
    other stages (their slice lacks ``train``, which says how many GPUs a node has).
    """
    cluster = cluster_settings(stage_cfg)
    nodes, per_node = _gpus(stage_cfg) if "train" in stage_cfg else (1, 0)
    limit = int(cluster["job_time_limit_min"])
    if stage in TRAIN_STAGES:
        _, _, hours = _train_hours(stage_cfg, cluster)
        minutes = min(limit, max(10, math.ceil(hours * 60 * cluster["runtime_margin"]) + 10))
        if not per_node:  # CPU (gloo) run: one process per core
            world = int(stage_cfg["train"].get("world_size", 1))
            return _resources(1, 0, max(world, 1), 4_000 * max(world, 1), minutes)
        cpus, mem = cluster["cpus_per_gpu"] * per_node, cluster["mem_mb_per_gpu"] * per_node
        return _resources(nodes, per_node, cpus, mem, minutes)
    if stage in ("rasa", "eval", "features"):
        if not per_node:
            return _resources(1, 0, 1, 4_000, 60)
        return _resources(1, 1, cluster["cpus_per_gpu"], cluster["mem_mb_per_gpu"], min(limit, 4 * 60))
    if stage in CPU_STAGES:
        cpus, mem, minutes = CPU_STAGES[stage][0 if per_node else 1]
        return _resources(1, 0, cpus, mem, min(limit, minutes))
    raise ValueError(
        f"rule_resources: unknown stage {stage!r}; expected {TRAIN_STAGES} or rasa/eval/features, "
        f"or one of {sorted(CPU_STAGES)}"
    )


def recorded_fetch_rate(directory: str | Path) -> tuple[float, str] | None:
    """(URLs/s per core, source) of the fetcher on the realistic mix of ``bench_fetch`` results in ``directory``:
    the result with the most URLs (a short table is dominated by its last dead URL's deadline), then the newest."""
    found = []
    for path in sorted(Path(directory).glob("fetch-*.json")):
        try:
            result = _load_json(str(path), path.stat().st_mtime_ns)
            mix, cpus, n = result["runs"]["current_mix"], int(result["cpus"]), int(result["n_urls"])
            found.append((n, result["date"], path, float(mix["urls_per_s"]) / cpus, cpus, result))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{path}: not a bench_fetch result ({type(exc).__name__}: {exc})") from exc
    if not found:
        return None
    n, date, path, rate, cpus, result = max(found, key=lambda f: (f[0], f[1]))
    bad = ", ".join(f"{count} {kind}" for kind, count in result.get("mix_counts", {}).items())
    return rate, f"{_display(path)}: {n:,} URLs ({bad}) at {rate * cpus:.0f} URLs/s on {cpus} cores, {date}"


def unit_rate(cluster: Mapping, stage: str) -> tuple[float, str]:
    """(items per second per core, source) of a unit stage: the explicit setting, else the recorded result (fetch),
    else the stated default."""
    key = UNIT_STAGES[stage]
    if cluster.get(key) is not None:
        return float(cluster[key]), f"set by cluster.{key}"
    directory = Path(cluster.get("mfu_results") or CLUSTER_DEFAULTS["mfu_results"])
    if stage != "fetch":
        return DEFAULT_UNIT_RATES[key], f"default {DEFAULT_UNIT_RATES[key]:g}/s per core (no benchmark records it)"
    found = recorded_fetch_rate(directory)
    if found is None:
        return DEFAULT_UNIT_RATES[key], f"default (no recorded bench_fetch result in {_display(directory)})"
    return found


def unit_minutes(cluster: Mapping, stage: str, rows: int, cpus: int) -> int:
    """Wall time of one unit job: its rows at the measured per-core rate, with the runtime margin, plus 5 min."""
    seconds = rows / (unit_rate(cluster, stage)[0] * cpus)
    return min(int(cluster["job_time_limit_min"]), math.ceil(seconds / 60 * cluster["runtime_margin"]) + 5)


def unit_resources(cfg: Mapping, stage: str, ds: Mapping, units: Sequence[Mapping]) -> dict:
    """Resources of one fetch / shard job of a dataset's work units (``franca.data.units``): the CPU-stage default
    for a generated or local set, else ``cluster.unit_cpus`` CPUs and the wall time of its largest unit."""
    base = rule_resources(cfg, stage)
    if ds.get("source") != "urls" or stage not in UNIT_STAGES:
        return base
    cluster = cluster_settings(cfg)
    rows = max(int(u["stop"]) - int(u["start"]) for u in units)
    cpus = int(cluster["unit_cpus"]) if base["cpus_per_task"] > 1 else 1
    return {**base, "cpus_per_task": cpus, "mem_mb": 2_000 * cpus, "runtime": unit_minutes(cluster, stage, rows, cpus)}


def dataset_storage(cfg: Mapping, name: str) -> tuple[int, int]:
    """(images, bytes) of a dataset's shards: the config's n_images / mean_image_bytes, else the stated default."""
    ds = cfg["data"]["datasets"][name]
    if "n_images" in ds and "mean_image_bytes" in ds:
        return int(ds["n_images"]), int(ds["n_images"]) * int(ds["mean_image_bytes"])
    if ds.get("source") == "synth":
        n = sum(int(ds[k]) for k in ("n_train", "n_val", "n_test"))
        return n, round(n * int(ds["image_size"]) ** 2 * SYNTH_BYTES_PER_PIXEL)
    if name not in DATASET_DEFAULTS:
        raise KeyError(f"dataset {name!r}: set data.datasets.{name}.n_images and mean_image_bytes (no default)")
    n, mean = DATASET_DEFAULTS[name]
    return n, n * mean


@dataclass
class PlanRow:
    rule: str
    experiment: str
    seed: int | None
    stage: str
    jobs: int  # SLURM submissions (training stages longer than the time limit resume from their checkpoint)
    nodes: int
    gpus_per_node: int
    runtime_min: int  # per submission
    steps: int = 0
    flops_per_step: float = 0.0
    total_flops: float = 0.0
    gpu_hours: float = 0.0  # 0 for CPU rows
    hours: float = 0.0  # wall-clock of the whole row
    storage_bytes: float = 0.0
    utilisation: Utilisation | None = None  # training rows: the rate used and its source
    cpus: int = 0  # CPUs per job of a unit row
    units: list[str] = field(default_factory=list)  # unit rows: the unit of each job


@dataclass
class Plan:
    preset: str
    gpu_type: str
    mfu: float | None  # the explicit --mfu / cluster.mfu, else None (per row: recorded result or DEFAULT_MFU)
    rows: list[PlanRow] = field(default_factory=list)
    unit_rates: dict[str, str] = field(default_factory=dict)  # unit stage -> where its per-core rate comes from

    @property
    def totals(self) -> dict[str, float]:
        return {
            "jobs": sum(r.jobs for r in self.rows),
            "total_flops": sum(r.total_flops for r in self.rows),
            "gpu_hours": sum(r.gpu_hours for r in self.rows),
            "storage_bytes": sum(r.storage_bytes for r in self.rows),
            "shard_bytes": sum(r.storage_bytes for r in self.rows if r.rule == "shard"),
            "checkpoint_bytes": sum(r.storage_bytes for r in self.rows if r.rule in TRAIN_STAGES),
        }

    def gpu_hours(self, rule: str, experiment: str | None = None) -> float:
        return sum(r.gpu_hours for r in self.rows if r.rule == rule and experiment in (None, r.experiment))


def _train_row(cfg: Mapping, stage: str, index: int, exp: str, seed: int, cluster: Mapping) -> PlanRow:
    sc = stage_config(cfg, stage, index) if stage == "pretrain" else stage_config(cfg, stage)
    sc["cluster"] = cluster
    per_step, total, hours = _train_hours(sc, cluster)
    res = rule_resources(sc, stage)
    nodes, per_node = _gpus(sc)
    jobs = max(1, math.ceil(hours * 60 / res["runtime"]))
    params = flops.model_params(sc)["total"]
    keep = int((cfg.get("run") or {}).get("keep_checkpoints", 2))
    storage = params * (CKPT_BYTES_FINAL + keep * CKPT_BYTES_ROLLING)
    name = f"pretrain{index}" if stage == "pretrain" else stage
    row = PlanRow(stage, exp, seed, name, jobs, nodes, per_node, res["runtime"], int(sc["optim"]["iterations"]))
    row.flops_per_step, row.total_flops = per_step, total
    row.gpu_hours, row.hours, row.storage_bytes = hours * nodes * per_node, hours, storage
    row.utilisation = utilisation(sc, cluster)
    return row


def _forward_row(rule: str, cfg: Mapping, exp: str, seed: int, images: float, size: int, cluster: Mapping) -> PlanRow:
    """A frozen-backbone job costed by its forward passes over ``images`` images of ``size`` px."""
    shape = flops.ViTShape.from_config(cfg["model"])
    size -= size % shape.patch_size
    total = flops.backbone_forward_flops(shape, size, 1) * images
    res = rule_resources(cfg, rule)
    if res["gpus_per_node"]:
        rate = GPU_PEAK_FLOPS[cluster["gpu_type"]] * (cluster["mfu"] or DEFAULT_MFU)
    else:
        rate = cluster["cpu_flops"] or DEFAULT_CPU_FLOPS
    hours = total / rate / 3600
    row = PlanRow(rule, exp, seed, rule, 1, 1, res["gpus_per_node"], res["runtime"], total_flops=total, hours=hours)
    row.gpu_hours = hours * res["gpus_per_node"]
    return row


def _eval_images(cfg: Mapping) -> float:
    """Images whose features one evaluation pass extracts: the classification and dense datasets."""
    data, ev = cfg["data"], cfg["eval"]
    roles = {data["classification"]["dataset"], data["classification"].get("val_dataset"), data["dense"]["dataset"]}
    n = sum(dataset_storage(cfg, name)[0] for name in roles - {None})
    cap = ev.get("max_train_images")
    return float(min(n, cap + (ev.get("max_eval_images") or 0))) if cap else float(n)


def _rasa_images(cfg: Mapping) -> tuple[float, int]:
    """(forward passes, crop size) of a RASA job: rounds x epochs over its dataset (features are not cached)."""
    rasa = cfg["rasa"]
    n = rasa.get("n_images") or dataset_storage(cfg, cfg["data"]["rasa"]["dataset"])[0]
    size = int(rasa.get("img_size") or cfg["eval"].get("img_size") or cfg["crops"]["global_crops_size"])
    return float(int(rasa["rounds"]) * int(rasa["epochs"]) * int(n)), size


def plan(
    preset: str,
    experiments: Mapping[str, Mapping] | Sequence[str],
    overrides: Sequence[str] = (),
    **cluster_overrides,
) -> Plan:
    """Every job of the workflow for ``preset`` x ``experiments`` (names, or config.yaml's mapping of
    name -> {seeds, highres, rasa}); ``cluster_overrides``: gpu_type, mfu, ... (see CLUSTER_DEFAULTS)."""
    if not isinstance(experiments, Mapping):
        experiments = {name: {} for name in experiments}
    if not experiments:
        raise ValueError("plan: no experiments given")
    first = compose(preset, next(iter(experiments)), 0, tuple(overrides))
    cluster = cluster_settings(first, **cluster_overrides)
    out = Plan(preset, cluster["gpu_type"], None if cluster["mfu"] is None else float(cluster["mfu"]))
    for name in used_datasets(first):
        out.rows += _unit_rows(first, name, cluster)
        if first["data"]["datasets"][name].get("source") == "urls":
            out.unit_rates |= {stage: unit_rate(cluster, stage)[1] for stage in UNIT_STAGES}
    out.rows += _dedup_rows(first)
    for exp, spec in experiments.items():
        for seed in spec.get("seeds", [0]):
            cfg = compose(preset, exp, int(seed), tuple(overrides))
            cfg["cluster"] = cluster
            for i in range(1, len(cfg["pretrain"]["stages"]) + 1):
                out.rows.append(_train_row(cfg, "pretrain", i, exp, int(seed), cluster))
            ckpts = ["pretrain"]
            if spec.get("highres", True):
                out.rows.append(_train_row(cfg, "highres", 1, exp, int(seed), cluster))
                ckpts.append("highres")
            for _ckpt in ckpts:
                size = int(cfg["eval"].get("img_size", cfg["crops"]["global_crops_size"]))
                out.rows.append(_forward_row("eval", cfg, exp, int(seed), _eval_images(cfg), size, cluster))
                if spec.get("rasa", True):
                    images, size = _rasa_images(cfg)
                    out.rows.append(_forward_row("rasa", cfg, exp, int(seed), images, size, cluster))
    out.rows.append(PlanRow("paper", "-", None, "paper", 1, 1, 0, rule_resources(first, "paper")["runtime"]))
    return out


def dataset_units(cfg: Mapping, name: str) -> list[dict]:
    """The dataset's work units: ``franca.data.units.list_units`` when its URL table exists, else ranges of
    ``unit_rows`` over its configured ``n_images`` (a plan made before the table is downloaded)."""
    from franca.data.units import DEFAULT_UNIT_ROWS, list_units, unit_name

    ds = cfg["data"]["datasets"][name]
    if ds.get("source") != "urls" or Path(ds["url_list"]).exists():
        return list_units(ds)
    n, size = dataset_storage(cfg, name)[0], int(ds.get("unit_rows", DEFAULT_UNIT_ROWS))
    return [{"unit": unit_name(i), "kind": "url_rows", "start": 0, "stop": min(size, n - s)} for i, s in
            enumerate(range(0, n, size))]  # fmt: skip


def _fanned_row(rule: str, dataset: str, what: str, names: list[str], res: Mapping) -> PlanRow:
    """A rule with one job per name (a work unit, a band x block), each with the resources ``res``."""
    row = PlanRow(rule, dataset, None, what, len(names), 1, 0, res["runtime"], cpus=res["cpus_per_task"], units=names)
    row.hours = len(names) * res["runtime"] / 60
    return row


def _unit_rows(cfg: Mapping, name: str, cluster: Mapping) -> list[PlanRow]:
    """fetch and shard: one job per work unit (``jobs`` = units, runtime per job), and the dataset's gather."""
    units = dataset_units(cfg, name)
    n, size = dataset_storage(cfg, name)
    ds = cfg["data"]["datasets"][name]
    rows = []
    for rule in ("fetch", "shard"):
        res = unit_resources({**cfg, "cluster": cluster}, rule, ds, units)
        largest = max(int(u.get("stop", 0)) - int(u.get("start", 0)) for u in units)
        what = f"{len(units)} units" + (f" of <= {largest:,} rows" if largest else "")
        row = _fanned_row(rule, name, what, [u["unit"] for u in units], res)
        row.storage_bytes = size if rule == "shard" else 0
        rows.append(row)
    runtime = rule_resources(cfg, "gather")["runtime"]
    rows.append(PlanRow("gather", name, None, f"{len(units)} units -> shards/, manifest/", 1, 1, 0, runtime))
    return rows


def _dedup_rows(cfg: Mapping) -> list[PlanRow]:
    """One `dedup` job, or with ``data.dedup.fan_out`` the jobs of workflow/rules/dedup.smk: the eval sets' index,
    one `dedup_unit` per work unit of the train set, the `dedup_bands` list, one `dedup_block` per (band, block), then
    the `dedup` reduce."""
    runtime, fan = rule_resources(cfg, "dedup")["runtime"], cfg["data"]["dedup"].get("fan_out")
    if not fan:
        return [PlanRow("dedup", "-", None, "dedup", 1, 1, 0, runtime)]
    res = rule_resources(cfg, "dedup_part")
    name = dedup_dataset(cfg)
    units = [u["unit"] for u in dataset_units(cfg, name)]
    n_blocks = 2 ** int(fan.get("block_bits", 0))
    blocks = [f"b{b}-p{p}" for b in range(int(fan["bands"])) for p in range(n_blocks)]
    return [
        PlanRow("dedup_eval_index", name, None, "eval sets' index", 1, 1, 0, res["runtime"]),
        _fanned_row("dedup_unit", name, f"{len(units)} units", units, res),
        PlanRow("dedup_bands", name, None, "units' band index list (local)", 1, 1, 0, res["runtime"]),
        _fanned_row("dedup_block", name, f"{fan['bands']} bands x {n_blocks} blocks", blocks, res),
        PlanRow("dedup", name, None, "reduce: pairs -> kept", 1, 1, 0, runtime),
    ]


def unit_jobs(p: Plan) -> list[str]:
    """One line per unit job of the plan: rule, dataset, unit, CPUs, runtime."""
    return [
        f"{r.rule} {r.experiment} {unit}: {r.cpus} CPU, {r.runtime_min} min"
        for r in p.rows
        if r.units
        for unit in r.units
    ]


def _si(x: float, unit: str = "") -> str:
    for factor, prefix in ((1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= factor:
            return f"{x / factor:.2f} {prefix}{unit}"
    return f"{x:.0f} {unit}".rstrip()


HEADER = "rule|experiment|seed|stage|jobs|nodes x GPUs|runtime/job|steps|FLOPs/step|total FLOPs|GPU-h|storage|MFU"


def _cells(r: PlanRow, gpu_type: str) -> list[str]:
    devices = f"{r.nodes} x {r.gpus_per_node} {gpu_type}" if r.gpus_per_node else f"{r.nodes} x CPU"
    cells = [r.rule, r.experiment, "" if r.seed is None else str(r.seed), r.stage, str(r.jobs), devices]
    cells += [f"{r.runtime_min} min", str(r.steps or "")]
    values = [r.flops_per_step, r.total_flops, r.gpu_hours, r.storage_bytes]
    texts = [_si(r.flops_per_step), _si(r.total_flops), f"{r.gpu_hours:,.1f}", _si(r.storage_bytes, "B")]
    cells += [text if value else "" for text, value in zip(texts, values, strict=True)]
    u = r.utilisation
    return cells + ["" if u is None else f"{u.mfu:.1%}" if u.mfu is not None else _si(u.rate, "FLOP/s")]


def format_plan(p: Plan) -> str:
    """Plain-text table of the plan's rows and totals."""
    t = p.totals
    rows = [_cells(r, p.gpu_type) for r in p.rows]
    total = ["total"] + [""] * 3 + [str(t["jobs"])] + [""] * 4
    rows.append(total + [_si(t["total_flops"]), f"{t['gpu_hours']:,.1f}", _si(t["storage_bytes"], "B"), ""])
    head = HEADER.replace("GPU-h", f"{p.gpu_type}-h").split("|")
    widths = [max(len(row[i]) for row in [head, *rows]) for i in range(len(head))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    peak = GPU_PEAK_FLOPS[p.gpu_type] / 1e12
    head_line = f"plan for preset {p.preset}: {p.gpu_type} at {p.mfu or DEFAULT_MFU:.0%} of the dense bf16/fp16 peak"
    text = [f"{head_line} ({peak:.0f} TFLOP/s)"]
    if p.mfu is None:
        text[0] += " where no measured MFU of a row's shape is recorded (MFU column and sources)"
    text += [fmt.format(*head), fmt.format(*["-" * w for w in widths])]
    text += [fmt.format(*row) for row in rows]
    text += [f"unit rate source: {stage}: {source}" for stage, source in p.unit_rates.items()]
    for r in p.rows:
        if r.utilisation is not None:
            seed = "" if r.seed is None else f" seed {r.seed}"
            text.append(f"MFU source: {r.rule} {r.experiment}{seed} {r.stage}: {r.utilisation.source}")
    text.append(f"storage: shards {_si(t['shard_bytes'], 'B')}, checkpoints {_si(t['checkpoint_bytes'], 'B')}")
    return "\n".join(text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--experiments", nargs="+", default=["franca"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--override", action="append", default=[], help="Hydra override (repeatable)")
    parser.add_argument("--gpu-type", choices=sorted(GPU_PEAK_FLOPS))
    parser.add_argument(
        "--mfu",
        type=float,
        help=f"model FLOP utilisation, fraction of the peak (default: recorded, else {DEFAULT_MFU})",
    )
    parser.add_argument("--mfu-results", help="directory of bench_mfu results (default benchmarks/results)")
    parser.add_argument(
        "--unit-jobs",
        action="store_true",
        help="also list every unit job (fetch / shard / dedup_unit per unit, dedup_block per band x block)",
    )


def run(args: argparse.Namespace) -> int:
    exps = {name: {"seeds": args.seeds} for name in args.experiments}
    p = plan(args.preset, exps, args.override, gpu_type=args.gpu_type, mfu=args.mfu, mfu_results=args.mfu_results)
    sys.stdout.write(format_plan(p) + "\n")
    if args.unit_jobs:
        sys.stdout.write("unit jobs:\n" + "".join(f"  {line}\n" for line in unit_jobs(p)))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="franca plan", description="Jobs, FLOPs, GPU-hours and storage of a run.")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
