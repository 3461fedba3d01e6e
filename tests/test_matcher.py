import torch

from retinanet.ops.boxes import box_iou
from retinanet.ops.matcher import Matcher, ignore_crowd


def test_matcher_hand_matrix():
    iou = torch.tensor([[0.9, 0.3, 0.0, 0.1, 0.42],
                        [0.1, 0.45, 0.2, 0.0, 0.41],
                        [0.0, 0.0, 0.35, 0.0, 0.0]])
    matched, labels = Matcher(0.5, 0.4, allow_low_quality=False)(iou)
    assert matched.tolist() == [0, 1, 2, 0, 0]
    assert labels.tolist() == [1, -1, 0, 0, -1]  # 0.9 fg; 0.45 ignored; 0.35 bg; 0.1 bg; 0.42 ignored
    matched, labels = Matcher(0.5, 0.4, allow_low_quality=True)(iou)
    assert matched.tolist() == [0, 1, 2, 0, 0]
    # gt 1's best anchor is 1 (0.45), gt 2's best is anchor 2 (0.35): both promoted
    assert labels.tolist() == [1, 1, 1, 0, -1]


def test_low_quality_ties_and_zero():
    iou = torch.tensor([[0.3, 0.3, 0.1, 0.0],   # tie: anchors 0 and 1 both promoted
                        [0.0, 0.0, 0.0, 0.0]])  # a box with no overlap promotes nothing
    matched, labels = Matcher(0.5, 0.4)(iou)
    assert labels.tolist() == [1, 1, 0, 0]
    assert matched.tolist()[:2] == [0, 0]


def test_low_quality_anchor_keeps_its_own_best_box():
    # anchor 0 is gt 1's best (0.3), but overlaps gt 0 more (0.35): it stays matched to gt 0
    iou = torch.tensor([[0.35, 0.8], [0.3, 0.1]])
    matched, labels = Matcher(0.5, 0.4)(iou)
    assert matched.tolist() == [0, 0] and labels.tolist() == [1, 1]


def test_boundaries():
    iou = torch.tensor([[0.5, 0.4, 0.3999]])
    _, labels = Matcher(0.5, 0.4, allow_low_quality=False)(iou)
    assert labels.tolist() == [1, -1, 0]  # >= 0.5 fg, [0.4, 0.5) ignored, < 0.4 bg


def test_no_ground_truth_is_all_background():
    matched, labels = Matcher()(torch.zeros(0, 7))
    assert labels.tolist() == [0] * 7 and matched.shape == (7,)


def test_chunked_equals_full_matrix():
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(300, 2, generator=g) * 200
    anchors = torch.cat([xy, xy + torch.rand(300, 2, generator=g) * 60 + 4], 1)
    gxy = torch.rand(37, 2, generator=g) * 200
    gt = torch.cat([gxy, gxy + torch.rand(37, 2, generator=g) * 60 + 4], 1)
    gt = torch.cat([gt, gt[:3]])  # duplicate boxes create exact ties
    full = Matcher(0.5, 0.4)(box_iou(gt, anchors))
    chunked = Matcher(0.5, 0.4, chunk_elems=700).match_boxes(gt, anchors)  # 2 boxes per chunk
    assert torch.equal(full[0], chunked[0]) and torch.equal(full[1], chunked[1])


def test_crowd_ignores_background_only():
    anchors = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 10], [50, 50, 60, 60], [0, 0, 10, 20]])
    labels = torch.tensor([0, 1, 0, 0], dtype=torch.int8)
    crowd = torch.tensor([[0.0, 0, 10, 7]])  # covers 70% of anchors 0, 1 and 35% of anchor 3
    out = ignore_crowd(labels, anchors, crowd, 0.7)
    assert out.tolist() == [-1, 1, 0, 0]
