"""Manifest schema, image checks and per-shard status files shared by fetch, ingest and the shard stage (issue 4).

The manifest (``<out>/manifest.parquet``, docs/interfaces.md) holds one row per sample (``status == "ok"``) and one
per failure (``status == "failed"`` with a ``reason``). ``shard`` is relative to the manifest's directory.

Raw directories written by ``fetch`` and ``sources`` (and by img2dataset) hold ``%06d.tar`` shards, each with a
``%06d.parquet`` status table beside it listing every input row of that shard (success or failure with its
reason). A raw shard counts as complete only when both files exist; the status file is published after the tar.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import pandas as pd
from PIL import Image

from franca.data.images import (
    FORMAT_EXT,
    ImageCheckError,
    canonical_encode,
    check_image,
    clean_message,
    orientation,
    transpose_upright,
)
from franca.data.phash import colour_layout, phash_image, phash_to_hex
from franca.data.shards import (
    IMAGE_EXTS,
    AtomicTarWriter,
    ReadStats,
    fsync_dir,
    iter_raw_samples,
    list_shards,
    shard_name,
)

logger = logging.getLogger(__name__)

__all__ = [
    "MANIFEST_COLUMNS",
    "ImageCheckError",
    "check_image",
    "image_record",
    "make_manifest",
    "write_parquet_atomic",
    "read_manifest",
    "manifest_files",
    "raw_tar_path",
    "raw_status_path",
    "raw_shard_complete",
    "remove_stale_temps",
    "FORMAT_EXT",
    "canonicalise",
    "canonicalise_shard",
]

# column -> pandas dtype; nullable dtypes so that failure rows keep integers integral
MANIFEST_COLUMNS: dict[str, str] = {
    "key": "string",
    "split": "string",
    "shard": "string",
    "status": "string",  # "ok" | "failed"
    "reason": "string",  # failure reason (http_404, timeout, not_an_image, ...), null for samples
    "bytes": "Int64",
    "sha256": "string",
    "phash": "string",  # 16 hex digits (franca.data.phash)
    "layout": "string",  # 4 x 4 mean-RGB colour layout, 96 hex digits (franca.data.phash.colour_layout)
    "width": "Int64",
    "height": "Int64",
    "format": "string",  # jpg | png
    "label": "Int64",
    "class_name": "string",
    "source": "string",  # URL or path
    "license": "string",
    "caption": "string",
    "raw_shard": "string",
}


def image_record(
    data: bytes, max_pixels: int | None = None, where: str = "", image: Image.Image | None = None
) -> tuple[dict[str, Any], Image.Image]:
    """Manifest columns of one encoded image (bytes, sha256, phash, layout, width, height, format) and the image
    (``image``: ``data`` already decoded, as ``canonical_encode`` returns it)."""
    image = image if image is not None else check_image(data, max_pixels=max_pixels, where=where)
    record = {
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "phash": phash_to_hex(phash_image(image)),
        "layout": colour_layout(image),
        "width": image.size[0],
        "height": image.size[1],
        "format": FORMAT_EXT.get(image.format or "", (image.format or "png").lower()),
    }
    return record, image


def make_manifest(rows: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """DataFrame with exactly ``MANIFEST_COLUMNS`` (missing values null), in the order given."""
    frame = pd.DataFrame.from_records(list(rows), columns=list(MANIFEST_COLUMNS))
    return frame.astype(MANIFEST_COLUMNS)


def write_parquet_atomic(frame: pd.DataFrame, path: str | Path) -> Path:
    """Write a parquet file through a temp name in the same directory, fsync, rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    frame.to_parquet(tmp, index=False)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return path


