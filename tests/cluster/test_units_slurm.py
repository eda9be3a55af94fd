"""Scale rehearsal of the work units on the local SLURM (issue 17, "Done when" 1 and 2).

A LAION-style folder of 8 parquet parts (4,000 URLs: images, permanent 404s, slow URLs and, in one part, 503s of an
outage) served by a loopback server goes through ``--profile workflow/profiles/slurm``: 8 fetch and 8 shard unit
jobs, at least 4 running at once. One fetch unit job is cancelled (``scancel``) after it finished two of its raw
shards; the profile's retry resubmits it and it resumes. The outage unit fails its success-rate floor; once the
outage is over, the next run fetches only its transient failures. Pretraining then trains on the dataset. The
server's request log shows that no finished shard's URLs were requested again. The same folder through the local
profile gives byte-identical shards and manifests.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
import yaml
from url_server import UrlServer

from franca.data.manifest import read_manifest

pytestmark = [pytest.mark.slow, pytest.mark.cluster]
PARTS, ROWS, VICTIM, OUTAGE = 8, 500, 2, 5  # the cancelled unit and the one behind the outage
TARGET = "results/pretrain/franca/s0/stage1/checkpoint.pt"
TIMEOUT_S = 900


def _url(p: int, i: int) -> str:
    n = p * ROWS + i
    if i % 50 == 7:
        return f"/gone/{n}"  # permanent
    if p == VICTIM or i % 50 == 13:
        return f"/slow/{n}.png"
    if p == OUTAGE and i % 5 == 0:
        return f"/outage/{n}.png"  # 503 while the outage lasts
    return f"/img/{n}.png"


def _config(tmp: Path, server: UrlServer) -> Path:
    parts = tmp / "laion"
    parts.mkdir()
    for p in range(PARTS):
        urls = [server.url(_url(p, i)) for i in range(ROWS)]
        pd.DataFrame({"URL": urls, "TEXT": [f"row {p}/{i}" for i in range(ROWS)]}).to_parquet(
            parts / f"part-{p:05d}.parquet"
        )
    web = (
        f"{{source:urls,url_list:'{parts}',url_col:URL,caption_col:TEXT,license:CC-BY-4.0,shard_size:100,"
        "unit_rows:500,timeout:5,retries:0,concurrency:8,allow_private_addresses:true,reencode:never,"
        "min_success_rate:0.9,transient_reruns:3}"
    )
    overrides = [f"+data.datasets.web={web}", "data.pretrain.dataset=web", "run.device=cpu", "optim.iterations=3"]
    overrides += ["optim.warmup_iters=1", "teacher.warmup_teacher_temp_iters=1", "run.checkpoint_period=3"]
    config = {
        "experiments": {"franca": {"seeds": [0], "highres": False, "rasa": False}},
        "overrides": overrides,
        "dvc": {"commit_on_success": False, "push_on_success": False},
    }
    (tmp / "web.yaml").write_text(yaml.safe_dump(config))
    return tmp / "web.yaml"


def _fetch_job_of(unit: str) -> str | None:
    """SLURM job id of the running `franca data fetch ... --unit <unit>` process (from its environment)."""
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            if b"fetch" in argv and unit.encode() in argv and b"--units" in argv:
                env = dict(e.split(b"=", 1) for e in (proc / "environ").read_bytes().split(b"\0") if b"=" in e)
                if b"SLURM_JOB_ID" in env:
                    return env[b"SLURM_JOB_ID"].decode()
        except OSError:
            continue
    return None


class _RunningJobs:
    """The most SLURM jobs seen RUNNING at once (squeue every 0.5 s)."""

    def __init__(self):
        self.most, self.stop = 0, threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()

    def _poll(self):
        while not self.stop.is_set():
            out = subprocess.run(["squeue", "-h", "-t", "RUNNING", "-o", "%i"], capture_output=True, text=True)
            self.most = max(self.most, len(out.stdout.split()))
            time.sleep(0.5)


def _cancel_victim(repo: Path, server: UrlServer, run) -> dict:
    """scancel the victim unit's fetch job once two of its raw shards are finished in its rolling state."""
    state = repo / "work/fetch/web" / f"u{VICTIM:06d}"
    deadline = time.monotonic() + 600
    while len(list(state.glob("*/train/*.parquet"))) < 2:
        assert run.proc.poll() is None, f"snakemake ended before the victim finished 2 shards:\n{run.text()[-4000:]}"
        assert time.monotonic() < deadline, "the victim unit finished no 2 shards in 600 s"
        time.sleep(0.1)
    job = _fetch_job_of(f"u{VICTIM:06d}")
    finished = pd.concat([pd.read_parquet(p) for p in sorted(state.glob("*/train/*.parquet"))])
    mark = len(server.requested())
    subprocess.run(["scancel", job], check=True, timeout=30)
    return {"job": job, "finished": ["/" + u.split("/", 3)[3] for u in finished["url"]], "mark": mark}


