"""The Fast R-CNN box head: RoI labels and losses by hand, detections by hand, batched == per image, and
torchvision's RPN + RoIHeads with the same weights (proposals, detections, losses)."""

import math
from collections import OrderedDict

import pytest
import torch

from retinanet.modeling.roi_heads import FastRCNNPredictor, RoIHeads, TwoMLPHead
from retinanet.modeling.rpn import RPNHead, RegionProposalNetwork, rpn_anchor_generator
from retinanet.ops.poolers import as_rois, boxes_to_rois, concat_images, split_images
from detection_match import assert_same_detections

try:
    from torchvision.models.detection import fasterrcnn_resnet50_fpn
    from torchvision.models.detection.image_list import ImageList
    from torchvision.ops import nms

    nms(torch.zeros(1, 4), torch.zeros(1), 0.5)
except Exception:
    fasterrcnn_resnet50_fpn = None
needs_tv = pytest.mark.skipif(fasterrcnn_resnet50_fpn is None, reason="torchvision not importable")

# Boxes: gt0 [0, 0, 10, 10] class 2, gt1 [20, 20, 30, 30] class 0. Proposals and their IoU:
#   p0 [0, 0, 10, 8]    0.8 with gt0  -> foreground, label 2 + 1 = 3
#   p1 [0, 0, 10, 4]    0.4 with gt0  -> background (< 0.5)
#   p2 [20, 20, 30, 26] 0.6 with gt1  -> label 0 + 1 = 1
#   p3 [50, 50, 60, 60] 0             -> background
# and the two boxes themselves, appended as proposals: labels 3, 1.
GT = {"boxes": torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30]]), "labels": torch.tensor([2, 0])}
PROPOSALS = torch.tensor([[0.0, 0, 10, 8], [0, 0, 10, 4], [20, 20, 30, 26], [50, 50, 60, 60]])
ONE_IMAGE = torch.zeros(4, dtype=torch.int64)  # the image of each proposal


def make_heads(channels=4, num_classes=3, **kwargs):
    return RoIHeads(TwoMLPHead(channels * 49, 16), FastRCNNPredictor(16, num_classes + 1), num_classes=num_classes,
                    **kwargs)


def test_roi_labels_by_hand():
    heads = make_heads()
    assert (heads.min_level, heads.max_level) == (2, 5)  # strides 4..32
    rois, labels, matched = heads.sample(PROPOSALS, ONE_IMAGE, [GT])
    assert labels.tolist() == [3, 0, 1, 0, 3, 1]
    assert torch.equal(rois[:, 1:], torch.cat([PROPOSALS, GT["boxes"]])) and not rois[:, 0].any()
    assert torch.equal(matched[labels > 0], GT["boxes"][[0, 1, 0, 1]])
    # 4 RoIs per image, at most 25% foreground: 1 foreground, 3 background
    heads.batch_size_per_image = 4
    _, labels, _ = heads.sample(PROPOSALS, ONE_IMAGE, [GT])
    assert (labels > 0).sum().item() == 1 and (labels == 0).sum().item() == 2  # only 2 backgrounds exist
    # a crowd box over p3 makes it ignored; crowd boxes are not added as proposals
    crowd = {"boxes": torch.cat([GT["boxes"], torch.tensor([[48.0, 48, 62, 62]])]), "labels": torch.tensor([2, 0, 1]),
             "iscrowd": torch.tensor([0, 0, 1])}
    heads.batch_size_per_image = 512
    rois, labels, _ = heads.sample(PROPOSALS, ONE_IMAGE, [crowd])
    assert labels.tolist() == [3, 0, 1, 3, 1] and rois.shape[0] == 5
    with pytest.raises(ValueError, match="image 0: labels must be in 0..2"):
        heads.sample(PROPOSALS, ONE_IMAGE, [{"boxes": GT["boxes"], "labels": torch.tensor([3, 0])}])


