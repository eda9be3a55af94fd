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
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from functools import lru_cache

import numpy as np
from PIL import Image

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
    """pHash of encoded image bytes (any format PIL reads)."""
    with Image.open(io.BytesIO(data)) as image:
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
