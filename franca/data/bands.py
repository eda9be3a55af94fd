"""Near-duplicate candidate pairs among very many 64-bit hashes, in bounded jobs (issue 17 item 4).

The same multi-index hashing as ``phash.near_duplicate_pairs`` (Norouzi, Punjani & Fleet, "Fast search in Hamming
space with multi-index hashing", CVPR 2012), cut into independent jobs so that 10^9 hashes never meet in one
process:

* The 64 bits are split into ``m`` bands; two hashes within Hamming ``t`` differ in at most ``r = t // m`` bits on at
  least one band (pigeonhole). A pair is *owned* by the first such band, so every pair is emitted exactly once.
* Each band's values are cut into ``2^k`` blocks by their top ``k`` bits. A pair whose band values differ in at
  most ``r`` bits lies in two blocks whose ids differ in at most ``r`` bits, so the job of block ``p`` needs only
  the rows of the blocks within Hamming ``r`` of ``p``: a fraction ``sum_{j<=r} C(k, j) / 2^k`` of the rows.
* Map (per work unit, ``write_band_index``): the unit's hashes sorted by each band's value, with block offsets, as
  two ``.npy`` files read back with memory mapping. Reduce side (per band x block, ``block_pairs``): the slices of
  its blocks from every unit, probed with the flip patterns of radius ``r`` (a sort-merge: each block slice is
  sorted, partners are found by binary search). Rows are named by 64-bit ids (``unit << 40 | row``) so that the
  final reduce maps them back to manifest rows.

``partitioned_pairs`` runs map and all jobs in one process; its pairs equal ``near_duplicate_pairs``'s exactly
(tests/data/test_dedup_scale.py), which stays the reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import comb
from pathlib import Path

import numpy as np

from franca.data.phash import _patterns, choose_bands, hamming

__all__ = ["ROW_BITS", "BandPlan", "make_plan", "row_ids", "write_band_index", "block_pairs", "partitioned_pairs"]

ROW_BITS = 40  # id = unit << 40 | row in the unit's manifest: 2^24 units of up to 2^40 rows


def row_ids(unit: int, rows: np.ndarray) -> np.ndarray:
    """(n,) uint64 ids of rows of one unit's manifest partition."""
    return (np.uint64(unit) << np.uint64(ROW_BITS)) | np.asarray(rows, dtype=np.uint64)


@dataclass(frozen=True)
class BandPlan:
    """``bands`` bands of the 64 bits (band 0 at the MSB), each cut into ``2^block_bits`` blocks."""

    threshold: int
    bands: int
    block_bits: int = 0

    def __post_init__(self):
        if not 1 <= self.bands <= 64 or self.threshold < 0:
            raise ValueError(f"band plan: need 1 <= bands <= 64 and threshold >= 0, got {self}")
        if not 0 <= self.block_bits <= min(self.width(b) for b in range(self.bands)):
            raise ValueError(f"band plan: block_bits {self.block_bits} exceeds the narrowest band ({self})")

    @property
    def radius(self) -> int:
        return self.threshold // self.bands

    def bounds(self, band: int) -> tuple[int, int]:
        edges = np.linspace(0, 64, self.bands + 1).astype(int)  # as phash.near_duplicate_pairs
        return int(edges[band]), int(edges[band + 1])

    def width(self, band: int) -> int:
        lo, hi = self.bounds(band)
        return hi - lo

    def values(self, hashes: np.ndarray, band: int) -> np.ndarray:
        """(n,) uint64 band values of (n,) uint64 hashes."""
        width = self.width(band)
        return (hashes >> np.uint64(64 - self.bounds(band)[1])) & np.uint64((1 << width) - 1)

    def blocks(self, values: np.ndarray, band: int) -> np.ndarray:
        return values >> np.uint64(self.width(band) - self.block_bits)

    def neighbours(self, block: int) -> list[int]:
        """Blocks whose ids differ from ``block`` in at most ``radius`` of the ``block_bits`` bits (itself first)."""
        near = [q for q in range(1 << self.block_bits) if q != block and bin(q ^ block).count("1") <= self.radius]
        return [block, *near]

    def jobs(self) -> list[tuple[int, int]]:
        return [(b, p) for b in range(self.bands) for p in range(1 << self.block_bits)]

    def load_fraction(self) -> float:
        """Fraction of all rows one job reads (its block's neighbourhood), for uniform hashes."""
        return sum(comb(self.block_bits, j) for j in range(min(self.radius, self.block_bits) + 1)) / 2**self.block_bits


