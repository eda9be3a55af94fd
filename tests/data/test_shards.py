"""Shards: atomic publication, tolerant reading, the resumable ShardStream, and the local sources (folder, IN-21K)."""

from __future__ import annotations

import gzip
import hashlib
import io
import itertools
import json
import tarfile

import numpy as np
import pandas as pd
import pytest
import torch
from image_helpers import encode, photo_like

from franca.data.manifest import canonicalise, read_manifest
from franca.data.shards import AtomicTarWriter, ReadStats, ShardStream, ShardWriter, iter_samples, read_shard
from franca.data.sources import ingest_folder, ingest_imagenet21k_tars


def png(value: int) -> bytes:
    return encode(photo_like(np.random.default_rng(value), 1, size=16)[0], "PNG")


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory):
    """5 shards of sizes 7, 7, 7, 7, 3 (31 samples); key s<i> holds label i."""
    root = tmp_path_factory.mktemp("shards")
    images = [png(i) for i in range(4)]
    with ShardWriter(root, "train", shard_size=7) as writer:
        for i in range(31):
            writer.write(f"s{i:03d}", {"png": images[i % 4], "cls": str(i).encode(), "json": b"{}"})
    return sorted(root.glob("train-*.tar"))


def test_atomic_writer_publishes_complete_shards_only(tmp_path):
    target = tmp_path / "train-000000.tar"
    with pytest.raises(RuntimeError):
        with AtomicTarWriter(target) as writer:
            writer.write("a", {"png": png(0)})
            raise RuntimeError("crash mid-shard")
    assert not target.exists() and not list(tmp_path.iterdir())
    for run in range(2):  # deterministic bytes
        with AtomicTarWriter(tmp_path / f"x{run}.tar") as writer:
            writer.write("a", {"png": png(0), "cls": b"3", "seg.png": png(1)})
    assert (tmp_path / "x0.tar").read_bytes() == (tmp_path / "x1.tar").read_bytes()
    sample = read_shard(tmp_path / "x0.tar")[0]
    assert sample["label"] == 3 and sample["seg"].shape == (16, 16, 3) and sample["image"].mode == "RGB"
    with pytest.raises(ValueError, match="invalid sample key"):
        AtomicTarWriter(tmp_path / "y.tar").write("a.b", {"png": b""})


def test_corrupt_shards_and_samples_are_counted_not_fatal(shard_set, tmp_path):
    truncated = tmp_path / "train-900000.tar"
    data = shard_set[0].read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    garbage = tmp_path / "train-900001.tar"
    garbage.write_bytes(b"this is not a tar file" * 50)
    bad_sample = tmp_path / "train-900002.tar"
    with AtomicTarWriter(bad_sample) as writer:
        writer.write("ok", {"png": png(2), "cls": b"1"})
        writer.write("broken", {"png": b"\x89PNG\r\n\x1a\nnot really", "cls": b"2"})
    stats = ReadStats()
    samples = list(iter_samples([truncated, garbage, bad_sample, shard_set[1]], stats=stats))
    assert stats.corrupt_shards == 2 and any(":broken:" in e for e in stats.errors)
    assert stats.corrupt_samples in (1, 2)  # 2 when the cut leaves a sample without its image
    keys = [s["key"] for s in samples]
    assert keys[-8:] == ["ok"] + [f"s{i:03d}" for i in range(7, 14)]
    assert 0 < len(keys) - 8 < 7  # samples before the damage of the truncated shard survive
    stream = ShardStream([truncated, garbage, bad_sample], seed=0)
    got = take(stream, 20)
    assert "broken" not in got and stream.stats.corrupt_shards == 2 and stream.stats.corrupt_samples >= 1


def take(stream, n):
    return [s["key"] for s in itertools.islice(stream, n)]  # islice never pulls an extra sample


def test_stream_epochs_cover_every_sample_once_and_are_seeded(shard_set):
    keys = take(ShardStream(shard_set, seed=3), 31 * 3)
    for epoch in range(3):
        assert sorted(keys[31 * epoch : 31 * (epoch + 1)]) == [f"s{i:03d}" for i in range(31)]
    assert keys[:31] != keys[31:62]  # reshuffled every epoch
    assert take(ShardStream(shard_set, seed=3), 40) == keys[:40]
    assert take(ShardStream(shard_set, seed=4), 40) != keys[:40]
    kept = {f"s{i:03d}" for i in range(0, 31, 2)}
    filtered = take(ShardStream(shard_set, seed=3, kept_keys=kept), 16)
    assert sorted(filtered) == sorted(kept)


@pytest.mark.parametrize("k", [0, 5, 7, 30, 31, 45, 70])
def test_stream_resume_equivalence(shard_set, k):
    stream = ShardStream(shard_set, seed=9)
    full = take(stream, k + 25)
    head = ShardStream(shard_set, seed=9)
    take(head, k)
    assert head.position == k
    resumed = ShardStream(shard_set, seed=9, start_sample=k)
    assert take(resumed, 25) == full[k:]
    assert resumed.position == k + 25


