"""Test-time augmentation (retinanet/tta.py): flips mapped back by hand, one unflipped pass == the model,
the merge == class-aware NMS over every pass (then box voting, worked by hand), Predictor(tta=...) and
`retinanet predict --tta`."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from retinanet import Predictor
from retinanet.checkpoint import make_checkpoint, save_atomic
from retinanet.cli import main
from retinanet.modeling import build_model
from retinanet.ops.boxes import flip_boxes  # (by hand: tests/test_boxes.py)
from retinanet.ops.nms import reference_nms
from retinanet.tta import merge_detections, tta_detections

from conftest import tiny_config
from detection_match import assert_same_detections

CATEGORIES = [{"id": 1, "name": "cat"}, {"id": 5, "name": "dog"}, {"id": 9, "name": "bird"}]


def _model():
    torch.manual_seed(0)
    model = build_model(tiny_config(num_classes=3)).eval()
    with torch.no_grad():
        model.head.cls_subnet.predictor.weight.normal_(std=1.0)
        model.head.cls_subnet.predictor.bias.normal_(-4.0, 0.5)
    return model


def _image(seed=0, h=96, w=128):
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).permute(2, 0, 1)


def test_a_flipped_pass_maps_back_onto_the_original_image():
    """An image with one bright square: the flipped image's detections, mapped back, are where the
    unflipped image's detections of the mirrored square are: the mirror image of x in [20, 50) is [78, 108)."""
    model = _model()
    image = torch.zeros(3, 96, 128, dtype=torch.uint8)
    image[:, 30:60, 20:50] = 255
    mirrored = image.flip(-1)
    assert torch.equal(mirrored[:, 30:60, 78:108], image[:, 30:60, 20:50])
    with torch.no_grad():
        direct = model([mirrored])[0]  # detections in the mirrored image's pixels
        (merged,) = tta_detections(model, [image], scales=(1.0,), flip=True)
        plain = model([image])[0]
    expected = merge_detections([plain, dict(direct, boxes=flip_boxes(direct["boxes"], 128))], model.nms_thresh,
                                model.detections_per_image)
    assert len(merged["scores"]) > 0  # the flipped pass ran in another batch than `direct`: rounding
    assert_same_detections(merged, expected, score_atol=1e-5, box_atol=1e-3)


def test_one_scale_without_flip_is_the_model_itself():
    model = _model()
    images = [_image(0), _image(1, 70, 60)]
    with torch.no_grad():
        ref = model(images)
        got = tta_detections(model, images, scales=(1.0,), flip=False)
    for r, g in zip(ref, got):
        assert len(r["scores"]) > 0
        assert torch.equal(r["labels"], g["labels"]) and torch.equal(r["boxes"], g["boxes"])


def test_merge_is_class_aware_nms_over_every_pass():
    a = {"boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0], [50.0, 50.0, 60.0, 60.0]]), "scores": torch.tensor([0.9, 0.3]),
         "labels": torch.tensor([0, 1])}
    b = {"boxes": torch.tensor([[1.0, 0.0, 11.0, 10.0], [1.0, 0.0, 11.0, 10.0]]), "scores": torch.tensor([0.8, 0.7]),
         "labels": torch.tensor([0, 2])}
    merged = merge_detections([a, b], nms_thresh=0.5, max_detections=10, vote_iou=None)
    # [1, 0, 11, 10] overlaps [0, 0, 10, 10] with IoU 9/11 > 0.5: suppressed in class 0, kept in class 2
    assert merged["scores"].tolist() == pytest.approx([0.9, 0.7, 0.3])
    assert merged["labels"].tolist() == [0, 2, 1]
    boxes = torch.cat([a["boxes"], b["boxes"]])
    scores = torch.cat([a["scores"], b["scores"]])
    labels = torch.cat([a["labels"], b["labels"]])
    assert sorted(reference_nms(boxes, scores, labels, 0.5).tolist()) == [0, 1, 3]
    assert len(merge_detections([a, b], nms_thresh=0.5, max_detections=2)["scores"]) == 2
    assert merge_detections([a, b], 0.5, 10, class_agnostic=True, vote_iou=None)["labels"].tolist() == [0, 1]
    # the default votes: [0, 0, 10, 10] (0.9) and [1, 0, 11, 10] (0.8), IoU 0.82 >= 0.8: x = 0.8 / 1.7 = 0.47
    voted = merge_detections([a, b], nms_thresh=0.5, max_detections=10)
    assert voted["boxes"][0].tolist() == pytest.approx([0.8 / 1.7, 0.0, 10 + 0.8 / 1.7, 10.0])


