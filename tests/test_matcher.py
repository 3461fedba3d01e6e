import pytest
import torch

from retinanet.ops.boxes import box_iou
from retinanet.ops.matcher import Matcher, check_labels, ignore_crowd, match_targets, pad_targets


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


def random_anchors(g, n, extent=120.0):
    xy = torch.rand(n, 2, generator=g) * extent
    return torch.cat([xy, xy + 4 + torch.rand(n, 2, generator=g) * 50], 1)


@pytest.mark.parametrize("allow_low_quality", [False, True])
@pytest.mark.parametrize("chunk_elems", [1 << 24, 300])  # one IoU block, and one box of every image at a time
def test_each_images_own_anchors_equal_matching_each_image_alone(allow_low_quality, chunk_elems):
    """Anchors (B, N, 4), one set per image (the RoI heads' proposals, padded with zero boxes), give each
    image what match_targets gives it alone with its (N, 4): crowd boxes, an image without boxes, an image
    with only crowd boxes, duplicate boxes (ties: the first wins)."""
    g = torch.Generator().manual_seed(0)
    targets = []
    for m, crowd in ((4, [0, 1, 0, 0]), (0, []), (3, [1, 1, 1]), (5, [0, 0, 0, 1, 0])):
        boxes = random_anchors(g, m)
        if m >= 3:
            boxes[2] = boxes[0]
        targets.append({"boxes": boxes, "labels": torch.randint(0, 4, (m,), generator=g),
                        "iscrowd": torch.tensor(crowd, dtype=torch.bool)})
        if m == 5:  # a crowd box over some anchors of this image
            targets[-1]["boxes"][3] = torch.tensor([0.0, 0, 120, 60])
    anchors = torch.stack([random_anchors(g, 90) for _ in targets])  # (B, N, 4)
    anchors[1, 70:] = anchors[3, 80:] = 0  # padding, as the RoI heads give it
    matcher = Matcher(0.5, 0.4, allow_low_quality=allow_low_quality, chunk_elems=chunk_elems)
    labels, boxes, classes = match_targets(matcher, anchors, targets, 0.7)
    for i, t in enumerate(targets):
        one = match_targets(matcher, anchors[i], [t], 0.7)
        assert torch.equal(labels[i], one[0][0]) and torch.equal(boxes[i], one[1][0]) and torch.equal(classes[i], one[2][0])
    assert (labels == 1).any() and (labels == -1).any() and not labels[1].any() and not labels[2].any()
    assert torch.equal(match_targets(matcher, anchors, targets, 0.7, padded=pad_targets(targets))[0], labels)


def test_check_labels_names_the_first_bad_image():
    check_labels(torch.tensor([0, 2, 1]), 3, "image 0")
    check_labels(torch.zeros(0, dtype=torch.int64), 3, "image 0")
    with pytest.raises(ValueError, match=r"^image 4 \(image id 17\): labels must be in 0..2, got \[0, 3\]$"):
        check_labels(torch.tensor([0, 3]), 3, "image 4 (image id 17)")
    with pytest.raises(ValueError, match=r"labels must be in 0..2, got \[-1\]"):
        check_labels(torch.tensor([-1]), 3, "image 0")
    # a padded batch: padding (and crowd) entries are not labels; the first image with a bad one is named
    labels = torch.tensor([[0, 9, 0], [1, 2, 5], [7, 0, 0]])
    valid = torch.tensor([[True, False, False], [True, True, True], [True, False, False]])
    with pytest.raises(ValueError, match=r"^b: labels must be in 0..2, got \[1, 2, 5\]$"):
        check_labels(labels, 3, ["a", "b", "c"], valid=valid)
    check_labels(labels[:1], 3, ["a"], valid=valid[:1])


def test_chunk_limit_by_device():
    """The IoU block matching computes at a time: cache-sized on the CPU, large on a GPU, a given value always."""
    from retinanet.ops.matcher import chunk_limit

    assert chunk_limit(torch.device("cpu")) == 1 << 20
    assert chunk_limit(torch.device("cuda")) == chunk_limit("cuda:1") == 1 << 24
    assert chunk_limit("cpu", 700) == 700


def test_default_blocks_equal_one_block_on_a_dense_problem():
    """20 boxes in each of 8 images against 8,000 anchors: 1.28 M IoU values, more than the CPU's block (16 boxes
    of 8 images at a time, two blocks): the same matches and labels as one block."""
    g = torch.Generator().manual_seed(0)
    xy, wh = torch.rand(8000, 2, generator=g) * 200, 4 + torch.rand(8000, 2, generator=g) * 60
    anchors = torch.cat([xy, xy + wh], 1)
    gxy, gwh = torch.rand(8, 20, 2, generator=g) * 200, 4 + torch.rand(8, 20, 2, generator=g) * 60
    gt, valid = torch.cat([gxy, gxy + gwh], 2), torch.rand(8, 20, generator=g) > 0.2
    one = Matcher(0.5, 0.4, chunk_elems=1 << 30).match_boxes(gt, anchors, valid)
    default = Matcher(0.5, 0.4).match_boxes(gt, anchors, valid)
    assert torch.equal(one[0], default[0]) and torch.equal(one[1], default[1])
    assert (one[1] == 1).sum() > 50  # foreground matches exist
