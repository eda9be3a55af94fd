"""Deduplication of a training set against itself and against evaluation sets (issue 4 item 4, DESIGN "Data").

Order of the decisions (a training image is removed for the first reason that applies):
  1. ``eval_exact`` / ``eval_near_copy``: a near copy of any evaluation image. Exact copies are found by sha256
     whatever the descriptor; near copies by faiss on the descriptor: ``IndexBinaryFlat`` range search on the 64
     pHash bits (default; the pair rule below with ``eval_hamming_threshold``) or ``IndexFlatIP`` on L2-normalised
     embeddings of a TorchScript copy-detection model given by path (cosine >= ``eval_similarity_threshold``).
  2. ``exact_duplicate``: same sha256 as an earlier kept training image (manifest order decides who stays).
  3. ``near_duplicate``: a near copy of an earlier kept training image.

Pair rule (pHash descriptor, ``phash.pair_tests``): Hamming distance ``d <= hamming_threshold``, or
``d <= verify_threshold`` and either a colour layout RMS difference ``<= layout_threshold`` (the two-descriptor
cascade that makes slight crops, which move pHash by 10-16 bits, detectable without accepting the different images
found at those distances) or a channel-normalised layout RMS difference ``<= normalized_layout_threshold`` (colour
shifts: per-channel gain and offset move the raw layout as far as a different image; -1 disables the test). The
test that accepted each removed pair is recorded. Candidate pairs inside the training set come from multi-index
hashing cut into (band, block) jobs (``franca.data.bands``; equal to ``phash.near_duplicate_pairs``), never from all
pairs.

Scale (issue 17): the descriptors (sha256, pHash, layout) are computed once per image at shard time; dedup reads only
``READ_COLUMNS`` of the manifest (a file, or a directory with one parquet part per work unit) and decodes images only
for the pixel check of candidate pairs. The per-image half can fan out: ``write_eval_index`` once, ``dedup_unit`` per
unit (eval contamination + band index), ``dedup_block`` per (band, block); ``deduplicate(..., eval_index, units,
candidates)`` then verifies the pairs and removes greedily. Without them it runs the same functions in one process.

Outputs in ``out_dir``: ``kept.txt`` (kept keys in manifest order), ``removed.parquet`` (key, reason, matched key,
distance or similarity, the pair-rule test and its layout differences), ``report.json`` (counts per reason and per
test, thresholds, throughput) and ``pairs.png`` (thumbnails
of removed pairs, as the paper's dedup figure).
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from franca.data import bands as band_lsh
from franca.data.manifest import write_parquet_atomic
from franca.data.phash import (
    PAIR_TESTS,
    choose_bands,
    hex_to_layout,
    hex_to_phash,
    near_duplicate_pairs,
    pair_tests,
    phash_to_bits,
    thumbnail,
    thumbnail_similarity,
)
from franca.data.shards import atomic_write_bytes

logger = logging.getLogger(__name__)

__all__ = ["choose_bands", "near_duplicate_pairs", "greedy_removal", "deduplicate"]  # the first two: phash.py
__all__ += ["manifest_parts", "write_eval_index", "dedup_unit", "dedup_block"]

# Defaults measured on planted duplicates (tests/data/test_dedup.py, benchmarks/bench_dedup.py) and, for precision
# on real photographs, on franca.data.dedup_benchmark (scikit-image photos). pHash alone never removes an image:
# the Hamming-only test is off (-1) and every pair the cascade accepts is verified on pixels.
HAMMING_THRESHOLD = -1
EVAL_HAMMING_THRESHOLD = -1
VERIFY_THRESHOLD = 14  # bounded by the cost of multi-index hashing (the Hamming ball grows fast)
EVAL_VERIFY_THRESHOLD = 16  # faiss brute force: the radius costs nothing, and eval copies must not survive
LAYOUT_THRESHOLD = 8.0
NORMALIZED_LAYOUT_THRESHOLD = 0.06  # colour-shifted copies <= 0.032, unrelated pairs >= 0.158 (see config/data)
EVAL_SIMILARITY_THRESHOLD = 0.75  # SSCD's recommended copy-detection threshold
PIXEL_THRESHOLD = 0.93  # 16 x 16 thumbnail correlation of an accepted pair (phash.thumbnail_similarity); -1: off


def greedy_removal(n: int, i: np.ndarray, j: np.ndarray, d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Walk items in order; ``j`` is removed when some earlier ``i`` within threshold is still kept.

    Pairs must be sorted by (j, d, i) as ``near_duplicate_pairs`` returns them. Returns (match (n,) int64 with -1 for
    kept items, distance (n,) int64).
    """
    match, dist = np.full(n, -1, dtype=np.int64), np.zeros(n, dtype=np.int64)
    for a, b, dd in zip(i.tolist(), j.tolist(), d.tolist(), strict=True):
        if match[b] < 0 and match[a] < 0:  # a kept (a < b, so a is final), b not yet matched
            match[b], dist[b] = a, dd
    return match, dist