def test_stream_rank_split(shard_set):
    ranks = [take(ShardStream(shard_set, seed=2, rank=r, world_size=2), 200) for r in range(2)]
    # epoch 0: 5 shards padded to 6 by repetition, 3 per rank; every shard is read by some rank
    per_epoch = [ShardStream(shard_set, seed=2, rank=r, world_size=2).epoch_shards(0) for r in range(2)]
    assert len(per_epoch[0]) == len(per_epoch[1]) == 3 and set(per_epoch[0] + per_epoch[1]) == set(range(5))
    assert ranks[0][:10] != ranks[1][:10]
    resumed = take(ShardStream(shard_set, seed=2, rank=1, world_size=2, start_sample=33), 20)
    assert resumed == ranks[1][33:53]


def test_stream_dataloader_workers_match_single_process(shard_set):
    single = take(ShardStream(shard_set, seed=5, start_sample=4), 48)
    stream = ShardStream(shard_set, seed=5, start_sample=4, worker_batch_size=4, transform=lambda s: s["key"])
    loader = torch.utils.data.DataLoader(stream, batch_size=4, num_workers=2, collate_fn=list)
    batched = [key for batch in itertools.islice(loader, 12) for key in batch]
    assert batched == single


def make_folder(root):
    for c, name in enumerate(["zebra", "ant", "cat"]):
        (root / name / "sub").mkdir(parents=True)
        for i in range(3):
            (root / name / ("sub" if i == 2 else "") / f"img{i}.JPEG").write_bytes(
                encode(photo_like(np.random.default_rng(c * 10 + i), 1, 24)[0])
            )
    (root / "ant" / "notes.txt").write_text("ignored")
    (root / "cat" / "broken.png").symlink_to(root / "missing.png")  # unreadable


def test_ingest_folder_then_canonicalise(tmp_path):
    make_folder(tmp_path / "tree")
    summary = ingest_folder(tmp_path / "tree", tmp_path / "raw", shard_size=4, license="test-license")
    assert summary["classes"] == ["ant", "cat", "zebra"] and summary["items"] == 10 and summary["shards"] == 3
    (tmp_path / "raw" / "000001.parquet").unlink()  # an interrupted ingest: shard 1 is rebuilt, the others kept
    again = ingest_folder(tmp_path / "tree", tmp_path / "raw", shard_size=4)
    assert again["shards_skipped"] == 2
    canonicalise({"train": [tmp_path / "raw"]}, tmp_path / "ds")
    manifest = read_manifest(tmp_path / "ds" / "manifest.parquet")
    ok = manifest[manifest["status"] == "ok"]
    assert len(ok) == 9 and manifest.loc[manifest["status"] == "failed", "reason"].tolist() == ["unreadable"]
    expected = {"ant": 0, "cat": 1, "zebra": 2}
    assert all(expected[n] == label for n, label in zip(ok["class_name"], ok["label"], strict=True))
    assert all(s.endswith(".JPEG") and f"/{n}/" in s for s, n in zip(ok["source"], ok["class_name"], strict=True))
    samples = list(iter_samples(sorted((tmp_path / "ds" / "shards").glob("*.tar"))))
    assert [s["label"] for s in samples] == ok["label"].tolist()
    assert samples[0]["meta"]["class_name"] == "ant" and samples[0]["meta"]["license"] == "test-license"


def test_ingest_imagenet21k_tars(tmp_path):
    (tmp_path / "in21k").mkdir()
    payloads = {}
    for synset in ["n02000002", "n01000001"]:
        with tarfile.open(tmp_path / "in21k" / f"{synset}.tar", "w") as tar:
            for i in range(3):
                data = encode(photo_like(np.random.default_rng(i + len(payloads)), 1, 20)[0])
                payloads[(synset, i)] = data
                stored, name = (
                    (gzip.compress(data), f"{synset}_{i}.JPEG.gz") if i == 1 else (data, f"{synset}_{i}.JPEG")
                )
                info = tarfile.TarInfo(name)
                info.size = len(stored)
                tar.addfile(info, io.BytesIO(stored))
    summary = ingest_imagenet21k_tars(tmp_path / "in21k", tmp_path / "raw", shard_size=4)
    assert summary["items"] == 6 and summary["classes"] == 2
    canonicalise([tmp_path / "raw"], tmp_path / "ds")
    manifest = read_manifest(tmp_path / "ds" / "manifest.parquet").set_index("key")
    assert (manifest["status"] == "ok").all() and len(manifest) == 6
    row = manifest.loc["train_n01000001_000001"]  # first synset in sorted order, the gzipped member
    assert row["label"] == 0 and row["class_name"] == "n01000001" and row["source"].endswith("n01000001_1.JPEG.gz")
    assert row["sha256"] == hashlib.sha256(payloads[("n01000001", 1)]).hexdigest()
    meta = json.loads(
        tarfile.open(tmp_path / "ds" / "shards" / "train-000000.tar").extractfile("train_n01000001_000001.json").read()
    )
    assert meta["raw_key"] == "n01000001_000001"  # <synset>_<member index>: stable whatever tars are ingested
    assert pd.Series(manifest["label"]).tolist() == [0, 0, 0, 1, 1, 1]
