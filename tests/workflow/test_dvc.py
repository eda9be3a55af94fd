"""The DVC ledger of the repository (dvc.yaml, .dvc/config, .dvcignore) on a real DVC repo: what `dvc commit` after a
workflow run tracks, and that the cache holds links, not a second copy of the data."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from franca import workflow_hooks

REPO = Path(__file__).resolve().parents[2]


def _reflink_supported(directory: Path) -> bool:
    (directory / "probe").write_bytes(b"x")
    result = subprocess.run(["cp", "--reflink=always", "probe", "probe2"], cwd=directory, capture_output=True)
    return result.returncode == 0


@pytest.fixture
def dvc_repo(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    subprocess.run(["git", "init", "-q"], check=True)
    subprocess.run(["dvc", "init", "-q"], check=True)
    shutil.copy(REPO / ".dvc/config", tmp_path / ".dvc/config")
    for name in ("dvc.yaml", ".dvcignore"):
        shutil.copy(REPO / name, tmp_path / name)
    for stage in yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"].values():
        for dep in stage.get("deps", []):
            Path(dep).mkdir(parents=True, exist_ok=True)
    files = {
        "data/ds/raw/train/raw-000000.tar": os.urandom(200_000),  # a raw download
        "data/ds/raw/status.parquet": b"status",
        "data/ds/shards/train-000000.tar": os.urandom(300_000),
        "data/ds/manifest.parquet": b"manifest",
        "data/dedup/kept.txt": b"a\nb\n",
        "results/pretrain/franca/s0/stage1/checkpoint.pt": os.urandom(100_000),
    }
    for rel, body in files.items():
        Path(rel).parent.mkdir(parents=True, exist_ok=True)
        Path(rel).write_bytes(body)
    return tmp_path


def _tracked(out: str) -> set[str]:
    """Files of directory output `out` recorded in dvc.lock (from the .dir object in the cache)."""
    lock = yaml.safe_load(Path("dvc.lock").read_text())
    (md5,) = [o["md5"] for s in lock["stages"].values() for o in s.get("outs", []) if o["path"] == out]
    listing = Path(".dvc/cache/files/md5") / md5[:2] / md5[2:]
    return {entry["relpath"] for entry in json.loads(listing.read_text())}


def test_dvc_tracks_shards_manifests_results_not_raw_downloads(dvc_repo):
    workflow_hooks.dvc_commit()
    assert _tracked("data") == {
        "ds/raw/status.parquet",  # the fetch's status table stays: a restored clone sees the fetch as done
        "ds/shards/train-000000.tar",
        "ds/manifest.parquet",
        "dedup/kept.txt",
    }
    assert _tracked("results/pretrain") == {"franca/s0/stage1/checkpoint.pt"}


def test_dvc_cache_links_instead_of_copying(dvc_repo):
    workflow_hooks.dvc_commit()
    shard = Path("data/ds/shards/train-000000.tar")
    cached = [p for p in Path(".dvc/cache/files/md5").rglob("*") if p.is_file() and p.stat().st_size == 300_000]
    assert len(cached) == 1
    if shard.is_symlink():
        assert shard.resolve() == cached[0].resolve()
    elif not _reflink_supported(dvc_repo):  # a reflink shares blocks but not the inode
        assert os.path.samefile(shard, cached[0]), "the workspace shard is a second copy of the cached one"
