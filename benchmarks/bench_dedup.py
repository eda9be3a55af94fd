"""Dedup throughput, recall and precision on planted duplicates (issue 4 "Done when").

Builds a training set of ``--n-base`` distinct photo-like images (colour 1/f noise, 96 px, JPEG) plus planted copies
of ``--per-transform`` of them under each transformation (exact, resize 0.5, JPEG q30, colour shift, crops of
4/6/8/10 % of each dimension), and an evaluation set whose images are also copied into train. Reports:
  * descriptor rate of the shard stage (sha256 + pHash + colour layout per image, images/s),
  * ``deduplicate`` wall time and images/s, recall per transformation and precision (pHash alone, the pHash + raw
    colour-layout cascade, and the default cascade with the channel-normalised layout test too),
  * multi-index hashing alone on ``--mih-n`` uniformly random 64-bit hashes at t = 10 and 14 (time, candidates).

    .venv/bin/python benchmarks/bench_dedup.py --n-base 2000 --per-transform 100
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from franca.data.dedup import deduplicate, near_duplicate_pairs
from franca.data.manifest import image_record, make_manifest, write_parquet_atomic
from franca.data.shards import ShardWriter
from franca.data.synthetic import pink_noise

TRANSFORMS = ("exact", "resize", "jpeg", "colour", "crop4", "crop6", "crop8", "crop10")


def photo_like(rng: np.random.Generator, n: int, size: int = 96) -> list[Image.Image]:
    fields = pink_noise(rng, 3 * n, size, exponent=1.3).reshape(n, 3, size, size)
    mix = rng.uniform(0.2, 1.0, size=(n, 3, 3))  # random colour mixing of the three noise fields
    rgb = np.einsum("ncd,ndhw->nhwc", mix, fields) / mix.sum(axis=2)[:, None, None, :]
    return [Image.fromarray((a * 255).astype(np.uint8)) for a in rgb]


def jpeg(image: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def planted_copy(name: str, image: Image.Image, data: bytes, rng: np.random.Generator) -> bytes:
    if name == "exact":
        return data
    if name == "resize":
        return jpeg(image.resize((image.width // 2, image.height // 2), Image.Resampling.BILINEAR))
    if name == "jpeg":
        return jpeg(image, 30)
    if name == "colour":
        shifted = np.asarray(image, dtype=np.float64) * rng.uniform(0.85, 1.15, 3) + rng.uniform(-15, 15, 3)
        return jpeg(Image.fromarray(np.clip(shifted, 0, 255).astype(np.uint8)))
    total = int(name[4:]) / 100  # crop of total % of each dimension, split at random between both sides
    w, h = image.size
    fx, fy = rng.uniform(0, total), rng.uniform(0, total)
    return jpeg(image.crop((round(fx * w), round(fy * h), w - round((total - fx) * w), h - round((total - fy) * h))))


def write_dataset(root: Path, split: str, items: list[tuple[str, bytes]]) -> tuple[Path, float]:
    rows, start = [], time.perf_counter()
    with ShardWriter(root / "shards", split, shard_size=1000) as writer:
        for key, data in items:
            path = writer.write(key, {"jpg": data})
            record, _ = image_record(data)
            rows.append({**record, "key": key, "split": split, "shard": f"shards/{path.name}", "status": "ok"})
    write_parquet_atomic(make_manifest(rows), root / "manifest.parquet")
    return root / "manifest.parquet", len(items) / (time.perf_counter() - start)


def score(out: Path, truth: dict[str, str], eval_copies: set[str]) -> dict:
    """A removal is right when both keys come from the same source image (every key ends with its 6-digit index)."""
    removed = pd.read_parquet(out / "removed.parquet")
    right = np.array([k[-6:] == m[-6:] for k, m in zip(removed["key"], removed["matched_key"], strict=True)], bool)
    hits = set(removed["key"][right])
    recall = {t: float(np.mean([k in hits for k, tt in truth.items() if tt == t])) for t in TRANSFORMS}
    kept = set((out / "kept.txt").read_text().split())
    precision = float(right.mean()) if len(right) else 1.0
    return {"recall": recall, "precision": precision, "eval_copies_kept": len(eval_copies & kept)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-base", type=int, default=2000)
    parser.add_argument("--per-transform", type=int, default=100)
    parser.add_argument("--n-eval", type=int, default=200)
    parser.add_argument("--mih-n", type=int, default=100_000)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    rng = np.random.default_rng(0)
    images = photo_like(rng, args.n_base + args.n_eval)
    datas = [jpeg(im, 92) for im in images]
    train = [(f"train_o{i:06d}", datas[i]) for i in range(args.n_base)]
    evals = [(f"val_{i:06d}", datas[i]) for i in range(args.n_base, args.n_base + args.n_eval)]
    truth: dict[str, str] = {}  # planted key -> transformation
    for t, name in enumerate(TRANSFORMS):
        for i in rng.choice(args.n_base, args.per_transform, replace=False).tolist():
            key = f"train_p{t}_{i:06d}"
            train.append((key, planted_copy(name, images[i], datas[i], rng)))
            truth[key] = name
    eval_copies = set()
    for i in range(args.n_base, args.n_base + args.n_eval):
        name = TRANSFORMS[i % len(TRANSFORMS)]
        eval_copies.add(f"train_e_{i:06d}")
        train.append((f"train_e_{i:06d}", planted_copy(name, images[i], datas[i], rng)))
    result = {"benchmark": "dedup", "n_train": len(train), "n_eval": len(evals)}
    with tempfile.TemporaryDirectory() as tmp:
        train_manifest, rate = write_dataset(Path(tmp) / "train", "train", train)
        eval_manifest, _ = write_dataset(Path(tmp) / "eval", "val", evals)
        result["descriptor_images_per_s"] = rate
        for label, kwargs in [
            ("phash_only", {"verify_threshold": None, "eval_verify_threshold": None}),
            ("raw_layout_only", {"normalized_layout_threshold": -1}),
            ("default", {}),
        ]:
            start = time.perf_counter()
            report = deduplicate(train_manifest, [eval_manifest], Path(tmp) / label, **kwargs)
            result[label] = {"seconds": time.perf_counter() - start, "images_per_s": report["images_per_s"],
                             "thresholds": report["thresholds"], "removed": report["removed"],
                             "removed_by_test": report["removed_by_test"],
                             **score(Path(tmp) / label, truth, eval_copies)}  # fmt: skip
    hashes = rng.integers(0, 2**63, size=args.mih_n, dtype=np.uint64) * np.uint64(2)
    for threshold in (10, 14):
        start = time.perf_counter()
        _, _, _, stats = near_duplicate_pairs(hashes, threshold)
        result[f"mih_uniform_hashes_t{threshold}"] = {"n": args.mih_n, "seconds": time.perf_counter() - start, **stats}
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
