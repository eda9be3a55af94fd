"""The tiny paper end to end: a real Snakemake run, a real MLflow store, a real DVC repo and remote.

One module-scoped run in a copy of the repository; the tests then check reruns, tracking, audit, DVC restore and
config rejection against it. Slow (minutes on 2 cores); CI runs it.
"""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
import repo_copy
from repo_copy import BIN, GIT, copy_repo

pytestmark = [pytest.mark.slow, pytest.mark.timeout(5400)]


def sh(cmd: list[str], cwd: Path, timeout: int = 1500, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    env.pop("FRANCA_TRACKING", None)
    return repo_copy.run(cmd, cwd, env, timeout, check)


def dry_run_jobs(repo: Path, *extra: str) -> dict[str, int]:
    out = sh(["snakemake", "-n", "--cores", "2", *extra], repo).stdout
    if "Nothing to be done" in out:
        return {}
    table = out.split("Job stats:")[1].split("total")[0]
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)\s*$", table, re.M)}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    repo = copy_repo(tmp_path_factory.mktemp("repo"))
    start = time.time()
    result = sh(["snakemake", "--cores", "2", "--profile", "workflow/profiles/local"], repo, timeout=3600)
    return {"repo": repo, "wall_s": time.time() - start, "log": result.stderr}


def test_paper_is_built_from_this_run(run):
    repo = run["repo"]
    print(f"tiny workflow wall time: {run['wall_s']:.0f} s")
    assert (repo / "results/paper/index.html").stat().st_size > 10_000
    head = (repo / "results/paper/index.html").read_text().split('id="table-main"')[0]
    assert "after dedup" in head and "synthetic" in head  # the datasets block, read from gather's manifest parts
    rows = list(csv.DictReader(open(repo / "results/paper/main.csv")))
    assert {r["experiment"] for r in rows} >= {"franca", "dinov2"}
    numeric = [v for r in rows for k, v in r.items() if k not in ("experiment", "checkpoint", "note") and v]
    assert numeric and all(re.match(r"^-?\d", v) for v in numeric)
    # issue 13: every variant learns: k-NN >= 3x chance (8 classes), >= 20 points over its own random init and above
    # the raw-pixel k-NN of the same images (style nuisance, measured: trained 76-82, init 14, pixels 65.5)
    baselines = {r["experiment"]: r for r in csv.DictReader(open(repo / "results/paper/baselines.csv"))}
    assert set(baselines) == set(_experiments(repo))
    for name, row in baselines.items():
        assert float(row["knn_top1"]) >= 3 * 100 / 8 and float(row["gain"]) >= 20, (name, row)
        assert 0 < float(row["knn_pixels_top1"]) < float(row["knn_top1"]) and "does not exceed" not in row["note"], (
            name,
            row,
        )
    assert (repo / "dvc.lock").exists()


def test_tiny_page_in_headless_chromium(run, tmp_path):
    """The real tiny page: no table cut at 1280 px, every figure loaded, numbers reveal their provenance."""
    from paper.browser import check_page_or_skip

    report = check_page_or_skip(run["repo"] / "results/paper/index.html", tmp_path / "tiny-paper.png")
    print(f"tiny paper screenshot: {report['screenshot']}")


def test_clean_tree_reruns_nothing(run):
    assert dry_run_jobs(run["repo"]) == {}


def test_a_missing_paper_output_reruns_the_paper(run):
    """Rule all asks for every output of the paper: one that is missing (a table added by a code change) reruns the
    paper job, which Snakemake skips when only an output nobody requests is missing."""
    repo = run["repo"]
    table, aside = repo / "results/paper/highres.csv", repo / "highres.csv.aside"
    table.rename(aside)
    try:
        assert dry_run_jobs(repo) == {"paper": 1, "all": 1}
    finally:
        aside.rename(table)


