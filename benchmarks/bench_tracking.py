"""CPU cost of one job's tracking: mlflow imported in the job (direct sqlite) vs the workflow's local server (REST).

    python benchmarks/bench_tracking.py [--jobs 5]

Each "job" is a fresh Python process that opens a child run, logs 20 params, 100 step metrics, tags and one
artifact, and closes it (what franca.stages.common.job does around a stage). Reported: CPU seconds (user + sys) per
job of each mode, measured side by side in one run on one temporary store, and their ratio. The server's own CPU
is reported too (it is shared by all jobs of a workflow).
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

JOB = """
from pathlib import Path
from franca import tracking
Path("note.txt").write_text("x")
with tracking.Run("job", params={f"p{i}": i for i in range(20)}, tags={"rule": "bench"}) as run:
    for step in range(100):
        run.log_metrics({"loss": 1.0 / (step + 1)}, step)
    run.set_tags({"done": "yes"})
    run.log_artifact("note.txt")
"""


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _job_cpu(env: dict, cwd: Path) -> float:
    before = _children_cpu()
    subprocess.run([sys.executable, "-c", JOB], env=env, cwd=cwd, check=True, capture_output=True)
    return _children_cpu() - before


def _session_cpu(sid: int) -> int:
    """CPU seconds (whole) of every process of session ``sid``: the watchdog and the mlflow server processes."""
    ps = subprocess.run(["ps", "-o", "cputimes=", "--sid", str(sid)], capture_output=True, text=True)
    return sum(int(x) for x in ps.stdout.split())


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=5)
    args = ap.parse_args()
    from franca import tracking, tracking_server

    store = Path(tempfile.mkdtemp(prefix="bench_tracking_"))
    env = {**os.environ, tracking.ENV_URI: f"sqlite:///{store}/mlflow.db", tracking.ENV_EXPERIMENT: "bench"}
    env.pop(tracking.ENV_OFF, None)
    _job_cpu(env, store)  # creates the store (as the workflow's parent run does before the server starts)
    proc, url = tracking_server.start(store / "mlflow.db", store / "mlartifacts", store / "server.log")
    if not tracking_server.wait_until_healthy(proc, url):
        raise RuntimeError(f"tracking server did not start: {store / 'server.log'}")
    startup_cpu = _session_cpu(proc.pid)
    server_env = {**env, tracking.ENV_SERVER: url, tracking.ENV_SERVER_HOST: socket.gethostname()}
    direct, rest = [], []
    for _ in range(args.jobs):  # interleaved, so that machine load affects both alike
        direct.append(_job_cpu(env, store))
        rest.append(_job_cpu(server_env, store))
    server_cpu = _session_cpu(proc.pid) - startup_cpu
    tracking_server.stop(proc)
    mean_d, mean_r = sum(direct) / len(direct), sum(rest) / len(rest)
    print(f"direct (import mlflow, sqlite): {mean_d:.2f} s CPU per job  {[round(x, 2) for x in direct]}")
    print(f"local server (REST):            {mean_r:.2f} s CPU per job  {[round(x, 2) for x in rest]}")
    print(f"ratio direct / server (job side): {mean_d / mean_r:.2f}x")
    print(f"server: start {startup_cpu} s CPU once, then ~{server_cpu / args.jobs:.2f} s per job (whole seconds)")
    print(f"ratio direct / (server + its per-job share): {mean_d / (mean_r + server_cpu / args.jobs):.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
