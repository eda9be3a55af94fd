"""Deduplication: multi-index hashing against brute force, planted duplicates (recall / precision), eval copies."""

from __future__ import annotations

import json
import logging
import warnings

import numpy as np
import pandas as pd
import pytest
from conftest import encode, photo_like
from PIL import Image

from franca.data.datacard import write_datacard
from franca.data.dedup import deduplicate, greedy_removal, near_duplicate_pairs
from franca.data.manifest import image_record, make_manifest, write_parquet_atomic
from franca.data.phash import hamming, phash_gray
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
