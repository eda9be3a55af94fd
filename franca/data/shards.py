"""WebDataset tar shards: atomic writer, tolerant reader and a resumable training stream (spec 6, issue 4).

Layout (docs/interfaces.md "Data on disk"): ``<out>/shards/<split>-%06d.tar``; per sample ``<key>.jpg|png``,
``<key>.cls`` (label as text), ``<key>.json`` (metadata), optional ``<key>.seg.png`` and ``<key>.txt`` (caption,
as img2dataset writes it). A key never contains a dot, so webdataset's ``base_plus_ext`` groups members correctly.

Invariants:
* a shard file exists only when complete: it is written to ``.<name>.tmp-<pid>`` in the same directory, fsynced,
  then renamed (``os.replace``), and the directory is fsynced;
* the bytes of a shard depend only on its samples (tar headers have mtime 0, uid/gid 0, empty user names, and the
  members of a sample are written in sorted extension order);
* reading never raises on bad data: corrupt shards and samples are skipped, counted in a ``ReadStats`` and logged.

``ShardStream`` is the deterministic, resumable training stream over these shards (spec 6 "MultishardStreamer").
"""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
from collections.abc import Iterable, Iterator, Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils import data as torch_data
from webdataset import tariterators

from franca.data.images import canonical_image, open_image

logger = logging.getLogger(__name__)

__all__ = [
    "IMAGE_EXTS",
    "ReadStats",
    "AtomicTarWriter",
    "ShardWriter",
    "shard_name",
    "list_shards",
    "iter_raw_samples",
    "tar_is_complete",
    "decode_sample",
    "read_shard",
    "iter_samples",
    "fsync_dir",
    "atomic_write_bytes",
    "ShardStream",
]

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # preference order when a sample holds several
_MAX_LOGGED_ERRORS = 20


def shard_name(split: str, index: int) -> str:
    """Canonical shard file name ``<split>-%06d.tar``."""
    return f"{split}-{index:06d}.tar"


def list_shards(directory: str | Path, split: str | None = None) -> list[Path]:
    """Sorted ``*.tar`` shards of a directory (of one split when given); temp files are ignored."""
    pattern = f"{split}-*.tar" if split else "*.tar"
    return sorted(p for p in Path(directory).glob(pattern) if not p.name.startswith("."))


def fsync_dir(directory: str | Path) -> None:
    """fsync a directory so that a rename inside it is durable (no-op where unsupported)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file in the same directory, fsync, rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def _check_key(key: str) -> None:
    if not key or "." in key or "/" in key:
        raise ValueError(f"invalid sample key {key!r}: must be non-empty without '.' or '/'")


class AtomicTarWriter:
    """One tar shard published atomically; use as a context manager (commit on success, discard on error)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp_path = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        self._file = open(self.tmp_path, "wb")
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.GNU_FORMAT)
        self.keys: list[str] = []

    def write(self, key: str, fields: Mapping[str, bytes]) -> None:
        """Add one sample: ``fields`` maps an extension (``jpg``, ``cls``, ``seg.png``...) to its bytes."""
        _check_key(key)
        for ext in sorted(fields):
            data = fields[ext]
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            self._tar.addfile(info, io.BytesIO(data))
        self.keys.append(key)

    def commit(self) -> Path:
        """Close, fsync and rename the temp file to the final name."""
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.tmp_path, self.path)
        fsync_dir(self.path.parent)
        return self.path

    def abort(self) -> None:
        """Discard the temp file; the final name is never touched."""
        try:
            self._tar.close()
        finally:
            self._file.close()
            self.tmp_path.unlink(missing_ok=True)

    def __enter__(self) -> AtomicTarWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


