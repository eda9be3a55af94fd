"""Fetcher against a hostile loopback server (issue 4 "Tests"): reasons, byte identity, resume, re-encoding."""

from __future__ import annotations

import io
import json
import tarfile
import time

import pandas as pd
import pytest
from PIL import Image

from franca.data.fetch import fetch_urls, refetch_transient
from franca.data.manifest import canonicalise, read_manifest

FAST = {"timeout": 0.5, "retries": 1, "backoff": 0.01, "concurrency": 8, "max_pixels": 4_000_000}
FAST["allow_private_addresses"] = True  # the test servers listen on 127.0.0.1


def hostile_table(server, tmp_path, fmt="parquet"):
    """(path, expected outcome per row): 'ok' or the failure reason."""
    rows = [(server.url(f"/img/{i:03d}.jpg"), "ok") for i in range(6)]
    rows += [
        (server.url("/img/020.png"), "ok"),
        (server.url("/404"), "http_404"),
        (server.url("/flaky/001.jpg"), "ok"),
        (server.url("/always500"), "http_500"),
        (server.url("/slow/002.jpg"), "timeout"),
        (server.url("/truncated.jpg"), "truncated"),
        (server.url("/page.html"), "not_an_image"),
        (server.url("/bomb.png"), "too_many_pixels"),
        (server.url("/loop"), "redirect_loop"),
        (server.url("/redirect/003.jpg"), "ok"),
        (server.url("/large.bin"), "too_large"),
        ("file:///etc/hostname", "bad_scheme"),
        ("ftp://127.0.0.1/x.jpg", "bad_scheme"),
        (server.url("/status/503"), "http_503"),
        (server.url("/status/429"), "http_429"),
        (server.url("/status/408"), "http_408"),
        (server.url("/status/403"), "http_403"),
        (server.url("/status/410"), "http_410"),
    ]
    table = pd.DataFrame(
        {
            "url": [u for u, _ in rows],
            "caption": [f"caption {i}" for i in range(len(rows))],
            "license": ["cc-by"] * len(rows),
            "punsafe": [0.01 * i for i in range(len(rows))],
        }
    )
    path = tmp_path / f"urls.{fmt}"
    table.to_parquet(path) if fmt == "parquet" else table.to_csv(path, index=False)
    return path, [e for _, e in rows], table


def tar_members(path):
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_every_url_ends_as_sample_or_reasoned_failure(image_server, served_images, tmp_path, fmt):
    image_server.reset()
    table_path, expected, table = hostile_table(image_server, tmp_path, fmt)
    out = tmp_path / "raw"
    report = fetch_urls(table_path, out, shard_size=8, reencode="never", max_bytes=200_000, **FAST)
    status = pd.concat([pd.read_parquet(p) for p in sorted(out.glob("*.parquet"))], ignore_index=True)
    assert status["key"].tolist() == [f"{i:09d}" for i in range(len(expected))]
    got = ["ok" if s == "success" else r for s, r in zip(status["status"], status["reason"], strict=True)]
    assert got == expected
    n_ok = expected.count("ok")
    assert report["success"] == n_ok and report["failed"] == len(expected) - n_ok
    assert report["reasons"]["bad_scheme"] == 2 and report["reasons"]["timeout"] == 1
    assert json.loads((out / "fetch_report.json").read_text())["reasons"] == report["reasons"]
    # retried once: the flaky URL needed two attempts
    assert status.loc[status["url"].str.contains("flaky"), "attempts"].item() == 2
    # failure classes: timeouts, 408, 429 and 5xx are transient (tried retries + 1 times), every other failure is
    # permanent (tried once; bad schemes never)
    transient = {"timeout", "http_500", "http_503", "http_429", "http_408"}
    assert status["transient"].tolist() == [e in transient for e in expected]
    assert report["transient"] == len(transient) and report["shards_with_transient"] == [1, 2]
    tried = {e: a for e, a in zip(expected, status["attempts"], strict=True) if e != "ok"}
    assert tried == {e: (2 if e in transient else 0 if e == "bad_scheme" else 1) for e in tried}
    members = {}
    for shard in sorted(out.glob("*.tar")):
        members.update(tar_members(shard))
    ok_rows = [i for i, e in enumerate(expected) if e == "ok"]
    image_names = sorted(n for n in members if n.endswith((".jpg", ".png")))
    assert image_names == sorted(f"{i:09d}.{'png' if i == 6 else 'jpg'}" for i in ok_rows)
    for i in ok_rows:  # byte identity with re-encoding off; captions and extra columns kept
        served = served_images[table.at[i, "url"].rsplit("/", 1)[-1]]
        assert members[f"{i:09d}.{'png' if i == 6 else 'jpg'}"] == served
        meta = json.loads(members[f"{i:09d}.json"])
        assert meta["url"] == table.at[i, "url"] and meta["license"] == "cc-by"
        assert meta["punsafe"] == pytest.approx(0.01 * i)
        assert members[f"{i:09d}.txt"].decode() == f"caption {i}"


