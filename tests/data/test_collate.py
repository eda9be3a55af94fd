"""Tests of the collate function and its stratified mask ratios (spec 3.2, checklist 10.1 row 3)."""

import random

import numpy as np
import pytest
import torch

from franca.data.collate import collate_data_and_cast, stack_crops
from franca.data.masking import CyclicMask

KEYS = {
    "collated_global_crops",
    "collated_local_crops",
    "collated_masks",
    "mask_indices_list",
    "masks_weight",
    "n_masked_patches",
    "upperbound",
}


def make_samples(B, n_local=3, size=4, local_size=2, as_pairs=False):
    """Crop tensors filled with 100*b + crop index, so that the stacking order can be read back."""
    samples = []
    for b in range(B):
        crops = {
            "global_crops": [torch.full((3, size, size), 100.0 * b + k) for k in range(2)],
            "local_crops": [torch.full((3, local_size, local_size), 100.0 * b + 10 + k) for k in range(n_local)],
        }
        samples.append((crops, b) if as_pairs else crops)
    return samples


class RecordingGenerator:
    """Masks the first n cells of a (side x side) grid and records every request."""

    def __init__(self, side):
        self.side, self.requests = side, []

    def __call__(self, n):
        self.requests.append(n)
        mask = np.zeros(self.side * self.side, dtype=bool)
        mask[:n] = True
        return mask.reshape(self.side, self.side)


def collate(samples, gen, N, rng, prob=0.5, dtype=torch.float32):
    return collate_data_and_cast(samples, (0.1, 0.65), prob, dtype, N, gen, rng=rng)


@pytest.mark.parametrize("as_pairs", [False, True])
def test_keys_shapes_and_crop_major_order(as_pairs):
    B, L = 4, 3
    batch = collate(
        make_samples(B, L, as_pairs=as_pairs), CyclicMask((8, 8), rng=random.Random(0)), 64, random.Random(0)
    )
    assert set(batch) == KEYS
    g, loc = batch["collated_global_crops"], batch["collated_local_crops"]
    assert g.shape == (2 * B, 3, 4, 4) and loc.shape == (L * B, 3, 2, 2)
    # crop-major: index k * B + b holds crop k of sample b
    assert [g[i, 0, 0, 0].item() for i in range(2 * B)] == [0, 100, 200, 300, 1, 101, 201, 301]
    assert [loc[i, 0, 0, 0].item() for i in range(L * B)] == [100 * b + 10 + k for k in range(L) for b in range(B)]
    assert batch["collated_masks"].shape == (2 * B, 64) and batch["collated_masks"].dtype == torch.bool
    assert batch["n_masked_patches"].dtype == torch.long and batch["n_masked_patches"].shape == (1,)
    assert isinstance(batch["upperbound"], int)


@pytest.mark.parametrize("as_pairs", [False, True])
def test_worker_stacked_crops_give_the_same_batch(as_pairs):
    """DataLoader workers stack the crops (stack_crops); masks drawn afterwards in the main process must give the
    batch that collating the sample list gives, with the same RNG draws."""
    samples = make_samples(5, as_pairs=as_pairs)

    def masking():
        return CyclicMask((8, 8), rng=random.Random(3), np_rng=np.random.default_rng(3))

    a = collate(samples, masking(), 64, random.Random(3))
    b = collate(stack_crops(samples), masking(), 64, random.Random(3))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(torch.as_tensor(a[key]), torch.as_tensor(b[key])), key
    with pytest.raises(ValueError, match="empty"):
        stack_crops([])


def test_dtype_cast():
    batch = collate(make_samples(2), CyclicMask((8, 8)), 64, random.Random(0), dtype=torch.bfloat16)
    assert batch["collated_global_crops"].dtype == torch.bfloat16
    assert batch["collated_local_crops"].dtype == torch.bfloat16


def test_indices_weights_and_counts_are_consistent():
    B, N = 8, 64
    batch = collate(make_samples(B), CyclicMask((8, 8), rng=random.Random(1)), N, random.Random(1))
    masks = batch["collated_masks"]
    per_image = masks.sum(1)
    n_m = int(2 * B * 0.5)
    assert int((per_image > 0).sum()) == n_m  # exactly half of the global crops carry a mask
    flat = [i for i, v in enumerate(masks.flatten().tolist()) if v]
    assert batch["mask_indices_list"].tolist() == flat
    assert batch["n_masked_patches"].item() == len(flat)
    # each masked patch weighs 1 / (masked patches of its image): every masked image sums to 1
    image_of = batch["mask_indices_list"] // N
    expected = torch.tensor([1.0 / per_image[i].item() for i in image_of.tolist()])
    assert torch.allclose(batch["masks_weight"], expected)
    assert batch["masks_weight"].sum().item() == pytest.approx(n_m, abs=1e-5)


