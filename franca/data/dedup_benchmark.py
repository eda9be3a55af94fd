"""Held-out real-image benchmark of the dedup thresholds (issue 12, "Dedup precision on real data").

The planted-copy test on generated data (tests/data/test_synthetic_duplicates.py) cannot see false removals among
real photographs. This benchmark uses the photographs that scikit-image ships (``skimage.data``: astronaut,
camera, coffee, hubble_deep_field, ...; none of them was used to choose the thresholds): each is cut into disjoint
128 x 128 tiles (near-uniform tiles, pixel std < ``MIN_STD``, are dropped: blank sky is not an image), so the set
holds hundreds of natural images with no duplicates, many of them of the same texture (grass, gravel, brick).
The class of a tile is its photograph. Every ``copy_every``-th training tile gets a planted near copy in the
training set and every other evaluation tile a planted near copy in the training set, made with
``franca.data.planted.near_copy`` (resize 1/2, JPEG q30, 5 % crop, colour gain/offset, in turn).

Both folders go through the real pipeline (``ingest_folder`` -> ``canonicalise`` -> ``deduplicate``). Scores:
  * ``clean_removed_fraction``: removed share of the training set without any planted copy (false removals);
  * ``precision`` / ``recall`` with the planted copies: a removal is correct when the removed image and the image
    it matched form a planted (copy, original) pair.

    python -m franca.data.dedup_benchmark --config config/data/imagenet_folder.yaml --out /tmp/dedup_bench
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from PIL import Image

from franca.data.dedup import deduplicate
from franca.data.manifest import canonicalise
from franca.data.planted import NEAR_TRANSFORMS, near_copy
from franca.data.sources import ingest_folder

logger = logging.getLogger(__name__)

# scikit-image's bundled photographs (no download); left out: `cat` (= `chelsea`) and `retina` (large smooth areas:
# many of its tiles are pixel-identical, mean difference ~1.3 grey levels, i.e. true duplicates)
PHOTOS = (
    "astronaut", "brick", "camera", "cell", "chelsea", "clock", "coffee", "coins", "grass", "gravel",
    "hubble_deep_field", "immunohistochemistry", "moon", "page", "rocket", "text",
)  # fmt: skip
TILE = 128
MIN_STD = 12.0
DEDUP_KEYS = ("hamming_threshold", "eval_hamming_threshold", "verify_threshold", "eval_verify_threshold")
DEDUP_KEYS += ("layout_threshold", "normalized_layout_threshold", "pixel_threshold")


def photo_tiles(tile: int = TILE, min_std: float = MIN_STD) -> list[tuple[str, np.ndarray]]:
    """(photograph name, (tile, tile, 3) uint8) of every non-uniform disjoint tile, in a fixed order."""
    from skimage import data

    tiles = []
    for name in PHOTOS:
        image = np.asarray(getattr(data, name)())
        image = np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image[..., :3]
        for y in range(0, image.shape[0] - tile + 1, tile):
            for x in range(0, image.shape[1] - tile + 1, tile):
                crop = np.ascontiguousarray(image[y : y + tile, x : x + tile])
                if crop.std() >= min_std:
                    tiles.append((name, crop))
    return tiles


def _save(path: Path, data: bytes) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return str(path)


def _jpeg(array: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def build(
    out_dir: str | Path, *, plant: bool, seed: int = 0, tile: int = TILE, copy_every: int = 4, eval_every: int = 6
) -> pd.DataFrame:
    """Write ``train/<photo>/`` and ``eval/<photo>/`` image folders; returns the planted pairs (copy, original,
    kind, transform). Originals are ``t####.jpg``, copies ``u####_<transform>.jpg`` (sorted after them)."""
    out_dir, pairs, slot = Path(out_dir), [], 0
    for i, (name, array) in enumerate(photo_tiles(tile)):
        split = "eval" if i % eval_every == 0 else "train"
        original = _save(out_dir / split / name / f"t{i:04d}.jpg", _jpeg(array))
        wanted = (i // eval_every) % 2 == 0 if split == "eval" else i % copy_every == 1
        if plant and wanted:
            transform = NEAR_TRANSFORMS[slot % len(NEAR_TRANSFORMS)]
            data, _, _ = near_copy(array, np.zeros(array.shape[:2], np.uint8), transform, seed, slot)
            copy = _save(out_dir / "train" / name / f"u{i:04d}_{transform}.jpg", data)
            pairs.append({"copy": copy, "original": original, "kind": f"{split}_copy", "transform": transform})
            slot += 1
    return pd.DataFrame(pairs, columns=["copy", "original", "kind", "transform"])


def run(
    out_dir: str | Path, dedup_options: dict[str, Any], *, plant: bool, seed: int = 0, tile: int = TILE
) -> dict[str, Any]:
    """Build the benchmark in ``out_dir``, run the shard stage and ``deduplicate``; returns the scores."""
    out_dir = Path(out_dir)
    truth = build(out_dir / "images", plant=plant, seed=seed, tile=tile)
    train_classes = sorted(p.name for p in (out_dir / "images" / "train").iterdir())
    ingest_folder(out_dir / "images" / "train", out_dir / "raw_train")
    ingest_folder(out_dir / "images" / "eval", out_dir / "raw_eval", class_names=train_classes)
    canonicalise([out_dir / "raw_train"], out_dir / "train")
    canonicalise([out_dir / "raw_eval"], out_dir / "eval")
    report = deduplicate(out_dir / "train" / "manifest.parquet", [out_dir / "eval" / "manifest.parquet"],
                         out_dir / "dedup", eval_splits=["train"], **dedup_options)  # fmt: skip
    sources = {}  # train key or eval ref ("eval:<key>", as removed.parquet names it) -> image path
    for ds in ("train", "eval"):
        manifest = pd.read_parquet(out_dir / ds / "manifest.parquet")
        prefix = "" if ds == "train" else f"{ds}:"
        sources.update({prefix + k: s for k, s in zip(manifest["key"], manifest["source"], strict=True)})
    removed = pd.read_parquet(out_dir / "dedup" / "removed.parquet")
    planted = {frozenset((c, o)) for c, o in zip(truth["copy"], truth["original"], strict=True)}
    pair_of = [
        frozenset((sources[k], sources.get(m, m))) for k, m in zip(removed["key"], removed["matched_key"], strict=True)
    ]
    correct = [p in planted for p in pair_of]
    n_train = report["n_train"]
    scores = {
        "n_train": n_train,
        "n_eval": report["n_eval"],
        "planted": len(truth),
        "removed": len(removed),
        "removed_by_reason": report["removed"],
        "false_removals": int(len(correct) - sum(correct)),
        "precision": float(np.mean(correct)) if correct else 1.0,
        "recall": float(len({p for p, ok in zip(pair_of, correct, strict=True) if ok}) / max(1, len(truth))),
        "kept_fraction_of_originals": 1.0 - (len(correct) - sum(correct)) / max(1, n_train - len(truth)),
        "dedup_options": dedup_options,
    }
    if not plant:
        scores["clean_removed_fraction"] = len(removed) / max(1, n_train)
    return scores


def config_options(path: str | Path) -> dict[str, Any]:
    """The dedup thresholds of a ``config/data/*.yaml`` (keys it does not set keep ``deduplicate``'s defaults)."""
    dedup = yaml.safe_load(Path(path).read_text()).get("dedup", {})
    return {k: dedup[k] for k in DEDUP_KEYS if k in dedup}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="config/data/<name>.yaml whose dedup thresholds to score")
    parser.add_argument("--out", required=True, help="work folder (images, shards, dedup outputs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tile", type=int, default=TILE, help="tile side in pixels (64: about 1,000 images)")
    args = parser.parse_args()
    options = config_options(args.config)
    result = {"config": args.config, "tile": args.tile}
    for kind in ("clean", "planted"):
        result[kind] = run(Path(args.out) / kind, options, plant=kind == "planted", seed=args.seed, tile=args.tile)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
