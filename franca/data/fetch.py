"""Download a URL table (LAION / ReLAION parquet or CSV) into raw WebDataset shards (spec 6, issue 4 item 2).

Output (``out_dir``), compatible with img2dataset's ``--output_format webdataset``:
  * ``%06d.tar``: per successful row ``<key>.<ext>`` (the image), ``<key>.txt`` (caption, when present) and
    ``<key>.json`` (url, caption, sizes, sha256 and every extra column of the table); ``key = %09d`` row index;
  * ``%06d.parquet``: one status row per input row of the shard (``success`` or ``failed`` with its ``reason``,
    its class ``transient`` and the ``attempts`` of the run that gave the outcome);
  * ``fetch_report.json``: counts per reason over all shards, and this run's throughput.

Shard ``s`` always covers rows ``[s * shard_size, (s + 1) * shard_size)``. Rows finish in any order (issue 17: a
dead URL holds its own connection for its deadlines, never the other rows): finished rows are gathered per shard
(fields in a spill file) and a shard is written in row order once all its rows are in, so its bytes depend on the
table and the servers' answers only: a rerun after an interruption skips the published shards and rebuilds the
others, which gives the same files as an uninterrupted run. ``refetch_transient`` rewrites a published shard with
its transient failures (timeouts, connection errors, 408, 429, 5xx) fetched again, as if they had succeeded first.
The network side (aiohttp, guarded connector, bounded bodies) is ``franca.data.download``.

Robustness: only http/https (``bad_scheme``), a redirect limit (``redirect_loop``), a per-attempt deadline
(``timeout``), retries with exponential backoff on transient errors (timeouts, 5xx, 408/429, connection errors),
a byte limit on the decompressed body (``too_large``), a pixel limit read from the header before decoding
(``too_many_pixels``, the decompression-bomb guard) and a full decode check (``not_an_image``, ``truncated``).

Hostile input (issue 12): decoding runs under a format allow-list (``franca.data.images``: an EPS body never
reaches Ghostscript); gzip/deflate bodies are inflated with a bound on the bytes produced (``too_large``); a body
shorter than its Content-Length is ``truncated`` (not retried); URLs and redirects whose DNS answers include a
loopback, private, link-local (169.254.169.254) or reserved address fail as ``blocked_address`` unless
``allow_private_addresses`` allows them; any other per-row error is a failure row (``process_error``...), never
an abort. Error messages hold no object addresses, so a rerun writes byte-identical status tables.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import inspect
import io
import itertools
import json
import logging
import os
import tarfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pandas as pd
from PIL import Image

from franca.data.download import RETRYABLE, Failure, allowed_networks, classify, download, is_transient, session
from franca.data.images import (
    FORMAT_EXT,
    ImageCheckError,
    canonical_image,
    check_image,
    clean_message,
    encode_png,
    is_canonical,
)
from franca.data.manifest import (
    raw_shard_complete,
    raw_status_path,
    raw_tar_path,
    remove_stale_temps,
    write_parquet_atomic,
)
from franca.data.shards import atomic_write_bytes, fsync_dir

logger = logging.getLogger(__name__)

__all__ = ["fetch_urls", "refetch_transient", "read_url_table", "process_image", "is_transient", "RETRYABLE"]

# Rows held by the open shards (status records in memory, samples in their spill files), per connection: a dead URL
# blocks its shard for its deadlines (timeout 10 s x 3 attempts = 31.5 s with laion.yaml's settings) while the
# others go on; 512 rows a connection cover ~65 s of fetching at 500 URLs/s, so the window never waits on it.
LOOKAHEAD_PER_CONNECTION = 512
MAX_OPEN_SHARDS = 64  # shards gathered at once (one spill file each)
# status table: one row per input row; ``attempts`` of the run that gave the outcome; ``transient`` (bool): a
# failure that may succeed later (``is_transient``), re-fetched by ``refetch_transient``
_STATUS_COLUMNS = ["key", "url", "status", "reason", "http_status", "error_message", "attempts", "transient"]
_STATUS_COLUMNS += ["bytes", "ext", "width", "height", "original_width", "original_height", "sha256"]
_INT_COLUMNS = ["http_status", "attempts", "bytes", "width", "height", "original_width", "original_height"]
_STATUS_DTYPES = {c: ("Int64" if c in _INT_COLUMNS else "string") for c in _STATUS_COLUMNS} | {"transient": "boolean"}


_TABLE_SUFFIXES = (".parquet", ".csv", ".tsv")


def read_url_table(path: str | Path, url_col: str = "url") -> pd.DataFrame:
    """Read a parquet/CSV/TSV URL table, or a folder of them (LAION's ``part-*.parquet``: concatenated in file-name
    order, so the sample keys stay stable); raises ValueError naming the file when ``url_col`` is missing."""
    path = Path(path)
    if path.is_dir():
        parts = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in _TABLE_SUFFIXES)
        if not parts:
            raise ValueError(f"URL table folder {path} holds no .parquet, .csv or .tsv file")
        return pd.concat([read_url_table(p, url_col) for p in parts], ignore_index=True)
    if path.suffix.lower() == ".parquet":
        table = pd.read_parquet(path)
    elif path.suffix.lower() in (".csv", ".tsv"):
        table = pd.read_csv(path, sep="\t" if path.suffix.lower() == ".tsv" else ",", keep_default_na=False)
    else:
        raise ValueError(f"URL table {path}: expected .parquet, .csv or .tsv (or a folder of them)")
    if url_col not in table.columns:
        raise ValueError(f"URL table {path} has no column {url_col!r} (columns: {list(table.columns)})")
    return table.reset_index(drop=True)


def process_image(
    data: bytes, *, max_pixels: int | None, resize_max_side: int | None, reencode: str, encode_format: str = "jpg"
) -> tuple[bytes, str, dict[str, int]]:
    """Decode check (format allow-list), optional keep-ratio downscale (only if bigger) and re-encoding.

    ``reencode="never"`` stores the served bytes (the shard stage makes them canonical later). Otherwise the
    stored image is canonical (``franca.data.images``: upright, 8-bit RGB/RGBA): with ``if_resized``, an image
    that is not resized is stored as ``canonical_encode`` stores it (served bytes if canonical, else PNG); resized
    images and every image under ``always`` are encoded in ``encode_format``.
    Sizes are those of the upright image. Returns (bytes to store, extension, sizes). Raises ImageCheckError.
    """
    image = check_image(data, max_pixels=max_pixels)
    if reencode == "never":
        ext = FORMAT_EXT.get(image.format or "", "img")
        width, height = image.size
        return data, ext, {"original_width": width, "original_height": height, "width": width, "height": height}
    if reencode == "if_resized" and is_canonical(image, data):  # stored as served unless resized (no conversion)
        width, height = image.size  # upright: a canonical image has no orientation tag
        if resize_max_side is None or max(width, height) <= resize_max_side:
            sizes = {"original_width": width, "original_height": height, "width": width, "height": height}
            return data, FORMAT_EXT[image.format], sizes
    upright = canonical_image(image)
    width, height = upright.size
    sizes = {"original_width": width, "original_height": height, "width": width, "height": height}
    resized = resize_max_side is not None and max(width, height) > resize_max_side
    if resized:
        scale = resize_max_side / max(width, height)
        new_size = (max(1, round(width * scale)), max(1, round(height * scale)))
        upright = upright.resize(new_size, Image.Resampling.LANCZOS)
        sizes["width"], sizes["height"] = new_size
    if reencode == "if_resized" and not resized:  # as the shard stage stores it (images.canonical_encode)
        if is_canonical(image, data):
            return data, FORMAT_EXT[image.format], sizes
        return encode_png(upright), "png", sizes
    buf = io.BytesIO()
    if encode_format == "jpg":
        upright.convert("RGB").save(buf, format="JPEG", quality=95)
    else:
        upright.save(buf, format="PNG", compress_level=6)
    return buf.getvalue(), encode_format, sizes


def _json_value(value: Any) -> Any:
    """A table cell as a JSON value (numpy scalars and arrays, NaN / NA -> None)."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if value is None or (pd.api.types.is_scalar(value) and pd.isna(value)):
        return None
    return value.item() if isinstance(value, np.generic) else value