def test_box_voting_by_hand():
    """Survivor S = [0, 0, 10, 10] (0.6, class 0). V = [0, 0, 10, 12] (0.3, class 0): IoU 100/120 = 0.83 >= 0.8,
    votes. W = [2, 0, 12, 10] (0.2, class 0): IoU 80/120 = 0.67, suppressed by NMS but no vote. X = V's box
    in class 1 (0.5): its own survivor. S's y2 becomes (0.6 * 10 + 0.3 * 12) / 0.9 = 10.667; X keeps its box.
    Across classes X is suppressed by S and votes too: y2 = (6 + 3.6 + 0.5 * 12) / 1.4 = 11.143."""
    a = {"boxes": torch.tensor([[0.0, 0, 10, 10], [2.0, 0, 12, 10]]), "scores": torch.tensor([0.6, 0.2]),
         "labels": torch.tensor([0, 0])}
    b = {"boxes": torch.tensor([[0.0, 0, 10, 12], [0.0, 0, 10, 12]]), "scores": torch.tensor([0.3, 0.5]),
         "labels": torch.tensor([0, 1])}
    voted = merge_detections([a, b], nms_thresh=0.5, max_detections=10, vote_iou=0.8)
    assert voted["scores"].tolist() == pytest.approx([0.6, 0.5]) and voted["labels"].tolist() == [0, 1]
    assert torch.allclose(voted["boxes"], torch.tensor([[0.0, 0, 10, 9.6 / 0.9], [0.0, 0, 10, 12]]))
    plain = merge_detections([a, b], nms_thresh=0.5, max_detections=10, vote_iou=None)
    assert torch.equal(plain["boxes"], torch.tensor([[0.0, 0, 10, 10], [0.0, 0, 10, 12]]))
    agnostic = merge_detections([a, b], 0.5, 10, class_agnostic=True, vote_iou=0.8)
    assert agnostic["labels"].tolist() == [0]
    assert torch.allclose(agnostic["boxes"], torch.tensor([[0.0, 0, 10, 15.6 / 1.4]]))
    flat = {"boxes": torch.tensor([[5.0, 5, 5, 9]]), "scores": torch.tensor([0.4]), "labels": torch.tensor([2])}
    assert torch.equal(merge_detections([flat, a], 0.5, 10, vote_iou=0.8)["boxes"][1], flat["boxes"][0])  # no area
    empty = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)}
    assert merge_detections([empty, empty], 0.5, 10, vote_iou=0.8)["boxes"].shape == (0, 4)


def test_predictor_and_cli_tta(tmp_path):
    model = _model()
    array = _image(3).permute(1, 2, 0).numpy()
    det = Predictor(model, CATEGORIES, device="cpu", tta=True)(array)
    with torch.no_grad():
        (ref,) = tta_detections(model, [torch.from_numpy(array).permute(2, 0, 1)])
    assert len(det) == len(ref["scores"]) > 0
    assert np.allclose(det.boxes, ref["boxes"].numpy()) and np.array_equal(det.labels, ref["labels"].numpy())
    ckpt = tmp_path / "m.pt"
    save_atomic(make_checkpoint(model, tiny_config(num_classes=3), CATEGORIES), str(ckpt))
    Image.fromarray(array).save(tmp_path / "a.png")
    out = tmp_path / "r.json"
    assert main(["predict", "--checkpoint", str(ckpt), "--device", "cpu", "--tta", "--output", str(out),
                 str(tmp_path / "a.png")]) == 0
    results = json.loads(out.read_text())
    assert len(results) == len(det) and np.allclose([r["score"] for r in results], det.scores, atol=1e-6)
