"""The tiny workflow's subset on a real SLURM through `--profile workflow/profiles/slurm` (issue 6, "Tests").

* ``test_slurm_workflow``: fetch -> shard -> dedup -> pretrain -> features -> eval of one experiment and seed run as
  SLURM jobs; every provenance record names the SLURM job that wrote it, and the results (data, checkpoint weights,
  eval metrics) equal, bit for bit, those of the same subset run locally with ``--cores 2``.
* ``test_slurm_kill_resume``: the pretrain job is cancelled (``scancel``) after its first rolling checkpoint; the
  profile's ``retries`` resubmit it, the new job resumes from work/ckpt/ and ends with the weights of the
  uninterrupted run.

Speed: the SLURM plugin polls the queue 1 s after a submission, then every 10 s more per empty check (11, 21, 31...
hard-coded), so a 20-40 s job costs 33-64 s. The test therefore groups the short data jobs (fetch, shard, gather,
dedup) into one SLURM job and the two eval jobs (features, evaluate) into another (``--groups``): 3 sequential SLURM
jobs instead of 7. Pretrain stays alone, with the resources the profile computes for it. Every rule still runs inside a
SLURM job, which its provenance shows.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.slow, pytest.mark.cluster]
PROFILE = "workflow/profiles/slurm"
GROUPS = ["fetch=data", "shard=data", "gather=data", "dedup=data", "features=eval", "evaluate=eval"]
SLURM_TIMEOUT_S = 900
ROLLING = "work/ckpt/results/pretrain/franca/s0/stage1"  # + /<job identity>/
CKPT = "results/pretrain/franca/s0/stage1/checkpoint.pt"  # = conftest.CKPT


def _weights(path: Path) -> dict:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    return {"iteration": ckpt["iteration"], "student": ckpt["student"], "teacher": ckpt["teacher"]}


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa["iteration"] == wb["iteration"] == 6
    for tree in ("student", "teacher"):
        assert wa[tree].keys() == wb[tree].keys()
        different = [k for k in wa[tree] if not torch.equal(wa[tree][k], wb[tree][k])]
        assert not different, f"{tree} tensors differ between {a} and {b}: {different[:5]}"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def slurm_subset(cluster, slurm_up, local_subset, tmp_path_factory):
    """The subset through the SLURM profile in a fresh copy (the local run goes on in the background meanwhile)."""
    repo = cluster.copy_repo(tmp_path_factory.mktemp("slurm") / "repo")
    config = cluster.write_config(repo.parent / "subset.yaml")
    args = (cluster.TARGET, "--profile", PROFILE, f"--configfile={config}", "--groups", *GROUPS)
    start = time.monotonic()
    cmd = cluster.snakemake_cmd(SLURM_TIMEOUT_S, *args)
    result = cluster.sh(cmd, repo, SLURM_TIMEOUT_S + 60, False, FRANCA_SLURM_PARTITION=slurm_up)
    wall = time.monotonic() - start
    log = result.stdout + result.stderr
    if result.returncode != 0:
        cluster.scancel(cluster.submitted_jobs(log))
    assert result.returncode != 137, f"snakemake hung past {SLURM_TIMEOUT_S} s (status command?):\n{log[-4000:]}"
    assert result.returncode == 0, log[-6000:]
    local_subset.wait(cluster.LOCAL_TIMEOUT_S)
    print(f"SLURM subset workflow: {wall:.0f} s; local --cores 2 (overlapping it): {local_subset.wall_s:.0f} s")
    return {"repo": repo, "log": log, "wall_s": wall, "local": local_subset.cwd}


def test_slurm_workflow(cluster, slurm_subset):
    repo, local, log = slurm_subset["repo"], slurm_subset["local"], slurm_subset["log"]
    jobs = cluster.submitted_jobs(log)
    assert len(jobs) == 3 and len(set(jobs)) == 3, f"expected 3 SLURM jobs (data, pretrain, eval): {jobs}"
    data_job, pretrain_job, eval_job = jobs

    # every record names the SLURM job that wrote it; the local run's records name none
    records, local_records = cluster.provenance_records(repo), cluster.provenance_records(local)
    assert records.keys() == local_records.keys()
    expected = {"data/": data_job, "results/pretrain/": pretrain_job, "results/features/": eval_job}
    expected["results/eval/"] = eval_job
    for path, record in records.items():
        job = next(j for prefix, j in expected.items() if path.startswith(prefix))
        assert record["slurm_job_id"] == job, (path, record["slurm_job_id"], jobs)
        assert local_records[path]["slurm_job_id"] is None, path
    stages = {r["stage"] for r in records.values()}
    assert stages == {"fetch", "shard", "gather", "dedup", "pretrain", "features", "eval"}

    # data: byte-identical shards, manifest and dedup list
    data_files = sorted(p.relative_to(repo) for p in (repo / "data").rglob("*") if p.suffix in (".tar", ".parquet"))
    data_files += [Path("data/dedup/synth/kept.txt")]
    assert len(data_files) >= 6
    for rel in data_files:
        assert _sha256(repo / rel) == _sha256(local / rel), rel

    # training: the same weights, bit for bit, and the same logged losses
    _assert_same_weights(repo / CKPT, local / CKPT)
    metrics = [(p / CKPT).with_name("metrics.jsonl").read_text().splitlines() for p in (repo, local)]
    losses = [[json.loads(line)["loss"] for line in m] for m in metrics]
    assert losses[0] == losses[1] and len(losses[0]) >= 2

    # evaluation: every benchmark's metrics identical
    evals = sorted(p for p in (repo / "results/eval").rglob("*.json") if not p.name.endswith("provenance.json"))
    assert len(evals) >= 7
    for path in evals:
        mine, ref = json.loads(path.read_text()), json.loads((local / path.relative_to(repo)).read_text())
        assert mine["metrics"] and mine["metrics"] == ref["metrics"], path.name
    knn = json.loads((repo / cluster.TARGET).read_text())["metrics"]
    assert all(0.0 <= v <= 1.0 for v in knn.values())
    print(f"SLURM jobs {jobs}; wall {slurm_subset['wall_s']:.0f} s")


@pytest.fixture(scope="module")
def killed_run(cluster, slurm_subset, slurm_up, tmp_path_factory) -> dict:
    """In the SLURM copy: delete the pretrain outputs and rolling checkpoints, rerun pretrain through the profile,
    scancel its job as soon as the first rolling checkpoint appears, and let the profile's retries finish it."""
    repo, tmp = slurm_subset["repo"], tmp_path_factory.mktemp("kill")
    shutil.rmtree(repo / "results/pretrain")
    shutil.rmtree(repo / "work/ckpt", ignore_errors=True)
    # a rolling checkpoint after every iteration (an orchestration key: the weights do not depend on it), so that
    # the job is still running when the first one appears; mtime triggers only, so the data jobs do not rerun for
    # the changed override list
    config = cluster.write_config(tmp / "kill.yaml", cluster.subset_overrides({"run.checkpoint_period": 1}))
    args = (CKPT, "--profile", PROFILE, f"--configfile={config}", "--rerun-triggers=mtime")
    start = time.monotonic()
    env = cluster.run_env(FRANCA_SLURM_PARTITION=slurm_up)
    run = cluster.Background(cluster.snakemake_cmd(SLURM_TIMEOUT_S, *args), repo, tmp / "kill.log", env)
    try:
        rolling = _wait_for_rolling(repo / ROLLING, run, timeout=300)
        submitted = cluster.submitted_jobs(run.text())
        assert len(submitted) == 1, f"expected the pretrain job alone to be submitted: {submitted}"
        subprocess.run(["scancel", submitted[0]], check=True, timeout=30)
        cancelled_after = time.monotonic() - start
        finished_before_cancel = (repo / CKPT).exists()
        log = run.wait(SLURM_TIMEOUT_S)
    finally:
        run.stop()
        cluster.scancel(cluster.submitted_jobs(run.text()))  # no-op for finished jobs
    assert not finished_before_cancel, "the training finished before scancel landed: nothing was interrupted"
    return {
        "repo": repo,
        "log": log,
        "victim": submitted[0],
        "rolling": rolling,
        "cancelled_after_s": cancelled_after,
        "wall_s": time.monotonic() - start,
    }