READ_COLUMNS = ("key", "status", "split", "shard", "sha256", "phash", "layout", "class_name", "label")  # never URLs
_REQUIRED = ("key", "status", "shard", "sha256", "phash")


def manifest_parts(path: str | Path) -> list[tuple[int, Path]]:
    """(unit number, parquet file) of a manifest: the file itself (unit 0), or each part of a partitioned manifest
    directory (``u000012.parquet`` is unit 12; other names are numbered by sorted position)."""
    path = Path(path)
    if path.is_file():
        return [(0, path)]
    parts = sorted(path.glob("*.parquet")) if path.is_dir() else []
    if not parts:
        raise FileNotFoundError(f"manifest not found: {path} (a parquet file or a directory of parquet parts)")
    return [(int(m.group(1)) if (m := re.fullmatch(r"u(\d+)", p.stem)) else n, p) for n, p in enumerate(parts)]


def _read_part(part: Path, unit: int) -> pd.DataFrame:
    """The columns dedup needs of one manifest file, plus ``id`` (``bands.row_ids``: unit and row in the file)."""
    names = pq.read_schema(part).names
    missing = [c for c in _REQUIRED if c not in names]
    if missing:
        raise ValueError(f"manifest {part} lacks columns {missing}")
    frame = pd.read_parquet(part, columns=[c for c in READ_COLUMNS if c in names])
    return frame.assign(id=band_lsh.row_ids(unit, np.arange(len(frame))))


def _ok_rows(path: Path, splits: set[str] | None, exclude: str | None, unit: int | None = None, dataset=None):
    """Rows with status ok of a manifest (file, directory, or one unit's partition when ``unit`` is given), with
    ``id``, ``shard_path`` (shards are relative to the manifest's parent) and ``dataset``."""
    parts = [(unit, path)] if unit is not None else manifest_parts(path)
    frame = pd.concat([_read_part(p, u) for u, p in parts], ignore_index=True)
    frame = frame[frame["status"] == "ok"]
    if "split" in frame.columns and splits is not None:
        frame = frame[frame["split"].isin(splits)]
    if "split" in frame.columns and exclude is not None:
        frame = frame[frame["split"] != exclude]
    frame = frame.reset_index(drop=True).assign(shard_path=[str(path.parent / s) for s in frame["shard"]])
    return frame.assign(dataset=dataset or path.parent.name)


def _load_eval(train_manifest: Path, eval_manifests, train_split: str, eval_splits) -> pd.DataFrame:
    frames = []
    for path in [Path(p) for p in eval_manifests]:
        same = train_manifest is not None and path.resolve() == Path(train_manifest).resolve()
        frames.append(_ok_rows(path, set(eval_splits) if eval_splits else None, train_split if same else None))
    if not frames:
        return pd.DataFrame(columns=["key", "sha256", "phash", "shard_path", "dataset", "ref"])
    frame = pd.concat(frames, ignore_index=True)
    return frame.assign(ref=frame["dataset"] + ":" + frame["key"])


def write_eval_index(train_manifest, eval_manifests, train_split: str, eval_splits, path: str | Path) -> int:
    """The eval sets' descriptors (sha256, pHash, layout, absolute shard path, ref, class) as one small parquet,
    built once and read by every unit's contamination check. Returns its row count."""
    evals = _load_eval(train_manifest, eval_manifests, train_split, eval_splits)  # train_manifest: None if unread
    evals = evals.assign(shard_path=[str(Path(p).resolve()) for p in evals["shard_path"]]).drop(columns="id")
    write_parquet_atomic(evals, Path(path))
    return len(evals)