def test_an_added_seed_runs_only_its_own_jobs(run, tmp_path):
    """A seed added to one experiment schedules that seed's pretraining and its downstream jobs, then the paper;
    nothing of the runs already done."""
    repo = run["repo"]
    experiments = _experiments(repo)
    spec = experiments["mrl_only"]
    added = {**experiments, "mrl_only": {**spec, "seeds": [*spec["seeds"], max(spec["seeds"]) + 1]}}
    extra = tmp_path / "seeds.yaml"
    extra.write_text(json.dumps({"experiments": added}))  # JSON is YAML
    assert spec["rasa"] and not spec["highres"]  # one checkpoint, with RASA
    jobs = dry_run_jobs(repo, f"--configfile={extra}")
    assert jobs == {"pretrain": 1, "features": 1, "evaluate": 1, "rasa": 1, "paper": 1, "all": 1}


def test_one_yaml_edit_reruns_only_affected_stages(run):
    repo = run["repo"]
    path = repo / "config/eval/tiny.yaml"
    original = path.read_text()
    try:
        path.write_text(original.replace("temperature: 0.07", "temperature: 0.1"))
        jobs = dry_run_jobs(repo)
    finally:
        path.write_text(original)
    n_ckpts = sum(len(s["seeds"]) * (2 if s["highres"] else 1) for s in _experiments(repo).values())
    assert jobs == {"evaluate": n_ckpts, "paper": 1, "all": 1}  # features and rasa untouched


@pytest.mark.parametrize("how", ["config", "configfile"])
def test_one_eval_override_reruns_only_the_eval_jobs(run, how, tmp_path):
    """An override of one eval key, in `overrides:` (--config) or in a YAML file (--configfile), reruns only the
    jobs whose config file holds it: the evaluate jobs and the paper, never fetch, training or features."""
    repo = run["repo"]
    if how == "config":
        jobs = dry_run_jobs(repo, "--config", 'overrides=["eval.knn.temperature=0.1"]')
    else:
        extra = tmp_path / "my.yaml"
        extra.write_text('overrides: ["eval.knn.temperature=0.1"]\n')
        jobs = dry_run_jobs(repo, f"--configfile={extra}")
    n_ckpts = sum(len(s["seeds"]) * (2 if s["highres"] else 1) for s in _experiments(repo).values())
    assert jobs == {"evaluate": n_ckpts, "paper": 1, "all": 1}


def test_job_command_from_its_log_reproduces_its_output(run, tmp_path):
    """The first line of every job log is its command; pasted into a shell (outputs elsewhere) it gives the same
    result."""
    repo = run["repo"]
    log = (repo / "logs/eval/franca/s0/pretrain.log").read_text()
    command = re.search(r"INFO franca: command: (.*)$", log, re.M).group(1)
    assert re.search(r"--config work/config/franca/s0/eval-[0-9a-f]{12}\.json", command) and "--threads" in command
    redo = command.replace("--out-dir results/eval/franca/s0/pretrain", f"--out-dir {tmp_path}")
    sh(["bash", "-c", redo], repo)
    for bench in ("knn", "linear", "position_probe"):
        ours = json.loads((tmp_path / f"{bench}.json").read_text())["metrics"]
        assert ours == json.loads((repo / f"results/eval/franca/s0/pretrain/{bench}.json").read_text())["metrics"]


def test_mlflow_parent_with_one_child_per_job(run):
    repo = run["repo"]
    os.environ["MLFLOW_SQLALCHEMYSTORE_POOLCLASS"] = "NullPool"
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{repo}/mlflow.db")
    exp = client.get_experiment_by_name("franca-repro")
    runs = client.search_runs([exp.experiment_id], max_results=5000)
    parents = [r for r in runs if r.data.tags.get("kind") == "workflow"]
    assert len(parents) == 1
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    n_jobs = sum(len(list((repo / d).rglob("*provenance.json"))) for d in ("data", "results"))
    assert len(children) == n_jobs
    pretrain = [r for r in children if r.data.tags.get("rule") == "pretrain"]
    assert pretrain and all("git_commit" in r.data.tags and "inputs_sha256" in r.data.tags for r in pretrain)
    history = client.get_metric_history(pretrain[0].info.run_id, "loss")
    assert len(history) > 5
    # every job reached the store (no records left pending) and the UI opens the experiment on its runs
    assert not list((repo / ".snakemake/franca_tracking_pending").glob("*/ops.json"))
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"


