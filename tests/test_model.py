import math

import pytest
import torch

from retinanet.ops.boxes import decode
from retinanet.ops.matcher import FOREGROUND, IGNORE
from retinanet.modeling import build_model
from retinanet.modeling.detector import ImageBatch
from retinanet.ops.transform import resized_size, scaled_limits
from retinanet.ops.nms import reference_nms

from conftest import tiny_config, train_steps
from detection_match import assert_same_detections


def _rect_image(h, w, boxes):
    img = torch.full((3, h, w), 0.5)
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        img[i % 3, int(y0):int(y1), int(x0):int(x1)] = 1.0
    return img


def test_initial_foreground_probability_is_prior():
    model = build_model(tiny_config(num_classes=5)).eval()
    batch = model.preprocess([torch.rand(3, 128, 128)], resize=False).tensor
    with torch.no_grad():
        cls_logits, *_ = model.forward_features(batch)
    p = torch.sigmoid(cls_logits)
    assert abs(p.mean().item() - 0.01) < 2e-4  # sec. 4.1: pi = 0.01
    assert (p - 0.01).abs().max().item() < 5e-3


def test_image_without_boxes_gives_finite_loss_and_zero_box_loss():
    model = build_model(tiny_config()).train()
    targets = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]
    losses = model([torch.rand(3, 96, 128)], targets)
    assert set(losses) == {"cls", "box"}
    assert torch.isfinite(losses["cls"]) and losses["cls"].item() > 0
    assert losses["box"].item() == 0.0
    sum(losses.values()).backward()  # gradients flow with no foreground anchors


def test_batched_loss_equals_per_image_with_batch_normalizer():
    model = build_model(tiny_config(backbone_norm="frozen_bn")).eval()  # eval: no BN batch statistics
    images = [torch.rand(3, 128, 160), torch.rand(3, 128, 160)]
    targets = [{"boxes": torch.tensor([[10.0, 12, 60, 70], [80, 20, 150, 100]]), "labels": torch.tensor([0, 2])},
               {"boxes": torch.tensor([[30.0, 40, 90, 120]]), "labels": torch.tensor([1])}]
    batch = model.preprocess(images, resize=False).tensor
    cls_logits, box_deltas, anchors, _ = model.forward_features(batch)
    together = model.compute_losses(cls_logits, box_deltas, anchors, targets)
    num_fg = [int((model.assign_targets(anchors, [t])[0] == FOREGROUND).sum()) for t in targets]
    assert min(num_fg) > 0
    for key in ("cls", "box"):
        parts = [model.compute_losses(cls_logits[i:i + 1], box_deltas[i:i + 1], anchors, [targets[i]])[key] * num_fg[i]
                 for i in range(2)]
        assert torch.allclose(together[key], sum(parts) / sum(num_fg), rtol=1e-5)


def test_crowd_box_makes_no_positives_and_ignores_what_it_covers():
    model = build_model(tiny_config()).eval()
    batch = model.preprocess([torch.rand(3, 128, 128)], resize=False).tensor
    _, _, anchors, _ = model.forward_features(batch)
    crowd = {"boxes": torch.tensor([[0.0, 0, 128, 128]]), "labels": torch.tensor([1]), "iscrowd": torch.tensor([1])}
    labels, _, _ = model.assign_targets(anchors, [crowd])
    assert (labels == FOREGROUND).sum() == 0
    assert (labels == IGNORE).sum() > 0
    normal = dict(crowd, iscrowd=torch.tensor([0]))
    assert (model.assign_targets(anchors, [normal])[0] == FOREGROUND).sum() > 0


def test_labels_out_of_range_are_an_error():
    model = build_model(tiny_config(num_classes=3)).train()
    with pytest.raises(ValueError, match="image 0: labels must be in 0..2"):
        model([torch.rand(3, 64, 64)], [{"boxes": torch.tensor([[0.0, 0, 10, 10]]), "labels": torch.tensor([3])}])


@pytest.mark.parametrize("bad, message", [
    ({"boxes": torch.tensor([[0.0, 0, float("nan"), 10]]), "labels": torch.tensor([0])}, "boxes must be finite"),
    ({"boxes": torch.tensor([[20.0, 0, 10, 10]]), "labels": torch.tensor([0])},
     r"boxes must be xyxy with x2 >= x1 and y2 >= y1, got \[\[20"),
    ({"boxes": torch.tensor([[0.0, 0, 10, 10]]), "labels": torch.tensor([0, 1])}, "1 boxes but 2 labels"),
    ({"boxes": torch.tensor([[0.0, 0, 10, 10]]), "labels": torch.tensor([-1])}, r"labels must be in 0..2, got \[-1\]"),
    ({"boxes": torch.tensor([0.0, 0, 10]), "labels": torch.tensor([0])}, r"boxes must be \(G, 4\)"),
])
def test_malformed_targets_name_the_image_and_its_id(bad, message):
    model = build_model(tiny_config(num_classes=3)).train()
    good = {"boxes": torch.tensor([[0.0, 0, 10, 10]]), "labels": torch.tensor([0])}
    with pytest.raises(ValueError, match=rf"image 1 \(image id 17\): {message}"):
        model([torch.rand(3, 64, 64)] * 2, [good, dict(bad, image_id=17)])