def _embed(rows: pd.DataFrame, model_path: str, image_size: int, batch_size: int) -> np.ndarray:
    """(n, D) float32 L2-normalised embeddings of the rows' images by a TorchScript model (ImageNet normalisation)."""
    import torch

    from franca.data.shards import iter_samples

    with warnings.catch_warnings():  # torch 2.14 flags TorchScript as deprecated; SSCD ships as TorchScript
        warnings.simplefilter("ignore", FutureWarning)
        model = torch.jit.load(model_path, map_location="cpu").eval()
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    position = {k: n for n, k in enumerate(rows["key"])}
    out: list[np.ndarray | None] = [None] * len(rows)
    for shard, group in rows.groupby("shard_path", sort=False):
        samples = list(iter_samples([shard], kept_keys=set(group["key"])))
        for start in range(0, len(samples), batch_size):
            chunk = samples[start : start + batch_size]
            arrays = [np.asarray(s["image"].resize((image_size, image_size)), dtype=np.float32) for s in chunk]
            x = (torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 255.0 - mean) / std  # (B, 3, H, W)
            with torch.no_grad():
                z = torch.nn.functional.normalize(model(x).float().flatten(1), dim=1)  # (B, D)
            for s, e in zip(chunk, z.numpy(), strict=True):
                out[position[s["key"]]] = e
    missing = [k for k, e in zip(rows["key"], out, strict=True) if e is None]
    if missing:
        raise ValueError(f"could not read images of keys {missing[:5]} for the embedding descriptor")
    return np.stack(out).astype(np.float32)


def _layouts(frame: pd.DataFrame) -> np.ndarray | None:
    """(n, 48) colour layouts, or None when the manifest has none (old manifests: pHash rule only)."""
    if "layout" not in frame.columns or frame["layout"].isna().any() or frame.empty:
        return None
    return hex_to_layout(frame["layout"])


def _thumbnails(frame: pd.DataFrame, rows: np.ndarray) -> np.ndarray:
    """(len(rows), 3, 16, 16) thumbnail stacks of ``frame``'s rows (index = row number), read from their shards;
    only those samples are decoded."""
    from franca.data.shards import iter_samples

    wanted = frame.iloc[np.unique(rows)]
    found: dict[int, np.ndarray] = {}
    for shard, group in wanted.groupby("shard_path", sort=False):
        row_of = dict(zip(group["key"], group.index, strict=True))
        for sample in iter_samples([shard], kept_keys=set(group["key"])):
            found[row_of[sample["key"]]] = thumbnail(sample["image"])
    missing = [frame["key"].iat[r] for r in np.unique(rows) if r not in found]
    if missing:
        raise ValueError(f"could not read images of keys {missing[:5]} for the pixel verification of dedup pairs")
    return np.stack([found[r] for r in rows.tolist()]) if len(rows) else np.zeros((0, 3, 16, 16), np.float32)