def test_resize_and_reencode(image_server, tmp_path):
    table = pd.DataFrame({"url": [image_server.url(f"/img/{i:03d}.jpg") for i in range(3)]})
    table.to_parquet(tmp_path / "u.parquet")
    fetch_urls(tmp_path / "u.parquet", tmp_path / "raw", shard_size=10, resize_max_side=40, **FAST)
    members = tar_members(tmp_path / "raw" / "000000.tar")
    for i in range(3):
        image = Image.open(io.BytesIO(members[f"{i:09d}.jpg"]))
        assert image.size == (40, 40)  # 80 x 80 served, keep ratio, only if bigger
        meta = json.loads(members[f"{i:09d}.json"])
        assert (meta["original_width"], meta["width"]) == (80, 40)
    with pytest.raises(ValueError, match="resize_max_side"):
        fetch_urls(tmp_path / "u.parquet", tmp_path / "x", resize_max_side=40, reencode="never")
    with pytest.raises(ValueError, match="no column 'URL'"):
        fetch_urls(tmp_path / "u.parquet", tmp_path / "x", url_col="URL")


def test_interrupted_fetch_resumes_to_identical_shards(image_server, tmp_path):
    urls = [image_server.url(f"/img/{i % 20:03d}.jpg") for i in range(22)]
    urls[2], urls[12], urls[17] = image_server.url("/flaky/005.jpg"), image_server.url("/404"), "file:///x"
    pd.DataFrame({"url": urls, "caption": [f"c{i}" for i in range(22)]}).to_parquet(tmp_path / "u.parquet")
    kwargs = {"shard_size": 5, "reencode": "never", **FAST}

    def stop_after_first(shard):
        raise KeyboardInterrupt(f"simulated interruption after shard {shard}")

    image_server.reset()
    with pytest.raises(KeyboardInterrupt):
        fetch_urls(tmp_path / "u.parquet", tmp_path / "resumed", on_shard_done=stop_after_first, **kwargs)
    assert len(list((tmp_path / "resumed").glob("*.tar"))) == 1  # shards finish in any order: one was published
    assert not list((tmp_path / "resumed").glob(".*"))  # the interrupted shards' spill files are gone
    (tmp_path / "resumed" / ".000003.tar.tmp-99999").write_bytes(b"half a shard")  # a killed writer's leftover
    image_server.reset()
    report = fetch_urls(tmp_path / "u.parquet", tmp_path / "resumed", **kwargs)
    assert report["shards_skipped"] == 1 and report["this_run"]["rows"] == 17
    image_server.reset()
    fetch_urls(tmp_path / "u.parquet", tmp_path / "straight", **kwargs)
    names = sorted(p.name for p in (tmp_path / "straight").iterdir() if p.suffix in (".tar", ".parquet"))
    assert names == sorted(p.name for p in (tmp_path / "resumed").iterdir() if p.suffix in (".tar", ".parquet"))
    assert [n for n in names if n.endswith(".tar")] == [f"{s:06d}.tar" for s in range(5)]
    assert not list((tmp_path / "resumed").glob(".*"))  # the stale temp file was cleaned
    for name in names:
        a, b = tmp_path / "resumed" / name, tmp_path / "straight" / name
        if name.endswith(".tar"):
            assert a.read_bytes() == b.read_bytes(), name
        else:  # attempts may differ by a transient retry on a busy machine; every outcome must be equal
            pd.testing.assert_frame_equal(
                pd.read_parquet(a).drop(columns="attempts"), pd.read_parquet(b).drop(columns="attempts")
            )