def make_plan(n: int, threshold: int, bands: int | None = None, block_bits: int = 0) -> BandPlan:
    """Plan for ``n`` hashes: ``bands`` by ``phash.choose_bands`` unless given."""
    return BandPlan(threshold, bands or choose_bands(n, threshold), block_bits)


def _band_arrays(hashes: np.ndarray, ids: np.ndarray, plan: BandPlan) -> tuple[np.ndarray, np.ndarray]:
    """Per band, (hash, id) rows sorted by band value: (bands, n, 2) uint64; block offsets (bands, 2^k + 1) int64."""
    hashes, ids = np.asarray(hashes, np.uint64), np.asarray(ids, np.uint64)
    rows = np.empty((plan.bands, len(hashes), 2), np.uint64)
    offsets = np.empty((plan.bands, (1 << plan.block_bits) + 1), np.int64)
    for b in range(plan.bands):
        order = np.lexsort((ids, plan.values(hashes, b)))
        rows[b, :, 0], rows[b, :, 1] = hashes[order], ids[order]
        blocks = plan.blocks(plan.values(rows[b, :, 0], b), b)
        offsets[b] = np.searchsorted(blocks, np.arange((1 << plan.block_bits) + 1, dtype=np.uint64))
    return rows, offsets


def write_band_index(hashes: np.ndarray, ids: np.ndarray, plan: BandPlan, out_dir: str | Path) -> list[Path]:
    """The map side of one unit: ``bands.npy`` (bands, n, 2) and ``offsets.npy`` (bands, 2^k + 1) in ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, offsets = _band_arrays(hashes, ids, plan)
    paths = [out_dir / "bands.npy", out_dir / "offsets.npy"]
    for path, array in zip(paths, (rows, offsets), strict=True):
        tmp = path.with_suffix(".tmp.npy")
        np.save(tmp, array)
        tmp.replace(path)
    return paths


def _gather(unit_dirs, plan: BandPlan, band: int, blocks: list[int]) -> np.ndarray:
    """(R, 2) [hash, id] rows of ``blocks`` of ``band`` from every unit's band index (memory-mapped slices)."""
    parts = []
    for unit_dir in unit_dirs:
        rows = np.load(Path(unit_dir) / "bands.npy", mmap_mode="r")
        offsets = np.load(Path(unit_dir) / "offsets.npy")
        if rows.shape[0] != plan.bands or offsets.shape[1] != (1 << plan.block_bits) + 1:
            raise ValueError(f"{unit_dir}: band index of another plan (shape {rows.shape}, {offsets.shape}) vs {plan}")
        parts += [np.asarray(rows[band, offsets[band, q] : offsets[band, q + 1]]) for q in blocks]
    return np.concatenate(parts) if parts else np.zeros((0, 2), np.uint64)


def _owned(plan: BandPlan, a: np.ndarray, b: np.ndarray, band: int) -> np.ndarray:
    """(P,) bool: ``band`` is the first band on which hashes ``a`` and ``b`` differ in at most ``radius`` bits."""
    owned = np.ones(len(a), bool)
    for earlier in range(band):
        owned &= hamming(plan.values(a, earlier), plan.values(b, earlier)) > plan.radius
    return owned


