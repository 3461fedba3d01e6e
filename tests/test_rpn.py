"""The RPN: anchor labels and losses by hand, proposals by hand, batched == per image, and torchvision's RPN."""

import math
from collections import OrderedDict

import pytest
import torch

from retinanet.modeling.rpn import RPNHead, RegionProposalNetwork, rpn_anchor_generator
from retinanet.ops.poolers import split_images

try:
    from torchvision.models.detection import rpn as tv_rpn
    from torchvision.models.detection.anchor_utils import AnchorGenerator as TVAnchorGenerator
    from torchvision.models.detection.image_list import ImageList
    from torchvision.ops import nms

    nms(torch.zeros(1, 4), torch.zeros(1), 0.5)
except Exception:
    tv_rpn = None
needs_tv = pytest.mark.skipif(tv_rpn is None, reason="torchvision not importable")

# 6 hand-made anchors and 2 boxes. IoU with gt0 [0, 0, 10, 10] / gt1 [22, 22, 30, 30]:
#   a0 [0, 0, 10, 10]    1.0 / 0     -> 1 (>= 0.7)
#   a1 [0, 0, 10, 8]     0.8 / 0     -> 1
#   a2 [20, 20, 30, 30]  0 / 0.64    -> between 0.3 and 0.7, but gt1's best anchor -> 1
#   a3 [5, 5, 15, 15]    25/175 = 0.14 -> 0 (< 0.3)
#   a4 [40, 40, 50, 50]  0 / 0       -> 0
#   a5 [20, 20, 28, 28]  0 / 36/92 = 0.39 -> -1 (ignored)
ANCHORS = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 8], [20, 20, 30, 30], [5, 5, 15, 15], [40, 40, 50, 50],
                        [20, 20, 28, 28]])
GT = torch.tensor([[0.0, 0, 10, 10], [22, 22, 30, 30]])


def make_rpn(channels=8, **kwargs):
    return RegionProposalNetwork(RPNHead(channels, 3), rpn_anchor_generator(), **kwargs)


def test_anchor_labels_by_hand():
    rpn = make_rpn()
    labels, matched = rpn.assign_targets(ANCHORS, [{"boxes": GT}])
    assert labels[0].tolist() == [1, 1, 1, 0, 0, -1]
    assert torch.equal(matched[0, :3], GT[[0, 0, 1]])
    # a crowd box covering a4 makes that background anchor ignored; the crowd box matches nothing
    crowd = {"boxes": torch.cat([GT, torch.tensor([[38.0, 38, 60, 60]])]), "iscrowd": torch.tensor([0, 0, 1])}
    assert rpn.assign_targets(ANCHORS, [crowd])[0][0].tolist() == [1, 1, 1, 0, -1, -1]
    # no boxes: every anchor background
    assert rpn.assign_targets(ANCHORS, [{"boxes": torch.zeros(0, 4)}])[0][0].tolist() == [0] * 6


def test_losses_by_hand():
    rpn = make_rpn(batch_size_per_image=100)  # samples all 5 labelled anchors
    objectness = torch.zeros(1, 6)  # BCE of logit 0 is log 2 for either label
    deltas = torch.zeros(1, 6, 4)
    losses = rpn.losses(objectness, deltas, ANCHORS, [{"boxes": GT}])
    assert losses["rpn_cls"].item() == pytest.approx(math.log(2))

    def sl1(d, beta=1 / 9):
        return 0.5 * d * d / beta if abs(d) < beta else abs(d) - 0.5 * beta

    # targets: a0 -> gt0: all 0; a1 -> gt0: dy = (5 - 4) / 8, dh = log(10 / 8);
    # a2 -> gt1: dx = dy = (26 - 25) / 10, dw = dh = log(8 / 10); summed, divided by 5 sampled anchors
    box = sl1(1 / 8) + sl1(math.log(10 / 8)) + 2 * sl1(0.1) + 2 * sl1(math.log(0.8))
    assert losses["rpn_box"].item() == pytest.approx(box / 5, rel=1e-5)
    giou = make_rpn(batch_size_per_image=100, box_loss="giou").losses(objectness, deltas, ANCHORS, [{"boxes": GT}])
    # 1 - GIoU (= 1 - IoU, the hulls being the unions): (0 + 0.2 + 0.36) / 5
    assert giou["rpn_box"].item() == pytest.approx(0.56 / 5, rel=1e-5)


