"""Class-stratified caps on evaluation sets (``eval.max_*_images``).

Folder shards are sorted by class, so "the first N samples" would drop whole classes. A cap instead keeps each class
in proportion to its share (largest-remainder rounding), drawn with a fixed seed; labels are read from the shards'
``cls`` members without decoding any image.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

from franca.data.shards import ReadStats, iter_raw_samples


def shard_labels(shard_paths: Iterable[str | Path]) -> dict[str, int | None]:
    """{key: label or None} of every sample of the shards, in shard order (images are not decoded)."""
    labels: dict[str, int | None] = {}
    for path in shard_paths:
        for key, fields in iter_raw_samples(path, ReadStats()):
            labels[key] = int(fields["cls"].decode().strip()) if "cls" in fields else None
    return labels


def class_quotas(counts: dict, limit: int) -> dict:
    """Per-class sample counts summing to ``min(limit, total)``, proportional to ``counts`` (largest remainder; ties go
    to the class that sorts first)."""
    total = sum(counts.values())
    if limit >= total:
        return dict(counts)
    exact = {c: limit * n / total for c, n in counts.items()}
    quotas = {c: int(q) for c, q in exact.items()}
    order = sorted(counts, key=lambda c: (-(exact[c] - quotas[c]), str(c)))
    for c in order[: limit - sum(quotas.values())]:
        quotas[c] += 1
    return quotas


def stratified_keys(
    shards: Iterable[str | Path] | Mapping[str, int | None], limit: int, seed: int
) -> tuple[set[str] | None, int]:
    """(keys of a class-stratified sample of ``limit`` samples, number of samples available) of the shards, or of
    their :func:`shard_labels` read once already; keys is None when there are at most ``limit`` samples (no cap)."""
    labels = shards if isinstance(shards, Mapping) else shard_labels(shards)
    if len(labels) <= limit:
        return None, len(labels)
    by_class: dict = {}
    for key in sorted(labels):
        by_class.setdefault(labels[key], []).append(key)
    quotas = class_quotas({c: len(k) for c, k in by_class.items()}, limit)
    rng = np.random.default_rng(seed)
    chosen: set[str] = set()
    for c in sorted(by_class, key=str):
        keys = by_class[c]
        chosen.update(keys[i] for i in rng.choice(len(keys), size=quotas[c], replace=False))
    return chosen, len(labels)
