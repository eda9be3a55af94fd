"""Class-stratified caps on evaluation sets: never the first N samples of class-sorted shards."""

from __future__ import annotations

import io
import tarfile
from collections import Counter

import pytest

from franca.data.sampling import class_quotas, shard_labels, stratified_keys


def _class_sorted_shards(root, counts: dict[int, int], shard_size: int = 7) -> list[str]:
    """Shards of labelled samples in class order, as a class-folder ingest writes them (no images needed here)."""
    keys = [(f"c{label}_{i:03d}", label) for label, n in sorted(counts.items()) for i in range(n)]
    paths = []
    for start in range(0, len(keys), shard_size):
        path = root / f"val-{start // shard_size:06d}.tar"
        with tarfile.open(path, "w") as tar:
            for key, label in keys[start : start + shard_size]:
                for ext, data in (("cls", str(label).encode()), ("jpg", b"not decoded")):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        paths.append(str(path))
    return paths


def test_cap_keeps_every_class_in_proportion(tmp_path):
    counts = {0: 30, 1: 30, 2: 20, 3: 20}
    paths = _class_sorted_shards(tmp_path, counts)
    keys, available = stratified_keys(paths, 50, seed=0)
    labels = shard_labels(paths)
    assert available == 100 and len(keys) == 50
    assert Counter(labels[k] for k in keys) == {0: 15, 1: 15, 2: 10, 3: 10}
    # the first 50 samples in shard order would have held classes 0 and 1 only
    assert set(Counter(list(labels.values())[:50])) == {0, 1}


def test_cap_is_deterministic_and_seeded(tmp_path):
    paths = _class_sorted_shards(tmp_path, {0: 12, 1: 9})
    assert stratified_keys(paths, 10, seed=3) == stratified_keys(paths, 10, seed=3)
    assert stratified_keys(paths, 10, seed=3)[0] != stratified_keys(paths, 10, seed=4)[0]
    assert stratified_keys(paths, 21, seed=0) == (None, 21)  # no cap applies: every sample is used


@pytest.mark.parametrize(
    ("counts", "limit", "expected"),
    [({"a": 5, "b": 5, "c": 5}, 10, {"a": 4, "b": 3, "c": 3}), ({"a": 1, "b": 99}, 10, {"a": 0, "b": 10})],
)
def test_quotas_sum_to_the_limit_by_largest_remainder(counts, limit, expected):
    assert class_quotas(counts, limit) == expected