def test_losses_by_hand():
    heads = make_heads()
    rois, labels, matched = heads.sample(PROPOSALS, ONE_IMAGE, [GT])
    k1 = heads.num_classes + 1
    losses = heads.losses(torch.zeros(6, k1), torch.zeros(6, 4 * k1), rois[:, 1:], labels, matched)
    assert losses["roi_cls"].item() == pytest.approx(math.log(k1))  # uniform over K + 1 classes

    def sl1(d, beta=1 / 9):
        return 0.5 * d * d / beta if abs(d) < beta else abs(d) - 0.5 * beta

    # targets with weights (10, 10, 5, 5): p0 -> gt0: dy = 10 (5 - 4) / 8, dh = 5 log(10 / 8);
    # p2 -> gt1: dy = 10 (25 - 23) / 6, dh = 5 log(10 / 6); the boxes themselves: 0. Over 6 sampled RoIs.
    box = sl1(10 / 8) + sl1(5 * math.log(10 / 8)) + sl1(20 / 6) + sl1(5 * math.log(10 / 6))
    assert losses["roi_box"].item() == pytest.approx(box / 6, rel=1e-5)
    giou = make_heads(box_loss="giou").losses(torch.zeros(6, k1), torch.zeros(6, 4 * k1), rois[:, 1:], labels, matched)
    assert giou["roi_box"].item() == pytest.approx((0.2 + 0.4) / 6, rel=1e-5)  # 1 - IoU for nested boxes