class ShardWriter:
    """Rolling writer: ``<shards_dir>/<split>-%06d.tar`` with at most ``shard_size`` samples each."""

    def __init__(self, shards_dir: str | Path, split: str, shard_size: int, start_index: int = 0):
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        self.shards_dir, self.split, self.shard_size = Path(shards_dir), split, shard_size
        self.index = start_index
        self.shards: list[tuple[Path, int]] = []  # (published path, number of samples)
        self._current: AtomicTarWriter | None = None

    def write(self, key: str, fields: Mapping[str, bytes]) -> Path:
        """Add a sample; returns the path of the shard that will hold it."""
        if self._current is None:
            self._current = AtomicTarWriter(self.shards_dir / shard_name(self.split, self.index))
        self._current.write(key, fields)
        path = self._current.path
        if len(self._current.keys) >= self.shard_size:
            self._flush()
        return path

    def _flush(self) -> None:
        assert self._current is not None
        n = len(self._current.keys)
        self.shards.append((self._current.commit(), n))
        self._current, self.index = None, self.index + 1

    def close(self) -> list[tuple[Path, int]]:
        """Publish the last partial shard; returns every (path, count) written."""
        if self._current is not None and self._current.keys:
            self._flush()
        elif self._current is not None:
            self._current.abort()
            self._current = None
        return self.shards

    def abort(self) -> None:
        if self._current is not None:
            self._current.abort()
            self._current = None

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


@dataclass
class ReadStats:
    """Counters of a read; ``corrupt_*`` never stop a read, they are logged and counted here."""

    shards: int = 0
    corrupt_shards: int = 0
    samples: int = 0
    corrupt_samples: int = 0
    filtered: int = 0  # samples not in kept_keys
    errors: list[str] = field(default_factory=list)

    def record(self, kind: str, where: str, exc: BaseException | str) -> None:
        if kind == "shard":
            self.corrupt_shards += 1
        else:
            self.corrupt_samples += 1
        message = f"corrupt {kind} {where}: {exc}"
        if len(self.errors) < _MAX_LOGGED_ERRORS:
            self.errors.append(message)
            logger.warning(message)

    def as_dict(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in ("shards", "corrupt_shards", "samples", "corrupt_samples", "filtered")}


def tar_is_complete(path: str | Path) -> bool:
    """A complete tar has a size multiple of 512 and ends with the two zero blocks of the end-of-archive marker.

    Python's tarfile stops silently at a header cut by truncation, so this is how a cut shard is noticed.
    """
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            f.seek(max(0, size - 1024))
            tail = f.read(1024)
    except OSError:
        return False
    return size >= 1024 and size % 512 == 0 and tail == bytes(1024)


def iter_raw_samples(path: str | Path, stats: ReadStats | None = None) -> Iterator[tuple[str, dict[str, bytes]]]:
    """``(key, {ext: bytes})`` of one shard in tar order, read with webdataset's tar iterators.

    A truncated or unreadable shard yields the samples before the damage and is counted once as corrupt.
    """
    stats = stats if stats is not None else ReadStats()
    errors: list[BaseException] = []

    def handler(exc: BaseException) -> bool:
        errors.append(exc)
        return True  # keep going: skip the damaged member / stop this shard

    stats.shards += 1
    try:
        stream = open(path, "rb")
    except OSError as exc:
        stats.record("shard", str(path), exc)
        return
    with stream:
        files = tariterators.tar_file_expander([{"url": str(path), "stream": stream}], handler=handler)
        for sample in tariterators.group_by_keys(files, handler=handler):
            fields = {k: v for k, v in sample.items() if not k.startswith("__")}
            yield sample["__key__"], fields
    if errors or not tar_is_complete(path):
        stats.record("shard", str(path), errors[0] if errors else "truncated (no end-of-archive marker)")


