"""Each experiment's own config decides its data: a second experiment whose `data.pretrain.dataset` differs from the
first one's is fetched, deduplicated and trained on its own dataset (a real Snakemake run in a repository copy)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import repo_copy
import yaml
from repo_copy import BIN, copy_repo

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

SYNTH_B = "{source:synth,license:CC0-1.0,seed:99,image_size:64,n_classes:8,n_train:120,n_val:24,n_test:24,position_bias:0.8,shard_size:60}"  # noqa: E501
FAST = ["optim.iterations=3", "optim.warmup_iters=1", "data.datasets.synth.n_train=120", "data.datasets.synth.n_val=24",
        "data.datasets.synth.n_test=24", "data.datasets.synth.shard_size=60", "train.batch_size_per_gpu=8"]  # fmt: skip


def test_second_experiment_fetches_dedups_and_trains_on_its_own_dataset(tmp_path):
    repo = copy_repo(tmp_path / "repo")
    own = [f"+data.datasets.synth_b={SYNTH_B}", "data.pretrain.dataset=synth_b", "data.dedup.train=synth_b:train"]
    config = {
        "preset": "tiny",
        "overrides": FAST,
        "experiments": {
            "franca": {"seeds": [0], "highres": False, "rasa": False},
            "dinov2": {"seeds": [0], "highres": False, "rasa": False, "overrides": own},
        },
    }
    (repo / "two.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    targets = [f"results/pretrain/{exp}/s0/stage1/checkpoint.pt" for exp in ("franca", "dinov2")]
    cmd = ["snakemake", "--cores", "2", *targets, "--configfile=two.yaml", "--replace-workflow-config"]
    repo_copy.run(cmd, repo, env, timeout=1500)

    for exp, dataset in (("franca", "synth"), ("dinov2", "synth_b")):
        record = json.loads((repo / f"results/pretrain/{exp}/s0/stage1/provenance.json").read_text())
        inputs = set(record["inputs"])
        assert f"data/dedup/{dataset}/kept.txt" in inputs, sorted(inputs)
        shards = {p for p in inputs if p.endswith(".tar")}
        # recorded under the dataset handle's names (gather's links; DVC's commit turns them into hardlinks to its
        # cache), which are the files of its one work unit
        assert shards and all(p.startswith(f"data/{dataset}/shards/") for p in shards), sorted(shards)
        unit = repo / f"data/{dataset}/units/u000000"
        assert all(os.path.samefile(repo / p, unit / "shards" / Path(p).name) for p in shards), sorted(shards)
        dedup = json.loads((repo / f"data/dedup/{dataset}/provenance.json").read_text())
        handle = f"data/{dataset}/manifest/u000000.parquet"
        assert handle in dedup["inputs"] and os.path.samefile(repo / handle, unit / "manifest.parquet"), dedup["inputs"]
    fetched = json.loads((repo / "data/synth_b/raw/u000000/provenance.json").read_text())
    assert fetched["config"]["seed"] == 99 and fetched["config"]["n_train"] == 120
