"""Batch collation with stratified iBOT mask ratios (spec section 3.2; DINOv2's ``collate_data_and_cast``).

Randomness: the per-image mask ratios and the shuffle of the mask list are drawn from ``rng`` (a
``random.Random``), or from the module-level ``random`` state when ``rng`` is ``None``; the masks themselves come
from ``mask_generator`` and its own RNGs (see :mod:`franca.data.masking`). A training loop that saves and restores
those states (``rng.getstate()``, ``random.getstate()``, ``np.random.get_state()`` or the generator's
``bit_generator.state``) reproduces the batches exactly after a resume.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["collate_data_and_cast", "mask_ratio_bins", "stack_crops"]


def _crops_of(sample: Any) -> Mapping[str, Sequence[torch.Tensor]]:
    """The augmentation dict of one sample: either the dict itself or the first item of an ``(dict, label)`` pair."""
    if isinstance(sample, Mapping):
        crops = sample
    elif isinstance(sample, (tuple, list)) and sample and isinstance(sample[0], Mapping):
        crops = sample[0]
    else:
        raise TypeError(f"collate: a sample must be a crops dict or a (crops dict, label) pair, got {type(sample)}")
    for key in ("global_crops", "local_crops"):
        if key not in crops:
            raise KeyError(f"collate: sample is missing the key '{key}' (has {sorted(crops)})")
    return crops


def stack_crops(samples: Sequence[Any]) -> dict[str, torch.Tensor]:
    """The crops of a batch stacked crop-major: ``global_crops`` (2B, 3, H, W), ``local_crops`` (LB, 3, h, w).

    No randomness: a DataLoader worker runs it as its ``collate_fn``, so that a batch crosses to the main process as
    two tensors instead of (2 + L) * B small ones (each shared-memory tensor costs a file descriptor round trip;
    measured in benchmarks/gpu_check.py). :func:`collate_data_and_cast` accepts its output in place of the samples.
    """
    if not samples:
        raise ValueError("collate: empty list of samples")
    crops = [_crops_of(s) for s in samples]
    n_global = len(crops[0]["global_crops"])
    n_local = len(crops[0]["local_crops"])
    # crop-major: [crop 0 of every sample, crop 1 of every sample, ...]
    global_crops = torch.stack([c["global_crops"][i] for i in range(n_global) for c in crops])  # (2B,3,H,W)
    if n_local > 0:
        local_crops = torch.stack([c["local_crops"][i] for i in range(n_local) for c in crops])  # (LB,3,h,w)
    else:
        local_crops = torch.empty(0, *global_crops.shape[1:2], 0, 0)
    return {"global_crops": global_crops, "local_crops": local_crops}


def _is_stacked(samples: Any) -> bool:
    return isinstance(samples, Mapping) and torch.is_tensor(samples.get("global_crops"))


def mask_ratio_bins(mask_ratio_tuple: Sequence[float], n_samples_masked: int) -> torch.Tensor:
    """The ``n_samples_masked + 1`` float32 bin edges splitting ``[min, max]`` evenly (as DINOv2's linspace)."""
    lo, hi = (float(v) for v in mask_ratio_tuple)
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"collate: mask_ratio_tuple must satisfy 0 <= min <= max <= 1, got {mask_ratio_tuple!r}")
    return torch.linspace(lo, hi, n_samples_masked + 1)


def collate_data_and_cast(
    samples: Sequence[Any] | Mapping[str, torch.Tensor],
    mask_ratio_tuple: Sequence[float],
    mask_probability: float,
    dtype: torch.dtype,
    n_tokens: int,
    mask_generator: Callable[[int], np.ndarray],
    rng: random.Random | None = None,
) -> dict[str, Any]:
    """Stack the crops crop-major and draw the iBOT masks of the global crops (spec 3.2).

    ``n_m = int(2B * mask_probability)`` global-crop images get a mask; image ``i`` of those draws a ratio
    ``r_i ~ U(bin_i)`` from the ``i``-th of ``n_m`` equal bins of ``mask_ratio_tuple`` and requests
    ``int(N * r_i)`` patches. The remaining images get an empty mask and the list of masks is shuffled.
    ``samples``: a list of crops dicts (or (dict, label) pairs), or the output of :func:`stack_crops` on them.
    Returns the keys of ``docs/interfaces.md``.
    """
    if mask_generator is None:
        raise ValueError("collate: mask_generator is required")
    rng = rng or random
    stacked = samples if _is_stacked(samples) else stack_crops(samples)
    collated_global_crops, collated_local_crops = stacked["global_crops"], stacked["local_crops"]

    n_images = len(collated_global_crops)  # 2B
    N = int(n_tokens)
    n_samples_masked = int(n_images * mask_probability)
    # float32 edges and float32 arithmetic on 0-d tensors, bit-for-bit as DINOv2 (int() truncation is sensitive)
    probs = mask_ratio_bins(mask_ratio_tuple, n_samples_masked)  # (n_m + 1,) float32
    upperbound = 0
    masks_list = []
    for i in range(n_samples_masked):
        prob_min, prob_max = probs[i], probs[i + 1]
        ratio = rng.uniform(prob_min, prob_max)  # 0-d float32 tensor: prob_min + (prob_max - prob_min) * U
        masks_list.append(torch.as_tensor(np.asarray(mask_generator(int(N * ratio)), dtype=bool)))
        upperbound += int(N * prob_max)
    for _ in range(n_samples_masked, n_images):
        masks_list.append(torch.as_tensor(np.asarray(mask_generator(0), dtype=bool)))
    rng.shuffle(masks_list)  # masks become independent of crop index and sample

    collated_masks = torch.stack(masks_list).flatten(1)  # (2B, N) bool
    if collated_masks.shape[1] != N:
        raise ValueError(f"collate: mask_generator gives {collated_masks.shape[1]} cells, n_tokens is {N}")
    mask_indices_list = collated_masks.flatten().nonzero().flatten()  # (M,) long, into (2B*N)
    per_image = collated_masks.sum(-1, keepdim=True).clamp(min=1).float()  # (2B, 1)
    masks_weight = (1.0 / per_image).expand_as(collated_masks)[collated_masks]  # (M,) each image sums to 1
    return {
        "collated_global_crops": collated_global_crops.to(dtype),
        "collated_local_crops": collated_local_crops.to(dtype),
        "collated_masks": collated_masks,
        "mask_indices_list": mask_indices_list,
        "masks_weight": masks_weight,
        "n_masked_patches": torch.full((1,), fill_value=mask_indices_list.shape[0], dtype=torch.long),
        "upperbound": upperbound,
    }
