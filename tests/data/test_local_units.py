"""Local sources cut into work units (issue 17): a folder by sorted path ranges of ``unit_rows`` files, ImageNet-21K
one unit per synset tar. Run through the `franca data fetch` / `shard` / `gather` stage commands per unit (as the
workflow runs them), the union of the units is the whole-tree ingest row for row: keys, labels, status, split and
the held-out choice do not depend on the cut.
"""

from __future__ import annotations

import io
import json
import tarfile

import pandas as pd
import pytest
from test_folder_holdout import SIZES, configs, make_tree

from franca import cli
from franca import config as fc
from franca.data.manifest import read_manifest
from franca.data.sources import holdout_split, list_folder
from franca.data.units import list_units

COLUMNS = ["key", "split", "status", "reason", "label", "class_name", "source", "sha256"]


def rows(manifest) -> pd.DataFrame:
    frame = read_manifest(manifest)[COLUMNS].astype({"label": "Int64"})
    # a row that fails at shard time (undecodable bytes) names its raw shard: <run>/raw[/<unit>]/<split>/...
    frame["source"] = frame["source"].str.replace(r"^\w+/raw/(u\d{6}/)?", "raw/", regex=True)
    return frame.sort_values("key").reset_index(drop=True)


def run_units(cfg: str, dataset: str, units: list[dict], tag: str) -> pd.DataFrame:
    """fetch + shard of every unit, then gather: the rows of the dataset's partitioned manifest."""
    path = fc.write_slice(f"config/units/{tag}.json", units)
    common = ["--config", cfg, "--threads", "1", "--dataset", dataset]
    for u in units:
        unit = ["--units", str(path), "--unit", u["unit"]]
        raw, out = f"{tag}/raw/{u['unit']}", f"{tag}/units/{u['unit']}"
        assert cli.main(["data", "fetch", *common, *unit, "--out", raw]) == 0
        assert cli.main(["data", "shard", *common, *unit, "--raw", raw, "--out", out]) == 0
    dirs = [f"{tag}/units/{u['unit']}" for u in units]
    assert cli.main(["data", "gather", "--config", cfg, "--threads", "1", "--dataset", dataset, "--unit-dirs", *dirs,
                     "--out", tag]) == 0  # fmt: skip
    return rows(f"{tag}/manifest")


def run_whole(cfg: str, dataset: str, tag: str) -> pd.DataFrame:
    """Today's whole-tree ingest (no units): one fetch, one shard."""
    common = ["--config", cfg, "--threads", "1", "--dataset", dataset]
    assert cli.main(["data", "fetch", *common, "--out", f"{tag}/raw"]) == 0
    assert cli.main(["data", "shard", *common, "--raw", f"{tag}/raw", "--out", tag]) == 0
    return rows(f"{tag}/manifest.parquet")