def decode_sample(key: str, fields: Mapping[str, bytes]) -> dict[str, Any]:
    """Decode raw fields to ``dict(key, image: PIL RGB, label: int|None, seg: (H, W) uint8|None, meta: dict)``.

    The image goes through ``franca.data.images.canonical_image`` (a no-op on canonical shards), so even a raw
    shard decodes upright and 8-bit.

    Raises ValueError (naming the key) when the image is missing or cannot be decoded.
    """
    ext = next((e for e in IMAGE_EXTS if e in fields), None)
    if ext is None:
        raise ValueError(f"sample {key!r} has no image member (fields: {sorted(fields)})")
    try:
        with open_image(fields[ext], where=key) as img:  # format allow-list: no other decoder is ever reached
            image = canonical_image(img).convert("RGB")  # forces a full decode; 16-bit scaled, EXIF applied
        seg = None
        if "seg.png" in fields:
            with Image.open(io.BytesIO(fields["seg.png"]), formats=["PNG"]) as img:
                seg = np.array(img, dtype=np.uint8)  # (H, W), 255 = ignore
        label = int(fields["cls"].decode().strip()) if "cls" in fields else None
        meta = json.loads(fields["json"]) if "json" in fields else {}
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError... on bad data
        raise ValueError(f"sample {key!r}: cannot decode ({type(exc).__name__}: {exc})") from exc
    if "txt" in fields and "caption" not in meta:
        meta["caption"] = fields["txt"].decode("utf-8", errors="replace")
    return {"key": key, "image": image, "label": label, "seg": seg, "meta": meta}


def iter_samples(
    shard_paths: Iterable[str | Path],
    kept_keys: Iterable[str] | None = None,
    stats: ReadStats | None = None,
) -> Iterator[dict[str, Any]]:
    """Decoded samples of several shards in order; corrupt shards/samples are skipped and counted in ``stats``."""
    stats = stats if stats is not None else ReadStats()
    kept = set(kept_keys) if kept_keys is not None else None
    for path in shard_paths:
        for key, fields in iter_raw_samples(path, stats):
            if kept is not None and key not in kept:
                stats.filtered += 1
                continue
            try:
                sample = decode_sample(key, fields)
            except ValueError as exc:
                stats.record("sample", f"{path}:{key}", exc)
                continue
            stats.samples += 1
            yield sample


def read_shard(
    path: str | Path, kept_keys: Iterable[str] | None = None, stats: ReadStats | None = None
) -> list[dict[str, Any]]:
    """All decodable samples of one shard (see ``iter_samples``)."""
    return list(iter_samples([path], kept_keys=kept_keys, stats=stats))


def _worker_info() -> tuple[int, int]:
    info = torch_data.get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