class _Fetcher:
    """One fetch run: per-row download with retries, then decoding in a worker thread.

    Each attempt first takes one of ``concurrency`` connection slots (the session's connection limit), then starts
    its deadline: a request never waits on the pool inside its ``timeout``, so fast URLs do not time out behind
    slow ones.
    """

    def __init__(self, client, opts: dict[str, Any]):
        self.client, self.opts = client, opts
        self.slots = asyncio.Semaphore(opts["concurrency"])

    async def _attempts(self, url: str) -> tuple[bytes, int]:
        retries, backoff, timeout = self.opts["retries"], self.opts["backoff"], self.opts["timeout"]
        for attempt in range(retries + 1):
            await self.slots.acquire()  # outside the deadline
            try:
                body = download(self.client, url, self.opts["max_bytes"], self.opts["max_redirects"])
                return await asyncio.wait_for(body, timeout), attempt
            except Exception as exc:  # every failure is classified into a manifest reason
                failure = classify(exc)
                failure.attempts = attempt + 1
                if not is_transient(failure.reason) or attempt == retries:
                    raise failure from exc
            finally:
                self.slots.release()
            await asyncio.sleep(backoff * 2**attempt)
        raise AssertionError("unreachable")

    async def fetch_row(self, key: str, url: str) -> dict[str, Any]:
        """Status record of one row; a success also carries ``data`` and ``ext``. Never raises (but cancels)."""
        record: dict[str, Any] = {"key": key, "url": url, "status": "failed", "attempts": 0}
        try:
            if urlsplit(url).scheme.lower() not in ("http", "https"):
                raise Failure("bad_scheme", f"scheme {urlsplit(url).scheme!r} not allowed")
            data, attempt = await self._attempts(url)
            record["attempts"] = attempt + 1
            stored, ext, sizes = await asyncio.to_thread(
                process_image, data, max_pixels=self.opts["max_pixels"], resize_max_side=self.opts["resize_max_side"],
                reencode=self.opts["reencode"], encode_format=self.opts["encode_format"],
            )  # fmt: skip
        except Exception as exc:  # per-row errors never stop the fetch: a failure row with its reason
            reason = getattr(exc, "reason", "process_error")
            message = str(exc) if isinstance(exc, (Failure, ImageCheckError)) else f"{type(exc).__name__}: {exc}"
            record.update(reason=reason, error_message=clean_message(message))
            record.update(http_status=getattr(exc, "http_status", None))
            record["attempts"] = getattr(exc, "attempts", record["attempts"])
            record["transient"] = is_transient(reason)
            return record
        sha = hashlib.sha256(stored).hexdigest()
        record.update(status="success", data=stored, ext=ext, bytes=len(stored), sha256=sha, http_status=200, **sizes)
        record["transient"] = False
        return record