def manifest_files(path: str | Path) -> list[Path]:
    """The parquet files of a manifest: the file itself, or a partitioned dataset directory's ``*.parquet`` files in
    name order (``data/<ds>/manifest/<unit>.parquet``, one per work unit; names starting with ``.`` or ``_`` are
    not data, as in pyarrow)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.glob("*.parquet") if not p.name.startswith((".", "_")))
        if not files:
            raise FileNotFoundError(f"manifest directory {path} holds no .parquet file")
        return files
    if not path.is_file():
        raise FileNotFoundError(f"manifest not found: {path}")
    return [path]


def read_manifest(path: str | Path, columns: list[str] | None = None) -> pd.DataFrame:
    """Read a manifest (a ``manifest.parquet`` file or a partitioned ``manifest/`` directory, its partitions
    concatenated in name order) and check its columns (clear error naming the file). ``columns``: read only these.
    A ``shard`` value is relative to the directory that holds the manifest file or directory."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    tables = []
    for file in manifest_files(path):
        present = pq.read_schema(file).names
        wanted = present if columns is None else list(columns)
        missing = [c for c in wanted if c not in present]
        missing += [c for c in ("key", "status", "shard", "sha256", "phash") if columns is None and c not in present]
        if missing:
            raise ValueError(f"manifest {file} lacks columns {missing}")
        tables.append(pq.read_table(file, columns=wanted))
    frame = pa.concat_tables(tables, promote_options="default").to_pandas() if len(tables) > 1 else None
    return frame if frame is not None else tables[0].to_pandas()


def raw_tar_path(raw_dir: str | Path, index: int) -> Path:
    return Path(raw_dir) / f"{index:06d}.tar"


def raw_status_path(raw_dir: str | Path, index: int) -> Path:
    return Path(raw_dir) / f"{index:06d}.parquet"


def raw_shard_complete(raw_dir: str | Path, index: int) -> bool:
    """True when both the tar and its status table of raw shard ``index`` were published."""
    return raw_tar_path(raw_dir, index).is_file() and raw_status_path(raw_dir, index).is_file()


def remove_stale_temps(directory: str | Path) -> int:
    """Delete temp files left by a killed writer (``.<name>.tmp-<pid>``); returns how many."""
    stale = list(Path(directory).glob(".*.tmp-*")) if Path(directory).is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)
    if stale:
        logger.info("removed %d stale temp files in %s", len(stale), directory)
    return len(stale)


def _raw_status_rows(raw_tar: Path) -> list[dict[str, Any]]:
    """Failure rows of a raw shard's status table (this project's ``reason`` column, or img2dataset's fields)."""
    status_path = raw_tar.with_suffix(".parquet")
    if not status_path.is_file():
        return []
    table = pd.read_parquet(status_path)
    if "status" not in table.columns:
        raise ValueError(f"status table {status_path} has no 'status' column")
    failed = table[~table["status"].isin(["success", "ok"])].astype(object)
    failed = failed.where(failed.notna(), None)  # NA -> None, so that `or` below is safe
    rows = []
    for rec in failed.to_dict("records"):
        reason = rec.get("reason") or f"img2dataset:{rec.get('status')}:{rec.get('error_message')}"
        rows.append({"key": str(rec["key"]), "reason": str(reason), "source": rec.get("url") or rec.get("source")})
    return rows


def _sample_row(fields: dict[str, bytes], record: dict[str, Any], meta: dict[str, Any], license_field: str):
    label = int(fields["cls"].decode().strip()) if "cls" in fields else meta.get("label")
    caption = fields["txt"].decode("utf-8", errors="replace") if "txt" in fields else meta.get("caption")
    return {
        **record,
        "label": None if label is None else int(label),
        "class_name": meta.get("class_name"),
        "source": meta.get("url") or meta.get("source"),
        "license": meta.get(license_field),
        "caption": caption,
    }


def _canonical_fields(fields: dict[str, bytes], ext: str, where: str) -> tuple[dict[str, Any], bytes, bytes | None]:
    """(manifest columns, stored image bytes, stored mask) of a raw sample: the image in its canonical form
    (``franca.data.images.canonical_encode``) and the mask turned upright with it (same EXIF transpose)."""
    data, fmt, image = canonical_encode(fields[ext], where=where)
    record, _ = image_record(data, where=where, image=image)
    record["format"] = fmt
    mask = fields.get("seg.png")
    if mask is not None and data is not fields[ext]:
        turn = orientation(check_image(fields[ext], where=where))
        if turn != 1:
            with Image.open(io.BytesIO(mask), formats=["PNG"]) as seg:
                buf = io.BytesIO()
                transpose_upright(seg, turn).save(buf, format="PNG", compress_level=6)
                mask = buf.getvalue()
    return record, data, mask


