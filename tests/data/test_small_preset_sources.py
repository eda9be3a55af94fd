"""The `small` preset's local sources (issue 4/5): a VOC-style segmentation tree (`folder_seg`), ImageNet-style
class folders with a shared label mapping, and the classification splits read from `val_dataset`.

Everything runs through the real stage commands (`franca data fetch | shard`, `franca features`) on tiny trees in
tmp_path, with the `small` preset and overrides pointing its roots there.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pandas as pd
import pytest
import torch
from image_helpers import encode, photo_like
from PIL import Image

from franca import cli
from franca import config as fc
from franca.data.manifest import read_manifest
from franca.data.shards import iter_raw_samples, iter_samples
from franca.data.sources import SourceItemError, ingest_folder_seg, voc_mask_to_seg

W, H = 40, 30  # image and mask size (PIL: width, height)
TRAIN_IDS = ["2007_000032", "2007_000039", "2007_000063", "2008_000008"]  # 2007_000063 has no mask
VAL_IDS = ["2007_000033", "2007_000042", "2009_000001"]  # 2009_000001's JPEG is not an image
CLASSES = {"2007_000032": (1, 15), "2007_000039": (20,), "2008_000008": (7, 1), "2007_000033": (15,)}
CLASSES["2007_000042"] = ()  # background and border only


def voc_palette() -> list[int]:
    """The PASCAL VOC colour map (bit-interleaved class index -> RGB), 256 * 3 values."""
    palette = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette += [r, g, b]
    return palette


def palette_png(mask: np.ndarray) -> Image.Image:
    """A mode-P image whose palette indices are the class ids, shown in VOC's colours (as SegmentationClass/)."""
    image = Image.frombytes("P", (mask.shape[1], mask.shape[0]), mask.tobytes())
    image.putpalette(voc_palette())
    return image