def _sample_fields(record: dict[str, Any], row: dict[str, Any], caption_col: str | None) -> dict[str, bytes]:
    caption = _json_value(row.get(caption_col)) if caption_col else None
    meta = {k: _json_value(v) for k, v in row.items()}
    meta.update({k: record.get(k) for k in ("key", "url", "status", "sha256", "width", "height")})
    meta.update({k: record.get(k) for k in ("original_width", "original_height")})
    meta["caption"] = caption
    fields = {record["ext"]: record["data"], "json": json.dumps(meta, sort_keys=True, default=str).encode()}
    if caption is not None:
        fields["txt"] = str(caption).encode()
    return fields


def _tar_template() -> bytes:
    info = tarfile.TarInfo("x")
    info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = 0, 0, 0o644, 0, 0, "", ""
    return info.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape")


_TAR_TEMPLATE = _tar_template()


def _tar_member(name: str, data: bytes) -> bytes:
    """One member of a GNU tar, byte for byte as ``AtomicTarWriter.write`` stores it (mode 644, mtime 0, uid/gid 0,
    no user names): the template header with name, size and checksum filled in (the header fields tarfile writes
    for names under 100 bytes), the data, NUL padding to a 512-byte block. tarfile itself costs ~0.1 ms a member."""
    raw = name.encode()
    if len(raw) >= 100 or len(data) >= 8**11:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = len(data), 0, 0o644, 0, 0, "", ""
        header = info.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape")
    else:
        block = bytearray(_TAR_TEMPLATE)
        block[0:100] = raw.ljust(100, b"\0")
        block[124:136] = b"%011o\0" % len(data)
        block[148:156] = b" " * 8  # the checksum counts its own field as spaces
        block[148:155] = b"%06o\0" % sum(block)
        header = bytes(block)
    return header + data + bytes(-len(data) % tarfile.BLOCKSIZE)


