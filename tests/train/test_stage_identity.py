"""`franca pretrain` as its rule runs it: rolling state keyed by the job's identity (config slice, input hashes, code).

A finished job leaves no rolling state (a forced rerun starts at iteration 0); a job killed with SIGKILL and rerun
with the same inputs resumes and ends bit-identical to an uninterrupted run (same machine, one thread); a changed
input or config starts over from iteration 0.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_loop import TINY_CFG

from franca.data.shards import iter_raw_samples, list_shards
from franca.data.synthetic import generate
from franca.train import checkpoint as ck

ITERATIONS = 24


@pytest.fixture(scope="module")
def job_files(tmp_path_factory):
    """Shards, kept.txt, the job config (pretrain slice) and the run config of one tiny pretrain job."""
    root = tmp_path_factory.mktemp("job")
    generate(root / "data", seed=0, n_train=48, n_val=0, n_test=0, image_size=32, n_classes=4, shard_size=12)
    keys = sorted(k for p in list_shards(root / "data" / "shards", "train") for k, _ in iter_raw_samples(p))
    (root / "kept.txt").write_text("\n".join(keys[:-4]) + "\n")
    cfg = copy.deepcopy(TINY_CFG)
    run = cfg.pop("run") | {"checkpoint_period": 2, "rolling_dir": str(root / "rolling"), "progress": False}
    cfg["optim"].update(iterations=ITERATIONS, warmup_iters=2)
    cfg["data"] = {"dataset": "synth", "split": "train"}
    (root / "job.json").write_text(json.dumps(cfg))
    (root / "run.json").write_text(json.dumps(run))
    return root


def _command(root: Path, out: Path, config: str = "job.json") -> list[str]:
    return [sys.executable, "-m", "franca.cli", "pretrain", "--config", str(root / config), "--run-config",
            str(root / "run.json"), "--shards", str(root / "data" / "shards"), "--kept", str(root / "kept.txt"),
            "--out", str(out), "--threads", "1"]  # fmt: skip


def _env() -> dict:
    return {**os.environ, "FRANCA_TRACKING": "off"}


def _run(root: Path, out: Path, config: str = "job.json") -> dict:
    subprocess.run(_command(root, out, config), env=_env(), check=True, capture_output=True, timeout=600)
    return json.loads((out / "provenance.json").read_text())["summary"]


def _kill_after_first_rolling(root: Path, out: Path) -> None:
    """Start the job and SIGKILL it once a rolling checkpoint exists (mid-way, before the final checkpoint)."""
    proc = subprocess.Popen(_command(root, out), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not list((root / "rolling").rglob("ckpt-*-000000004.pt")):
        assert proc.poll() is None and time.time() < deadline, "the job ended before its first rolling checkpoint"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "checkpoint.pt").exists()


def _weights(path: Path) -> dict:
    ckpt = ck.load_checkpoint(path)
    return {f"{tree}.{k}": v for tree in ("student", "teacher") for k, v in ckpt[tree].items()}


def _assert_same(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    assert [k for k in wa if not torch.equal(wa[k], wb[k])] == []  # one machine, one thread: bit-identical


@pytest.fixture(scope="module")
def reference(job_files):
    out = job_files / "reference"
    summary = _run(job_files, out)
    return out, summary


def test_finished_job_leaves_no_rolling_state_and_forced_rerun_starts_over(job_files, reference):
    out, summary = reference
    assert summary["start_iteration"] == 0
    assert not list((job_files / "rolling").rglob("ckpt-*.pt"))  # removed once the checkpoint was published
    again = _run(job_files, out)  # what `snakemake --forcerun pretrain` runs
    assert again["start_iteration"] == 0 and again["resumed_from"] is None
    fresh = job_files / "fresh"
    _run(job_files, fresh)
    _assert_same(out / "checkpoint.pt", fresh / "checkpoint.pt")


def test_killed_job_resumes_and_equals_uninterrupted(job_files, reference):
    out = job_files / "killed"
    _kill_after_first_rolling(job_files, out)
    summary = _run(job_files, out)
    assert summary["start_iteration"] >= 4 and summary["resumed_from"]
    _assert_same(reference[0] / "checkpoint.pt", out / "checkpoint.pt")


def test_changed_kept_or_config_starts_from_iteration_zero(job_files, reference):
    out = job_files / "changed"
    kept = (job_files / "kept.txt").read_text()
    _kill_after_first_rolling(job_files, out)
    try:
        (job_files / "kept.txt").write_text(kept.split("\n", 1)[1])  # one key fewer
        summary = _run(job_files, out)
    finally:
        (job_files / "kept.txt").write_text(kept)
    assert summary["start_iteration"] == 0 and summary["resumed_from"] is None

    (out / "checkpoint.pt").unlink()  # Snakemake removes a job's outputs before it runs the job again
    _kill_after_first_rolling(job_files, out)
    cfg = json.loads((job_files / "job.json").read_text())
    cfg["optim"]["base_lr"] *= 2
    (job_files / "other.json").write_text(json.dumps(cfg))
    summary = _run(job_files, out, config="other.json")
    assert summary["start_iteration"] == 0 and summary["resumed_from"] is None
    assert (
        list((job_files / "rolling").rglob("ckpt-*.pt")) == []
    )  # the killed job's state (another identity) was removed, the finished one's too
