"""Scale rehearsal of the work units on the local SLURM (issue 17, "Done when" 1 and 2).

A LAION-style folder of 8 parquet parts (4,000 URLs: images, permanent 404s, slow URLs and, in one part, 503s of an
outage) served by a loopback server goes through ``--profile workflow/profiles/slurm`` in one Snakemake run: 8 fetch
and 8 shard unit jobs, at least 4 running at once. One fetch unit job, the victim, is cancelled (``scancel``) after it
finished two of its raw shards; the retry resubmits it and it resumes. The victim is the unit whose job reached the
server first: the server then makes all its images slow, so that it can be cancelled mid-way, and its chain (cancel,
retry, shard) starts with the first wave of jobs rather than behind it. The outage unit fails its success-rate floor,
publishing nothing; the outage is then over (each 503 URL fails only its first request), and the unit's retry fetches
only its transient failures. Pretraining then trains on the gathered dataset. The server's request log shows that no
finished shard's URLs were requested again. The same folder through the local profile gives byte-identical shards
and manifests for the victim, the outage unit and a plain one.

Speed (on 2 cores the SLURM jobs are CPU-bound: each starts Snakemake twice and one franca command): one Snakemake run
instead of two (the outage unit recovers on its retry, not on a second run), ``gather`` runs on the submitting host
(``localrules``), and the local comparison runs while the SLURM run shards and pretrains, at the lowest CPU priority
(it is not on the critical path): it starts once every SLURM fetch has published, so that every request after that
point is the local run's. The pending jobs of the victim and the outage unit go to the front of the SLURM queue.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
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
PARTS, ROWS, OUTAGE = 8, 500, 5  # OUTAGE: the part behind the outage (the victim is chosen by the server)
TARGET = "results/pretrain/franca/s0/stage1/checkpoint.pt"
TIMEOUT_S = 900


def _unit(p: int) -> str:
    return f"u{p:06d}"


def _url(p: int, i: int) -> str:
    n = p * ROWS + i
    if i % 50 == 7:
        return f"/gone/{n}"  # permanent
    if i % 50 == 13:
        return f"/slow/{n}.png"
    if p == OUTAGE:  # a 503 on its first request (the outage), then the image
        return f"/outage/{n}.png" if i % 5 == 0 else f"/img/{n}.png"
    return f"/first/{n}.png"  # slow in the part whose job reached the server first (the victim), else an image


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


class _Queue:
    """squeue every 0.5 s: the most SLURM jobs seen RUNNING at once. Each pending job of the units the test waits on
    (the outage unit, and the victim once the server has chosen it: their retries and shards) is moved to the front of
    the queue (`scontrol top`), so that their chains do not wait behind the other units' jobs (speed only)."""

    def __init__(self, server: UrlServer):
        self.server, self.most, self.topped, self.stop = server, 0, set(), threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()

    def _poll(self):
        while not self.stop.is_set():
            out = subprocess.run(["squeue", "-h", "-o", "%i|%T|%k"], capture_output=True, text=True)
            jobs = [line.split("|") for line in out.stdout.split()]  # id, state, comment (rule_<rule>_wildcards_...)
            self.most = max(self.most, sum(state == "RUNNING" for _, state, _ in jobs))
            units = {_unit(p) for p in (OUTAGE, self.server.slow_group) if p is not None}
            urgent = [j for j, state, name in jobs if state == "PENDING" and name.split("_")[-1] in units]
            if urgent := [j for j in urgent if j not in self.topped]:
                subprocess.run(["scontrol", "top", ",".join(urgent)], capture_output=True, timeout=30)
                self.topped.update(urgent)
            time.sleep(0.5)


def _watch(repo: Path, server: UrlServer, run) -> dict:
    """Until both happened: scancel the victim unit's fetch job once two of its raw shards are finished in its rolling
    state; read the outage unit's floor failure from its fetch log (its retry's log replaces it some seconds later:
    two Snakemake starts in the new job) and whether its raw output existed then."""
    log = repo / f"logs/fetch/web/{_unit(OUTAGE)}.log"
    seen, deadline = {}, time.monotonic() + 600
    while len(seen) < 2:
        assert run.proc.poll() is None, f"snakemake ended before the cancel and the floor:\n{run.text()[-4000:]}"
        assert time.monotonic() < deadline, f"in 600 s only {sorted(seen)} of victim, floor happened"
        victim = server.slow_group  # None until the first /first/ request
        state = repo / "work/fetch/web" / _unit(victim or 0)
        if victim is not None and "victim" not in seen and len(list(state.glob("*/train/*.parquet"))) >= 2:
            seen["victim"] = _cancel_victim(victim, state, server)
        text = log.read_text() if "floor" not in seen and log.is_file() else ""
        if re.search(r"success rate .*\n", text):
            published = (repo / f"data/web/raw/{_unit(OUTAGE)}/train").exists()
            seen["floor"] = {"log": text, "published": published}
        time.sleep(0.1)
    return seen


def _cancel_victim(victim: int, state: Path, server: UrlServer) -> dict:
    job = _fetch_job_of(_unit(victim))
    finished = pd.concat([pd.read_parquet(p) for p in sorted(state.glob("*/train/*.parquet"))])
    mark = len(server.requested())
    subprocess.run(["scancel", job], check=True, timeout=30)
    for _ in range(300):  # squeue shows a finished job for MinJobAge (300 s): read its state now, not after the run
        out = subprocess.run(["squeue", "-h", "-t", "all", "-j", job, "-o", "%T"], capture_output=True, text=True)
        if out.stdout.strip() not in ("RUNNING", "COMPLETING"):
            break
        time.sleep(0.1)
    urls = ["/" + u.split("/", 3)[3] for u in finished["url"]]
    return {"part": victim, "job": job, "finished": urls, "mark": mark, "state": out.stdout.strip()}