class _ShardBuffer:
    """The finished rows of one raw shard, gathered in any order: status records in memory, each sample's tar
    members appended to a spill file (``.<shard>.spill.tmp-<pid>``: a killed run's spill goes with the other stale
    temps).

    ``publish`` writes the tar (members in row order, then tarfile's end blocks and record padding), then the status
    table, each atomically, so the shard's bytes depend on the table and the servers' answers only, never on the
    order in which the rows finished, and equal those of ``AtomicTarWriter`` given the same samples.
    """

    def __init__(self, out_dir: Path, shard: int, rows: range):
        self.out_dir, self.shard, self.rows = out_dir, shard, rows
        self.status: dict[int, dict[str, Any]] = {}
        self.index: dict[int, tuple[int, int]] = {}  # row -> (offset, length) of its members in the spill
        self.spill_path = out_dir / f".{shard:06d}.spill.tmp-{os.getpid()}"
        self.spill: io.BufferedRandom | None = None
        self.spilled = 0

    def add(self, row: int, status: dict[str, Any], fields: dict[str, bytes] | None) -> None:
        self.status[row] = status
        if fields:
            self.spill = self.spill or open(self.spill_path, "w+b")  # noqa: SIM115 (closed by publish / close)
            members = b"".join(_tar_member(f"{status['key']}.{ext}", fields[ext]) for ext in sorted(fields))
            self.spill.write(members)
            self.index[row] = (self.spilled, len(members))
            self.spilled += len(members)

    @property
    def complete(self) -> bool:
        return len(self.status) == len(self.rows)

    def publish(self) -> None:
        path = raw_tar_path(self.out_dir, self.shard)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as out:
                if self.spill is not None:
                    self.spill.flush()
                for r in self.rows:
                    if r in self.index:
                        at, n = self.index[r]
                        out.write(os.pread(self.spill.fileno(), n, at))
                end = out.tell() + 2 * tarfile.BLOCKSIZE  # tarfile's close: two zero blocks, then a full record
                out.write(bytes(2 * tarfile.BLOCKSIZE + (-end % tarfile.RECORDSIZE)))
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fsync_dir(path.parent)
        frame = pd.DataFrame([self.status[r] for r in self.rows], columns=_STATUS_COLUMNS).astype(_STATUS_DTYPES)
        write_parquet_atomic(frame, raw_status_path(self.out_dir, self.shard))
        self.close()

    def close(self) -> None:
        if self.spill is not None:
            self.spill.close()
            self.spill = None
        self.spill_path.unlink(missing_ok=True)


class _Job:
    """Rows ``todo`` of raw shard ``shard`` to fetch; ``buffer`` may already hold the shard's other rows."""

    def __init__(self, shard: int, todo: list[int], buffer: _ShardBuffer):
        self.shard, self.todo, self.buffer = shard, todo, buffer
        self.rows: list[dict[str, Any]] | None = None  # the table rows of the shard, while it is open


async def _fetch_job_row(fetcher: _Fetcher, job: _Job, r: int, opts: dict[str, Any]):
    key = f"{r + opts['key_offset']:0{opts['key_digits']}d}"  # the row's index in the whole table
    url = job.rows[r - job.buffer.rows.start][opts["url_col"]]
    return job, r, await fetcher.fetch_row(key, str(url))