def test_slurm_kill_resume(cluster, slurm_subset, killed_run):
    """The cancelled job is resubmitted, resumes from its rolling checkpoint and ends with the uninterrupted
    (local) run's weights, bit for bit."""
    repo, victim, log = killed_run["repo"], killed_run["victim"], killed_run["log"]
    state = subprocess.run(["squeue", "-h", "-t", "all", "-j", victim, "-o", "%T"], capture_output=True, text=True)
    assert state.stdout.strip() == "CANCELLED", (victim, state.stdout, state.stderr)
    jobs = cluster.submitted_jobs(log)
    assert len(jobs) == 2 and jobs[0] == victim, f"expected one resubmission of {victim}: {jobs}\n{log[-3000:]}"
    assert f"SLURM-job '{victim}' failed" in log

    record = json.loads((repo / CKPT).with_name("provenance.json").read_text())
    assert record["slurm_job_id"] == jobs[1]
    summary = record["summary"]
    assert summary["resumed_from"] and Path(summary["resumed_from"]).parent.parent == Path(ROLLING), summary
    assert 1 <= summary["start_iteration"] < summary["iterations"] == 6, summary
    _assert_same_weights(repo / CKPT, slurm_subset["local"] / CKPT)
    print(
        f"kill/resume: {killed_run['rolling'].name} seen, scancel {victim} at {killed_run['cancelled_after_s']:.0f} s;"
        f" resumed in job {jobs[1]} from iteration {summary['start_iteration']}; wall {killed_run['wall_s']:.0f} s"
    )


def test_slurm_kill_resume_keeps_metrics_history(slurm_subset, killed_run):
    metrics = [(p / CKPT).with_name("metrics.jsonl").read_text().splitlines() for p in (killed_run["repo"],)]
    metrics.append((slurm_subset["local"] / CKPT).with_name("metrics.jsonl").read_text().splitlines())
    resumed, uninterrupted = ([json.loads(line)["loss"] for line in m] for m in metrics)
    assert resumed == uninterrupted


def _wait_for_rolling(directory: Path, run, timeout: float) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = sorted(directory.rglob("ckpt-*.pt")) if directory.is_dir() else []
        if found:
            return found[0]
        if run.proc.poll() is not None:
            raise AssertionError(f"snakemake ended before the first rolling checkpoint:\n{run.text()[-4000:]}")
        time.sleep(0.2)
    raise AssertionError(f"no rolling checkpoint in {directory} after {timeout} s:\n{run.text()[-4000:]}")