def _verify(frame_a, rows_a, frame_b, rows_b, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Pixel verification of pairs (``frame_a`` row, ``frame_b`` row): (accepted (P,) bool, correlation (P,))."""
    rows_a, rows_b = np.asarray(rows_a, np.int64), np.asarray(rows_b, np.int64)
    if threshold < 0 or not len(rows_a):
        return np.ones(len(rows_a), bool), np.full(len(rows_a), np.nan, np.float32)
    corr = thumbnail_similarity(_thumbnails(frame_a, rows_a), _thumbnails(frame_b, rows_b))
    return corr >= threshold, corr


def _tests(d, strict, loose, layout_a, layout_b, ia, ib, opts) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``phash.pair_tests`` on pairs (``layout_a[ia]``, ``layout_b[ib]``): (test index or -1, raw, normalised)."""
    pairs = None if layout_a is None or layout_b is None else (layout_a[ia], layout_b[ib])
    thresholds = opts["layout_threshold"], opts["normalized_layout_threshold"]
    return pair_tests(np.asarray(d), strict, loose, pairs, *thresholds)


def _phash_eval_hits(train: pd.DataFrame, evals: pd.DataFrame, opts: dict) -> tuple[np.ndarray, ...]:
    """Per train row with an accepted eval match: (train row, closest eval row, Hamming distance, test, layout
    difference of that test)."""
    strict, loose = opts["eval_hamming_threshold"], max(opts["eval_hamming_threshold"], opts["eval_verify"])
    index = faiss.IndexBinaryFlat(64)
    index.add(phash_to_bits(hex_to_phash(evals["phash"])))
    lims, dist, nearest = index.range_search(phash_to_bits(hex_to_phash(train["phash"])), loose + 1)  # d < radius
    query = np.repeat(np.arange(len(train)), np.diff(lims.astype(np.int64)))  # (P,) train row of each hit
    test, raw, norm = _tests(dist, strict, loose, _layouts(train), _layouts(evals), query, nearest, opts)
    accept = test >= 0
    query, dist, nearest, test = query[accept], dist[accept], nearest[accept], test[accept]
    value = np.where(test == 2, norm[accept], raw[accept])  # the difference the accepting test compared
    ok, corr = _verify(train, query, evals, nearest, opts["pixel_threshold"])  # pHash + layout must match pixels
    opts["eval_rejected_by_pixels"] = int((~ok).sum())
    query, dist, nearest, test, value, corr = query[ok], dist[ok], nearest[ok], test[ok], value[ok], corr[ok]
    order = np.lexsort((nearest, test, dist, query))  # per train row: the closest accepted eval image first
    first = order[np.r_[True, query[order][1:] != query[order][:-1]]] if len(order) else order
    return query[first], nearest[first], dist[first], test[first], value[first], corr[first]


def _eval_matches(train: pd.DataFrame, evals: pd.DataFrame, descriptor: str, opts: dict) -> pd.DataFrame:
    """One row per train index matched to an eval image: (index, reason, matched, distance, test, layout)."""
    rows, columns = [], ["index", "reason", "matched", "distance", "test", "layout", "pixel"]
    if evals.empty:
        return pd.DataFrame(rows, columns=columns)
    first_ref = evals.drop_duplicates("sha256").set_index("sha256")["ref"]
    exact = train["sha256"].map(first_ref)
    rows += [(i, "eval_exact", ref, 0.0, "sha256", np.nan, np.nan) for i, ref in exact.dropna().items()]
    if descriptor == "phash":
        hits = zip(*(a.tolist() for a in _phash_eval_hits(train, evals, opts)), strict=True)
        rows += [
            (q, "eval_near_copy", evals["ref"].iat[e], float(d), PAIR_TESTS[t], v, c)
            for q, e, d, t, v, c in hits
            if pd.isna(exact.iat[q])
        ]
    else:
        size, batch = opts["image_size"], opts["batch_size"]
        eval_embeddings = _embed(evals, descriptor, size, batch)  # (n_eval, D)
        index = faiss.IndexFlatIP(eval_embeddings.shape[1])
        index.add(eval_embeddings)
        sim, nearest = index.search(_embed(train, descriptor, size, batch), 1)
        hit = (sim[:, 0] >= opts["eval_similarity_threshold"]) & exact.isna().to_numpy()
        ref = evals["ref"].to_numpy()[nearest[:, 0]]
        rows += [
            (i, "eval_near_copy", ref[i], float(sim[i, 0]), "embedding", np.nan, np.nan) for i in np.flatnonzero(hit)
        ]
    return pd.DataFrame(rows, columns=columns)


def _pairs_figure(removed: pd.DataFrame, train: pd.DataFrame, evals: pd.DataFrame, path: Path, max_pairs: int) -> int:
    """Thumbnail grid of up to ``max_pairs`` removed pairs (removed image left, the image it matched right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from franca.data.shards import iter_samples

    shown = removed.groupby("reason", sort=True).head(max(1, max_pairs // max(1, removed["reason"].nunique())))
    shown = shown.head(max_pairs)
    where = {k: s for k, s in zip(train["key"], train["shard_path"], strict=True)}
    where.update({r: s for r, s in zip(evals.get("ref", []), evals.get("shard_path", []), strict=True)})
    wanted: dict[str, set[str]] = {}
    for ref in list(shown["key"]) + list(shown["matched_key"]):
        if ref in where:
            wanted.setdefault(where[ref], set()).add(ref.split(":", 1)[-1])
    thumbs = {}
    for shard, keys in wanted.items():
        for sample in iter_samples([shard], kept_keys=keys):
            thumbs[(shard, sample["key"])] = sample["image"]
    cols = 4  # pairs per row
    rows = max(1, -(-len(shown) // cols))
    fig, axes = plt.subplots(rows, 2 * cols, figsize=(2 * cols * 1.6, rows * 1.9), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for n, rec in enumerate(shown.itertuples()):
        for side, ref in enumerate((rec.key, rec.matched_key)):
            image = thumbs.get((where.get(ref), ref.split(":", 1)[-1]))
            ax = axes[n // cols, 2 * (n % cols) + side]
            if image is not None:
                ax.imshow(image)
            ax.set_title(_caption(rec) if side == 0 else ref[-24:], fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return len(shown)


def _caption(rec) -> str:
    """Reason, then the test that matched with its value: ``d=12 normalized_layout 0.021``, ``sha256``..."""
    if rec.test in ("sha256", "embedding"):
        return f"{rec.reason}\n{rec.test}" + (f" {rec.distance:.3f}" if rec.test == "embedding" else "")
    value = "" if pd.isna(rec.layout) else f" {rec.layout:.3g}"
    pixel = "" if pd.isna(rec.pixel) else f" px {rec.pixel:.2f}"
    classes = "" if pd.isna(rec.class_name) else f"\n{rec.class_name} / {rec.matched_class_name}"
    return f"{rec.reason}\nd={rec.distance:g} {rec.test}{value}{pixel}{classes}"


def _alive_pairs(train: pd.DataFrame, alive: np.ndarray, loose: int, opts: dict) -> tuple[np.ndarray, ...]:
    """Candidate pairs within ``loose`` among ``alive`` rows, as alive positions (i, j, d) sorted by (j, d, i), and
    stats. From the (band, block) jobs' pair files (``opts["candidates"]``, over all ok rows), or in-process: the
    alive rows as one unit, every job in turn (``bands.block_pairs``; equal to ``phash.near_duplicate_pairs``)."""
    ids = train["id"].to_numpy(np.uint64)[alive]  # ascending: units in order, rows in order
    plan = band_lsh.make_plan(len(alive), loose, opts.get("bands"), opts.get("block_bits", 0))
    if opts.get("candidates") is None:
        with tempfile.TemporaryDirectory() as work:
            band_lsh.write_band_index(hex_to_phash(train["phash"].iloc[alive]), ids, plan, work)
            found = [band_lsh.block_pairs([work], plan, b, p) for b, p in plan.jobs()]
    else:
        found = [pd.read_parquet(path)[["a", "b", "d"]].to_numpy(np.uint64) for path in opts["candidates"]]
    pairs = np.concatenate([np.zeros((0, 3), np.uint64), *found])
    a, b = np.searchsorted(ids, pairs[:, 0]), np.searchsorted(ids, pairs[:, 1])
    inside = (a < len(ids)) & (b < len(ids))
    inside[inside] &= (ids[a[inside]] == pairs[inside, 0]) & (ids[b[inside]] == pairs[inside, 1])
    out = band_lsh.sort_pairs(np.stack([a[inside], b[inside], pairs[inside, 2].astype(np.int64)], axis=1))
    stats = {"bands": plan.bands, "radius_per_band": plan.radius, "block_bits": plan.block_bits}
    stats.update(jobs=len(plan.jobs()), candidates=len(pairs), pairs=len(out))
    return out[:, 0], out[:, 1], out[:, 2], stats


def _near_stage(train: pd.DataFrame, alive: np.ndarray, threshold: int, opts: dict):
    """Within-train near duplicates among ``alive`` rows: (removed rows, matched rows, distances, tests, layout
    differences, MIH stats). Layouts are decoded for the rows of candidate pairs only."""
    loose = max(threshold, opts["verify"])
    if loose < 0:  # near-duplicate removal disabled
        return alive[:0], alive[:0], alive[:0], alive[:0], np.zeros(0), np.zeros(0), {"disabled": True}
    i, j, d, mih = _alive_pairs(train, alive, loose, opts)
    paired = np.unique(np.concatenate([i, j]))  # alive positions with a candidate
    layouts = _layouts(train.iloc[alive[paired]])  # (len(paired), 48) or None

    def tests(dd, ia, ib):
        return _tests(
            dd, threshold, loose, layouts, layouts, np.searchsorted(paired, ia), np.searchsorted(paired, ib), opts
        )

    test, _, _ = tests(d, i, j)
    accept = np.flatnonzero(test >= 0)
    ok, corr = _verify(train, alive[i[accept]], train, alive[j[accept]], opts["pixel_threshold"])
    mih.update(accepted=int(ok.sum()), rejected_by_pixels=int((~ok).sum()))
    accept = accept[ok]
    pixel = {(a, b): c for a, b, c in zip(i[accept].tolist(), j[accept].tolist(), corr[ok].tolist(), strict=True)}
    match, dist = greedy_removal(len(alive), i[accept], j[accept], d[accept])  # order (j, d, i) is kept
    near = np.flatnonzero(match >= 0)
    # the test of each kept pair, re-derived (pair_tests is deterministic; the first test that accepts wins)
    test, raw, norm = tests(dist[near], match[near], near)
    corr = np.array([pixel[(a, b)] for a, b in zip(match[near].tolist(), near.tolist(), strict=True)], np.float64)
    return alive[near], alive[match[near]], dist[near], test, np.where(test == 2, norm, raw), corr, mih


def _class_of(frame: pd.DataFrame, refs) -> dict[str, Any]:
    """key / ref -> class name (or label), where the manifest has one."""
    if "class_name" not in frame.columns and "label" not in frame.columns:
        return {}
    names = frame["class_name"] if "class_name" in frame.columns else frame["label"]
    if "label" in frame.columns and "class_name" in frame.columns:
        names = names.where(names.notna(), frame["label"].astype("string"))
    return {r: (None if pd.isna(n) else str(n)) for r, n in zip(refs, names, strict=True)}


def _write_outputs(
    out_dir: Path, train: pd.DataFrame, evals: pd.DataFrame, cols: dict[str, np.ndarray]
) -> pd.DataFrame:
    """kept.txt and removed.parquet: key, reason, matched_key, distance (Hamming, or cosine similarity for an
    embedding descriptor; 0 for sha256), shard, test (``sha256``, ``embedding`` or a ``PAIR_TESTS`` name), layout
    (the raw or normalised layout difference the test compared; NaN for the others), pixel (the thumbnail
    correlation that verified the pair; NaN when not verified) and the classes of both images (``class_name``,
    ``matched_class_name``; null without labels)."""
    gone = cols["reason"] != None  # noqa: E711 (element-wise)
    classes = _class_of(train, train["key"])
    if len(evals):
        classes.update(_class_of(evals, evals["ref"]))
    removed = pd.DataFrame({"key": train["key"][gone], "reason": cols["reason"][gone]})
    removed = removed.assign(matched_key=cols["matched"][gone], distance=cols["distance"][gone])
    removed = removed.assign(shard=train["shard"][gone], test=cols["test"][gone])
    removed = removed.assign(
        layout=cols["layout"][gone].astype(np.float64), pixel=cols["pixel"][gone].astype(np.float64)
    )
    removed = removed.assign(
        class_name=removed["key"].map(classes), matched_class_name=removed["matched_key"].map(classes)
    )
    removed = removed.reset_index(drop=True)
    strings = ["key", "reason", "matched_key", "test", "class_name", "matched_class_name"]
    removed = removed.astype({c: "string" for c in strings})
    atomic_write_bytes(out_dir / "kept.txt", "".join(f"{k}\n" for k in train["key"][~gone]).encode())
    write_parquet_atomic(removed, out_dir / "removed.parquet")
    return removed


def _class_summary(removed: pd.DataFrame) -> dict[str, Any]:
    """Removed pairs by class: same-class / cross-class / unlabelled counts and removals per class."""
    labelled = removed["class_name"].notna() & removed["matched_class_name"].notna()
    same = labelled & (removed["class_name"] == removed["matched_class_name"])
    return {
        "same_class": int(same.sum()),
        "cross_class": int((labelled & ~same).sum()),
        "unlabelled": int((~labelled).sum()),
        "removed_per_class": {str(k): int(v) for k, v in removed["class_name"].value_counts().sort_index().items()},
    }


OPTION_DEFAULTS = {  # deduplicate's and dedup_unit's keyword options
    "hamming_threshold": HAMMING_THRESHOLD,
    "eval_hamming_threshold": EVAL_HAMMING_THRESHOLD,
    "eval_similarity_threshold": EVAL_SIMILARITY_THRESHOLD,
    "verify_threshold": VERIFY_THRESHOLD,
    "eval_verify_threshold": EVAL_VERIFY_THRESHOLD,
    "layout_threshold": LAYOUT_THRESHOLD,
    "normalized_layout_threshold": NORMALIZED_LAYOUT_THRESHOLD,
    "pixel_threshold": PIXEL_THRESHOLD,
    "image_size": 224,
    "batch_size": 64,
}


def _options(**given) -> tuple[dict, dict]:
    """``opts`` (the options the stages read) and the report's ``thresholds`` from ``OPTION_DEFAULTS`` keywords."""
    unknown = sorted(set(given) - set(OPTION_DEFAULTS))
    if unknown:
        raise TypeError(f"dedup: unknown options {unknown}")
    kw = {**OPTION_DEFAULTS, **given}
    thresholds = {"hamming": kw["hamming_threshold"], "verify_hamming": kw["verify_threshold"]}
    thresholds.update(eval_hamming=kw["eval_hamming_threshold"], eval_verify_hamming=kw["eval_verify_threshold"])
    thresholds.update(layout_rms=kw["layout_threshold"], normalized_layout_rms=kw["normalized_layout_threshold"])
    thresholds.update(eval_similarity=kw["eval_similarity_threshold"], pixel_correlation=kw["pixel_threshold"])
    opts = {k: kw[k] for k in ("eval_hamming_threshold", "eval_similarity_threshold", "layout_threshold")}
    opts.update({k: kw[k] for k in ("normalized_layout_threshold", "pixel_threshold", "image_size", "batch_size")})
    opts["hamming"] = kw["hamming_threshold"]
    opts["verify"] = -1 if kw["verify_threshold"] is None else kw["verify_threshold"]
    opts["eval_verify"] = -1 if kw["eval_verify_threshold"] is None else kw["eval_verify_threshold"]
    return opts, thresholds


def _unit_matches(train: pd.DataFrame, units, opts: dict) -> pd.DataFrame:
    """The eval matches the unit jobs wrote, with ``index`` = row of ``train`` (found by id)."""
    frames = [pd.read_parquet(Path(u) / "eval_matches.parquet") for u in units]
    reports = [json.loads((Path(u) / "unit_report.json").read_text()) for u in units]
    opts["eval_rejected_by_pixels"] = sum(r["eval_rejected_by_pixels"] for r in reports)
    matches = pd.concat(frames, ignore_index=True)
    ids = train["id"].to_numpy(np.uint64)
    index = np.searchsorted(ids, matches["id"].to_numpy(np.uint64))
    if len(index) and (index.max() >= len(ids) or (ids[index] != matches["id"].to_numpy(np.uint64)).any()):
        raise ValueError(f"dedup: eval matches of units {list(map(str, units))[:3]} name rows of another manifest")
    return matches.drop(columns="id").assign(index=index)


def dedup_unit(
    unit_manifest: str | Path,
    unit: int,
    dataset: str,
    eval_index: str | Path,
    out_dir: str | Path,
    *,
    train_split: str = "train",
    n_bands: int,
    block_bits: int = 0,
    descriptor: str = "phash",
    **options,
) -> dict[str, Any]:
    """The per-image half of dedup for one work unit: its eval contamination (``eval_matches.parquet``: id, reason,
    matched ref, distance, test, layout, pixel; the images of candidate pairs only are decoded) and its band index
    (``bands.write_band_index``) of its ok ``train_split`` rows. ``options``: ``OPTION_DEFAULTS``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    opts, _ = _options(**options)
    train = _ok_rows(Path(unit_manifest), {train_split}, None, unit=unit, dataset=dataset)
    matches = _eval_matches(train, pd.read_parquet(eval_index), descriptor, opts)
    matches = matches.assign(id=train["id"].to_numpy(np.uint64)[matches["index"].to_numpy(np.int64)])
    write_parquet_atomic(matches.drop(columns="index"), out_dir / "eval_matches.parquet")
    plan = band_lsh.BandPlan(max(opts["hamming"], opts["verify"]), n_bands, block_bits)
    band_lsh.write_band_index(hex_to_phash(train["phash"]), train["id"].to_numpy(np.uint64), plan, out_dir)
    report = {"unit": unit, "rows": len(train), "eval_matches": len(matches), "plan": plan.__dict__}
    report["eval_rejected_by_pixels"] = opts.get("eval_rejected_by_pixels", 0)
    atomic_write_bytes(out_dir / "unit_report.json", json.dumps(report, indent=2).encode())
    return report


def dedup_block(units, plan: band_lsh.BandPlan, band: int, block: int, out_path: str | Path) -> int:
    """One (band, block) job over the units' band indexes: its pairs as parquet (a, b: row ids; d). Returns P."""
    pairs = band_lsh.block_pairs(units, plan, band, block)
    write_parquet_atomic(pd.DataFrame({"a": pairs[:, 0], "b": pairs[:, 1], "d": pairs[:, 2]}), Path(out_path))
    return len(pairs)


def deduplicate(
    train_manifest: str | Path,
    eval_manifests: list[str | Path],
    out_dir: str | Path,
    *,
    hamming_threshold: int = HAMMING_THRESHOLD,
    eval_hamming_threshold: int = EVAL_HAMMING_THRESHOLD,
    eval_similarity_threshold: float = EVAL_SIMILARITY_THRESHOLD,
    verify_threshold: int | None = VERIFY_THRESHOLD,
    eval_verify_threshold: int | None = EVAL_VERIFY_THRESHOLD,
    layout_threshold: float = LAYOUT_THRESHOLD,
    normalized_layout_threshold: float = NORMALIZED_LAYOUT_THRESHOLD,
    pixel_threshold: float = PIXEL_THRESHOLD,
    descriptor: str = "phash",
    train_split: str = "train",
    eval_splits: list[str] | None = None,
    n_bands: int | None = None,
    block_bits: int = 0,
    image_size: int = 224,
    batch_size: int = 64,
    max_pairs: int = 24,
    eval_index: str | Path | None = None,
    units: list[str | Path] | None = None,
    candidates: list[str | Path] | None = None,
) -> dict[str, Any]:
    """Decide which training samples to keep; writes kept.txt, removed.parquet, report.json, pairs.png.

    ``eval_manifests`` may include the training manifest itself, whose non-``train_split`` splits then count as
    evaluation sets. ``descriptor`` is ``"phash"`` or the path of a TorchScript model (images -> embeddings).
    A negative Hamming threshold with ``None`` verify threshold disables that near-copy test (exact copies by
    sha256 are always removed); a negative ``normalized_layout_threshold`` disables the colour-shift test. Every
    pair the pHash cascade accepts must also have a thumbnail correlation ``>= pixel_threshold`` (-1: no pixel
    verification; the images of candidate pairs are read from their shards).

    The per-image half may come from the fan-out jobs: ``eval_index`` (``write_eval_index``), ``units`` (the
    ``dedup_unit`` output directories of every unit: their eval matches replace the in-process check) and
    ``candidates`` (the ``dedup_block`` pair files of every (band, block) job of ``bands.BandPlan(max(hamming,
    verify), n_bands, block_bits)``). Without them the same functions run here, on the whole manifest.
    """
    start, out_dir, train_manifest = time.perf_counter(), Path(out_dir), Path(train_manifest)
    out_dir.mkdir(parents=True, exist_ok=True)
    if descriptor != "phash" and not Path(descriptor).is_file():
        raise FileNotFoundError(f"descriptor must be 'phash' or a TorchScript file, got {descriptor!r}")
    train = _ok_rows(train_manifest, {train_split}, None)
    evals = _load_eval(train_manifest, eval_manifests, train_split, eval_splits) if eval_index is None else None
    evals = pd.read_parquet(eval_index) if evals is None else evals
    n = len(train)
    opts, thresholds = _options(
        hamming_threshold=hamming_threshold,
        eval_hamming_threshold=eval_hamming_threshold,
        eval_similarity_threshold=eval_similarity_threshold,
        verify_threshold=verify_threshold,
        eval_verify_threshold=eval_verify_threshold,
        layout_threshold=layout_threshold,
        normalized_layout_threshold=normalized_layout_threshold,
        pixel_threshold=pixel_threshold,
        image_size=image_size,
        batch_size=batch_size,
    )
    opts.update(bands=n_bands, block_bits=block_bits, candidates=candidates)
    if (units is None) != (candidates is None) or (units is not None and eval_index is None):
        raise ValueError("dedup: the fan-out results come together: units, candidates and eval_index")
    reason, matched, distance = np.full(n, None, dtype=object), np.full(n, None, dtype=object), np.zeros(n)
    test, layout, pixel = np.full(n, None, dtype=object), np.full(n, np.nan), np.full(n, np.nan)
    matches = _eval_matches(train, evals, descriptor, opts) if units is None else _unit_matches(train, units, opts)
    for rec in matches.itertuples():  # (1) eval copies
        reason[rec.index], matched[rec.index], distance[rec.index] = rec.reason, rec.matched, rec.distance
        test[rec.index], layout[rec.index], pixel[rec.index] = rec.test, rec.layout, rec.pixel
    timings = {"eval_s": time.perf_counter() - start}
    alive = np.flatnonzero(reason == None)  # noqa: E711 (element-wise)
    first = train.iloc[alive].groupby("sha256", sort=False)["key"].transform("first").to_numpy()
    dup = first != train["key"].to_numpy()[alive]  # (2) exact duplicates inside train
    reason[alive[dup]], matched[alive[dup]], test[alive[dup]] = "exact_duplicate", first[dup], "sha256"
    t0 = time.perf_counter()
    near = _near_stage(train, alive[~dup], hamming_threshold, opts)
    rows, kept_rows, dist, tests, values, corr, mih = near
    reason[rows], matched[rows], distance[rows] = "near_duplicate", train["key"].to_numpy()[kept_rows], dist  # (3)
    test[rows], layout[rows], pixel[rows] = [PAIR_TESTS[t] for t in tests.tolist()], values, corr
    mih["eval_rejected_by_pixels"] = opts.get("eval_rejected_by_pixels", 0)
    timings["near_s"] = time.perf_counter() - t0
    cols = {"reason": reason, "matched": matched, "distance": distance, "test": test, "layout": layout}
    removed = _write_outputs(out_dir, train, evals, {**cols, "pixel": pixel})
    shown = _pairs_figure(removed, train, evals, out_dir / "pairs.png", max_pairs) if len(removed) else 0
    elapsed = time.perf_counter() - start
    report = {
        "train_manifest": str(train_manifest),
        "eval_manifests": [str(p) for p in eval_manifests],
        "descriptor": descriptor,
        "thresholds": thresholds,
        "n_train": n,
        "n_eval": len(evals),
        "kept": n - len(removed),
        "removed": {r: int((removed["reason"] == r).sum()) for r in sorted(removed["reason"].unique())},
        "removed_by_test": {t: int((removed["test"] == t).sum()) for t in sorted(removed["test"].unique())},
        "removed_pairs_by_class": _class_summary(removed),
        "multi_index_hashing": mih,
        "pairs_shown": shown,
        "timings_s": {**timings, "total_s": elapsed},
        "images_per_s": (n + len(evals)) / max(elapsed, 1e-9),
    }
    atomic_write_bytes(out_dir / "report.json", json.dumps(report, indent=2).encode())
    logger.info("dedup: kept %d of %d, removed %s", report["kept"], n, report["removed"])
    return report
