"""Deduplication of a training set against itself and against evaluation sets (issue 4 item 4, DESIGN "Data").

Order of the decisions (a training image is removed for the first reason that applies):
  1. ``eval_exact`` / ``eval_near_copy``: a near copy of any evaluation image. Exact copies are found by sha256
     whatever the descriptor; near copies by faiss on the descriptor: ``IndexBinaryFlat`` range search on the 64
     pHash bits (default; the pair rule below with ``eval_hamming_threshold``) or ``IndexFlatIP`` on L2-normalised
     embeddings of a TorchScript copy-detection model given by path (cosine >= ``eval_similarity_threshold``).
  2. ``exact_duplicate``: same sha256 as an earlier kept training image (manifest order decides who stays).
  3. ``near_duplicate``: a near copy of an earlier kept training image.

Pair rule (pHash descriptor): Hamming distance ``d <= hamming_threshold``, or ``d <= verify_threshold`` and a colour
layout RMS difference ``<= layout_threshold`` (the two-descriptor cascade that makes slight crops, which move pHash
by 10-16 bits, detectable without accepting the different images found at those distances; see phash.py).
Candidate pairs inside the training set come from multi-index hashing: the 64 bits are split into ``m`` bands
and two hashes within distance ``t`` agree within ``floor(t / m)`` bits on at least one band (pigeonhole), so
probing each band's sorted table with every flip pattern of that radius finds all pairs; the candidates are then
verified. The cost is ``O(n * m * patterns * bucket)``, never all pairs.

Outputs in ``out_dir``: ``kept.txt`` (kept keys in manifest order), ``removed.parquet`` (key, reason, matched key,
distance or similarity), ``report.json`` (counts per reason, thresholds, throughput) and ``pairs.png`` (thumbnails
of removed pairs, as the paper's dedup figure).
"""

from __future__ import annotations

import itertools
import json
import logging
import time
import warnings
from math import comb
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pandas as pd

from franca.data.manifest import read_manifest, write_parquet_atomic
from franca.data.phash import hamming, hex_to_layout, hex_to_phash, layout_rms, phash_to_bits
from franca.data.shards import atomic_write_bytes

logger = logging.getLogger(__name__)

__all__ = ["choose_bands", "near_duplicate_pairs", "greedy_removal", "deduplicate"]

# Defaults measured on planted duplicates (tests/data/test_dedup.py, benchmarks/bench_dedup.py).
HAMMING_THRESHOLD = 10
EVAL_HAMMING_THRESHOLD = 12
VERIFY_THRESHOLD = 14  # bounded by the cost of multi-index hashing (the Hamming ball grows fast)
EVAL_VERIFY_THRESHOLD = 16  # faiss brute force: the radius costs nothing, and eval copies must not survive
LAYOUT_THRESHOLD = 8.0
EVAL_SIMILARITY_THRESHOLD = 0.75  # SSCD's recommended copy-detection threshold


def _patterns(width: int, radius: int) -> np.ndarray:
    """All XOR masks of ``width`` bits with at most ``radius`` bits set, as uint64."""
    masks = [0]
    for k in range(1, radius + 1):
        masks += [sum(1 << b for b in bits) for bits in itertools.combinations(range(width), k)]
    return np.array(masks, dtype=np.uint64)


def choose_bands(n: int, threshold: int) -> int:
    """Number of bands minimising the estimated probes ``m * patterns(64/m, t//m) * (1 + n / 2^(64/m))``."""
    best, best_cost = 1, float("inf")
    for m in range(1, min(threshold + 1, 16) + 1):
        width, radius = 64 // m, threshold // m
        patterns = sum(comb(width, k) for k in range(radius + 1))
        cost = m * patterns * (1.0 + n / 2.0**width)
        if cost < best_cost:
            best, best_cost = m, cost
    return best