def test_image_without_boxes_has_finite_losses():
    rpn = make_rpn()
    feats = [torch.randn(2, 8, 64 // s, 64 // s) for s in (4, 8, 16, 32, 64)]
    targets = [{"boxes": torch.zeros(0, 4)}, {"boxes": torch.tensor([[4.0, 4, 40, 30]])}]
    _, _, losses = rpn.train()(feats, (64, 64), [(64, 64), (64, 64)], targets)
    assert all(torch.isfinite(v) for v in losses.values())
    _, _, empty = rpn(feats[:], (64, 64), [(64, 64)] * 2, [{"boxes": torch.zeros(0, 4)}] * 2)
    assert empty["rpn_box"].item() == 0.0 and empty["rpn_cls"].item() > 0
    (empty["rpn_cls"] + empty["rpn_box"]).backward()  # gradients flow with no positives
    assert rpn.head.cls_logits.weight.grad.abs().sum() > 0


def test_proposals_by_hand():
    rpn = make_rpn(nms_thresh=0.7).eval()
    anchors = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 9], [50, 50, 70, 70], [70, 70, 80, 80], [0, 0, 10, 10]])
    logits = torch.tensor([[3.0, 2.0, 1.0, 4.0, 0.5]])
    # a1 overlaps a0 with IoU 0.9 (suppressed); a2 is clipped to the 60 x 60 image; a3 becomes
    # [60, 60, 60, 60] (side 0 < min_size: dropped); a4 is on another level, so not suppressed by a0
    levels = ([logits[:, :4], logits[:, 4:]], [torch.zeros(1, 4, 4), torch.zeros(1, 1, 4)], [anchors[:4], anchors[4:]])
    boxes, scores, image = rpn.propose(*levels, [(60, 60)])
    assert boxes.tolist() == [[0.0, 0, 10, 10], [50, 50, 60, 60], [0, 0, 10, 10]] and image.tolist() == [0, 0, 0]
    assert torch.allclose(scores, torch.sigmoid(torch.tensor([3.0, 1.0, 0.5])))
    rpn.pre_nms_top_n["testing"] = 1  # per level: a3 (dropped) on level 0, a4 on level 1
    assert rpn.propose(*levels, [(60, 60)])[0].tolist() == [[0, 0, 10, 10]]
    rpn.pre_nms_top_n["testing"], rpn.post_nms_top_n["testing"] = 1000, 2
    assert len(rpn.propose(*levels, [(60, 60)])[0]) == 2


