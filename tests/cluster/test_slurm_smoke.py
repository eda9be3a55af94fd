"""A 2-rule workflow through the real SLURM executor with ``--profile workflow/profiles/slurm`` (issue 6).

Needs a running SLURM (``bash ci/slurm-up.sh``). Skipped where there is none, unless ``CI_REQUIRE_SLURM=1``: then a
missing cluster is a failure, so CI cannot silently skip the cluster path. The failure mode of a misconfigured
status command is a silent hang, hence the hard ``timeout``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PROFILE = REPO / "workflow" / "profiles" / "slurm"
TIMEOUT_S = 420

pytestmark = pytest.mark.cluster


def _slurm_up() -> tuple[bool, str]:
    if shutil.which("sinfo") is None or shutil.which("scontrol") is None:
        return False, "no sinfo/scontrol on PATH (start a cluster with `bash ci/slurm-up.sh`)"
    ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=30)
    if "is UP" not in ping.stdout:
        return False, f"scontrol ping does not report UP: {ping.stdout.strip() or ping.stderr.strip()}"
    return True, ""


@pytest.fixture(scope="module")
def slurm():
    up, why = _slurm_up()
    if not up:
        if os.environ.get("CI_REQUIRE_SLURM") == "1":
            pytest.fail(f"CI_REQUIRE_SLURM=1 but SLURM is not available: {why}")
        pytest.skip(why)
    partition = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, timeout=30).stdout
    return partition.split()[0].rstrip("*")  # the default partition is marked with '*'


SNAKEFILE = textwrap.dedent(
    """
    from franca.plan import rule_resources

    # a CPU training stage's resources exactly as the workflow computes them (tiny preset: 1 node, no GPU)
    TRAIN_RES = rule_resources({RES_CFG}, "pretrain")

    rule all:
        input: "b.txt"

    rule a:
        output: "a.txt"
        resources: mem_mb=200, runtime=5, cpus_per_task=1
        shell: "echo $SLURM_JOB_ID > {{output}}; hostname >> {{output}}"

    rule b:
        input: "a.txt"
        output: "b.txt"
        resources: **TRAIN_RES
        shell: "echo $SLURM_JOB_ID > {{output}}; echo $SLURM_CPUS_PER_TASK >> {{output}}"
    """
)


def test_two_rules_run_as_slurm_jobs(slurm, tmp_path):
    from franca.config import compose, stage_config

    stage = stage_config(compose("tiny", "franca"), "pretrain")  # a plain dict: its repr is valid Python
    (tmp_path / "Snakefile").write_text(SNAKEFILE.format(RES_CFG=repr(stage)))
    env = {**os.environ, "FRANCA_SLURM_PARTITION": slurm, "PYTHONPATH": str(REPO)}
    env.pop("FRANCA_SLURM_ACCOUNT", None)
    snakemake = Path(sys.executable).with_name("snakemake")
    cmd = ["timeout", "-s", "KILL", str(TIMEOUT_S), str(snakemake), "--profile", str(PROFILE), "--jobs", "2"]
    start = time.monotonic()
    run = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True)
    wall = time.monotonic() - start
    log = run.stdout[-3000:] + run.stderr[-3000:]
    assert run.returncode != 137, f"snakemake hung past {TIMEOUT_S} s (status command?):\n{log}"
    assert run.returncode == 0, log
    a = (tmp_path / "a.txt").read_text().split()
    b = (tmp_path / "b.txt").read_text().split()
    assert a[0].isdigit() and b[0].isdigit() and a[0] != b[0], (a, b)  # two distinct SLURM job ids
    assert b[1] == "1"  # cpus_per_task of the tiny training stage reached sbatch
    print(f"slurm smoke: 2 jobs ({a[0]}, {b[0]}) in {wall:.1f} s")
