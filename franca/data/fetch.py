"""Download a URL table (LAION / ReLAION parquet or CSV) into raw WebDataset shards (spec 6, issue 4 item 2).

Output (``out_dir``), compatible with img2dataset's ``--output_format webdataset``:
  * ``%06d.tar``: per successful row ``<key>.<ext>`` (the image), ``<key>.txt`` (caption, when present) and
    ``<key>.json`` (url, caption, sizes, sha256 and every extra column of the table); ``key = %09d`` row index;
  * ``%06d.parquet``: one status row per input row of the shard (``success`` or ``failed`` with its ``reason``);
  * ``fetch_report.json``: counts per reason over all shards, and this run's throughput.

Shard ``s`` always covers rows ``[s * shard_size, (s + 1) * shard_size)`` and its samples are written in row order,
so its bytes depend on the table and the servers' answers only: a rerun after an interruption skips the published
shards and rebuilds the others, which gives the same files as an uninterrupted run.

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
import contextlib
import hashlib
import importlib.util
import io
import ipaddress
import json
import logging
import socket
import sys
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpcore
import httpx
import numpy as np
import pandas as pd
from PIL import Image

from franca.data.images import (
    FORMAT_EXT,
    BoundedInflater,
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
from franca.data.shards import AtomicTarWriter, atomic_write_bytes

logger = logging.getLogger(__name__)

if importlib.util.find_spec("sniffio") is None:
    # httpcore runs ``import sniffio`` on every lock it creates; when sniffio is not installed each attempt searches
    # sys.path again (about 1 ms per request here). A None entry makes the import fail at once, as it would anyway.
    sys.modules.setdefault("sniffio", None)

__all__ = ["fetch_urls", "read_url_table", "process_image", "RETRYABLE"]

_CONNECTIONS_PER_CLIENT = 8
RETRYABLE = frozenset({"timeout", "connection_error", "http_408", "http_429"})  # plus every http_5xx
_STATUS_COLUMNS = ["key", "url", "status", "reason", "http_status", "error_message", "attempts", "bytes", "ext"]
_STATUS_COLUMNS += ["width", "height", "original_width", "original_height", "sha256"]
_INT_COLUMNS = ["http_status", "attempts", "bytes", "width", "height", "original_width", "original_height"]
_STATUS_DTYPES = {c: ("Int64" if c in _INT_COLUMNS else "string") for c in _STATUS_COLUMNS}


class _Failure(Exception):
    def __init__(self, reason: str, message: str = "", http_status: int | None = None):
        super().__init__(message or reason)
        self.reason, self.http_status = reason, http_status


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


async def _download(client: httpx.AsyncClient, url: str, max_bytes: int) -> bytes:
    """Body of a GET, failing fast on a non-200 status or past ``max_bytes``.

    The body is read raw and decoded here (gzip / deflate, ``BoundedInflater``), so the decoded bytes are bounded
    as they are produced. A body that ends before its Content-Length is ``truncated``.
    """
    async with client.stream("GET", url) as response:
        if response.status_code != 200:
            raise _Failure(f"http_{response.status_code}", http_status=response.status_code)
        length = response.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > max_bytes:
            raise _Failure("too_large", f"content-length {length} > {max_bytes}")
        encoding = response.headers.get("content-encoding", "identity").strip().lower() or "identity"
        encoding = "gzip" if encoding == "x-gzip" else encoding
        if encoding not in ("identity", "gzip", "deflate"):
            raise _Failure("bad_encoding", f"content-encoding {encoding!r} (only gzip and deflate are accepted)")
        inflater, received = BoundedInflater(encoding, max_bytes), 0
        try:
            async for chunk in response.aiter_raw():
                received += len(chunk)
                inflater.feed(chunk)
            return inflater.finish()
        except httpx.RemoteProtocolError as exc:
            if length is not None and length.isdigit() and received < int(length):
                raise _Failure("truncated", f"body ended after {received} of {length} bytes") from exc
            raise
        except ValueError as exc:
            raise _Failure("too_large", f"decoded body > {max_bytes} bytes") from exc
        except (zlib.error, EOFError) as exc:
            raise _Failure("bad_encoding", f"{encoding} body: {type(exc).__name__}: {exc}") from exc


def _is_public(address: str, allowed: tuple) -> bool:
    """True for a global unicast address, or one inside an allowed network (``allow_private_addresses``)."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if any(ip in net for net in allowed):
        return True
    return ip.is_global and not (ip.is_multicast or ip.is_reserved or ip.is_loopback or ip.is_link_local)


