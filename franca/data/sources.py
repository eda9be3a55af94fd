"""Local sources into raw shards: an ImageNet-style class-per-folder tree and ImageNet-21K's per-synset tars (spec 6).

Both write the raw layout of ``fetch`` (``%06d.tar`` + ``%06d.parquet`` status tables), which the ``shard`` stage
(``franca.data.manifest.canonicalise``) turns into canonical shards and the manifest. The label is the index of the
class in the sorted class names (folder names, or synset ids ``n*``); the class name goes into ``<key>.json``.
Shard ``s`` covers items ``[s * shard_size, (s + 1) * shard_size)`` of the sorted item list, so an interrupted
ingest resumes by skipping published shards. Some ImageNet-21K members are gzipped JPEGs: they are decompressed.
"""

from __future__ import annotations

import gzip
import json
import logging
import tarfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from franca.data.manifest import (
    raw_shard_complete,
    raw_status_path,
    raw_tar_path,
    remove_stale_temps,
    write_parquet_atomic,
)
from franca.data.shards import AtomicTarWriter

logger = logging.getLogger(__name__)

__all__ = ["IMAGE_SUFFIXES", "list_folder", "ingest_folder", "index_imagenet21k", "ingest_imagenet21k_tars"]

IMAGE_SUFFIXES = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp", ".bmp": "bmp", ".gif": "gif"}
_STATUS_COLUMNS = ["key", "source", "status", "reason", "error_message", "bytes", "label", "class_name"]