class _BandTable:
    """Rows grouped by band value: ``order`` sorts the rows; ``bucket(q)`` gives (first position, size) per value.

    Bands of up to 24 bits use a dense table (one gather per probe); wider bands a binary search.
    """

    def __init__(self, vals: np.ndarray, width: int):
        self.order = np.argsort(vals, kind="stable")
        if width <= 24:
            counts = np.bincount(vals.astype(np.int64), minlength=1 << width)
            self.starts, self.counts, self.sorted = np.cumsum(counts) - counts, counts, None
        else:
            self.sorted = vals[self.order]

    def bucket(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.sorted is None:
            idx = q.astype(np.int64)
            return self.starts[idx], self.counts[idx]
        lo = np.searchsorted(self.sorted, q, "left")
        return lo, np.searchsorted(self.sorted, q, "right") - lo


def _probe(h, vals, table: _BandTable, pattern: int, rows: np.ndarray, threshold: int) -> tuple[np.ndarray, int]:
    """Verified pairs ``(min, max, d)`` whose band values differ by ``pattern``, probed from ``rows``.

    Each unordered pair is probed once per pattern: from its member with the smaller band value (pattern != 0), or
    from its smaller index (pattern 0, same bucket).
    """
    q = vals[rows] ^ np.uint64(pattern)  # (R,) band values of the partners
    if pattern:
        probe = q > vals[rows]
        rows, q = rows[probe], q[probe]
    lo, cnt = table.bucket(q)  # first sorted position and size of each partner bucket
    ii = np.repeat(rows, cnt)
    jj = table.order[np.repeat(lo, cnt) + np.arange(cnt.sum()) - np.repeat(np.cumsum(cnt) - cnt, cnt)]
    if not pattern:
        ii, jj = ii[ii < jj], jj[ii < jj]
    d = hamming(h[ii], h[jj])
    ok = d <= threshold
    return np.stack([np.minimum(ii, jj)[ok], np.maximum(ii, jj)[ok], d[ok]], axis=1), len(ii)


def near_duplicate_pairs(
    hashes: np.ndarray, threshold: int, n_bands: int | None = None, block: int = 1 << 16
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, int]]:
    """All pairs ``i < j`` with ``hamming(h_i, h_j) <= threshold`` by multi-index hashing.

    Args:
        hashes: (n,) uint64.
    Returns:
        i, j, d: (P,) int64 arrays sorted by (j, d, i); stats (bands, radius, candidates checked).
    """
    h = np.asarray(hashes, dtype=np.uint64)
    n = len(h)
    m = n_bands or choose_bands(n, threshold)
    bounds = np.linspace(0, 64, m + 1).astype(int)  # band b covers bits [bounds[b], bounds[b+1]) from the MSB
    radius, found, candidates = threshold // m, [], 0
    for b in range(m):
        width = int(bounds[b + 1] - bounds[b])
        vals = (h >> np.uint64(64 - bounds[b + 1])) & np.uint64((1 << width) - 1)  # (n,)
        table = _BandTable(vals, width)
        for p in _patterns(width, radius).tolist():
            for start in range(0, n, block):
                pairs, checked = _probe(h, vals, table, p, np.arange(start, min(start + block, n)), threshold)
                found.append(pairs)
                candidates += checked
    pairs = np.unique(np.concatenate(found, axis=0), axis=0) if found else np.zeros((0, 3), dtype=np.int64)
    pairs = pairs[np.lexsort((pairs[:, 0], pairs[:, 2], pairs[:, 1]))]  # by j, then d, then i
    stats = {"bands": m, "radius_per_band": radius, "candidates": candidates, "pairs": len(pairs)}
    return pairs[:, 0], pairs[:, 1], pairs[:, 2], stats


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


def _ok_rows(path: Path, splits: set[str] | None, exclude: str | None) -> pd.DataFrame:
    frame = read_manifest(path)
    frame = frame[frame["status"] == "ok"]
    if "split" in frame.columns and splits is not None:
        frame = frame[frame["split"].isin(splits)]
    if "split" in frame.columns and exclude is not None:
        frame = frame[frame["split"] != exclude]
    frame = frame.reset_index(drop=True).assign(shard_path=[str(path.parent / s) for s in frame["shard"]])
    return frame.assign(dataset=path.parent.name)


def _load_eval(train_manifest: Path, eval_manifests, train_split: str, eval_splits) -> pd.DataFrame:
    frames = []
    for path in [Path(p) for p in eval_manifests]:
        same = path.resolve() == train_manifest.resolve()
        frames.append(_ok_rows(path, set(eval_splits) if eval_splits else None, train_split if same else None))
    if not frames:
        return pd.DataFrame(columns=["key", "sha256", "phash", "shard_path", "dataset"])
    frame = pd.concat(frames, ignore_index=True)
    return frame.assign(ref=frame["dataset"] + ":" + frame["key"])


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


