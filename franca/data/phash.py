"""64-bit DCT perceptual hash (pHash) and Hamming helpers for the manifest and dedup (issue 4, DESIGN "Data").

The hash follows the classic DCT pHash recipe, written here from its definition:

1. convert to luminance (PIL ``L``) and reduce to ``32 x 32`` by area averaging (box filter, robust to resizing),
2. take the orthonormal 2-D DCT-II ``C X C^T`` of the ``32 x 32`` block,
3. keep the ``8 x 8`` lowest frequencies (DC included), row-major,
4. bit ``i`` is 1 where coefficient ``i`` is above the median of the 64 coefficients.

Bit 0 (the DC term) is the most significant bit of the ``uint64``. Hashes are stored in manifests as 16-digit
lower-case hex strings (``phash_to_hex``) so that parquet and pandas never turn them into floats.

pHash is robust to resizing, re-compression and colour shifts but not to crops beyond a few percent (measured in
``benchmarks/bench_dedup.py``), so the manifest also stores a second descriptor, the **colour layout**: the mean
RGB of a 4 x 4 grid (48 bytes, hex). Dedup accepts a pair with a moderate pHash distance only when the layouts
agree too (``layout_rms``): a crop keeps the layout, two different images with similar pHashes do not.

A colour shift (per-channel gain and offset, e.g. a white-balance or exposure change) moves the raw layout as much
as a different image does, so the pair rule has a third test: the RMS difference of the **channel-normalised**
layouts (``normalize_layout``: each thumbnail's 16 cells z-scored per colour channel), which is invariant to any
per-channel affine map with positive gain. On a near-flat channel the z-scores are quantisation noise, so a layout
with a channel standard deviation under ``LAYOUT_MIN_STD`` never passes that test (``inf``; the raw test still
applies). ``pair_tests`` applies the whole cascade and names the test that accepted each pair.

All pairs within Hamming distance ``t`` of ``n`` hashes (``near_duplicate_pairs``) come from multi-index hashing:
the 64 bits are split into ``m`` bands and two hashes within distance ``t`` agree within ``floor(t / m)`` bits on
at least one band (pigeonhole), so probing each band's sorted table with every flip pattern of that radius finds all
pairs; the candidates are then verified. The cost is ``O(n * m * patterns * bucket)``, never all pairs.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from functools import lru_cache
from math import comb

import numpy as np
from PIL import Image, ImageFilter

__all__ = [
    "HASH_SIZE",
    "HIGHFREQ_FACTOR",
    "phash_gray",
    "reduce_image",
    "phash_image",
    "phash_bytes",
    "phash_to_hex",
    "hex_to_phash",
    "hamming",
    "phash_to_bits",
    "colour_layout",
    "hex_to_layout",
    "layout_rms",
    "LAYOUT_MIN_STD",
    "PAIR_TESTS",
    "normalize_layout",
    "normalized_layout_rms",
    "pair_tests",
    "THUMB_SIDE",
    "thumbnail",
    "thumbnail_similarity",
    "choose_bands",
    "near_duplicate_pairs",
]

HASH_SIZE = 8  # 8 x 8 = 64 bits
HIGHFREQ_FACTOR = 4  # the image is reduced to (8 * 4) x (8 * 4) = 32 x 32 before the DCT
_SIDE = HASH_SIZE * HIGHFREQ_FACTOR
_WEIGHTS = np.left_shift(np.uint64(1), np.arange(63, -1, -1, dtype=np.uint64))  # bit i -> 2^(63 - i)


@lru_cache(maxsize=4)
def _dct_matrix(n: int) -> np.ndarray:
    """Orthonormal DCT-II matrix ``C`` (n, n): ``C[k, i] = a_k cos(pi (2 i + 1) k / (2 n))``."""
    k = np.arange(n, dtype=np.float64)[:, None]
    i = np.arange(n, dtype=np.float64)[None, :]
    c = np.cos(np.pi * (2.0 * i + 1.0) * k / (2.0 * n))
    c[0] *= np.sqrt(1.0 / n)
    c[1:] *= np.sqrt(2.0 / n)
    return c


def phash_gray(gray: np.ndarray) -> np.ndarray:
    """Hashes of a batch of reduced luminance blocks.

    Args:
        gray: ``(N, 32, 32)`` or ``(32, 32)`` float array (any scale).

    Returns:
        ``(N,)`` uint64 (or a numpy uint64 scalar for a single block).
    """
    x = np.asarray(gray, dtype=np.float64)
    single = x.ndim == 2
    if single:
        x = x[None]
    if x.shape[1:] != (_SIDE, _SIDE):
        raise ValueError(f"phash_gray expects (N, {_SIDE}, {_SIDE}) blocks, got {x.shape}")
    c = _dct_matrix(_SIDE)
    coeffs = c @ x @ c.T  # (N, 32, 32) = C X C^T
    low = coeffs[:, :HASH_SIZE, :HASH_SIZE].reshape(len(x), HASH_SIZE * HASH_SIZE)  # (N, 64)
    bits = low > np.median(low, axis=1, keepdims=True)  # (N, 64) bool
    hashes = (bits.astype(np.uint64) * _WEIGHTS).sum(axis=1, dtype=np.uint64)
    return hashes[0] if single else hashes


def reduce_image(image: Image.Image) -> np.ndarray:
    """Luminance reduced to (32, 32) by a box filter, as float64."""
    gray = image.convert("L")
    return np.asarray(gray.resize((_SIDE, _SIDE), Image.Resampling.BOX), dtype=np.float64)


def phash_image(image: Image.Image) -> int:
    """pHash of one PIL image as a Python int in ``[0, 2^64)``."""
    return int(phash_gray(reduce_image(image)))


def phash_bytes(data: bytes) -> int:
    """pHash of encoded image bytes (the formats of ``franca.data.images.ALLOWED_FORMATS``)."""
    from franca.data.images import open_image

    with open_image(data) as image:
        return phash_image(image)


def phash_to_hex(value: int) -> str:
    """16-digit lower-case hex string of a 64-bit hash."""
    return f"{int(value):016x}"


def hex_to_phash(values: Iterable[str]) -> np.ndarray:
    """Hex strings -> ``(N,)`` uint64 array."""
    return np.array([int(v, 16) for v in values], dtype=np.uint64)


def hamming(a: np.ndarray | int, b: np.ndarray | int) -> np.ndarray:
    """Element-wise Hamming distance of uint64 hashes (broadcasting), as int64."""
    x = np.bitwise_xor(np.asarray(a, dtype=np.uint64), np.asarray(b, dtype=np.uint64))
    return np.bitwise_count(x).astype(np.int64)


def phash_to_bits(hashes: np.ndarray) -> np.ndarray:
    """``(N,)`` uint64 -> ``(N, 8)`` uint8 codes (big-endian bytes), the layout faiss binary indexes take."""
    return np.ascontiguousarray(np.asarray(hashes, dtype=">u8")).view(np.uint8).reshape(-1, 8)


LAYOUT_GRID = 4  # 4 x 4 cells x RGB = 48 bytes


def colour_layout(image: Image.Image) -> str:
    """Mean RGB of a ``4 x 4`` grid (box filter), row-major, as 96 hex digits."""
    cells = image.convert("RGB").resize((LAYOUT_GRID, LAYOUT_GRID), Image.Resampling.BOX)
    return np.asarray(cells, dtype=np.uint8).tobytes().hex()


def hex_to_layout(values: Iterable[str]) -> np.ndarray:
    """Hex layouts -> ``(N, 48)`` float32."""
    return np.stack([np.frombuffer(bytes.fromhex(v), dtype=np.uint8) for v in values]).astype(np.float32)


def layout_rms(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise RMS difference (0..255 scale) of two ``(N, 48)`` layout arrays."""
    return np.sqrt(np.mean((a - b) ** 2, axis=-1))