class _GuardedBackend(httpcore.AsyncNetworkBackend):
    """httpcore network backend that resolves the host itself and connects only when EVERY DNS answer is a public
    address (or in ``allowed``), to the checked address: loopback, private, link-local (the cloud metadata
    service 169.254.169.254 included), reserved and multicast targets are refused as ``blocked_address``. Every
    connection goes through here, so the check also holds after each redirect."""

    def __init__(self, allowed: tuple):
        self.allowed, self.inner = allowed, httpcore.AnyIOBackend()

    async def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise httpcore.ConnectError(f"cannot resolve {host}: {exc}") from exc
        addresses = list(dict.fromkeys(info[4][0] for info in infos))
        blocked = [a for a in addresses if not _is_public(a, self.allowed)]
        if blocked:
            message = f"{host} resolves to non-public address {blocked[0]} (set allow_private_addresses to fetch it)"
            raise _Failure("blocked_address", message)
        error: Exception = httpcore.ConnectError(f"no address for {host}")
        for address in addresses:
            try:
                return await self.inner.connect_tcp(address, port, timeout, local_address, socket_options)
            except httpcore.ConnectError as exc:
                error = exc
        raise error

    async def connect_unix_socket(self, path, timeout=None, socket_options=None):
        raise _Failure("blocked_address", "unix sockets are not fetched")

    async def sleep(self, seconds: float) -> None:
        await self.inner.sleep(seconds)


def _allowed_networks(allow_private_addresses: bool | list[str]) -> tuple:
    if allow_private_addresses is True:
        return (ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0"))
    if allow_private_addresses is False or allow_private_addresses is None:
        return ()
    try:
        return tuple(ipaddress.ip_network(n, strict=False) for n in allow_private_addresses)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"allow_private_addresses: expected true/false or a list of networks ({exc})") from exc


def _client(limits: httpx.Limits, allowed: tuple, opts: dict[str, Any]) -> httpx.AsyncClient:
    transport = httpx.AsyncHTTPTransport(limits=limits, trust_env=False)
    transport._pool = httpcore.AsyncConnectionPool(  # httpx has no network_backend argument: same pool, guarded
        ssl_context=httpx.create_ssl_context(trust_env=False),
        max_connections=limits.max_connections,
        max_keepalive_connections=limits.max_keepalive_connections,
        network_backend=_GuardedBackend(allowed),
    )
    headers = {"User-Agent": opts["user_agent"], "Accept-Encoding": "gzip, deflate"}
    return httpx.AsyncClient(
        transport=transport, follow_redirects=True, max_redirects=opts["max_redirects"], timeout=opts["timeout"],
        headers=headers, trust_env=False,
    )  # fmt: skip


def _classify(exc: Exception) -> _Failure:
    if isinstance(exc, _Failure):
        return exc
    table = [
        (httpx.TooManyRedirects, "redirect_loop"),
        (httpx.UnsupportedProtocol, "bad_scheme"),
        (httpx.InvalidURL, "bad_url"),
        ((httpx.TimeoutException, asyncio.TimeoutError, TimeoutError), "timeout"),
        ((httpx.NetworkError, httpx.RemoteProtocolError, httpx.ProxyError), "connection_error"),
        (httpx.DecodingError, "bad_encoding"),
    ]
    reason = next((r for types, r in table if isinstance(exc, types)), "error")
    return _Failure(reason, clean_message(f"{type(exc).__name__}: {exc}"))