def test_canonicalise_fetched_shards(image_server, served_images, tmp_path):
    image_server.reset()
    table_path, expected, table = hostile_table(image_server, tmp_path)
    fetch_urls(table_path, tmp_path / "raw", shard_size=8, reencode="never", max_bytes=200_000, **FAST)
    summary = canonicalise({"train": [tmp_path / "raw"]}, tmp_path / "ds")
    manifest = read_manifest(tmp_path / "ds" / "manifest.parquet")
    assert summary["samples"] == expected.count("ok") and summary["failed"] == len(expected) - expected.count("ok")
    assert len(manifest) == len(expected)
    ok = manifest[manifest["status"] == "ok"].set_index("key")
    row = ok.loc["train_000000006"]
    assert row["source"] == table.at[6, "url"] and row["license"] == "cc-by" and row["format"] == "png"
    assert row["caption"] == "caption 6" and (row["width"], row["height"]) == (80, 80)
    failed = manifest[manifest["status"] == "failed"].set_index("key")
    assert failed.loc["train_000000007", "reason"] == "http_404"
    members = tar_members(tmp_path / "ds" / "shards" / "train-000000.tar")
    assert members["train_000000000.jpg"] == served_images["000.jpg"]
    # rerun: every shard is resumed, the manifest is unchanged
    again = canonicalise({"train": [tmp_path / "raw"]}, tmp_path / "ds")
    assert again["shards_resumed"] == again["shards"] == 3
    pd.testing.assert_frame_equal(read_manifest(tmp_path / "ds" / "manifest.parquet"), manifest)


def test_url_table_folder_reads_parts_in_name_order(tmp_path):
    """LAION distributes a folder of part-*.parquet files: read in file-name order (stable keys), mixed formats."""
    from franca.data.fetch import read_url_table

    parts = tmp_path / "parts"
    parts.mkdir()
    pd.DataFrame({"url": ["http://127.0.0.1/b1", "http://127.0.0.1/b2"]}).to_parquet(parts / "part-00001.parquet")
    pd.DataFrame({"url": ["http://127.0.0.1/a1"], "caption": ["x"]}).to_csv(parts / "part-00000.csv", index=False)
    (parts / "README.txt").write_text("not a table")
    table = read_url_table(parts)
    assert table["url"].tolist() == ["http://127.0.0.1/a1", "http://127.0.0.1/b1", "http://127.0.0.1/b2"]
    assert table.index.tolist() == [0, 1, 2]
    pd.DataFrame({"link": ["http://127.0.0.1/c"]}).to_parquet(parts / "part-00002.parquet")
    with pytest.raises(ValueError, match=r"part-00002\.parquet has no column 'url'"):
        read_url_table(parts)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="holds no .parquet"):
        read_url_table(empty)


def test_dead_urls_hold_their_own_connection_only(image_server, tmp_path):
    """Dead URLs (never answer) at the head of four shards: the other shards finish and are published while they
    wait, and the run lasts about one dead URL's deadline, not one per dead URL (the in-order window of before
    published shard 0 first and waited 3 deadlines)."""
    n, size = 80, 10
    urls = [image_server.url(f"/img/{i % 20:03d}.jpg") for i in range(n)]
    for s in range(4):
        urls[s * size] = image_server.url(f"/dead/{s}")
    pd.DataFrame({"url": urls}).to_parquet(tmp_path / "u.parquet")
    opts = {**FAST, "timeout": 1.5, "retries": 1, "backoff": 0.01}
    deadline = opts["timeout"] * (opts["retries"] + 1) + opts["backoff"]  # one dead URL's time in the fetcher
    order = []
    start = time.perf_counter()
    report = fetch_urls(tmp_path / "u.parquet", tmp_path / "raw", shard_size=size, on_shard_done=order.append, **opts)
    elapsed = time.perf_counter() - start
    assert report["success"] == n - 4 and report["reasons"] == {"timeout": 4} and report["transient"] == 4
    assert sorted(order) == list(range(8)) and set(order[:4]) == {4, 5, 6, 7}  # good shards first
    assert elapsed < 2 * deadline  # the 4 dead URLs wait side by side (4 <= concurrency), not one after another
    status = pd.read_parquet(tmp_path / "raw" / "000002.parquet")
    assert status["key"].tolist() == [f"{i:09d}" for i in range(20, 30)]  # row order in every shard
    assert status["attempts"].tolist() == [2] + [1] * 9
    with tarfile.open(tmp_path / "raw" / "000002.tar") as tar:
        assert tar.getnames() == [f"{i:09d}.{e}" for i in range(21, 30) for e in ("jpg", "json")]
    assert not list((tmp_path / "raw").glob(".*"))  # no spill file left