async def _run(table: pd.DataFrame, jobs: list[_Job], opts: dict[str, Any], on_shard_done) -> None:
    """Fetch the rows of ``jobs``; rows finish in any order and each shard is published when its last row is in.

    Invariants: at most ``2 * concurrency`` rows in flight; rows start in table order, and a shard opens (its rows
    may start) only while fewer than ``MAX_OPEN_SHARDS`` shards holding fewer than ``LOOKAHEAD_PER_CONNECTION *
    concurrency`` rows to fetch are open: a dead URL holds one connection for its deadlines, never the others.
    """
    lookahead, window = LOOKAHEAD_PER_CONNECTION * opts["concurrency"], 2 * opts["concurrency"]
    queue = collections.deque((job, r) for job in jobs for r in job.todo)  # table order
    async with session(opts) as client:
        fetcher, pending, open_jobs, finished = _Fetcher(client, opts), set(), {}, asyncio.Queue()
        try:
            while True:
                while queue and len(pending) < window:
                    job, r = queue[0]
                    if job.shard not in open_jobs:
                        held = sum(len(j.todo) for j in open_jobs.values())
                        if open_jobs and (len(open_jobs) >= MAX_OPEN_SHARDS or held >= lookahead):
                            break
                        rows = job.buffer.rows
                        job.rows = table.iloc[rows.start : rows.stop].to_dict("records")
                        open_jobs[job.shard] = job
                    queue.popleft()
                    task = asyncio.ensure_future(_fetch_job_row(fetcher, job, r, opts))
                    task.add_done_callback(finished.put_nowait)  # O(1) per row, unlike asyncio.wait on the set
                    pending.add(task)
                if not pending:
                    break
                done = [await finished.get()]
                while not finished.empty():
                    done.append(finished.get_nowait())
                for task in done:
                    pending.discard(task)
                    job, r, record = task.result()
                    fields = None
                    if record["status"] == "success":
                        row = job.rows[r - job.buffer.rows.start]
                        fields = _sample_fields(record, row, opts["caption_col"])
                    job.buffer.add(r, {c: record.get(c) for c in _STATUS_COLUMNS}, fields)
                    if job.buffer.complete:
                        await asyncio.to_thread(job.buffer.publish)
                        del open_jobs[job.shard]
                        on_shard_done(job.shard)
        finally:
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            for job in open_jobs.values():
                job.buffer.close()


def _report(out_dir: Path, n_rows: int, n_shards: int, processed: list[int], fetched: int, elapsed: float):
    frames = {s: pd.read_parquet(raw_status_path(out_dir, s)) for s in range(n_shards)}
    status = pd.concat(frames.values(), ignore_index=True) if frames else pd.DataFrame(columns=_STATUS_COLUMNS)
    ok = status["status"] == "success"
    transient = ~ok & status["reason"].map(is_transient).astype(bool)
    with_transient = [s for s, f in frames.items() if (f["status"] != "success").any() and _transient_rows(f).any()]
    run = pd.concat([frames[s] for s in processed], ignore_index=True) if processed else status[:0]
    run_bytes = float(run.loc[run["status"] == "success", "bytes"].sum())
    return {
        "rows": n_rows,
        "shards": n_shards,
        "shards_skipped": n_shards - len(processed),
        "success": int(ok.sum()),
        "failed": int((~ok).sum()),
        "transient": int(transient.sum()),
        "shards_with_transient": with_transient,
        "reasons": {str(k): int(v) for k, v in status.loc[~ok, "reason"].value_counts().sort_index().items()},
        "bytes": int(status.loc[ok, "bytes"].sum()),
        "this_run": {
            "rows": len(run),
            "fetched": fetched,
            "elapsed_s": elapsed,
            "urls_per_s": fetched / max(elapsed, 1e-9),
            "mb_per_s": run_bytes / 1e6 / max(elapsed, 1e-9),
        },
    }


def _transient_rows(status: pd.DataFrame) -> pd.Series:
    """Boolean mask of the transient failures of a status table (derived from ``reason`` in tables without the
    ``transient`` column, written before it existed)."""
    failed = status["status"] != "success"
    if "transient" in status.columns:
        return failed & status["transient"].fillna(False).astype(bool)
    return failed & status["reason"].map(is_transient).astype(bool)


def _check_input(out_dir: Path, table: pd.DataFrame, shard_size: int, key_offset: int) -> None:
    """Refuse to resume over shards made from other rows, keys or shard size (their row ranges would not match).
    The rows are hashed as the table was read (``franca.data.units.rows_digest``), never the files' bytes."""
    from franca.data.units import rows_digest

    record = {"rows_sha256": rows_digest(table), "rows": len(table), "shard_size": shard_size}
    record["key_offset"] = key_offset
    marker = out_dir / "fetch_input.json"
    if marker.is_file():
        previous = json.loads(marker.read_text())
        if previous != record:
            raise ValueError(f"{out_dir} holds a fetch of another input ({previous} != {record}); use a new out_dir")
    else:
        atomic_write_bytes(marker, json.dumps(record, sort_keys=True).encode())


