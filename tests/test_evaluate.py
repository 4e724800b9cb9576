"""The evaluation protocol of SPEC 1: metrics on hand-computed cases, modes, and run evaluation."""

from __future__ import annotations

import numpy as np
import pytest

from referseg.evaluate import evaluate_masks, summarize


def _mask(shape, *boxes):
    m = np.zeros(shape, dtype=bool)
    for y0, y1, x0, x1 in boxes:
        m[y0:y1, x0:x1] = True
    return m


def test_hand_computed_two_pairs_of_different_sizes():
    # pair 0 (4x4): prediction rows 0-1 (8 px), target rows 1-2 (8 px): I = 4, U = 12, IoU 1/3
    # pair 1 (3x5): prediction 3 px, target 5 px containing it: I = 3, U = 5, IoU 0.6
    p0, t0 = _mask((4, 4), (0, 2, 0, 4)), _mask((4, 4), (1, 3, 0, 4))
    p1, t1 = _mask((3, 5), (0, 1, 0, 3)), _mask((3, 5), (0, 1, 0, 5))
    result = evaluate_masks([p0, p1], [t0, t1])
    assert result["intersections"].tolist() == [4, 3]
    assert result["unions"].tolist() == [12, 5]
    assert result["overall_iou"] == pytest.approx(7 / 17)
    assert result["mean_iou"] == pytest.approx((1 / 3 + 0.6) / 2)
    assert result["precision@0.5"] == pytest.approx(0.5)
    assert result["precision@0.6"] == pytest.approx(0.5)  # IoU exactly 0.6 counts (>=)
    assert result["precision@0.7"] == 0.0
    assert result["precision@0.9"] == 0.0


def test_perfect_prediction_scores_one_everywhere():
    target = _mask((6, 7), (1, 4, 2, 6))
    result = evaluate_masks([target.copy()], [target])
    assert result["overall_iou"] == 1.0 and result["mean_iou"] == 1.0
    assert all(result[f"precision@{t}"] == 1.0 for t in (0.5, 0.6, 0.7, 0.8, 0.9))


def test_empty_masks():
    empty = np.zeros((5, 5), dtype=bool)
    target = _mask((5, 5), (0, 2, 0, 2))  # 4 pixels
    # (empty, empty): U = 0 -> IoU 1; (empty, target): I 0, U 4 -> IoU 0; (target, empty): IoU 0
    result = evaluate_masks([empty, empty, target], [empty, target, empty])
    assert result["intersections"].tolist() == [0, 0, 0]
    assert result["unions"].tolist() == [0, 4, 4]
    assert result["mean_iou"] == pytest.approx(1 / 3)
    assert result["overall_iou"] == 0.0
    assert result["precision@0.9"] == pytest.approx(1 / 3)
    # only empty pairs: everything is perfect
    only_empty = evaluate_masks([empty], [empty])
    assert only_empty["overall_iou"] == 1.0 and only_empty["precision@0.9"] == 1.0


def test_overall_iou_weights_large_regions_mean_iou_does_not():
    big_t = _mask((10, 10), (0, 10, 0, 10))
    big_p = _mask((10, 10), (0, 9, 0, 10))  # 90 / 100
    small_t = _mask((10, 10), (0, 1, 0, 2))
    small_p = _mask((10, 10), (5, 6, 5, 7))  # 0 / 4
    result = evaluate_masks([big_p, small_p], [big_t, small_t])
    assert result["overall_iou"] == pytest.approx(90 / 104)
    assert result["mean_iou"] == pytest.approx(0.45)


def test_non_boolean_inputs_are_read_as_masks():
    result = evaluate_masks([np.array([[0, 2], [0, 0]])], [np.array([[1.0, 1.0], [0.0, 0.0]])])
    assert result["intersections"].tolist() == [1] and result["unions"].tolist() == [2]


def test_different_lengths_raise():
    with pytest.raises(ValueError, match="2 predictions but 1 targets"):
        evaluate_masks([np.zeros((2, 2), bool)] * 2, [np.zeros((2, 2), bool)])


def test_shape_mismatch_names_the_index_and_both_shapes():
    good = np.zeros((3, 3), dtype=bool)
    with pytest.raises(ValueError, match=r"pair 1: prediction shape \(4, 3\) differs from target shape \(3, 4\)"):
        evaluate_masks([good, np.zeros((4, 3), bool)], [good, np.zeros((3, 4), bool)])


def test_summarize_rejects_no_samples():
    with pytest.raises(ValueError, match="no samples"):
        summarize([], [])
