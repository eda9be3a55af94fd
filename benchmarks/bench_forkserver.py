"""CPU and wall time of `franca` jobs started fresh vs forked from the workflow's fork server (franca/forkserver.py).

    python benchmarks/bench_forkserver.py [--repeats 2]

The jobs are the tiny data phases (fetch, shard, dedup) on a shrunk synthetic set, in a temporary directory, run
one after the other: first as fresh processes, then through a fork server started for the benchmark, then fresh
again (the two fresh passes bound the drift of a shared machine). Reported per job and in total: wall seconds, CPU
seconds (caller + forked child, from the server's wait4 log), the ratios, and the server's one-time import cost.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SMALL = ["data.datasets.synth.n_train=200", "data.datasets.synth.n_val=20", "data.datasets.synth.n_test=20"]
CONFIG = [a for o in SMALL for a in ("--override", o)] + ["--preset", "tiny", "--threads", "1"]
JOBS = {
    "fetch": ["data", "fetch", "--dataset", "synth", "--out", "data/synth/raw"],
    "shard": ["data", "shard", "--dataset", "synth", "--raw", "data/synth/raw", "--out", "data/synth"],
    "dedup": ["data", "dedup", "--out", "data/dedup"],
}


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _forked_cpu(log: Path, offset: int) -> tuple[float, int]:
    """CPU seconds of the child the server reaped after ``offset`` in its log, and the new offset."""
    text = log.read_text()
    for match in re.finditer(r"exit \d+ \(cpu user ([\d.]+) s, sys ([\d.]+) s", text[offset:]):
        return float(match.group(1)) + float(match.group(2)), len(text)
    raise RuntimeError(f"no child exit in {log} after offset {offset}")


def run_pass(work: Path, env: dict, server_log: Path | None) -> dict[str, tuple[float, float]]:
    """{job: (wall s, cpu s)} for the three jobs in a fresh working directory."""
    work.mkdir(parents=True)
    out, offset = {}, server_log.stat().st_size if server_log else 0
    for name, args in JOBS.items():
        cpu0, t0 = _children_cpu(), time.perf_counter()
        subprocess.run([Path(sys.executable).with_name("franca"), *args, *CONFIG], cwd=work, env=env, check=True,
                       capture_output=True)  # fmt: skip
        wall, cpu = time.perf_counter() - t0, _children_cpu() - cpu0
        if server_log is not None:
            child, offset = _forked_cpu(server_log, offset)
            cpu += child
        out[name] = (wall, cpu)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    from franca import forkserver

    root = Path(tempfile.mkdtemp(prefix="bench_forkserver_"))
    env = {**os.environ, "FRANCA_TRACKING": "off", "FRANCA_PROGRESS": "0"}
    for key in (forkserver.ENV_SOCKET, forkserver.ENV_HOST, "SLURM_JOB_ID"):
        env.pop(key, None)
    log = root / "server.log"
    cpu0, t0 = _children_cpu(), time.perf_counter()
    proc, path = forkserver.start(log)
    while not os.path.exists(path):
        time.sleep(0.05)
    startup_wall = time.perf_counter() - t0
    passes: dict[str, list] = {"fresh": [], "forked": []}
    try:
        for r in range(args.repeats):
            passes["fresh"].append(run_pass(root / f"fresh{r}", env, None))
            passes["forked"].append(run_pass(root / f"forked{r}", {**env, forkserver.ENV_SOCKET: path}, log))
    finally:
        forkserver.stop(proc, path)
    # after stop() the server and the children it reaped count in our RUSAGE_CHILDREN: what the passes did not use
    # is the server's own CPU (its imports and its select loop), paid once per workflow
    measured = sum(c for runs in passes.values() for p in runs for _, c in p.values())
    server_cpu = _children_cpu() - cpu0 - measured
    print(f"server: serving after {startup_wall:.1f} s; its own CPU {server_cpu:.1f} s (once per workflow)")
    print(f"{'job':8s} {'fresh wall':>10s} {'forked wall':>11s} {'ratio':>6s} {'fresh cpu':>10s} {'forked cpu':>10s}")
    totals = [0.0, 0.0, 0.0, 0.0]
    for name in JOBS:
        fw = min(p[name][0] for p in passes["fresh"])
        kw = min(p[name][0] for p in passes["forked"])
        fc = min(p[name][1] for p in passes["fresh"])
        kc = min(p[name][1] for p in passes["forked"])
        totals = [a + b for a, b in zip(totals, (fw, kw, fc, kc), strict=True)]
        print(f"{name:8s} {fw:10.2f} {kw:11.2f} {fw / kw:5.1f}x {fc:10.2f} {kc:10.2f}")
    fw, kw, fc, kc = totals
    print(f"{'total':8s} {fw:10.2f} {kw:11.2f} {fw / kw:5.1f}x {fc:10.2f} {kc:10.2f}  (cpu ratio {fc / kc:.1f}x)")
    print(f"minimum over {args.repeats} passes each; cpu = caller + forked child (user + sys)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
