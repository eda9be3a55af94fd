"""A folder dataset names a held-out split (``holdout``) and caps each file's bytes (``max_bytes``), issue 12.

Checked on scikit-image's photographs cut into tiles, in class folders sorted as real folders are, through the
`franca data fetch` / `shard` stage commands and their config files (the way the workflow runs them).
"""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from skimage import data as skdata

from franca import cli
from franca import config as fc
from franca.data.manifest import read_manifest
from franca.data.sources import holdout_split, ingest_folder, list_folder

PHOTOS = {"cat": skdata.chelsea, "coffee": skdata.coffee, "rocket": skdata.rocket, "astronaut": skdata.astronaut}
SIZES = {"cat": 7, "coffee": 5, "rocket": 4, "astronaut": 1}  # unequal classes, one of a single image


def make_tree(root, tile: int = 48) -> None:
    for name, n in SIZES.items():
        photo = np.asarray(PHOTOS[name]())[..., :3]
        (root / name).mkdir(parents=True)
        for i in range(n):  # tiles along the diagonal: distinct real image content per file
            y, x = (i * 29) % (photo.shape[0] - tile), (i * 41) % (photo.shape[1] - tile)
            Image.fromarray(photo[y : y + tile, x : x + tile]).save(root / name / f"img_{i:02d}.jpg", quality=92)


def configs(tmp_path, overrides: list[str]) -> dict[str, str]:
    cfg = fc.compose("small", "franca", 0, ("data.datasets.in_train.root=" + str(tmp_path / "tree"), *overrides))
    fc.validate(cfg)
    files = fc.job_files(cfg, tmp_path / "config", "franca", 0)
    return {
        str(p.relative_to(tmp_path / "config").with_suffix("")): str(fc.write_slice(p, o)) for p, o in files.items()
    }


def test_holdout_is_disjoint_stratified_and_stable(tmp_path):
    make_tree(tmp_path / "tree")
    items, _ = list_folder(tmp_path / "tree")
    kept, held = holdout_split(items, tmp_path / "tree", 0.25, seed=3)
    names = lambda xs: [x["source"].split("tree/")[1] for x in xs]  # noqa: E731
    assert not set(names(kept)) & set(names(held)) and len(kept) + len(held) == len(items)
    per_class = {c: sum(x["class_name"] == c for x in held) for c in SIZES}
    assert per_class == {"cat": 2, "coffee": 1, "rocket": 1, "astronaut": 0}  # round(0.25 n), >= 1, never all
    assert names(kept) == sorted(names(kept)) and names(held) == sorted(names(held))  # folder order kept
    shutil.copytree(tmp_path / "tree", tmp_path / "moved" / "tree")  # same tree elsewhere: same choice
    moved, _ = list_folder(tmp_path / "moved" / "tree")
    assert names(holdout_split(moved, tmp_path / "moved" / "tree", 0.25, seed=3)[1]) == names(held)
    assert names(holdout_split(items, tmp_path / "tree", 0.25, seed=4)[1]) != names(held)  # the seed decides


def test_folder_dataset_gives_a_held_out_split_through_the_stages(tmp_path, monkeypatch):
    make_tree(tmp_path / "tree")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FRANCA_TRACKING", "off")
    holdout = "+data.datasets.in_train.holdout={split: val, fraction: 0.3, seed: 0}"
    cfg = configs(tmp_path, [holdout, "data.dense={dataset: in_train, train: train, val: val, n_classes: 4}"])
    args = ["--config", cfg["data/in_train"], "--threads", "1", "--dataset", "in_train"]
    assert cli.main(["data", "fetch", *args, "--out", "data/in_train/raw"]) == 0
    assert cli.main(["data", "shard", *args, "--raw", "data/in_train/raw", "--out", "data/in_train"]) == 0
    ok = read_manifest(tmp_path / "data" / "in_train" / "manifest.parquet").query("status == 'ok'")
    sources = {s: set(ok.loc[ok["split"] == s, "source"]) for s in ("train", "val")}
    assert len(sources["train"]) + len(sources["val"]) == sum(SIZES.values()) and not sources["train"] & sources["val"]
    assert ok.loc[ok["split"] == "val", "class_name"].value_counts().to_dict() == {"cat": 2, "coffee": 2, "rocket": 1}
    with pytest.raises(fc.ConfigError, match="holdout"):  # "train" cannot be the held-out split's name
        configs(tmp_path, ["+data.datasets.in_train.holdout={split: train, fraction: 0.3}"])


def test_file_over_max_bytes_is_a_failure_row_and_the_rest_ingest(tmp_path):
    make_tree(tmp_path / "tree")
    big = tmp_path / "tree" / "coffee" / "img_99.jpg"
    big.write_bytes((tmp_path / "tree" / "coffee" / "img_00.jpg").read_bytes() + b"\0" * 50_000)
    summary = ingest_folder(tmp_path / "tree", tmp_path / "raw", shard_size=8, max_bytes=40_000)
    status = pd.concat([pd.read_parquet(p) for p in sorted((tmp_path / "raw").glob("*.parquet"))])
    failed = status[status["status"] == "failed"]
    assert failed["source"].tolist() == [str(big)] and failed["reason"].tolist() == ["too_large"]
    assert "max_bytes 40000" in failed["error_message"].iloc[0]
    assert summary["items"] == sum(SIZES.values()) + 1 and (status["status"] == "success").sum() == sum(SIZES.values())
