"""Hostile inputs (issue 12): every bad URL, image or tar member ends as a failure row with a reason and the run goes
on; kept images come out upright and 8-bit through one canonical conversion; reruns are byte-identical."""

from __future__ import annotations

import gzip
import hashlib
import io
import shutil
import tarfile
import tracemalloc

import numpy as np
import pandas as pd
import pytest
from image_helpers import ImageServer, encode, gzip_zeros, photo_like
from PIL import Image, features

from franca.data import sources
from franca.data.fetch import fetch_urls
from franca.data.images import ALLOWED_FORMATS, canonical_encode
from franca.data.manifest import canonicalise
from franca.data.shards import iter_raw_samples, read_shard

LOOPBACK = {"allow_private_addresses": True}  # the test servers listen on 127.0.0.1
FAST = {"timeout": 1.0, "retries": 1, "backoff": 0.01, "concurrency": 4, **LOOPBACK}
EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\n%%EndComments\nnewpath 0 0 moveto 16 16 lineto stroke\n"


def _base(seed: int = 3, size: tuple[int, int] = (80, 48)) -> Image.Image:
    """A non-square colour image whose rotation is visible (W != H)."""
    return photo_like(np.random.default_rng(seed), 1, size=max(size))[0].resize(size)


def cmyk_jpeg() -> bytes:
    return encode(_base(1).convert("CMYK"), "JPEG", quality=95)


