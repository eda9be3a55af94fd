"""Dedup that scales (issue 17 item 4): the partitioned band jobs find exactly the pairs of in-memory multi-index
hashing, and the fan-out (eval index, per-unit jobs, (band, block) jobs, reduce) keeps exactly the same images as the
in-process run on the tiny preset's planted duplicates, read from a partitioned manifest directory."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest
from test_synthetic_duplicates import FRACTIONS, tiny_dedup_kwargs

from franca.data import bands
from franca.data.dedup import dedup_block, dedup_unit, deduplicate, write_eval_index
from franca.data.phash import hamming, hex_to_phash, near_duplicate_pairs
from franca.data.planted import read_planted, score_dedup
from franca.data.synthetic import generate


def planted_hashes(n: int, copies: int, threshold: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random hashes, ``copies`` of them again with 0..threshold bit flips, shuffled: (hashes, (copies, 2) pairs)."""
    rng = np.random.default_rng(seed)
    h = rng.integers(0, 2**64, n, dtype=np.uint64)
    src = rng.choice(n, copies, replace=False)
    flips = [sum(1 << int(b) for b in rng.choice(64, rng.integers(0, threshold + 1), replace=False)) for _ in src]
    h = np.concatenate([h, h[src] ^ np.array(flips, np.uint64)])
    perm = rng.permutation(len(h))
    where = np.argsort(perm)  # old row -> new row
    return h[perm], np.sort(np.stack([where[src], where[np.arange(n, n + copies)]], axis=1), axis=1)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    generate(root, seed=5, n_train=400, n_val=60, n_test=60, image_size=64, position_bias=0.8, shard_size=128,
             **FRACTIONS)  # fmt: skip
    return root


def test_partitioned_pairs_equal_multi_index_hashing(synth, tmp_path):
    h, planted = planted_hashes(4000, 300, 12, seed=1)
    tiny = hex_to_phash(pd.read_parquet(synth / "manifest.parquet", columns=["phash"])["phash"])
    cases = [(h, 12, None, 0, 1), (h, 12, 6, 3, 3), (h, 9, 5, 2, 2), (tiny, 16, None, 0, 1), (tiny, 16, 6, 2, 2)]
    for n, (hashes, t, m, k, units) in enumerate(cases):
        i, j, d, _ = near_duplicate_pairs(hashes, t, m)
        plan = bands.make_plan(len(hashes), t, m, k)
        got = bands.partitioned_pairs(hashes, plan, tmp_path / str(n), units=units)
        assert len(i) > 0 and all(np.array_equal(a, b) for a, b in zip((i, j, d), got, strict=True)), plan
        if hashes is h:  # every planted pair within t is found (recall 1), each pair once
            inside = planted[hamming(h[planted[:, 0]], h[planted[:, 1]]) <= t]
            assert set(map(tuple, inside.tolist())) <= set(zip(got[0].tolist(), got[1].tolist(), strict=True))
            assert len(set(zip(got[0].tolist(), got[1].tolist(), strict=True))) == len(got[0])
    assert plan.neighbours(1) == [1, 0, 2, 3]  # radius 2 over 2 block bits: every block
    assert bands.BandPlan(8, 2, 6).neighbours(0)[:2] == [0, 1] and len(bands.BandPlan(8, 2, 6).neighbours(5)) == 57


def split_into_units(root, cuts: list[int]) -> list:
    """The units layout (issue 17 contract) of a generated dataset: units/U/{manifest.parquet, shards/}, and
    manifest/U.parquet links; every unit's shards are reachable from root/shards."""
    frame = pd.read_parquet(root / "manifest.parquet")
    (root / "manifest").mkdir()
    paths = []
    for u, (start, stop) in enumerate(zip(cuts[:-1], cuts[1:], strict=True)):
        unit_dir = root / "units" / f"u{u:06d}"
        unit_dir.mkdir(parents=True)
        os.symlink(root / "shards", unit_dir / "shards")
        frame.iloc[start:stop].to_parquet(unit_dir / "manifest.parquet", index=False)
        os.symlink(unit_dir / "manifest.parquet", root / "manifest" / f"u{u:06d}.parquet")
        paths.append(unit_dir / "manifest.parquet")
    return paths


def test_fan_out_dedup_equals_in_process_on_planted_copies(synth, tmp_path):
    kwargs = {k: v for k, v in tiny_dedup_kwargs().items() if k != "descriptor"}
    reference = deduplicate(synth / "manifest.parquet", [synth / "manifest.parquet"], tmp_path / "ref",
                            eval_splits=["val", "test"], max_pairs=1, **kwargs)  # fmt: skip
    n = len(pd.read_parquet(synth / "manifest.parquet", columns=["key"]))
    units = split_into_units(synth, [0, n // 3, n])
    index = tmp_path / "eval_index.parquet"
    assert write_eval_index(synth / "manifest", [synth / "manifest"], "train", ["val", "test"], index) == 120
    unit_dirs = [tmp_path / "units" / f"u{u:06d}" for u in range(len(units))]
    for u, (path, out) in enumerate(zip(units, unit_dirs, strict=True)):
        dedup_unit(path, u, "synth", index, out, n_bands=4, block_bits=2, **kwargs)
    plan = bands.BandPlan(kwargs["verify_threshold"], 4, 2)
    candidates = [tmp_path / "blocks" / f"b{b}-p{p}.parquet" for b, p in plan.jobs()]
    assert sum(dedup_block(unit_dirs, plan, b, p, c) for (b, p), c in zip(plan.jobs(), candidates, strict=True))
    fan_out = deduplicate(synth / "manifest", [synth / "manifest"], tmp_path / "fan", eval_splits=["val", "test"],
                          max_pairs=1, n_bands=4, block_bits=2, eval_index=index, units=unit_dirs,
                          candidates=candidates, **kwargs)  # fmt: skip
    assert (tmp_path / "fan" / "kept.txt").read_text() == (tmp_path / "ref" / "kept.txt").read_text()
    removed = pd.read_parquet(tmp_path / "fan" / "removed.parquet")
    pd.testing.assert_frame_equal(removed, pd.read_parquet(tmp_path / "ref" / "removed.parquet"))
    assert fan_out["removed"] == reference["removed"] and fan_out["multi_index_hashing"]["jobs"] == 16
    assert fan_out["multi_index_hashing"]["accepted"] == reference["multi_index_hashing"]["accepted"]
    score = score_dedup(read_planted(synth / "shards"), [f"train_{i:07d}" for i in range(400)],
                        (tmp_path / "fan" / "kept.txt").read_text().split(), removed)  # fmt: skip
    assert score["recall_all"] == 1.0 and score["precision"] == 1.0 and score["eval_copies_kept"] == [], score
    with pytest.raises(ValueError, match="another manifest"):  # unit results must belong to the manifest read
        deduplicate(units[1], [synth / "manifest"], tmp_path / "bad", eval_splits=["val", "test"], n_bands=4,
                    block_bits=2, eval_index=index, units=unit_dirs, candidates=candidates, **kwargs)  # fmt: skip
