"""Shared fixtures of the cluster tests (issue 6): repository copies, the SLURM guard, the local reference run.

* ``slurm_up``: the default partition of a running SLURM; skips when ``sinfo`` is missing or ``scontrol ping`` does
  not report UP, and FAILS instead when ``CI_REQUIRE_SLURM=1`` (CI must never skip the cluster path silently).
* ``local_subset``: the tiny workflow's subset (fetch -> shard -> dedup -> pretrain -> features -> eval, one
  experiment and seed, short overrides) run locally with ``--cores 2`` in a repository copy. It starts in the
  background when first requested, so that its CPU work overlaps the queue waits of the SLURM run; the SLURM tests
  compare against it, and the distributed-rule tests reuse its data.

Every command runs with the venv's bin first on PATH, MLflow tracking off (the tracking path is covered by
tests/workflow/test_e2e.py; here it would add an import and a SQLite writer per job) and no launcher variables
(SLURM_*, RANK...) inherited from the shell that runs pytest.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from repo_copy import BIN, GIT, ROOT, copy_repo, run  # noqa: F401  (re-exported to the cluster tests)

# The subset: one experiment, one seed, no high-res stage, no RASA; 6 CPU iterations with a rolling checkpoint every
# 3; a smaller synthetic set (4 train shards of 160 images) so that every data and eval job takes seconds.
EXPERIMENTS = {"franca": {"seeds": [0], "highres": False, "rasa": False}}
SUBSET_OVERRIDES = [
    "run.device=cpu",  # deterministic (bit-equal runs), gloo for 2 processes, and slow enough to scancel mid-way
    "optim.iterations=6",
    "optim.warmup_iters=2",
    "teacher.warmup_teacher_temp_iters=3",
    "run.checkpoint_period=3",
    "data.datasets.synth.n_train=640",
    "data.datasets.synth.n_val=96",
    "data.datasets.synth.n_test=96",
    "data.datasets.synth.shard_size=160",
]
TARGET = "results/eval/franca/s0/pretrain/knn.json"
CKPT = "results/pretrain/franca/s0/stage1/checkpoint.pt"
LOCAL_TIMEOUT_S = 900
_LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def run_env(**extra: str) -> dict[str, str]:
    """The environment of every command: venv first on PATH, tracking and progress bars off, no launcher vars."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in _LAUNCHER_VARS}
    env.update(PATH=f"{BIN}:{os.environ['PATH']}", FRANCA_PROGRESS="0", FRANCA_TRACKING="off")
    env.pop("FRANCA_SLURM_ACCOUNT", None)
    env.update(extra)
    return env


def sh(cmd: list[str], cwd: Path, timeout: float = 900, check: bool = True, **env: str) -> subprocess.CompletedProcess:
    return run(cmd, cwd, run_env(**env), timeout, check)


def subset_overrides(changes: dict[str, object]) -> list[str]:
    """SUBSET_OVERRIDES with some keys set to other values and/or new keys appended (each key appears once)."""
    out = [o for o in SUBSET_OVERRIDES if o.split("=", 1)[0] not in changes]
    return out + [f"{key}={value}" for key, value in changes.items()]


def write_config(path: Path, overrides: list[str] = tuple(SUBSET_OVERRIDES)) -> Path:
    """A --configfile with the subset's experiment and Hydra overrides. A file, not `--config`: Snakemake parses
    nested `--config` values as strings, so `seeds: [0]` fails the schema (and `false` would be a string)."""
    cfg = {
        "experiments": EXPERIMENTS,
        "overrides": list(overrides),
        "dvc": {"commit_on_success": False, "push_on_success": False},
    }
    path.write_text(json.dumps(cfg))  # JSON is YAML
    return path


def snakemake_cmd(timeout_s: int, *args: str) -> list[str]:
    """snakemake under a hard `timeout -s KILL`: the failure mode of a misconfigured cluster run is a silent hang."""
    return ["timeout", "-s", "KILL", str(timeout_s), str(BIN / "snakemake"), *args]


def submitted_jobs(log: str) -> list[str]:
    """SLURM job ids in submission order, from the plugin's 'submitted with SLURM jobid N' lines."""
    return re.findall(r"submitted with SLURM jobid (\d+)", log)


def scancel(job_ids: list[str]) -> None:
    """Cancel the given SLURM jobs (this session's own, after a failure or hang); errors are ignored."""
    if job_ids and shutil.which("scancel"):
        subprocess.run(["scancel", *job_ids], capture_output=True, timeout=30)


