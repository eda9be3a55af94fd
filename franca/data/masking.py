"""Patch-mask generators for the iBOT masked-patch objective (spec section 3.3).

Two families of masks live here:

* **CyclicMask** (Franca): one rectangular block whose first ``c`` cells in row-major order are kept, then rolled
  cyclically by a uniform ``(dy, dx)`` on the torus. With ``use_inverse_block=True`` the block is the *visible*
  region (``c = HW - n``) and the mask is its complement; with ``use_inverse_block=False`` the block itself is the
  mask (``c = n``). Either way exactly ``n`` cells are masked.
* **Random multi-block masking** (BEiT / DINOv2 baseline, ``use_block_masking=False``): blocks of at least
  ``min_num_patches`` cells are added until the requested count is reached, each block adding at most
  ``max_num_patches`` new cells (DINOv2 passes ``0.5 * H * W``), with up to 10 placement tries per block. As in
  DINOv2 it may stop short of the request when no try adds a cell.

Randomness: the block geometry (aspect ratio, placement, block sizes) comes from ``rng`` (a ``random.Random``) and
the cyclic roll from ``np_rng`` (a ``numpy.random.Generator``). When either is ``None`` the module-level
``random`` / ``numpy.random`` global state is used, so that seeding those (and saving their state for resume)
controls every draw.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import numpy as np

__all__ = ["MaskingGenerator", "CyclicMask", "RandomBlockMasking", "masking_frequency"]


def _np_randint(np_rng: np.random.Generator | None, high: int) -> int:
    """One integer uniform in ``{0, ..., high - 1}`` from ``np_rng`` or NumPy's global state."""
    if np_rng is None:
        return int(np.random.randint(0, high))
    return int(np_rng.integers(0, high))


class RandomBlockMasking:
    """BEiT/DINOv2 random multi-block masking (the DINOv2 baseline of spec 3.3, ``use_block_masking=False``).

    Follows DINOv2's ``MaskingGenerator``: each block draws a target area ``U(min_num_patches, budget)`` and a
    log-uniform aspect ratio in ``[min_aspect, max_aspect]``, takes ``h = round(sqrt(area * a))``,
    ``w = round(sqrt(area / a))``, and is placed only if ``h < H`` and ``w < W`` and it adds between 1 and ``budget``
    new cells, where ``budget = min(remaining request, max_num_patches)``. A block gets up to 10 tries; generation
    stops when a block adds nothing.
    """

    def __init__(
        self,
        input_size: tuple[int, int],
        min_num_patches: int = 4,
        max_num_patches: float | None = None,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.height, self.width = (int(s) for s in input_size)
        self.num_patches = self.height * self.width
        self.min_num_patches = min_num_patches
        # DINOv2's train.py passes max_num_patches = 0.5 * H * W
        self.max_num_patches = 0.5 * self.num_patches if max_num_patches is None else max_num_patches
        max_aspect = max_aspect or 1.0 / min_aspect
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))
        self.rng = rng

    def _add_block(self, mask: np.ndarray, budget: float) -> int:
        """Try up to 10 times to add one block of at most ``budget`` new cells; returns the number added."""
        rng = self.rng or random
        added = 0
        for _ in range(10):
            target_area = rng.uniform(self.min_num_patches, budget)
            aspect = math.exp(rng.uniform(*self.log_aspect_ratio))
            h = int(round(math.sqrt(target_area * aspect)))
            w = int(round(math.sqrt(target_area / aspect)))
            if w < self.width and h < self.height:
                top = rng.randint(0, self.height - h)
                left = rng.randint(0, self.width - w)
                window = mask[top : top + h, left : left + w]  # view: writes go to mask
                new_cells = h * w - int(window.sum())
                if 0 < new_cells <= budget:
                    window[...] = True
                    added += new_cells
            if added > 0:
                break
        return added

    def __call__(self, num_masking_patches: int = 0) -> np.ndarray:
        mask = np.zeros((self.height, self.width), dtype=bool)  # (H, W)
        count = 0
        while count < num_masking_patches:
            budget = min(num_masking_patches - count, self.max_num_patches)
            added = self._add_block(mask, budget)
            if added == 0:
                break
            count += added
        return mask