def _reference_postprocess(model, cls_logits, box_deltas, anchors, level_sizes, image_size):
    """torchvision-style per-image, per-level loop (sec. 4 'Inference'), for one image."""
    boxes_all, scores_all, labels_all = [], [], []
    start = 0
    k = cls_logits.shape[-1]
    for n in level_sizes:
        s = torch.sigmoid(cls_logits[start:start + n]).flatten()
        keep = torch.nonzero(s > model.score_thresh).squeeze(1)
        sc = s[keep]
        top = sc.topk(min(model.topk_candidates, sc.numel())).indices
        idx = keep[top]
        a, lab = idx // k + start, idx % k
        b = decode(anchors[a], box_deltas[a], model.box_weights, model.box_clamp)
        b[:, 0::2] = b[:, 0::2].clamp(0, image_size[1])
        b[:, 1::2] = b[:, 1::2].clamp(0, image_size[0])
        boxes_all.append(b), scores_all.append(s[idx]), labels_all.append(lab)
        start += n
    boxes, scores, labels = torch.cat(boxes_all), torch.cat(scores_all), torch.cat(labels_all)
    keep = reference_nms(boxes, scores, labels, model.nms_thresh)[: model.detections_per_image]
    return boxes[keep], scores[keep], labels[keep]


def test_postprocess_equals_per_image_reference():
    model = build_model(tiny_config(num_classes=4)).eval()
    model.topk_candidates, model.detections_per_image = 50, 40
    batch = model.preprocess([torch.rand(3, 128, 160)] * 2, resize=False).tensor
    with torch.no_grad():
        _, _, anchors, level_sizes = model.forward_features(batch)
    g = torch.Generator().manual_seed(3)
    n = anchors.shape[0]
    cls_logits = torch.randn(2, n, 4, generator=g) * 2 - 3  # a few hundred candidates above 0.05
    box_deltas = torch.randn(2, n, 4, generator=g) * 0.2
    sizes = [(128, 160), (100, 150)]
    dets = model.postprocess((cls_logits, box_deltas, *anchors.split(level_sizes)), ImageBatch(batch, sizes, sizes))
    for i in range(2):
        rb, rs, rl = _reference_postprocess(model, cls_logits[i], box_deltas[i], anchors, level_sizes, sizes[i])
        assert len(rs) == model.detections_per_image
        assert_same_detections(dets[i], {"boxes": rb, "scores": rs, "labels": rl}, score_atol=1e-5, box_atol=1e-3)


def test_batched_inference_equals_per_image():
    cfg = tiny_config(num_classes=3, size_divisibility=64, score_thresh=0.0)
    model = build_model(cfg).eval()
    with torch.no_grad():  # make scores spread out so there are detections to compare
        model.head.cls_subnet.predictor.bias.normal_(0, 1)
        model.head.cls_subnet.predictor.weight.normal_(0, 0.5)  # scores depend on the image: no ties
    a = torch.rand(3, 128, 192)
    b = torch.rand(3, 100, 120)  # resized to 128x154: padded to 128x192 alone and in the batch
    with torch.no_grad():
        together = model([a, b])
        alone = [model([a])[0], model([b])[0]]
    for t, s in zip(together, alone):
        assert len(t["boxes"]) == model.detections_per_image
        assert_same_detections(t, s, score_atol=1e-6, box_atol=1e-4)
    # boxes are in the original image's pixels, clipped to it
    assert together[1]["boxes"][:, 2].max() <= 120 and together[1]["boxes"][:, 3].max() <= 100


def test_resize_rule():
    assert resized_size(480, 640, 800, 1333) == (800, 1067)
    assert resized_size(500, 2000, 800, 1333) == (333, 1333)  # longer side capped
    assert resized_size(480, 641, 800, 1333, rounding="floor") == (800, 1068)  # 641*5/3 = 1068.33


def test_scaled_limits():
    assert scaled_limits(800, 1333, 1.25) == (1000, 1666)  # 1666.25
    assert scaled_limits(800, 1333, 0.75) == (600, 1000)  # 999.75
    assert scaled_limits(192, 320, 128 / 192) == (128, 213)  # the shorter side exactly, 320 * 2/3 = 213.3
    assert scaled_limits(192, 320, 256 / 192) == (256, 427)  # 426.7


def test_training_lowers_the_loss():
    torch.manual_seed(0)
    model = build_model(tiny_config(num_classes=3)).train()
    boxes = [torch.tensor([[16.0, 16, 64, 64], [80, 70, 120, 120]]), torch.tensor([[40.0, 20, 100, 50]])]
    images = [_rect_image(128, 128, b) for b in boxes]
    targets = [{"boxes": b, "labels": torch.arange(len(b))} for b in boxes]
    history = train_steps(model, images, targets, steps=20)
    assert all(math.isfinite(h) for h in history)
    assert history[-1] < 0.8 * history[0]


def test_group_norm_heads_with_few_channels():
    # 16 channels cannot take GroupNorm's usual 32 groups: the heads use the largest divisor <= 32
    model = build_model(tiny_config(head_norm="gn"))
    norms = [m for m in model.head.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(m.num_groups == 16 for m in norms)
    assert build_model(tiny_config(head_norm="gn", head_channels=64)).head.cls_subnet.tower[1].num_groups == 32
