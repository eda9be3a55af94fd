"""Helpers of the tests that run the workflow in a copy of the repository (tests/workflow, tests/cluster).

Importable from any test module: pyproject's ``[tool.pytest.ini_options] pythonpath`` puts tests/ on sys.path.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
GIT = ["git", "-c", "user.name=test", "-c", "user.email=test@127.0.0.1", "-c", "init.defaultBranch=main"]


def run(cmd: list[str], cwd: Path, env: Mapping[str, str], timeout: float, check: bool = True):
    """Run ``cmd``; with ``check``, a non-zero exit raises with the command and the tails of its output."""
    result = subprocess.run(cmd, cwd=cwd, env=dict(env), capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}"
        )
    return result


def copy_repo(dest: Path) -> Path:
    """A committed copy of the working tree (tracked and untracked, not ignored files) at ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    env = {"PATH": "/usr/bin:/bin"}
    files = run(["git", "ls-files", "-co", "--exclude-standard"], ROOT, env, 60).stdout.split()
    for rel in files:
        if (ROOT / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dest / rel)
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "copy"]):
        run([*GIT, *args], dest, env, 120)
    return dest


def dry_run_blocks(out: str) -> list[dict[str, str]]:
    """The jobs of a `snakemake -n` listing: {"rule": name, "input": ..., "output": ..., "wildcards": ...}."""
    import re

    jobs = []
    for line in out.splitlines():
        if match := re.match(r"^(?:local)?rule (\w+):$", line):
            jobs.append({"rule": match.group(1)})
        elif jobs and (match := re.match(r"^    (\w+): (.*)$", line)):
            jobs[-1][match.group(1)] = match.group(2)
    return jobs
