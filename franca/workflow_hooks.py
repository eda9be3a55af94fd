"""Snakemake onstart / onsuccess / onerror: the MLflow parent run and the DVC ledger.

onstart opens the parent run and exports its id, so that every job (local subprocess or SLURM job, which inherits
the submitting environment) opens its child run under it. onsuccess closes it and records the content hashes of every
phase in `dvc.lock` with `dvc commit` (Snakemake stays the only scheduler; DVC is the ledger and the remote).
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
from collections.abc import Mapping
from pathlib import Path

from franca import provenance, tracking

log = logging.getLogger(__name__)
_SERVER: dict = {}  # the local tracking server of this invocation (franca.tracking_server)
_FORK: dict = {}  # the fork server of this invocation (franca.forkserver)


def onstart(config: Mapping, local_exec: bool = True) -> None:
    if local_exec and config.get("fork_server", True):
        start_fork_server()
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
        log.info("MLflow parent run %s in %s", run_id, os.environ.get(tracking.ENV_URI, tracking.DEFAULT_URI))
        start_tracking_server(config)  # after the parent run: the store exists, so server and jobs never create it


def start_tracking_server(config: Mapping) -> None:
    """With a local sqlite store and ``tracking_server: local``, serve it so that jobs on this host log over REST.

    Jobs check the server's health and fall back to the store itself while it starts (or on another host).
    """
    uri = os.environ.get(tracking.ENV_URI, tracking.DEFAULT_URI)
    if config.get("tracking_server", "local") != "local" or not uri.startswith("sqlite:///"):
        return
    from franca import tracking_server

    db = Path(uri.removeprefix("sqlite:///"))
    proc, url = tracking_server.start(db, tracking.artifact_root(), Path("logs/mlflow-server.log"))
    _SERVER["proc"] = proc
    os.environ[tracking.ENV_SERVER] = url
    os.environ[tracking.ENV_SERVER_HOST] = socket.gethostname()
    log.info("MLflow tracking server %s (log: logs/mlflow-server.log)", url)


def start_fork_server() -> None:
    """Serve warm `franca` processes to the jobs of this host (franca.forkserver); first, as it imports for ~6 s."""
    from franca import forkserver

    proc, path = forkserver.start(Path("logs/forkserver.log"))
    _FORK.update(proc=proc, path=path)
    os.environ[forkserver.ENV_SOCKET] = path
    os.environ[forkserver.ENV_HOST] = socket.gethostname()
    log.info("fork server %s (log: logs/forkserver.log)", path)


def stop_servers() -> None:
    stop_tracking_server()
    if _FORK:
        from franca import forkserver

        os.environ.pop(forkserver.ENV_SOCKET, None)
        forkserver.stop(_FORK.pop("proc"), _FORK.pop("path"))


def stop_tracking_server() -> None:
    proc = _SERVER.pop("proc", None)
    os.environ.pop(tracking.ENV_SERVER, None)
    if proc is not None:
        from franca import tracking_server

        tracking_server.stop(proc)


def onsuccess(config: Mapping) -> None:
    stop_servers()
    tracking.close_parent_run(os.environ.get(tracking.ENV_PARENT), "FINISHED")
    if config.get("dvc", {}).get("commit_on_success", True) and Path("dvc.yaml").exists() and Path(".dvc").is_dir():
        dvc_commit()
        if config.get("dvc", {}).get("push_on_success", False):
            _dvc("push", "--quiet")


def onerror(config: Mapping) -> None:
    stop_servers()
    tracking.close_parent_run(os.environ.get(tracking.ENV_PARENT), "FAILED")


def dvc_commit() -> None:
    """Record the hashes of every phase's outputs in dvc.lock and put them in the DVC cache."""
    import yaml

    for stage in yaml.safe_load(Path("dvc.yaml").read_text())["stages"].values():
        for out in stage.get("outs", []):
            Path(out).mkdir(parents=True, exist_ok=True)  # a phase no experiment ran is recorded as empty
    _dvc("commit", "--force", "--quiet")
    log.info("dvc.lock updated")


def _dvc(*args: str) -> None:
    result = subprocess.run(["dvc", *args], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"dvc {' '.join(args)} failed: {result.stderr.strip()}")