def test_image_without_boxes():
    heads = make_heads()
    feats = [torch.randn(2, 4, 64 // s, 64 // s) for s in (4, 8, 16, 32)]
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    losses = heads.forward_train(feats, *concat_images([PROPOSALS, PROPOSALS[:2]]), [empty, empty])
    assert losses["roi_box"].item() == 0.0 and torch.isfinite(losses["roi_cls"])
    losses = heads.forward_train(feats, *concat_images([PROPOSALS, PROPOSALS[:2]]), [GT, empty])
    assert losses["roi_box"].item() > 0 and torch.isfinite(losses["roi_cls"])
    (losses["roi_cls"] + losses["roi_box"]).backward()
    assert heads.box_head.fc6.weight.grad.abs().sum() > 0
    # no proposals and no boxes at all: nothing sampled, both losses 0 (not NaN)
    losses = heads.forward_train(feats, *concat_images([torch.zeros(0, 4)] * 2), [empty, empty])
    assert losses["roi_cls"].item() == 0.0 and losses["roi_box"].item() == 0.0


def test_detections_by_hand():
    heads = make_heads(num_classes=2)
    proposals, image = torch.tensor([[0.0, 0, 10, 10], [1, 1, 11, 11]]), torch.zeros(2, dtype=torch.int64)
    # softmax: roi 0 -> [0.2, 0.6, 0.2], roi 1 -> [0.25, 0.25, 0.5] (background first)
    logits = torch.tensor([[0.0, math.log(3), 0], [0, 0, math.log(2)]])
    deltas = torch.zeros(2, 12)  # boxes = proposals, clipped to the 8 x 100 image: [0, 0, 10, 8], [1, 1, 11, 8]
    # class 0: roi 0 (0.6) suppresses roi 1 (0.25): IoU 63 / 87 = 0.72 > 0.5; class 1: roi 1 (0.5) suppresses roi 0 (0.2)
    det = heads.postprocess(logits, deltas, proposals, image, [(8, 100)])[0]
    assert det["labels"].tolist() == [0, 1]
    assert torch.allclose(det["scores"], torch.tensor([0.6, 0.5]))
    assert det["boxes"].tolist() == [[0.0, 0, 10, 8], [1, 1, 11, 8]]
    assert heads.postprocess(logits, deltas, proposals, image, [(8, 100)], score_thresh=0.55)[0]["labels"].tolist() == [0]
    assert heads.postprocess(logits, deltas, proposals, image, [(8, 100)], detections_per_image=1)[0]["labels"].tolist() == [0]
    only_1 = heads.postprocess(logits, deltas, proposals, image, [(8, 100)], keep_classes=torch.tensor([False, True]))[0]
    assert only_1["labels"].tolist() == [1] and only_1["scores"].tolist() == pytest.approx([0.5])
    # without NMS overlap (threshold 0.8) all four (roi, class) pairs above 0.05 remain, by score
    assert heads.postprocess(logits, deltas, proposals, image, [(8, 100)], nms_thresh=0.8)[0]["scores"].tolist() == \
        pytest.approx([0.6, 0.5, 0.25, 0.2])
    # a box regression: dx = 10 * 0.1 moves class 0's box of roi 0 by one width (10 px) to the right
    deltas[0, 4] = 10.0
    assert heads.postprocess(logits, deltas, proposals, image, [(8, 100)])[0]["boxes"][0].tolist() == \
        pytest.approx([10.0, 0, 20, 8])
    none = heads.postprocess(torch.zeros(0, 3), torch.zeros(0, 12), *concat_images([torch.zeros(0, 4)]), [(8, 100)])[0]
    assert none["boxes"].shape == (0, 4)


def test_batched_equals_per_image():
    torch.manual_seed(2)
    heads = make_heads(channels=4, num_classes=3).eval()
    for p in heads.parameters():
        torch.nn.init.normal_(p, std=0.3)
    feats = [torch.randn(2, 4, 128 // s, 160 // s) for s in (4, 8, 16, 32)]
    proposals, sizes = [], [(128, 140), (100, 160)]
    for n in (60, 35):
        xy = torch.rand(n, 2) * 100
        proposals.append(torch.cat([xy, xy + torch.rand(n, 2) * 60 + 2], 1))
    batch = heads.postprocess(*heads.predict(feats, boxes_to_rois(proposals)), *concat_images(proposals), sizes)
    for i in range(2):
        one = [f[i:i + 1] for f in feats]
        alone = heads.postprocess(*heads.predict(one, boxes_to_rois(proposals[i:i + 1])),
                                  *concat_images(proposals[i:i + 1]), sizes[i:i + 1])[0]
        assert batch[i]["boxes"].shape[0] > 10
        assert_same_detections(batch[i], alone, score_atol=1e-6, box_atol=1e-4)


def per_image_sample(heads, proposals, image, targets):
    """`RoIHeads.sample` as it was before `match_targets` served it: one matching per image. The reference."""
    from retinanet.ops.boxes import box_iou
    from retinanet.ops.matcher import BACKGROUND, FOREGROUND, ignore_crowd, split_crowd
    from retinanet.ops.sampler import sample_balanced

    boxes, labels, matched = [], [], []
    for i, (props, t) in enumerate(zip(split_images(proposals, image, len(targets)), targets)):
        gt, gt_cls, crowd = split_crowd(t)
        if gt_cls.numel() and (gt_cls.min() < 0 or gt_cls.max() >= heads.num_classes):
            raise ValueError(f"image {i}: labels must be in 0..{heads.num_classes - 1}, got {gt_cls.tolist()}")
        props = torch.cat([props.float(), gt])
        idx, lab = heads.matcher(box_iou(gt, props))
        lab = ignore_crowd(lab, props, crowd, heads.crowd_ioa)
        if gt.shape[0] == 0:
            gt, gt_cls = props.new_zeros(1, 4), gt_cls.new_zeros(1)
        cls = torch.where(lab == FOREGROUND, gt_cls[idx] + 1, torch.where(lab == BACKGROUND, 0 * idx, -1 + 0 * idx))
        boxes.append(props), labels.append(cls), matched.append(gt[idx])
    counts = [b.shape[0] for b in boxes]
    padded = torch.full((len(boxes), max(counts)), -1, dtype=torch.int64)
    for i, lab in enumerate(labels):
        padded[i, :lab.numel()] = lab
    keep = sample_balanced(padded, heads.batch_size_per_image, heads.positive_fraction)
    img, idx = torch.nonzero(keep, as_tuple=True)
    flat = torch.tensor([0] + counts[:-1]).cumsum(0)[img] + idx
    return as_rois(torch.cat(boxes)[flat], img), torch.cat(labels)[flat], torch.cat(matched)[flat]


def random_case(g, counts, num_boxes, num_classes=3):
    """Proposals (counts[i] for image i, some 0) and targets (num_boxes[i] boxes, some crowd, some 0, a
    duplicate box of another class for exact IoU ties, boxes that tie at IoU 0.5 with a proposal, a
    proposal inside a crowd box)."""
    proposals, targets = [], []
    for n, m in zip(counts, num_boxes):
        xy = torch.rand(m, 2, generator=g) * 80
        gt = torch.cat([xy, xy + 8 + torch.rand(m, 2, generator=g) * 40], 1)
        cls = torch.randint(0, num_classes, (m,), generator=g)
        if m >= 3:
            gt[2], cls[2] = gt[0], (cls[0] + 1) % num_classes  # the same box twice: the first must win
        pxy = torch.rand(n, 2, generator=g) * 100
        props = torch.cat([pxy, pxy + 2 + torch.rand(n, 2, generator=g) * 50], 1)
        if m >= 1 and n >= 4:  # [x0, x0 + 2w] with the box [x0, x0 + w] and its right neighbour: IoU 0.5 with both
            x0, y0, x1, y1 = gt[0].tolist()
            props[3] = torch.tensor([x0, y0, 2 * x1 - x0, y1])
            if m >= 2:
                gt[1], cls[1] = torch.tensor([x1, y0, 2 * x1 - x0, y1]), (cls[0] + 2) % num_classes
        crowd = torch.rand(m, generator=g) < 0.3
        if crowd.any() and n >= 6:  # a proposal inside a crowd box: ignored unless a box claims it
            props[5] = gt[crowd][0] + torch.tensor([1.0, 1, -1, -1])
        proposals.append(props)
        targets.append({"boxes": gt, "labels": cls, "iscrowd": crowd})
    return proposals, targets


@pytest.mark.parametrize("seed", range(6))
def test_batched_sampling_equals_per_image_sampling(seed):
    """`sample` on the whole batch (`match_targets`, no loop over images) == the per-image matching it
    replaced, bitwise and with the same random draws: crowd boxes, images without boxes or without
    proposals, duplicate boxes and IoU ties at the foreground threshold, fewer and more RoIs than sampled."""
    g = torch.Generator().manual_seed(seed)
    counts = [int(c) for c in torch.randint(0, 40, (4,), generator=g)]
    counts[seed % 4] = 0 if seed % 2 else counts[seed % 4]
    num_boxes = [int(c) for c in torch.randint(0, 6, (4,), generator=g)]
    num_boxes[(seed + 1) % 4] = 0
    proposals, targets = random_case(g, counts, num_boxes)
    heads = make_heads(batch_size_per_image=16 if seed % 3 == 0 else 512)
    if seed == 5:  # no crowd flags at all, as a dataset without "iscrowd"
        targets = [{k: v for k, v in t.items() if k != "iscrowd"} for t in targets]
    flat, image = concat_images(proposals)
    torch.manual_seed(seed)
    rois, labels, matched = heads.sample(flat, image, targets)
    torch.manual_seed(seed)
    ref_rois, ref_labels, ref_matched = per_image_sample(heads, flat, image, targets)
    assert torch.equal(rois, ref_rois) and torch.equal(labels, ref_labels) and torch.equal(matched, ref_matched)
    assert (labels > 0).any() and (labels == 0).any()


def test_batched_sampling_handles_ties_crowd_and_empty_images_by_hand():
    """The cases of the random test, by hand: image 0 has GT and a crowd box; image 1 no boxes; image 2
    two boxes that a proposal overlaps with IoU exactly 0.5 each (the first box wins), and no proposals
    of its own besides that one."""
    crowd = {"boxes": torch.cat([GT["boxes"], torch.tensor([[48.0, 48, 62, 62]])]), "labels": torch.tensor([2, 0, 1]),
             "iscrowd": torch.tensor([0, 0, 1])}
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "iscrowd": torch.zeros(0)}
    tie = {"boxes": torch.tensor([[0.0, 0, 10, 10], [10, 0, 20, 10]]), "labels": torch.tensor([1, 2]),
           "iscrowd": torch.tensor([0, 0])}
    flat, image = concat_images([PROPOSALS, PROPOSALS[:2], torch.tensor([[0.0, 0, 20, 10]])])
    rois, labels, matched = make_heads().sample(flat, image, [crowd, empty, tie])
    assert rois[:, 0].tolist() == [0] * 5 + [1] * 2 + [2] * 3
    assert labels.tolist() == [3, 0, 1, 3, 1] + [0, 0] + [2, 2, 3]  # p3 ignored (crowd); 0.5 ties: the first box
    assert torch.equal(rois[7:, 1:], torch.tensor([[0.0, 0, 20, 10], [0, 0, 10, 10], [10, 0, 20, 10]]))
    assert torch.equal(matched[7:], tie["boxes"][[0, 0, 1]])
    with pytest.raises(ValueError, match=r"image 2: labels must be in 0..2, got \[1, 3\]"):
        make_heads().sample(flat, image, [crowd, empty, dict(tie, labels=torch.tensor([1, 3]))])
    with pytest.raises(ValueError, match="image 1: 0 boxes but 1 labels"):
        make_heads().sample(flat, image, [crowd, dict(empty, labels=torch.tensor([0])), tie])


def torchvision_pair(num_classes=5, std=0.05, pool_backend=None):
    """torchvision's fasterrcnn_resnet50_fpn RPN and RoI heads (random weights, spread out so that
    proposals and scores differ) and ours with the same weights, built with our defaults."""
    tv = fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=num_classes + 1)
    for module in (tv.rpn.head, tv.roi_heads.box_head, tv.roi_heads.box_predictor):
        for p in module.parameters():
            torch.nn.init.normal_(p, std=std)
    rpn = RegionProposalNetwork(RPNHead(256, 3), rpn_anchor_generator())
    rpn.head.load_state_dict(tv.rpn.head.state_dict())
    heads = RoIHeads(TwoMLPHead(256 * 49, 1024), FastRCNNPredictor(1024, num_classes + 1), num_classes=num_classes,
                     pool_backend=pool_backend)
    heads.box_head.load_state_dict(tv.roi_heads.box_head.state_dict())
    heads.box_predictor.load_state_dict(tv.roi_heads.box_predictor.state_dict())
    return tv, rpn, heads


def pyramid(batch, height, width, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 256, height // s, width // s, generator=g) for s in (4, 8, 16, 32, 64)]


@needs_tv
@pytest.mark.parametrize("pool_backend", [None, "torchvision"])
def test_proposals_and_detections_equal_torchvision(pool_backend):
    # Our RoIAlign sums in another order than torchvision's kernel (differences ~1e-7, grown by the
    # MLP); with torchvision's kernel for the pooling the detections are bitwise torchvision's.
    torch.manual_seed(0)
    tv, rpn, heads = torchvision_pair(pool_backend=pool_backend)
    tv.eval(), rpn.eval(), heads.eval()
    h, w = 320, 416  # the padded batch (multiples of 32); the resized images are smaller
    feats, sizes = pyramid(2, h, w, 1), [(320, 400), (290, 416)]
    named = OrderedDict(zip(["0", "1", "2", "3", "pool"], feats))
    with torch.no_grad():
        tv_props, _ = tv.rpn(ImageList(torch.zeros(2, 3, h, w), sizes), named)
        tv_dets, _ = tv.roi_heads(named, tv_props, sizes)
        boxes, image, _ = rpn(feats, (h, w), sizes)
        props = split_images(boxes, image, 2)
        _, scores, _ = rpn.propose(*rpn.head(feats), rpn.anchors(feats, (h, w)), sizes)
        scores = split_images(scores, image, 2)
        dets = heads.postprocess(*heads.predict(feats, as_rois(boxes, image)), boxes, image, sizes)
    worst = {"proposals": 0.0, "boxes": 0.0, "scores": 0.0}
    for i in range(2):
        assert props[i].shape == tv_props[i].shape and props[i].shape[0] == 1000
        # Proposals with exactly equal objectness (float32 sigmoids tie now and then) may come in either
        # order: torchvision's sort is not stable. Elsewhere the order is the same.
        diff = (props[i] - tv_props[i]).abs().amax(dim=1)  # (1000,)
        tied = torch.zeros_like(diff, dtype=torch.bool)
        tied[1:] |= scores[i][1:] == scores[i][:-1]
        tied[:-1] |= scores[i][:-1] == scores[i][1:]
        assert tied.sum() < 20
        worst["proposals"] = max(worst["proposals"], diff[~tied].max().item())
        unmatched = (props[i][tied, None] - tv_props[i][None, tied]).abs().amax(-1).amin(1)
        assert unmatched.max() < 1e-3  # the tied ones are a permutation of each other
        assert dets[i]["boxes"].shape[0] == tv_dets[i]["boxes"].shape[0] > 20
        assert torch.equal(dets[i]["labels"] + 1, tv_dets[i]["labels"])  # torchvision's labels count background as 0
        worst["boxes"] = max(worst["boxes"], (dets[i]["boxes"] - tv_dets[i]["boxes"]).abs().max().item())
        worst["scores"] = max(worst["scores"], (dets[i]["scores"] - tv_dets[i]["scores"]).abs().max().item())
    print(f"pool_backend {pool_backend}: max |ours - torchvision|:", {k: f"{v:.1e}" for k, v in worst.items()})
    assert worst["proposals"] == 0.0  # the RPN's arithmetic is torchvision's, op for op
    if pool_backend == "torchvision":
        assert worst["boxes"] == 0.0 and worst["scores"] == 0.0
    assert worst["boxes"] < 1e-3 and worst["scores"] < 1e-5


@needs_tv
def test_losses_equal_torchvision():
    # Samples larger than the images: both samplers take everything, so the losses are deterministic.
    torch.manual_seed(0)
    tv, rpn, heads = torchvision_pair(std=0.01)
    tv.rpn.fg_bg_sampler.batch_size_per_image = rpn.batch_size_per_image = 10 ** 7
    tv.roi_heads.fg_bg_sampler.batch_size_per_image = heads.batch_size_per_image = 10 ** 7
    tv.train(), rpn.train(), heads.train()
    h, w = 256, 320
    feats, sizes = pyramid(2, h, w, 3), [(256, 300), (230, 320)]
    targets = [{"boxes": torch.tensor([[10.0, 20, 100, 90], [150, 30, 290, 200], [5, 5, 20, 12]]),
                "labels": torch.tensor([0, 4, 2])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]
    tv_targets = [{"boxes": t["boxes"], "labels": t["labels"] + 1} for t in targets]
    named = OrderedDict(zip(["0", "1", "2", "3", "pool"], feats))
    tv_props, tv_rpn_losses = tv.rpn(ImageList(torch.zeros(2, 3, h, w), sizes), named, tv_targets)
    _, tv_roi_losses = tv.roi_heads(named, tv_props, sizes, tv_targets)
    boxes, image, rpn_losses = rpn(feats, (h, w), sizes, targets)
    roi_losses = heads.forward_train(feats, boxes, image, targets)
    pairs = [(rpn_losses["rpn_cls"], tv_rpn_losses["loss_objectness"]),
             (rpn_losses["rpn_box"], tv_rpn_losses["loss_rpn_box_reg"]),
             (roi_losses["roi_cls"], tv_roi_losses["loss_classifier"]),
             (roi_losses["roi_box"], tv_roi_losses["loss_box_reg"])]
    print("losses (ours, torchvision):", [(round(a.item(), 6), round(b.item(), 6)) for a, b in pairs])
    for ours, ref in pairs:
        assert ours.item() == pytest.approx(ref.item(), rel=1e-4)
    ours_total, tv_total = sum(a for a, _ in pairs), sum(b for _, b in pairs)
    g = torch.autograd.grad(ours_total, [heads.box_predictor.bbox_pred.weight, rpn.head.conv.weight])
    g_tv = torch.autograd.grad(tv_total, [tv.roi_heads.box_predictor.bbox_pred.weight, tv.rpn.head.conv[0][0].weight])
    for a, b in zip(g, g_tv):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-6)
