"""Provenance records, audit of a chain, and time restoration in dependency order."""

import json
import os
import time

import pytest

from franca import audit, provenance, restore


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
