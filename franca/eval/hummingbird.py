"""Hummingbird in-context segmentation (spec 7.4; Balazevic et al. 2023, following vpariza/open-hummingbird-eval).

1. Memory: every train patch token, L2-normalised, with its label = the histogram of ground-truth classes over the
   patch's pixels (mean of one-hot maps).  ``void_as_background=True`` (faithful to open-hummingbird-eval, which
   maps 255 to 0 before building memory labels) counts void pixels as class 0; False gives them no label mass.
2. Fixed memory size: ``memory_size // n_images`` patches per image are kept.  Faithful sampler: per image, a class's
   frequency is the number of the image's patches that contain it; a patch's score is the sum of the frequencies of
   the classes it contains, times U(0, 1); the lowest scores are kept, so patches of rare classes are favoured.
   ``memory_size=None`` keeps every patch.
3. Retrieval: faiss ``IndexFlatIP`` (exact cosine on normalised vectors), k = 30 neighbours per query patch.
4. Label transfer: softmax(cos(q, k_i) / beta), beta = 0.02, weights the neighbours' histograms.
5. The (h, w, C) label map is bilinearly upsampled (align_corners False) to the mask size; argmax.
6. mIoU against the masks with 255 ignored (``franca.eval.miou``); predictions are class ids, no matching.
Augmented memory passes (``augmentation_epoch``) enter as extra train tokens from the feature extractor.
"""

from __future__ import annotations

import logging

import faiss
import numpy as np
import torch
import torch.nn.functional as F

from franca.eval.miou import confusion_matrix, segmentation_scores

logger = logging.getLogger(__name__)

__all__ = ["patch_label_histograms", "sample_memory_indices", "build_memory", "hummingbird_predict", "hummingbird_eval"]


