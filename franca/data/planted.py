"""Planted duplicates of the generated dataset, and the ground-truth check of a dedup run against them.

The tiny preset's generated data (``franca.data.synthetic``) replaces a small, configurable fraction of its
training slots with copies, so that the dedup stage (issue 4 item 4, DESIGN "Data") has something to find:

* ``exact_copy``: the PNG bytes of another (earlier) training image,
* ``near_copy``: a transformed copy of another (earlier) training image,
* ``eval_near_copy``: a transformed copy of a val / test image.

Near copies use the transformations of the dedup tests (tests/data/test_dedup.py): ``resize`` (half size,
bilinear, JPEG q90), ``jpeg`` (JPEG q30), ``crop`` (5 % of each side in total, split at random between the two
sides, JPEG q90) and ``colour`` (per-channel gain in [0.85, 1.15] and offset in [-15, 15], JPEG q90). The mask of
a copy gets the same geometric change (nearest neighbour), so image and mask stay aligned.

Invariants: a planted slot's source is never planted itself and is earlier in key order than the copy (so a dedup
that keeps the first of a pair removes the copy), each source is copied at most once, and the plan depends only on
the seed and the sizes (not on ``shard_size``).
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from franca.data.shards import iter_raw_samples, list_shards

__all__ = ["NEAR_TRANSFORMS", "KINDS", "plan_duplicates", "near_copy", "read_planted", "score_dedup"]

NEAR_TRANSFORMS = ("resize", "jpeg", "crop", "colour")
KINDS = ("exact_copy", "near_copy", "eval_near_copy")
_PLAN_STREAM = 1000  # RNG stream tag of the plan; the splits use 0, 1, 2
_COPY_STREAM = 1001  # RNG stream tag of the per-copy transformation parameters


def _count(fraction: float, n: int, name: str) -> int:
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"data.datasets.<synth>.duplicates.{name} must be in [0, 1], got {fraction}")
    return int(np.floor(fraction * n + 0.5))


def plan_duplicates(
    seed: int,
    n_train: int,
    eval_sizes: Mapping[str, int],
    *,
    exact_fraction: float,
    near_fraction: float,
    eval_copy_fraction: float,
) -> dict[int, dict[str, Any]]:
    """Train slot -> ``{kind, split, index, transform}`` (the source is ``<split>`` image ``index``).

    Counts are ``round(fraction * n_train)``; eval copies are capped by the number of eval images. Within-train
    pairs are consecutive entries of one permutation of the train slots (the smaller index is the source), eval
    copies take the following entries; near transformations cycle through ``NEAR_TRANSFORMS`` per kind.
    """
    n_exact = _count(exact_fraction, n_train, "exact_fraction")
    n_near = _count(near_fraction, n_train, "near_fraction")
    pool = [(split, i) for split, size in eval_sizes.items() for i in range(size)]  # eval images, split order
    n_eval = min(_count(eval_copy_fraction, n_train, "eval_copy_fraction"), len(pool))
    if 2 * (n_exact + n_near) + n_eval > n_train:
        raise ValueError(
            f"duplicates: {n_exact} exact + {n_near} near copies (+ their sources) + {n_eval} eval copies do not fit "
            f"in n_train={n_train}; lower the duplicate fractions"
        )
    rng = np.random.default_rng([seed, _PLAN_STREAM])
    perm = rng.permutation(n_train).tolist()
    plan: dict[int, dict[str, Any]] = {}
    for k, kind in enumerate(["exact_copy"] * n_exact + ["near_copy"] * n_near):
        source, slot = sorted(perm[2 * k : 2 * k + 2])
        transform = None if kind == "exact_copy" else NEAR_TRANSFORMS[(k - n_exact) % len(NEAR_TRANSFORMS)]
        plan[slot] = {"kind": kind, "split": "train", "index": source, "transform": transform}
    picks = rng.choice(len(pool), size=n_eval, replace=False).tolist() if n_eval else []
    for k, pick in enumerate(picks):
        split, index = pool[pick]
        slot = perm[2 * (n_exact + n_near) + k]
        plan[slot] = {"kind": "eval_near_copy", "split": split, "index": index, "transform": NEAR_TRANSFORMS[k % 4]}
    return plan


def _jpeg(image: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def near_copy(
    image: np.ndarray, mask: np.ndarray, transform: str, seed: int, slot: int
) -> tuple[bytes, np.ndarray, dict[str, Any]]:
    """JPEG bytes of a near copy of ``image`` (H, W, 3) uint8, its mask (H', W') uint8 and the parameters used.

    The parameters come from ``default_rng([seed, 1001, slot])``, so a copy does not depend on the others.
    """
    rng = np.random.default_rng([seed, _COPY_STREAM, slot])
    pil, seg = Image.fromarray(image), Image.fromarray(mask)
    w, h = pil.size
    if transform == "resize":
        size = (w // 2, h // 2)
        out, seg = pil.resize(size, Image.Resampling.BILINEAR), seg.resize(size, Image.Resampling.NEAREST)
        params = {"size": list(size), "quality": 90}
    elif transform == "jpeg":
        out, params = pil, {"quality": 30}
    elif transform == "crop":  # 5 % of each dimension in total, split at random between the two sides
        fx, fy = rng.uniform(0, 0.05, size=2).tolist()
        box = (round(fx * w), round(fy * h), w - round((0.05 - fx) * w), h - round((0.05 - fy) * h))
        out, seg, params = pil.crop(box), seg.crop(box), {"box": list(box), "quality": 90}
    elif transform == "colour":
        gain, offset = rng.uniform(0.85, 1.15, size=3), rng.uniform(-15.0, 15.0, size=3)
        shifted = np.clip(np.round(image.astype(np.float64) * gain + offset), 0, 255).astype(np.uint8)  # (H, W, 3)
        out, params = Image.fromarray(shifted), {"gain": gain.round(4).tolist(), "offset": offset.round(2).tolist()}
        params["quality"] = 90
    else:
        raise ValueError(f"unknown near-copy transform {transform!r}; expected one of {NEAR_TRANSFORMS}")
    return _jpeg(out, params["quality"]), np.asarray(seg, dtype=np.uint8), params


def read_planted(shards: str | Path | Iterable[str | Path]) -> pd.DataFrame:
    """Ground truth from the samples' ``.json``: one row per planted copy (key, kind, of, transform).

    ``shards`` is a shard directory (every ``*.tar`` in it) or an iterable of tar paths; works on the generated
    shards and on the canonical ones (the shard stage keeps the metadata).
    """
    paths = list_shards(shards) if isinstance(shards, str | Path) else [Path(p) for p in shards]
    rows = []
    for path in paths:
        for key, fields in iter_raw_samples(path):
            duplicate = json.loads(fields["json"]).get("duplicate") if "json" in fields else None
            if duplicate:
                rows.append({"key": key, "kind": duplicate["kind"], "of": duplicate["of"]})
                rows[-1]["transform"] = duplicate.get("transform")
    return pd.DataFrame(rows, columns=["key", "kind", "of", "transform"])


def score_dedup(truth: pd.DataFrame, train_keys: Iterable[str], kept: Iterable[str], removed: pd.DataFrame) -> dict:
    """Recall per planted kind, precision, and the removals of unplanted images, of one dedup run.

    Args:
        truth: ``read_planted`` rows; train_keys: every training key the dedup saw; kept: its ``kept.txt`` keys;
        removed: its ``removed.parquet`` (key, reason, matched_key; eval matches are ``<dataset>:<key>``).
    A removal is correct when the removed key is a planted copy and its matched key is the copy's source.
    """
    source = dict(zip(truth["key"], truth["of"], strict=True))
    kind = dict(zip(truth["key"], truth["kind"], strict=True))
    matched = [str(m).split(":", 1)[-1] for m in removed["matched_key"]]
    correct = [source.get(k) == m for k, m in zip(removed["key"], matched, strict=True)]
    found = {k for k, ok in zip(removed["key"], correct, strict=True) if ok}
    train_keys, kept = list(train_keys), set(kept)
    unplanted_removed = sorted(set(removed["key"]) - set(source))
    recall = {}
    for name in KINDS:
        keys = [k for k in source if kind[k] == name]
        recall[name] = float(np.mean([k in found for k in keys])) if keys else None
    return {
        "planted": {name: sum(v == name for v in kind.values()) for name in KINDS},
        "recall": recall,
        "recall_all": float(np.mean([k in found for k in source])) if source else None,
        "precision": float(np.mean(correct)) if len(correct) else None,
        "removed": len(removed),
        "unplanted_removed": len(unplanted_removed),
        "unplanted_removed_rate": len(unplanted_removed) / max(1, len(train_keys) - len(source)),
        "eval_copies_kept": sorted(k for k in source if kind[k] == "eval_near_copy" and k in kept),
    }
