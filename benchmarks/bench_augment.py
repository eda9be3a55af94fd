"""Images/s per CPU core of the two multi-crop paths (issue 16, item 3): PIL (franca.data.augmentations) and the
batched tensor path (franca.data.gpu_augment), side by side, interleaved, on the same JPEGs.

Per repeat and path: ``--batch`` encoded JPEGs are decoded and augmented (2 global + L local crops). Wall time and
the process CPU time are recorded; "images per CPU-second" is the per-core throughput (what a data loader worker
delivers, or the host cost per image when the work runs on the GPU). On the CPU both paths run with
``torch.set_num_threads(--threads)``; on CUDA (when present) the tensor path decodes with nvJPEG and augments on the
GPU, timed with synchronisation.

    python benchmarks/bench_augment.py --threads 1 --batch 16 --repeats 5

Writes ``benchmarks/results/augment-<device>-<date>.json`` (``--out`` to override) and prints a summary.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from franca.data.augmentations import DataAugmentationDINO
from franca.data.gpu_augment import TensorAugmentationDINO, decode_images

RESULTS = Path(__file__).resolve().parent / "results"


def make_jpegs(n: int, height: int, width: int, seed: int = 0) -> list[bytes]:
    """Photo-like JPEGs (quality 90): smooth colour fields, edges and noise."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        low = torch.from_numpy(rng.random((1, 3, 8, 10), dtype=np.float32))
        img = torch.nn.functional.interpolate(low, size=(height, width), mode="bicubic", align_corners=False)[0]
        img = img.permute(1, 2, 0).numpy() + rng.normal(0, 0.04, (height, width, 3))
        buf = io.BytesIO()
        Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_pil(aug: DataAugmentationDINO, blobs: list[bytes]) -> None:
    for b in blobs:
        aug(Image.open(io.BytesIO(b)).convert("RGB"))


def run_tensor(aug: TensorAugmentationDINO, blobs: list[bytes], device: torch.device, gen: torch.Generator) -> None:
    aug(decode_images(blobs, device), gen)
    _sync(device)


def timed(fn) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def summarise(times: list[tuple[float, float]], n: int) -> dict:
    walls, cpus = [t[0] for t in times], [t[1] for t in times]
    return {
        "wall_s": walls,
        "cpu_s": cpus,
        "images_per_s_median": n / statistics.median(walls),
        "images_per_cpu_s_median": n / statistics.median(cpus),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=16, help="images per timed repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--image", default="375x500", help="source HxW")
    parser.add_argument("--global-size", type=int, default=224)
    parser.add_argument("--local-size", type=int, default=98)
    parser.add_argument("--local-number", type=int, default=8)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    h, w = (int(v) for v in args.image.split("x"))
    blobs = make_jpegs(args.batch, h, w)
    crops = dict(global_crops_scale=(0.32, 1.0), local_crops_scale=(0.05, 0.32), local_crops_number=args.local_number,
                 global_crops_size=args.global_size, local_crops_size=args.local_size)  # fmt: skip
    pil, tensor = DataAugmentationDINO(**crops), TensorAugmentationDINO(**crops)
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    run_pil(pil, blobs[:2])  # warm-up of both paths on every device
    for d in devices:
        run_tensor(tensor, blobs[:2], d, gen)
    times: dict[str, list] = {"pil_cpu": [], **{f"tensor_{d.type}": [] for d in devices}}
    for _ in range(args.repeats):  # interleaved: every path once per repeat
        times["pil_cpu"].append(timed(lambda: run_pil(pil, blobs)))
        for d in devices:
            times[f"tensor_{d.type}"].append(timed(lambda d=d: run_tensor(tensor, blobs, d, gen)))
    paths = {name: summarise(t, args.batch) for name, t in times.items()}
    base = paths["pil_cpu"]
    for s in paths.values():
        s["per_cpu_s_vs_pil"] = s["images_per_cpu_s_median"] / base["images_per_cpu_s_median"]
        s["wall_vs_pil"] = s["images_per_s_median"] / base["images_per_s_median"]
    now = dt.datetime.now(dt.UTC)
    kind = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    result = {
        "kind": "augment",
        "device": kind,
        "cpu_model": cpu_model(),
        "threads": args.threads,
        "torch": torch.__version__,
        "date": now.isoformat(timespec="seconds"),
        "command": "python benchmarks/bench_augment.py " + shlex.join(sys.argv[1:] if argv is None else argv),
        "source_image": [h, w],
        "crops": crops,
        "batch": args.batch,
        "repeats": args.repeats,
        "note": "decode + 2 global + L local crops per image; medians over interleaved repeats",
        "paths": paths,
    }
    tag = "cpu" if kind == "cpu" else kind.replace(" ", "_").lower()
    out = args.out or RESULTS / f"augment-{tag}-{now:%Y%m%dT%H%M%S}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    summary = {n: {k: round(v, 3) for k, v in s.items() if not isinstance(v, list)} for n, s in paths.items()}
    print(json.dumps({"out": str(out), "paths": summary}, indent=1))
    return result


if __name__ == "__main__":
    main()
