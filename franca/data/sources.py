"""Local sources into raw shards (spec 6, 7.4-7.6): an ImageNet-style class-per-folder tree, ImageNet-21K's
per-synset tars and a PASCAL VOC 2012 style segmentation tree.

All write the raw layout of ``fetch`` (``%06d.tar`` + ``%06d.parquet`` status tables), which the ``shard`` stage
(``franca.data.manifest.canonicalise``) turns into canonical shards and the manifest. The label is the index of the
class in the sorted class names (folder names, or synset ids ``n*``); the class name goes into ``<key>.json``.
Shard ``s`` covers items ``[s * shard_size, (s + 1) * shard_size)`` of the sorted item list, so an interrupted
ingest resumes by skipping published shards. Some ImageNet-21K members are gzipped JPEGs: they are decompressed (at most
``MAX_MEMBER_BYTES``; a damaged or oversized one is a ``bad_gzip`` failure row). Any per-item error becomes a
failure row with its reason and the ingest goes on.

Segmentation trees (``folder_seg``): ``JPEGImages/<id>.jpg``, ``SegmentationClass/<id>.png`` and one id list per
split (``ImageSets/Segmentation/<split>.txt``); each split goes to ``<out>/<split>/``. The mask is stored as
``<key>.seg.png``, a single-channel (mode L) PNG holding the class id per pixel with 255 = ignore, the convention of
the generated data and of the dense evaluations (docs/interfaces.md): VOC's palette indices are already that map
(0 = background, 1..20 = objects, 255 = void border), so the values are kept and only the palette is dropped.
An id without mask (``missing_mask``), without image (``missing_image``), with an undecodable image
(``unreadable``) or with a mask that is not a class map of the image's size (``bad_mask``) is a failure row.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tarfile
import time
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

from franca.data.images import bounded_decompress, clean_message, open_image
from franca.data.manifest import (
    raw_shard_complete,
    raw_status_path,
    raw_tar_path,
    remove_stale_temps,
    write_parquet_atomic,
)
from franca.data.shards import AtomicTarWriter

logger = logging.getLogger(__name__)

__all__ = [
    "IMAGE_SUFFIXES",
    "IGNORE_INDEX",
    "SourceItemError",
    "list_folder",
    "image_files",
    "listing_digest",
    "folder_class_names",
    "ingest_folder",
    "in21k_tar_names",
    "index_imagenet21k",
    "ingest_imagenet21k_tars",
    "list_folder_seg",
    "voc_mask_to_seg",
    "ingest_folder_seg",
]

IMAGE_SUFFIXES = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp", ".bmp": "bmp", ".gif": "gif"}
IGNORE_INDEX = 255  # void / border pixels of a segmentation mask (VOC), skipped by every dense metric
MAX_MEMBER_BYTES = 256 * 2**20  # decompressed size of one gzipped tar member (a gzip bomb ends as bad_gzip)
MAX_FILE_BYTES = 64 * 2**20  # one image file of a folder (``max_bytes``): larger files are too_large rows, never read
_STATUS_COLUMNS = ["key", "source", "status", "reason", "error_message", "bytes", "label", "class_name"]


class SourceItemError(OSError):
    """One item of a source cannot be ingested; ``reason`` becomes the failure row's reason."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


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
        files = image_files(folder)
        items += [{"source": p, "label": label, "class_name": name} for p in files]
    if not items:
        raise ValueError(f"no images ({sorted(IMAGE_SUFFIXES)}) under {root}")
    return items, names


def image_files(folder: Path) -> list[str]:
    """Image files under ``folder`` (recursive), sorted as Paths sort (by path components): an ``os.scandir`` walk
    of names (the file type comes from the directory entry; only a symlink costs a stat). Symlinked directories are
    not followed; dangling symlinks are listed, so that they end as "unreadable" failure rows rather than vanish
    (what ``rglob`` + ``is_file`` gave)."""
    found, stack = [], [str(folder)] if folder.is_dir() else []  # a class of class_names absent here: no files
    while stack:
        with os.scandir(stack.pop()) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                elif os.path.splitext(entry.name)[1].lower() in IMAGE_SUFFIXES and (
                    entry.is_file() or entry.is_symlink()
                ):
                    found.append(entry.path)
    return sorted(found, key=lambda path: path.split(os.sep))


