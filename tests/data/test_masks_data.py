"""Masks in the data pipeline: segmentation validation, the opt-in `masks` target, the shapes dataset's
masks, and a training step that receives them."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from retinanet.cli import main
from retinanet.config import Config
from retinanet.data.coco import CocoDataset
from retinanet.data.loader import build_train_dataset, build_train_loader
from retinanet.data.synthetic import make_shapes_dataset
from retinanet.data.validate import MASK_BOX_TOLERANCE, validate_coco
from retinanet.modeling import build_model
from retinanet.ops.masks import encode_masks, masks_to_boxes

from .conftest import annotation, coco, image_record, save_image

SQUARE = [[2, 1, 5, 1, 5, 4, 2, 4]]  # covers columns 2-4, rows 1-3: box [2, 1, 3, 3] (x, y, w, h)


def with_mask(ann_id, segmentation, bbox=(2, 1, 3, 3), iscrowd=0, image_id=1) -> dict:
    return {**annotation(ann_id, image_id, list(bbox), iscrowd=iscrowd), "segmentation": segmentation}


@pytest.fixture
def folder(tmp_path):
    save_image(tmp_path / "images" / "a.png", np.zeros((6, 8, 3)))  # height 6, width 8
    return tmp_path / "images"


def _one(messages, ann_id) -> str:
    """The one message about annotation `ann_id`."""
    found = [m for m in messages if f"annotation id {ann_id} " in m]
    assert len(found) == 1, messages
    return found[0]


def test_each_segmentation_problem_is_reported_with_its_annotation_id(folder, write_json):
    square = np.zeros((6, 8), dtype=np.uint8)
    square[1:4, 2:5] = 1
    good_rle = encode_masks(square[None])[0]  # {"size": [6, 8], "counts": str}
    from pycocotools import mask as mask_api

    wrong_total = mask_api.encode(np.asfortranarray(np.ones((5, 8), dtype=np.uint8)))["counts"].decode()
    anns = [
        with_mask(1, SQUARE),  # fine
        with_mask(2, [[2, 1, 5, 1]]),  # 2 points
        with_mask(3, [[2, 1, 5, 1, 5, 4, 2]]),  # odd number of coordinates
        with_mask(4, [[2, 1, 10.5, 1, 10.5, 4, 2, 4]], bbox=(2, 1, 6, 3)),  # x 10.5 > width 8 + 1
        with_mask(5, {"size": [6, 7], "counts": good_rle["counts"]}),  # size is not the image's
        with_mask(6, {"size": [6, 8], "counts": [10, 3, 5]}, iscrowd=1),  # runs add up to 18, not 48
        with_mask(7, {"size": [6, 8], "counts": wrong_total}),  # runs of a 5x8 mask
        with_mask(8, [[2, 1, 2, 1, 2, 1]]),  # a polygon of no area: empty mask
        with_mask(9, SQUARE, bbox=(0, 1, 3, 3)),  # box 2 px left of the mask's: within the tolerance
        with_mask(10, SQUARE, bbox=(2, 1, 6, 3)),  # right edge 8 vs the mask's 5: a warning
        with_mask(11, good_rle),  # fine (compressed)
        with_mask(12, {"size": [6, 8], "counts": [8, 3, 3, 3, 3, 3, 25]}, iscrowd=1),  # fine (uncompressed)
        annotation(13, 1, [2, 1, 3, 3]),  # no segmentation at all
    ]
    report = validate_coco(write_json(coco([image_record(1, "a.png", 6, 8)], anns)), folder, masks=True)
    assert "polygon 0 has 2 point(s); a polygon needs at least 3" in _one(report.errors, 2)
    assert "polygon 0 has an odd number of coordinates (7)" in _one(report.errors, 3)
    assert "reaches outside the 8x6 image by more than 1 px" in _one(report.errors, 4)
    assert "RLE size [6, 7] (height, width) differs from the image's [6, 8]" in _one(report.errors, 5)
    assert "RLE counts add up to 18, not height * width = 48" in _one(report.errors, 6)
    assert "do not describe exactly height * width = 48 pixels" in _one(report.errors, 7)
    assert "empty mask" in _one(report.errors, 8)
    assert "no 'segmentation'" in _one(report.errors, 13)
    assert len(report.errors) == 8 and all(str(m).startswith(str(report.json_path)) for m in report.errors)
    assert MASK_BOX_TOLERANCE == 2
    assert "differs from bbox by 3.0 px" in _one(report.warnings, 10) and len(report.warnings) == 1
    kept = {a["id"] for a in report.annotations[1]}
    assert kept == {1, 9, 10, 11, 12}
    # without masks=True the same file is only checked for boxes: nothing about segmentations
    assert validate_coco(report.json_path, folder).ok


def test_check_data_reports_mask_problems_with_masks_flag(folder, write_json, capsys):
    path = write_json(coco([image_record(1, "a.png", 6, 8)], [with_mask(1, SQUARE), with_mask(2, [[2, 1, 5, 1]])]))
    assert main(["check-data", "--json", str(path), "--images", str(folder)]) == 0
    assert main(["check-data", "--json", str(path), "--images", str(folder), "--masks"]) == 1
    assert "annotation id 2 (image id 1): polygon 0 has 2 point(s)" in capsys.readouterr().out


def test_masks_are_opt_in_and_follow_the_boxes(folder, write_json):
    anns = [with_mask(1, SQUARE), with_mask(2, {"size": [6, 8], "counts": [8, 3, 3, 3, 3, 3, 25]}, iscrowd=1,
                                            bbox=(1, 2, 3, 3))]
    path = write_json(coco([image_record(1, "a.png", 6, 8)], anns))
    _, target = CocoDataset(path, folder)[0]
    assert "masks" not in target  # off by default: box-only training reads no segmentation
    _, target = CocoDataset(path, folder, masks=True)[0]
    masks = target["masks"]
    assert masks.dtype == torch.uint8 and masks.shape == (2, 6, 8)
    assert masks_to_boxes(masks).tolist() == [[2, 1, 5, 4], [1, 2, 4, 5]] == target["boxes"].tolist()
    assert target["iscrowd"].tolist() == [False, True]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes_dataset(str(tmp_path_factory.mktemp("shapes") / "s"), num_train=40, num_val=4, image_size=96)


def test_shapes_masks_are_exact_visible_pixels(shapes):
    data = json.loads(shapes.train_json.read_text())
    dataset = CocoDataset(shapes.train_json, shapes.train_images, masks=True)
    holes_or_pieces = 0
    for index in range(len(dataset)):
        _, target = dataset[index]
        anns = [a for a in data["annotations"] if a["image_id"] == target["image_id"]]
        masks = target["masks"]
        assert torch.equal(masks_to_boxes(masks), target["boxes"])  # the box is the mask's extent
        assert masks.sum(dim=(1, 2)).tolist() == [a["area"] for a in anns]  # area: the visible pixel count
        assert (masks.sum(0) <= 1).all()  # occluded parts removed: no pixel in two masks
        box_area = (target["boxes"][:, 2:] - target["boxes"][:, :2]).prod(1)
        holes_or_pieces += int((masks.sum(dim=(1, 2)) < 0.7 * box_area).sum())
    assert holes_or_pieces > 0


def test_training_step_receives_masks_and_retinanet_ignores_them(shapes):
    from conftest import tiny_config

    cfg = tiny_config(num_classes=4)
    cfg.data.train_json, cfg.data.train_images = str(shapes.train_json), str(shapes.train_images)
    cfg.data.batch_size, cfg.data.num_workers, cfg.data.train_sizes = 2, 0, [128]
    assert Config().data.masks is False
    cfg.data.masks = True
    images, targets = next(iter(build_train_loader(cfg, build_train_dataset(cfg), seed=0)))
    for image, target in zip(images, targets):
        assert target["masks"].dtype == torch.uint8 and target["masks"].shape[1:] == image.shape[1:]
        assert len(target["masks"]) == len(target["boxes"])
        assert (masks_to_boxes(target["masks"]) - target["boxes"]).abs().max() <= 1.0
    model = build_model(cfg).train()
    with_masks = model(images, targets)
    without = model(images, [{k: v for k, v in t.items() if k != "masks"} for t in targets])
    assert set(with_masks) == {"cls", "box"} and all(torch.isfinite(v) for v in with_masks.values())
    assert {k: v.item() for k, v in with_masks.items()} == {k: v.item() for k, v in without.items()}