def test_refetch_transient_rewrites_shard_as_clean_run(image_server, tmp_path):
    """An outage (503) during the first run: the finished shards' transient rows, and only those, are fetched
    again, and the rewritten shards are byte-identical to a run without the outage."""
    urls = [image_server.url(f"/img/{i:03d}.jpg") for i in range(10)]
    urls[1], urls[6], urls[7] = image_server.url("/outage/011.jpg"), image_server.url("/outage/012.jpg"), "file:///x"
    urls[3] = image_server.url("/404")
    pd.DataFrame({"url": urls, "caption": [f"c{i}" for i in range(10)]}).to_parquet(tmp_path / "u.parquet")
    kwargs = {"shard_size": 4, "reencode": "if_resized", **FAST}
    image_server.reset()
    image_server.outage = True
    try:
        first = fetch_urls(tmp_path / "u.parquet", tmp_path / "run", **kwargs)
    finally:
        image_server.outage = False
    assert first["reasons"] == {"bad_scheme": 1, "http_404": 1, "http_503": 2} and first["transient"] == 2
    assert first["shards_with_transient"] == [0, 1]
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.suffix in (".tar", ".parquet")}
    image_server.reset()
    report = refetch_transient(tmp_path / "u.parquet", tmp_path / "run", **kwargs)
    assert image_server.hits == {"/outage/011.jpg": 1, "/outage/012.jpg": 1}  # nothing else was requested
    assert report["this_run"]["fetched"] == 2 and report["transient"] == 0 and report["shards_skipped"] == 1
    after = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.suffix in (".tar", ".parquet")}
    assert after["000002.tar"] == before["000002.tar"] and after["000000.tar"] != before["000000.tar"]
    fetch_urls(tmp_path / "u.parquet", tmp_path / "clean", **kwargs)
    clean = {p.name: p.read_bytes() for p in (tmp_path / "clean").iterdir() if p.suffix in (".tar", ".parquet")}
    assert sorted(after) == sorted(clean) and all(after[k] == clean[k] for k in clean), "refetch != clean run"
    image_server.reset()
    again = refetch_transient(tmp_path / "u.parquet", tmp_path / "run", **kwargs)  # nothing left to fetch
    assert again["this_run"]["fetched"] == 0 and image_server.hits == {}


def test_shard_buffer_writes_the_tar_of_atomic_tar_writer(tmp_path):
    """Rows added in any order give the bytes AtomicTarWriter writes for the same samples in row order (member
    sizes around the 512-byte blocks, empty members, rows without a sample, an empty shard)."""
    import random

    from franca.data.fetch import _STATUS_COLUMNS, _ShardBuffer
    from franca.data.shards import AtomicTarWriter

    rng = random.Random(0)
    sizes = [0, 1, 511, 512, 513, 10_000, 70_001]
    for trial, n in enumerate([0, 1, 7, 12]):
        samples = {r: {e: rng.randbytes(rng.choice(sizes)) for e in rng.sample(["jpg", "json", "txt", "seg.png"], 2)}
                   for r in range(n) if rng.random() < 0.8}  # fmt: skip
        out = tmp_path / str(trial)
        with AtomicTarWriter(out / "reference.tar") as writer:
            for r in sorted(samples):
                writer.write(f"{r:09d}", samples[r])
        buffer = _ShardBuffer(out, 0, range(n))
        for r in rng.sample(range(n), n):
            buffer.add(r, {c: None for c in _STATUS_COLUMNS} | {"key": f"{r:09d}"}, samples.get(r))
        buffer.publish()
        assert (out / "000000.tar").read_bytes() == (out / "reference.tar").read_bytes(), f"trial {trial}"
        assert len(pd.read_parquet(out / "000000.parquet")) == n and not list(out.glob(".*"))


def test_open_shards_are_bounded(image_server, tmp_path, monkeypatch):
    """Rows of a new shard start only while fewer than MAX_OPEN_SHARDS shards are gathering: at most that many
    spill files exist at any time, and every shard is still published."""
    import franca.data.fetch as fetch

    monkeypatch.setattr(fetch, "MAX_OPEN_SHARDS", 2)
    urls = [image_server.url(f"/img/{i % 20:03d}.jpg") for i in range(40)]
    pd.DataFrame({"url": urls}).to_parquet(tmp_path / "u.parquet")
    spills = []
    out = tmp_path / "raw"

    def count_spills(shard):
        spills.append(len(list(out.glob(".*spill*"))))

    opts = {**FAST, "concurrency": 16}  # a window of 32 rows: 7 shards at once without the bound
    report = fetch_urls(tmp_path / "u.parquet", out, shard_size=5, on_shard_done=count_spills, **opts)
    assert report["success"] == 40 and len(spills) == 8 and max(spills) <= 1  # the other open shard, at most
