"""Confusion-matrix mIoU shared by the dense evaluations (spec 7.4-7.6).

IoU_c = TP_c / (TP_c + FP_c + FN_c) from a confusion matrix ``conf[gt, pred]``; pixels whose ground truth is the
ignore index (255, VOC's void) are left out.  The mean runs over the classes whose union is non-empty (a class that
is neither in the ground truth nor predicted has no defined IoU and is skipped, as mmseg's nanmean does).
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["confusion_matrix", "iou_from_confusion", "miou_from_confusion", "segmentation_scores"]


def confusion_matrix(
    pred: torch.Tensor | np.ndarray, target: torch.Tensor | np.ndarray, num_classes: int, ignore_index: int = 255
) -> np.ndarray:
    """(C, C) int64 counts, rows = ground truth, columns = prediction, over pixels with target != ignore_index.

    pred and target have the same shape; a prediction outside [0, C) raises.
    """
    pred = torch.as_tensor(np.asarray(pred) if not isinstance(pred, torch.Tensor) else pred).reshape(-1).long()
    target = torch.as_tensor(np.asarray(target) if not isinstance(target, torch.Tensor) else target)
    target = target.reshape(-1).long()
    if pred.shape != target.shape:
        raise ValueError(f"pred has {pred.numel()} pixels, target {target.numel()}")
    valid = target != ignore_index
    pred, target = pred[valid], target[valid]
    if target.numel() and (target.min() < 0 or target.max() >= num_classes):
        raise ValueError(f"target classes must lie in [0, {num_classes}) or be {ignore_index}")
    if pred.numel() and (pred.min() < 0 or pred.max() >= num_classes):
        raise ValueError(f"predicted classes must lie in [0, {num_classes})")
    counts = torch.bincount(target * num_classes + pred, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).numpy().astype(np.int64)


def iou_from_confusion(conf: np.ndarray) -> np.ndarray:
    """Per-class IoU (C,), NaN where the union is empty."""
    conf = np.asarray(conf, dtype=np.float64)
    tp = np.diag(conf)
    union = conf.sum(0) + conf.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / np.where(union > 0, union, 1.0), np.nan)


def miou_from_confusion(conf: np.ndarray) -> float:
    """Mean IoU over classes with a non-empty union."""
    iou = iou_from_confusion(conf)
    return float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan")


def segmentation_scores(conf: np.ndarray) -> dict:
    """{"miou", "pixel_acc"} plus the per-class IoU list (NaN -> None) for the details."""
    conf = np.asarray(conf)
    total = conf.sum()
    iou = iou_from_confusion(conf)
    return {
        "miou": miou_from_confusion(conf),
        "pixel_acc": float(np.trace(conf) / total) if total else float("nan"),
        "per_class_iou": [None if np.isnan(v) else float(v) for v in iou],
    }
