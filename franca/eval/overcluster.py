"""Overclustering of patch features (spec 7.6 and the RASA validation of spec 5; Ziegler & Asano, Leopart 2022).

Pipeline (the RASA code's version):
  1. resolution, ``mode="upsample_features"`` (faithful): masks resized (nearest) to ``mask_size`` x ``mask_size``
     (100 in the official code) and patch features bilinearly upsampled (align_corners False) to the same size;
     ``mode="downsample_masks"``: masks resized (nearest) to the patch grid, one point per patch (cheaper:
     n * h * w points instead of n * mask_size^2, for large sets);
  2. z-score per dimension over all points;
  3. PCA to ``pca_dim`` = 50 dims (faiss PCAMatrix; skipped when D <= pca_dim, where it would only rotate);
  4. faiss K-means, 50 iterations, 5 restarts (best objective kept), seed 1, K in {C, 3C, 10C} by default
     (VOC: 21 / 300 / 500 in the code; pass ``ks`` to set them);
  5. matching on the pixels whose label is not 255: Hungarian (max overlap) when K <= C; greedy many-to-one when
     K > C, each cluster to the class with the best IoU (``miou_k{K}``), plus the precision variant, each cluster to
     its majority class (``miou_k{K}_precision``);
  6. mIoU over the C classes; clusters left unmatched by Hungarian count as misses of their pixels' classes.
Every point is clustered (void pixels included; k-means sees no labels); only the matching and the score skip 255.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import faiss
import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

logger = logging.getLogger(__name__)

__all__ = [
    "overcluster_points",
    "zscore_pca",
    "kmeans_assign",
    "cluster_class_counts",
    "match_clusters",
    "mapped_confusion",
    "cluster_miou",
    "overcluster_eval",
]


def overcluster_points(
    tokens: torch.Tensor,
    segs: torch.Tensor,
    mask_size: int = 100,
    mode: str = "upsample_features",
    chunk: int = 16,
) -> tuple[np.ndarray, np.ndarray]:
    """(n, h, w, D) tokens and (n, H, W) masks -> points (P, D) float32 and labels (P,) int64."""
    n, h, w, dim = tokens.shape
    segs = torch.as_tensor(segs)
    if mode == "downsample_masks":
        size = (h, w)
    elif mode == "upsample_features":
        size = (mask_size, mask_size)
    else:
        raise ValueError(f"overcluster mode must be 'upsample_features' or 'downsample_masks', got {mode!r}")
    labels = F.interpolate(segs[:, None].float(), size=size, mode="nearest")[:, 0].long()  # (n, *size)
    if mode == "downsample_masks":
        return tokens.reshape(-1, dim).float().numpy(), labels.reshape(-1).numpy()
    points = np.empty((n * size[0] * size[1], dim), dtype=np.float32)
    per_img = size[0] * size[1]
    for start in range(0, n, chunk):
        up = F.interpolate(
            tokens[start : start + chunk].permute(0, 3, 1, 2).float(), size=size, mode="bilinear", align_corners=False
        )  # (b, D, S, S)
        points[start * per_img : (start + up.shape[0]) * per_img] = up.permute(0, 2, 3, 1).reshape(-1, dim).numpy()
    return points, labels.reshape(-1).numpy()


def zscore_pca(points: np.ndarray, pca_dim: int = 50) -> np.ndarray:
    """Per-dimension z-score, then PCA to pca_dim (faiss) when the dimension exceeds it."""
    x = (points - points.mean(0)) / np.maximum(points.std(0), 1e-6)
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.shape[1] <= pca_dim:
        return x
    pca = faiss.PCAMatrix(x.shape[1], pca_dim)
    pca.train(x)
    return pca.apply(x)


def kmeans_assign(x: np.ndarray, k: int, niter: int = 50, nredo: int = 5, seed: int = 1) -> np.ndarray:
    """faiss K-means (best of nredo restarts) -> cluster id per point (P,) int64."""
    if k > x.shape[0]:
        raise ValueError(f"K = {k} clusters for only {x.shape[0]} points")
    km = faiss.Kmeans(x.shape[1], k, niter=niter, nredo=nredo, seed=seed, verbose=False)
    km.train(x)
    _, assign = km.index.search(x, 1)
    return assign[:, 0].astype(np.int64)


def cluster_class_counts(
    clusters: np.ndarray, labels: np.ndarray, k: int, num_classes: int, ignore_index: int = 255
) -> np.ndarray:
    """(K, C) pixel counts of cluster k and class c over points with a valid label."""
    valid = labels != ignore_index
    flat = clusters[valid] * num_classes + labels[valid]
    return np.bincount(flat, minlength=k * num_classes).reshape(k, num_classes).astype(np.int64)


def match_clusters(counts: np.ndarray, mode: str) -> np.ndarray:
    """Class of each cluster (K,) from (K, C) counts; -1 = unmatched.

    mode "hungarian": one-to-one maximising the total overlap (K <= C leaves no cluster out);
    "iou": each cluster to the class with the highest IoU; "precision": each cluster to its majority class.
    """
    k, c = counts.shape
    mapping = np.full(k, -1, dtype=np.int64)
    if mode == "hungarian":
        rows, cols = linear_sum_assignment(counts, maximize=True)
        mapping[rows] = cols
        return mapping
    if mode == "iou":
        union = counts.sum(1, keepdims=True) + counts.sum(0, keepdims=True) - counts
        score = counts / np.maximum(union, 1)
    elif mode == "precision":
        score = counts.astype(np.float64)
    else:
        raise ValueError(f"unknown matching mode {mode!r}")
    nonempty = counts.sum(1) > 0
    mapping[nonempty] = score[nonempty].argmax(1)
    return mapping


def mapped_confusion(counts: np.ndarray, mapping: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(C, C) confusion (rows = GT, columns = matched class) and (C,) GT pixels that fell in unmatched clusters."""
    num_classes = counts.shape[1]
    conf = np.zeros((num_classes, num_classes + 1), dtype=np.int64)  # last column: unmatched
    for cluster, cls in enumerate(mapping):
        conf[:, cls if cls >= 0 else num_classes] += counts[cluster]
    return conf[:, :num_classes].copy(), conf[:, num_classes]


