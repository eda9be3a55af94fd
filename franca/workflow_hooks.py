"""Snakemake onstart / onsuccess / onerror: the MLflow parent run and the DVC ledger.

onstart opens the parent run and exports its id, so that every job (local subprocess or SLURM job, which inherits
the submitting environment) opens its child run under it. onsuccess closes it and records the content hashes of every
phase in `dvc.lock` with `dvc commit` (Snakemake stays the only scheduler; DVC is the ledger and the remote).
"""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Mapping
from pathlib import Path

from franca import provenance, tracking

log = logging.getLogger(__name__)


def onstart(config: Mapping, local_exec: bool = True) -> None:
    """Open the parent run (``local_exec`` is kept for the rules' call; every job is a plain process)."""
    code = provenance.code_version()
    tags = {
        "run_name": f"workflow-{config['preset']}",
        "kind": "workflow",
        "preset": config["preset"],
        "experiments": ",".join(config["experiments"]),
        "git_commit": code["git_commit"],
        "git_dirty": str(code["dirty"]),
    }
    run_id = tracking.open_parent_run(tags)
    if run_id:
        os.environ[tracking.ENV_PARENT] = run_id
        Path(".snakemake").mkdir(exist_ok=True)
        Path(".snakemake/franca_parent_run").write_text(run_id + "\n")
        log.info("MLflow parent run %s in %s", run_id, tracking.tracking_uri())
    sync_tracking()


def sync_tracking() -> None:
    """Upload the records of jobs that could not reach the tracking store (franca.tracking_pending)."""
    from franca.tracking_pending import sync_pending

    left = sync_pending()
    if left:
        log.warning("%d pending tracking records could not be uploaded yet (%s)", left, tracking.pending_dir())


def onsuccess(config: Mapping) -> None:
    sync_tracking()
    tracking.close_parent_run(os.environ.get(tracking.ENV_PARENT), "FINISHED")
    if config.get("dvc", {}).get("commit_on_success", True) and Path("dvc.yaml").exists() and Path(".dvc").is_dir():
        dvc_commit()
        if config.get("dvc", {}).get("push_on_success", False):
            _dvc("push", "--quiet")


def onerror(config: Mapping) -> None:
    sync_tracking()
    tracking.close_parent_run(os.environ.get(tracking.ENV_PARENT), "FAILED")


def dvc_commit() -> None:
    """Record the hashes of every phase's outputs in dvc.lock and put them in the DVC cache."""
    import yaml

    for stage in yaml.safe_load(Path("dvc.yaml").read_text())["stages"].values():
        for out in stage.get("outs", []):
            Path(out).mkdir(parents=True, exist_ok=True)  # a phase no experiment ran is recorded as empty
    times = _times([out for stage in yaml.safe_load(Path("dvc.yaml").read_text())["stages"].values()
                    for out in stage.get("outs", [])])  # fmt: skip
    _dvc("commit", "--force", "--quiet")
    # `dvc commit` copies into the cache unless the first cache type is hardlink; relinking replaces each workspace
    # copy with a reflink / hardlink / symlink to the cache (.dvc/config), so a dataset is not kept twice
    _dvc("checkout", "--relink", "--quiet")
    _restore_times(times)  # the links carry the cache's times: put back the run's, so that nothing looks newer
    log.info("dvc.lock updated")


def _times(roots: list[str]) -> dict[Path, tuple[int, int]]:
    """(atime_ns, mtime_ns) of every file and directory under ``roots``."""
    paths = [p for root in roots for p in [Path(root), *Path(root).rglob("*")] if p.exists()]
    return {p: (p.stat().st_atime_ns, p.stat().st_mtime_ns) for p in paths}


def _restore_times(times: dict[Path, tuple[int, int]]) -> None:
    """Files first, then directories deepest first (relinking a file touches its directory)."""
    for path in sorted(times, key=lambda p: (p.is_dir(), -len(p.parts))):
        if path.exists():
            os.utime(path, ns=times[path])


def _dvc(*args: str) -> None:
    result = subprocess.run(["dvc", *args], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"dvc {' '.join(args)} failed: {result.stderr.strip()}")
