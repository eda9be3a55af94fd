"""Image transforms shared by training and evaluation (spec sections 3.1 and 7; DINOv2's ``data/transforms.py``).

All randomness goes through torchvision, which draws from torch's global RNG, so ``torch.manual_seed`` fixes it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torchvision import transforms

__all__ = [
    "IMAGENET_DEFAULT_MEAN",
    "IMAGENET_DEFAULT_STD",
    "GaussianBlur",
    "MaybeToTensor",
    "make_normalize_transform",
    "make_eval_transform",
    "to_pil_image",
]

IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)


class GaussianBlur(transforms.RandomApply):
    """Gaussian blur (kernel 9, sigma ~ U(radius_min, radius_max)) applied with probability ``p`` (spec 3.1).

    Unlike DINOv2's class of the same name, ``p`` here is the probability that the blur *is applied*. DINOv2 passes
    ``1 - p`` to ``RandomApply`` (quirk Q5); :class:`~franca.data.augmentations.DataAugmentationDINO` reproduces that
    by choosing ``p`` from its ``blur_probs`` flag. As in ``RandomApply`` one ``torch.rand(1)`` is drawn per call,
    even when ``p`` is 0 or 1, so the RNG stream does not depend on ``p``.
    """

    def __init__(self, *, p: float = 0.5, radius_min: float = 0.1, radius_max: float = 2.0, kernel_size: int = 9):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"GaussianBlur: p must be in [0, 1], got {p}")
        blur = transforms.GaussianBlur(kernel_size=kernel_size, sigma=(radius_min, radius_max))
        super().__init__(transforms=[blur], p=p)


class MaybeToTensor(transforms.ToTensor):
    """``ToTensor`` that passes tensors through unchanged (DINOv2's ``MaybeToTensor``)."""

    def __call__(self, pic):
        if isinstance(pic, torch.Tensor):
            return pic
        return super().__call__(pic)


def make_normalize_transform(
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN, std: Sequence[float] = IMAGENET_DEFAULT_STD
) -> transforms.Normalize:
    """Channel-wise ``(x - mean) / std`` on a ``(3, H, W)`` float tensor in [0, 1]."""
    return transforms.Normalize(mean=tuple(mean), std=tuple(std))


def to_pil_image(image) -> Image.Image:
    """Accept a PIL image, an ``(H, W, 3)`` uint8 array or a ``(3, H, W)`` uint8 tensor; return an RGB PIL image."""
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    if isinstance(image, torch.Tensor):
        if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] not in (1, 3):
            raise TypeError(f"transforms: expected a (3,H,W) uint8 tensor, got {image.dtype} {tuple(image.shape)}")
        image = image.permute(1, 2, 0).numpy()
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3):
            raise TypeError(f"transforms: expected an (H,W[,3]) uint8 array, got {image.dtype} {image.shape}")
        if image.ndim == 3 and image.shape[2] == 1:
            image = image[:, :, 0]
        return Image.fromarray(image).convert("RGB")
    raise TypeError(f"transforms: unsupported image type {type(image).__name__}")


def make_eval_transform(
    size: int,
    resize_size: int | None = None,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
) -> transforms.Compose:
    """Evaluation transform: bicubic resize of the short side, center crop ``size``, ToTensor, Normalize (spec 7.1).

    ``resize_size`` defaults to ``round(size * 256 / 224)``, the ratio of the 256 -> 224 protocol.
    """
    if size < 1:
        raise ValueError(f"make_eval_transform: size must be >= 1, got {size}")
    resize_size = round(size * 256 / 224) if resize_size is None else int(resize_size)
    if resize_size < size:
        raise ValueError(f"make_eval_transform: resize_size {resize_size} is smaller than the crop size {size}")
    return transforms.Compose(
        [
            transforms.Lambda(to_pil_image),
            transforms.Resize(resize_size, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(size),
            MaybeToTensor(),
            make_normalize_transform(mean, std),
        ]
    )