def listing_digest(items: Sequence[dict[str, Any]], root: str | Path) -> str:
    """sha256 of a folder listing (relative path and label of every item, in order): a work unit's range of the
    listing is valid only while this is unchanged (``franca.data.units``)."""
    prefix, digest = len(str(Path(root))) + 1, hashlib.sha256()  # sources are str(Path(root) / class / ...)
    for item in items:
        digest.update(f"{item['source'][prefix:]}\t{item.get('label')}\n".encode())
    return digest.hexdigest()


def folder_class_names(root: str | Path) -> list[str]:
    """Sorted class folder names of a class-per-folder tree: the label mapping ``list_folder`` gives it."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _write_range_shards(
    items: list[dict[str, Any]],
    out_dir: Path,
    shard_size: int,
    load: Callable[[dict[str, Any]], dict[str, bytes]],
    extra_meta: dict[str, Any],
    key_digits: int = 9,
    key_offset: int = 0,
) -> dict[str, Any]:
    """Write every incomplete raw shard of ``items``. Item ``i`` gets the key ``key_offset + i`` (its index in the
    whole split when ``items`` is one work unit's range of it), or the item's own ``key`` when it has one.

    ``load(item)`` gives the sample's fields (one image extension -> bytes, optionally ``seg.png``); any exception
    it raises makes the item a failure row (reason ``unreadable``, or the ``reason`` of a SourceItemError) and the
    ingest goes on.
    """
    start = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out_dir)
    n_shards = -(-len(items) // shard_size)
    todo = [s for s in range(n_shards) if not raw_shard_complete(out_dir, s)]
    for s in todo:
        status = []
        with AtomicTarWriter(raw_tar_path(out_dir, s)) as writer:
            for i in range(s * shard_size, min((s + 1) * shard_size, len(items))):
                item = items[i]
                key = item.get("key") or f"{key_offset + i:0{key_digits}d}"
                row = {"key": key, "source": item["source"], "label": item.get("label")}
                row["class_name"] = item.get("class_name")
                try:
                    fields = load(item)
                except Exception as exc:  # every per-item error is a failure row (zlib.error, EOFError...)
                    reason = getattr(exc, "reason", "unreadable")
                    message = clean_message(f"{type(exc).__name__}: {exc}")
                    status.append({**row, "status": "failed", "reason": reason, "error_message": message})
                    continue
                n_bytes = sum(len(v) for k, v in fields.items() if k in IMAGE_SUFFIXES.values())  # the image only
                meta = {**extra_meta, **{k: v for k, v in item.items() if k not in ("offset", "size")}, "key": key}
                fields["json"] = json.dumps(meta, sort_keys=True).encode()
                if item.get("label") is not None:
                    fields["cls"] = str(item["label"]).encode()
                writer.write(key, fields)
                status.append({**row, "status": "success", "bytes": n_bytes})
        frame = pd.DataFrame(status, columns=_STATUS_COLUMNS).astype({"bytes": "Int64", "label": "Int64"})
        write_parquet_atomic(frame, raw_status_path(out_dir, s))
    elapsed = time.perf_counter() - start
    done = sum(min(shard_size, len(items) - s * shard_size) for s in todo)
    summary = {"items": len(items), "shards": n_shards, "shards_skipped": n_shards - len(todo), "written": done}
    summary.update(elapsed_s=elapsed, items_per_s=done / max(elapsed, 1e-9))
    return summary


def _file_reader(max_bytes: int) -> Callable[[dict[str, Any]], dict[str, bytes]]:
    def read(item: dict[str, Any]) -> dict[str, bytes]:
        path = Path(item["source"])
        size = path.stat().st_size
        if size > max_bytes:  # checked before reading: a stray multi-GB file never enters memory
            raise SourceItemError("too_large", f"{path}: {size} bytes > max_bytes {max_bytes}")
        with path.open("rb") as f:
            data = f.read(max_bytes + 1)  # the file may have grown since stat
        if len(data) > max_bytes:
            raise SourceItemError("too_large", f"{path}: more than max_bytes {max_bytes} bytes")
        return {IMAGE_SUFFIXES[path.suffix.lower()]: data}

    return read


def holdout_split(
    items: Sequence[dict[str, Any]], root: str | Path, fraction: float, seed: int = 0
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(kept, held out): per class, the ``round(fraction * n)`` items (at least one, never all, for a class of two or
    more) that rank first by sha256 of ``seed`` and the path relative to ``root``. The choice depends on each item's
    own path only, so moving the tree or cutting it into ranges does not change it; both lists keep the sorted order.
    """
    rank = {}
    for i, item in enumerate(items):
        rel = Path(item["source"]).relative_to(root).as_posix()
        rank[i] = hashlib.sha256(f"{seed}:{rel}".encode()).hexdigest()
    by_class: dict[Any, list[int]] = {}
    for i, item in enumerate(items):
        by_class.setdefault(item.get("label"), []).append(i)
    held = set()
    for members in by_class.values():
        n = len(members)
        k = 0 if n < 2 or fraction <= 0 else min(n - 1, max(1, round(fraction * n)))
        held.update(sorted(members, key=rank.__getitem__)[:k])
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]