def block_pairs(unit_dirs, plan: BandPlan, band: int, block: int, batch: int = 1 << 20) -> np.ndarray:
    """The pairs one job owns: (P, 3) uint64 [id_a, id_b, d] with id_a < id_b, d <= threshold, probed from the rows
    of ``block`` (the member with the smaller band value, or the smaller id on equal values). At most ``batch``
    (row, pattern) probes are held at once."""
    probe = _gather(unit_dirs, plan, band, [block])  # (R, 2), sorted by band value within each unit
    partners = _gather(unit_dirs, plan, band, plan.neighbours(block))
    pv = plan.values(partners[:, 0], band)
    order = np.argsort(pv, kind="stable")
    partners, pv = partners[order], pv[order]
    patterns = _patterns(plan.width(band), plan.radius)  # (T,) uint64, pattern 0 first
    rows = max(1, batch // len(patterns))
    found = [np.zeros((0, 3), np.uint64)]
    for start in range(0, len(probe), rows):
        found.append(_probe(plan, band, probe[start : start + rows], partners, pv, patterns))
    return np.concatenate(found)


def _probe(plan, band, probe, partners, pv, patterns: np.ndarray) -> np.ndarray:
    """Pairs (probe row, partner row) whose band values differ by one of ``patterns``, verified and owned."""
    v = plan.values(probe[:, 0], band)
    q = (v[:, None] ^ patterns[None, :]).ravel()  # (R * T,) partner band values
    src = np.repeat(np.arange(len(probe)), len(patterns))
    keep = q >= np.repeat(v, len(patterns))  # pattern != 0: probed from the smaller value; 0: both ways
    q, src = q[keep], src[keep]
    lo = np.searchsorted(pv, q, "left")
    cnt = np.searchsorted(pv, q, "right") - lo
    a = probe[np.repeat(src, cnt)]  # (C, 2)
    b = partners[np.repeat(lo, cnt) + np.arange(cnt.sum()) - np.repeat(np.cumsum(cnt) - cnt, cnt)]
    keep = a[:, 1] < b[:, 1]  # equal band values: once, from the smaller id
    keep |= plan.values(a[:, 0], band) != plan.values(b[:, 0], band)
    a, b = a[keep], b[keep]
    d = hamming(a[:, 0], b[:, 0])
    ok = (d <= plan.threshold) & _owned(plan, a[:, 0], b[:, 0], band)
    ida, idb = a[ok, 1], b[ok, 1]
    return np.stack([np.minimum(ida, idb), np.maximum(ida, idb), d[ok].astype(np.uint64)], axis=1)


def sort_pairs(pairs: np.ndarray) -> np.ndarray:
    """(P, 3) pairs in the order greedy removal walks them: by (id_b, d, id_a)."""
    return pairs[np.lexsort((pairs[:, 0], pairs[:, 2], pairs[:, 1]))]


def partitioned_pairs(
    hashes: np.ndarray, plan: BandPlan, work_dir: str | Path, units: int = 1
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All pairs ``i < j`` of ``hashes`` within ``plan.threshold``, through the map / block jobs on disk: the rows
    are cut into ``units`` contiguous units (each its own band index), every (band, block) job runs in turn.

    Returns i, j, d (P,) int64 sorted by (j, d, i), as ``phash.near_duplicate_pairs``.
    """
    h = np.asarray(hashes, np.uint64)
    cuts = np.linspace(0, len(h), units + 1).astype(int)
    dirs = []
    for u in range(units):
        dirs.append(Path(work_dir) / f"u{u:06d}")
        write_band_index(h[cuts[u] : cuts[u + 1]], np.arange(cuts[u], cuts[u + 1], dtype=np.uint64), plan, dirs[-1])
    pairs = sort_pairs(np.concatenate([block_pairs(dirs, plan, b, p) for b, p in plan.jobs()])).astype(np.int64)
    return pairs[:, 0], pairs[:, 1], pairs[:, 2]
