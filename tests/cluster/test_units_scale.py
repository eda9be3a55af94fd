"""Paper-scale DAG with work units (issue 17 item 5): `snakemake -n` of paper_vitl14_laion with 600 URL units stays
fast, and `franca plan` lists the unit jobs with their wall time from the measured per-core throughput."""

from __future__ import annotations

import math
import os
import re
import resource
import time

import pandas as pd
import pytest
import repo_copy
import yaml
from repo_copy import BIN, copy_repo, run

from franca.plan import CLUSTER_DEFAULTS, cluster_settings, main, plan, recorded_fetch_rate, unit_jobs, unit_rate

UNIT_ROWS = 100
OVERRIDES = ["data.datasets.laion.unit_rows=100"]


def _parts(folder, n_parts=60, rows=1000):
    """A LAION-style folder of parquet parts (URL, TEXT): metadata only, no image behind any URL."""
    folder.mkdir()
    for p in range(n_parts):
        urls = [f"http://h{p}.example/{i}.jpg" for i in range(rows)]
        pd.DataFrame({"URL": urls, "TEXT": ["a caption"] * rows}).to_parquet(folder / f"part-{p:05d}.parquet")
    return folder


@pytest.mark.timeout(600)
def test_paper_dag_with_600_units_is_fast_and_planned(tmp_path, capsys):
    parts = _parts(tmp_path / "laion")
    fan_out = "data.dedup.fan_out={bands: 2, block_bits: 2}"  # dedup fans out over the same units, in 8 blocks
    overrides = [f"data.datasets.laion.url_list={parts}", *OVERRIDES, fan_out]
    repo = copy_repo(tmp_path / "repo")
    config = {
        "preset": "paper_vitl14_laion",
        "experiments": {"franca": {"seeds": [0], "highres": True, "rasa": True}},
        "overrides": overrides,
        "dvc": {"commit_on_success": False, "push_on_success": False},
    }
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "FRANCA_TRACKING": "off"}
    cmd = ["snakemake", "-n", "--cores", "1", "--configfile", str(tmp_path / "p.yaml"), "--replace-workflow-config"]
    before, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    out = run(cmd, repo, env, 300).stdout
    wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    print(f"snakemake -n, 600 units: {wall:.1f} s wall, {cpu:.1f} s CPU")
    # the DAG build's own CPU time (the wall time on a shared 2-core machine also counts other agents' load)
    assert cpu <= 30, f"dry run took {cpu:.1f} s of CPU ({wall:.1f} s wall)"
    jobs = [j for j in repo_copy.dry_run_blocks(out) if j.get("wildcards", "").startswith("dataset=laion")]
    fetch = sorted(j["wildcards"] for j in jobs if j["rule"] == "fetch")
    assert fetch == [f"dataset=laion, unit=u{i:06d}" for i in range(600)]
    assert sum(j["rule"] == "shard" for j in jobs) == 600
    one = next(j for j in jobs if j["rule"] == "fetch" and j["wildcards"].endswith("u000137"))
    assert str(parts / "part-00013.parquet") in one["input"]  # its own part: a change there reruns it alone
    assert "cpus_per_task=4" in one["resources"]
    dedup_units = [j for j in jobs if j["rule"] == "dedup_unit"]
    assert len(dedup_units) == 600 and "cpus_per_task=2" in dedup_units[0]["resources"]  # CPU_STAGES["dedup_part"]
    assert sum(j["rule"] == "dedup_block" for j in jobs) == 2 * 4
    gather = next(j for j in repo_copy.dry_run_blocks(out) if j["rule"] == "gather" and "laion" in j["output"])
    assert gather["output"] == "data/laion/shards, data/laion/manifest"

    assert main(["--preset", "paper_vitl14_laion", *(f"--override={o}" for o in overrides), "--unit-jobs"]) == 0
    text = capsys.readouterr().out
    minutes = math.ceil(UNIT_ROWS / (unit_rate(cluster_settings({}), "fetch")[0] * 4) / 60 * 1.25) + 5
    assert re.search(rf"^fetch +laion +600 units of <= 100 rows +600 +1 x CPU +{minutes} min", text, re.M), text
    assert f"fetch laion u000599: 4 CPU, {minutes} min" in text and "shard laion u000000: 4 CPU" in text