class MaskingGenerator:
    """Franca's mask generator (spec 3.3); ``use_block_masking=True`` selects (inverse) block masking with roll.

    ``__call__(n)`` returns an ``(H, W)`` bool array with ``True`` on masked patches. For block masking exactly
    ``min(n, HW)`` cells are masked; for the DINOv2 baseline (``use_block_masking=False``) at most ``n``.
    """

    def __init__(
        self,
        input_size: tuple[int, int],
        use_block_masking: bool = True,
        use_inverse_block: bool = True,
        roll: bool = True,
        min_aspect: float = 0.3,
        rng: random.Random | None = None,
        np_rng: np.random.Generator | None = None,
        min_num_patches: int = 4,
        max_num_patches: float | None = None,
    ) -> None:
        if len(input_size) != 2 or min(input_size) < 1:
            raise ValueError(f"masking: input_size must be (H, W) with H, W >= 1, got {input_size!r}")
        if not 0.0 < min_aspect <= 1.0:
            raise ValueError(f"masking.min_aspect must be in (0, 1], got {min_aspect!r}")
        self.height, self.width = (int(s) for s in input_size)
        self.num_patches = self.height * self.width
        self.use_block_masking = use_block_masking
        self.use_inverse_block = use_inverse_block
        self.roll = roll
        self.min_aspect = min_aspect
        self.log_aspect_bounds = (math.log(min_aspect), math.log(1.0 / min_aspect))
        self._rng = rng
        self.np_rng = np_rng
        self.random_blocks = RandomBlockMasking(input_size, min_num_patches, max_num_patches, min_aspect, rng=rng)

    @classmethod
    def from_config(
        cls,
        masking_cfg,
        input_size: tuple[int, int],
        rng: random.Random | None = None,
        np_rng: np.random.Generator | None = None,
    ) -> MaskingGenerator:
        """Build from the ``masking`` config group of ``docs/interfaces.md`` (missing keys take Franca's values)."""
        defaults = {"use_block_masking": True, "use_inverse_block": True, "roll": True, "min_aspect": 0.3}
        unknown = set(masking_cfg) - set(defaults)
        if unknown:
            raise KeyError(f"masking config has unknown key(s) {sorted('masking.' + k for k in unknown)}")
        kwargs = {k: masking_cfg.get(k, v) for k, v in defaults.items()}
        return cls(input_size, rng=rng, np_rng=np_rng, **kwargs)

    @property
    def rng(self) -> random.Random | None:
        return self._rng

    @rng.setter
    def rng(self, value: random.Random | None) -> None:
        # the baseline generator shares the python RNG
        self._rng = value
        self.random_blocks.rng = value

    def get_shape(self) -> tuple[int, int]:
        return self.height, self.width

    def _block_shape(self, c: int) -> tuple[int, int]:
        """Steps 3-4: a block of ``h x w >= c`` cells with aspect ratio ``h / w`` log-uniform within the bounds."""
        H, W = self.height, self.width
        rng = self._rng or random
        lo = max(self.log_aspect_bounds[0], math.log(c / W**2))
        hi = min(self.log_aspect_bounds[1], math.log(H**2 / (c + 1e-5)))
        if lo > hi:
            lo = hi
        aspect = math.exp(rng.uniform(lo, hi))
        h = min(H, math.ceil(math.sqrt(c * aspect)))
        w = min(W, math.ceil(math.sqrt(c / aspect)))
        # Guard (not in the spec): only grids more elongated than the aspect bounds can clip below c cells.
        if h * w < c:
            if w == W:
                h = min(H, math.ceil(c / W))
            else:
                w = min(W, math.ceil(c / H))
        return h, w

    def block_map(self, c: int) -> np.ndarray:
        """Steps 3-7: ``(H, W)`` bool map of exactly ``c`` cells (a row-major-truncated block, rolled if ``roll``)."""
        H, W = self.height, self.width
        rng = self._rng or random
        h, w = self._block_shape(c)
        top = rng.randint(0, H - h)
        left = rng.randint(0, W - w)
        # the first c cells of the h x w block in row-major order (the last row may be partial)
        k = np.arange(c)
        rows, cols = top + k // w, left + k % w
        if self.roll:
            # cyclic roll by (dy, dx) on the torus: the same as np.roll(block, (dy, dx), axis=(0, 1))
            dy = _np_randint(self.np_rng, H)
            dx = _np_randint(self.np_rng, W)
            rows, cols = (rows + dy) % H, (cols + dx) % W
        block = np.zeros(H * W, dtype=bool)
        block[rows * W + cols] = True
        block = block.reshape(H, W)
        return block

    def __call__(self, num_masking_patches: int = 0) -> np.ndarray:
        n = int(num_masking_patches)
        if not self.use_block_masking:
            return self.random_blocks(n)
        if n <= 0:
            return np.zeros((self.height, self.width), dtype=bool)
        if n >= self.num_patches:
            return np.ones((self.height, self.width), dtype=bool)
        if self.use_inverse_block:
            visible = self.block_map(max(1, self.num_patches - n))  # step 2: c visible cells
            return ~visible  # step 8: exactly n masked
        return self.block_map(n)


class CyclicMask(MaskingGenerator):
    """Franca's CyclicMask: inverse block masking followed by a uniform cyclic roll (spec 3.3)."""

    def __init__(
        self,
        input_size: tuple[int, int],
        min_aspect: float = 0.3,
        rng: random.Random | None = None,
        np_rng: np.random.Generator | None = None,
    ) -> None:
        super().__init__(
            input_size,
            use_block_masking=True,
            use_inverse_block=True,
            roll=True,
            min_aspect=min_aspect,
            rng=rng,
            np_rng=np_rng,
        )


def masking_frequency(
    generator: MaskingGenerator | RandomBlockMasking,
    n_masked: int | Sequence[int],
    draws: int,
    seed: int = 0,
) -> np.ndarray:
    """Per-cell masking frequency over ``draws`` masks (the CyclicMask figure, spec 3.3 / 10.1 row 4).

    ``n_masked`` is a fixed request or a sequence of requests used in turn (draw ``i`` asks for
    ``n_masked[i % len]``). The generator's RNGs are replaced by fresh ones seeded with ``seed``, so the result is a
    pure function of the arguments. Returns an ``(H, W)`` float64 array in ``[0, 1]``.
    """
    if draws < 1:
        raise ValueError(f"masking_frequency: draws must be >= 1, got {draws}")
    requests = [int(n_masked)] if np.isscalar(n_masked) else [int(n) for n in n_masked]
    if not requests:
        raise ValueError("masking_frequency: n_masked is an empty sequence")
    generator.rng = random.Random(seed)
    if hasattr(generator, "np_rng"):
        generator.np_rng = np.random.default_rng(seed)
    counts = np.zeros((generator.height, generator.width), dtype=np.int64)  # (H, W)
    for i in range(draws):
        counts += generator(requests[i % len(requests)])
    return counts / draws
