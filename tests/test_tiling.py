"""Tiled inference (retinanet/tiling.py): the crop grid worked out by hand, the merge of hand-made detections
across a crop border (NMS and SAHI's greedy non-maximum merging), crop detections mapped back into the
image's pixels, a tile larger than the image == the untiled Predictor, and the errors."""

import json

import numpy as np
import pytest
import torch

from retinanet import Predictor
from retinanet.checkpoint import make_checkpoint, save_atomic
from retinanet.cli import main
from retinanet.modeling import build_model
from retinanet.tiling import greedy_nmm, merge_tiled, tile_grid, tile_starts

from conftest import tiny_config, tiny_deepmask_config
from detection_match import assert_same_coco_results, assert_same_detections

CATEGORIES = [{"id": 1, "name": "cat"}, {"id": 5, "name": "dog"}, {"id": 9, "name": "bird"}]


# ------------------------------------------------------------------ the grid


def test_grid_of_a_500_x_300_image_by_hand():
    """Tile 192, overlap 0.25: step 192 - 48 = 144. Width 500: 1 + ceil(308 / 144) = 4 crops, starts
    round(i * 308 / 3) = 0, 103, 205, 308; height 300: 1 + ceil(108 / 144) = 2 crops, starts 0, 108."""
    assert tile_starts(500, 192, 0.25) == [0, 103, 205, 308]
    assert tile_starts(300, 192, 0.25) == [0, 108]
    grid = tile_grid(300, 500, 192, 0.25)
    assert grid == [(x, y, x + 192, y + 192) for y in (0, 108) for x in (0, 103, 205, 308)]
    covered = np.zeros((300, 500), dtype=int)
    for x0, y0, x1, y1 in grid:
        covered[y0:y1, x0:x1] += 1
    assert covered.min() >= 1  # every pixel, and nothing outside the image (slices would have been cut)
    assert max(x1 for *_, x1, _ in grid) == 500 and max(y1 for *_, y1 in grid) == 300
    starts = tile_starts(500, 192, 0.25)
    assert min(a + 192 - b for a, b in zip(starts, starts[1:])) >= 48  # every overlap at least the one asked


def test_grid_edge_cases():
    assert tile_starts(384, 192, 0.0) == [0, 192]  # an exact fit: no overlap, no extra crop
    assert tile_starts(200, 192, 0.0) == [0, 8]  # the last crop shifted inward, not an 8 px sliver at 192
    assert tile_starts(192, 192, 0.5) == [0] and tile_starts(100, 192, 0.5) == [0]
    # an image smaller than a tile along a side: the crops take that whole side
    assert tile_grid(100, 300, 192, 0.0) == [(0, 0, 192, 100), (108, 0, 300, 100)]
    assert tile_grid(50, 60, 192, 0.25) == [(0, 0, 60, 50)]


@pytest.mark.parametrize("tile, overlap, message", [
    (192, 1.0, r"overlap must be in \[0, 1\)"), (192, -0.1, r"overlap must be in \[0, 1\)"),
    (0, 0.2, "tile must be a positive"), (19.5, 0.2, "tile must be a positive")])
def test_bad_tiling_is_a_clear_error(tile, overlap, message):
    with pytest.raises(ValueError, match=message):
        tile_starts(500, tile, overlap)


# ------------------------------------------------------------------ merging, by hand


def _dets(boxes, scores, labels):
    return {"boxes": torch.tensor(boxes, dtype=torch.float32), "scores": torch.tensor(scores),
            "labels": torch.tensor(labels)}


# An object spanning x in [80, 120), cut by crop borders: the left crop (x < 112) sees [80, 112), the
# right one (x >= 88) sees [88, 120). Each half is 32 x 20 = 640 px; they share 24 x 20 = 480:
# IoU 480 / 800 = 0.6, IoS 480 / 640 = 0.75. A third detection, far away, stays as it is.
LEFT, RIGHT, FAR = [80, 10, 112, 30], [88, 10, 120, 30], [300, 300, 320, 330]


def test_greedy_nmm_joins_the_two_halves_of_a_cut_object():
    parts = [_dets([LEFT], [0.6], [0]), _dets([RIGHT, FAR], [0.7, 0.65], [0, 0])]
    merged = merge_tiled(parts, method="greedy_nmm")
    assert merged["boxes"].tolist() == [[80, 10, 120, 30], FAR]  # the union spans both halves
    assert merged["scores"].tolist() == pytest.approx([0.7, 0.65])  # the best score of the pair
    assert merged["labels"].tolist() == [0, 0]