def _prefixed(prefix: str, raw_key: str) -> str:
    """Canonical key; raw keys that already carry the split prefix (generated data) are kept as they are."""
    return raw_key if raw_key.startswith(prefix) else f"{prefix}{raw_key}"


def canonicalise_shard(
    raw_tar: str | Path,
    out_dir: str | Path,
    split: str,
    index: int,
    key_prefix: str,
    license_field: str = "license",
    default_license: str | None = None,
    name: str | None = None,
) -> list[dict[str, Any]]:
    """One raw shard -> ``shards/<name>`` (default ``<split>-%06d.tar``) + ``manifest_parts/<split>-%06d.parquet``;
    returns its rows.

    Images are stored in their canonical form (``franca.data.images``): byte-identical when already canonical (JPEG
    or 8-bit PNG, RGB/RGBA, upright), else a lossless PNG of the upright 8-bit RGB/RGBA image (a mask is turned
    with its image). Samples that
    fail the decode check, the raw status table's failures and a damaged raw tar become failure rows.
    """
    raw_tar, out_dir = Path(raw_tar), Path(out_dir)
    rel = f"shards/{name or shard_name(split, index)}"
    stats, rows = ReadStats(), []
    base = {"split": split, "raw_shard": str(raw_tar)}
    with AtomicTarWriter(out_dir / rel) as writer:
        for raw_key, fields in iter_raw_samples(raw_tar, stats):
            key, where = _prefixed(key_prefix, raw_key), f"{raw_tar}:{raw_key}"
            try:
                meta = json.loads(fields["json"]) if "json" in fields else {}
                ext = next((e for e in (*IMAGE_EXTS, "gif", "bmp", "tiff", "avif") if e in fields), None)
                if ext is None:
                    raise ImageCheckError("no_image", f"{where} has no image member")
                record, data, mask = _canonical_fields(fields, ext, where)
            except Exception as exc:  # every per-sample error is a failure row; the shard goes on
                reason = getattr(exc, "reason", "bad_metadata" if isinstance(exc, ValueError) else "decode_error")
                message = clean_message(f"{type(exc).__name__}: {exc}")
                logger.warning("%s: %s", where, message)
                rows.append({**base, "key": key, "status": "failed", "reason": reason, "source": where})
                continue
            row = {**base, **_sample_row(fields, record, meta, license_field), "key": key, "status": "ok", "shard": rel}
            row["license"] = row["license"] or default_license
            out_meta = {**meta, "key": key, "raw_key": raw_key, "raw_shard": str(raw_tar)}
            out_meta.update({k: row[k] for k in ("source", "license", "caption", "class_name") if row[k] is not None})
            out_fields = {record["format"]: data, "json": json.dumps(out_meta, sort_keys=True, default=str).encode()}
            if row["label"] is not None:
                out_fields["cls"] = str(row["label"]).encode()
            if row["caption"]:
                out_fields["txt"] = row["caption"].encode()
            if mask is not None:
                out_fields["seg.png"] = mask
            writer.write(key, out_fields)
            rows.append(row)
    if stats.corrupt_shards:
        rows.append({**base, "key": f"{key_prefix}{raw_tar.stem}_shard", "status": "failed", "reason": "corrupt_shard"})
    for failure in _raw_status_rows(raw_tar):
        rows.append({**base, **failure, "key": _prefixed(key_prefix, failure["key"]), "status": "failed"})
    write_parquet_atomic(make_manifest(rows), out_dir / "manifest_parts" / f"{split}-{index:06d}.parquet")
    return rows


def _unit_shard_name(split: str, index: int, unit: str | None) -> str:
    """``<split>-%06d.tar``, or ``<split>-<unit>-%06d.tar`` in a work unit (names unique across a dataset's units)."""
    return f"{split}-{unit}-{index:06d}.tar" if unit else shard_name(split, index)


