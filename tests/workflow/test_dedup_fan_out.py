"""The dedup fan-out rules (workflow/rules/dedup.smk, issue 17 item 4) run for real on the tiny data: eval index,
dedup_unit, dedup_bands, 8 dedup_block jobs and the reduce keep the same images as the one-job dedup, and a block
job refuses a unit band index that changed after `dedup_bands` listed it. A fifth of the tiny set (400 train images,
with its planted copies) keeps the test at about a minute."""

from __future__ import annotations

import json
import os
import re
import subprocess

import numpy as np
import pytest
import yaml
from repo_copy import BIN, copy_repo, run

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]
TARGET = "data/dedup/synth/kept.txt"
SMALL = ["data.datasets.synth.n_train=400", "data.datasets.synth.n_val=50", "data.datasets.synth.n_test=50"]
FAN_OUT = "+data.dedup.fan_out={bands: 4, block_bits: 1}"


def _config(tmp_path, name: str, overrides: list[str]):
    config = {
        "preset": "tiny",
        "experiments": {"franca": {"seeds": [0], "highres": False, "rasa": False}},
        "overrides": overrides,
        "dvc": {"commit_on_success": False, "push_on_success": False},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return ["--configfile", str(path), "--replace-workflow-config"]


def test_fan_out_rules_keep_what_the_one_job_dedup_keeps(tmp_path):
    repo = copy_repo(tmp_path / "repo")
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "FRANCA_TRACKING": "off"}
    snakemake = ["snakemake", "--cores", "2", "--profile", "workflow/profiles/local", TARGET]
    run([*snakemake, *_config(tmp_path, "one", SMALL)], repo, env, 900)
    one_job = (repo / TARGET).read_text()
    removed = json.loads((repo / "data/dedup/synth/report.json").read_text())["removed"]
    assert min(removed.get(k, 0) for k in ("exact_duplicate", "near_duplicate", "eval_near_copy")) > 0, removed

    log = run([*snakemake, *_config(tmp_path, "fan", [*SMALL, FAN_OUT])], repo, env, 900).stderr
    ran = {m: len(re.findall(rf"^localrule {m}:|^rule {m}:", log, re.M)) for m in ("dedup_unit", "dedup_block")}
    assert ran == {"dedup_unit": 1, "dedup_block": 8}, ran
    assert (repo / TARGET).read_text() == one_job and one_job.count("\n") > 350
    assert json.loads((repo / "data/dedup/synth/report.json").read_text())["removed"] == removed
    fan = repo / "data/dedup/synth/fan_out"
    index = json.loads((fan / "bands.json").read_text())
    assert sorted(index) == [f"data/dedup/synth/fan_out/units/u000000/{n}" for n in ("bands.npy", "offsets.npy")]
    block_record = json.loads((fan / "blocks/b0-p0.provenance.json").read_text())
    assert list(block_record["inputs"]) == ["data/dedup/synth/fan_out/bands.json"]  # one input, which names the rest

    # a unit's band index rewritten after dedup_bands: the block job's logged command now refuses to run
    command = re.search(r"INFO franca: command: (.*)$", (repo / "logs/dedup/synth/blocks/b0-p0.log").read_text(), re.M)
    bands = fan / "units/u000000/bands.npy"
    values = np.load(bands)
    bands.unlink()  # DVC-style read-only outputs: write a new file
    np.save(bands, values[::-1].copy())
    redo = command.group(1).replace(str(fan / "blocks/b0-p0.parquet"), str(tmp_path / "b0-p0.parquet"))
    redo = redo.replace("data/dedup/synth/fan_out/blocks/b0-p0.parquet", str(tmp_path / "b0-p0.parquet"))
    done = subprocess.run(["bash", "-c", redo], cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "u000000/bands.npy changed after" in done.stderr, done.stderr[-2000:]
    assert not (tmp_path / "b0-p0.parquet").exists()
