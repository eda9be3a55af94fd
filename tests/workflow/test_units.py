"""Work units (issue 17 items 1-3): the unit list, the resumable unit fetch job (kill -9, success-rate floor,
transient failures retried on the next run, permanent ones never) and the partitioned dataset index."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
from url_server import UrlServer

from franca.cli import main as franca
from franca.data import units
from franca.data.fetch import read_url_table
from franca.data.manifest import make_manifest, read_manifest


def test_unit_list_is_row_bounded_stable_and_reads_only_footers(tmp_path, monkeypatch):
    parts = tmp_path / "parts"
    parts.mkdir()
    pd.DataFrame({"URL": [f"http://x/{i}" for i in range(25)]}).to_parquet(parts / "part-0.parquet", row_group_size=7)
    pd.DataFrame({"URL": [f"http://y/{i}" for i in range(9)]}).to_csv(parts / "part-1.csv", index=False)
    (parts / "notes.txt").write_text("not a part")
    ds = {"source": "urls", "url_list": str(parts), "unit_rows": 10, "shard_size": 5}
    got = units.list_units(ds)
    spans = [(Path(u["part"]).name, u["start"], u["stop"], u["row0"]) for u in got]
    assert spans == [("part-0.parquet", 0, 10, 0), ("part-0.parquet", 10, 20, 10), ("part-0.parquet", 20, 25, 20),
                     ("part-1.csv", 0, 9, 25)]  # fmt: skip
    assert [u["unit"] for u in got] == ["u000000", "u000001", "u000002", "u000003"]
    whole = read_url_table(parts, "URL")
    for u in got:  # a unit's rows are its slice of the concatenated table (the keys stay the table's row indices)
        rows = units.read_unit_rows(u, "URL")
        assert rows["URL"].tolist() == whole["URL"].iloc[u["row0"] : u["row0"] + len(rows)].tolist()
    # the second listing reads no footer again (cached by path, size, mtime), and never the URL column
    monkeypatch.setattr(pq, "ParquetFile", lambda *a, **k: pytest.fail("footer read again"))
    monkeypatch.setattr(pd, "read_parquet", lambda *a, **k: pytest.fail("URL column read"))
    assert units.list_units(ds) == got
    assert units.list_units({"source": "synth"}) == [{"unit": "u000000", "kind": "synthetic"}]


def test_read_manifest_reads_a_partitioned_directory(tmp_path):
    rows = [{"key": f"k{i}", "status": "ok", "shard": f"shards/t-u{i % 2}.tar", "sha256": "0", "phash": "0"}
            for i in range(6)]  # fmt: skip
    (tmp_path / "manifest").mkdir()
    make_manifest(rows[:4]).to_parquet(tmp_path / "manifest" / "u000000.parquet", index=False)
    make_manifest(rows[4:]).to_parquet(tmp_path / "manifest" / "u000001.parquet", index=False)
    (tmp_path / "manifest" / "_provenance.json").write_text("{}")  # not data
    frame = read_manifest(tmp_path / "manifest")
    assert frame["key"].tolist() == [f"k{i}" for i in range(6)] and str(frame["label"].dtype) == "Int64"
    assert read_manifest(tmp_path / "manifest", columns=["key", "status"]).columns.tolist() == ["key", "status"]
    with pytest.raises(ValueError, match="lacks columns"):
        read_manifest(tmp_path / "manifest", columns=["nope"])


@pytest.fixture
def server():
    srv = UrlServer(slow_s=0.25)
    yield srv
    srv.close()


def _setup(tmp_path, server):
    """Two parts: part-0 (40 rows, slow images and two 404s) and part-1 (10 rows: 7 behind an outage, one 404)."""
    parts = tmp_path / "parts"
    parts.mkdir()
    urls0 = [server.url(f"/gone/{i}" if i in (3, 27) else f"/slow/{i}.png") for i in range(40)]
    urls1 = [server.url(f"/outage/{i}.png" if i < 7 else "/gone/99" if i == 7 else f"/img/{i}.png") for i in range(10)]
    pd.DataFrame({"url": urls0}).to_parquet(parts / "part-0.parquet")
    pd.DataFrame({"url": urls1}).to_parquet(parts / "part-1.parquet")
    ds = {"source": "urls", "url_list": str(parts), "caption_col": None, "shard_size": 10, "unit_rows": 40}
    # one connection: shards finish one after another (0.25 s a slow row), so a kill can land between them
    ds.update(timeout=5, retries=0, backoff=0.01, concurrency=1, allow_private_addresses=True, reencode="never")
    ds.update(min_success_rate=0.5, transient_reruns=2)
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    (tmp_path / "units.json").write_text(json.dumps(units.list_units(ds)))
    return ds


def _args(tmp_path, unit, out, state):
    return ["data", "fetch", "--config", str(tmp_path / "ds.json"), "--units", str(tmp_path / "units.json"),
            "--unit", unit, "--dataset", "web", "--out", str(out), "--state-dir", str(state)]  # fmt: skip


def _raw_files(out):
    """{name: bytes} of a published unit (raw shards and status tables; the report holds this run's timings)."""
    return {p.name: p.read_bytes() for p in sorted((out / "train").iterdir()) if p.name != "fetch_report.json"}


def _paths(urls):
    return sorted("/" + u.split("/", 3)[3] for u in urls)


@pytest.mark.timeout(300)
def test_unit_fetch_survives_kill_and_retries_only_transient_failures(tmp_path, server, monkeypatch):
    monkeypatch.setenv("FRANCA_TRACKING", "off")
    monkeypatch.chdir(tmp_path)
    _setup(tmp_path, server)
    state, out = tmp_path / "state", tmp_path / "raw" / "u000000"
    # 1. kill -9 the unit job once two of its four raw shards are finished in its rolling state
    env = {**os.environ, "FRANCA_TRACKING": "off"}
    cmd = [sys.executable, "-m", "franca.cli", *_args(tmp_path, "u000000", out, state)]
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while len(list(state.glob("web/u000000/*/train/*.parquet"))) < 2 and proc.poll() is None:
        assert time.time() < deadline, "the unit job finished no shard in 120 s"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    assert not (out / "train").exists()  # the declared output holds nothing of an incomplete unit
    done = [pd.read_parquet(p) for p in sorted(state.glob("web/u000000/*/train/*.parquet"))]
    assert 2 <= len(done) < 4, "kill -9 came after the last shard"
    finished = _paths(pd.concat(done)["url"])
    # 2. the rerun fetches only the shards that were not finished, and publishes the complete unit
    server.clear()
    assert franca(_args(tmp_path, "u000000", out, state)) == 0
    again = sorted(server.requested())
    assert again and not set(again) & set(finished), "a finished shard's URLs were requested again"
    status = pd.concat([pd.read_parquet(p) for p in sorted((out / "train").glob("*.parquet"))])
    assert status["key"].tolist() == [f"{i:09d}" for i in range(40)]  # every row accounted once
    assert sorted(status.loc[status["status"] != "success", "reason"]) == ["http_404", "http_404"]
    fresh = tmp_path / "fresh" / "u000000"
    assert franca(_args(tmp_path, "u000000", fresh, tmp_path / "fresh_state")) == 0
    assert _raw_files(out) == _raw_files(fresh)  # resumed == uninterrupted, byte for byte

    # 3. an outage: 7 of 10 rows fail with 503, under the 0.5 floor -> the unit fails naming its reasons
    server.outage, out1 = True, tmp_path / "raw" / "u000001"
    with pytest.raises(
        SystemExit, match=r"unit u000001: success rate 20.0% .*http_503 \(7, transient\), http_404 \(1\)"
    ):
        franca(_args(tmp_path, "u000001", out1, state))
    assert not (out1 / "train").exists()
    # 4. next run: only the transient failures are fetched again (the 404 and the successes are not)
    server.outage = False
    server.clear()
    assert franca(_args(tmp_path, "u000001", out1, state)) == 0
    assert sorted(server.requested()) == sorted(f"/outage/{i}.png" for i in range(7))
    report = json.loads((out1 / "train" / "fetch_report.json").read_text())
    assert (report["success"], report["reasons"], report["unit"]) == (9, {"http_404": 1}, "u000001")
    clean = tmp_path / "clean" / "u000001"
    assert franca(_args(tmp_path, "u000001", clean, tmp_path / "clean_state")) == 0
    assert _raw_files(out1) == _raw_files(clean)  # keys 40..49, the patched shard as an uninterrupted fetch


def test_transient_reruns_are_bounded(tmp_path, server, monkeypatch):
    """With transient_reruns=1, a second outage run does not fetch the 503 rows again: the unit keeps failing."""
    monkeypatch.setenv("FRANCA_TRACKING", "off")
    monkeypatch.chdir(tmp_path)
    ds = _setup(tmp_path, server)
    (tmp_path / "ds.json").write_text(json.dumps({**ds, "transient_reruns": 1}))
    server.outage, out = True, tmp_path / "raw" / "u000001"
    for left in (1, 0):  # the first run fetches every row; the second spends the one rerun of the 503 rows
        with pytest.raises(SystemExit, match=f"{left} reruns left"):
            franca(_args(tmp_path, "u000001", out, tmp_path / "state"))
    server.clear()
    with pytest.raises(SystemExit, match="0 reruns left"):
        franca(_args(tmp_path, "u000001", out, tmp_path / "state"))
    assert server.requested() == []  # its one rerun was spent in the outage; a permanent 404 is never retried


def test_unit_identity_holds_fetch_options_and_rows_not_policy(tmp_path):
    """The rolling state's key (issue 12's leftover: resuming ignored the fetch options): a new timeout or other rows
    start over, a new floor, rerun count or concurrency keep the state."""
    pd.DataFrame({"url": [f"http://x/{i}" for i in range(8)]}).to_parquet(tmp_path / "p.parquet")
    ds = {"source": "urls", "url_list": str(tmp_path / "p.parquet"), "shard_size": 4, "timeout": 10}
    entry = units.list_units(ds)[0]
    rows = units.read_unit_rows(entry)
    base = units.unit_identity(ds, entry, rows)
    assert units.unit_identity({**ds, "timeout": 5}, entry, rows) != base
    assert units.unit_identity(ds, entry, rows.assign(url=rows["url"] + "?v=2")) != base
    for key, value in (("min_success_rate", 0.9), ("transient_reruns", 5), ("concurrency", 8)):
        assert units.unit_identity({**ds, key: value}, entry, rows) == base, key