def test_batched_equals_per_image():
    torch.manual_seed(1)
    rpn = make_rpn(pre_nms_top_n={"training": 2000, "testing": 200}, post_nms_top_n={"training": 2000, "testing": 100})
    for p in rpn.head.parameters():
        torch.nn.init.normal_(p, std=0.3)
    rpn.eval()
    feats = [torch.randn(2, 8, 128 // s, 160 // s) for s in (4, 8, 16, 32, 64)]
    sizes = [(128, 140), (100, 160)]
    batch = split_images(*rpn(feats, (128, 160), sizes)[:2], 2)
    for i in range(2):
        alone = rpn([f[i:i + 1] for f in feats], (128, 160), sizes[i:i + 1])[:1]
        # (the convolutions of a batch of 2 and of 1 image round differently, by ~1e-7)
        assert batch[i].shape == alone[0].shape and torch.allclose(batch[i], alone[0], atol=1e-4)
    assert batch[0][:, 2].max() <= 140 and batch[1][:, 3].max() <= 100
    assert not torch.equal(batch[0], batch[1])


def tv_and_ours(channels, pre, post, batch_size_per_image=256, std=0.3):
    head = tv_rpn.RPNHead(channels, 3)
    for p in head.parameters():
        torch.nn.init.normal_(p, std=std)
    tv = tv_rpn.RegionProposalNetwork(TVAnchorGenerator(((32,), (64,), (128,), (256,), (512,)), ((0.5, 1.0, 2.0),) * 5),
                                      head, 0.7, 0.3, batch_size_per_image, 0.5, pre, post, 0.7)
    ours = RPNHead(channels, 3)
    ours.load_state_dict(head.state_dict())  # torchvision's conv.0.0.* names load into conv.*
    return tv, RegionProposalNetwork(ours, rpn_anchor_generator(), batch_size_per_image=batch_size_per_image,
                                     pre_nms_top_n=pre, post_nms_top_n=post)


@needs_tv
@pytest.mark.parametrize("training", [False, True])
def test_proposals_equal_torchvision(training):
    torch.manual_seed(0)
    tv, ours = tv_and_ours(16, {"training": 600, "testing": 300}, {"training": 500, "testing": 200})
    tv.train(training), ours.train(training)
    h, w = 256, 320
    feats = [torch.randn(2, 16, h // s, w // s) for s in (4, 8, 16, 32, 64)]
    sizes = [(256, 300), (230, 320)]
    targets = [{"boxes": torch.tensor([[10.0, 20, 100, 90], [150, 30, 290, 200]])}, {"boxes": torch.zeros(0, 4)}]
    with torch.no_grad():
        ref, _ = tv(ImageList(torch.zeros(2, 3, h, w), sizes), OrderedDict((str(i), f) for i, f in enumerate(feats)),
                    targets if training else None)
        out = split_images(*ours(feats, (h, w), sizes, targets if training else None)[:2], 2)
    for r, o in zip(ref, out):
        assert r.shape == o.shape and r.shape[0] > 100
        assert (r - o).abs().max().item() < 1e-4


@needs_tv
def test_losses_equal_torchvision():
    # With a sample larger than the image, both samplers take every labelled anchor: no randomness left.
    torch.manual_seed(0)
    tv, ours = tv_and_ours(16, {"training": 600, "testing": 300}, {"training": 500, "testing": 200},
                           batch_size_per_image=10 ** 7, std=0.05)
    h, w = 256, 320
    feats = [torch.randn(2, 16, h // s, w // s) for s in (4, 8, 16, 32, 64)]
    targets = [{"boxes": torch.tensor([[10.0, 20, 100, 90], [150, 30, 290, 200], [5, 5, 20, 12]])},
               {"boxes": torch.zeros(0, 4)}]
    ref_losses = tv.train()(ImageList(torch.zeros(2, 3, h, w), [(h, w)] * 2),
                            OrderedDict((str(i), f) for i, f in enumerate(feats)), targets)[1]
    losses = ours.train()(feats, (h, w), [(h, w)] * 2, targets)[2]
    print({k: (losses[k].item(), ref_losses[n].item()) for k, n in (("rpn_cls", "loss_objectness"),
                                                                     ("rpn_box", "loss_rpn_box_reg"))})
    assert losses["rpn_cls"].item() == pytest.approx(ref_losses["loss_objectness"].item(), rel=1e-5)
    assert losses["rpn_box"].item() == pytest.approx(ref_losses["loss_rpn_box_reg"].item(), rel=1e-4)
    g_ours = torch.autograd.grad(losses["rpn_cls"] + losses["rpn_box"], ours.head.bbox_pred.weight)[0]
    g_ref = torch.autograd.grad(ref_losses["loss_objectness"] + ref_losses["loss_rpn_box_reg"], tv.head.bbox_pred.weight)[0]
    assert torch.allclose(g_ours, g_ref, rtol=1e-3, atol=1e-7)


def test_batched_anchor_labels_equal_per_image_matching():
    # the batch is matched at once (boxes padded); each image must get what it gets matched alone,
    # with the reference written per image: match, crowd boxes make covered background ignored
    from retinanet.ops.matcher import ignore_crowd, split_crowd

    g = torch.Generator().manual_seed(0)
    rpn = make_rpn()
    anchors = torch.cat([a for a in rpn.anchors([torch.zeros(1, 1, 64 // s, 80 // s) for s in (4, 8, 16, 32, 64)],
                                                (64, 80))])
    targets = []
    for n in (3, 0, 5, 1):
        xy = torch.rand(n, 2, generator=g) * 50
        boxes = torch.cat([xy, xy + torch.rand(n, 2, generator=g) * 40 + 2], dim=1)
        crowd = (torch.rand(n, generator=g) < 0.3).long()
        targets.append({"boxes": boxes, "iscrowd": crowd})
    targets[3]["boxes"] = torch.cat([targets[3]["boxes"], targets[3]["boxes"]])  # a duplicate box: IoU ties
    targets[3]["iscrowd"] = torch.zeros(2, dtype=torch.long)
    labels, matched = rpn.assign_targets(anchors, targets)
    assert (labels == -1).any() and (labels == 1).any()
    for i, t in enumerate(targets):
        gt, _, crowd = split_crowd(t)
        idx, lab = rpn.matcher.match_boxes(gt, anchors)
        assert torch.equal(labels[i], ignore_crowd(lab, anchors, crowd, rpn.crowd_ioa))
        fg = labels[i] == 1
        assert torch.equal(matched[i][fg], gt[idx][fg] if gt.shape[0] else matched[i][:0])