def _data_files(repo: Path) -> dict[str, str]:
    files = sorted((repo / "data/web/units").rglob("*.tar")) + sorted(
        (repo / "data/web/units").glob("*/manifest.parquet")
    )
    return {str(p.relative_to(repo)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.mark.timeout(2400)
def test_units_on_slurm_survive_scancel_outage_and_match_local(cluster, slurm_up, tmp_path):
    server = UrlServer(slow_s=0.15)
    try:
        _rehearse(cluster, slurm_up, tmp_path, server)
    finally:
        server.close()


def _rehearse(cluster, slurm_up, tmp_path, server):
    config = _config(tmp_path, server)
    repo = cluster.copy_repo(tmp_path / "slurm" / "repo")
    env = cluster.run_env(FRANCA_SLURM_PARTITION=slurm_up)
    args = [TARGET, "--profile", "workflow/profiles/slurm", f"--configfile={config}", "--retries", "1"]
    # run 1: an outage behind 100 rows of part 5; one unit job cancelled mid-way (retried by --retries 1)
    server.outage, running = True, _RunningJobs()
    run = cluster.Background(cluster.snakemake_cmd(TIMEOUT_S, *args, "--keep-going"), repo, tmp_path / "r1.log", env)
    try:
        victim = _cancel_victim(repo, server, run)
        with pytest.raises(AssertionError, match="failed"):
            run.wait(TIMEOUT_S)  # the outage unit fails its floor, twice (one retry)
    finally:
        run.stop()
        running.stop.set()
        cluster.scancel(cluster.submitted_jobs(run.text()))
    # 8 fetch + 7 shard unit jobs, the victim's resubmission and the outage unit's retry
    assert len(cluster.submitted_jobs(run.text())) == 17, run.text()[-3000:]
    assert running.most >= 4, f"at most {running.most} SLURM jobs ran at once"
    state = subprocess.run(
        ["squeue", "-h", "-t", "all", "-j", victim["job"], "-o", "%T"], capture_output=True, text=True
    )
    assert state.stdout.strip() == "CANCELLED", state
    after = Counter(server.requested()[victim["mark"] :])
    again = [u for u in victim["finished"] if after[u]]
    assert not again, f"finished shards' URLs requested again after scancel: {again[:5]}"
    assert (repo / f"data/web/raw/u{VICTIM:06d}/train/fetch_report.json").is_file()  # the resubmitted job finished
    floor = (repo / f"logs/fetch/web/u{OUTAGE:06d}.log").read_text()
    assert f"unit u{OUTAGE:06d}: success rate 78.0%" in floor and "http_503 (100, transient)" in floor, floor[-2000:]
    assert not (repo / f"data/web/raw/u{OUTAGE:06d}/train").exists()

    # run 2: the outage is over; only the 100 transient failures are fetched again, then pretraining runs
    server.outage, mark = False, len(server.requested())
    cluster.sh(cluster.snakemake_cmd(TIMEOUT_S, *args), repo, TIMEOUT_S + 60, **{"FRANCA_SLURM_PARTITION": slurm_up})
    second = server.requested()[mark:]
    assert sorted(second) == sorted(_url(OUTAGE, i) for i in range(0, ROWS, 5) if i % 50 != 7), second[:5]
    # every other unit requested each of its URLs exactly once (the victim's killed shard and the outage unit's
    # transient failures are the only URLs that may be requested again)
    counts = Counter(server.requested())
    twice = {u: counts[u] for p in set(range(PARTS)) - {VICTIM, OUTAGE} for i in range(ROWS) if counts[_url(p, i)] != 1
             for u in [_url(p, i)]}  # fmt: skip
    assert not twice, f"URLs not requested exactly once: {sorted(twice.items())[:10]}"
    manifest = read_manifest(repo / "data/web/manifest")
    assert len(manifest) == PARTS * ROWS and manifest["key"].is_unique  # every row accounted once
    reasons = manifest.loc[manifest["status"] != "ok", "reason"].value_counts().to_dict()
    assert reasons == {"http_404": PARTS * ROWS // 50}, reasons  # no 503 left: the transients were recovered
    record = json.loads((repo / TARGET).with_name("provenance.json").read_text())
    shards = [p for p in record["inputs"] if p.endswith(".tar")]
    # recorded under the dataset handle's names (gather's links), each the same file as its unit's shard
    assert len(shards) == PARTS * 5 and all(p.startswith("data/web/shards/") for p in shards), shards[:3]
    units = repo / "data/web/units"
    assert all(os.path.samefile(repo / p, units / p.split("-")[1] / "shards" / Path(p).name) for p in shards), shards

    # the same folder through the local profile: identical shards and manifests, byte for byte
    local = cluster.copy_repo(tmp_path / "local" / "repo")
    target = ["data/web/manifest", "--profile", "workflow/profiles/local", "--cores", "2", f"--configfile={config}"]
    cluster.sh(cluster.snakemake_cmd(TIMEOUT_S, *target), local, TIMEOUT_S + 60)
    mine, ref = _data_files(repo), _data_files(local)
    assert len(mine) == PARTS * 6 and mine == ref