def voc_mask(classes: tuple[int, ...], seed: int) -> np.ndarray:
    """(H, W) uint8: background 0, one rectangle per class, each outlined by a 1-pixel 255 (void) border."""
    rng = np.random.default_rng(seed)
    mask = np.zeros((H, W), dtype=np.uint8)
    for c in classes:
        x0, y0 = int(rng.integers(1, W // 2)), int(rng.integers(1, H // 2))
        x1, y1 = x0 + int(rng.integers(8, W // 2)), y0 + int(rng.integers(6, H // 2))
        mask[y0 - 1 : y1 + 1, x0 - 1 : x1 + 1] = 255
        mask[y0:y1, x0:x1] = c
    mask[0, :] = 255  # a border row as VOC's image edges sometimes have
    return mask


def make_voc_tree(root) -> dict[str, np.ndarray]:
    """A VOC 2012 layout; returns the written masks by id (what the shards must hold after the mapping)."""
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True)
    images = photo_like(np.random.default_rng(3), len(TRAIN_IDS) + len(VAL_IDS), size=W)
    masks = {}
    for i, image_id in enumerate(TRAIN_IDS + VAL_IDS):
        jpeg = encode(images[i].crop((0, 0, W, H)), "JPEG", quality=90)
        (root / "JPEGImages" / f"{image_id}.jpg").write_bytes(b"not a jpeg" if image_id == "2009_000001" else jpeg)
        if image_id == "2007_000063":
            continue
        masks[image_id] = voc_mask(CLASSES.get(image_id, (3,)), seed=i)
        palette_png(masks[image_id]).save(root / "SegmentationClass" / f"{image_id}.png")
    lists = root / "ImageSets" / "Segmentation"
    (lists / "train.txt").write_text("\n".join(reversed(TRAIN_IDS)) + "\n")  # unsorted on purpose
    (lists / "val.txt").write_text("\n".join(VAL_IDS) + "\n")
    return masks


def make_class_folders(root) -> dict[str, list[tuple[str, int]]]:
    """ImageNet-style train (3 classes x 2) and val (2 of the 3 classes x 2) trees; (file name, label) per split."""
    rng, expected = np.random.default_rng(11), {"train": [], "val": []}
    names = ["n01440764", "n01443537", "n01484850"]
    for split, classes in (("train", names), ("val", [names[0], names[2]])):
        for name in classes:
            (root / split / name).mkdir(parents=True)
            for j, image in enumerate(photo_like(rng, 2, size=W)):
                (root / split / name / f"{name}_{j}.JPEG").write_bytes(encode(image, "JPEG", quality=90))
                expected[split].append((f"{name}_{j}.JPEG", names.index(name)))
    return expected


def small_overrides(tmp_path) -> list[str]:
    roots = {"in_train": tmp_path / "imagenet" / "train", "in_val": tmp_path / "imagenet" / "val"}
    roots["voc"] = tmp_path / "VOC2012"
    out = [f"data.datasets.{name}.root={root}" for name, root in roots.items()]
    return out + ["data.datasets.voc.shard_size=2", "eval.img_size=16", "eval.batch_size=4"]


def job_configs(root, overrides: list[str]) -> dict[str, str]:
    """What `franca config` writes for the small preset: {job name (e.g. "data/voc", "franca/s0/features"): file}."""
    cfg = fc.compose("small", "franca", 0, tuple(overrides))
    fc.validate(cfg)
    files = fc.job_files(cfg, root / "config", "franca", 0)
    return {
        str(p.relative_to(root / "config").with_suffix("")): str(fc.write_slice(p, obj)) for p, obj in files.items()
    }


def stage(*argv: str, config: str) -> None:
    assert cli.main([*argv, "--config", config, "--threads", "1"]) == 0


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    """The three `small` datasets fetched and sharded by the stage commands into <tmp>/data/<name>/."""
    tmp = tmp_path_factory.mktemp("small")
    masks, folders = make_voc_tree(tmp / "VOC2012"), make_class_folders(tmp / "imagenet")
    overrides = small_overrides(tmp)
    configs = job_configs(tmp, overrides)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FRANCA_TRACKING", "off")
        for name in ("in_train", "in_val", "voc"):
            raw, cfg = str(tmp / "data" / name / "raw"), configs[f"data/{name}"]
            stage("data", "fetch", "--dataset", name, "--out", raw, config=cfg)
            stage("data", "shard", "--dataset", name, "--raw", raw, "--out", str(tmp / "data" / name), config=cfg)
    return {"root": tmp, "masks": masks, "folders": folders, "overrides": overrides}


def test_voc_mask_values_kept_and_palette_dropped():
    mask = np.array([[0, 1, 20], [255, 15, 0]], dtype=np.uint8)
    png = palette_png(mask)
    rgb = png.convert("RGB")  # VOC's colours: tvmonitor (20) and person (15)
    assert png.mode == "P" and rgb.getpixel((2, 0)) == (0, 64, 128) and rgb.getpixel((1, 1)) == (192, 128, 128)
    seg = voc_mask_to_seg(png, num_classes=21)
    assert seg.dtype == np.uint8 and np.array_equal(seg, mask)  # VOC's 0..20 + 255 is the eval convention
    with pytest.raises(SourceItemError, match=r"\[21\]"):  # 21 is not a VOC class and not the ignore value
        voc_mask_to_seg(Image.fromarray(np.array([[0, 21]], dtype=np.uint8)), num_classes=21)
    with pytest.raises(SourceItemError, match="RGB"):  # a colour-coded mask is not a class map
        voc_mask_to_seg(png.convert("RGB"), num_classes=21)


def test_folder_seg_raw_status_and_resume(tmp_path):
    make_voc_tree(tmp_path / "voc")
    summary = ingest_folder_seg(tmp_path / "voc", tmp_path / "raw", shard_size=3)
    assert summary["splits"]["train"]["items"] == 4 and summary["splits"]["val"]["items"] == 3
    status = pd.read_parquet(tmp_path / "raw" / "train" / "000000.parquet")
    assert status["source"].str.rsplit("/", n=1).str[-1].tolist() == [f"{i}.jpg" for i in sorted(TRAIN_IDS)[:3]]
    assert status["status"].tolist() == ["success", "success", "failed"]
    assert status["reason"].tolist()[2] == "missing_mask" and "2007_000063.png" in status["error_message"][2]
    members = dict(iter_raw_samples(tmp_path / "raw" / "train" / "000000.tar"))
    assert sorted(members["000000000"]) == ["jpg", "json", "seg.png"]  # no label: no .cls
    (tmp_path / "raw" / "val" / "000000.parquet").unlink()  # an interrupted ingest redoes only that shard
    again = ingest_folder_seg(tmp_path / "voc", tmp_path / "raw", shard_size=3)
    assert again["splits"]["train"]["shards_skipped"] == 2 and again["splits"]["val"]["shards_skipped"] == 0
    with pytest.raises(FileNotFoundError, match="test.txt"):
        ingest_folder_seg(tmp_path / "voc", tmp_path / "raw2", splits=["test"])


def test_voc_shards_hold_every_sample_with_its_mask(small_data):
    root, masks = small_data["root"], small_data["masks"]
    manifest = read_manifest(root / "data" / "voc" / "manifest.parquet")
    ok = manifest[manifest["status"] == "ok"]
    ids = {split: sorted(TRAIN_IDS if split == "train" else VAL_IDS) for split in ("train", "val")}
    for split in ("train", "val"):
        samples = list(iter_samples(sorted((root / "data" / "voc" / "shards").glob(f"{split}-*.tar"))))
        expected = [i for i in ids[split] if i in masks and i != "2009_000001"]
        assert [s["meta"]["id"] for s in samples] == expected
        assert ok.loc[ok["split"] == split, "key"].tolist() == [s["key"] for s in samples]
        for sample in samples:
            image_id = sample["meta"]["id"]
            assert np.array_equal(sample["seg"], masks[image_id]) and sample["seg"].dtype == np.uint8
            assert sample["image"].size == (W, H) and sample["label"] is None
            jpeg = (root / "VOC2012" / "JPEGImages" / f"{image_id}.jpg").read_bytes()
            assert np.array_equal(np.asarray(sample["image"]), np.asarray(Image.open(io.BytesIO(jpeg))))
    failed = manifest[manifest["status"] == "failed"].set_index("key")
    assert sorted(zip(failed["split"], failed["reason"], strict=True)) == [
        ("train", "missing_mask"),
        ("val", "unreadable"),
    ]
    assert failed["source"].str.endswith(("2007_000063.jpg", "2009_000001.jpg")).all()
    assert ok["license"].eq("VOC terms").all() and ok["label"].isna().all()


def test_val_folder_uses_the_train_label_mapping(small_data):
    root, folders = small_data["root"], small_data["folders"]
    for name, split in (("in_train", "train"), ("in_val", "val")):
        ok = read_manifest(root / "data" / name / "manifest.parquet").query("status == 'ok'")
        got = sorted(zip(ok["source"].str.rsplit("/", n=1).str[-1], ok["label"].astype(int), strict=True))
        assert got == sorted(folders[split])  # val's n01484850 keeps label 2 although val has only 2 folders


def test_small_classification_reads_val_dataset():
    cfg = fc.compose("small", "franca")
    assert fc.classification_sources(cfg) == {
        "train": ("in_train", "train"),
        "val": ("in_val", "train"),
        "test": ("in_val", "train"),
    }
    assert fc.eval_datasets(cfg) == ["in_train", "in_val", "voc"]
    tiny = fc.compose("tiny", "franca")  # no val_dataset: every split from the one dataset
    assert fc.classification_sources(tiny) == {
        "train": ("synth", "train"),
        "val": ("synth", "val"),
        "test": ("synth", "test"),
    }
    with pytest.raises(fc.ConfigError, match="in_vall"):
        fc.used_datasets(fc.compose("small", "franca", overrides=("data.classification.val_dataset=in_vall",)))


SHARDS = [f"--shards={name}=data/{name}/shards" for name in ("in_train", "in_val", "voc")]


def test_capped_sets_keep_every_class(small_data, monkeypatch, ckpt_file):
    """eval.max_*_images caps sample by class with a fixed seed: the class-sorted folder shards keep every class
    (the first 3 images would be classes 0 and 1 only)."""
    monkeypatch.chdir(small_data["root"])
    monkeypatch.setenv("FRANCA_TRACKING", "off")
    caps = ["eval.max_train_images=3", "eval.max_eval_images=2"]
    config = job_configs(small_data["root"], [*small_data["overrides"], *caps])["franca/s0/features"]
    stage("features", "--checkpoint", str(ckpt_file), *SHARDS, "--out", "capped", config=config)
    feats = torch.load(small_data["root"] / "capped" / "features.pt", weights_only=True)
    assert sorted(feats["linear"]["train"]["labels"].tolist()) == [0, 1, 2]
    assert sorted(feats["linear"]["val"]["labels"].tolist()) == [0, 2]
    assert feats["caps"]["applied"]["in_train:train (classification)"] == {"used": 3, "available": 6}
    # the eval JSON carries the caps to the page (which prints them under its tables)
    eval_config = job_configs(small_data["root"], [*small_data["overrides"], *caps])["franca/s0/eval"]
    stage("eval", "knn", "--features", "capped/features.pt", "--out-dir", "capped/eval", config=eval_config)
    result = json.loads((small_data["root"] / "capped" / "eval" / "knn.json").read_text())
    assert result["caps"] == {"applied": feats["caps"]["applied"], "seed": 0}


@pytest.fixture
def ckpt_file(small_data):
    from franca.models.vision_transformer import build_backbone
    from franca.train.checkpoint import FORMAT_TAG

    torch.manual_seed(0)
    model_cfg = fc.compose("tiny", "franca")["model"]
    backbone = build_backbone(model_cfg)
    ckpt = small_data["root"] / "ckpt.pt"
    teacher = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
    torch.save({"format": FORMAT_TAG, "teacher": teacher, "config": {"model": model_cfg}}, ckpt)
    return ckpt


def test_features_stage_takes_val_and_test_from_val_dataset(small_data, monkeypatch, ckpt_file):
    ckpt = ckpt_file
    monkeypatch.chdir(small_data["root"])
    monkeypatch.setenv("FRANCA_TRACKING", "off")
    config = job_configs(small_data["root"], small_data["overrides"])["franca/s0/features"]
    stage("features", "--checkpoint", str(ckpt), *SHARDS, "--out", "feats", config=config)
    feats = torch.load(small_data["root"] / "feats" / "features.pt", weights_only=True)
    folders = small_data["folders"]
    train_labels, val_labels = (sorted(label for _, label in folders[s]) for s in ("train", "val"))
    assert sorted(feats["linear"]["train"]["labels"].tolist()) == train_labels == [0, 0, 1, 1, 2, 2]
    assert sorted(feats["linear"]["val"]["labels"].tolist()) == val_labels == [0, 0, 2, 2]
    assert "test" not in feats["linear"]  # the same images as val: not reported again
    assert feats["linear_sources"] == {
        "train": ["in_train", "train"],
        "val": ["in_val", "train"],
        "test": ["in_val", "train"],
    }
    assert feats["num_classes"] == 21 and feats["dense"]["train"]["segs"].shape == (3, 16, 16)
    assert feats["dense"]["val"]["segs"].shape[0] == 2
    assert set(feats["dense"]["train"]["segs"].unique().tolist()) <= {0, 1, 7, 15, 20, 255}