def test_audit_verifies_and_catches_tampering(run):
    repo = run["repo"]
    ok = sh(["franca", "audit", "results/paper/main.csv"], repo)
    assert "fetch" in ok.stdout and "sources" in ok.stdout
    ckpt = repo / "results/pretrain/franca/s0/stage1/checkpoint.pt"
    original, stat = ckpt.read_bytes(), ckpt.stat()
    try:  # unlink first: the file is a read-only link into the DVC cache, which must stay intact
        ckpt.unlink()
        ckpt.write_bytes(original[:-8] + b"tampered")
        bad = sh(["franca", "audit", "results/paper/main.csv"], repo, check=False)
    finally:
        ckpt.unlink()
        ckpt.write_bytes(original)
        os.utime(ckpt, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # leave the tree as the other tests expect
    assert bad.returncode == 1 and "results/pretrain/franca/s0/stage1/checkpoint.pt" in bad.stderr


def test_dvc_pull_in_fresh_clone_restores_without_recompute(run, tmp_path):
    repo = run["repo"]
    remote = tmp_path / "remote"
    sh(["dvc", "remote", "modify", "--local", "local", "url", str(remote)], repo)
    sh(["dvc", "push", "--quiet"], repo)
    sh([*GIT, "add", "dvc.lock", ".gitignore"], repo, check=False)
    sh([*GIT, "commit", "-qm", "record dvc.lock"], repo)
    fresh = tmp_path / "fresh"
    sh([*GIT, "clone", "-q", str(repo), str(fresh)], tmp_path)
    sh(["dvc", "remote", "modify", "--local", "local", "url", str(remote)], fresh)
    sh(["franca", "restore"], fresh)
    for path in (repo / "results/paper").rglob("*"):
        if path.is_file():
            assert (fresh / path.relative_to(repo)).read_bytes() == path.read_bytes(), path
    assert dry_run_jobs(fresh) == {}


@pytest.mark.parametrize(
    ("config", "needle"),
    [("preset=bogus", "preset"), ('overrides=["optim.iterations=-1"]', "optim.iterations")],
)
def test_bad_config_rejected_before_any_job(run, config, needle):
    repo = run["repo"]
    state = lambda: sorted((str(p), p.stat().st_mtime_ns) for p in (repo / "results").rglob("*"))  # noqa: E731
    before = state()
    result = sh(["snakemake", "--cores", "2", "--config", config], repo, check=False)
    assert result.returncode != 0 and needle in result.stderr + result.stdout
    assert "Job stats" not in result.stdout + result.stderr
    assert state() == before


def _experiments(repo: Path) -> dict:
    import yaml

    return yaml.safe_load((repo / "config/config.yaml").read_text())["experiments"]


def test_forced_rerun_of_a_finished_training_job_starts_at_iteration_zero(run):
    """`snakemake --forcerun` of one finished training job (the high-res stage: the same training loop and rolling
    state as pretraining, at a fifth of its iterations) trains from iteration 0 (its rolling state was removed when
    it finished) and gives the checkpoint of the original run. Last in this module: it leaves the tree stale.
    tests/train/test_stage_identity.py checks the same for a pretrain job, outside Snakemake."""
    repo = run["repo"]
    target = "results/highres/dinov2/s0/checkpoint.pt"
    before = torch_weights(repo / target)
    assert not list((repo / "work/ckpt").rglob("ckpt-*.pt")), "finished jobs left rolling checkpoints behind"
    sh(["snakemake", "--cores", "2", "--force", target], repo)
    summary = json.loads((repo / "results/highres/dinov2/s0/provenance.json").read_text())["summary"]
    assert summary["start_iteration"] == 0 and summary["resumed_from"] is None
    after = torch_weights(repo / target)
    assert [k for k in before if not torch_equal(before[k], after[k])] == []


def torch_weights(path: Path) -> dict:
    from franca.train.checkpoint import load_checkpoint

    ckpt = load_checkpoint(path)
    return {f"{tree}.{k}": v for tree in ("student", "teacher") for k, v in ckpt[tree].items()}


def torch_equal(a, b) -> bool:
    import torch

    return torch.equal(a, b)
