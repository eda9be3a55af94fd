"""Multi-crop augmentation of DINOv2/Franca (spec section 3.1; quirk Q5 of section 10.3).

Two global crops and ``local_crops_number`` local crops per image. Every crop: RandomResizedCrop (bicubic, aspect
3/4..4/3) then horizontal flip p=0.5, ColorJitter(0.4, 0.4, 0.2, 0.1) with p=0.8, RandomGrayscale p=0.2. Extras:
Gaussian blur on every crop with a per-crop probability, and RandomSolarize(128) with p=0.2 on global crop 2.
Finally ToTensor and ImageNet Normalize.

Blur probabilities (Q5): DINOv2's code passes ``1 - p`` to ``RandomApply``, so the nominal 1.0 / 0.1 / 0.5
(global 1 / global 2 / locals) are *applied* with probability 0 / 0.9 / 0.5. ``blur_probs="effective"`` (the
faithful default) reproduces those; ``"nominal"`` applies 1.0 / 0.1 / 0.5 as the paper describes.

All randomness is drawn by torchvision from torch's global RNG (seed it with ``torch.manual_seed``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import torch
from torchvision import transforms

from franca.data.transforms import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    GaussianBlur,
    MaybeToTensor,
    make_normalize_transform,
    to_pil_image,
)

logger = logging.getLogger(__name__)

__all__ = ["DataAugmentationDINO", "NOMINAL_BLUR_PROBS", "blur_apply_probs"]

# (global 1, global 2, locals) as written in the DINOv2/Franca code and the paper
NOMINAL_BLUR_PROBS = (1.0, 0.1, 0.5)
_CFG_KEYS = ("global_crops_scale", "local_crops_scale", "local_crops_number", "global_crops_size", "local_crops_size")


def blur_apply_probs(blur_probs: str = "effective") -> tuple[float, float, float]:
    """Probabilities that the blur is applied to (global 1, global 2, locals) under the Q5 flag."""
    if blur_probs == "effective":
        return tuple(1.0 - p for p in NOMINAL_BLUR_PROBS)  # RandomApply(p = 1 - p): 0, 0.9, 0.5
    if blur_probs == "nominal":
        return NOMINAL_BLUR_PROBS
    raise ValueError(f"crops.blur_probs must be 'effective' or 'nominal', got {blur_probs!r}")


def _scale(value: Sequence[float], name: str) -> tuple[float, float]:
    lo, hi = (float(v) for v in value)
    if not 0.0 < lo <= hi <= 1.0:
        raise ValueError(f"crops.{name} must satisfy 0 < min <= max <= 1, got {list(value)!r}")
    return lo, hi


def set_crop_settings(obj, global_crops_scale, local_crops_scale, local_crops_number, global_crops_size,
                      local_crops_size) -> None:  # fmt: skip
    """The validated multi-crop settings that the PIL and the tensor paths share, set on ``obj``."""
    if int(local_crops_number) < 0:
        raise ValueError(f"crops.local_crops_number must be >= 0, got {local_crops_number}")
    obj.global_crops_scale = _scale(global_crops_scale, "global_crops_scale")
    obj.local_crops_scale = _scale(local_crops_scale, "local_crops_scale")
    obj.local_crops_number = int(local_crops_number)
    obj.global_crops_size = int(global_crops_size)
    obj.local_crops_size = int(local_crops_size)


class DataAugmentationDINO:
    """Callable ``image -> {"global_crops": [g1, g2], "local_crops": [l_1, ..., l_n]}`` of ``(3, s, s)`` tensors."""

    def __init__(
        self,
        global_crops_scale: Sequence[float],
        local_crops_scale: Sequence[float],
        local_crops_number: int,
        global_crops_size: int = 224,
        local_crops_size: int = 96,
        blur_probs: str = "effective",
        mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        std: Sequence[float] = IMAGENET_DEFAULT_STD,
    ) -> None:
        set_crop_settings(self, global_crops_scale, local_crops_scale, local_crops_number, global_crops_size,
                          local_crops_size)  # fmt: skip
        self.blur_probs = blur_probs
        p_global1, p_global2, p_local = blur_apply_probs(blur_probs)
        logger.debug("blur apply probabilities (g1, g2, local) = %s (%s)", (p_global1, p_global2, p_local), blur_probs)

        bicubic = transforms.InterpolationMode.BICUBIC
        self.geometric_augmentation_global = transforms.Compose(
            [
                transforms.RandomResizedCrop(
                    self.global_crops_size, scale=self.global_crops_scale, interpolation=bicubic
                ),
                transforms.RandomHorizontalFlip(p=0.5),
            ]
        )
        self.geometric_augmentation_local = transforms.Compose(
            [
                transforms.RandomResizedCrop(
                    self.local_crops_size, scale=self.local_crops_scale, interpolation=bicubic
                ),
                transforms.RandomHorizontalFlip(p=0.5),
            ]
        )
        color_jittering = transforms.Compose(
            [
                transforms.RandomApply(
                    [transforms.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)], p=0.8
                ),
                transforms.RandomGrayscale(p=0.2),
            ]
        )
        self.normalize = transforms.Compose([MaybeToTensor(), make_normalize_transform(mean, std)])
        # the blur of each crop kind is kept as an attribute so that its probability can be inspected
        self.blur_global1 = GaussianBlur(p=p_global1)
        self.blur_global2 = GaussianBlur(p=p_global2)
        self.blur_local = GaussianBlur(p=p_local)
        self.solarize_global2 = transforms.RandomSolarize(threshold=128, p=0.2)
        self.global_transfo1 = transforms.Compose([color_jittering, self.blur_global1, self.normalize])
        self.global_transfo2 = transforms.Compose(
            [color_jittering, self.blur_global2, self.solarize_global2, self.normalize]
        )
        self.local_transfo = transforms.Compose([color_jittering, self.blur_local, self.normalize])

    @classmethod
    def from_config(cls, crops_cfg: Mapping, **overrides) -> DataAugmentationDINO:
        """Build from the ``crops`` config group of ``docs/interfaces.md`` (``blur_probs`` defaults to effective)."""
        missing = [k for k in _CFG_KEYS if k not in crops_cfg]
        if missing:
            raise KeyError(f"crops config is missing key(s) {', '.join('crops.' + k for k in missing)}")
        kwargs = {k: crops_cfg[k] for k in _CFG_KEYS}
        kwargs["blur_probs"] = crops_cfg.get("blur_probs", "effective")
        kwargs.update(overrides)
        return cls(**kwargs)

    def __call__(self, image) -> dict[str, list[torch.Tensor]]:
        image = to_pil_image(image)
        # order of RNG use as in DINOv2: g1 (geometry, colour), g2, then each local crop
        global_crop_1 = self.global_transfo1(self.geometric_augmentation_global(image))
        global_crop_2 = self.global_transfo2(self.geometric_augmentation_global(image))
        local_crops = [
            self.local_transfo(self.geometric_augmentation_local(image)) for _ in range(self.local_crops_number)
        ]
        return {"global_crops": [global_crop_1, global_crop_2], "local_crops": local_crops}
