"""Provenance records, audit of a chain, and time restoration in dependency order."""

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from franca import audit, cli, provenance, restore

REPO = Path(__file__).resolve().parents[2]


def stage(name, out_dir, outputs, inputs, extra=None):
    out_dir.mkdir(parents=True, exist_ok=True)
    for rel_path, text in outputs.items():
        (out_dir / rel_path).write_text(text)
    return provenance.write(
        out_dir,
        stage=name,
        inputs=inputs,
        outputs=[out_dir / p for p in outputs],
        config={"k": 1},
        mlflow_run_id="run-" + name,
        started=time.time(),
        extra=extra,
    )


@pytest.fixture
def chain(tmp_path, monkeypatch):
    """source list -> fetch -> shard -> train -> eval -> paper table."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "urls.csv").write_text("url\nhttp://127.0.0.1/a.jpg\n")
    stage(
        "fetch",
        tmp_path / "data/ds/raw",
        {"raw-0.tar": "raw"},
        ["urls.csv"],
        extra={"sources": [{"source": "urls.csv", "license": "CC-BY"}]},
    )
    stage("shard", tmp_path / "data/ds/shards", {"train-000000.tar": "shard"}, ["data/ds/raw/raw-0.tar"])
    stage("pretrain", tmp_path / "results/pretrain", {"checkpoint.pt": "weights"}, ["data/ds/shards"])
    stage(
        "eval", tmp_path / "results/eval", {"knn.json": json.dumps({"top1": 0.5})}, ["results/pretrain/checkpoint.pt"]
    )
    stage("paper", tmp_path / "results/paper", {"main.csv": "top1\n0.5\n"}, ["results/eval/knn.json"])
    return tmp_path


def test_record_fields(chain):
    rec = provenance.load(chain / "results/pretrain/provenance.json")
    assert set(rec["outputs"]) == {"results/pretrain/checkpoint.pt"}
    assert rec["inputs"]["data/ds/shards/train-000000.tar"]["sha256"] == provenance.sha256_file(
        chain / "data/ds/shards/train-000000.tar"
    )
    for key in ("config", "code", "packages", "mlflow_run_id", "wall_time_s", "host", "started", "finished"):
        assert key in rec
    assert rec["packages"]["torch"]


def test_audit_walks_to_sources(chain):
    report = audit.audit("results/paper/main.csv")
    assert report.problems == []
    assert [r["stage"] for r in report.records.values()] == ["paper", "eval", "pretrain", "shard", "fetch"]
    assert report.sources == [{"source": "urls.csv", "license": "CC-BY"}]
    assert any("external input: urls.csv" in line for line in report.lines)


def test_audit_catches_tampering(chain):
    (chain / "results/pretrain/checkpoint.pt").write_text("tampered")
    report = audit.audit("results/paper/main.csv")
    assert any("results/pretrain/checkpoint.pt" in p and "modified" in p for p in report.problems)


def test_audit_without_record(chain):
    (chain / "stray.txt").write_text("x")
    assert "no provenance.json" in audit.audit("stray.txt").problems[0]


def test_restore_times_orders_by_dependency(chain):
    for path in chain.rglob("*"):
        if path.is_file():
            os.utime(path, (time.time() + 100 * (hash(path.name) % 7), time.time()))  # scramble, as dvc pull does
    restore.restore_times(["data", "results"])
    mtime = lambda p: (chain / p).stat().st_mtime  # noqa: E731
    order = [
        "data/ds/raw/raw-0.tar",
        "data/ds/shards/train-000000.tar",
        "results/pretrain/checkpoint.pt",
        "results/eval/knn.json",
        "results/paper/main.csv",
    ]
    assert all(mtime(a) < mtime(b) for a, b in zip(order, order[1:], strict=False))


def test_restore_refuses_modified_content(chain):
    (chain / "results/eval/knn.json").write_text("{}")
    with pytest.raises(restore.RestoreError, match="results/eval/knn.json"):
        restore.restore_times(["data", "results"])


def test_audit_fails_when_an_intermediate_record_is_missing(chain, capsys):
    """A deleted provenance.json in the middle of the chain is a broken link, not an external input."""
    (chain / "results/pretrain/provenance.json").unlink()
    report = audit.audit("results/paper/main.csv")
    assert any("results/pretrain/checkpoint.pt" in p and "no provenance record" in p for p in report.problems)
    assert cli.main(["audit", "results/paper/main.csv"]) != 0
    assert "results/pretrain/checkpoint.pt" in capsys.readouterr().err


def test_hash_cache_sees_a_same_size_edit_with_mtime_restored(chain):
    """Reusing a recorded hash needs the same inode, size, mtime and ctime; a user can restore mtime, not ctime."""
    path = chain / "results/pretrain/checkpoint.pt"
    known = provenance.load(chain / "results/pretrain/provenance.json")["outputs"]
    before = path.stat()
    time.sleep(0.01)
    path.write_text("WEIGHTS")  # same size as "weights"
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert path.stat().st_size == before.st_size and path.stat().st_mtime_ns == before.st_mtime_ns
    assert provenance.file_record(path, known)["sha256"] == provenance.sha256_file(path)
    rec = provenance.load(stage("eval2", chain / "results/eval2", {"x.json": "{}"}, [str(path)]))
    assert rec["inputs"]["results/pretrain/checkpoint.pt"]["sha256"] == provenance.sha256_file(path)


def test_a_recorded_source_tree_is_not_hashed_again(chain, monkeypatch):
    """Fetch hashes a source root once; a later job with the same root reuses those hashes (files unchanged)."""
    root = chain / "images"
    for i in range(5):
        (root / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        (root / f"c{i % 2}/{i}.jpg").write_bytes(bytes([i]) * 100)
    hashed = []
    real = provenance.sha256_file
    monkeypatch.setattr(provenance, "sha256_file", lambda p, *a: hashed.append(Path(p).name) or real(p, *a))
    first = provenance.load(stage("fetch", chain / "data/folder/raw", {"raw-0.tar": "r"}, ["images"]))
    assert sorted(hashed) == ["0.jpg", "1.jpg", "2.jpg", "3.jpg", "4.jpg", "raw-0.tar"]
    hashed.clear()
    (root / "c0/4.jpg").write_bytes(b"edited")
    second = provenance.load(stage("fetch", chain / "data/folder2/raw", {"raw-0.tar": "r2"}, ["images"]))
    assert sorted(hashed) == ["4.jpg", "raw-0.tar"]  # only the edited file is read again
    assert {k: v["sha256"] for k, v in second["inputs"].items() if not k.endswith("4.jpg")} == {
        k: v["sha256"] for k, v in first["inputs"].items() if not k.endswith("4.jpg")
    }


def test_restore_refuses_a_stale_consumer_before_touching_any_time(chain):
    """pretrain rerun (new checkpoint, new record) but eval not: eval's recorded input hash no longer matches."""
    stage("pretrain", chain / "results/pretrain", {"checkpoint.pt": "weights v2"}, ["data/ds/shards"])
    times = {p: p.stat().st_mtime_ns for p in chain.rglob("*") if p.is_file()}
    with pytest.raises(restore.RestoreError, match="results/eval/provenance.json.*results/pretrain/checkpoint.pt"):
        restore.restore_times(["data", "results"])
    assert times == {p: p.stat().st_mtime_ns for p in chain.rglob("*") if p.is_file()}


def test_restore_and_audit_in_a_clone_without_raw_downloads(chain):
    """DVC does not version raw downloads (.dvcignore): after a pull they are absent, which restore and audit accept;
    a missing versioned file is still refused, by name."""
    subprocess.run(["dvc", "init", "--no-scm", "-q"], check=True)
    shutil.copy(REPO / ".dvcignore", chain / ".dvcignore")
    (chain / "data/ds/raw/raw-0.tar").unlink()
    assert restore.restore_times(["data", "results"]) > 0
    report = audit.audit("results/paper/main.csv")
    assert report.problems == [] and any("not kept: data/ds/raw/raw-0.tar" in line for line in report.lines)
    (chain / "data/ds/shards/train-000000.tar").unlink()
    with pytest.raises(restore.RestoreError, match="data/ds/shards/train-000000.tar: missing"):
        restore.restore_times(["data", "results"])