def provenance_records(repo: Path) -> dict[str, dict]:
    """Every provenance record under data/ and results/, by path relative to the repo."""
    return {
        str(p.relative_to(repo)): json.loads(p.read_text())
        for top in ("data", "results")
        for p in sorted((repo / top).rglob("*provenance.json"))
    }


class Background:
    """A command started with Popen (own process group, output to a file); ``wait`` returns the result."""

    def __init__(self, cmd: list[str], cwd: Path, log: Path, env: dict[str, str]):
        self.cmd, self.cwd, self.log = cmd, cwd, log
        self.started = time.monotonic()
        self._fh = open(log, "w")
        self.proc = subprocess.Popen(
            cmd, cwd=cwd, env=env, stdout=self._fh, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.wall_s: float | None = None  # set by a watcher thread when the command ends
        self._watcher = threading.Thread(target=self._watch, daemon=True)
        self._watcher.start()

    def _watch(self) -> None:
        self.proc.wait()
        self.wall_s = time.monotonic() - self.started

    def wait(self, timeout: float) -> str:
        """Wait for the command; raise AssertionError with the log tail when it fails. Returns the log."""
        try:
            rc = self.proc.wait(timeout=max(1.0, timeout - (time.monotonic() - self.started)))
        except subprocess.TimeoutExpired as exc:
            self.stop()
            tail = self.text()[-4000:]
            raise AssertionError(f"{' '.join(self.cmd)} still running after {timeout} s:\n{tail}") from exc
        self._watcher.join()
        if not self._fh.closed:
            self._fh.close()
        if rc != 0:
            raise AssertionError(f"{' '.join(self.cmd)} failed ({rc}):\n{self.text()[-6000:]}")
        return self.text()

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        """SIGKILL the process group this object started (only it), if still running."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        if not self._fh.closed:
            self._fh.close()


def _slurm_status() -> tuple[bool, str]:
    if shutil.which("sinfo") is None or shutil.which("scontrol") is None:
        return False, "no sinfo/scontrol on PATH (start a cluster with `bash ci/slurm-up.sh`)"
    ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=30)
    if "is UP" not in ping.stdout:
        return False, f"scontrol ping does not report UP: {ping.stdout.strip() or ping.stderr.strip()}"
    return True, ""


@pytest.fixture(scope="session")
def slurm_up() -> str:
    """The default partition of the running SLURM (skip without one; fail under CI_REQUIRE_SLURM=1)."""
    up, why = _slurm_status()
    if not up:
        if os.environ.get("CI_REQUIRE_SLURM") == "1":
            pytest.fail(f"CI_REQUIRE_SLURM=1 but SLURM is not available: {why}")
        pytest.skip(why)
    partitions = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, timeout=30).stdout
    default = [p for p in partitions.split() if p.endswith("*")] or partitions.split()
    return default[0].rstrip("*")


@pytest.fixture(scope="session")
def local_subset(tmp_path_factory):
    """The subset run locally (`--cores 2`), started in the background; call ``.wait(timeout)`` before use."""
    repo = copy_repo(tmp_path_factory.mktemp("local") / "repo")
    config = write_config(repo.parent / "subset.yaml")
    cmd = snakemake_cmd(LOCAL_TIMEOUT_S, TARGET, "--cores", "2", f"--configfile={config}")
    run = Background(cmd, repo, repo.parent / "snakemake.log", run_env())  # run.cwd is the repo
    yield run
    run.stop()


def pytest_collection_modifyitems(config, items):
    """Run test_slurm_workflow.py first among the cluster tests: the local reference run it starts in the
    background then overlaps the SLURM queue waits instead of running alone before them."""
    here = Path(__file__).parent
    slots = [i for i, item in enumerate(items) if Path(str(item.path)).parent == here]
    ours = sorted((items[i] for i in slots), key=lambda item: Path(str(item.path)).name != "test_slurm_workflow.py")
    for i, item in zip(slots, ours, strict=True):
        items[i] = item


_SELF = sys.modules[__name__]  # this module object, bound while it is being imported


@pytest.fixture(scope="session")
def cluster():
    """The helpers and constants above (sh, copy_repo, write_config, Background, CKPT...) for the test modules:
    tests/ has no packages, so a test module cannot import this conftest by name reliably."""
    return _SELF
