"""One short check of the CUDA paths that CI (CPU only) cannot reach; run on a lent GPU machine.

    python benchmarks/gpu_check.py --config gpu_cfg.json --out results.json

``--config``: the resolved pretrain config of the ``small`` preset (ViT-S/14, 224/98 crops, 16384 prototypes),
written by ``python benchmarks/gpu_check.py --write-config gpu_cfg.json`` on a machine that has Hydra.
Sections (each recorded in the JSON, a failure in one does not stop the others):

* ``sdpa``: the ViT forward under bf16 autocast with each SDPA kernel (flash, memory-efficient, math) against an
  fp32 math-kernel reference (max abs error of the normalised CLS and patch tokens), and its time.
* ``wrappers``: a NCCL process group of one; the same 3 training steps (fp32, TF32 off) unwrapped, under DDP and
  under FSDP (SHARD_GRAD_OP, one unit per block, use_orig_params): losses and the final student/teacher states
  must agree. Then FSDP with bf16 and with fp16 (ShardedGradScaler) for 5 steps: finite losses; the gathered
  checkpoint (``save_final``) loads back into an unwrapped model.
* ``throughput``: where the loop's time goes (augmentation per image, the DataPipeline alone, train_step alone).
* ``loop``: ``franca.train.loop.train`` (the pretrain stage's entry point) for fp32, bf16 and fp16 on generated
  shards: finite losses, first/last loss, images/s (DataLoader workers feed it), a rolling checkpoint written.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import random
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

CUDA = torch.cuda.is_available()  # without it (a dry run here): CPU, gloo, fp32 only, no FSDP/SDPA kernels
DEVICE = torch.device("cuda", 0) if CUDA else torch.device("cpu")
CROP_OVERRIDES = {"optim.iterations": 40, "optim.warmup_iters": 10, "optim.freeze_last_layer_iters": 5}


def write_config(path: str, preset: str) -> None:
    from franca.config import compose, stage_config

    cfg = stage_config(compose(preset, "franca", seed=0), "pretrain", 1)
    Path(path).write_text(json.dumps(cfg, indent=1))
    print(f"wrote {path}")


def _set(cfg: dict, dotted: str, value) -> None:
    *head, last = dotted.split(".")
    node = cfg
    for key in head:
        node = node.setdefault(key, {})
    node[last] = value


def _random_batch(cfg: dict, batch: int, seed: int, device) -> dict:
    from franca.data.collate import collate_data_and_cast
    from franca.data.masking import MaskingGenerator

    g = torch.Generator().manual_seed(seed)
    crops = cfg["crops"]
    gs, ls, nl = crops["global_crops_size"], crops["local_crops_size"], crops["local_crops_number"]
    samples = [
        {
            "global_crops": [torch.randn(3, gs, gs, generator=g) for _ in range(2)],
            "local_crops": [torch.randn(3, ls, ls, generator=g) for _ in range(nl)],
        }
        for _ in range(batch)
    ]
    grid = gs // cfg["model"]["patch_size"]
    masking = MaskingGenerator((grid, grid), rng=random.Random(seed), np_rng=np.random.default_rng(seed),
                               **cfg["masking"])  # fmt: skip
    out = collate_data_and_cast(samples, tuple(cfg["ibot"]["mask_ratio_min_max"]), 0.5, torch.float32, grid * grid,
                                masking, rng=random.Random(seed))  # fmt: skip
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in out.items()}


def check_sdpa(cfg: dict) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from franca.models.vision_transformer import build_backbone

    torch.manual_seed(0)
    net = build_backbone(cfg["model"]).cuda().eval()
    x = torch.randn(64, 3, 224, 224, device="cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]):
        ref = net.forward_features(x)
    out = {}
    for name, backend in [("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION),
                          ("math", SDPBackend.MATH)]:  # fmt: skip
        try:
            with torch.no_grad(), sdpa_kernel([backend]), torch.autocast("cuda", dtype=torch.bfloat16):
                got = net.forward_features(x)
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                for _ in range(10):
                    net.forward_features(x)
                torch.cuda.synchronize()
            out[name] = {
                "ok": True,
                "ms_per_forward_b64": (time.perf_counter() - t0) * 100,
                "max_abs_err_cls": float((got["x_norm_clstoken"].float() - ref["x_norm_clstoken"]).abs().max()),
                "max_abs_err_patch": float((got["x_norm_patchtokens"].float() - ref["x_norm_patchtokens"]).abs().max()),
            }
        except Exception as e:  # a kernel unavailable for this shape/dtype is a finding, not a crash
            out[name] = {"ok": False, "error": f"{type(e).__name__}: {e}"[:400]}
    return out


def _steps(cfg, mode: str, precision: str, batches, n_steps: int) -> dict:
    from franca.train import distributed as D
    from franca.train.loop import _build_model, _precision, train_step
    from franca.train.optim import build_optimizer
    from franca.train.schedules import build_schedules

    info = D.DistInfo(0, 1, 0, DEVICE, None if mode == "plain" else ("nccl" if CUDA else "gloo"))
    model = _build_model(cfg, info, seed=0)
    gen = torch.Generator().manual_seed(1234)  # move the student off the teacher: real gradients (cf. test_ddp)
    with torch.no_grad():
        for p in model.student.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=gen).to(p.device))
    D.wrap_student(model, "ddp" if mode == "plain" else mode, info, precision)
    optimizer = build_optimizer(model.param_groups(), cfg)
    _, autocast = _precision({"train": {"precision": precision}}, info.device)
    scaler = None
    if precision == "fp16":
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        scaler = ShardedGradScaler() if D.is_sharded(model.student) else torch.amp.GradScaler("cuda")
    sched = build_schedules(cfg, 1)
    it0 = int(cfg["optim"]["freeze_last_layer_iters"]) + 1
    losses = []
    for i in range(n_steps):
        out, _ = train_step(model, batches[i % len(batches)], optimizer, scaler, sched.at(it0 + i),
                            cfg["optim"]["clip_grad"], autocast, it0 + i)  # fmt: skip
        losses.append(float(out["loss"]))
    return {"model": model, "losses": losses,
            "student": D.module_dict_state(model.student), "teacher": D.module_dict_state(model.teacher)}  # fmt: skip


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))[:5]
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def check_wrappers(cfg: dict) -> dict:
    import torch.distributed as dist

    from franca.train import checkpoint as ck
    from franca.train.ssl_meta_arch import SSLMetaArch

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29533", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    if CUDA:
        dist.init_process_group("nccl", rank=0, world_size=1, device_id=DEVICE)
    else:
        dist.init_process_group("gloo", rank=0, world_size=1)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    cfg = copy.deepcopy(cfg)
    cfg["model"]["drop_path_rate"] = 0.0  # identical random draws are not the point here
    batches = [_random_batch(cfg, 16, seed, DEVICE) for seed in (1, 2, 3)]
    res = {}
    plain = _steps(cfg, "plain", "fp32", batches, 3)
    for mode in ("ddp", "fsdp") if CUDA else ("ddp",):
        got = _steps(cfg, mode, "fp32", batches, 3)
        res[f"{mode}_fp32_vs_plain"] = {
            "losses": got["losses"], "plain_losses": plain["losses"],
            "max_loss_diff": max(abs(a - b) for a, b in zip(got["losses"], plain["losses"], strict=True)),
            "max_student_diff": _max_diff(got["student"], plain["student"]),
            "max_teacher_diff": _max_diff(got["teacher"], plain["teacher"]),
        }  # fmt: skip
    for precision in ("bf16", "fp16") if CUDA else ():
        got = _steps(cfg, "fsdp", precision, batches, 5)
        with tempfile.TemporaryDirectory() as tmp:
            path = ck.save_final(Path(tmp) / "final.pt", got["model"], cfg, 5)
            saved = ck.load_checkpoint(path)
            fresh = SSLMetaArch(cfg)
            missing = fresh.load_state_dict(
                {f"{tree}.{k}": v for tree in ("student", "teacher") for k, v in saved[tree].items()}, strict=True
            )
        res[f"fsdp_{precision}"] = {
            "losses": got["losses"],
            "finite": all(np.isfinite(got["losses"])),
            "checkpoint_reloads_strict": not (missing.missing_keys or missing.unexpected_keys),
            "teacher_equals_saved": _max_diff(got["teacher"], saved["teacher"]) == 0.0,
        }
    dist.destroy_process_group()
    return res


def check_loop(cfg: dict, workdir: Path) -> dict:
    from franca.data.shards import list_shards
    from franca.data.synthetic import generate
    from franca.train.loop import train

    generate(workdir / "data", seed=0, n_train=2000, n_val=0, n_test=0, image_size=64, shard_size=250)
    shards = list_shards(workdir / "data" / "shards", "train")
    res = {}
    for precision in ("fp32", "bf16", "fp16") if CUDA else ("fp32",):
        c = copy.deepcopy(cfg)
        for k, v in CROP_OVERRIDES.items():
            _set(c, k, v)
        _set(c, "train.precision", precision)
        _set(c, "train.batch_size_per_gpu", 64)
        c["run"] = {"device": DEVICE.type, "num_workers": 12 if CUDA else 1, "log_period": 10, "checkpoint_period": 20}
        t0 = time.perf_counter()
        summary = train(c, shards=shards, kept_keys=None, out_dir=workdir / precision,
                        ckpt_dir=workdir / f"ckpt-{precision}", progress=False)  # fmt: skip
        lines = [json.loads(x) for x in Path(summary["metrics"]).read_text().splitlines()]
        res[precision] = {
            "wall_s": time.perf_counter() - t0,
            "losses": [round(x["loss"], 4) for x in lines],
            "finite": all(np.isfinite(x["loss"]) for x in lines),
            "images_per_s_last": lines[-1]["images_per_s"],
            "rolling_checkpoints": sorted(p.name for p in (workdir / f"ckpt-{precision}").glob("*.pt")),
        }
    return res


def check_throughput(cfg: dict, workdir: Path) -> dict:
    """Where the loop's time goes: augmentation per image (one core), the DataPipeline with 12 workers alone, and
    train_step alone on a fixed GPU batch of 64 (fp32 and bf16)."""
    from PIL import Image

    from franca.data.augmentations import DataAugmentationDINO
    from franca.data.shards import list_shards
    from franca.data.synthetic import generate
    from franca.train.loop import DataPipeline

    res = {}
    aug = DataAugmentationDINO.from_config(cfg["crops"])
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    for _ in range(20):
        aug(img)
    res["augment_ms_per_image_one_core"] = (time.perf_counter() - t0) / 20 * 1000
    torch.set_num_threads(os.cpu_count() or 1)
    if not (workdir / "data").exists():
        generate(workdir / "data", seed=0, n_train=2000, n_val=0, n_test=0, image_size=64, shard_size=250)
    c = copy.deepcopy(cfg)
    _set(c, "train.batch_size_per_gpu", 64)
    c["run"] = {"num_workers": 12 if CUDA else 1}
    data = DataPipeline(c, list_shards(workdir / "data" / "shards", "train"), None, 0, 0, 1, 0)
    for _ in range(3):
        data.next_batch()
    t0 = time.perf_counter()
    for _ in range(10):
        data.next_batch()
    res["data_pipeline_images_per_s_12_workers"] = 640 / (time.perf_counter() - t0)
    data.close()
    if not CUDA:
        return res
    batch = _random_batch(cfg, 64, 0, DEVICE)
    for precision in ("fp32", "bf16"):
        from franca.train import distributed as D
        from franca.train.loop import _build_model, _precision, train_step
        from franca.train.optim import build_optimizer
        from franca.train.schedules import build_schedules

        model = _build_model(cfg, D.DistInfo(0, 1, 0, DEVICE, None), seed=0)
        optimizer = build_optimizer(model.param_groups(), cfg)
        _, autocast = _precision({"train": {"precision": precision}}, DEVICE)
        values = build_schedules(cfg, 1).at(10)
        for i in range(13):
            if i == 3:
                torch.cuda.synchronize()
                t0 = time.perf_counter()
            train_step(model, batch, optimizer, None, values, 3.0, autocast, 10)
        torch.cuda.synchronize()
        res[f"train_step_images_per_s_{precision}_b64"] = 640 / (time.perf_counter() - t0)
        del model, optimizer
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config")
    ap.add_argument("--out")
    ap.add_argument("--write-config")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--sections", default="sdpa,wrappers,loop" if CUDA else "wrappers,loop")
    args = ap.parse_args(argv)
    if args.write_config:
        write_config(args.write_config, args.preset)
        return 0
    cfg = json.loads(Path(args.config).read_text())
    report = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(0) if CUDA else None, "sections": {}}
    workdir = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    for name in args.sections.split(","):
        t0 = time.perf_counter()
        try:
            fn = {"sdpa": lambda: check_sdpa(cfg), "wrappers": lambda: check_wrappers(cfg),
                  "loop": lambda: check_loop(cfg, workdir),
                  "throughput": lambda: check_throughput(cfg, workdir)}[name]  # fmt: skip
            report["sections"][name] = {"ok": True, "result": fn()}
        except Exception:
            report["sections"][name] = {"ok": False, "error": traceback.format_exc()[-3000:]}
        report["sections"][name]["seconds"] = round(time.perf_counter() - t0, 1)
        Path(args.out).write_text(json.dumps(report, indent=1, default=str))
        print(name, json.dumps(report["sections"][name], default=str)[:1500], flush=True)
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
