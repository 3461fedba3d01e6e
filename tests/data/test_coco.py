"""The COCO dataset: category mapping, crowd boxes, targets, EXIF, and a batch the model trains on."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from retinanet.config import Config
from retinanet.data.coco import LANDSCAPE, PORTRAIT, CocoDataset
from retinanet.data.images import ImageError
from retinanet.data.loader import build_train_dataset, build_train_loader, build_val_dataset
from retinanet.data.transforms import RandomHorizontalFlip
from retinanet.data.validate import DataValidationError
from retinanet.modeling import build_model
from retinanet.ops.transform import resized_size

from .conftest import annotation, coco, image_record, save_image

CATEGORIES = [{"id": 10, "name": "ten"}, {"id": 3, "name": "three"}, {"id": 7, "name": "seven"}]


@pytest.fixture
def files(tmp_path, write_json):
    """Three images (one with no boxes, one portrait) and non-contiguous category ids 3, 7, 10."""
    folder = tmp_path / "images"
    rng = np.random.default_rng(0)
    save_image(folder / "a.png", rng.integers(0, 256, size=(20, 30, 3)))
    save_image(folder / "b.png", rng.integers(0, 256, size=(40, 10, 3)))
    save_image(folder / "sub" / "c.png", rng.integers(0, 256, size=(16, 16, 3)))
    data = coco([image_record(101, "a.png", 20, 30), image_record(7, "b.png", 40, 10),
                 image_record(55, "sub/c.png", 16, 16)],
                [annotation(1, 101, [2, 3, 4, 5], category_id=7),
                 annotation(2, 101, [10, 0, 20, 20], category_id=10, iscrowd=1),
                 annotation(3, 101, [0, 1, 1, 1], category_id=3),
                 annotation(4, 7, [1, 2, 3, 4], category_id=10)],
                CATEGORIES)
    return write_json(data), folder


def test_category_ids_map_to_contiguous_labels_and_back(files):
    dataset = CocoDataset(*files)
    assert dataset.categories == [{"id": 3, "name": "three"}, {"id": 7, "name": "seven"}, {"id": 10, "name": "ten"}]
    assert dataset.label_to_category_id == [3, 7, 10]
    assert dataset.category_id_to_label == {3: 0, 7: 1, 10: 2}
    assert dataset.num_classes == 3
    for cid in (3, 7, 10):
        assert dataset.label_to_category_id[dataset.category_id_to_label[cid]] == cid


def test_items_carry_boxes_labels_and_crowd_flags(files):
    dataset = CocoDataset(*files)
    assert len(dataset) == 3 and dataset.image_ids == [101, 7, 55]
    image, target = dataset[0]
    assert image.shape == (3, 20, 30) and image.dtype == torch.float32
    with Image.open(files[1] / "a.png") as img:
        assert torch.equal(image, torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255)
    assert target["boxes"].dtype == torch.float32
    assert target["boxes"].tolist() == [[2, 3, 6, 8], [10, 0, 30, 20], [0, 1, 1, 2]]  # xywh -> xyxy
    assert target["labels"].tolist() == [1, 2, 0] and target["labels"].dtype == torch.int64
    assert target["iscrowd"].tolist() == [False, True, False] and target["iscrowd"].dtype == torch.bool
    assert target["image_id"] == 101 and target["orig_size"] == (20, 30)
    _, empty = dataset[2]
    assert empty["boxes"].shape == (0, 4) and empty["labels"].shape == (0,) and empty["iscrowd"].shape == (0,)
    assert empty["orig_size"] == (16, 16)
    assert dataset.aspect_groups() == [LANDSCAPE, PORTRAIT, LANDSCAPE]


def test_seeded_keys_make_transforms_repeatable(files):
    dataset = CocoDataset(*files, transforms=RandomHorizontalFlip(0.5))
    xs = {seed: dataset[(0, seed)][1]["boxes"][0, 0].item() for seed in range(12)}
    assert set(xs.values()) == {2.0, 24.0}  # x1 = 2 unflipped, 30 - 6 = 24 flipped
    assert all(dataset[(0, seed)][1]["boxes"][0, 0].item() == x for seed, x in xs.items())


def test_warnings_are_logged_when_the_dataset_is_built(tmp_path, write_json, caplog):
    save_image(tmp_path / "a.png", np.zeros((4, 4, 3)))
    path = write_json(coco([image_record(1, "a.png", 4, 4)],
                           [annotation(1, 1, [0, 0, 0, 1]), annotation(2, 1, [1, 1, 9, 2])]))
    dataset = CocoDataset(path, tmp_path)
    assert dataset.target(0)["boxes"].tolist() == [[1.0, 1.0, 4.0, 3.0]]
    assert "annotation id 1 (image id 1)" in caplog.text and "annotation id 2 (image id 1)" in caplog.text
    assert "2 warnings" in caplog.text


def test_invalid_data_raises_one_error_listing_everything(tmp_path, write_json):
    save_image(tmp_path / "a.png", np.zeros((4, 4, 3)))
    path = write_json(coco([image_record(1, "a.png", 4, 4)],
                           [annotation(1, 2, [0, 0, 1, 1]), annotation(2, 1, [0, 0, 1, 1], category_id=9)]))
    with pytest.raises(DataValidationError) as err:
        CocoDataset(path, tmp_path)
    assert len(err.value.errors) == 2
    assert "annotation id 1 (image id 2): unknown image id 2" in str(err.value)
    assert "annotation id 2 (image id 1): unknown category id 9" in str(err.value)


def test_exif_rotated_image_loads_as_displayed(tmp_path, write_json):
    exif = Image.Exif()
    exif[0x0112] = 6
    stored = np.zeros((20, 30), dtype=np.uint8)
    stored[0, 0] = 255  # top left stored -> top right displayed
    Image.fromarray(stored).save(tmp_path / "r.png", exif=exif.tobytes())
    path = write_json(coco([image_record(1, "r.png", 30, 20)], [annotation(1, 1, [19, 0, 1, 1])]))
    image, target = CocoDataset(path, tmp_path)[0]
    assert image.shape == (3, 30, 20)
    x1, y1, x2, y2 = (int(v) for v in target["boxes"][0].tolist())
    assert image[0, y1:y2, x1:x2].eq(1).all() and image[0].sum() == 1


def test_size_changed_after_validation_is_an_error_naming_file_and_id(tmp_path, write_json):
    save_image(tmp_path / "a.png", np.zeros((4, 6, 3)))
    path = write_json(coco([image_record(1, "a.png", 4, 6)], []))
    dataset = CocoDataset(path, tmp_path)
    save_image(tmp_path / "a.png", np.zeros((6, 4, 3)))
    with pytest.raises(ImageError) as err:
        dataset[0]
    assert str(tmp_path / "a.png") in str(err.value) and "image id 1" in str(err.value)


def test_a_training_batch_goes_through_the_model(files):
    cfg = Config()
    json_path, folder = files
    cfg.data.train_json = cfg.data.val_json = str(json_path)
    cfg.data.train_images = cfg.data.val_images = str(folder)
    cfg.data.train_sizes, cfg.data.train_max_size, cfg.data.batch_size, cfg.data.num_workers = [32, 48], 64, 2, 0
    m = cfg.model
    m.backbone, m.backbone_width, m.fpn_channels, m.head_channels, m.num_classes = "resnet18", 8, 16, 16, 3
    m.min_size, m.max_size, m.size_divisibility = 32, 64, 32
    dataset = build_train_dataset(cfg)
    loader = build_train_loader(cfg, dataset, seed=0)
    images, targets = next(iter(loader))
    assert len(images) == len(targets) == 2
    for image, target in zip(images, targets):
        oh, ow = target["orig_size"]
        assert tuple(image.shape[1:]) in {resized_size(oh, ow, size, 64) for size in (32, 48)}
        h, w = image.shape[1:]
        boxes = target["boxes"]
        assert ((boxes[:, 0::2] >= 0) & (boxes[:, 0::2] <= w) & (boxes[:, 1::2] >= 0) & (boxes[:, 1::2] <= h)).all()
    model = build_model(cfg).train()
    losses = model(images, targets)
    assert set(losses) == {"cls", "box"} and all(math.isfinite(v.item()) for v in losses.values())
    val = build_val_dataset(cfg)
    assert val.transforms is None and val[1][0].shape == (3, 40, 10)


def test_builders_name_missing_settings():
    cfg = Config()
    assert build_val_dataset(cfg) is None
    with pytest.raises(ValueError, match="data.train_json and data.train_images"):
        build_train_dataset(cfg)