def _wait_fetched(repo: Path, run) -> None:
    """Until every unit's raw output is published (each unit's last fetch has made all its requests)."""
    raw = [repo / f"data/web/raw/{_unit(p)}/train" for p in range(PARTS)]
    deadline = time.monotonic() + TIMEOUT_S
    while not all(r.is_dir() for r in raw):
        assert run.proc.poll() is None, f"snakemake ended before every unit was fetched:\n{run.text()[-4000:]}"
        assert time.monotonic() < deadline, f"unfetched after {TIMEOUT_S} s: {[r for r in raw if not r.is_dir()]}"
        time.sleep(0.2)


def _data_files(repo: Path, units: list[int]) -> dict[str, str]:
    dirs = [repo / "data/web/units" / _unit(p) for p in units]
    files = [f for d in dirs for f in sorted(d.rglob("*.tar"))] + [d / "manifest.parquet" for d in dirs]
    return {str(p.relative_to(repo)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.mark.timeout(1800)
def test_units_on_slurm_survive_scancel_outage_and_match_local(cluster, slurm_up, tmp_path):
    # each /outage/ URL: a 503 on its first request, then the image; /first/ URLs: slow in the first part requested
    server = UrlServer(slow_s=0.15, outage_requests=1, group_rows=ROWS)
    try:
        _rehearse(cluster, slurm_up, tmp_path, server)
    finally:
        server.close()


def _rehearse(cluster, slurm_up, tmp_path, server):
    t0, times = time.monotonic(), {}
    config = _config(tmp_path, server)
    repo = cluster.copy_repo(tmp_path / "slurm" / "repo")
    local = cluster.copy_repo(tmp_path / "local" / "repo")
    env = cluster.run_env(FRANCA_SLURM_PARTITION=slurm_up)
    args = [TARGET, "--profile", "workflow/profiles/slurm", f"--configfile={config}", "--retries", "1"]
    # the SLURM run: one unit job cancelled mid-way and the outage unit's failed job, each retried once
    queue = _Queue(server)
    run = cluster.Background(cluster.snakemake_cmd(TIMEOUT_S, *args), repo, tmp_path / "slurm.log", env)
    local_run = None
    try:
        seen = _watch(repo, server, run)
        times["cancel+floor"] = time.monotonic() - t0
        victim = seen["victim"]["part"]
        plain = min(set(range(PARTS)) - {victim, OUTAGE})
        compared = [plain, victim, OUTAGE]
        _wait_fetched(repo, run)
        times["all fetched"] = time.monotonic() - t0
        # every request from here on is the local run's (fetch, then shard, on 2 cores while SLURM shards/pretrains)
        slurm_requests = server.requested()
        local_args = [f"data/web/units/{_unit(p)}/manifest.parquet" for p in compared]
        local_args += ["--profile", "workflow/profiles/local", "--cores", "2", f"--configfile={config}"]
        local_cmd = ["nice", "-n", "19", *cluster.snakemake_cmd(TIMEOUT_S, *local_args)]
        local_run = cluster.Background(local_cmd, local, tmp_path / "local.log", cluster.run_env())
        run.wait(TIMEOUT_S)
        times["slurm run"] = time.monotonic() - t0
        local_run.wait(TIMEOUT_S)
        times["local run"] = time.monotonic() - t0
    finally:
        run.stop()
        if local_run is not None:
            local_run.stop()
        queue.stop.set()
        cluster.scancel(cluster.submitted_jobs(run.text()))
    print("units on SLURM, seconds since the start:", {k: round(v) for k, v in times.items()}, "topped", queue.topped)
    log = run.text()

    # 8 fetch, 8 shard and 1 pretrain job, plus the victim's resubmission and the outage unit's retry (gather is local)
    assert len(cluster.submitted_jobs(log)) == 19, log[-3000:]
    assert queue.most >= 4, f"at most {queue.most} SLURM jobs ran at once"
    cancelled = seen["victim"]
    assert cancelled["state"] == "CANCELLED" and victim != OUTAGE, cancelled
    after = Counter(slurm_requests[cancelled["mark"] :])
    again = [u for u in cancelled["finished"] if after[u]]
    assert not again, f"finished shards' URLs requested again after scancel: {again[:5]}"
    assert (repo / f"data/web/raw/{_unit(victim)}/train/fetch_report.json").is_file()  # the resubmitted job finished
    floor = seen["floor"]
    assert f"unit {_unit(OUTAGE)}: success rate 78.0%" in floor["log"], floor["log"][-2000:]
    assert "http_503 (100, transient)" in floor["log"] and not floor["published"], floor

    # the outage unit's retry requested its 100 transient failures again, nothing else; every other unit but the
    # victim (whose killed shard's URLs may be requested again) requested each of its URLs exactly once
    counts = Counter(slurm_requests)
    outage = {_url(OUTAGE, i): 1 + _url(OUTAGE, i).startswith("/outage/") for i in range(ROWS)}
    assert sum(outage.values()) == ROWS + 100 and {u: counts[u] for u in outage} == outage
    twice = {u: counts[u] for p in set(range(PARTS)) - {victim, OUTAGE} for i in range(ROWS) if counts[_url(p, i)] != 1
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

    # the same folder through the local profile: each URL of its 3 units requested once, and identical shards and
    # manifests, byte for byte
    local_requests = Counter(server.requested()[len(slurm_requests) :])
    assert local_requests == Counter(_url(p, i) for p in compared for i in range(ROWS))
    mine, ref = _data_files(repo, compared), _data_files(local, compared)
    assert len(mine) == 3 * 6 and mine == ref
