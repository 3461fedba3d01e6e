"""The one helper that compares detections across code paths (tests/detection_match.py) fails when it should."""

import numpy as np
import pytest
import torch

from detection_match import assert_same_coco_results, assert_same_detections


def _dets(scores, labels, boxes=None):
    n = len(scores)
    if boxes is None:
        boxes = [[10.0 * i, 0.0, 10.0 * i + 5, 5.0] for i in range(n)]
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "scores": torch.tensor(scores, dtype=torch.float32), "labels": torch.tensor(labels)}


def test_a_swap_of_near_equal_scores_passes_and_is_counted():
    expected = _dets([0.9, 0.5000001, 0.5, 0.1], [0, 1, 2, 0])
    # the two near-equal detections in the other order, the scores still falling (as a model outputs them)
    actual = {k: v[[0, 2, 1, 3]] for k, v in expected.items()}
    actual["scores"] = expected["scores"].clone()
    report = assert_same_detections(actual, expected, score_atol=1e-6)
    assert len(report.pairs) == 4 and report.swapped == 2


def test_each_difference_fails():
    expected = _dets([0.9, 0.6, 0.3], [0, 1, 2])
    other_label = dict(expected, labels=torch.tensor([0, 2, 2]))
    with pytest.raises(AssertionError, match="1 expected detection"):
        assert_same_detections(other_label, expected)
    moved = dict(expected, boxes=expected["boxes"] + torch.tensor([0.0, 0.0, 0.01, 0.0]))
    with pytest.raises(AssertionError, match="without a partner"):
        assert_same_detections(moved, expected, box_atol=1e-3)
    assert assert_same_detections(moved, expected, box_atol=0.02).max_box_diff == pytest.approx(0.01, abs=1e-5)
    rescored = dict(expected, scores=torch.tensor([0.9, 0.6001, 0.3]))
    with pytest.raises(AssertionError):
        assert_same_detections(rescored, expected, score_atol=1e-5)
    missing = {k: v[[0, 2]] for k, v in expected.items()}  # the middle one: not at the cut
    with pytest.raises(AssertionError, match="1 expected detection"):
        assert_same_detections(missing, expected)
    with pytest.raises(AssertionError, match="1 actual detection"):
        assert_same_detections(expected, missing)


def test_one_to_one_even_where_greedy_would_fail():
    """Two expected detections both close to the first actual one: a greedy pass would give the first
    expected the nearest partner and leave the second without one."""
    boxes = [[0.0, 0.0, 10.0, 10.0]] * 2
    expected = _dets([0.50002, 0.50000], [1, 1], boxes)
    actual = _dets([0.50001, 0.49999], [1, 1], boxes)
    assert len(assert_same_detections(actual, expected, score_atol=2e-5).pairs) == 2


def test_a_detection_at_the_cut_may_be_missing_on_one_side_only_with_cut_slack():
    # a cap of 3: the 3rd and a 4th detection tie within rounding; each path kept another one
    expected = _dets([0.9, 0.6, 0.30000003], [0, 1, 2])
    actual = _dets([0.9, 0.6, 0.3], [0, 1, 1], [[0, 0, 5, 5], [10, 0, 15, 5], [70, 0, 75, 5]])
    assert len(assert_same_detections(actual, expected, score_atol=1e-6).pairs) == 2
    with pytest.raises(AssertionError):
        assert_same_detections(actual, expected, score_atol=1e-6, cut_slack=False)


def test_arrays_and_coco_results_compare_alike():
    expected = [{"image_id": 7, "category_id": 3, "bbox": [1.0, 2.0, 3.0, 4.0], "score": 0.8},
                {"image_id": 7, "category_id": 1, "bbox": [5.0, 5.0, 1.0, 1.0], "score": 0.79999995},
                {"image_id": 7, "category_id": 2, "bbox": [9.0, 9.0, 3.0, 3.0], "score": 0.3},
                {"image_id": 9, "category_id": 1, "bbox": [0.0, 0.0, 2.0, 2.0], "score": 0.5}]
    actual = [expected[1], expected[0], *expected[2:]]
    assert_same_coco_results(actual, expected, score_atol=1e-6)
    with pytest.raises(AssertionError, match="image 7"):
        assert_same_coco_results([dict(expected[0], category_id=2)] + expected[1:], expected)
    numpy_side = {"boxes": np.array([[1.0, 2.0, 4.0, 6.0]]), "scores": np.array([0.8]), "labels": np.array([3])}
    assert len(assert_same_detections(numpy_side, _dets([0.8], [3], [[1.0, 2.0, 4.0, 6.0]])).pairs) == 1