def test_nms_keeps_the_higher_half():
    parts = [_dets([LEFT], [0.6], [0]), _dets([RIGHT, FAR], [0.7, 0.65], [0, 0])]
    merged = merge_tiled(parts, method="nms", nms_thresh=0.5)
    assert merged["boxes"].tolist() == [RIGHT, FAR]
    assert merged["scores"].tolist() == pytest.approx([0.7, 0.65])


@pytest.mark.parametrize("method", ["nms", "greedy_nmm"])
def test_different_classes_never_merge(method):
    parts = [_dets([LEFT], [0.6], [1]), _dets([RIGHT], [0.7], [0])]
    merged = merge_tiled(parts, method=method)
    assert merged["boxes"].tolist() == [RIGHT, LEFT] and merged["labels"].tolist() == [0, 1]
    agnostic = merge_tiled(parts, method=method, class_agnostic=True)  # unless asked
    assert len(agnostic["scores"]) == 1 and agnostic["labels"].tolist() == [0]


def test_greedy_nmm_checks_each_member_against_the_grown_box():
    """A (score 0.9) = [0, 0, 10, 10]; B (0.8) = [0, 0, 10, 40] contains A: IoS 1, merged first: [0, 0, 10, 40];
    C (0.7) = [5, 0, 15, 10]: IoS with A 50 / 100 = 0.5 (a member of A's cluster), with the grown box
    50 / 100 = 0.5 still: merged -> [0, 0, 15, 40]. D (0.6) = [8, 0, 18, 4]: IoS with A 8 / 40 = 0.2, not
    a member; kept on its own, although it lies inside the grown box (SAHI's greedy assignment)."""
    boxes = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 40], [5, 0, 15, 10], [8, 0, 18, 4]], dtype=torch.float32)
    keep, merged = greedy_nmm(boxes, torch.tensor([0.9, 0.8, 0.7, 0.6]), torch.zeros(4, dtype=torch.int64))
    assert keep.tolist() == [0, 3]
    assert merged.tolist() == [[0, 0, 15, 40], [8, 0, 18, 4]]


def test_greedy_nmm_drops_a_member_that_no_longer_matches_the_grown_box():
    """A (0.9) = [0, 0, 10, 10], area 100; B (0.8) = [0, 0, 10, 40] (IoS 1) and C (0.7) = [5, 0, 25, 20], area 400
    (IoS with A 50 / 100 = 0.5) are both A's. B first: [0, 0, 10, 40], area 400; C's IoS with it is
    100 / 400 = 0.25: not merged, and, taken by A's cluster, not kept either (as SAHI's GREEDYNMM)."""
    boxes = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 40], [5, 0, 25, 20]], dtype=torch.float32)
    keep, merged = greedy_nmm(boxes, torch.tensor([0.9, 0.8, 0.7]), torch.zeros(3, dtype=torch.int64))
    assert keep.tolist() == [0] and merged.tolist() == [[0, 0, 10, 40]]


@pytest.mark.parametrize("method", ["nms", "greedy_nmm"])
def test_merge_of_passes_without_detections(method):
    empty = _dets(np.zeros((0, 4)), [], [])
    empty["labels"] = empty["labels"].long()
    merged = merge_tiled([empty, empty], method=method)
    assert merged["boxes"].shape == (0, 4) and merged["scores"].shape == (0,) and merged["labels"].shape == (0,)


def test_merge_keeps_the_best_max_detections():
    boxes = [[i * 20, 0, i * 20 + 10, 10] for i in range(5)]
    for method in ("nms", "greedy_nmm"):
        merged = merge_tiled([_dets(boxes[:3], [0.1, 0.5, 0.3], [0] * 3), _dets(boxes[3:], [0.4, 0.2], [0] * 2)],
                             method=method, max_detections=3)
        assert merged["scores"].tolist() == pytest.approx([0.5, 0.4, 0.3])
        assert merged["boxes"].tolist() == [boxes[1], boxes[3], boxes[2]]


# ------------------------------------------------------------------ through the model


def _retinanet():
    torch.manual_seed(0)
    model = build_model(tiny_config(num_classes=3)).eval()
    with torch.no_grad():  # spread a random head's scores: many detections
        model.head.cls_subnet.predictor.weight.normal_(std=1.0)
        model.head.cls_subnet.predictor.bias.normal_(-4.0, 0.5)
    return model


