"""Feature extraction for the evaluations (spec section 7): eval transforms and batched, no-grad backbone calls.

Samples are dicts ``{key, image: PIL RGB, label: int | None, seg: np.ndarray (H, W) uint8 | None}`` as yielded by
``franca.data.shards.iter_samples``.  A backbone is any nn.Module with the DINOv2 API of
``franca.models.vision_transformer.DinoVisionTransformer``:
``forward_features(x, masks=None, rasa_head=None)`` and ``get_intermediate_layers(x, n, return_class_token, norm)``.

Eval transform (DINOv2's): resize the shorter side to ``resize_size`` (bicubic), centre crop ``crop_size``,
ImageNet normalisation.  Dense labels get the same geometry with nearest-neighbour resampling.
Missing labels become -1; missing masks make ``segs`` None (a mix of both raises).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch
from PIL import Image
from torch import nn

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "eval_transform",
    "seg_eval_transform",
    "iter_batches",
    "extract_cls_features",
    "extract_linear_features",
    "extract_patch_features",
]


def _resize_shorter(img: Image.Image, size: int, resample: int) -> Image.Image:
    w, h = img.size
    if min(w, h) == size:
        return img
    scale = size / min(w, h)
    return img.resize((max(size, round(w * scale)), max(size, round(h * scale))), resample=resample)


def _center_crop(img: Image.Image, size: int) -> Image.Image:
    w, h = img.size
    if size > min(w, h):
        raise ValueError(f"crop {size} larger than the resized image {w}x{h}")
    left, top = (w - size) // 2, (h - size) // 2
    return img.crop((left, top, left + size, top + size))


def eval_transform(image: Image.Image, resize_size: int, crop_size: int) -> torch.Tensor:
    """PIL RGB -> (3, crop, crop) float tensor: bicubic shorter-side resize, centre crop, ImageNet normalisation."""
    img = _center_crop(_resize_shorter(image.convert("RGB"), resize_size, Image.BICUBIC), crop_size)
    arr = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)  # (3, H, W)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (arr - mean) / std


def seg_eval_transform(seg: np.ndarray, resize_size: int, crop_size: int) -> torch.Tensor:
    """(H, W) uint8 class map -> (crop, crop) uint8 tensor with the image's geometry (nearest resampling)."""
    img = _center_crop(
        _resize_shorter(Image.fromarray(np.asarray(seg, dtype=np.uint8)), resize_size, Image.NEAREST), crop_size
    )
    return torch.from_numpy(np.array(img, dtype=np.uint8))


def iter_batches(
    samples: Iterable[dict],
    batch_size: int,
    transform: Callable[[Image.Image], torch.Tensor],
    seg_transform: Callable[[np.ndarray], torch.Tensor] | None = None,
) -> Iterator[dict]:
    """Group samples into batches {images (b, 3, H, W), labels (b,) long, segs (b, H, W) uint8 | None, keys}."""
    buf: list[dict] = []

    def flush() -> dict:
        has_seg = [s.get("seg") is not None for s in buf]
        if seg_transform is not None and any(has_seg) and not all(has_seg):
            raise ValueError(f"batch mixes samples with and without seg (keys {[s.get('key') for s in buf][:4]}...)")
        use_seg = seg_transform is not None and all(has_seg)
        return {
            "images": torch.stack([transform(s["image"]) for s in buf]),
            "labels": torch.tensor([-1 if s.get("label") is None else int(s["label"]) for s in buf], dtype=torch.long),
            "segs": torch.stack([seg_transform(s["seg"]) for s in buf]) if use_seg else None,
            "keys": [s.get("key") for s in buf],
        }

    for sample in samples:
        if "image" not in sample:
            raise KeyError(f"sample {sample.get('key')!r} has no 'image'")
        buf.append(sample)
        if len(buf) == batch_size:
            yield flush()
            buf = []
    if buf:
        yield flush()


class _EvalMode:
    """Context manager: backbone in eval mode and no_grad, previous mode restored."""

    def __init__(self, module: nn.Module):
        self.module, self.was_training = module, module.training
        self.no_grad = torch.no_grad()

    def __enter__(self):
        self.module.eval()
        self.no_grad.__enter__()

    def __exit__(self, *exc):
        self.no_grad.__exit__(*exc)
        self.module.train(self.was_training)