def cluster_miou(counts: np.ndarray, mapping: np.ndarray) -> float:
    """mIoU of the matched clustering; unmatched pixels are false negatives of their class (no TP, no FP)."""
    square, missed = mapped_confusion(counts, mapping)
    tp = np.diag(square).astype(np.float64)
    union = square.sum(0) + square.sum(1) + missed - tp
    if not (union > 0).any():
        return float("nan")
    return float(np.mean(tp[union > 0] / union[union > 0]))


def overcluster_eval(
    tokens: torch.Tensor,
    segs: torch.Tensor,
    num_classes: int,
    ks: Sequence[int] | None = None,
    k_multipliers: Sequence[int] = (1, 3, 10),
    mask_size: int = 100,
    mode: str = "upsample_features",
    pca_dim: int = 50,
    niter: int = 50,
    nredo: int = 5,
    seed: int = 1,
    ignore_index: int = 255,
) -> dict:
    """Overclustering mIoU -> {"metrics": {miou (K = C), miou_k{K}, miou_k{K}_precision}, "details"}."""
    ks = sorted({int(k) for k in (ks or [m * num_classes for m in k_multipliers])})
    points, labels = overcluster_points(tokens, segs, mask_size, mode)
    x = zscore_pca(points, pca_dim)
    metrics: dict[str, float] = {}
    details: dict = {"ks": ks, "mode": mode, "n_points": int(x.shape[0]), "dim": int(x.shape[1])}
    for k in ks:
        counts = cluster_class_counts(kmeans_assign(x, k, niter, nredo, seed), labels, k, num_classes, ignore_index)
        if k <= num_classes:
            metrics[f"miou_k{k}"] = cluster_miou(counts, match_clusters(counts, "hungarian"))
        else:
            metrics[f"miou_k{k}"] = cluster_miou(counts, match_clusters(counts, "iou"))
            metrics[f"miou_k{k}_precision"] = cluster_miou(counts, match_clusters(counts, "precision"))
    if f"miou_k{num_classes}" in metrics:
        metrics["miou"] = metrics[f"miou_k{num_classes}"]
    logger.info("overclustering: %s", {k: round(v, 4) for k, v in metrics.items()})
    return {"metrics": metrics, "details": details}