def _accept(d, strict, loose, layout_a, layout_b, ia, ib, opts) -> np.ndarray:
    """The pair rule: ``d <= strict`` or (``d <= loose`` and colour layouts within ``layout_threshold``)."""
    d = np.asarray(d)
    accept = d <= strict
    if loose > strict and layout_a is not None and layout_b is not None and len(d):
        accept |= (d <= loose) & (layout_rms(layout_a[ia], layout_b[ib]) <= opts["layout_threshold"])
    return accept


def _phash_eval_hits(train: pd.DataFrame, evals: pd.DataFrame, opts: dict) -> tuple[np.ndarray, ...]:
    """Per train row with an accepted eval match: (train row, closest eval row, Hamming distance)."""
    strict, loose = opts["eval_hamming_threshold"], max(opts["eval_hamming_threshold"], opts["eval_verify"])
    index = faiss.IndexBinaryFlat(64)
    index.add(phash_to_bits(hex_to_phash(evals["phash"])))
    lims, dist, nearest = index.range_search(phash_to_bits(hex_to_phash(train["phash"])), loose + 1)  # d < radius
    query = np.repeat(np.arange(len(train)), np.diff(lims.astype(np.int64)))  # (P,) train row of each hit
    accept = _accept(dist, strict, loose, _layouts(train), _layouts(evals), query, nearest, opts)
    query, dist, nearest = query[accept], dist[accept], nearest[accept]
    order = np.lexsort((nearest, dist, query))  # per train row: the closest accepted eval image first
    first = order[np.r_[True, query[order][1:] != query[order][:-1]]] if len(order) else order
    return query[first], nearest[first], dist[first]