def ingest_folder(
    root: str | Path,
    out_dir: str | Path,
    *,
    shard_size: int = 10_000,
    class_names: Sequence[str] | None = None,
    license: str | None = None,
    max_bytes: int = MAX_FILE_BYTES,
    holdout: dict[str, Any] | None = None,
    unit: dict[str, Any] | None = None,
    listing: tuple[list[dict[str, Any]], list[str]] | None = None,
) -> dict[str, Any]:
    """Class-per-folder tree (ImageNet-1k ``train/`` style) -> raw shards with labels; returns a summary.

    Without ``holdout`` the shards go into ``out_dir``. With ``holdout = {split, fraction, seed}`` (a folder dataset
    that must give a held-out split to a role, e.g. ``dense.val``) they go into ``out_dir/train`` and
    ``out_dir/<split>``, chosen by ``holdout_split``: disjoint, class-stratified and stable.

    ``unit = {start, stop, listing}`` (a work unit, ``franca.data.units``) ingests only items ``[start, stop)`` of
    the sorted listing, whose ``listing_digest`` must still be ``listing``. Labels, the held-out choice and the keys
    are those of the whole tree (a sample's key is its index in its split of the whole tree), so the units' union is
    the whole ingest, row for row. ``listing``: ``list_folder(root, class_names)`` when the caller already has it.
    """
    items, names = listing if listing is not None else list_folder(root, class_names)
    read, meta = _file_reader(max_bytes), {"license": license}
    start, stop = (0, len(items)) if unit is None else (int(unit["start"]), int(unit["stop"]))
    if unit is not None and listing_digest(items, root) != unit["listing"]:
        raise ValueError(f"{root}: the folder changed since its unit list was made (rerun the workflow to re-cut it)")
    where = {item["source"]: i for i, item in enumerate(items)}
    if holdout is None:
        parts, dirs = {"train": items}, {"train": Path(out_dir)}
    else:
        kept, held = holdout_split(items, root, float(holdout["fraction"]), int(holdout.get("seed", 0)))
        if holdout["split"] == "train" or not held:
            raise ValueError(f"{root}: holdout {holdout} gives no held-out split (name it other than train)")
        parts = {"train": kept, holdout["split"]: held}
        dirs = {s: Path(out_dir) / s for s in parts}
    summary = {}
    for split, split_items in parts.items():  # the unit's items of each split are one contiguous run of it
        mine = [i for i, item in enumerate(split_items) if start <= where[item["source"]] < stop]
        first = mine[0] if mine else 0
        run = split_items[first : first + len(mine)]
        summary[split] = _write_range_shards(run, dirs[split], shard_size, read, meta, key_offset=first)
    summary = summary["train"] if holdout is None else {**summary, "items": stop - start}
    summary.update(classes=names, source=str(root))
    logger.info("ingest_folder %s: %s", root, {k: v for k, v in summary.items() if k != "classes"})
    return summary


def in21k_tar_names(tar_dir: str | Path) -> list[str]:
    """Sorted names of the per-synset tars (``n*.tar``) of a tree: one directory listing, no tar read. The label of
    a synset is its index here."""
    if not Path(tar_dir).is_dir():
        raise FileNotFoundError(f"ImageNet-21K tar folder not found: {tar_dir}")
    with os.scandir(tar_dir) as entries:
        names = sorted(e.name for e in entries if e.name.startswith("n") and e.name.endswith(".tar"))
    if not names:
        raise FileNotFoundError(f"no per-synset tars (n*.tar) in {tar_dir}")
    return names