def _part_done(out_dir: Path, split: str, index: int, raw_tar: Path, unit: str | None = None) -> bool:
    part = out_dir / "manifest_parts" / f"{split}-{index:06d}.parquet"
    if not (part.is_file() and (out_dir / "shards" / _unit_shard_name(split, index, unit)).is_file()):
        return False
    raw = pd.read_parquet(part, columns=["raw_shard"])["raw_shard"]
    return raw.empty or bool((raw == str(raw_tar)).all())


def canonicalise(
    raw_dirs: Mapping[str, Iterable[str | Path]] | Iterable[str | Path],
    out_dir: str | Path,
    *,
    workers: int = 1,
    license_field: str = "license",
    default_license: str | None = None,
    unit: str | None = None,
) -> dict[str, Any]:
    """The ``shard`` stage: raw shards of fetch / ingest / img2dataset -> canonical shards + ``manifest.parquet``.

    ``raw_dirs`` maps a split to its raw directories (a plain list means ``{"train": list}``). Raw shard ``i`` of a
    split (sorted over its directories) becomes ``shards/<split>-%06d.tar`` with key ``<split>_<raw key>`` (or
    ``<split>_<dir index>_<raw key>`` with several directories; a raw key that already starts so is kept).
    One job per shard, run in ``workers`` processes, resumable (a shard whose manifest part exists is kept).
    ``unit``: the work unit these raw shards belong to (``franca.data.units``); its name goes into the shard names.
    """
    start = time.perf_counter()
    out_dir = Path(out_dir)
    splits = dict(raw_dirs) if isinstance(raw_dirs, Mapping) else {"train": list(raw_dirs)}
    jobs = []
    for split, dirs in splits.items():
        dirs = [Path(d) for d in dirs]
        tars = [
            (t, f"{split}_{j}_" if len(dirs) > 1 else f"{split}_") for j, d in enumerate(dirs) for t in list_shards(d)
        ]
        if not tars:
            raise FileNotFoundError(f"no raw shards (*.tar) for split {split!r} in {[str(d) for d in dirs]}")
        jobs += [(tar, split, i, prefix) for i, (tar, prefix) in enumerate(tars)]
    for sub in ("shards", "manifest_parts"):
        remove_stale_temps(out_dir / sub)
    pending = [job for job in jobs if not _part_done(out_dir, job[1], job[2], job[0], unit)]
    extra = (license_field, default_license)
    if workers > 1 and len(pending) > 1:
        with ProcessPoolExecutor(workers) as pool:
            futures = [
                pool.submit(canonicalise_shard, t, out_dir, s, i, p, *extra, _unit_shard_name(s, i, unit))
                for t, s, i, p in pending
            ]
            for future in futures:
                future.result()
    else:
        for tar, split, i, prefix in pending:
            canonicalise_shard(tar, out_dir, split, i, prefix, *extra, _unit_shard_name(split, i, unit))
    parts = [pd.read_parquet(out_dir / "manifest_parts" / f"{s}-{i:06d}.parquet") for _, s, i, _ in jobs]
    manifest = make_manifest(pd.concat(parts, ignore_index=True).to_dict("records"))
    write_parquet_atomic(manifest, out_dir / "manifest.parquet")
    elapsed = time.perf_counter() - start
    ok = manifest["status"] == "ok"
    summary = {
        "manifest": str(out_dir / "manifest.parquet"),
        "shards": len(jobs),
        "shards_resumed": len(jobs) - len(pending),
        "samples": int(ok.sum()),
        "failed": int((~ok).sum()),
        "failures": {str(k): int(v) for k, v in manifest.loc[~ok, "reason"].value_counts().items()},
        "per_split": {str(k): int(v) for k, v in manifest.loc[ok, "split"].value_counts().items()},
        "elapsed_s": elapsed,
        "images_per_s": float(ok.sum()) / max(elapsed, 1e-9),
    }
    logger.info("canonicalise: %s", summary)
    return summary