def test_upperbound_golden_values():
    # 2B = 16 -> 8 bins of [0.1, 0.65] with edges 0.1 + 0.06875 k; int(64 * edge) for k = 1..8:
    # 10 + 15 + 19 + 24 + 28 + 32 + 37 + 41 = 206
    batch = collate(make_samples(8), RecordingGenerator(8), 64, random.Random(0))
    assert batch["upperbound"] == 206
    # 2B = 8 -> 4 bins, N = 100: 23 + 37 + 51 + 65 = 176. The last edge is float32(0.65) = 0.64999998 and
    # 100 * it rounds to 65.0 in float32, as in DINOv2's torch arithmetic (float64 would give 64 and 175).
    batch = collate(make_samples(4), RecordingGenerator(10), 100, random.Random(0))
    assert batch["upperbound"] == 176


def test_ratio_stratification_and_shuffle():
    B, side = 8, 100
    N, n_m = side * side, 8
    edges = np.linspace(0.1, 0.65, n_m + 1)
    rng = random.Random(5)
    positions = []
    masked_rows = np.zeros(2 * B)
    batches = 150
    for _ in range(batches):
        gen = RecordingGenerator(side)
        batch = collate(make_samples(B, n_local=0), gen, N, rng)
        ratios = np.array(gen.requests[:n_m]) / N  # the masked images' requests, in bin order
        assert gen.requests[n_m:] == [0] * n_m
        # image i's ratio lies in bin i (up to the int() truncation of N * r)
        assert np.all(ratios >= edges[:-1] - 1.0 / N - 1e-6) and np.all(ratios <= edges[1:] + 1e-6)
        positions.extend((ratios - edges[:-1]) / (edges[1] - edges[0]))
        masked_rows += batch["collated_masks"].any(1).numpy()
    # within its bin the ratio is uniform: mean 1/2, sd of the mean sqrt(1/12 / 1200) = 0.0083; allow 5 sd
    assert abs(np.mean(positions) - 0.5) < 5 * np.sqrt(1 / 12 / len(positions))
    # the shuffle spreads the masked images over all 16 rows: each is masked with probability 1/2
    # (per row: binomial(150, 0.5), sd 6.1; 5 sd)
    assert np.all(np.abs(masked_rows - batches / 2) < 5 * np.sqrt(batches / 4)), masked_rows


def test_mask_probability_zero_gives_no_masks():
    batch = collate(make_samples(4), CyclicMask((8, 8)), 64, random.Random(0), prob=0.0)
    assert not batch["collated_masks"].any() and batch["upperbound"] == 0
    assert batch["mask_indices_list"].numel() == 0 and batch["n_masked_patches"].item() == 0


def _run(seed, n_batches=3):
    gen = CyclicMask((8, 8), rng=random.Random(seed), np_rng=np.random.default_rng(seed))
    rng = random.Random(seed)
    return [collate(make_samples(4), gen, 64, rng)["collated_masks"] for _ in range(n_batches)]


def test_same_seed_same_batch_and_resume():
    a, b, c = _run(0), _run(0), _run(1)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a, c, strict=True))
    # resume: restore the saved RNG states and get the same next batch
    gen = CyclicMask((8, 8), rng=random.Random(7), np_rng=np.random.default_rng(7))
    rng = random.Random(7)
    collate(make_samples(4), gen, 64, rng)
    state = (rng.getstate(), gen.rng.getstate(), gen.np_rng.bit_generator.state)
    first = collate(make_samples(4), gen, 64, rng)["collated_masks"]
    rng.setstate(state[0]), gen.rng.setstate(state[1])
    gen.np_rng.bit_generator.state = state[2]
    assert torch.equal(collate(make_samples(4), gen, 64, rng)["collated_masks"], first)


def test_bad_inputs():
    with pytest.raises(KeyError, match="local_crops"):
        collate([{"global_crops": [torch.zeros(3, 4, 4)] * 2}], CyclicMask((8, 8)), 64, random.Random(0))
    with pytest.raises(ValueError, match="n_tokens"):
        collate(make_samples(2), CyclicMask((8, 8)), 49, random.Random(0))
    with pytest.raises(ValueError, match="mask_ratio_tuple"):
        collate_data_and_cast(make_samples(2), (0.7, 0.1), 0.5, torch.float32, 64, CyclicMask((8, 8)))