def _refetch_job(out_dir: Path, shard: int, rows: range) -> _Job | None:
    """A job that re-fetches the transient failures of complete shard ``shard``, its buffer holding every other
    row as published (status record and sample fields read back from the tar); None when there is none."""
    status = pd.read_parquet(raw_status_path(out_dir, shard))
    if len(status) != len(rows):
        raise ValueError(f"{raw_status_path(out_dir, shard)}: {len(status)} status rows, expected {len(rows)}")
    redo = _transient_rows(status).to_numpy()
    if not redo.any():
        return None
    if "transient" not in status.columns:
        status["transient"] = (status["status"] != "success") & status["reason"].map(is_transient).astype(bool)
    records = status.reindex(columns=_STATUS_COLUMNS).astype(object)
    records = records.where(records.notna(), None).to_dict("records")
    buffer = _ShardBuffer(out_dir, shard, rows)
    kept = {rec["key"]: (r, rec) for r, rec, again in zip(rows, records, redo, strict=True) if not again}
    with tarfile.open(raw_tar_path(out_dir, shard)) as tar:  # members grouped by key: one sample in memory
        for key, members in itertools.groupby(tar, key=lambda m: m.name.split(".", 1)[0]):
            fields = {m.name.split(".", 1)[1]: tar.extractfile(m).read() for m in members}
            if key in kept:
                buffer.add(*kept.pop(key), fields)
    for r, record in kept.values():  # the kept rows without a sample (permanent failures)
        buffer.add(r, record, None)
    return _Job(shard, [r for r, again in zip(rows, redo, strict=True) if again], buffer)


