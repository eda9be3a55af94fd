"""Tests of the multi-crop augmentation and the eval transform (spec 3.1, Q5; checklist 10.1 row 2)."""

import math

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from franca.data.augmentations import DataAugmentationDINO, blur_apply_probs
from franca.data.transforms import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, make_eval_transform

TINY = dict(
    global_crops_scale=[0.32, 1.0],
    local_crops_scale=[0.05, 0.32],
    local_crops_number=4,
    global_crops_size=32,
    local_crops_size=16,
)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_image(size=64, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def test_output_structure_and_sizes():
    aug = DataAugmentationDINO.from_config(TINY)
    out = aug(random_image())
    assert set(out) == {"global_crops", "local_crops"}
    assert [tuple(t.shape) for t in out["global_crops"]] == [(3, 32, 32)] * 2
    assert [tuple(t.shape) for t in out["local_crops"]] == [(3, 16, 16)] * 4
    assert all(t.dtype == torch.float32 for t in out["global_crops"] + out["local_crops"])
    # also accepts uint8 arrays
    assert tuple(aug(np.asarray(random_image()))["global_crops"][0].shape) == (3, 32, 32)


def test_crop_areas_within_scale_bounds(monkeypatch):
    records = []
    original = transforms.RandomResizedCrop.get_params

    def recording(img, scale, ratio):
        i, j, h, w = original(img, scale, ratio)
        records.append((tuple(scale), h * w / (img.size[0] * img.size[1]), w / h))
        return i, j, h, w

    monkeypatch.setattr(transforms.RandomResizedCrop, "get_params", staticmethod(recording))
    aug = DataAugmentationDINO.from_config(TINY)
    torch.manual_seed(0)
    n_images = 40
    for seed in range(n_images):
        aug(random_image(seed=seed))
    globals_ = [(a, r) for s, a, r in records if s == (0.32, 1.0)]
    locals_ = [(a, r) for s, a, r in records if s == (0.05, 0.32)]
    assert len(globals_) == 2 * n_images and len(locals_) == 4 * n_images
    # area and aspect within the bounds, up to the rounding of h and w to whole pixels on a 64 px image
    tol = 2 * 64 / 64**2
    for (lo, hi), crops in (((0.32, 1.0), globals_), ((0.05, 0.32), locals_)):
        areas = np.array([a for a, _ in crops])
        assert areas.min() >= lo - tol and areas.max() <= hi + tol
        # the target area is uniform on [lo, hi]: mean (lo + hi) / 2, sd (hi - lo) / sqrt(12 n); allow 5 sd + rounding
        assert abs(areas.mean() - (lo + hi) / 2) < 5 * (hi - lo) / math.sqrt(12 * len(areas)) + tol
        ratios = np.array([r for _, r in crops])
        assert ratios.min() > 3 / 4 - 0.15 and ratios.max() < 4 / 3 + 0.15


def test_blur_probability_flag_values():
    assert blur_apply_probs("effective") == (0.0, 0.9, 0.5)
    assert blur_apply_probs("nominal") == (1.0, 0.1, 0.5)
    with pytest.raises(ValueError, match="blur_probs"):
        blur_apply_probs("other")
    aug = DataAugmentationDINO.from_config(TINY)  # the faithful default
    assert (aug.blur_global1.p, aug.blur_global2.p, aug.blur_local.p) == (0.0, 0.9, 0.5)
    # solarize only on global crop 2
    assert aug.solarize_global2 in aug.global_transfo2.transforms
    assert aug.solarize_global2.threshold == 128 and aug.solarize_global2.p == 0.2
    assert not any(isinstance(t, transforms.RandomSolarize) for t in aug.global_transfo1.transforms)
    assert not any(isinstance(t, transforms.RandomSolarize) for t in aug.local_transfo.transforms)


class CountingBlur:
    def __init__(self, blur):
        self.blur, self.calls = blur, 0

    def __call__(self, img):
        self.calls += 1
        return self.blur(img)


@pytest.mark.parametrize("mode,expected", [("effective", (0.0, 0.9, 0.5)), ("nominal", (1.0, 0.1, 0.5))])
def test_measured_blur_frequencies(mode, expected):
    cfg = dict(TINY, global_crops_size=16, local_crops_size=8, local_crops_number=2, blur_probs=mode)
    aug = DataAugmentationDINO.from_config(cfg)
    counters = []
    for blur in (aug.blur_global1, aug.blur_global2, aug.blur_local):
        counters.append(CountingBlur(blur.transforms[0]))
        blur.transforms[0] = counters[-1]
    torch.manual_seed(0)
    image = random_image(32)
    n = 200
    for _ in range(n):
        aug(image)
    for counter, p, draws in zip(counters, expected, (n, n, 2 * n), strict=True):
        # binomial(draws, p): exact at p in {0, 1}, otherwise within 5 sd
        assert abs(counter.calls - draws * p) <= 5 * math.sqrt(draws * p * (1 - p)), (mode, p, counter.calls)


def test_seeded_runs_are_reproducible():
    aug = DataAugmentationDINO.from_config(TINY)
    image = random_image()

    def run(seed):
        torch.manual_seed(seed)
        out = aug(image)
        return torch.cat([t.flatten() for t in out["global_crops"] + out["local_crops"]])

    assert torch.equal(run(3), run(3))
    assert not torch.equal(run(3), run(4))


def test_config_errors():
    with pytest.raises(KeyError, match="crops.local_crops_size"):
        DataAugmentationDINO.from_config({k: v for k, v in TINY.items() if k != "local_crops_size"})
    with pytest.raises(ValueError, match="crops.global_crops_scale"):
        DataAugmentationDINO.from_config(dict(TINY, global_crops_scale=[0.5, 1.5]))
    with pytest.raises(ValueError, match="blur_probs"):
        DataAugmentationDINO.from_config(dict(TINY, blur_probs="maybe"))


def test_eval_transform_normalises_a_constant_image():
    value = (200, 100, 50)
    image = Image.new("RGB", (48, 40), value)
    out = make_eval_transform(32)(image)
    assert out.shape == (3, 32, 32)
    expected = [(v / 255 - m) / s for v, m, s in zip(value, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, strict=True)]
    for c in range(3):
        assert torch.allclose(out[c], torch.full((32, 32), expected[c]), atol=1e-5)
    # with resize_size = 48 (identity here) the central 32 crop starts at column (48 - 32) / 2 = 8
    ramp = np.tile(np.arange(48, dtype=np.uint8)[None, :, None] * 5, (48, 1, 3))
    out = make_eval_transform(32, resize_size=48)(ramp)
    first_column = (out[0, 0, 0] * IMAGENET_DEFAULT_STD[0] + IMAGENET_DEFAULT_MEAN[0]) * 255
    assert first_column.item() == pytest.approx(8 * 5, abs=0.5)  # column 8 of 48 is the crop's first
    with pytest.raises(ValueError, match="resize_size"):
        make_eval_transform(32, resize_size=20)