def list_folder(root: str | Path, class_names: Sequence[str] | None = None) -> tuple[list[dict[str, Any]], list[str]]:
    """Items (source path, label, class name) of a class-per-folder tree in sorted order, and the class names.

    ``class_names`` fixes the label mapping (e.g. a val folder that must use the train mapping); a folder that is
    not in it raises ValueError.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    names = list(class_names) if class_names is not None else found
    unknown = sorted(set(found) - set(names))
    if unknown:
        raise ValueError(f"{root}: class folders {unknown[:5]} are not in the given class_names")
    items = []
    for label, name in enumerate(names):
        folder = root / name
        # dangling symlinks are listed too, so that they end as "unreadable" failure rows rather than vanish
        files = sorted(
            p for p in folder.rglob("*") if (p.is_file() or p.is_symlink()) and p.suffix.lower() in IMAGE_SUFFIXES
        )
        items += [{"source": str(p), "label": label, "class_name": name} for p in files]
    if not items:
        raise ValueError(f"no images ({sorted(IMAGE_SUFFIXES)}) under {root}")
    return items, names


def _write_range_shards(
    items: list[dict[str, Any]],
    out_dir: Path,
    shard_size: int,
    load: Callable[[dict[str, Any]], tuple[bytes, str]],
    extra_meta: dict[str, Any],
    key_digits: int = 9,
) -> dict[str, Any]:
    """Write every incomplete raw shard of ``items``; ``load(item) -> (bytes, ext)`` raises OSError when unreadable."""
    start = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out_dir)
    n_shards = -(-len(items) // shard_size)
    todo = [s for s in range(n_shards) if not raw_shard_complete(out_dir, s)]
    for s in todo:
        status = []
        with AtomicTarWriter(raw_tar_path(out_dir, s)) as writer:
            for i in range(s * shard_size, min((s + 1) * shard_size, len(items))):
                item, key = items[i], f"{i:0{key_digits}d}"
                row = {"key": key, "source": item["source"], "label": item.get("label")}
                row["class_name"] = item.get("class_name")
                try:
                    data, ext = load(item)
                except (OSError, tarfile.TarError, EOFError) as exc:
                    status.append({**row, "status": "failed", "reason": "unreadable", "error_message": str(exc)})
                    continue
                meta = {**extra_meta, **{k: v for k, v in item.items() if k not in ("offset", "size")}, "key": key}
                fields = {ext: data, "json": json.dumps(meta, sort_keys=True).encode()}
                if item.get("label") is not None:
                    fields["cls"] = str(item["label"]).encode()
                writer.write(key, fields)
                status.append({**row, "status": "success", "bytes": len(data)})
        frame = pd.DataFrame(status, columns=_STATUS_COLUMNS).astype({"bytes": "Int64", "label": "Int64"})
        write_parquet_atomic(frame, raw_status_path(out_dir, s))
    elapsed = time.perf_counter() - start
    done = sum(min(shard_size, len(items) - s * shard_size) for s in todo)
    summary = {"items": len(items), "shards": n_shards, "shards_skipped": n_shards - len(todo), "written": done}
    summary.update(elapsed_s=elapsed, items_per_s=done / max(elapsed, 1e-9))
    return summary


def _read_file(item: dict[str, Any]) -> tuple[bytes, str]:
    path = Path(item["source"])
    return path.read_bytes(), IMAGE_SUFFIXES[path.suffix.lower()]


def ingest_folder(
    root: str | Path,
    out_dir: str | Path,
    *,
    shard_size: int = 10_000,
    class_names: Sequence[str] | None = None,
    license: str | None = None,
) -> dict[str, Any]:
    """Class-per-folder tree (ImageNet-1k ``train/`` style) -> raw shards with labels; returns a summary."""
    items, names = list_folder(root, class_names)
    summary = _write_range_shards(items, Path(out_dir), shard_size, _read_file, {"license": license})
    summary.update(classes=names, source=str(root))
    logger.info("ingest_folder %s: %s", root, {k: v for k, v in summary.items() if k != "classes"})
    return summary


def index_imagenet21k(tar_dir: str | Path, cache: str | Path | None = None) -> tuple[list[dict[str, Any]], list[str]]:
    """Items of every ``n*.tar`` (one per synset) from the tar headers: (tar, member, offset, size, label, synset).

    The index is cached as parquet at ``cache`` when given (reused when present).
    """
    if cache is not None and Path(cache).is_file():
        frame = pd.read_parquet(cache)
        return frame.to_dict("records"), sorted(frame["class_name"].unique().tolist())
    tars = sorted(Path(tar_dir).glob("n*.tar"))
    if not tars:
        raise FileNotFoundError(f"no per-synset tars (n*.tar) in {tar_dir}")
    names = [t.stem for t in tars]
    items = []
    for label, tar_path in enumerate(tars):
        with tarfile.open(tar_path, "r:") as tar:
            members = sorted((m for m in tar.getmembers() if m.isreg()), key=lambda m: m.name)
        for m in members:
            suffix = Path(m.name).suffix.lower()
            if suffix in IMAGE_SUFFIXES or suffix == ".gz":
                items.append({"source": f"{tar_path}::{m.name}", "tar": str(tar_path), "member": m.name})
                items[-1].update(offset=m.offset_data, size=m.size, label=label, class_name=tar_path.stem)
    if cache is not None:
        write_parquet_atomic(pd.DataFrame(items), cache)
    return items, names


def _read_member(item: dict[str, Any]) -> tuple[bytes, str]:
    with open(item["tar"], "rb") as f:
        f.seek(int(item["offset"]))
        data = f.read(int(item["size"]))
    if len(data) != int(item["size"]):
        raise OSError(f"{item['source']}: tar truncated ({len(data)} of {item['size']} bytes)")
    if data[:2] == b"\x1f\x8b":  # a gzipped JPEG, as a few ImageNet-21K members are
        data = gzip.decompress(data)
    name = item["member"][: -len(".gz")] if item["member"].lower().endswith(".gz") else item["member"]
    return data, IMAGE_SUFFIXES.get(Path(name).suffix.lower(), "jpg")


def ingest_imagenet21k_tars(
    tar_dir: str | Path, out_dir: str | Path, *, shard_size: int = 10_000, license: str | None = None
) -> dict[str, Any]:
    """ImageNet-21K "winter21_whole" layout (one uncompressed tar per synset) -> raw shards with labels."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    items, names = index_imagenet21k(tar_dir, cache=out_dir / "in21k_index.parquet")
    summary = _write_range_shards(items, out_dir, shard_size, _read_member, {"license": license})
    summary.update(classes=len(names), source=str(tar_dir))
    logger.info("ingest_imagenet21k_tars %s: %s", tar_dir, summary)
    return summary
