"""Dedup precision on real photographs (issue 12): the real-data defaults keep precision >= 0.99 on natural images
with no duplicates, measured on a held-out benchmark of scikit-image's photographs (franca.data.dedup_benchmark),
and the dedup outputs name the class of each removed pair."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from franca.data.dedup_benchmark import config_options, run

CONFIGS = [Path("config/data/imagenet_folder.yaml"), Path("config/data/in21k.yaml")]


@pytest.fixture(scope="module")
def options():
    root = Path(__file__).resolve().parents[2]
    found = [config_options(root / c) for c in CONFIGS]
    assert found[0] == found[1], "the real-data presets should share one set of dedup thresholds"
    return found[0]


@pytest.fixture(scope="module")
def planted(options, tmp_path_factory):
    out = tmp_path_factory.mktemp("dedup_real")
    return out, run(out, options, plant=True, tile=64)


def test_real_data_defaults_keep_photographs_without_duplicates(options, tmp_path):
    scores = run(tmp_path, options, plant=False, tile=64)
    assert scores["n_train"] > 500
    assert scores["clean_removed_fraction"] <= 0.01, scores  # the previous thresholds removed 2.7 % here


def test_real_data_defaults_precision_and_recall_on_planted_copies(planted):
    _, scores = planted
    assert scores["planted"] == 250 and scores["precision"] >= 0.99 and scores["recall"] >= 0.9, scores


def test_removed_pairs_carry_their_classes(planted):
    out, scores = planted
    removed = pd.read_parquet(out / "dedup" / "removed.parquet")
    assert len(removed) == scores["removed"] and removed["class_name"].notna().all()
    assert removed["matched_class_name"].notna().all()
    by_class = json.loads((out / "dedup" / "report.json").read_text())["removed_pairs_by_class"]
    same = int((removed["class_name"] == removed["matched_class_name"]).sum())
    assert by_class["same_class"] == same and by_class["cross_class"] == len(removed) - same
    assert sum(by_class["removed_per_class"].values()) == len(removed)
    assert same >= len(removed) - 2  # planted copies sit in their original's class folder
