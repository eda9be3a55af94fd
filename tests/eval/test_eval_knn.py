"""k-NN (spec 7.1): separable -> 100%, random -> chance, and a brute-force voting reference."""

import numpy as np
import torch
from eval_synth import binomial_bound, random_features, separable

from franca.eval.knn import knn_classify


def test_separable_classes_are_perfect_for_every_k():
    tr_x, tr_y = separable(10, 4, seed=0)
    te_x, te_y = separable(25, 4, seed=1)
    res = knn_classify(tr_x, tr_y, te_x, te_y)
    assert res["details"]["ks_used"] == [10, 20, 40]  # 100 and 200 clipped to the 40 train samples
    for k in (10, 20, 100, 200):
        assert res["metrics"][f"top1_k{k}"] == 1.0
        assert res["metrics"][f"top5_k{k}"] == 1.0


def test_random_features_give_chance():
    tr_x, tr_y = random_features(1000, 5, seed=0)
    te_x, te_y = random_features(1000, 5, seed=1)
    res = knn_classify(tr_x, tr_y, te_x, te_y, chunk_size=128)
    for k in (10, 20, 100, 200):
        assert abs(res["metrics"][f"top1_k{k}"] - 0.2) < binomial_bound(1000, 0.2), res["metrics"]
    assert res["metrics"]["top5_k20"] == 1.0  # 5 classes: top-5 covers them all


def _reference(tr_x, tr_y, te_x, k, temperature, num_classes):
    """Loop over queries: cosine sims, sort, softmax over the top k, per-class sums, argmax."""
    tr = tr_x.numpy() / np.linalg.norm(tr_x.numpy(), axis=1, keepdims=True)
    preds = []
    for q in te_x.numpy():
        sims = tr @ (q / np.linalg.norm(q))
        order = np.argsort(-sims, kind="stable")[:k]
        w = np.exp(sims[order] / temperature)
        w /= w.sum()
        votes = np.zeros(num_classes)
        for j, wj in zip(order, w, strict=True):
            votes[tr_y[j]] += wj
        preds.append(int(np.argmax(votes)))
    return np.array(preds)


def test_matches_brute_force_voting():
    tr_x, tr_y = random_features(60, 6, dim=5, seed=3)
    te_x, te_y = random_features(40, 6, dim=5, seed=4)
    for k in (3, 10):
        pred = _reference(tr_x, tr_y, te_x, k, 0.07, 6)
        res = knn_classify(tr_x, tr_y, te_x, te_y, ks=(k,), num_classes=6, chunk_size=7)
        assert res["metrics"][f"top1_k{k}"] == float(np.mean(pred == te_y.numpy()))


def test_unlabeled_samples_raise():
    x, y = random_features(10, 2)
    y[0] = -1
    try:
        knn_classify(x, y, x, y.clamp_min(0))
    except ValueError as err:
        assert "label" in str(err)
    else:
        raise AssertionError("expected a ValueError for a -1 label")
    assert torch.is_tensor(x)