def test_plan_sizes_unit_jobs_before_the_table_exists():
    """Without the URL folder, the plan cuts the configured 600 M images into units of unit_rows (1 M): 600 unit
    jobs of fetch and of shard, each sized from the per-core throughput."""
    p = plan("paper_vitl14_laion", {"franca": {"seeds": [0], "highres": False, "rasa": False}})
    fetch = next(r for r in p.rows if r.rule == "fetch" and r.experiment == "laion")
    assert (fetch.jobs, len(fetch.units), fetch.cpus) == (600, 600, 4)
    rate = unit_rate(cluster_settings({}), "fetch")[0] * 4
    assert fetch.runtime_min == math.ceil(1_000_000 / rate / 60 * CLUSTER_DEFAULTS["runtime_margin"]) + 5
    shard = next(r for r in p.rows if r.rule == "shard" and r.experiment == "laion")
    assert shard.jobs == 600 and shard.runtime_min > fetch.runtime_min  # decoding is slower per core than fetching


def test_plan_lists_the_dedup_fan_out_jobs():
    """With data.dedup.fan_out, the plan has the jobs of workflow/rules/dedup.smk: one eval index, one dedup_unit per
    work unit of the train set, one dedup_block per (band, block) and the reduce; without it, one dedup job."""
    exps = {"franca": {"seeds": [0], "highres": False, "rasa": False}}
    without = plan("paper_vitl14_laion", exps, ["~data.dedup.fan_out"])
    assert [(r.rule, r.jobs) for r in without.rows if r.rule.startswith("dedup")] == [("dedup", 1)]
    fan = plan("paper_vitl14_laion", exps, ["data.dedup.fan_out={bands: 4, block_bits: 3}"])
    rows = {r.rule: r for r in fan.rows if r.rule.startswith("dedup")}
    assert [(rule, r.jobs) for rule, r in rows.items()] == [
        ("dedup_eval_index", 1), ("dedup_unit", 600), ("dedup_bands", 1), ("dedup_block", 32), ("dedup", 1)
    ]  # fmt: skip
    assert rows["dedup_unit"].units[-1] == "u000599" and rows["dedup_block"].units[:2] == ["b0-p0", "b0-p1"]
    assert "dedup_block laion b3-p7: 2 CPU, 60 min" in unit_jobs(fan)  # CPU_STAGES["dedup_part"], not the reduce's
    assert (
        fan.totals["jobs"] == sum(r.jobs for r in fan.rows)
        and fan.totals["jobs"] - without.totals["jobs"] == 1 + 600 + 1 + 32
    )


def test_plan_prices_fetch_units_at_the_recorded_mix_rate(tmp_path, capsys):
    """The fetch units' wall time comes from the recorded bench_fetch mix (not the happy path): the result with the
    most URLs wins over a newer short one, whose last dead URL dominates; the plan prints the file it used."""
    import json

    for name, n, rate, date in [("fetch-a.json", 20_000, 550.0, "2026-12-07T21:00:00Z"),
                                ("fetch-b.json", 4_000, 270.0, "2026-12-08T09:00:00Z")]:  # fmt: skip
        mix = {"slow": n // 20, "dead": n // 400}
        (tmp_path / name).write_text(json.dumps({"date": date, "cpus": 2, "n_urls": n, "mix_counts": mix,
                                                 "runs": {"current_mix": {"urls_per_s": rate}}}))  # fmt: skip
    rate, source = recorded_fetch_rate(tmp_path)
    assert rate == 275.0 and source.startswith(
        f"{tmp_path}/fetch-a.json: 20,000 URLs (1000 slow, 50 dead) at 550 URLs/s"
    )
    cluster = cluster_settings({}, mfu_results=str(tmp_path))
    assert unit_rate(cluster, "fetch") == (rate, source)
    assert unit_rate({**cluster, "fetch_urls_per_core_s": 10}, "fetch") == (
        10.0,
        "set by cluster.fetch_urls_per_core_s",
    )
    p = plan("paper_vitl14_laion", ["franca"], mfu_results=str(tmp_path))
    fetch = next(r for r in p.rows if r.rule == "fetch" and r.experiment == "laion")
    assert fetch.runtime_min == math.ceil(1_000_000 / (275.0 * 4) / 60 * CLUSTER_DEFAULTS["runtime_margin"]) + 5
    assert p.unit_rates["fetch"] == source
    (tmp_path / "fetch-c.json").write_text("{}")
    with pytest.raises(ValueError, match="fetch-c.json: not a bench_fetch result"):
        recorded_fetch_rate(tmp_path)
    empty = cluster_settings({}, mfu_results=str(tmp_path / "none"))
    assert unit_rate(empty, "fetch")[0] == 150.0 and "no recorded bench_fetch result" in unit_rate(empty, "fetch")[1]