LAYOUT_MIN_STD = 4.0  # (0..255 scale) per-channel spread of the 16 cells below which z-scores are noise
PAIR_TESTS = ("hamming", "layout", "normalized_layout")  # the pair rule's tests, in the order they are tried


def normalize_layout(layouts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(N, 48)`` layouts -> ``(N, 48)`` per-thumbnail, per-channel z-scores and ``(N,)`` bool "has contrast".

    A row has contrast when each of its three channels has a standard deviation (over the 16 cells) of at least
    ``LAYOUT_MIN_STD``; rows without it get zeros and never pass the normalised test.
    """
    cells = np.asarray(layouts, dtype=np.float32).reshape(-1, LAYOUT_GRID * LAYOUT_GRID, 3)  # (N, 16, RGB)
    mean, std = cells.mean(axis=1, keepdims=True), cells.std(axis=1, keepdims=True)  # (N, 1, 3)
    contrast = std.min(axis=(1, 2)) >= LAYOUT_MIN_STD  # (N,)
    z = np.where(contrast[:, None, None], (cells - mean) / np.maximum(std, LAYOUT_MIN_STD), 0.0)
    return z.reshape(len(cells), -1).astype(np.float32), contrast


def normalized_layout_rms(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise RMS difference of the channel-normalised layouts of ``(N, 48)`` arrays; ``inf`` without contrast.

    With contrast it equals ``sqrt(mean_c 2 (1 - r_c))``, ``r_c`` the Pearson correlation of channel ``c``'s 16
    cells in the two layouts: 0 under any per-channel gain > 0 and offset, about 1.4 for unrelated layouts.
    """
    (za, ca), (zb, cb) = normalize_layout(a), normalize_layout(b)
    return np.where(ca & cb, layout_rms(za, zb), np.inf)


def pair_tests(
    d: np.ndarray,
    strict: int,
    loose: int,
    layouts: tuple[np.ndarray, np.ndarray] | None,
    layout_threshold: float,
    normalized_layout_threshold: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The dedup pair rule on candidate pairs with Hamming distances ``d`` (P,), first test that accepts wins:

    1. ``hamming``: ``d <= strict``;
    2. ``layout``: ``d <= loose`` and raw layout RMS ``<= layout_threshold``;
    3. ``normalized_layout``: ``d <= loose`` and channel-normalised layout RMS ``<= normalized_layout_threshold``
       (skipped when that threshold is negative).

    ``layouts`` holds the two ``(P, 48)`` layouts of each pair, or None (pHash rule only). Returns ``test`` (P,)
    int8 index into ``PAIR_TESTS`` (-1: rejected), and the raw and normalised layout differences (P,) float32
    (NaN where not computed: outside ``loose`` or accepted by ``hamming``).
    """
    d = np.asarray(d)
    test = np.where(d <= strict, 0, -1).astype(np.int8)
    raw, norm = np.full(len(d), np.nan, np.float32), np.full(len(d), np.nan, np.float32)
    rows = np.flatnonzero((test < 0) & (d <= loose)) if layouts is not None and loose > strict else []
    if len(rows):
        a, b = layouts[0][rows], layouts[1][rows]  # (R, 48)
        raw[rows] = layout_rms(a, b)
        test[rows[raw[rows] <= layout_threshold]] = 1
        if normalized_layout_threshold >= 0:
            norm[rows] = normalized_layout_rms(a, b)
            test[rows[(test[rows] < 0) & (norm[rows] <= normalized_layout_threshold)]] = 2
    return test, raw, norm


def _patterns(width: int, radius: int) -> np.ndarray:
    """All XOR masks of ``width`` bits with at most ``radius`` bits set, as uint64."""
    masks = [0]
    for k in range(1, radius + 1):
        masks += [sum(1 << b for b in bits) for bits in itertools.combinations(range(width), k)]
    return np.array(masks, dtype=np.uint64)


def choose_bands(n: int, threshold: int) -> int:
    """Number of bands minimising the estimated probes ``m * patterns(64/m, t//m) * (1 + n / 2^(64/m))``."""
    best, best_cost = 1, float("inf")
    for m in range(1, min(threshold + 1, 16) + 1):
        width, radius = 64 // m, threshold // m
        patterns = sum(comb(width, k) for k in range(radius + 1))
        cost = m * patterns * (1.0 + n / 2.0**width)
        if cost < best_cost:
            best, best_cost = m, cost
    return best


class _BandTable:
    """Rows grouped by band value: ``order`` sorts the rows; ``bucket(q)`` gives (first position, size) per value.

    Bands of up to 24 bits use a dense table (one gather per probe); wider bands a binary search.
    """

    def __init__(self, vals: np.ndarray, width: int):
        self.order = np.argsort(vals, kind="stable")
        if width <= 24:
            counts = np.bincount(vals.astype(np.int64), minlength=1 << width)
            self.starts, self.counts, self.sorted = np.cumsum(counts) - counts, counts, None
        else:
            self.sorted = vals[self.order]

    def bucket(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.sorted is None:
            idx = q.astype(np.int64)
            return self.starts[idx], self.counts[idx]
        lo = np.searchsorted(self.sorted, q, "left")
        return lo, np.searchsorted(self.sorted, q, "right") - lo


def _probe(h, vals, table: _BandTable, pattern: int, rows: np.ndarray, threshold: int) -> tuple[np.ndarray, int]:
    """Verified pairs ``(min, max, d)`` whose band values differ by ``pattern``, probed from ``rows``.

    Each unordered pair is probed once per pattern: from its member with the smaller band value (pattern != 0), or
    from its smaller index (pattern 0, same bucket).
    """
    q = vals[rows] ^ np.uint64(pattern)  # (R,) band values of the partners
    if pattern:
        probe = q > vals[rows]
        rows, q = rows[probe], q[probe]
    lo, cnt = table.bucket(q)  # first sorted position and size of each partner bucket
    ii = np.repeat(rows, cnt)
    jj = table.order[np.repeat(lo, cnt) + np.arange(cnt.sum()) - np.repeat(np.cumsum(cnt) - cnt, cnt)]
    if not pattern:
        ii, jj = ii[ii < jj], jj[ii < jj]
    d = hamming(h[ii], h[jj])
    ok = d <= threshold
    return np.stack([np.minimum(ii, jj)[ok], np.maximum(ii, jj)[ok], d[ok]], axis=1), len(ii)


def near_duplicate_pairs(
    hashes: np.ndarray, threshold: int, n_bands: int | None = None, block: int = 1 << 16
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, int]]:
    """All pairs ``i < j`` with ``hamming(h_i, h_j) <= threshold`` by multi-index hashing.

    Args:
        hashes: (n,) uint64.
    Returns:
        i, j, d: (P,) int64 arrays sorted by (j, d, i); stats (bands, radius, candidates checked).
    """
    h = np.asarray(hashes, dtype=np.uint64)
    n = len(h)
    m = n_bands or choose_bands(n, threshold)
    bounds = np.linspace(0, 64, m + 1).astype(int)  # band b covers bits [bounds[b], bounds[b+1]) from the MSB
    radius, found, candidates = threshold // m, [], 0
    for b in range(m):
        width = int(bounds[b + 1] - bounds[b])
        vals = (h >> np.uint64(64 - bounds[b + 1])) & np.uint64((1 << width) - 1)  # (n,)
        table = _BandTable(vals, width)
        for p in _patterns(width, radius).tolist():
            for start in range(0, n, block):
                pairs, checked = _probe(h, vals, table, p, np.arange(start, min(start + block, n)), threshold)
                found.append(pairs)
                candidates += checked
    pairs = np.unique(np.concatenate(found, axis=0), axis=0) if found else np.zeros((0, 3), dtype=np.int64)
    pairs = pairs[np.lexsort((pairs[:, 0], pairs[:, 2], pairs[:, 1]))]  # by j, then d, then i
    stats = {"bands": m, "radius_per_band": radius, "candidates": candidates, "pairs": len(pairs)}
    return pairs[:, 0], pairs[:, 1], pairs[:, 2], stats


THUMB_SIDE = 16
THUMB_CROPS = (1.0, 0.97, 0.94)  # central crops: a copy cropped by up to ~6 % matches one of them


THUMB_BLUR = 1.5  # Gaussian radius at 32 x 32, before the last 2 x 2 box step: fine texture would alias


def thumbnail(image: Image.Image) -> np.ndarray:
    """(3, 16, 16) float32 luminance thumbnails of the whole image and of its central 97 % and 94 %: box filter to
    32 x 32, Gaussian blur, box filter to 16 x 16. The pixel-level verifier of candidate pairs.

    The blur (measured on the planted copies of tests/data/test_dedup.py): 5 % crops score >= 0.955 against their
    originals (0.87 without it) while unrelated pairs stay <= 0.81."""
    gray, out = image.convert("L"), []
    w, h = gray.size
    for scale in THUMB_CROPS:
        cw, ch = w * scale, h * scale
        box = ((w - cw) / 2, (h - ch) / 2, (w + cw) / 2, (h + ch) / 2)
        big = gray.resize((2 * THUMB_SIDE, 2 * THUMB_SIDE), Image.Resampling.BOX, box=box)
        small = big.filter(ImageFilter.GaussianBlur(THUMB_BLUR)).resize((THUMB_SIDE, THUMB_SIDE), Image.Resampling.BOX)
        out.append(np.asarray(small, np.float32))
    return np.stack(out)


def _shift_correlation(a: np.ndarray, b: np.ndarray, max_shift: int) -> np.ndarray:
    """Largest Pearson correlation of (P, S, S) thumbnails over relative shifts of up to ``max_shift`` pixels."""
    side, best = a.shape[-1], np.full(len(a), -1.0)
    for dy in range(-max_shift, max_shift + 1):
        for dx in range(-max_shift, max_shift + 1):
            wa = a[:, max(0, dy) : side + min(0, dy), max(0, dx) : side + min(0, dx)].reshape(len(a), -1)
            wb = b[:, max(0, -dy) : side + min(0, -dy), max(0, -dx) : side + min(0, -dx)].reshape(len(b), -1)
            wa, wb = wa - wa.mean(1, keepdims=True), wb - wb.mean(1, keepdims=True)
            den = np.sqrt((wa * wa).sum(1) * (wb * wb).sum(1))
            corr = np.divide((wa * wb).sum(1), den, out=np.zeros(len(a)), where=den > 1e-6)
            best = np.maximum(best, corr)
    return best


def thumbnail_similarity(a: np.ndarray, b: np.ndarray, max_shift: int = 1) -> np.ndarray:
    """Pixel similarity of pairs of ``thumbnail`` stacks ``a``, ``b`` (P, 3, S, S): the largest Pearson correlation
    of the whole thumbnail of one image with any central crop of the other, over relative shifts of up to
    ``max_shift`` pixels (crops and shifts of a few percent). (P,) float32.

    Invariant to a gain and offset of the luminance (exposure, most colour shifts); two flat thumbnails (no
    variance) score 1 when their means agree within 2 grey levels, a flat one against a textured one scores 0.
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    best = np.full(len(a), -1.0)
    for k in range(a.shape[1]):  # one side whole, the other cropped (either way round)
        best = np.maximum(best, _shift_correlation(a[:, 0], b[:, k], max_shift))
        best = np.maximum(best, _shift_correlation(a[:, k], b[:, 0], max_shift))
    whole_a, whole_b = a[:, 0], b[:, 0]
    flat = (whole_a.std(axis=(1, 2)) < 0.5) & (whole_b.std(axis=(1, 2)) < 0.5)
    best[flat] = (np.abs(whole_a.mean(axis=(1, 2)) - whole_b.mean(axis=(1, 2))) <= 2)[flat].astype(np.float64)
    return best.astype(np.float32)
