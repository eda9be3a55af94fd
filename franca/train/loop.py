"""The pretraining loop of spec 2.5 / 2.6 (and the stage-2 high-resolution fine-tune of spec 4).

One iteration, in the order of spec 2.5:
  1. set the schedules (lr, wd, last-layer lr, momentum, teacher temperature);
  2. zero the gradients;
  3. teacher forward and Sinkhorn-Knopp (no grad);
  4. student forward and loss, backward (scaled under fp16);
  5. unscale, clip per sub-module, optimizer step, scaler update;
  6. EMA of the teacher;
  7. logging (metrics.jsonl, ``log_fn``, progress bar); then every ``checkpoint_period`` a rolling checkpoint.

Data: ShardStream -> DataAugmentationDINO -> collate_data_and_cast (masks). With ``num_workers = 0`` (the default)
everything runs in this process, so a rolling checkpoint holds the exact data position and every RNG and a resumed
run reproduces the uninterrupted one bit for bit on CPU. With workers, decoding and augmentation move to the
workers (torch's per-worker seeds, derived from the run seed, the rank and the resume position) and only masking
and collation stay here: runs stay deterministic, but a resumed run draws other augmentations than an
uninterrupted one, and a corrupt sample shifts the worker round robin (the data position is then counted as
``batches * B``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from franca.config import train_seed
from franca.data.augmentations import DataAugmentationDINO
from franca.data.collate import collate_data_and_cast, stack_crops
from franca.data.masking import MaskingGenerator
from franca.data.shards import ShardStream
from franca.train import checkpoint as ckpt_io
from franca.train import distributed as D
from franca.train.highres import init_from_checkpoint, load_prefixed
from franca.train.optim import apply_schedules, build_optimizer, clip_gradients
from franca.train.schedules import build_schedules, cfg_get

__all__ = ["DataPipeline", "FiniteGuard", "compile_regions", "plain_config", "run_option", "train", "train_step"]

logger = logging.getLogger(__name__)

_RUN_DEFAULTS = {
    "device": "auto",
    "num_workers": 0,
    "num_threads": None,  # torch intra-op threads; None keeps torch's default
    "checkpoint_period": 1000,
    "keep_checkpoints": 2,
    "log_period": 10,
}


def plain_config(cfg) -> dict:
    """A resolved plain-dict copy of ``cfg`` (OmegaConf DictConfig or Mapping), safe to store in a checkpoint."""
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            return OmegaConf.to_container(cfg, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    return json.loads(json.dumps(cfg))


def run_option(cfg: Mapping, key: str):
    """An orchestration key: ``run.<key>``, else ``train.<key>``, else the default of ``_RUN_DEFAULTS``."""
    for section in ("run", "train"):
        value = cfg_get(cfg, f"{section}.{key}", None)
        if value is not None:
            return value
    return _RUN_DEFAULTS[key]


class DataPipeline:
    """Batches of one rank: ShardStream -> augmentation -> masks and collation (docs/interfaces.md batch dict)."""

    def __init__(
        self, cfg: Mapping, shards, kept_keys, seed: int, rank: int, world_size: int, start_sample: int, device=None
    ):
        self.batch_size = int(cfg_get(cfg, "train.batch_size_per_gpu"))
        self.num_workers = int(run_option(cfg, "num_workers"))
        # crops.augment_device: "pil" (per sample, in the stream or its workers) or "tensor" (franca.data.gpu_augment:
        # the batch at once on ``device``, here, after the stream has turned each image into a uint8 tensor)
        self.augment_device = str(cfg_get(cfg, "crops.augment_device", "pil"))
        if self.augment_device not in ("pil", "tensor"):
            raise ValueError(f"config key crops.augment_device must be pil|tensor, got {self.augment_device!r}")
        if device is None:  # the training device of init_distributed (run.device auto|cpu|cuda; set_device done)
            use_cuda = torch.cuda.is_available() and run_option(cfg, "device") != "cpu"
            device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
        self.device = torch.device(device)
        if self.augment_device == "tensor":
            from franca.data.gpu_augment import TensorAugmentationDINO

            self.augment = TensorAugmentationDINO.from_config(cfg_get(cfg, "crops"))
        else:
            self.augment = DataAugmentationDINO.from_config(cfg_get(cfg, "crops"))
        patch = int(cfg_get(cfg, "model.patch_size"))
        grid = int(cfg_get(cfg, "crops.global_crops_size")) // patch
        self.n_tokens = grid * grid
        rank_seed = seed + rank
        # the masking and collation RNGs of this rank, saved in rolling checkpoints
        self.generators = {
            "mask": random.Random(rank_seed),
            "mask_np": np.random.default_rng(rank_seed),
            "collate": random.Random(rank_seed + 7919),
        }
        if self.augment_device == "tensor":
            self.generators["augment"] = torch.Generator().manual_seed(rank_seed + 104_729)
        masking = dict(cfg_get(cfg, "masking"))
        self.mask_generator = MaskingGenerator(
            (grid, grid), rng=self.generators["mask"], np_rng=self.generators["mask_np"], **masking
        )
        self.mask_ratio = tuple(cfg_get(cfg, "ibot.mask_ratio_min_max"))
        self.mask_probability = float(cfg_get(cfg, "ibot.mask_sample_probability"))
        self.start_sample = int(start_sample)
        self.stream = ShardStream(
            shards,
            kept_keys=kept_keys,
            seed=seed,
            rank=rank,
            world_size=world_size,
            start_sample=start_sample,
            transform=self._augment if self.augment_device == "pil" else self._as_tensor,
            worker_batch_size=self.batch_size,
        )
        self._batches = 0
        if self.num_workers > 0:
            gen = torch.Generator().manual_seed(seed * 1_000_003 + rank * 7_919 + start_sample)
            loader = torch.utils.data.DataLoader(
                self.stream,
                batch_size=self.batch_size,
                num_workers=self.num_workers,
                # masks are drawn here, in the main process, from the checkpointed RNGs (and the tensor path's crops)
                collate_fn=stack_crops if self.augment_device == "pil" else list,
                generator=gen,
                persistent_workers=True,
                pin_memory=self.device.type == "cuda",  # page-locked batches: _to_device's copies run asynchronously
            )
            self._iter = iter(loader)
        else:
            self._iter = iter(self.stream)

    def _augment(self, sample: Mapping) -> tuple[dict, int | None]:
        return self.augment(sample["image"]), sample["label"]

    @staticmethod
    def _as_tensor(sample: Mapping) -> tuple[torch.Tensor, int | None]:
        """(3, H, W) uint8 of the decoded RGB image: the tensor path's input."""
        return torch.from_numpy(np.array(sample["image"], dtype=np.uint8)).permute(2, 0, 1), sample["label"]

    @property
    def position(self) -> int:
        """Slots of this rank's stream consumed by the batches returned so far (ShardStream ``start_sample``)."""
        if self.num_workers > 0:
            return self.start_sample + self._batches * self.batch_size
        return self.stream.position

    def close(self) -> None:
        """Stop the DataLoader workers now (persistent workers otherwise live until garbage collection, and a later
        DataLoader's forked workers would inherit this iterator)."""
        shutdown = getattr(self._iter, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
        self._iter = None

    def next_batch(self) -> dict:
        if self.num_workers > 0:
            samples = next(self._iter)
        else:
            samples = [next(self._iter) for _ in range(self.batch_size)]
        self._batches += 1
        if self.augment_device == "tensor":
            images = [image.to(self.device, non_blocking=True) for image, _ in samples]
            samples = self.augment(images, self.generators["augment"])  # stacked crop-major, as stack_crops
        return collate_data_and_cast(
            samples,
            mask_ratio_tuple=self.mask_ratio,
            mask_probability=self.mask_probability,
            dtype=torch.float32,
            n_tokens=self.n_tokens,
            mask_generator=self.mask_generator,
            rng=self.generators["collate"],
        )


def _to_device(batch: Mapping, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def _precision(cfg: Mapping, device: torch.device) -> tuple[str, Callable[[], contextlib.AbstractContextManager]]:
    precision = cfg_get(cfg, "train.precision", "fp32")
    if precision not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"config key 'train.precision' must be fp32|bf16|fp16, got {precision!r}")
    if precision != "fp32" and device.type != "cuda":
        logger.warning("train.precision=%s needs CUDA; running fp32 on %s", precision, device)
        precision = "fp32"
    if precision == "fp32":
        return precision, contextlib.nullcontext
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return precision, lambda: torch.autocast("cuda", dtype=dtype)


class FiniteGuard:
    """Spec 2.5's "a NaN in the loss raises", with one host sync every ``period`` steps (``train.nan_check_period``,
    default 1: every step, as the official code). Between checks each step only ORs its flag into a device tensor and
    keeps the iteration and loss terms of the first non-finite step, so no step is missed; a check all-reduces the
    flag (every rank raises together) and raises FloatingPointError naming that iteration and its terms."""

    def __init__(self, period: int = 1) -> None:
        if int(period) < 1:
            raise ValueError(f"config key train.nan_check_period must be >= 1, got {period!r}")
        self.period = int(period)
        self.bad = self.first = self.terms = None

    def update(self, losses: Mapping[str, torch.Tensor], it: int) -> None:
        """Record this step's flag on the device (no host sync); check when ``it + 1`` is a multiple of the period."""
        bad = (~torch.isfinite(losses["loss"].detach())).any()
        small = {k: v.detach().float() for k, v in losses.items() if torch.is_tensor(v) and v.numel() < 16}
        if self.bad is None:
            self.bad, self.first, self.terms = torch.zeros_like(bad), torch.full_like(bad, -1, dtype=torch.long), small
        newly = bad & ~self.bad  # the first non-finite step since the last check
        self.first = torch.where(newly, torch.full_like(self.first, it), self.first)
        self.terms = {k: torch.where(newly, v, self.terms[k]) for k, v in small.items()}
        self.bad = self.bad | bad
        if (it + 1) % self.period == 0:
            self.check(it)

    def check(self, it: int) -> None:
        """One all-reduce and host sync; raise if any step since the last check had a non-finite loss on any rank."""
        if self.bad is None:
            return
        flag = self.bad.float().reshape(1)
        D.sk_all_reduce(flag)
        if flag.item() > 0:
            first = int(self.first.item())
            seen = f"iteration {first} (checked at iteration {it})" if first >= 0 else f"a step before iteration {it}"
            terms = ", ".join(f"{k}={v.cpu().tolist()}" for k, v in self.terms.items())
            raise FloatingPointError(
                f"non-finite loss at {seen} on {int(flag.item())} rank(s); terms on rank {D.get_rank()}: {terms}"
            )
        self.bad = self.first = self.terms = None


def train_step(
    model, batch: Mapping, optimizer, scaler, values: Mapping[str, float], clip_grad, autocast, it: int, guard=None
):
    """One iteration of spec 2.6 (steps 1-6); returns (loss dict, grad norms) as detached tensors. ``guard``: the
    run's :class:`FiniteGuard` (None: a check of this step alone, with its host sync)."""
    apply_schedules(optimizer, values["lr"], values["wd"], values["last_layer_lr"])  # 1
    optimizer.zero_grad(set_to_none=True)  # 2
    with torch.no_grad(), autocast():  # 3
        targets = model.teacher_targets(batch, values["teacher_temp"])
    with autocast():  # 4
        student_out = model.student_outputs(batch)
        losses = model.compute_losses(student_out, targets, batch)
    (guard or FiniteGuard(1)).update(losses, it)
    if scaler is not None:
        scaler.scale(losses["loss"]).backward()
    else:
        losses["loss"].backward()
    norms = clip_gradients(model.student, clip_grad, optimizer, scaler)  # 5
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    with torch.no_grad():  # 6
        model.update_teacher(values["momentum"])
    return {k: v.detach() if torch.is_tensor(v) else v for k, v in losses.items()}, norms


def _flatten_metrics(losses: Mapping, norms: Mapping) -> dict[str, torch.Tensor]:
    """Scalars as they are; per-level vectors as ``<name>_level<i>`` (i = 1 is the smallest level)."""
    flat = {}
    for name, value in {**losses, **norms}.items():
        if not torch.is_tensor(value):
            value = torch.as_tensor(value, dtype=torch.float64)
        if value.numel() == 1:
            flat[name] = value.reshape(())
        else:
            for i, v in enumerate(value.flatten(), start=1):
                flat[f"{name}_level{i}"] = v
    return flat


def _logged_variants(m: dict[str, float]) -> None:
    """Spec 10.3 Q8: the official log halves koleo and ibot, and its total is the sum of the logged terms."""
    if "koleo_loss" in m and "koleo_loss_logged" not in m:
        m["koleo_loss_logged"] = m["koleo_loss"] / 2
    if "ibot_loss" in m and "ibot_loss_logged" not in m:
        m["ibot_loss_logged"] = m["ibot_loss"] / 2
    parts = ("dino_local_crops_loss", "dino_global_crops_loss", "koleo_loss_logged", "ibot_loss_logged")
    if "total_loss_logged" not in m and all(p in m for p in parts):
        m["total_loss_logged"] = sum(m[p] for p in parts)


def _truncate_metrics(path: Path, mirror: Path, start_it: int) -> None:
    """Start `path` (the declared output) and its `mirror` beside the rolling checkpoints with the lines of
    iterations < start_it. The mirror survives a failed job (the workflow deletes a failed job's outputs), so a
    resumed run keeps the history logged before the kill; a fresh run (start_it 0) starts both empty."""
    source = mirror if mirror.exists() else path
    lines = source.read_text().splitlines() if source.exists() else []
    keep = "".join(ln + "\n" for ln in lines if ln.strip() and json.loads(ln)["iteration"] < start_it)
    for target in (path, mirror):
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(keep)


def _rolling_state(model, optimizer, scaler, data: DataPipeline, it: int, world_size: int) -> dict | None:
    """The resume state of every rank, gathered on rank 0 (None elsewhere). ``it`` = next iteration to run."""
    rank_state = {"rng": ckpt_io.capture_rng_state(data.generators), "data_position": data.position}
    sharded = D.is_sharded(model.student)
    if sharded:  # FSDP: every rank holds a shard of the optimizer state
        rank_state["optimizer"] = optimizer.state_dict()
    per_rank = D.all_gather_objects(rank_state)
    if not (sharded or D.is_main_process()):
        return None
    student = D.module_dict_state(model.student)  # collective under FSDP
    teacher = D.module_dict_state(model.teacher)
    if not D.is_main_process():
        return None
    return {
        "student": student,
        "teacher": teacher,
        "optimizer": [s["optimizer"] for s in per_rank] if sharded else optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else {},
        "rng": [s["rng"] for s in per_rank],
        "data_position": [int(s["data_position"]) for s in per_rank],
        "world_size": world_size,
        "next_iteration": it,
    }


def _build_model(cfg: Mapping, info: D.DistInfo, seed: int):
    from franca.train.ssl_meta_arch import SSLMetaArch

    torch.manual_seed(seed)  # identical initialisation on every rank (DDP also broadcasts the student)
    model = SSLMetaArch(cfg, D.sk_all_reduce, world_size=info.world_size, all_reduce_max=D.sk_all_reduce_max)
    return compile_regions(model.to(info.device), cfg)


def compile_regions(model, cfg: Mapping):
    """``train.compile`` (default false): torch.compile each transformer block of the student and teacher backbones
    in place (``nn.Module.compile``: parameter names, state dicts and DDP/FSDP wrapping unchanged; the blocks share
    shapes, so one compilation serves all). ``train.compile_backend`` picks the backend (default inductor). The
    packed multi-crop pass draws its drop paths outside the blocks, so compiled blocks see the eager draws."""
    if not bool(cfg_get(cfg, "train.compile", False)):
        return model
    backend = str(cfg_get(cfg, "train.compile_backend", "inductor"))
    for part in (model.student, model.teacher):
        for block in part["backbone"].blocks:
            block.compile(backend=backend)
    logger.info("torch.compile (%s) of the backbone blocks", backend)
    return model


def _resume_into(model, resume: Mapping, info: D.DistInfo) -> None:
    if int(resume.get("world_size", 1)) != info.world_size:
        raise ValueError(
            f"{resume['path']} was written by a run of world size {resume.get('world_size')}, this run has "
            f"{info.world_size}: resume with the same number of processes (or use another ckpt_dir)"
        )
    for tree in ("student", "teacher"):
        modules = getattr(model, tree)
        for name in modules:
            load_prefixed(D.unwrap(modules[name]), resume[tree], f"{name}.", f"{resume['path']} [{tree}]")


def _setup(cfg, info, seed, ckpt_dir, init_from, init_mode):
    """Model (wrapped), optimizer, scaler, schedules and the resume checkpoint (or None)."""
    model = _build_model(cfg, info, seed)
    resume = ckpt_io.latest_rolling(ckpt_dir, cfg)
    if resume is not None:
        _resume_into(model, resume, info)
        logger.info("resuming from %s at iteration %d", resume["path"], resume["next_iteration"])
    elif init_from is not None:
        init_from_checkpoint(model, init_from, init_mode)
    precision, autocast = _precision(cfg, info.device)
    D.wrap_student(model, cfg_get(cfg, "train.distributed", "ddp"), info, precision)
    optimizer = build_optimizer(model.param_groups(), cfg)
    scaler = None
    if precision == "fp16":
        if D.is_sharded(model.student):
            from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

            scaler = ShardedGradScaler()
        else:
            scaler = torch.amp.GradScaler("cuda")
    if resume is not None:
        opt_state = resume["optimizer"]
        optimizer.load_state_dict(opt_state[info.rank] if isinstance(opt_state, list) else opt_state)
        if scaler is not None and resume.get("scaler"):
            scaler.load_state_dict(resume["scaler"])
    return model, optimizer, scaler, autocast, resume


def train(
    cfg: Mapping,
    *,
    shards: list[str],
    kept_keys: set[str] | None,
    out_dir,
    ckpt_dir,
    init_from=None,
    init_mode: str = "full",
    log_fn: Callable[[int, dict], None] | None = None,
    progress: bool = True,
) -> dict:
    """Run (or resume) one training stage; returns a summary dict. See the module docstring for the step order.

    ``init_from`` (ignored when resuming): a previous stage's checkpoint, loaded with ``init_mode`` ``"full"``
    (student and teacher) or ``"backbone"`` (teacher backbone into both, fresh heads; spec 4 stage 2).
    Outputs: ``out_dir/metrics.jsonl`` and ``out_dir/checkpoint.pt`` (rank 0); rolling checkpoints in ``ckpt_dir``.
    """
    cfg = plain_config(cfg)
    out_dir, ckpt_dir = Path(out_dir), Path(ckpt_dir)
    info = D.init_distributed(run_option(cfg, "device"))
    if run_option(cfg, "num_threads"):  # on a shared 2-core CPU, 1 thread beats 2 oversubscribed ones by ~5x
        torch.set_num_threads(int(run_option(cfg, "num_threads")))
    seed = train_seed(cfg)
    model, optimizer, scaler, autocast, resume = _setup(cfg, info, seed, ckpt_dir, init_from, init_mode)
    schedules = build_schedules(cfg, info.world_size)
    total = len(schedules.lr)
    start_it = int(resume["next_iteration"]) if resume else 0
    # per-rank RNGs (augmentation, drop path, masks): seed + rank, or the checkpointed states
    torch.manual_seed(seed + info.rank)
    np.random.seed(seed + info.rank)
    random.seed(seed + info.rank)
    position = resume["data_position"][info.rank] if resume else 0
    data = DataPipeline(cfg, shards, kept_keys, seed, info.rank, info.world_size, position)
    if resume:
        ckpt_io.restore_rng_state(resume["rng"][info.rank], data.generators)
    main = D.is_main_process()
    metrics_path = out_dir / "metrics.jsonl"
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        _truncate_metrics(metrics_path, ckpt_dir / "metrics.jsonl", start_it)
    period, log_period = int(run_option(cfg, "checkpoint_period")), max(1, int(run_option(cfg, "log_period")))
    keep, clip = int(run_option(cfg, "keep_checkpoints")), cfg_get(cfg, "optim.clip_grad", None)
    images_per_step = data.batch_size * info.world_size
    guard = FiniteGuard(cfg_get(cfg, "train.nan_check_period", 1))
    bar = tqdm(total=total, initial=start_it, disable=not (progress and main), desc="train", dynamic_ncols=True)
    last = {}
    t_log, steps_since_log = time.perf_counter(), 0
    for it in range(start_it, total):
        batch = _to_device(data.next_batch(), info.device)
        values = schedules.at(it)
        losses, norms = train_step(model, batch, optimizer, scaler, values, clip, autocast, it, guard)
        steps_since_log += 1
        bar.update(1)
        if it % log_period == 0 or it == total - 1:  # 7
            guard.check(it)  # logging syncs anyway
            metrics = D.mean_over_ranks(_flatten_metrics(losses, norms))
            _logged_variants(metrics)
            elapsed = time.perf_counter() - t_log
            metrics.update(values, iteration=it, images_per_s=images_per_step * steps_since_log / max(elapsed, 1e-9))
            t_log, steps_since_log, last = time.perf_counter(), 0, metrics
            if main:
                for target in (metrics_path, ckpt_dir / "metrics.jsonl"):
                    with target.open("a") as fh:
                        fh.write(json.dumps(metrics) + "\n")
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{values['lr']:.2e}")
                if log_fn is not None:
                    log_fn(it, metrics)
        if period > 0 and (it + 1) % period == 0 and it + 1 < total:
            guard.check(it)  # never a checkpoint of a diverged run
            state = _rolling_state(model, optimizer, scaler, data, it + 1, info.world_size)
            if state is not None:
                ckpt_io.save_rolling(ckpt_dir, state, cfg, iteration=it + 1, keep=keep)
            D.barrier()
    bar.close()
    data.close()
    final = out_dir / "checkpoint.pt"
    ckpt_io.save_final(final, model, cfg, total)  # every rank (FSDP gathers); rank 0 writes
    D.barrier()
    return {
        "checkpoint": str(final),
        "metrics": str(metrics_path),
        "iterations": total,
        "resumed_from": resume["path"] if resume else None,
        "start_iteration": start_it,
        "world_size": info.world_size,
        "last_metrics": last,
    }
