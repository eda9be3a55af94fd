"""CPU and wall time of one job's tracking, through MLflow's client: a sqlite store vs a local `mlflow server`.

    python benchmarks/bench_tracking.py [--jobs 4] [--concurrency 2]

Each "job" is a fresh Python process that opens a child run (franca.tracking.Run), logs 20 params, 100 step
metrics, tags and one artifact, and closes it (what franca.stages.common.job does around a stage). Jobs run
`--concurrency` at a time, as in a local tiny run (2 cores). Reported per mode: CPU seconds (user + sys) per job,
wall seconds per job, and for the server its start-up CPU and its CPU per job (the server is shared by all jobs of a
workflow, so per-job cost = job + server share, plus its start-up once per workflow).
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
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


def _jobs(env: dict, cwd: Path, n: int, concurrency: int) -> tuple[float, float]:
    """(CPU s per job, wall s per job) of n jobs run `concurrency` at a time."""
    cpu0, wall0 = _children_cpu(), time.perf_counter()
    for start in range(0, n, concurrency):
        procs = [
            subprocess.Popen([sys.executable, "-c", JOB], env=env, cwd=cwd, stdout=subprocess.DEVNULL)
            for _ in range(min(concurrency, n - start))
        ]
        if any(p.wait() != 0 for p in procs):
            raise RuntimeError("a benchmark job failed")
    return (_children_cpu() - cpu0) / n, (time.perf_counter() - wall0) / n * concurrency


def _tree_cpu(pid: int) -> float:
    """CPU seconds of process `pid` and its live descendants (from /proc)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])) / ticks
            todo += [int(c) for t in Path(f"/proc/{p}/task").iterdir() for c in (t / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


def _server(store: Path, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{store}/mlflow.db"]
    cmd += ["--artifacts-destination", (store / "mlartifacts").as_uri(), "--no-serve-artifacts"]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    return subprocess.Popen(cmd, cwd=store, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=4)
    ap.add_argument("--concurrency", type=int, default=2)
    args = ap.parse_args()
    store = Path(tempfile.mkdtemp(prefix="bench_tracking_"))
    env = {
        **os.environ,
        "FRANCA_TRACKING_URI": f"sqlite:///{store}/mlflow.db",
        "FRANCA_MLFLOW_EXPERIMENT": "bench",
        "FRANCA_ARTIFACT_ROOT": str(store / "mlartifacts"),
    }
    env.pop("FRANCA_TRACKING", None)
    _jobs(env, store, 1, 1)  # creates the store and experiment, as the workflow's parent run does
    sqlite_cpu, sqlite_wall = _jobs(env, store, args.jobs, args.concurrency)

    port = 5000 + os.getpid() % 1000
    server = _server(store, port)
    while not _up(port):
        if server.poll() is not None:
            raise RuntimeError("mlflow server exited")
        time.sleep(0.5)
    start_cpu = _tree_cpu(server.pid)
    server_env = {**env, "FRANCA_TRACKING_URI": f"http://127.0.0.1:{port}"}
    http_cpu, http_wall = _jobs(server_env, store, args.jobs, args.concurrency)
    server_share = (_tree_cpu(server.pid) - start_cpu) / args.jobs
    server.terminate()
    server.wait()
    print(f"sqlite store:        {sqlite_cpu:.2f} s CPU, {sqlite_wall:.2f} s wall per job")
    print(f"local mlflow server: {http_cpu:.2f} s CPU, {http_wall:.2f} s wall per job (job side)")
    print(f"  server: {start_cpu:.1f} s CPU to start (once per workflow), {server_share:.2f} s CPU per job")
    print(f"  job + server share: {http_cpu + server_share:.2f} s CPU per job")
    return 0


def _up(port: int) -> bool:
    import httpx

    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


if __name__ == "__main__":
    sys.exit(main())
