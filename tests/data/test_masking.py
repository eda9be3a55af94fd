"""Tests of CyclicMask and the DINOv2 block masking (spec 3.3, checklist 10.1 row 4)."""

import math
import random

import numpy as np
import pytest

from franca.data.masking import CyclicMask, MaskingGenerator, RandomBlockMasking, masking_frequency


class ScriptedRng:
    """Stands in for ``random.Random``: ``uniform`` and ``randint`` return scripted values (or the midpoint)."""

    def __init__(self, uniforms=None, randints=()):
        self.uniforms = list(uniforms) if uniforms is not None else None
        self.randints = list(randints)

    def uniform(self, a, b):
        return self.uniforms.pop(0) if self.uniforms is not None else (a + b) / 2

    def randint(self, a, b):
        value = self.randints.pop(0)
        assert a <= value <= b, (a, value, b)
        return value


class ScriptedNpRng:
    def __init__(self, values):
        self.values = list(values)

    def integers(self, low, high):
        value = self.values.pop(0)
        assert low <= value < high
        return value


def cells(mask):
    return {(int(r), int(c)) for r, c in zip(*np.nonzero(mask), strict=True)}


def test_inverse_block_golden_by_hand():
    # 8x8, n = 54 -> c = 10 visible; aspect exp(midpoint of [log .3, log 1/.3]) = 1 -> h = w = ceil(sqrt(10)) = 4.
    # top 2, left 3: visible (2,3..6), (3,3..6), (4,3..4); roll (dy, dx) = (5, 6) -> rows 7,0,1 and cols 1..4.
    gen = MaskingGenerator((8, 8), rng=ScriptedRng(randints=[2, 3]), np_rng=ScriptedNpRng([5, 6]))
    mask = gen(54)
    visible = {(7, 1), (7, 2), (7, 3), (7, 4), (0, 1), (0, 2), (0, 3), (0, 4), (1, 1), (1, 2)}
    assert cells(~mask) == visible
    assert mask.sum() == 54


def test_block_without_inverse_or_roll_golden():
    # use_inverse_block=False masks the truncated block itself: c = n = 10, same geometry as above, no roll
    gen = MaskingGenerator((8, 8), use_inverse_block=False, roll=False, rng=ScriptedRng(randints=[2, 3]))
    expected = {(2, 3), (2, 4), (2, 5), (2, 6), (3, 3), (3, 4), (3, 5), (3, 6), (4, 3), (4, 4)}
    assert cells(gen(10)) == expected


def is_truncated_block(region):
    """True when the cells form the first c cells, row-major, of an axis-aligned rectangle (no wrapping)."""
    rows = np.nonzero(region.any(1))[0]
    if len(rows) == 0 or np.any(np.diff(rows) != 1):
        return False
    spans = [np.nonzero(region[r])[0] for r in rows]
    left, width = spans[0][0], len(spans[0])
    for i, span in enumerate(spans):
        if np.any(np.diff(span) != 1) or span[0] != left:
            return False
        if len(span) != width and not (i == len(spans) - 1 and len(span) < width):
            return False
    return True


@pytest.mark.parametrize("grid", [(8, 8), (16, 16)])
@pytest.mark.parametrize("inverse,roll", [(True, True), (True, False), (False, True), (False, False)])
def test_exact_count_and_shape_for_every_n(grid, inverse, roll):
    H, W = grid
    gen = MaskingGenerator(
        grid, use_inverse_block=inverse, roll=roll, rng=random.Random(3), np_rng=np.random.default_rng(3)
    )
    for n in range(0, H * W + 3):
        mask = gen(n)
        assert mask.shape == grid and mask.dtype == bool
        assert mask.sum() == min(n, H * W), (n, mask.sum())
        if 0 < n < H * W and (H <= 8 or n % 5 == 0):  # the shape check of every shift is slow on 16x16
            region = ~mask if inverse else mask
            if roll:  # some cyclic shift must undo the roll
                assert any(
                    is_truncated_block(np.roll(region, (-dy, -dx), (0, 1))) for dy in range(H) for dx in range(W)
                ), n
            else:
                assert is_truncated_block(region), n


def test_cyclic_mask_alias_and_validation():
    gen = CyclicMask((8, 8))
    assert gen.use_block_masking and gen.use_inverse_block and gen.roll and gen.min_aspect == 0.3
    with pytest.raises(ValueError, match="min_aspect"):
        MaskingGenerator((8, 8), min_aspect=2.0)
    with pytest.raises(ValueError, match="draws"):
        masking_frequency(gen, 10, 0)
    baseline = MaskingGenerator.from_config({"use_block_masking": False, "min_aspect": 0.5}, (8, 8))
    assert (
        not baseline.use_block_masking
        and baseline.roll
        and baseline.random_blocks.log_aspect_ratio[1] == (pytest.approx(math.log(2.0)))
    )
    with pytest.raises(KeyError, match="masking.rol"):
        MaskingGenerator.from_config({"rol": True}, (8, 8))


