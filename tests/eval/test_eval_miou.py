"""Confusion-matrix mIoU against a hand-computed case."""

import numpy as np
import pytest

from franca.eval.miou import confusion_matrix, iou_from_confusion, miou_from_confusion, segmentation_scores


def test_hand_computed_confusion_and_iou():
    target = np.array([[0, 0, 1, 1], [2, 2, 255, 1]])
    pred = np.array([[0, 1, 1, 1], [2, 0, 2, 2]])
    conf = confusion_matrix(pred, target, num_classes=4)
    # rows = gt, cols = pred; the 255 pixel is dropped
    expected = np.array([[1, 1, 0, 0], [0, 2, 1, 0], [1, 0, 1, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(conf, expected)
    iou = iou_from_confusion(conf)
    # class 0: tp 1, fp 1 (gt 2 -> 0), fn 1 -> 1/3; class 1: tp 2, fp 1, fn 1 -> 2/4; class 2: tp 1, fp 1, fn 1 -> 1/3
    np.testing.assert_allclose(iou[:3], [1 / 3, 1 / 2, 1 / 3])
    assert np.isnan(iou[3])  # absent everywhere: skipped by the mean
    assert miou_from_confusion(conf) == pytest.approx((1 / 3 + 1 / 2 + 1 / 3) / 3)
    scores = segmentation_scores(conf)
    assert scores["pixel_acc"] == pytest.approx(4 / 7)
    assert scores["per_class_iou"][3] is None


def test_perfect_segmentation_gives_one():
    rng = np.random.default_rng(0)
    target = rng.integers(0, 5, (3, 16, 16))
    target[0, :2] = 255
    pred = np.where(target == 255, 0, target)
    assert miou_from_confusion(confusion_matrix(pred, target, 5)) == 1.0


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="pixels"):
        confusion_matrix(np.zeros(3), np.zeros(4), 2)
    with pytest.raises(ValueError, match="predicted"):
        confusion_matrix(np.array([5]), np.array([0]), 2)
    with pytest.raises(ValueError, match="target"):
        confusion_matrix(np.array([0]), np.array([7]), 2)
