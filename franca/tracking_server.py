"""The workflow's local MLflow tracking server: started by onstart, stopped by onsuccess/onerror (workflow_hooks).

Jobs on this host then log through franca.tracking_rest (no mlflow import per job); the server writes the same
sqlite store. ``python -m franca.tracking_server`` is a watchdog around ``mlflow server``: it stops the server when
the Snakemake process that started it is gone (killed with SIGKILL, say), so no server outlives its workflow.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from franca.sessions import process_alive, stop_session

log = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(db: Path, artifacts: Path, port: int) -> list[str]:
    mlflow = Path(sys.executable).with_name("mlflow")
    launcher = [str(mlflow)] if mlflow.exists() else [sys.executable, "-m", "mlflow"]
    return [
        *launcher, "server",
        "--backend-store-uri", f"sqlite:///{db.resolve()}",
        "--default-artifact-root", artifacts.resolve().as_uri(),
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]  # fmt: skip


def start(db: Path, artifacts: Path, log_file: Path) -> tuple[subprocess.Popen, str]:
    """Start the watchdog (and through it the server) in its own session; returns (process, base URL)."""
    port = free_port()
    log_file.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "franca.tracking_server", "--parent-pid", str(os.getpid()), "--"]
    cmd += server_command(db, artifacts, port)
    # no job runner: MLflow 3 otherwise starts 8 more processes (huey consumers, ~5 s of CPU each to import mlflow)
    # for server-side GenAI jobs that tracking does not use
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with log_file.open("ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    return proc, f"http://127.0.0.1:{port}"


def wait_until_healthy(proc: subprocess.Popen, url: str, timeout: float = 120.0) -> bool:
    """Poll the server's ``/health`` until it answers (True), it exits or ``timeout`` passes (False)."""
    from franca.tracking_rest import healthy

    deadline = time.time() + timeout
    while proc.poll() is None and time.time() < deadline:
        if healthy(url):
            return True
        time.sleep(0.5)
    return False


def stop(proc: subprocess.Popen, timeout: float = 15.0) -> None:
    """Terminate the watchdog's whole session (watchdog, mlflow server, uvicorn) and wait until it is gone."""
    stop_session(proc, timeout)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--parent-pid", type=int, required=True)
    ap.add_argument("command", nargs=argparse.REMAINDER, help="-- mlflow server ...")
    args = ap.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    server = subprocess.Popen(command)  # in this process's session and group (start() made it a new session)
    while server.poll() is None:
        if not process_alive(args.parent_pid):  # the workflow is gone: stop the whole group, mlflow's children included
            os.killpg(os.getpgrp(), signal.SIGTERM)
        time.sleep(1.0)
    return server.returncode


if __name__ == "__main__":
    sys.exit(main())
