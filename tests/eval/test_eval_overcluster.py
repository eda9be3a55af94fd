"""Overclustering (spec 7.6): matching against exhaustive / loop references, and known answers end to end."""

import itertools

import numpy as np
import pytest
import torch
from eval_synth import stripe_scene

from franca.eval.overcluster import (
    cluster_class_counts,
    cluster_miou,
    kmeans_assign,
    match_clusters,
    overcluster_eval,
    overcluster_points,
)


def _pixel_miou(pred, gt, num_classes):
    """Loop reference: pred -1 = unmatched (a miss, never a false positive)."""
    ious = []
    for c in range(num_classes):
        tp = sum(1 for p, g in zip(pred, gt, strict=True) if p == c and g == c)
        fp = sum(1 for p, g in zip(pred, gt, strict=True) if p == c and g != c)
        fn = sum(1 for p, g in zip(pred, gt, strict=True) if p != c and g == c)
        if tp + fp + fn:
            ious.append(tp / (tp + fp + fn))
    return float(np.mean(ious))


def test_hungarian_matches_exhaustive_assignment():
    rng = np.random.default_rng(0)
    for trial in range(5):
        k = c = 4
        clusters, gt = rng.integers(0, k, 200), rng.integers(0, c, 200)
        gt[:5] = 255
        counts = cluster_class_counts(clusters, gt, k, c)
        mapping = match_clusters(counts, "hungarian")
        valid = gt != 255
        best = max(itertools.permutations(range(c)), key=lambda p: sum(counts[i, p[i]] for i in range(k)))
        assert sum(counts[i, mapping[i]] for i in range(k)) == sum(counts[i, best[i]] for i in range(k)), trial
        assert cluster_miou(counts, mapping) == pytest.approx(_pixel_miou(mapping[clusters[valid]], gt[valid], c))


def test_hungarian_with_fewer_classes_leaves_clusters_unmatched():
    clusters = np.array([0, 0, 1, 1, 2, 2])
    gt = np.array([0, 0, 1, 1, 1, 0])
    counts = cluster_class_counts(clusters, gt, 3, 2)
    mapping = match_clusters(counts, "hungarian")
    assert sorted(mapping.tolist()) == [-1, 0, 1]
    assert cluster_miou(counts, mapping) == pytest.approx(_pixel_miou(mapping[clusters], gt, 2))


def test_greedy_many_to_one_matches_a_loop_reference():
    rng = np.random.default_rng(1)
    k, c = 9, 3
    clusters, gt = rng.integers(0, k, 300), rng.integers(0, c, 300)
    counts = cluster_class_counts(clusters, gt, k, c)
    for mode in ("iou", "precision"):
        mapping = match_clusters(counts, mode)
        for j in range(k):
            in_j = clusters == j
            if mode == "iou":
                scores = [np.sum(in_j & (gt == cl)) / np.sum(in_j | (gt == cl)) for cl in range(c)]
            else:
                scores = [np.sum(in_j & (gt == cl)) for cl in range(c)]
            assert mapping[j] == int(np.argmax(scores)), (mode, j)
        assert cluster_miou(counts, mapping) == pytest.approx(_pixel_miou(mapping[clusters], gt, c))


def test_kmeans_recovers_obvious_clusters():
    rng = np.random.default_rng(2)
    centres = np.array([[0, 0], [10, 0], [0, 10]], dtype=np.float32)
    truth = rng.integers(0, 3, 150)
    x = centres[truth] + 0.1 * rng.normal(size=(150, 2)).astype(np.float32)
    assign = kmeans_assign(np.ascontiguousarray(x), 3)
    # same partition up to relabelling: each cluster is exactly one true group
    pairs = {(int(a), int(t)) for a, t in zip(assign, truth, strict=True)}
    assert len(pairs) == 3 and len({a for a, _ in pairs}) == 3


@pytest.mark.parametrize("mode", ["upsample_features", "downsample_masks"])
def test_separable_stripes_give_miou_one(mode):
    tokens, masks = stripe_scene(12, dim=64, seed=0)  # D = 64 > 50: the PCA path runs
    res = overcluster_eval(tokens, masks, 3, k_multipliers=(1, 3), mask_size=16, mode=mode, nredo=2)
    m = res["metrics"]
    assert m["miou"] == m["miou_k3"] == 1.0
    if mode == "downsample_masks":
        assert m["miou_k9"] == 1.0 and m["miou_k9_precision"] == 1.0
    else:  # extra clusters pick up the blended features at stripe borders, which mix two classes
        assert 0.85 < m["miou_k9"] < 1.0 and 0.85 < m["miou_k9_precision"] <= 1.0
    assert res["details"]["dim"] == 50


def test_points_resolution():
    tokens, masks = stripe_scene(2, grid=4, patch=4, dim=8)
    pts, lab = overcluster_points(tokens, masks, mask_size=8)
    assert pts.shape == (2 * 64, 8) and lab.shape == (128,)
    pts, lab = overcluster_points(tokens, masks, mode="downsample_masks")
    assert pts.shape == (32, 8)
    np.testing.assert_array_equal(lab, masks[:, ::4, ::4].reshape(-1).numpy())
    with pytest.raises(ValueError, match="mode"):
        overcluster_points(tokens, masks, mode="bogus")
    assert torch.is_tensor(tokens)
