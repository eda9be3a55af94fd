"""k-NN classification on frozen features (spec 7.1; DINOv2's eval/knn.py protocol).

* features are L2-normalised, similarity is the cosine (a dot product);
* for each query the top-k train neighbours vote with weights softmax(sim / T), T = 0.07, over those k;
  a class's score is the sum of its neighbours' weights;
* k in {10, 20, 100, 200}, each clipped to the number of train samples (duplicates after clipping are dropped);
* top-1 and top-5 accuracy (top-5 becomes top-min(5, C) with fewer classes); queries are processed in chunks.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

__all__ = ["knn_classify"]


def _check(features: torch.Tensor, labels: torch.Tensor, name: str) -> None:
    if features.ndim != 2 or labels.ndim != 1 or features.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{name}: expected features (n, D) and labels (n,), got {tuple(features.shape)}, {tuple(labels.shape)}"
        )
    if (labels < 0).any():
        raise ValueError(f"{name}: labels must be non-negative class ids (got a label < 0: unlabeled samples?)")


def knn_classify(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    ks: Sequence[int] = (10, 20, 100, 200),
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int = 1024,
) -> dict:
    """Weighted k-NN accuracy -> {"metrics": {top1_k{k}, top5_k{k}}, "details": {...}}.

    train_features (n, D), train_labels (n,), test_features (m, D), test_labels (m,); labels are class ids.
    """
    _check(train_features, train_labels, "train")
    _check(test_features, test_labels, "test")
    n_train = train_features.shape[0]
    num_classes = int(num_classes or int(max(train_labels.max(), test_labels.max())) + 1)
    ks_used = sorted({min(int(k), n_train) for k in ks})
    max_k = ks_used[-1]
    top_n = min(5, num_classes)
    train = F.normalize(train_features.float(), dim=1)  # (n, D)
    train_labels = train_labels.long()
    correct1 = dict.fromkeys(ks_used, 0)
    correct5 = dict.fromkeys(ks_used, 0)
    for start in range(0, test_features.shape[0], chunk_size):
        query = F.normalize(test_features[start : start + chunk_size].float(), dim=1)  # (b, D)
        target = test_labels[start : start + chunk_size].long()
        sims, idx = (query @ train.T).topk(max_k, dim=1)  # (b, max_k), sorted descending
        neighbour_labels = train_labels[idx]  # (b, max_k)
        for k in ks_used:
            weights = torch.softmax(sims[:, :k] / temperature, dim=1)  # (b, k)
            scores = torch.zeros(query.shape[0], num_classes).scatter_add_(1, neighbour_labels[:, :k], weights)
            ranked = scores.topk(top_n, dim=1).indices  # (b, top_n)
            hits = ranked == target[:, None]
            correct1[k] += int(hits[:, 0].sum())
            correct5[k] += int(hits.any(dim=1).sum())
    n_test = test_features.shape[0]
    metrics: dict[str, float] = {}
    for k in ks_used:
        metrics[f"top1_k{k}"] = correct1[k] / n_test
        metrics[f"top5_k{k}"] = correct5[k] / n_test
    # keep the requested names too when a k was clipped, so tables always find top1_k20 etc.
    for k in ks:
        kk = min(int(k), n_train)
        metrics.setdefault(f"top1_k{k}", metrics[f"top1_k{kk}"])
        metrics.setdefault(f"top5_k{k}", metrics[f"top5_k{kk}"])
    details = {
        "ks_requested": list(ks),
        "ks_used": ks_used,
        "temperature": temperature,
        "n_train": n_train,
        "n_test": n_test,
        "num_classes": num_classes,
        "top5_is_top": top_n,
    }
    logger.info("k-NN: %s", {k: round(v, 4) for k, v in metrics.items()})
    return {"metrics": metrics, "details": details}