def index_imagenet21k(
    tar_dir: str | Path, cache: str | Path | None = None, tars: Sequence[str] | None = None
) -> tuple[list[dict[str, Any]], list[str]]:
    """Items of every ``n*.tar`` (one per synset) from the tar headers: (tar, member, offset, size, label, synset,
    key). The key ``<synset>_<member index>`` names a sample whatever tars are ingested with it.

    ``tars`` (a work unit's tar names) indexes only those; labels stay those of the whole tree. The index is cached
    as parquet at ``cache`` when given (reused when present).
    """
    if cache is not None and Path(cache).is_file():
        frame = pd.read_parquet(cache)
        return frame.to_dict("records"), sorted(frame["class_name"].unique().tolist())
    names = in21k_tar_names(tar_dir)
    label_of = {name: label for label, name in enumerate(names)}
    absent = sorted(set(tars or ()) - set(label_of))
    if absent:
        raise FileNotFoundError(f"{tar_dir}: unit tars {absent[:5]} are gone (rerun the workflow to re-cut its units)")
    items = []
    for name in tars if tars is not None else names:
        tar_path = Path(tar_dir) / name
        with tarfile.open(tar_path, "r:") as tar:
            members = sorted((m for m in tar.getmembers() if m.isreg()), key=lambda m: m.name)
        members = [m for m in members if Path(m.name).suffix.lower() in (*IMAGE_SUFFIXES, ".gz")]
        for j, m in enumerate(members):
            items.append({"source": f"{tar_path}::{m.name}", "tar": str(tar_path), "member": m.name})
            items[-1].update(offset=m.offset_data, size=m.size, label=label_of[name], class_name=tar_path.stem)
            items[-1]["key"] = f"{tar_path.stem}_{j:06d}"
    names = [Path(n).stem for n in names]
    if cache is not None:
        write_parquet_atomic(pd.DataFrame(items), cache)
    return items, names


def _read_member(item: dict[str, Any]) -> dict[str, bytes]:
    with open(item["tar"], "rb") as f:
        f.seek(int(item["offset"]))
        data = f.read(int(item["size"]))
    if len(data) != int(item["size"]):
        raise OSError(f"{item['source']}: tar truncated ({len(data)} of {item['size']} bytes)")
    if data[:2] == b"\x1f\x8b":  # a gzipped JPEG, as a few ImageNet-21K members are
        try:
            data = bounded_decompress(data, MAX_MEMBER_BYTES)
        except (ValueError, EOFError, zlib.error) as exc:
            raise SourceItemError("bad_gzip", f"{item['source']}: {type(exc).__name__}: {exc}") from exc
    name = item["member"][: -len(".gz")] if item["member"].lower().endswith(".gz") else item["member"]
    return {IMAGE_SUFFIXES.get(Path(name).suffix.lower(), "jpg"): data}