def _faster_rcnn():
    torch.manual_seed(0)
    model = build_model(tiny_config(num_classes=3, arch="faster_rcnn", min_level=2, max_level=6, p6_from="pool",
                                    anchor_sizes=[8.0, 16.0, 32.0, 64.0, 128.0], anchor_scales=[1.0],
                                    roi_head_dim=32, rpn_pre_nms_top_n=[200, 100],
                                    rpn_post_nms_top_n=[100, 50])).eval()
    with torch.no_grad():
        model.rpn.head.cls_logits.weight.normal_(std=1.0)
        model.roi_heads.box_predictor.cls_score.weight.normal_(std=1.0)
        model.roi_heads.box_predictor.bbox_pred.weight.normal_(std=0.1)
    return model


MODELS = {"retinanet": _retinanet, "faster_rcnn": _faster_rcnn}


def _image(seed: int, h: int, w: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_a_tile_larger_than_the_image_is_the_untiled_predictor(arch):
    model = MODELS[arch]()
    images = [_image(0, 96, 128), _image(1, 70, 150)]
    plain = Predictor(model, CATEGORIES, device="cpu", batch_size=2)(images)
    for tile in (150, 192):  # equal to the longer side, and larger
        tiled = Predictor(model, CATEGORIES, device="cpu", batch_size=2, tile=tile)(images)
        for a, b in zip(tiled, plain):
            assert len(b) > 0
            assert_same_detections(a, b, what=f"{arch}, tile {tile}")


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_crop_detections_map_back_into_the_image(arch):
    """A 64 x 160 image, tile 64 without overlap and without the whole-image pass: crops at x = 0, 48, 96
    (the last shifted inward). Each crop predicted on its own (an untiled Predictor on the crop array),
    shifted by its x0, and merged by NMS, is the tiled prediction; the crops' boxes are resized from
    64 to the model's 128 px and back, so scaling and shifting are both on the way."""
    model = MODELS[arch]()
    image = _image(3, 64, 160)
    plain = Predictor(model, CATEGORIES, device="cpu", max_detections=1000)
    tiled = Predictor(model, CATEGORIES, device="cpu", max_detections=1000, tile=64, tile_overlap=0.0,
                      tile_full_image=False, tile_merge="nms")(image)
    parts = []
    for x0 in (0, 48, 96):
        det = plain(np.ascontiguousarray(image[:, x0:x0 + 64]))
        assert len(det) > 0 and det.boxes[:, 2].max() <= 64
        parts.append({"boxes": torch.from_numpy(det.boxes) + torch.tensor([x0, 0, x0, 0.0]),
                      "scores": torch.from_numpy(det.scores), "labels": torch.from_numpy(det.labels)})
    expected = merge_tiled(parts, method="nms", nms_thresh=model.nms_thresh, max_detections=1000)
    assert tiled.boxes[:, 2].max() > 112  # detections of the last crop, in the image's pixels
    assert tiled.boxes.min() >= 0 and tiled.boxes[:, 2].max() <= 160 and tiled.image_size == (64, 160)
    assert_same_detections(tiled, expected, what=arch)


@pytest.mark.parametrize("method", [None, "greedy_nmm"])
def test_whole_image_pass_through_the_predictor(method):
    """With the whole image (the default), merged by the default (NMS) or greedy merging: the result is
    `merge_tiled` of the crops' and the whole image's detections, each from an untiled Predictor."""
    model = _retinanet()
    image = _image(4, 80, 200)
    plain = Predictor(model, CATEGORIES, device="cpu", max_detections=300)
    merge = {} if method is None else {"tile_merge": method}
    tiled = Predictor(model, CATEGORIES, device="cpu", max_detections=300, tile=80, **merge)(image)
    parts = []
    for x0 in tile_starts(200, 80, 0.25):
        det = plain(np.ascontiguousarray(image[:, x0:x0 + 80]))
        parts.append({"boxes": torch.from_numpy(det.boxes) + torch.tensor([x0, 0, x0, 0.0]),
                      "scores": torch.from_numpy(det.scores), "labels": torch.from_numpy(det.labels)})
    whole = plain(image)
    parts.append({"boxes": torch.from_numpy(whole.boxes), "scores": torch.from_numpy(whole.scores),
                  "labels": torch.from_numpy(whole.labels)})
    expected = merge_tiled(parts, method=method or "nms", nms_thresh=model.nms_thresh, max_detections=300)
    assert 0 < len(tiled) <= 300
    assert_same_detections(tiled, expected)


def test_tiles_without_detections():
    model = _retinanet()
    det = Predictor(model, CATEGORIES, device="cpu", tile=64, score_threshold=1.0)(_image(5, 100, 150))
    assert len(det) == 0 and det.boxes.shape == (0, 4)


def test_predictor_refuses_what_tiling_cannot_do():
    model = _retinanet()
    with pytest.raises(ValueError, match=r"overlap must be in \[0, 1\)"):
        Predictor(model, CATEGORIES, device="cpu", tile=64, tile_overlap=1.0)
    with pytest.raises(ValueError, match="unknown tile merge"):
        Predictor(model, CATEGORIES, device="cpu", tile=64, tile_merge="wbf")
    with pytest.raises(ValueError, match="do not combine"):
        Predictor(model, CATEGORIES, device="cpu", tile=64, tta=True)
    deepmask = build_model(tiny_deepmask_config()).eval()
    with pytest.raises(ValueError, match="not masks"):
        Predictor(deepmask, [{"id": 1, "name": "object"}], device="cpu", tile=64)


def test_cli_tile_equals_the_predictor(tmp_path, capsys):
    from PIL import Image

    model = _retinanet()
    checkpoint = tmp_path / "model.pt"
    save_atomic(make_checkpoint(model, tiny_config(num_classes=3), CATEGORIES), str(checkpoint))
    image = _image(6, 90, 200)
    Image.fromarray(image).save(tmp_path / "a.png")
    out = tmp_path / "out.json"
    assert main(["predict", "--checkpoint", str(checkpoint), "--device", "cpu", "--output", str(out), "--tile", "80",
                 "--tile-overlap", "0.3", "--no-full-image", str(tmp_path / "a.png")]) == 0
    det = Predictor(model, CATEGORIES, device="cpu", tile=80, tile_overlap=0.3, tile_full_image=False)(image)
    assert len(det) > 0
    assert_same_coco_results(json.loads(out.read_text()), det.to_coco(0, "a.png"))
    capsys.readouterr()
    assert main(["predict", "--checkpoint", str(checkpoint), "--device", "cpu", "--tile", "80", "--tile-overlap", "1",
                 str(tmp_path / "a.png")]) == 1
    assert "--tile-overlap must be in [0, 1)" in capsys.readouterr().err
    assert main(["predict", "--checkpoint", str(checkpoint), "--device", "cpu", "--tile-overlap", "0.5",
                 str(tmp_path / "a.png")]) == 1
    assert "--tile-overlap needs --tile" in capsys.readouterr().err


# ------------------------------------------------------------------ the large scenes it is measured on


def test_large_scenes_are_deterministic_and_exact(tmp_path):
    from retinanet.data.synthetic import SCENE_MARGIN, make_large_scenes

    a = make_large_scenes(str(tmp_path / "a"), num_images=2, image_size=256, min_objects=20, max_objects=30,
                          min_object=8, max_object=40, seed=3)
    b = make_large_scenes(str(tmp_path / "b"), num_images=2, image_size=256, min_objects=20, max_objects=30,
                          min_object=8, max_object=40, seed=3)
    assert a.json.read_text() == b.json.read_text()
    assert [p.read_bytes() for p in sorted(a.images.iterdir())] == [p.read_bytes() for p in sorted(b.images.iterdir())]
    coco = json.loads(a.json.read_text())
    assert [img["file_name"] for img in coco["images"]] == ["000000.png", "000001.png"]
    for image in coco["images"]:
        boxes = np.array([x["bbox"] for x in coco["annotations"] if x["image_id"] == image["id"]])  # (G, 4) xywh
        assert 10 <= len(boxes) <= 30  # a few may find no free place on a small image
        assert (boxes[:, :2] >= 0).all() and (boxes[:, :2] + boxes[:, 2:] <= 256).all()
        assert boxes[:, 2:].max() <= 40 and boxes[:, 2:].min() >= 8  # every shape fills its w x h box
        x0, y0, x1, y1 = boxes[:, 0], boxes[:, 1], boxes[:, 0] + boxes[:, 2], boxes[:, 1] + boxes[:, 3]
        apart = ((x0[:, None] >= x1[None] + SCENE_MARGIN) | (x1[:, None] + SCENE_MARGIN <= x0[None])
                 | (y0[:, None] >= y1[None] + SCENE_MARGIN) | (y1[:, None] + SCENE_MARGIN <= y0[None]))
        np.fill_diagonal(apart, True)
        assert apart.all()  # no two shapes' boxes within SCENE_MARGIN px: every shape fully visible
    assert make_large_scenes(str(tmp_path / "a"), num_images=2, image_size=256, min_objects=20, max_objects=30,
                             seed=3) == a  # a complete set is reused
    with pytest.raises(ValueError, match="is not a large-scene set made with these parameters"):
        make_large_scenes(str(tmp_path / "a"), num_images=3, image_size=256, min_objects=20, max_objects=30, seed=3)