def _eval_matches(train: pd.DataFrame, evals: pd.DataFrame, descriptor: str, opts: dict) -> pd.DataFrame:
    """One row per train index matched to an eval image: (index, reason, matched, distance)."""
    rows = []
    if evals.empty:
        return pd.DataFrame(rows, columns=["index", "reason", "matched", "distance"])
    first_ref = evals.drop_duplicates("sha256").set_index("sha256")["ref"]
    exact = train["sha256"].map(first_ref)
    rows += [(i, "eval_exact", ref, 0.0) for i, ref in exact.dropna().items()]
    if descriptor == "phash":
        query, nearest, dist = _phash_eval_hits(train, evals, opts)
        rows += [
            (q, "eval_near_copy", evals["ref"].iat[e], float(d))
            for q, e, d in zip(query.tolist(), nearest.tolist(), dist.tolist(), strict=True)
            if pd.isna(exact.iat[q])
        ]
    else:
        size, batch = opts["image_size"], opts["batch_size"]
        eval_embeddings = _embed(evals, descriptor, size, batch)  # (n_eval, D)
        index = faiss.IndexFlatIP(eval_embeddings.shape[1])
        index.add(eval_embeddings)
        sim, nearest = index.search(_embed(train, descriptor, size, batch), 1)
        hit = (sim[:, 0] >= opts["eval_similarity_threshold"]) & exact.isna().to_numpy()
        rows += [(i, "eval_near_copy", evals["ref"].iat[nearest[i, 0]], float(sim[i, 0])) for i in np.flatnonzero(hit)]
    return pd.DataFrame(rows, columns=["index", "reason", "matched", "distance"])


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
            ax.set_title(f"{rec.reason}\n{rec.distance:g}" if side == 0 else ref[-24:], fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return len(shown)


def _near_stage(train: pd.DataFrame, alive: np.ndarray, threshold: int, opts: dict, n_bands: int | None):
    """Within-train near duplicates among ``alive`` rows: (removed rows, matched rows, distances, MIH stats)."""
    loose = max(threshold, opts["verify"])
    if loose < 0:  # near-duplicate removal disabled
        return alive[:0], alive[:0], alive[:0], {"disabled": True}
    i, j, d, mih = near_duplicate_pairs(hex_to_phash(train["phash"].iloc[alive]), loose, n_bands)
    layouts = _layouts(train.iloc[alive])
    accept = _accept(d, threshold, loose, layouts, layouts, i, j, opts)
    mih["accepted"] = int(accept.sum())
    match, dist = greedy_removal(len(alive), i[accept], j[accept], d[accept])  # order (j, d, i) is kept
    near = np.flatnonzero(match >= 0)
    return alive[near], alive[match[near]], dist[near], mih


def _write_outputs(out_dir: Path, train: pd.DataFrame, reason, matched, distance) -> pd.DataFrame:
    gone = reason != None  # noqa: E711 (element-wise)
    removed = pd.DataFrame({"key": train["key"][gone], "reason": reason[gone], "matched_key": matched[gone]})
    removed = removed.assign(distance=distance[gone], shard=train["shard"][gone]).reset_index(drop=True)
    removed = removed.astype({"key": "string", "reason": "string", "matched_key": "string"})
    atomic_write_bytes(out_dir / "kept.txt", "".join(f"{k}\n" for k in train["key"][~gone]).encode())
    write_parquet_atomic(removed, out_dir / "removed.parquet")
    return removed


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
    descriptor: str = "phash",
    train_split: str = "train",
    eval_splits: list[str] | None = None,
    n_bands: int | None = None,
    image_size: int = 224,
    batch_size: int = 64,
    max_pairs: int = 24,
) -> dict[str, Any]:
    """Decide which training samples to keep; writes kept.txt, removed.parquet, report.json, pairs.png.

    ``eval_manifests`` may include the training manifest itself, whose non-``train_split`` splits then count as
    evaluation sets. ``descriptor`` is ``"phash"`` or the path of a TorchScript model (images -> embeddings).
    A negative Hamming threshold with ``None`` verify threshold disables that near-copy test (exact copies by
    sha256 are always removed).
    """
    start, out_dir, train_manifest = time.perf_counter(), Path(out_dir), Path(train_manifest)
    out_dir.mkdir(parents=True, exist_ok=True)
    if descriptor != "phash" and not Path(descriptor).is_file():
        raise FileNotFoundError(f"descriptor must be 'phash' or a TorchScript file, got {descriptor!r}")
    train = _ok_rows(train_manifest, {train_split}, None)
    evals = _load_eval(train_manifest, eval_manifests, train_split, eval_splits)
    n = len(train)
    thresholds = {"hamming": hamming_threshold, "verify_hamming": verify_threshold}
    thresholds.update(eval_hamming=eval_hamming_threshold, eval_verify_hamming=eval_verify_threshold)
    thresholds.update(layout_rms=layout_threshold, eval_similarity=eval_similarity_threshold)
    opts = {"eval_hamming_threshold": eval_hamming_threshold, "eval_similarity_threshold": eval_similarity_threshold}
    opts.update(image_size=image_size, batch_size=batch_size, layout_threshold=layout_threshold)
    opts["verify"] = -1 if verify_threshold is None else verify_threshold
    opts["eval_verify"] = -1 if eval_verify_threshold is None else eval_verify_threshold
    reason, matched, distance = np.full(n, None, dtype=object), np.full(n, None, dtype=object), np.zeros(n)
    for rec in _eval_matches(train, evals, descriptor, opts).itertuples():  # (1) eval copies
        reason[rec.index], matched[rec.index], distance[rec.index] = rec.reason, rec.matched, rec.distance
    timings = {"eval_s": time.perf_counter() - start}
    alive = np.flatnonzero(reason == None)  # noqa: E711 (element-wise)
    first = train.iloc[alive].groupby("sha256", sort=False)["key"].transform("first").to_numpy()
    dup = first != train["key"].to_numpy()[alive]  # (2) exact duplicates inside train
    reason[alive[dup]], matched[alive[dup]] = "exact_duplicate", first[dup]
    t0 = time.perf_counter()
    rows, kept_rows, dist, mih = _near_stage(train, alive[~dup], hamming_threshold, opts, n_bands)  # (3)
    reason[rows], matched[rows], distance[rows] = "near_duplicate", train["key"].to_numpy()[kept_rows], dist
    timings["near_s"] = time.perf_counter() - t0
    removed = _write_outputs(out_dir, train, reason, matched, distance)
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
        "multi_index_hashing": mih,
        "pairs_shown": shown,
        "timings_s": {**timings, "total_s": elapsed},
        "images_per_s": (n + len(evals)) / max(elapsed, 1e-9),
    }
    atomic_write_bytes(out_dir / "report.json", json.dumps(report, indent=2).encode())
    logger.info("dedup: kept %d of %d, removed %s", report["kept"], n, report["removed"])
    return report