def patch_label_histograms(
    segs: torch.Tensor,
    grid: tuple[int, int],
    num_classes: int,
    ignore_index: int = 255,
    void_as_background: bool = True,
) -> torch.Tensor:
    """(n, H, W) class maps -> (n, h, w, C) per-patch class histograms (fractions of the patch's pixels)."""
    n, height, width = segs.shape
    h, w = grid
    if height % h or width % w:
        raise ValueError(f"mask size {height}x{width} is not a multiple of the patch grid {h}x{w}")
    segs = segs.long()
    void = segs == ignore_index
    segs = segs.masked_fill(void, 0)
    if segs.max() >= num_classes:
        raise ValueError(f"mask class {int(segs.max())} >= num_classes {num_classes}")
    onehot = F.one_hot(segs, num_classes).float()  # (n, H, W, C)
    if not void_as_background:
        onehot = onehot * (~void).unsqueeze(-1)
    onehot = onehot.reshape(n, h, height // h, w, width // w, num_classes)
    return onehot.mean(dim=(2, 4))  # (n, h, w, C)


def sample_memory_indices(hists: torch.Tensor, n_per_image: int, generator: torch.Generator) -> torch.Tensor:
    """(n, h, w, C) histograms -> (n, n_per_image) flat patch indices chosen by the rare-class-favouring score."""
    n = hists.shape[0]
    present = (hists.reshape(n, -1, hists.shape[-1]) > 0).float()  # (n, P, C)
    class_freq = present.sum(dim=1, keepdim=True)  # (n, 1, C): patches of the image containing each class
    scores = (present * class_freq).sum(-1)  # (n, P)
    empty = present.sum(-1) == 0
    scores = scores * torch.rand(scores.shape, generator=generator)
    scores[empty] = 1e6  # unlabeled patches come last
    return scores.topk(n_per_image, dim=1, largest=False).indices


def build_memory(
    tokens: torch.Tensor, hists: torch.Tensor, memory_size: int | None = None, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, h, w, D) tokens + (n, h, w, C) histograms -> memory (M, D) L2-normalised features and (M, C) labels."""
    n, h, w, dim = tokens.shape
    flat_tokens = tokens.reshape(n, h * w, dim).float()
    flat_hists = hists.reshape(n, h * w, -1)
    if memory_size is None or memory_size // n >= h * w:
        feats, labels = flat_tokens.reshape(-1, dim), flat_hists.reshape(-1, flat_hists.shape[-1])
    else:
        per_image = memory_size // n
        if per_image < 1:
            raise ValueError(f"memory_size {memory_size} is smaller than the number of train images {n}")
        idx = sample_memory_indices(hists, per_image, torch.Generator().manual_seed(seed))  # (n, per_image)
        feats = torch.gather(flat_tokens, 1, idx[..., None].expand(-1, -1, dim)).reshape(-1, dim)
        labels = torch.gather(flat_hists, 1, idx[..., None].expand(-1, -1, flat_hists.shape[-1]))
        labels = labels.reshape(-1, flat_hists.shape[-1])
    return F.normalize(feats, dim=1), labels


def hummingbird_predict(
    memory_feats: torch.Tensor,
    memory_labels: torch.Tensor,
    query_tokens: torch.Tensor,
    k: int = 30,
    beta: float = 0.02,
    chunk_size: int = 65536,
) -> torch.Tensor:
    """Soft label maps (n, h, w, C) for query tokens (n, h, w, D) by attention over the k nearest memory patches."""
    n, h, w, dim = query_tokens.shape
    k = min(k, memory_feats.shape[0])
    index = faiss.IndexFlatIP(dim)
    index.add(np.ascontiguousarray(memory_feats.numpy(), dtype=np.float32))
    queries = F.normalize(query_tokens.reshape(-1, dim).float(), dim=1)
    out = []
    for start in range(0, queries.shape[0], chunk_size):
        q = np.ascontiguousarray(queries[start : start + chunk_size].numpy(), dtype=np.float32)
        sims, idx = index.search(q, k)  # (b, k) each, descending similarity
        weights = torch.softmax(torch.from_numpy(sims) / beta, dim=1)  # (b, k)
        out.append(torch.einsum("bk,bkc->bc", weights, memory_labels[torch.from_numpy(idx).long()]))
    return torch.cat(out).reshape(n, h, w, -1)


def hummingbird_eval(
    train_tokens: torch.Tensor,
    train_segs: torch.Tensor,
    val_tokens: torch.Tensor,
    val_segs: torch.Tensor,
    num_classes: int,
    memory_size: int | None = None,
    k: int = 30,
    beta: float = 0.02,
    ignore_index: int = 255,
    void_as_background: bool = True,
    seed: int = 0,
) -> dict:
    """Hummingbird mIoU -> {"metrics": {miou, pixel_acc}, "details": {per_class_iou, memory_size, ...}}.

    train_tokens / val_tokens: (n, h, w, D) patch tokens; train_segs / val_segs: (n, H, W) uint8 masks.
    """
    grid = tuple(train_tokens.shape[1:3])
    hists = patch_label_histograms(torch.as_tensor(train_segs), grid, num_classes, ignore_index, void_as_background)
    mem_feats, mem_labels = build_memory(train_tokens, hists, memory_size, seed)
    label_hat = hummingbird_predict(mem_feats, mem_labels, val_tokens, k=k, beta=beta)  # (n, h, w, C)
    val_segs = torch.as_tensor(val_segs)
    up = F.interpolate(
        label_hat.permute(0, 3, 1, 2), size=tuple(val_segs.shape[1:]), mode="bilinear", align_corners=False
    )  # (n, C, H, W)
    pred = up.argmax(dim=1)
    scores = segmentation_scores(confusion_matrix(pred, val_segs, num_classes, ignore_index))
    metrics = {"miou": scores["miou"], "pixel_acc": scores["pixel_acc"]}
    details = {
        "per_class_iou": scores["per_class_iou"],
        "memory_size": int(mem_feats.shape[0]),
        "k": k,
        "beta": beta,
        "void_as_background": void_as_background,
    }
    logger.info("hummingbird: %s (memory %d)", metrics, mem_feats.shape[0])
    return {"metrics": metrics, "details": details}
