"""Batched target assignment (padded boxes + masks) == matching each image on its own.

The reference below is the per-image algorithm RetinaNet used before it was batched: each image's
non-crowd boxes alone, the full IoU matrix, argmax, the low-quality rule, then the crowd IoA rule.
"""

import pytest
import torch

from retinanet.modeling import build_model
from retinanet.ops.boxes import box_ioa, box_iou
from retinanet.ops.matcher import Matcher, pad_targets

from conftest import tiny_config


def per_image_reference(anchors, targets, high=0.5, low=0.4, crowd_ioa=0.7):
    labels, boxes, classes = [], [], []
    for t in targets:
        gt = t["boxes"].float().reshape(-1, 4)
        cls = t["labels"].reshape(-1)
        crowd = t.get("iscrowd", torch.zeros(len(gt), dtype=torch.bool)).bool()
        real, real_cls, crowd_boxes = gt[~crowd], cls[~crowd], gt[crowd]
        if len(real) == 0:
            lab = torch.zeros(len(anchors), dtype=torch.int8)
            matched_boxes, matched_cls = torch.zeros(len(anchors), 4), torch.zeros(len(anchors), dtype=torch.int64)
        else:
            iou = box_iou(real, anchors)  # (G, N)
            best, matched = iou.max(dim=0)
            lab = torch.full((len(anchors),), -1, dtype=torch.int8)
            lab[best < low] = 0
            lab[best >= high] = 1
            gt_best = iou.max(dim=1, keepdim=True).values
            lab[((iou == gt_best) & (gt_best > 0)).any(dim=0)] = 1
            matched_boxes, matched_cls = real[matched], real_cls[matched]
        if len(crowd_boxes):
            covered = box_ioa(anchors, crowd_boxes).amax(dim=1) >= crowd_ioa
            lab[covered & (lab == 0)] = -1
        labels.append(lab)
        boxes.append(matched_boxes)
        classes.append(matched_cls)
    return torch.stack(labels), torch.stack(boxes), torch.stack(classes)


def random_targets(g: torch.Generator, counts, crowd_prob=0.25, with_crowd=True):
    targets = []
    for n in counts:
        xy = torch.rand(n, 2, generator=g) * 100
        boxes = torch.cat([xy, xy + 6 + torch.rand(n, 2, generator=g) * 70], dim=1)
        if n >= 3:
            boxes[2] = boxes[0]  # a duplicate: exact ties in IoU, the first box must win
        t = {"boxes": boxes, "labels": torch.randint(0, 3, (n,), generator=g)}
        if with_crowd:
            t["iscrowd"] = torch.rand(n, generator=g) < crowd_prob
        targets.append(t)
    return targets


@pytest.fixture(scope="module")
def anchors():
    model = build_model(tiny_config())
    batch = model.preprocess([torch.rand(3, 128, 160)], resize=False).tensor
    return model.forward_features(batch)[2]  # (N, 4)


@pytest.mark.parametrize("chunk_elems", [1 << 24, 5000])  # one IoU block, and a few boxes at a time
@pytest.mark.parametrize("seed", range(6))
def test_batched_assignment_equals_per_image(anchors, seed, chunk_elems):
    g = torch.Generator().manual_seed(seed)
    counts = [0, 1, 7, 3] if seed % 2 else torch.randint(0, 14, (5,), generator=g).tolist()
    targets = random_targets(g, counts, with_crowd=seed != 4)
    if seed == 5:
        targets[1]["iscrowd"][:] = True  # an image whose only boxes are crowd regions
    model = build_model(tiny_config())
    model.matcher = Matcher(0.5, 0.4, chunk_elems=chunk_elems)
    labels, boxes, classes = model.assign_targets(anchors, targets)
    ref = per_image_reference(anchors, targets)
    assert labels.dtype == torch.int8 and classes.dtype == torch.int64
    assert torch.equal(labels, ref[0])
    assert torch.equal(boxes, ref[1])
    assert torch.equal(classes, ref[2])
    assert (labels == 1).sum() > 0 and (labels == -1).sum() > 0  # the cases are not trivial


def test_ties_go_to_the_first_box(anchors):
    box = torch.tensor([[20.0, 20, 80, 90]])
    target = {"boxes": torch.cat([box, box]), "labels": torch.tensor([2, 1])}
    labels, boxes, classes = build_model(tiny_config()).assign_targets(anchors, [target])
    fg = labels[0] == 1
    assert fg.sum() > 0 and (classes[0][fg] == 2).all()


def test_a_batch_without_any_box_is_all_background(anchors):
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    labels, boxes, classes = build_model(tiny_config()).assign_targets(anchors, [empty, empty])
    assert labels.shape == (2, len(anchors)) and (labels == 0).all()
    assert (boxes == 0).all() and (classes == 0).all()


def test_pad_targets_masks():
    targets = [{"boxes": torch.tensor([[0.0, 0, 1, 1], [2, 2, 3, 3]]), "labels": torch.tensor([4, 5]),
                "iscrowd": torch.tensor([0, 1])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]
    boxes, labels, real, crowd = pad_targets(targets)
    assert boxes.shape == (2, 2, 4) and boxes[1].abs().sum() == 0
    assert labels.tolist() == [[4, 5], [0, 0]]
    assert real.tolist() == [[True, False], [False, False]]
    assert crowd.tolist() == [[False, True], [False, False]]
    assert pad_targets([{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0)}])[3] is None  # no "iscrowd"
