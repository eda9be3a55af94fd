"""RASA training data: augmented crops through the frozen backbone (spec section 5, "RASA training data").

Official training crops: RandomResizedCrop(518, scale (0.25, 1)); ColorJitter(0.32, 0.32, 0.32, 0.08) p 0.8;
grayscale p 0.2; Gaussian blur sigma in [0.1, 2] p 0.5; horizontal and vertical flips p 0.5 each;
RandomRotation(+-90 deg, nearest) p 0.5; Normalize whose std has the typo 0.255 (quirk Q9, kept by default through
``std_typo=True``).  The targets do not depend on the augmentation: a patch's target is its grid position in the
crop, so the augmentations only vary the content under each position.

:func:`fit_rasa` is the whole stage on samples: tokens of augmented train crops -> :func:`train_rasa`, with the
per-round report scored on eval-transformed validation tokens.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from torch import nn
from torchvision import transforms

from franca.eval.features import IMAGENET_MEAN, IMAGENET_STD, extract_patch_features, iter_batches
from franca.rasa.rasa_head import RASAHead
from franca.rasa.train import RASATrainConfig, train_rasa

logger = logging.getLogger(__name__)

__all__ = ["rasa_train_transform", "extract_rasa_tokens", "fit_rasa"]

RASA_STD_TYPO = (0.229, 0.224, 0.255)  # official rasa train transform (quirk Q9)


def rasa_train_transform(
    crop_size: int, scale: tuple[float, float] = (0.25, 1.0), std_typo: bool = True
) -> transforms.Compose:
    """The official RASA training augmentation at ``crop_size`` (518 in the paper; the tiny preset's crop size)."""
    kernel = max(3, (crop_size // 20) | 1)  # odd kernel, about 5% of the crop
    return transforms.Compose(
        [
            transforms.RandomResizedCrop(crop_size, scale=scale, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.RandomApply([transforms.ColorJitter(0.32, 0.32, 0.32, 0.08)], p=0.8),
            transforms.RandomGrayscale(p=0.2),
            transforms.RandomApply([transforms.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=0.5),
            transforms.RandomHorizontalFlip(p=0.5),
            transforms.RandomVerticalFlip(p=0.5),
            transforms.RandomApply(
                [transforms.RandomRotation(90, interpolation=transforms.InterpolationMode.NEAREST)], p=0.5
            ),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, RASA_STD_TYPO if std_typo else IMAGENET_STD),
        ]
    )


def extract_rasa_tokens(
    backbone: nn.Module,
    samples: Iterable[dict],
    crop_size: int,
    passes: int = 1,
    batch_size: int = 64,
    seed: int = 400,
    std_typo: bool = True,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Final-norm patch tokens of ``passes`` augmented crops of every sample -> (n * passes, N, D) float32."""
    transform = rasa_train_transform(crop_size, std_typo=std_typo)
    samples = list(samples) if passes > 1 else samples
    torch.manual_seed(seed)  # torchvision's random transforms draw from the global generator
    was_training = backbone.training
    backbone.eval()
    chunks = []
    try:
        with torch.no_grad():
            for _ in range(passes):
                for batch in iter_batches(samples, batch_size, lambda im: transform(im.convert("RGB"))):
                    out = backbone.forward_features(batch["images"].to(device))
                    chunks.append(out["x_norm_patchtokens"].float().cpu())  # (b, N, D)
    finally:
        backbone.train(was_training)
    if not chunks:
        raise ValueError("extract_rasa_tokens: the sample iterable was empty")
    return torch.cat(chunks)


def fit_rasa(
    backbone: nn.Module,
    train_samples: Iterable[dict],
    val_samples: Iterable[dict] | None,
    crop_size: int,
    cfg: RASATrainConfig | None = None,
    passes: int = 1,
    eval_resize_size: int | None = None,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
) -> tuple[RASAHead, list[dict]]:
    """The RASA stage: train a head on augmented train crops, report each round on validation tokens."""
    cfg = cfg or RASATrainConfig()
    tokens = extract_rasa_tokens(
        backbone, train_samples, crop_size, passes=passes, batch_size=batch_size, seed=cfg.seed, device=device
    )
    eval_tokens = None
    if val_samples is not None:
        eval_tokens = extract_patch_features(
            backbone,
            val_samples,
            resize_size=eval_resize_size or crop_size,
            crop_size=crop_size,
            batch_size=batch_size,
            device=device,
        )["patch_tokens"]
    logger.info("RASA on %d train crops of %s tokens", tokens.shape[0], tuple(tokens.shape[1:]))
    return train_rasa(
        tokens,
        rounds=cfg.rounds,
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        seed=cfg.seed,
        weight_decay=cfg.weight_decay,
        use_pos_pred=cfg.use_pos_pred,
        eval_tokens=eval_tokens,
        orthogonalize=cfg.orthogonalize,
    )