class _Fetcher:
    """One fetch run: per-row download with retries, then decoding in a worker thread.

    Each attempt first takes a free connection slot of one client (``slots``: every client appears once per
    connection it may open), then starts its deadline: a request never waits on a pool inside its ``timeout``, so
    fast URLs do not time out behind slow ones.
    """

    def __init__(self, clients: list[httpx.AsyncClient], per_client: list[int], opts: dict[str, Any]):
        self.opts = opts
        self.slots: asyncio.Queue[httpx.AsyncClient] = asyncio.Queue()
        for client, n in zip(clients, per_client, strict=True):
            for _ in range(n):
                self.slots.put_nowait(client)

    async def _attempts(self, url: str) -> tuple[bytes, int]:
        retries, backoff, timeout = self.opts["retries"], self.opts["backoff"], self.opts["timeout"]
        for attempt in range(retries + 1):
            client = await self.slots.get()  # outside the deadline
            try:
                return await asyncio.wait_for(_download(client, url, self.opts["max_bytes"]), timeout), attempt
            except Exception as exc:  # every failure is classified into a manifest reason
                failure = _classify(exc)
                failure.attempts = attempt + 1
                retry = failure.reason in RETRYABLE or failure.reason.startswith("http_5")
                if not retry or attempt == retries:
                    raise failure from exc
            finally:
                self.slots.put_nowait(client)
            await asyncio.sleep(backoff * 2**attempt)
        raise AssertionError("unreachable")

    async def fetch_row(self, key: str, url: str) -> dict[str, Any]:
        """Status record of one row; a success also carries ``data`` and ``ext``. Never raises (but cancels)."""
        record: dict[str, Any] = {"key": key, "url": url, "status": "failed", "attempts": 0}
        try:
            if urlsplit(url).scheme.lower() not in ("http", "https"):
                raise _Failure("bad_scheme", f"scheme {urlsplit(url).scheme!r} not allowed")
            data, attempt = await self._attempts(url)
            record["attempts"] = attempt + 1
            stored, ext, sizes = await asyncio.to_thread(
                process_image, data, max_pixels=self.opts["max_pixels"], resize_max_side=self.opts["resize_max_side"],
                reencode=self.opts["reencode"], encode_format=self.opts["encode_format"],
            )  # fmt: skip
        except Exception as exc:  # per-row errors never stop the fetch: a failure row with its reason
            reason = getattr(exc, "reason", "process_error")
            message = str(exc) if isinstance(exc, (_Failure, ImageCheckError)) else f"{type(exc).__name__}: {exc}"
            record.update(reason=reason, error_message=clean_message(message))
            record.update(http_status=getattr(exc, "http_status", None))
            record["attempts"] = getattr(exc, "attempts", record["attempts"])
            return record
        sha = hashlib.sha256(stored).hexdigest()
        record.update(status="success", data=stored, ext=ext, bytes=len(stored), sha256=sha, http_status=200, **sizes)
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