def test_folder_cut_into_path_ranges_gives_the_whole_tree(tmp_path, monkeypatch):
    make_tree(tmp_path / "tree")
    (tmp_path / "tree" / "coffee" / "img_03.jpg").write_bytes(b"not a jpeg")  # a failure row, kept in its unit
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FRANCA_TRACKING", "off")
    holdout = "+data.datasets.in_train.holdout={split: val, fraction: 0.3, seed: 0}"
    dense = "data.dense={dataset: in_train, train: train, val: val, n_classes: 4}"
    cfg = configs(
        tmp_path, [holdout, dense, "+data.datasets.in_train.unit_rows=6", "data.datasets.in_train.shard_size=4"]
    )
    ds = fc.read_slice(cfg["data/in_train"])
    units = list_units(ds)
    n = sum(SIZES.values())
    assert [(u["kind"], u["start"], u["stop"]) for u in units] == [
        ("folder", 0, 6),
        ("folder", 6, 12),
        ("folder", 12, n),
    ]
    assert list_units(ds) == units  # stable: the same tree gives the same cut
    one = [{**units[0], "stop": n}]  # the one-unit run of the same tree
    cut, whole = (
        run_units(cfg["data/in_train"], "in_train", units, "cut"),
        run_whole(cfg["data/in_train"], "in_train", "all"),
    )
    single = run_units(cfg["data/in_train"], "in_train", one, "one")
    pd.testing.assert_frame_equal(cut, whole)
    pd.testing.assert_frame_equal(single, whole)
    assert cut["key"].is_unique and len(cut) == n
    failed = cut.loc[cut["status"] == "failed"]  # the 10-byte "jpeg": one failure row (held out, in unit 1)
    assert failed[["split", "reason"]].values.tolist() == [["val", "not_an_image"]]
    expected = holdout_split(list_folder(tmp_path / "tree")[0], tmp_path / "tree", 0.3, seed=0)[1]  # whole tree
    bad = str(tmp_path / "tree" / "coffee" / "img_03.jpg")
    assert set(cut.loc[(cut["split"] == "val") & (cut["status"] == "ok"), "source"]) == {
        x["source"] for x in expected if x["source"] != bad
    } and bad in {x["source"] for x in expected}
    ok = cut[cut["status"] == "ok"]  # labels from the global sorted class list, in every unit
    assert dict(zip(ok["class_name"], ok["label"], strict=True)) == {"astronaut": 0, "cat": 1, "coffee": 2, "rocket": 3}
    # every unit holds only its own files (its range of the sorted listing), rows accounted once
    per_unit = [read_manifest(f"cut/units/{u['unit']}/manifest.parquet") for u in units]
    assert [len(m) for m in per_unit] == [6, 6, n - 12]
    inputs = json.loads((tmp_path / "cut" / "raw" / "u000001" / "provenance.json").read_text())["inputs"]
    listed = [x["source"] for x in list_folder(tmp_path / "tree")[0][6:12]]  # provenance hashes the unit's files only
    assert sorted(k for k in inputs if k.startswith("tree/")) == sorted(s.split(f"{tmp_path}/")[1] for s in listed)
    (tmp_path / "tree" / "cat" / "img_50.jpg").write_bytes((tmp_path / "tree" / "cat" / "img_00.jpg").read_bytes())
    assert list_units(ds)[0]["listing"] != units[0]["listing"]  # a new file re-cuts the tree (dir mtime)
    path = fc.write_slice("config/units/stale.json", units)
    args = ["--config", cfg["data/in_train"], "--threads", "1", "--dataset", "in_train", "--units", str(path)]
    with pytest.raises(ValueError, match="changed since its unit list"):  # an old listing's range: never ingested
        cli.main(["data", "fetch", *args, "--unit", "u000001", "--out", "stale/raw/u000001"])


def write_tar(path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_in21k_one_unit_per_tar_gives_the_whole_tree(tmp_path, monkeypatch):
    make_tree(tmp_path / "tree")
    (tmp_path / "in21k").mkdir()
    for synset, name in [("n03000003", "rocket"), ("n01000001", "cat"), ("n02000002", "coffee")]:
        files = sorted((tmp_path / "tree" / name).iterdir())
        write_tar(tmp_path / "in21k" / f"{synset}.tar", {f"{synset}_{f.stem}.JPEG": f.read_bytes() for f in files})
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FRANCA_TRACKING", "off")
    spec = f"{{source: in21k_tars, root: {tmp_path / 'in21k'}, shard_size: 3, license: test}}"
    cfg = fc.compose(
        "small", "franca", 0, ("data.datasets.in_train.root=" + str(tmp_path / "tree"), f"+data.datasets.w21={spec}")
    )
    fc.validate(cfg)
    ds = fc.dataset_job_config(cfg, "w21")
    path = str(fc.write_slice("config/data/w21.json", ds))
    units = list_units(ds)
    assert [u["tars"] for u in units] == [["n01000001.tar"], ["n02000002.tar"], ["n03000003.tar"]]
    cut, whole = run_units(path, "w21", units, "cut"), run_whole(path, "w21", "all")
    pd.testing.assert_frame_equal(cut, whole)
    n = SIZES["cat"] + SIZES["coffee"] + SIZES["rocket"]
    assert len(cut) == n and cut["key"].is_unique and (cut["status"] == "ok").all()
    assert cut.groupby("class_name")["label"].unique().map(list).to_dict() == {
        "n01000001": [0], "n02000002": [1], "n03000003": [2]
    }  # fmt: skip
    assert "train_n02000002_000004" in set(cut["key"])  # <synset>_<member index>: the same whatever tars run with it
    grouped = list_units({**ds, "unit_tars": 2})
    assert [u["tars"] for u in grouped] == [["n01000001.tar", "n02000002.tar"], ["n03000003.tar"]]
    pd.testing.assert_frame_equal(run_units(path, "w21", grouped, "grouped"), whole)
    json.dumps(units)  # the unit list is plain JSON (written content-addressed by the workflow)