def test_non_square_grid_exact_counts():
    gen = MaskingGenerator((4, 24), rng=random.Random(0), np_rng=np.random.default_rng(0))
    assert all(gen(n).sum() == n for n in range(0, 97))


# Stratified requests like the collate function's on an 8x8 grid: ratios in [0.1, 0.65] -> 6..41 patches.
REQUESTS = list(range(6, 42))
DRAWS = 36 * 700  # a whole number of cycles through REQUESTS
# Per cell, the count over D draws is a sum of independent Bernoulli(n_i / HW); its variance is at most
# D * p(1 - p) with p = mean(n) / HW. With z = 5.5 and a union bound over the 64 cells the chance that any cell
# leaves p +- z * sqrt(p(1-p)/D) is below 64 * 3.8e-8 < 3e-6.
Z = 5.5


def test_cyclic_mask_frequency_is_flat():
    H = W = 8
    freq = masking_frequency(CyclicMask((H, W)), REQUESTS, DRAWS, seed=0)
    p = np.mean(REQUESTS) / (H * W)
    # every draw masks exactly n cells, so the average frequency is exact
    assert freq.mean() == pytest.approx(p, abs=1e-12)
    bound = Z * math.sqrt(p * (1 - p) / DRAWS) / p  # relative: about 0.048 here
    assert np.abs(freq / p - 1).max() < bound


def test_inverse_block_without_roll_is_centre_biased():
    H = W = 8
    freq = masking_frequency(MaskingGenerator((H, W), roll=False), REQUESTS, DRAWS, seed=0)
    p = np.mean(REQUESTS) / (H * W)
    centre = freq[3:5, 3:5].mean()
    border = np.concatenate([freq[0], freq[-1], freq[1:-1, 0], freq[1:-1, -1]]).mean()
    noise = Z * math.sqrt(p * (1 - p) / DRAWS)  # per-cell bound; means of cells are tighter still
    # the block (visible region) covers the centre more often, so the centre is masked far less often
    assert border - centre > 30 * noise, (border, centre, noise)
    # the flat generator does not show it
    flat = masking_frequency(CyclicMask((H, W)), REQUESTS, DRAWS, seed=1)
    flat_border = np.concatenate([flat[0], flat[-1], flat[1:-1, 0], flat[1:-1, -1]]).mean()
    assert abs(flat_border - flat[3:5, 3:5].mean()) < 2 * noise


@pytest.mark.slow
def test_cyclic_mask_frequency_flat_16x16_1e5():
    H = W = 16
    requests = list(range(25, 167))  # int(256 * r) for r in [0.1, 0.65]
    draws = 100_000
    freq = masking_frequency(CyclicMask((H, W)), requests, draws, seed=0)
    p = np.mean(requests) / (H * W)
    z = 6.0  # union bound over 256 cells: 256 * 2e-9
    assert np.abs(freq / p - 1).max() < z * math.sqrt(p * (1 - p) / draws) / p


def test_dinov2_block_masking_golden():
    # request 6 on 8x8: block 1: area 6, aspect 1 -> 2x2 at (1,5) adds 4; budget min(6-4, 32) = 2;
    # block 2: area 4, aspect 1 -> 2x2 at (1,4) overlaps 2 cells, adds 2 <= budget -> total 6.
    rng = ScriptedRng(uniforms=[6.0, 0.0, 4.0, 0.0], randints=[1, 5, 1, 4])
    mask = RandomBlockMasking((8, 8), rng=rng)(6)
    assert cells(mask) == {(r, c) for r in (1, 2) for c in (4, 5, 6)}


def test_dinov2_block_masking_counts_and_cap():
    class Recording(RandomBlockMasking):
        added = []

        def _add_block(self, mask, budget):
            delta = super()._add_block(mask, budget)
            self.added.append((delta, budget))
            return delta

    default = MaskingGenerator((8, 8), use_block_masking=False)
    assert default.random_blocks.max_num_patches == 32  # DINOv2: 0.5 * H * W
    gen = Recording((8, 8), max_num_patches=10, rng=random.Random(0))
    reached = 0
    for n in range(0, 50):
        mask = gen(n)
        assert mask.sum() <= n  # never more than requested
        reached += mask.sum() == n
    # each successful block adds between 1 and min(remaining, cap) cells
    assert all(delta <= min(budget, 10) for delta, budget in Recording.added)
    assert max(delta for delta, _ in Recording.added) >= 5
    assert reached >= 40  # it usually reaches the request on an 8x8 grid