def exif_rotated_jpeg() -> bytes:
    """JPEG of the base image stored sideways with EXIF orientation 6 (display: rotate 90 degrees clockwise)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(_base(2), "JPEG", quality=95, exif=exif.tobytes())


def grey16_png() -> bytes:
    """16-bit grey PNG: a horizontal ramp 0..65535 (8-bit mean 127.5)."""
    ramp = np.tile(np.linspace(0, 65535, 64).round().astype(np.uint16), (32, 1))
    return encode(Image.fromarray(ramp), "PNG")


def mpo() -> bytes:
    first, second = _base(4), _base(5)
    return encode(first, "MPO", save_all=True, append_images=[second], quality=95)


HOSTILE = {"cmyk.jpg": cmyk_jpeg, "rot6.jpg": exif_rotated_jpeg, "grey16.png": grey16_png, "multi.mpo": mpo}


@pytest.fixture(scope="module")
def hostile_server():
    images = {name: make() for name, make in HOSTILE.items()}
    images.update({"ok.jpg": encode(_base(6), "JPEG", quality=90), "doc.eps": EPS, "junk.jpg": b"\xff\xd8junk" * 50})
    if "AVIF" in ALLOWED_FORMATS:
        images["pic.avif"] = encode(_base(7), "AVIF", quality=90)
    server = ImageServer(images, slow_s=1.0)
    yield server
    server.close()


def _table(tmp_path, urls: list[str], name: str = "urls.parquet"):
    path = tmp_path / name
    pd.DataFrame({"url": urls, "caption": [f"c{i}" for i in range(len(urls))]}).to_parquet(path)
    return path


def _status(out) -> pd.DataFrame:
    return pd.concat([pd.read_parquet(p) for p in sorted(out.glob("0*.parquet"))], ignore_index=True)


def _reasons(out) -> list[str]:
    status = _status(out)
    return ["ok" if s == "success" else r for s, r in zip(status["status"], status["reason"], strict=True)]


def test_png_encoding_of_cmyk_jpeg_is_a_sample_and_errors_do_not_abort(hostile_server, tmp_path):
    """``encode_format: png`` with a CMYK JPEG used to abort the whole fetch ("cannot write mode CMYK as PNG")."""
    urls = [hostile_server.url(f"/img/{n}") for n in ("cmyk.jpg", "junk.jpg", "ok.jpg")]
    out = tmp_path / "raw"
    fetch_urls(_table(tmp_path, urls), out, shard_size=8, reencode="always", encode_format="png", **FAST)
    assert _reasons(out) == ["ok", "not_an_image", "ok"]
    (sample,) = [s for s in read_shard(out / "000000.tar") if s["key"] == "000000000"]
    assert sample["image"].mode == "RGB" and sample["image"].size == (80, 48)


def test_eps_body_never_reaches_ghostscript(hostile_server, tmp_path, monkeypatch):
    """A fake ``gs`` on PATH records every call: the allow-list must refuse EPS before Pillow looks for it."""
    from PIL import EpsImagePlugin

    bindir, calls = tmp_path / "bin", tmp_path / "gs_calls"
    bindir.mkdir()
    (bindir / "gs").write_text(f'#!/bin/sh\necho "$@" >> {calls}\nexit 0\n')
    (bindir / "gs").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:{__import__('os').environ['PATH']}")
    monkeypatch.setattr(EpsImagePlugin, "gs_binary", None)
    out = tmp_path / "raw"
    fetch_urls(_table(tmp_path, [hostile_server.url("/img/doc.eps")]), out, shard_size=8, reencode="never", **FAST)
    assert _reasons(out) == ["not_an_image"]
    assert not calls.exists(), calls.read_text()


def test_mpo_and_avif_are_kept(hostile_server, tmp_path):
    names = ["multi.mpo"] + (["pic.avif"] if "AVIF" in ALLOWED_FORMATS else [])
    out = tmp_path / "raw"
    fetch_urls(_table(tmp_path, [hostile_server.url(f"/img/{n}") for n in names]), out, reencode="never", **FAST)
    assert _reasons(out) == ["ok"] * len(names)
    canonicalise([out], tmp_path / "ds")
    manifest = pd.read_parquet(tmp_path / "ds" / "manifest.parquet")
    assert manifest["status"].tolist() == ["ok"] * len(names), manifest[["key", "status", "reason"]]
    images = [s["image"] for s in read_shard(tmp_path / "ds" / "shards" / "train-000000.tar")]
    assert [im.size for im in images] == [(80, 48)] * len(names)
    diff = [
        np.abs(np.asarray(images[0], dtype=np.float64) - np.asarray(_base(s), dtype=np.float64)).mean() for s in (4, 5)
    ]
    assert diff[0] < 8 and diff[0] < diff[1] / 2  # the MPO's first picture (JPEG noise only)
    assert features.check("avif") == ("AVIF" in ALLOWED_FORMATS)


def test_pool_wait_is_outside_the_deadline(hostile_server, tmp_path):
    """Every URL answers within 1.0 s < timeout 1.6 s (0.6 s of slack for a loaded machine); slow URLs queued behind
    other slow ones for a pooled connection used to time out (pool wait 1.0 + answer 1.0 > deadline 1.6)."""
    urls = [hostile_server.url("/slow/ok.jpg" if r % 2 == 0 else "/img/ok.jpg") for r in range(32)]
    out = tmp_path / "raw"
    opts = {"timeout": 1.6, "retries": 0, "concurrency": 16, **LOOPBACK}
    fetch_urls(_table(tmp_path, urls), out, shard_size=32, reencode="never", **opts)
    assert _reasons(out) == ["ok"] * 32


def test_gzip_body_is_bounded_while_inflating(hostile_server, tmp_path):
    """300 MB of zeros in ~300 KB of gzip: too_large, and never more than a few MB in memory at once."""
    out = tmp_path / "raw"
    gzip_zeros(hostile_server.bomb_mb)  # the server's body, made before measuring
    tracemalloc.start()
    try:
        table = _table(tmp_path, [hostile_server.url("/gzip-bomb")])
        fetch_urls(table, out, reencode="never", max_bytes=1_000_000, **{**FAST, "timeout": 20.0})
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert _reasons(out) == ["too_large"]
    assert peak < 24 * 2**20, f"peak traced memory {peak / 2**20:.1f} MiB"


def test_private_targets_refused_by_default_and_after_redirects(hostile_server, tmp_path):
    ok = hostile_server.url("/img/ok.jpg")
    localhost = ok.replace("127.0.0.1", "localhost")
    common = {"timeout": 1.0, "retries": 0, "concurrency": 2, "reencode": "never"}
    fetch_urls(_table(tmp_path, [ok, localhost]), tmp_path / "default", **common)
    assert _reasons(tmp_path / "default") == ["blocked_address"] * 2
    # loopback allowed, but the redirect to the metadata address (link-local) is still refused
    urls = [ok, hostile_server.url("/to-metadata")]
    fetch_urls(_table(tmp_path, urls), tmp_path / "net", allow_private_addresses=["127.0.0.1/32"], **common)
    assert _reasons(tmp_path / "net") == ["ok", "blocked_address"]
    assert "169.254.169.254" in _status(tmp_path / "net")["error_message"].iat[1]
    with pytest.raises(ValueError, match="allow_private_addresses"):
        fetch_urls(_table(tmp_path, [ok]), tmp_path / "bad", allow_private_addresses=["not-a-net"], **common)


def test_short_body_is_truncated_not_retried(hostile_server, tmp_path):
    out = tmp_path / "raw"
    fetch_urls(_table(tmp_path, [hostile_server.url("/short.jpg")]), out, reencode="never", **{**FAST, "retries": 2})
    status = _status(out)
    assert _reasons(out) == ["truncated"] and status["attempts"].tolist() == [1]


def _files(root) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_rerun_writes_byte_identical_shards_and_status_tables(hostile_server, tmp_path):
    names = ["ok.jpg", "junk.jpg", "doc.eps", "cmyk.jpg", "rot6.jpg", "grey16.png", "multi.mpo", "missing"]
    urls = [hostile_server.url(f"/img/{n}") for n in names] + ["ftp://x/y.jpg"]
    table = _table(tmp_path, urls)
    runs = []
    for _ in range(2):  # same paths (the manifest records its raw shard's path), from scratch
        shutil.rmtree(tmp_path / "run", ignore_errors=True)
        fetch_urls(table, tmp_path / "run" / "raw", shard_size=4, reencode="never", **FAST)
        canonicalise([tmp_path / "run" / "raw"], tmp_path / "run" / "ds")
        files = _files(tmp_path / "run")
        files.pop("raw/fetch_report.json")  # holds this run's throughput
        runs.append(files)
    assert runs[0].keys() == runs[1].keys() and len(runs[0]) > 6
    assert [k for k in runs[0] if runs[0][k] != runs[1][k]] == []
    messages = " ".join(_status(tmp_path / "run" / "raw")["error_message"].dropna())
    assert " at 0x" not in messages and "not_an_image" in messages


def _pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float64)


def test_kept_images_are_upright_and_8bit(hostile_server, tmp_path):
    urls = [hostile_server.url(f"/img/{n}") for n in ("rot6.jpg", "grey16.png", "cmyk.jpg")]
    fetch_urls(_table(tmp_path, urls), tmp_path / "raw", reencode="never", **FAST)
    canonicalise([tmp_path / "raw"], tmp_path / "ds")
    samples = {s["key"]: s for s in read_shard(tmp_path / "ds" / "shards" / "train-000000.tar")}
    rotated = samples["train_000000000"]["image"]
    upright = np.asarray(_base(2).transpose(Image.Transpose.ROTATE_270), dtype=np.float64)
    assert rotated.size == (48, 80) and np.abs(np.asarray(rotated, dtype=np.float64) - upright).mean() < 8
    grey = np.asarray(samples["train_000000001"]["image"], dtype=np.float64)
    assert abs(grey.mean() - 127.5) < 1 and (grey >= 255).mean() < 0.05  # scaled, not clipped to white
    assert samples["train_000000002"]["image"].mode == "RGB"
    # stored canonical: 8-bit PNG / RGB JPEG, no orientation tag left
    for _, fields in iter_raw_samples(tmp_path / "ds" / "shards" / "train-000000.tar"):
        image = Image.open(io.BytesIO(fields.get("png") or fields["jpg"]))
        assert image.mode in ("RGB", "RGBA") and image.getexif().get(0x0112, 1) == 1
        assert "png" not in fields or fields["png"][24] == 8  # PNG bit depth


def test_one_canonical_conversion_for_fetch_folder_and_tar(hostile_server, tmp_path):
    """The same bytes end as the same stored image whether fetched, read from a class folder or a synset tar."""
    names = ["rot6.jpg", "grey16.png", "cmyk.jpg", "ok.jpg"]
    served = {n: HOSTILE[n]() if n in HOSTILE else None for n in names}
    served["ok.jpg"] = hostile_server.images["ok.jpg"]
    fetch_urls(_table(tmp_path, [hostile_server.url(f"/img/{n}") for n in names]), tmp_path / "f", **FAST)
    (tmp_path / "tree" / "cls").mkdir(parents=True)
    for i, n in enumerate(names):
        (tmp_path / "tree" / "cls" / f"{i}_{n}").write_bytes(served[n])
    sources.ingest_folder(tmp_path / "tree", tmp_path / "folder")
    (tmp_path / "tars").mkdir()
    with tarfile.open(tmp_path / "tars" / "n0001.tar", "w") as tar:
        for i, n in enumerate(names):
            data = gzip.compress(served[n], mtime=0) if i == 0 else served[n]  # one gzipped member
            info = tarfile.TarInfo(f"{i}_{n}" + (".gz" if i == 0 else ""))
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    sources.ingest_imagenet21k_tars(tmp_path / "tars", tmp_path / "tar")
    stored = {}
    for kind in ("f", "folder", "tar"):
        canonicalise([tmp_path / kind], tmp_path / f"ds_{kind}")
        fields = [f for _, f in iter_raw_samples(tmp_path / f"ds_{kind}" / "shards" / "train-000000.tar")]
        stored[kind] = [hashlib.sha256(f.get("png") or f["jpg"]).hexdigest() for f in fields]
    expected = [hashlib.sha256(canonical_encode(served[n])[0]).hexdigest() for n in names]
    assert stored["f"] == stored["folder"] == stored["tar"] == expected


def test_corrupt_gz_member_is_a_failure_row(tmp_path):
    good = encode(_base(8), "JPEG", quality=90)
    bad_block = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff" + b"\xff" * 40  # gzip.decompress: zlib.error
    members = {"a.JPEG": good, "b.JPEG.gz": bad_block, "c.JPEG.gz": gzip.compress(good)[:-100]}
    members["d.JPEG.gz"] = gzip.compress(good)
    (tmp_path / "tars").mkdir()
    with tarfile.open(tmp_path / "tars" / "n0002.tar", "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    sources.ingest_imagenet21k_tars(tmp_path / "tars", tmp_path / "raw")
    status = pd.read_parquet(tmp_path / "raw" / "000000.parquet")
    got = ["ok" if s == "success" else r for s, r in zip(status["status"], status["reason"], strict=True)]
    assert got == ["ok", "bad_gzip", "bad_gzip", "ok"]
    assert status["error_message"].iat[1].startswith("SourceItemError: ")


def test_every_fetch_key_reaches_the_fetcher_or_is_rejected(hostile_server, tmp_path):
    from franca.stages.data import _acquire

    table = _table(tmp_path, [hostile_server.url("/img/ok.jpg"), hostile_server.url("/img/cmyk.jpg")])
    ds = {"source": "urls", "url_list": str(table), "shard_size": 4, "license": "test", **LOOPBACK}
    ds.update(user_agent="franca-test-agent/9", max_bytes=1500, max_redirects=0, backoff=0.0, retries=0)
    hostile_server.reset()
    hostile_server.agents.clear()
    _acquire(ds, tmp_path / "raw")
    assert _reasons(tmp_path / "raw" / "train") == ["too_large", "too_large"]  # both bodies are > 1500 bytes
    assert hostile_server.agents and set(hostile_server.agents) == {"franca-test-agent/9"}
    with pytest.raises(ValueError, match=r"unknown keys \['max_byte'\]"):
        _acquire({**ds, "max_byte": 10}, tmp_path / "raw2")
