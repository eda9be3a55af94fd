"""The fork server (franca/forkserver.py): a job forked from it gives the same bytes as a fresh process, carries the
caller's exit status, cwd and environment, dies with its caller, and `franca` runs in-process without it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from franca import forkserver

BIN = Path(sys.executable).parent
SMALL = {
    "data.datasets.synth.n_train": 120,
    "data.datasets.synth.n_val": 16,
    "data.datasets.synth.n_test": 16,
    "data.datasets.synth.shard_size": 60,
    "optim.iterations": 2,
    "optim.warmup_iters": 1,
    "train.batch_size_per_gpu": 8,
}


def config_args(**changes) -> list[str]:
    overrides = {**SMALL, **{k.replace("__", "."): v for k, v in changes.items()}}
    return [a for k, v in overrides.items() for a in ("--override", f"{k}={v}")] + [
        "--preset", "tiny", "--experiment", "franca", "--seed", "0",
    ]  # fmt: skip


ARGS = config_args()


def env_for(server: str | None) -> dict[str, str]:
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "FRANCA_PROGRESS": "0", "FRANCA_TRACKING": "off"}
    for key in (forkserver.ENV_SOCKET, forkserver.ENV_HOST, "SLURM_JOB_ID", "LOCAL_RANK"):
        env.pop(key, None)
    if server:
        env[forkserver.ENV_SOCKET] = server
    return env


def franca(args: list[str], cwd: Path, server: str | None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["franca", *args], cwd=cwd, env=env_for(server), capture_output=True, text=True, timeout=600, **kw
    )


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log = tmp_path_factory.mktemp("fork") / "server.log"
    proc, path = forkserver.start(log)
    deadline = time.time() + 120
    while not os.path.exists(path) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert os.path.exists(path), log.read_text()
    yield {"path": path, "log": log}
    forkserver.stop(proc, path)
    assert not os.path.exists(path)


@pytest.fixture(scope="module")
def data(tmp_path_factory, server):
    """The tiny data phases, shrunk, run through the server."""
    work = tmp_path_factory.mktemp("work")
    for step in (
        ["data", "fetch", "--dataset", "synth", "--out", "data/synth/raw"],
        ["data", "shard", "--dataset", "synth", "--raw", "data/synth/raw", "--out", "data/synth"],
        ["data", "dedup", "--out", "data/dedup"],
    ):
        result = franca([*step, *ARGS, "--threads", "1"], work, server["path"])
        assert result.returncode == 0, result.stderr[-3000:]
    return work


def checkpoint_tensors(path: Path) -> dict[str, torch.Tensor]:
    state = torch.load(path, map_location="cpu", weights_only=False)
    flat = {}

    def walk(prefix, value):
        if isinstance(value, torch.Tensor):
            flat[prefix] = value
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}/{k}", v)

    walk("", state)
    return flat


def test_forked_pretrain_equals_fresh_process(data, server):
    """Same argv forked and in a fresh interpreter: identical weights (RNG, threads and workers as in a new process)."""
    outs = {}
    for name, via in (("forked", server["path"]), ("fresh", None)):
        out = f"results/pretrain/{name}"
        result = franca(["pretrain", "--stage-index", "1", "--out", out, *ARGS, "--threads", "2"], data, via)
        assert result.returncode == 0, result.stderr[-3000:]
        outs[name] = checkpoint_tensors(data / out / "checkpoint.pt")
    assert "pretrain --stage-index 1 --out results/pretrain/forked" in server["log"].read_text()
    assert "results/pretrain/fresh" not in server["log"].read_text()
    forked, fresh = outs["forked"], outs["fresh"]
    assert forked.keys() == fresh.keys() and len(forked) > 10
    for key in forked:
        assert torch.equal(forked[key], fresh[key]), key


def test_exit_status_output_cwd_and_environment(server, tmp_path):
    bad = franca(["eval", "no_such_benchmark", "--features", "x.pt"], tmp_path, server["path"])
    fresh = franca(["eval", "no_such_benchmark", "--features", "x.pt"], tmp_path, None)
    assert bad.returncode == fresh.returncode == 2
    assert "invalid choice: 'no_such_benchmark'" in bad.stderr and bad.stderr == fresh.stderr
    # the child sees the caller's cwd and environment: `franca audit` of a missing path names it, relative to cwd
    env = env_for(server["path"])
    result = subprocess.run(
        ["franca", "audit", "missing/provenance.json"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert result.returncode != 0 and "missing/provenance.json" in result.stderr
    log = server["log"].read_text()
    assert "franca audit missing/provenance.json" in log and "franca eval no_such_benchmark" in log


def test_in_process_without_server_or_inside_slurm(server, tmp_path):
    gone = franca(["eval", "knn", "--help"], tmp_path, str(tmp_path / "no-server.sock"))
    assert gone.returncode == 0 and "--features" in gone.stdout
    before = server["log"].read_text().count("franca eval knn --help")
    env = {**env_for(server["path"]), "SLURM_JOB_ID": "42"}
    inside = subprocess.run(["franca", "eval", "knn", "--help"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert inside.returncode == 0 and "--features" in inside.stdout
    assert server["log"].read_text().count("franca eval knn --help") == before  # not forked for a SLURM job
    closed_stdin = subprocess.run(  # a closed fd 0 is not sent: the job runs in-process
        ["bash", "-c", "exec 0<&-; franca eval knn --help"], cwd=tmp_path, env=env_for(server["path"]),
        capture_output=True, text=True,
    )  # fmt: skip
    assert closed_stdin.returncode == 0 and "--features" in closed_stdin.stdout, closed_stdin.stderr
    assert server["log"].read_text().count("franca eval knn --help") == before


def test_killed_caller_kills_its_child(data, server):
    """Snakemake cancels a job by killing its process: the forked child and its workers stop too."""
    out = "results/pretrain/killed"
    cmd = ["franca", "pretrain", "--stage-index", "1", "--out", out]
    cmd += config_args(optim__iterations=500, run__num_workers=1)  # a DataLoader worker: a grandchild
    proc = subprocess.Popen(
        cmd, cwd=data, env=env_for(server["path"]), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    child = _wait_for_child(server["log"], out)
    proc.send_signal(signal.SIGTERM)
    proc.wait(30)
    deadline = time.time() + 30
    while _group_alive(child) and time.time() < deadline:
        time.sleep(0.2)
    assert not _group_alive(child), f"forked child {child} or its workers still run after its caller was killed"
    assert not (data / out / "checkpoint.pt").exists()


def _wait_for_child(log: Path, needle: str, timeout: float = 60) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline:
        for line in log.read_text().splitlines():
            if needle in line and ": franca " in line:
                return int(line.split(" pid ")[1].split(":")[0])
        time.sleep(0.1)
    raise AssertionError(f"the server never forked a child for {needle}:\n{log.read_text()}")


def _group_alive(pgid: int) -> bool:
    """A process of group ``pgid`` that is not a zombie (the child, its DataLoader workers)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(") ", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":  # fields: state, ppid, pgrp, ...
            return True
    return False


def test_child_exit_codes_and_thread_environment(monkeypatch, capsys):
    """SystemExit codes as the interpreter reports them; thread pools sized from the caller's OMP_NUM_THREADS."""

    def exits(code):
        def main(argv):
            raise SystemExit(code)

        return main

    assert forkserver._run_main(exits(None), []) == 0
    assert forkserver._run_main(exits(3), []) == 3
    assert forkserver._run_main(exits("no such file: x.pt"), []) == 1
    assert "no such file: x.pt" in capsys.readouterr().err
    assert forkserver._run_main(lambda argv: 1 / 0, []) == 1
    assert "ZeroDivisionError" in capsys.readouterr().err

    from threadpoolctl import threadpool_info, threadpool_limits

    before = torch.get_num_threads()
    with threadpool_limits(limits=None):  # restores the pools' sizes afterwards
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        for var in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # set by the call: restored after the test
            monkeypatch.delenv(var, raising=False)
        forkserver._apply_thread_env()
        assert torch.get_num_threads() == 1
        assert all(pool["num_threads"] == 1 for pool in threadpool_info())
    torch.set_num_threads(before)
