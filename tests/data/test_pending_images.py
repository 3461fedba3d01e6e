"""uint8 training images whose pixel operations run on the device == the float path, bitwise.

The reference is the float path the loader took before images stayed uint8: decode, convert to
float in [0, 1] on the CPU, apply each transform's pixel operation there (written out below, as the
transforms did it), then the model normalizes and pads. The new path keeps the uint8 image and the
list of operations (`PendingImage`), moves the uint8 data and applies them where the batch is
(`batch_to_device`); here the device is the CPU, so the two must agree exactly.
"""

from __future__ import annotations

from itertools import islice

import pytest
import torch
import torch.nn.functional as F

from retinanet.data.coco import CocoDataset
from retinanet.data.images import load_image, to_tensor
from retinanet.data.loader import batch_to_device, build_train_loader, build_train_transforms
from retinanet.data.synthetic import make_shapes_dataset
from retinanet.data.transforms import PendingImage
from retinanet.modeling import build_model

from conftest import tiny_config


def reference_pixels(array, ops) -> torch.Tensor:
    """The float path: to_tensor, then each operation as the transforms applied it to a float image."""
    image = to_tensor(array)
    for name, *args in ops:
        if name == "resize":
            image = F.interpolate(image[None], size=tuple(args), mode="bilinear", align_corners=False)[0]
        elif name == "flip":
            image = image.flip(-1)
        else:  # crop: the window at (top, left), padded with the fill at the bottom and right
            top, left, size, fill = args
            window_h, window_w = min(size, image.shape[1] - top), min(size, image.shape[2] - left)
            out = torch.tensor(fill, dtype=image.dtype).view(-1, 1, 1).repeat(1, size, size)
            out[:, :window_h, :window_w] = image[:, top:top + window_h, left:left + window_w]
            image = out
    return image


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes_dataset(str(tmp_path_factory.mktemp("shapes") / "data"), num_train=8, num_val=2,
                               image_size=64, seed=3)


@pytest.mark.parametrize("data", [{"train_sizes": [40, 96], "flip_prob": 0.5},  # down and up, some flipped
                                  {"scale_jitter": [0.5, 1.6], "crop_size": 64, "flip_prob": 0.5}])  # LSJ crops
def test_uint8_path_gives_the_float_paths_normalized_batch_bitwise(shapes, data):
    cfg = tiny_config(num_classes=4)
    cfg.data.train_json, cfg.data.train_images = str(shapes.train_json), str(shapes.train_images)
    cfg.data.batch_size, cfg.data.num_workers, cfg.data.aspect_grouping = 4, 0, False
    for key, value in data.items():
        setattr(cfg.data, key, value)
    dataset = CocoDataset(shapes.train_json, shapes.train_images, transforms=build_train_transforms(cfg))
    model = build_model(cfg)
    kinds = set()
    for pending, floats in zip(islice(build_train_loader(cfg, dataset, seed=1, pending_images=True), 3),
                               islice(build_train_loader(cfg, dataset, seed=1), 3)):
        images, targets = pending
        assert all(isinstance(image, PendingImage) and image.data.dtype == torch.uint8 for image in images)
        reference = [reference_pixels(load_image(dataset.image_dir / dataset.file_names[dataset.image_ids.index(
            t["image_id"])]), image.ops) for image, t in zip(images, targets)]
        assert [tuple(image.shape) for image in images] == [tuple(r.shape) for r in reference]
        realized, moved = batch_to_device(images, targets, torch.device("cpu"))
        new = model.preprocess(realized, resize=False).tensor
        assert torch.equal(new, model.preprocess(reference, resize=False).tensor)
        assert torch.equal(new, model.preprocess(floats[0], resize=False).tensor)  # the loader's float path too
        assert all(torch.equal(a["boxes"], b["boxes"]) for a, b in zip(moved, floats[1]))
        kinds |= {op[0] for image in images for op in image.ops}
    assert kinds >= ({"resize", "flip"} if "train_sizes" in data else {"resize", "crop", "flip"})


def test_pending_image_shape_follows_its_operations():
    image = PendingImage(torch.zeros(3, 20, 30, dtype=torch.uint8))
    assert image.shape == (3, 20, 30)
    assert image.then("resize", 10, 15).then("flip").shape == (3, 10, 15)
    assert image.then("resize", 40, 60).then("crop", 5, 7, 32, (0.5, 0.5, 0.5)).shape == (3, 32, 32)
    assert image.then("flip").realize().shape == (3, 20, 30) and image.ops == ()  # `then` makes a new image
    with pytest.raises(ValueError, match="uint8"):
        PendingImage(torch.zeros(3, 4, 4))