def _collect(parts: list[dict]) -> dict:
    out: dict = {}
    for name in parts[0]:
        values = [p[name] for p in parts]
        if name == "keys":
            out[name] = [k for v in values for k in v]
        elif any(v is None for v in values):
            if not all(v is None for v in values):
                raise ValueError(f"some samples have '{name}' and others do not")
            out[name] = None
        else:
            out[name] = torch.cat(values)
    return out


def _empty_error(what: str) -> ValueError:
    return ValueError(f"{what}: the sample iterable was empty")


def extract_cls_features(
    backbone: nn.Module,
    samples: Iterable[dict],
    resize_size: int = 256,
    crop_size: int = 224,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
) -> dict:
    """Final-norm CLS tokens (spec 7.1, 7.3) -> {features (n, D) float32, labels (n,) long, keys}."""
    parts = []
    with _EvalMode(backbone):
        for batch in iter_batches(samples, batch_size, lambda im: eval_transform(im, resize_size, crop_size)):
            out = backbone.forward_features(batch["images"].to(device))
            parts.append(
                {"features": out["x_norm_clstoken"].float().cpu(), "labels": batch["labels"], "keys": batch["keys"]}
            )
    if not parts:
        raise _empty_error("extract_cls_features")
    return _collect(parts)


def extract_linear_features(
    backbone: nn.Module,
    samples: Iterable[dict],
    n_last_blocks: int = 4,
    resize_size: int = 256,
    crop_size: int = 224,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    on_batch: Callable[[dict], None] | None = None,
) -> dict:
    """Inputs of the linear probe (spec 7.2): normed CLS of the last n blocks and the last block's mean patch token.

    n_last_blocks is clipped to the backbone depth (``len(backbone.blocks)`` when it exists). ``on_batch`` is called
    with every transformed batch (under no_grad), so other features can share this pass over the samples.
    Returns {cls_tokens (n, n_blocks, D) in block order, patch_mean (n, D), labels (n,), keys}.
    """
    depth = len(backbone.blocks) if hasattr(backbone, "blocks") else n_last_blocks
    n_blocks = max(1, min(n_last_blocks, depth))
    parts = []
    with _EvalMode(backbone):
        for batch in iter_batches(samples, batch_size, lambda im: eval_transform(im, resize_size, crop_size)):
            layers = backbone.get_intermediate_layers(
                batch["images"].to(device), n_blocks, return_class_token=True, norm=True
            )  # n_blocks x (patch (b, N, D), cls (b, D))
            parts.append(
                {
                    "cls_tokens": torch.stack([cls for _, cls in layers], dim=1).float().cpu(),
                    "patch_mean": layers[-1][0].mean(dim=1).float().cpu(),
                    "labels": batch["labels"],
                    "keys": batch["keys"],
                }
            )
            if on_batch is not None:
                on_batch(batch)
    if not parts:
        raise _empty_error("extract_linear_features")
    return _collect(parts)


def extract_patch_features(
    backbone: nn.Module,
    samples: Iterable[dict],
    rasa_head: Callable | None = None,
    resize_size: int = 224,
    crop_size: int = 224,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
) -> dict:
    """Final-norm patch tokens for the dense evaluations, with RASA applied when a head is given.

    Returns {patch_tokens (n, h, w, D) float32, segs (n, crop, crop) uint8 | None, labels, keys}; the grid is
    square (square crop), h = w = sqrt(N).
    """
    parts = []
    with _EvalMode(backbone):
        for batch in iter_batches(
            samples,
            batch_size,
            lambda im: eval_transform(im, resize_size, crop_size),
            seg_transform=lambda s: seg_eval_transform(s, resize_size, crop_size),
        ):
            out = backbone.forward_features(batch["images"].to(device), rasa_head=rasa_head)
            tokens = out["patch_token_rasa"] if rasa_head is not None else out["x_norm_patchtokens"]  # (b, N, D)
            side = int(round(tokens.shape[1] ** 0.5))
            if side * side != tokens.shape[1]:
                raise ValueError(f"patch tokens of {tokens.shape[1]} positions do not form a square grid")
            parts.append(
                {
                    "patch_tokens": tokens.reshape(tokens.shape[0], side, side, -1).float().cpu(),
                    "segs": batch["segs"],
                    "labels": batch["labels"],
                    "keys": batch["keys"],
                }
            )
    if not parts:
        raise _empty_error("extract_patch_features")
    return _collect(parts)