async def _run(table, shards, out_dir, opts, on_shard_done) -> None:
    """Fetch the rows of ``shards`` through a sliding window and publish each shard when its last row is in."""
    n, size, url_col = len(table), opts["shard_size"], opts["url_col"]
    rows = [r for s in shards for r in range(s * size, min((s + 1) * size, n))]
    # httpcore's pool scans every connection for every queued request, so its cost grows with the square of the
    # pool size: several small clients (<= 8 connections each) keep that overhead flat at high concurrency.
    n_clients = -(-opts["concurrency"] // _CONNECTIONS_PER_CLIENT)
    per_client = [len(range(c, opts["concurrency"], n_clients)) for c in range(n_clients)]  # sums to concurrency
    allowed = _allowed_networks(opts["allow_private_addresses"])
    async with contextlib.AsyncExitStack() as stack:
        clients = []
        for k in per_client:
            limits = httpx.Limits(max_connections=k, max_keepalive_connections=k)
            clients.append(await stack.enter_async_context(_client(limits, allowed, opts)))
        fetcher, window, pending = _Fetcher(clients, per_client, opts), collections.deque(), iter(rows)
        writer, status = None, []
        try:
            while True:
                while len(window) < 2 * opts["concurrency"] and (r := next(pending, None)) is not None:
                    key = f"{r + opts['key_offset']:0{opts['key_digits']}d}"
                    window.append((r, asyncio.ensure_future(fetcher.fetch_row(key, str(table.at[r, url_col])))))
                if not window:
                    break
                r, task = window.popleft()
                record = await task
                s = r // size
                writer = writer or AtomicTarWriter(raw_tar_path(out_dir, s))
                if record["status"] == "success":
                    writer.write(record["key"], _sample_fields(record, table.iloc[r].to_dict(), opts["caption_col"]))
                status.append({c: record.get(c) for c in _STATUS_COLUMNS})
                if r == min((s + 1) * size, n) - 1:  # last row of shard s: publish tar, then its status table
                    writer.commit()
                    frame = pd.DataFrame(status, columns=_STATUS_COLUMNS).astype(_STATUS_DTYPES)
                    write_parquet_atomic(frame, raw_status_path(out_dir, s))
                    writer, status = None, []
                    if on_shard_done is not None:
                        on_shard_done(s)
        finally:
            for _, task in window:
                task.cancel()
            await asyncio.gather(*(t for _, t in window), return_exceptions=True)
            if writer is not None:
                writer.abort()


def _report(out_dir: Path, n_rows: int, n_shards: int, processed: list[int], elapsed: float) -> dict[str, Any]:
    frames = {s: pd.read_parquet(raw_status_path(out_dir, s)) for s in range(n_shards)}
    status = pd.concat(frames.values(), ignore_index=True) if frames else pd.DataFrame(columns=_STATUS_COLUMNS)
    ok = status["status"] == "success"
    run = pd.concat([frames[s] for s in processed], ignore_index=True) if processed else status[:0]
    run_bytes = float(run.loc[run["status"] == "success", "bytes"].sum())
    return {
        "rows": n_rows,
        "shards": n_shards,
        "shards_skipped": n_shards - len(processed),
        "success": int(ok.sum()),
        "failed": int((~ok).sum()),
        "reasons": {str(k): int(v) for k, v in status.loc[~ok, "reason"].value_counts().sort_index().items()},
        "bytes": int(status.loc[ok, "bytes"].sum()),
        "this_run": {
            "rows": len(run),
            "elapsed_s": elapsed,
            "urls_per_s": len(run) / max(elapsed, 1e-9),
            "mb_per_s": run_bytes / 1e6 / max(elapsed, 1e-9),
        },
    }


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

    Every row ends as a sample or as a failure row with its reason. ``reencode``: ``never`` (store the served
    bytes; incompatible with ``resize_max_side``), ``if_resized`` (img2dataset's ``--skip_reencode``) or ``always``.
    ``timeout`` is the deadline of one attempt (the wait for a free connection is not part of it);
    ``on_shard_done(shard_index)`` runs after each published shard. ``allow_private_addresses``: False (default:
    URLs and redirects to loopback, private, link-local or reserved addresses fail as ``blocked_address``), True
    (allow all) or a list of networks (CIDR strings) to allow, e.g. an internal mirror. ``url_table_path`` may be
    the rows themselves (a DataFrame: one work unit's rows, ``franca.data.units``); ``key_offset`` is then the
    global row index of its first row, so that sample keys stay the table's row indices.
    """
    _allowed_networks(allow_private_addresses)  # a bad value fails before any work
    if reencode not in ("never", "if_resized", "always"):
        raise ValueError(f"reencode must be never, if_resized or always, got {reencode!r}")
    if reencode == "never" and resize_max_side is not None:
        raise ValueError("resize_max_side needs re-encoding: use reencode='if_resized' or 'always'")
    if encode_format not in ("jpg", "png") or shard_size < 1 or concurrency < 1 or retries < 0:
        raise ValueError(f"bad fetch options: encode_format={encode_format!r} shard_size={shard_size}")
    out_dir = Path(out_dir)
    if isinstance(url_table_path, pd.DataFrame):
        table_path, table = "<rows>", url_table_path.reset_index(drop=True)
        if url_col not in table.columns:
            raise ValueError(f"URL rows have no column {url_col!r} (columns: {list(table.columns)})")
    else:
        table_path = Path(url_table_path)
        table = read_url_table(table_path, url_col)
    if caption_col is not None and caption_col not in table.columns:
        logger.warning("URL table %s has no caption column %r; captions left empty", table_path, caption_col)
        caption_col = None
    if key_offset < 0 or key_offset + len(table) > 10**key_digits:
        raise ValueError(f"{key_offset + len(table)} rows do not fit keys of {key_digits} digits")
    out_dir.mkdir(parents=True, exist_ok=True)
    _check_input(out_dir, table, shard_size, key_offset)
    remove_stale_temps(out_dir)
    n_shards = -(-len(table) // shard_size)
    todo = [s for s in range(n_shards) if not raw_shard_complete(out_dir, s)]
    logger.info("fetch %s: %d rows, %d shards, %d to do", table_path, len(table), n_shards, len(todo))
    opts = {"url_col": url_col, "caption_col": caption_col, "shard_size": shard_size, "timeout": timeout}
    opts.update({"retries": retries, "backoff": backoff, "max_bytes": max_bytes, "max_pixels": max_pixels})
    opts.update({"max_redirects": max_redirects, "resize_max_side": resize_max_side, "reencode": reencode})
    opts.update({"encode_format": encode_format, "concurrency": concurrency, "user_agent": user_agent})
    opts.update(key_digits=key_digits, key_offset=key_offset, allow_private_addresses=allow_private_addresses)
    start = time.perf_counter()
    processed: list[int] = []

    def done(s: int) -> None:
        processed.append(s)
        if on_shard_done is not None:
            on_shard_done(s)

    asyncio.run(_run(table, todo, out_dir, opts, done))
    report = _report(out_dir, len(table), n_shards, processed, time.perf_counter() - start)
    atomic_write_bytes(out_dir / "fetch_report.json", json.dumps(report, indent=2, sort_keys=True).encode())
    logger.info("fetch report: %s", report)
    return report