def ingest_imagenet21k_tars(
    tar_dir: str | Path,
    out_dir: str | Path,
    *,
    shard_size: int = 10_000,
    license: str | None = None,
    tars: Sequence[str] | None = None,
) -> dict[str, Any]:
    """ImageNet-21K "winter21_whole" layout (one uncompressed tar per synset) -> raw shards with labels; ``tars``:
    only these (a work unit), with the labels and keys they have in the whole tree."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cache = out_dir / "in21k_index.parquet" if tars is None else None
    items, names = index_imagenet21k(tar_dir, cache=cache, tars=tars)
    summary = _write_range_shards(items, out_dir, shard_size, _read_member, {"license": license})
    summary.update(classes=len(names), source=str(tar_dir))
    logger.info("ingest_imagenet21k_tars %s: %s", tar_dir, summary)
    return summary


def list_folder_seg(
    root: str | Path,
    split: str,
    *,
    image_dir: str = "JPEGImages",
    mask_dir: str = "SegmentationClass",
    list_dir: str = "ImageSets/Segmentation",
) -> list[dict[str, Any]]:
    """Items (image path, mask path, id) of one split of a VOC-style tree, sorted by id.

    The id list ``<root>/<list_dir>/<split>.txt`` must exist; every id in it becomes an item, present on disk or
    not, so that a missing file ends as a failure row instead of vanishing.
    """
    root = Path(root)
    list_path = root / list_dir / f"{split}.txt"
    if not list_path.is_file():
        raise FileNotFoundError(f"segmentation split list not found: {list_path}")
    ids = sorted({line.split()[0] for line in list_path.read_text().splitlines() if line.strip()})
    if not ids:
        raise ValueError(f"segmentation split list {list_path} is empty")
    # one listing of the image folder (not one glob per id: VOC has 17k images); the first suffix in sorted order
    images: dict[str, Path] = {}
    if (root / image_dir).is_dir():
        for path in sorted((root / image_dir).iterdir()):
            if path.suffix.lower() in IMAGE_SUFFIXES:
                images.setdefault(path.stem, path)
    return [
        {
            "source": str(images.get(image_id, root / image_dir / f"{image_id}.jpg")),
            "mask": str(root / mask_dir / f"{image_id}.png"),
            "id": image_id,
        }
        for image_id in ids
    ]


def voc_mask_to_seg(mask: Image.Image, num_classes: int, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """A VOC class mask (palette ``P`` or grey ``L`` PNG of class indices) -> (H, W) uint8 class map.

    Values 0..num_classes-1 (0 = background) and ``ignore_index`` are kept as they are (the dense evaluations'
    convention); any other value, or a colour (RGB) mask, raises SourceItemError("bad_mask").
    """
    if mask.mode not in ("P", "L"):
        raise SourceItemError("bad_mask", f"mask mode {mask.mode!r} is not a class-index map (P or L)")
    seg = np.array(mask, dtype=np.uint8)  # (H, W) palette indices = class ids
    values = np.unique(seg)
    bad = values[(values >= num_classes) & (values != ignore_index)]
    if bad.size:
        allowed = f"0..{num_classes - 1} or {ignore_index}"
        raise SourceItemError("bad_mask", f"mask values {bad[:8].tolist()} are not class ids ({allowed})")
    return seg


def _seg_loader(num_classes: int, ignore_index: int) -> Callable[[dict[str, Any]], dict[str, bytes]]:
    def load(item: dict[str, Any]) -> dict[str, bytes]:
        image_path, mask_path = Path(item["source"]), Path(item["mask"])
        if not image_path.is_file():
            raise SourceItemError("missing_image", f"{image_path}: no image for id {item['id']}")
        if not mask_path.is_file():
            raise SourceItemError("missing_mask", f"{mask_path}: no mask for id {item['id']}")
        data = image_path.read_bytes()
        try:
            with open_image(data, where=str(image_path)) as img:
                size = img.size  # header only; canonicalise does the full decode check
            with Image.open(mask_path, formats=["PNG"]) as img:
                seg = voc_mask_to_seg(img, num_classes, ignore_index)
        except (UnidentifiedImageError, SyntaxError, ValueError) as exc:
            raise SourceItemError("unreadable", f"{image_path} / {mask_path}: {exc}") from exc
        if seg.shape != (size[1], size[0]):
            raise SourceItemError("bad_mask", f"{mask_path}: mask {seg.shape[::-1]} != image {size} (W, H)")
        buf = io.BytesIO()  # (H, W) uint8 -> single-channel (L) PNG of class ids
        Image.fromarray(seg).save(buf, format="PNG", compress_level=6)
        return {IMAGE_SUFFIXES[image_path.suffix.lower()]: data, "seg.png": buf.getvalue()}

    return load


def ingest_folder_seg(
    root: str | Path,
    out_dir: str | Path,
    *,
    splits: Sequence[str] = ("train", "val"),
    num_classes: int = 21,
    ignore_index: int = IGNORE_INDEX,
    shard_size: int = 2000,
    image_dir: str = "JPEGImages",
    mask_dir: str = "SegmentationClass",
    list_dir: str = "ImageSets/Segmentation",
    license: str | None = None,
) -> dict[str, Any]:
    """VOC-style segmentation tree -> raw shards ``<out_dir>/<split>/`` with image + ``seg.png``; a summary per split.

    ``num_classes`` counts the background (VOC: 21); spec 7.4-7.6 evaluate with 255 ignored.
    """
    root, out_dir = Path(root), Path(out_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"segmentation dataset root not found: {root}")
    load, summary = _seg_loader(num_classes, ignore_index), {"source": str(root), "splits": {}}
    for split in splits:
        items = list_folder_seg(root, split, image_dir=image_dir, mask_dir=mask_dir, list_dir=list_dir)
        meta = {"license": license, "split_list": split, "num_classes": num_classes, "ignore_index": ignore_index}
        summary["splits"][split] = _write_range_shards(items, out_dir / split, shard_size, load, meta)
    logger.info("ingest_folder_seg %s: %s", root, summary)
    return summary