class ShardStream(torch_data.IterableDataset):
    """Infinite, deterministic and resumable stream of decoded samples for one rank (spec 6 ``InfiniteDataset``).

    Order of this rank's samples (its "slots"):
      * epoch ``e``: shards (sorted paths) permuted with ``default_rng(seed + e)``, padded by repetition so that
        ``world_size`` divides their count, then ``[rank::world_size]``;
      * inside a shard, its kept samples (tar order) permuted with ``default_rng([seed, e, shard_id])`` once the
        shard's member index is read (random access by tar offsets, so a shard is never buffered in memory).
    ``position`` counts the slots this rank has passed; ``ShardStream(..., start_sample=k)`` continues exactly at
    slot ``k``, skipping whole shards by their sample counts (tar headers only, nothing is decoded).
    Under DataLoader workers, worker ``w`` of ``W`` decodes the slots with
    ``((slot - start_sample) // worker_batch_size) % W == w``; with ``batch_size == worker_batch_size`` the
    DataLoader's in-order round robin then returns exactly the single-process sequence. A corrupt sample is
    skipped (its slot still counts) and recorded in ``stats``.
    """

    def __init__(
        self,
        shard_paths: Iterable[str | Path],
        *,
        kept_keys: Iterable[str] | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        start_sample: int = 0,
        transform: Any = None,
        worker_batch_size: int = 1,
        shuffle: bool = True,
    ):
        self.shards = sorted(str(p) for p in shard_paths)
        if not self.shards:
            raise ValueError("ShardStream needs at least one shard path")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside [0, world_size={world_size})")
        self.kept = set(kept_keys) if kept_keys is not None else None
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.start_sample = self.position = start_sample
        self.transform, self.worker_batch_size, self.shuffle = transform, max(1, worker_batch_size), shuffle
        self.epoch = 0
        self.stats = ReadStats()
        self._counts: dict[int, int] = {}
        self._bad: set[int] = set()

    def epoch_shards(self, epoch: int) -> list[int]:
        """Indices (into the sorted shard list) that this rank reads in ``epoch``, in reading order."""
        n, w = len(self.shards), self.world_size
        order = np.random.default_rng(self.seed + epoch).permutation(n) if self.shuffle else np.arange(n)
        padded = np.resize(order, -(-n // w) * w)  # repeat the head so that w divides the count
        return padded[self.rank :: w].tolist()

    def _index(self, i: int) -> list[tuple[str, dict[str, tarfile.TarInfo]]]:
        """Kept samples of shard ``i`` in tar order, from the tar headers only."""
        path = self.shards[i]
        try:
            if not tar_is_complete(path):
                raise tarfile.ReadError("truncated (no end-of-archive marker)")
            with tarfile.open(path, "r:") as tar:
                members = tar.getmembers()
        except (tarfile.TarError, OSError) as exc:  # a corrupt shard is skipped whole, and counted once
            members = []
            if i not in self._bad:
                self._bad.add(i)
                self.stats.record("shard", path, exc)
        groups: dict[str, dict[str, tarfile.TarInfo]] = {}
        for m in members:
            key, ext = tariterators.base_plus_ext(m.name)
            if m.isreg() and key is not None:
                groups.setdefault(key, {})[ext.lower()] = m
        index = [(k, g) for k, g in groups.items() if self.kept is None or k in self.kept]
        self._counts[i] = len(index)
        return index

    def _count(self, i: int) -> int:
        if i not in self._counts:
            self._index(i)
        return self._counts[i]

    def _locate(self, k: int) -> tuple[int, int, int]:
        """(epoch, slot in the epoch's shard list, samples to skip in that shard) of slot ``k``."""
        epoch = 0
        while True:
            counts = [self._count(i) for i in self.epoch_shards(epoch)]
            if sum(counts) == 0:
                raise ValueError(f"no readable samples in {len(self.shards)} shards (first: {self.shards[0]})")
            for s, c in enumerate(counts):
                if k < c:
                    return epoch, s, k
                k -= c
            epoch += 1

    def _load(self, tar: tarfile.TarFile, key: str, members: dict[str, tarfile.TarInfo]) -> Any:
        try:
            fields = {ext: tar.extractfile(m).read() for ext, m in members.items()}
            sample = decode_sample(key, fields)
        except (ValueError, tarfile.TarError, OSError) as exc:
            self.stats.record("sample", f"{tar.name}:{key}", exc)
            return None
        self.stats.samples += 1
        return self.transform(sample) if self.transform is not None else sample

    def __iter__(self) -> Iterator[Any]:
        worker_id, num_workers = _worker_info()
        epoch, first_slot, skip = self._locate(self.start_sample)
        pos = self.start_sample
        while True:
            self.epoch, passed = epoch, 0
            for i in self.epoch_shards(epoch)[first_slot:]:
                index = self._index(i)
                order = np.arange(len(index))
                if self.shuffle:
                    order = np.random.default_rng([self.seed, epoch, i]).permutation(len(index))
                with tarfile.open(self.shards[i], "r:") if len(index) > skip else nullcontext() as tar:
                    for j in order[skip:].tolist():
                        mine = ((pos - self.start_sample) // self.worker_batch_size) % num_workers == worker_id
                        pos, passed = pos + 1, passed + 1
                        self.position = pos
                        if mine and (sample := self._load(tar, *index[j])) is not None:
                            yield sample
                skip = 0
            if passed == 0 and not any(self._count(i) for i in range(len(self.shards))):
                raise RuntimeError(f"epoch {epoch} of rank {self.rank} has no readable samples")
            epoch, first_slot = epoch + 1, 0
