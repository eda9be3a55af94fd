"""Deduplication: multi-index hashing against brute force, planted duplicates (recall / precision), eval copies."""

from __future__ import annotations

import json
import logging
import warnings

import numpy as np
import pandas as pd
import pytest
from image_helpers import encode, photo_like
from PIL import Image

from franca.data.datacard import write_datacard
from franca.data.dedup import deduplicate, greedy_removal, near_duplicate_pairs
from franca.data.manifest import image_record, make_manifest, write_parquet_atomic
from franca.data.phash import (
    PAIR_TESTS,
    hamming,
    layout_rms,
    normalize_layout,
    normalized_layout_rms,
    pair_tests,
    phash_gray,
)
from franca.data.shards import ShardWriter

logger = logging.getLogger(__name__)
TRANSFORMS = ("exact", "resize", "jpeg", "crop", "colour")


def transform(name: str, image: Image.Image, data: bytes, rng: np.random.Generator) -> bytes:
    """A planted duplicate of ``image`` (encoded as ``data``)."""
    if name == "exact":
        return data
    if name == "resize":
        return encode(image.resize((image.width // 2, image.height // 2), Image.Resampling.BILINEAR), quality=90)
    if name == "jpeg":
        return encode(image, quality=30)
    if name == "crop":  # slight crop: 5 % of each dimension, split at random between the two sides
        w, h, total = image.width, image.height, 0.05
        fx, fy = rng.uniform(0, total), rng.uniform(0, total)
        box = (round(fx * w), round(fy * h), w - round((total - fx) * w), h - round((total - fy) * h))
        return encode(image.crop(box), quality=90)
    shift = np.asarray(image, dtype=np.float64) * rng.uniform(0.85, 1.15, 3) + rng.uniform(-15, 15, 3)
    return encode(Image.fromarray(np.clip(shift, 0, 255).astype(np.uint8)), quality=90)  # colour shift


def write_dataset(root, split_items: dict[str, list[tuple[str, bytes]]]) -> str:
    rows = []
    for split, items in split_items.items():
        with ShardWriter(root / "shards", split, shard_size=64) as writer:
            for key, data in items:
                path = writer.write(key, {"jpg": data, "cls": b"0"})
                record, _ = image_record(data)
                rows.append({**record, "key": key, "split": split, "shard": f"shards/{path.name}", "status": "ok"})
    write_parquet_atomic(make_manifest(rows), root / "manifest.parquet")
    return root / "manifest.parquet"


def test_multi_index_hashing_equals_brute_force():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 2**63, size=300, dtype=np.uint64) * np.uint64(2) + rng.integers(0, 2, 300).astype(np.uint64)
    flips = [
        np.bitwise_or.reduce(np.uint64(1) << rng.choice(64, k, replace=False).astype(np.uint64)) for k in range(13)
    ]
    near = np.array([base[i] ^ flips[i % 13] for i in range(120)], dtype=np.uint64)  # distances 0..12
    hashes = np.concatenate([base, near])
    full = hamming(hashes[:, None], hashes[None, :])
    for threshold, bands in [(10, None), (10, 4), (6, 7), (12, 4), (4, 2), (0, None)]:  # (4, 2): 32-bit bands
        i, j, d, stats = near_duplicate_pairs(hashes, threshold, n_bands=bands)
        bi, bj = np.nonzero(np.triu(full <= threshold, k=1))
        assert set(zip(i.tolist(), j.tolist(), strict=True)) == set(zip(bi.tolist(), bj.tolist(), strict=True))
        np.testing.assert_array_equal(d, full[i, j])
        assert stats["candidates"] < len(hashes) ** 2 / 2  # never all pairs


def test_greedy_removal_keeps_first_and_does_not_chain():
    # 0 ~ 1 (d 3), 1 ~ 2 (d 4), 0 !~ 2: 1 is removed by 0, then 2 stays (its only neighbour 1 is gone)
    match, dist = greedy_removal(4, np.array([0, 1, 0]), np.array([1, 2, 3]), np.array([3, 4, 9]))
    assert match.tolist() == [-1, 0, -1, 0] and dist.tolist() == [0, 3, 0, 9]


def test_phash_golden_values():
    # a block whose lowest 8 x 8 DCT coefficients are a known permutation of 1..64 (inverse DCT by scipy)
    scipy_fft = pytest.importorskip("scipy.fft")
    rng = np.random.default_rng(5)
    coeffs = np.zeros((32, 32))
    low = rng.permutation(64) + 1.0
    coeffs[:8, :8] = low.reshape(8, 8)
    block = scipy_fft.idctn(coeffs, norm="ortho")
    expected = "".join("1" if v > 32.5 else "0" for v in low)  # median of 1..64 is 32.5
    assert format(int(phash_gray(block)), "064b") == expected
    # and on a real image block: phash_gray equals a scipy DCT reference
    image = rng.uniform(0, 255, (32, 32))
    ref = scipy_fft.dctn(image, norm="ortho")[:8, :8].ravel()
    assert format(int(phash_gray(image)), "064b") == "".join("1" if v > np.median(ref) else "0" for v in ref)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    root = tmp_path_factory.mktemp("dedup")
    rng = np.random.default_rng(3)
    images = photo_like(rng, 380, size=96)
    datas = [encode(im, quality=92) for im in images]
    train_items = [(f"train_o{i:04d}", datas[i]) for i in range(300)]
    groups = {f"train_o{i:04d}": i for i in range(300)}  # key -> source image index
    eval_items = [(f"val_{i:04d}", datas[i]) for i in range(300, 380)]
    truth = []
    for n, name in enumerate(TRANSFORMS):
        for i in range(n * 30, n * 30 + 30):  # 30 train originals per transformation
            key = f"train_p{name}{i:04d}"
            train_items.append((key, transform(name, images[i], datas[i], rng)))
            groups[key] = i
            truth.append((key, name))
        for i in range(300 + n * 12, 300 + n * 12 + 12):  # 12 eval images per transformation copied into train
            key = f"train_e{name}{i:04d}"
            train_items.append((key, transform(name, images[i], datas[i], rng)))
            groups[key] = i
    manifest = write_dataset(root / "train_ds", {"train": train_items})
    eval_manifest = write_dataset(root / "eval_ds", {"val": eval_items})
    report = deduplicate(manifest, [eval_manifest], root / "dedup")  # default thresholds and descriptor
    return root, manifest, eval_manifest, groups, truth, report


def test_planted_duplicates_recall_precision_and_eval_copies(planted):
    root, manifest, eval_manifest, groups, truth, report = planted
    removed = pd.read_parquet(root / "dedup" / "removed.parquet")
    kept = (root / "dedup" / "kept.txt").read_text().split()
    assert len(kept) + len(removed) == report["n_train"] == 300 + 150 + 60
    assert json.loads((root / "dedup" / "report.json").read_text())["removed"] == report["removed"]
    assert (root / "dedup" / "pairs.png").stat().st_size > 10_000

    # eval copies never survive, and are attributed to the right eval image
    eval_copies = {k for k in groups if k.startswith("train_e")}
    assert not eval_copies & set(kept)
    by_key = removed.set_index("key")
    for key in eval_copies:
        assert by_key.at[key, "matched_key"] == f"eval_ds:val_{groups[key]:04d}"
        assert by_key.at[key, "reason"] in ("eval_exact", "eval_near_copy")
    # within-train duplicates: recall per transformation, precision over every removal
    train_removed = removed[~removed["reason"].str.startswith("eval")]
    pairs = zip(train_removed["key"], train_removed["matched_key"], strict=True)
    correct = [groups.get(k, -1) == groups.get(m, -2) for k, m in pairs]
    precision = (sum(correct) + len(eval_copies)) / len(removed)
    detected = set(train_removed["key"][np.array(correct, dtype=bool)])
    recall = {name: np.mean([k in detected for k, t in truth if t == name]) for name in TRANSFORMS}
    overall = np.mean([k in detected for k, _ in truth])
    logger.info("planted dedup: recall %s overall %.3f precision %.3f", recall, overall, precision)
    assert overall >= 0.95 and precision >= 0.99, (recall, overall, precision)
    assert min(recall.values()) >= 0.95, recall
    assert report["removed"]["exact_duplicate"] == 30 and report["removed"]["eval_exact"] == 12
    assert set(kept) >= {f"train_o{i:04d}" for i in range(300)}  # no original is lost


def test_normalized_layout_rms_golden():
    rng = np.random.default_rng(11)
    a = rng.uniform(20, 230, (6, 48)).astype(np.float32)
    gain, offset = rng.uniform(0.5, 1.5, (6, 1, 3)), rng.uniform(-20, 20, (6, 1, 3))
    shifted = (a.reshape(6, 16, 3) * gain + offset).reshape(6, 48)  # any per-channel gain > 0 and offset
    np.testing.assert_allclose(normalized_layout_rms(a, shifted), 0.0, atol=1e-5)
    assert (layout_rms(a, shifted) > 5).all()
    # independent reference: sqrt(mean over channels of 2 (1 - Pearson r)) of the 16 cells
    b = rng.uniform(20, 230, (6, 48)).astype(np.float32)
    ref = [
        np.sqrt(
            np.mean([2 * (1 - np.corrcoef(x.reshape(16, 3)[:, c], y.reshape(16, 3)[:, c])[0, 1]) for c in range(3)])
        )
        for x, y in zip(a, b, strict=True)
    ]
    np.testing.assert_allclose(normalized_layout_rms(a, b), ref, rtol=1e-5)
    np.testing.assert_allclose(normalized_layout_rms(a, 255 - a), 2.0, rtol=1e-6)  # r = -1: inversion is no copy
    flat = a.copy().reshape(6, 16, 3)
    flat[0, :, 2] = 100 + np.arange(16) % 2 * 3  # channel std 1.5 < LAYOUT_MIN_STD: z-scores would be noise
    flat = flat.reshape(6, 48)
    dist = normalized_layout_rms(flat, flat)
    assert np.isinf(dist[0]) and (dist[1:] == 0).all()
    z, contrast = normalize_layout(flat)
    assert contrast.tolist() == [False] + [True] * 5 and (z[0] == 0).all()
    np.testing.assert_allclose(z[1:].reshape(5, 16, 3).std(axis=1), 1.0, rtol=1e-5)


def test_pair_tests_first_test_that_accepts_wins():
    rng = np.random.default_rng(12)
    base = rng.uniform(40, 210, (6, 48)).astype(np.float32)
    other = base.copy()
    other[1] += 3.0  # raw 3: layout test
    other[2] = (base[2].reshape(16, 3) * [1.1, 0.9, 1.05] + [10, -12, 5]).ravel()  # colour shift: raw > 8, norm 0
    other[4] = rng.uniform(40, 210, 48)  # unrelated
    d = np.array([3, 12, 12, 20, 12, 12])  # strict 5, loose 16; pair 3 is beyond loose; pair 5 an exact layout
    test, raw, norm = pair_tests(d, 5, 16, (base, other), 8.0, 0.06)
    assert [PAIR_TESTS[t] if t >= 0 else None for t in test] == [
        "hamming", "layout", "normalized_layout", None, None, "layout"
    ]  # fmt: skip
    assert np.isnan(raw[[0, 3]]).all() and raw[1] == pytest.approx(3.0) and raw[2] > 8.0
    assert np.isnan(norm[[0, 3]]).all() and np.abs(norm[[1, 2, 5]]).max() < 1e-5 and norm[4] > 0.5  # offsets: 0
    test_off, _, norm_off = pair_tests(d, 5, 16, (base, other), 8.0, -1)
    assert test_off.tolist() == [0, 1, -1, -1, -1, 1] and np.isnan(norm_off).all()
    assert pair_tests(d, 5, 16, None, 8.0, 0.06)[0].tolist() == [0, -1, -1, -1, -1, -1]  # no layouts: pHash only


def test_normalized_layout_rule_on_photo_like_images(planted, tmp_path):
    """pHash only verifies (hamming thresholds off): the raw layout test misses colour shifts, the normalised one
    finds them without a false pair."""
    root, manifest, eval_manifest, groups, truth, _ = planted
    scores = {}
    for label, threshold in (("raw", -1.0), ("normalized", 0.06)):
        out = tmp_path / label
        report = deduplicate(
            manifest, [eval_manifest], out, hamming_threshold=-1, eval_hamming_threshold=-1,
            normalized_layout_threshold=threshold,
        )  # fmt: skip
        removed = pd.read_parquet(out / "removed.parquet")
        kept = set((out / "kept.txt").read_text().split())
        source = {f"eval_ds:val_{i:04d}": i for i in range(300, 380)} | groups  # any key -> source image index
        correct = np.array(
            [groups[k] == source[m] for k, m in zip(removed["key"], removed["matched_key"], strict=True)]
        )
        found = set(removed["key"][correct])
        recall = {name: np.mean([k in found for k, t in truth if t == name]) for name in TRANSFORMS}
        eval_kept = sorted(k for k in groups if k.startswith("train_e") and k in kept)
        scores[label] = (recall, correct.mean(), eval_kept, removed, report)
        logger.info("verify-only dedup, %s layout: recall %s precision %.3f eval copies kept %s", label, recall,
                    correct.mean(), eval_kept)  # fmt: skip
    recall, precision, eval_kept, removed, report = scores["normalized"]
    assert min(recall.values()) >= 0.95 and precision >= 0.99 and eval_kept == [], scores["normalized"][:3]
    assert scores["raw"][0]["colour"] < 0.8 and scores["raw"][2], scores["raw"][:3]  # the test is needed here
    assert {k: recall[k] for k in TRANSFORMS if k != "colour"} == {k: scores["raw"][0][k] for k in TRANSFORMS[:-1]}
    colour = removed[removed["key"].str.startswith(("train_pcolour", "train_ecolour"))]
    by_test = colour.groupby("test").size().to_dict()
    assert by_test.get("normalized_layout", 0) >= 30 and set(by_test) <= {"layout", "normalized_layout"}, by_test
    norm = removed.loc[removed["test"] == "normalized_layout", "layout"]
    assert (norm <= 0.06).all() and (removed.loc[removed["test"] == "layout", "layout"] <= 8.0).all()
    assert removed.loc[removed["test"] == "sha256", "reason"].isin(["exact_duplicate", "eval_exact"]).all()
    assert report["removed_by_test"] == removed.groupby("test").size().to_dict()
    assert report["thresholds"]["normalized_layout_rms"] == 0.06


def test_embedding_descriptor_path(planted, tmp_path):
    torch = pytest.importorskip("torch")
    root, manifest, eval_manifest, groups, _, _ = planted

    class Thumb(torch.nn.Module):  # a toy "copy detector": 8 x 8 mean-centred thumbnail of each channel
        def forward(self, x):
            z = torch.nn.functional.adaptive_avg_pool2d(x, 8).flatten(1)
            return z - z.mean(dim=1, keepdim=True)

    model_path = tmp_path / "thumb.pt"
    with warnings.catch_warnings():  # TorchScript is deprecated in torch 2.14 but is how SSCD is distributed
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.script(Thumb()).save(str(model_path))
    report = deduplicate(
        manifest, [eval_manifest], tmp_path / "dedup", descriptor=str(model_path), eval_similarity_threshold=0.9,
        image_size=64,
    )  # fmt: skip
    removed = pd.read_parquet(tmp_path / "dedup" / "removed.parquet").set_index("key")
    for name in ("resize", "jpeg"):
        for i in range(300 + TRANSFORMS.index(name) * 12, 300 + TRANSFORMS.index(name) * 12 + 12):
            assert removed.at[f"train_e{name}{i:04d}", "reason"] == "eval_near_copy"
            assert removed.at[f"train_e{name}{i:04d}", "distance"] >= 0.9
    eval_removed = removed[removed["reason"].str.startswith("eval")]
    assert all(k.startswith("train_e") for k in eval_removed.index)  # no false eval match
    assert report["descriptor"] == str(model_path)


def test_corrupt_manifest_path_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.parquet"):
        deduplicate(tmp_path / "missing.parquet", [], tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="TorchScript"):
        deduplicate(tmp_path / "missing.parquet", [], tmp_path / "out", descriptor=str(tmp_path / "nope.pt"))


def test_datacard_from_manifests_and_dedup_report(planted, tmp_path):
    root, manifest, _, _, _, report = planted
    extra = pd.read_parquet(manifest)
    failure = {c: None for c in extra.columns} | {"key": "train_x", "status": "failed", "reason": "http_404"}
    extra = pd.concat([extra, pd.DataFrame([failure])], ignore_index=True)
    (tmp_path / "ds").mkdir()
    extra.to_parquet(tmp_path / "ds" / "manifest.parquet")
    text = write_datacard([tmp_path / "ds" / "manifest.parquet"], root / "dedup" / "report.json", tmp_path / "card.md")
    assert (tmp_path / "card.md").read_text() == text
    assert "| ds / train | 510 |" in text and "| http_404 | 1 |" in text
    assert f"| near_duplicate | {report['removed']['near_duplicate']} |" in text
    sizes = extra.loc[extra["status"] == "ok", "width"].astype(float)
    assert f"| min | {sizes.min():.4g} |" in text and f"{sizes.max():.4g}" in text
    assert "| unknown | 510 |" in text  # no license column values in these manifests