def fetch_urls(
    url_table_path: str | Path | pd.DataFrame,
    out_dir: str | Path,
    *,
    url_col: str = "url",
    caption_col: str | None = "caption",
    shard_size: int = 10_000,
    timeout: float = 10.0,
    retries: int = 2,
    backoff: float = 0.5,
    max_bytes: int = 20_000_000,
    max_pixels: int = 89_478_485,
    max_redirects: int = 5,
    resize_max_side: int | None = None,
    reencode: str = "if_resized",
    encode_format: str = "jpg",
    concurrency: int = 64,
    user_agent: str = "franca-repro-fetch/1.0 (+research; img2dataset-compatible)",
    allow_private_addresses: bool | list[str] = False,
    key_digits: int = 9,
    key_offset: int = 0,
    on_shard_done: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Fetch every row of a URL table into raw shards; returns the fetch report (also written to JSON).

    Every row ends as a sample or as a failure row with its reason and class (``transient``: timeout, connection
    error, 408, 429, 5xx; see ``refetch_transient``). Published shards are skipped. ``reencode``: ``never`` (store
    the served bytes; incompatible with ``resize_max_side``), ``if_resized`` (img2dataset's ``--skip_reencode``) or
    ``always``. ``timeout`` is the deadline of one attempt (the wait for a free connection is not part of it);
    ``on_shard_done(shard_index)`` runs after each published shard (shards finish in any order).
    ``allow_private_addresses``: False (default: URLs and redirects to loopback, private, link-local or reserved
    addresses fail as ``blocked_address``), True (allow all) or a list of networks (CIDR strings) to allow.
    ``url_table_path`` may be the rows themselves (a DataFrame: one work unit's rows, ``franca.data.units``);
    ``key_offset`` is then the global row index of its first row, so that sample keys stay the table's row indices.
    """
    options = {k: v for k, v in locals().items() if k not in ("url_table_path", "out_dir")}
    return _fetch(url_table_path, Path(out_dir), options, refetch=False, shards=None)


def refetch_transient(
    url_table_path: str | Path | pd.DataFrame, out_dir: str | Path, *, shards: list[int] | None = None, **options: Any
) -> dict[str, Any]:
    """Re-fetch the transient failures of the complete raw shards of ``out_dir`` (all, or those of ``shards``).

    ``options`` are those of ``fetch_urls`` (same defaults; the table and ``shard_size`` must be those of the first
    run). Each shard holding a transient failure is rewritten atomically (tar, then status table): a row that
    succeeds now is stored exactly as a first-time success (same tar and status bytes as a clean run where it
    succeeded at once), a row that fails again keeps its new failure; every other row is kept as published.
    Incomplete shards are left to ``fetch_urls``. Returns the fetch report (``this_run.fetched``: rows requested).
    """
    bound = inspect.signature(fetch_urls).bind(url_table_path, out_dir, **options)
    bound.apply_defaults()
    options = {k: v for k, v in bound.arguments.items() if k not in ("url_table_path", "out_dir")}
    return _fetch(url_table_path, Path(out_dir), options, refetch=True, shards=shards)


def _fetch(
    table_path: str | Path | pd.DataFrame, out_dir: Path, options: dict, refetch: bool, shards: list[int] | None
) -> dict:
    """``fetch_urls`` (``refetch`` False) or ``refetch_transient`` of ``shards`` (None: every complete shard)."""
    opts = dict(options)
    allowed_networks(opts["allow_private_addresses"])  # a bad value fails before any work
    if opts["reencode"] not in ("never", "if_resized", "always"):
        raise ValueError(f"reencode must be never, if_resized or always, got {opts['reencode']!r}")
    if opts["reencode"] == "never" and opts["resize_max_side"] is not None:
        raise ValueError("resize_max_side needs re-encoding: use reencode='if_resized' or 'always'")
    size, concurrency = opts["shard_size"], opts["concurrency"]
    if opts["encode_format"] not in ("jpg", "png") or size < 1 or concurrency < 1 or opts["retries"] < 0:
        raise ValueError(f"bad fetch options: encode_format={opts['encode_format']!r} shard_size={size}")
    if isinstance(table_path, pd.DataFrame):
        table_path, table = "<rows>", table_path.reset_index(drop=True)
        if opts["url_col"] not in table.columns:
            raise ValueError(f"URL rows have no column {opts['url_col']!r} (columns: {list(table.columns)})")
    else:
        table = read_url_table(Path(table_path), opts["url_col"])
    if opts["caption_col"] is not None and opts["caption_col"] not in table.columns:
        logger.warning("URL table %s has no caption column %r; captions left empty", table_path, opts["caption_col"])
        opts["caption_col"] = None
    end = opts["key_offset"] + len(table)
    if opts["key_offset"] < 0 or end > 10 ** opts["key_digits"]:
        raise ValueError(f"{end} rows do not fit keys of {opts['key_digits']} digits")
    out_dir.mkdir(parents=True, exist_ok=True)
    _check_input(out_dir, table, size, opts["key_offset"])
    remove_stale_temps(out_dir)
    n_shards = -(-len(table) // size)
    ranges = [range(s * size, min((s + 1) * size, len(table))) for s in range(n_shards)]
    if not refetch:
        todo = [s for s in range(n_shards) if not raw_shard_complete(out_dir, s)]
        jobs = [_Job(s, list(ranges[s]), _ShardBuffer(out_dir, s, ranges[s])) for s in todo]
    else:
        chosen = [s for s in (range(n_shards) if shards is None else shards) if raw_shard_complete(out_dir, s)]
        jobs = [j for s in chosen if (j := _refetch_job(out_dir, s, ranges[s])) is not None]
    fetched = sum(len(j.todo) for j in jobs)
    logger.info(
        "fetch %s: %d rows, %d shards, %d rows in %d to do", table_path, len(table), n_shards, fetched, len(jobs)
    )
    processed: list[int] = []

    def done(s: int) -> None:
        processed.append(s)
        if opts["on_shard_done"] is not None:
            opts["on_shard_done"](s)

    start = time.perf_counter()
    try:
        asyncio.run(_run(table, jobs, opts, done))
    finally:
        for job in jobs:
            job.buffer.close()
    report = _report(out_dir, len(table), n_shards, processed, fetched, time.perf_counter() - start)
    atomic_write_bytes(out_dir / "fetch_report.json", json.dumps(report, indent=2, sort_keys=True).encode())
    logger.info("fetch report: %s", report)
    return report
