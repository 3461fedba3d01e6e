"""Large-scale jitter (retinanet/data/transforms.py ScaleJitterCrop, data.scale_jitter / data.crop_size): the
resize and crop worked out by hand for boxes (cut at the crop edge, dropped, crowd) and masks, an image whose
boxes all leave the crop, the config checks, and the training loader's fixed-size batches."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from retinanet.config import Config, ConfigError, load_config
from retinanet.data.loader import build_train_dataset, build_train_loader, build_train_transforms
from retinanet.data.synthetic import make_shapes_dataset
from retinanet.data.transforms import RandomHorizontalFlip, ResizeShortestSide, ScaleJitterCrop
from retinanet.modeling import build_model
from retinanet.ops.masks import masks_to_boxes

from conftest import tiny_config

FILL = (0.25, 0.5, 0.75)


def _box_masks(boxes: list, height: int, width: int) -> torch.Tensor:
    """(G, height, width) uint8 masks, each exactly its integer box."""
    masks = torch.zeros((len(boxes), height, width), dtype=torch.uint8)
    for g, (x1, y1, x2, y2) in enumerate(boxes):
        masks[g, y1:y2, x1:x2] = 1
    return masks


def test_resize_crop_and_pad_by_hand():
    """A 100x200 (H x W) image, crop 100, factor 1.5: r = 1.5 * min(100/100, 100/200) = 0.75, so the image
    becomes 75 x 150; no vertical slack (top 0), the crop's left edge at 40 (of 0..50): the window holds
    rows 0..74 and columns 40..139 of the resized image, rows 75..99 are padding.

    Each box: x 0.75, minus (40, 0), clipped to [0, 100] x [0, 75]:
      [20, 20, 60, 60]   -> [15, 15, 45, 45]     -> [-25, 15, 5, 45]  -> [0, 15, 5, 45]    cut at the left edge
      [0, 0, 40, 40]     -> [0, 0, 30, 30]       -> [-40, 0, -10, 30] -> [0, 0, 0, 30]     no area: dropped
      [160, 40, 200, 100] crowd -> [120, 30, 150, 75] -> [80, 30, 110, 75] -> [80, 30, 100, 75] kept, crowd
      [192, 8, 200, 32]  crowd -> [144, 6, 150, 24]  -> [104, 6, 110, 24] -> [100, 6, 100, 24] dropped
      [80, 40, 120, 80]  -> [60, 30, 90, 60]     -> [20, 30, 50, 60]                       inside
    The masks (each its box, corners multiples of 4 so x 0.75 lands on pixel edges) follow: the box of
    each kept mask is its clipped box."""
    boxes = [[20, 20, 60, 60], [0, 0, 40, 40], [160, 40, 200, 100], [192, 8, 200, 32], [80, 40, 120, 80]]
    image = torch.rand(3, 100, 200, generator=torch.Generator().manual_seed(0))
    target = {"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.tensor([0, 1, 2, 3, 1]),
              "iscrowd": torch.tensor([False, False, True, True, False]), "image_id": 7,
              "masks": _box_masks(boxes, 100, 200)}
    jitter = ScaleJitterCrop(100, [1.5, 1.5], fill=FILL)
    assert jitter.draw(100, 200, torch.Generator().manual_seed(1))[:3] == (75, 150, 0)

    out, t = jitter.apply(image, target, 75, 150, 0, 40)
    assert out.shape == (3, 100, 100)
    resized = F.interpolate(image[None], size=(75, 150), mode="bilinear", align_corners=False)[0]
    assert torch.equal(out[:, :75, :], resized[:, :, 40:140])
    assert torch.equal(out[:, 75:, :], torch.tensor(FILL).view(3, 1, 1).expand(3, 25, 100))
    expected = torch.tensor([[0, 15, 5, 45], [80, 30, 100, 75], [20, 30, 50, 60]], dtype=torch.float32)
    assert torch.equal(t["boxes"], expected)
    assert t["labels"].tolist() == [0, 2, 1]
    assert t["iscrowd"].tolist() == [False, True, False]
    assert t["image_id"] == 7
    assert t["masks"].shape == (3, 100, 100) and t["masks"].dtype == torch.uint8
    assert torch.equal(masks_to_boxes(t["masks"]), expected)
    assert int(t["masks"][:, 75:, :].sum()) == 0  # nothing in the padding
    assert torch.equal(target["boxes"][0], torch.tensor([20.0, 20, 60, 60]))  # the input is not changed


def test_upscaled_crop_with_both_offsets_and_padding_at_the_right():
    """A 40x80 image, crop 64, factor 2: r = 2 * min(64/40, 64/80) = 1.6 -> 64 x 128; top 0 (no slack),
    left 60 (of 0..64): window columns 60..123, no padding. Then factor 1 on the same
    image: r = 0.8 -> 32 x 64, no slack: top = left = 0, rows 32..63 padding.
    Box [10, 5, 50, 25]: x 1.6 -> [16, 8, 80, 40] -> minus 60 -> [-44, 8, 20, 40] -> [0, 8, 20, 40];
    at factor 1: x 0.8 -> [8, 4, 40, 20], inside."""
    image = torch.rand(3, 40, 80, generator=torch.Generator().manual_seed(2))
    target = {"boxes": torch.tensor([[10.0, 5.0, 50.0, 25.0]]), "labels": torch.tensor([3]),
              "iscrowd": torch.tensor([False])}
    out, t = ScaleJitterCrop(64, [2.0, 2.0]).apply(image, target, 64, 128, 0, 60)
    assert out.shape == (3, 64, 64) and t["boxes"].tolist() == [[0.0, 8.0, 20.0, 40.0]]
    jitter = ScaleJitterCrop(64, [1.0, 1.0])
    assert jitter.draw(40, 80, torch.Generator().manual_seed(5)) == (32, 64, 0, 0)
    out, t = jitter(image, target, torch.Generator().manual_seed(5))
    assert out.shape == (3, 64, 64) and t["boxes"].tolist() == [[8.0, 4.0, 40.0, 20.0]]
    assert torch.equal(out[:, 32:, :], torch.zeros(3, 32, 64))  # the default fill


def test_every_box_outside_the_crop_leaves_a_negative_image():
    """100x100, crop 50, factor 2: r = 1, no resize; crop at (0, 0) holds [0, 50)^2; both boxes lie at
    x, y >= 60: no boxes, labels, crowd flags or masks are left, and the model trains on the image as a
    negative (finite losses, no box loss)."""
    boxes = [[60, 60, 90, 90], [70, 50, 100, 80]]
    image = torch.rand(3, 100, 100, generator=torch.Generator().manual_seed(3))
    target = {"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.tensor([0, 1]),
              "iscrowd": torch.tensor([False, True]), "masks": _box_masks(boxes, 100, 100)}
    out, t = ScaleJitterCrop(50, [2.0, 2.0]).apply(image, target, 100, 100, 0, 0)
    assert torch.equal(out, image[:, :50, :50])
    assert t["boxes"].shape == (0, 4) and t["labels"].shape == (0,) and t["iscrowd"].shape == (0,)
    assert t["masks"].shape == (0, 50, 50)
    torch.manual_seed(0)
    model = build_model(tiny_config(num_classes=2)).train()
    losses = model([out], [t])
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["box"].item() == 0.0


def test_a_seeded_generator_repeats_the_draw_within_the_ranges():
    jitter = ScaleJitterCrop(100, [0.5, 2.0])
    draws = [jitter.draw(120, 90, torch.Generator().manual_seed(s)) for s in range(20)]
    assert draws == [jitter.draw(120, 90, torch.Generator().manual_seed(s)) for s in range(20)]
    for new_h, new_w, top, left in draws:
        # r = factor * min(100/120, 100/90) = factor * 5/6: height round(100 * factor), width round(75 * factor)
        assert 50 <= new_h <= 200 and abs(new_w - 0.75 * new_h) <= 1
        assert 0 <= top <= max(new_h - 100, 0) and 0 <= left <= max(new_w - 100, 0)
    assert len({d[0] for d in draws}) > 10  # the factor varies


def test_config_checks_name_the_problem():
    with pytest.raises(ConfigError, match="0 < min <= max"):
        load_config(overrides=["data.scale_jitter=[1.5, 0.5]", "data.crop_size=64"])
    with pytest.raises(ConfigError, match="0 < min <= max"):
        load_config(overrides=["data.scale_jitter=[0, 1.5]", "data.crop_size=64"])
    with pytest.raises(ConfigError, match="0 < min <= max"):
        load_config(overrides=["data.scale_jitter=[0.5]", "data.crop_size=64"])
    with pytest.raises(ConfigError, match="needs data.crop_size"):
        load_config(overrides=["data.scale_jitter=[0.5, 1.5]"])
    with pytest.raises(ConfigError, match="needs data.crop_size"):
        load_config(overrides=["data.scale_jitter=[0.5, 1.5]", "data.crop_size=0"])
    with pytest.raises(ConfigError, match="used only with data.scale_jitter"):
        load_config(overrides=["data.crop_size=64"])
    with pytest.raises(ConfigError, match="replaces"):
        load_config(overrides=["data.scale_jitter=[0.5, 1.5]", "data.crop_size=64", "data.train_sizes=[64]"])
    cfg = load_config(overrides=["data.scale_jitter=[0.5, 1.5]", "data.crop_size=64"])
    assert cfg.data.scale_jitter == [0.5, 1.5] and cfg.data.crop_size == 64


def test_off_by_default_and_on_builds_the_crop():
    off = build_train_transforms(Config()).transforms
    assert [type(t) for t in off] == [ResizeShortestSide, RandomHorizontalFlip]
    cfg = load_config(overrides=["data.scale_jitter=[0.5, 1.5]", "data.crop_size=64"])
    on = build_train_transforms(cfg).transforms
    assert [type(t) for t in on] == [ScaleJitterCrop, RandomHorizontalFlip]
    assert on[0].crop_size == 64 and on[0].scale_range == (0.5, 1.5) and on[0].fill == (0.485, 0.456, 0.406)


def test_training_batches_are_crop_size_squares_with_masks(tmp_path):
    """Shapes images (64 px) at factors 0.5..1.5 of a 48 px square: every image of every batch is 48 x 48, every
    mask too, each box inside the crop with positive area; the same seed gives the same batches."""
    paths = make_shapes_dataset(str(tmp_path / "shapes"), num_train=8, num_val=1, image_size=64, seed=0)
    cfg = load_config(overrides=[f"data.train_json={paths.train_json}", f"data.train_images={paths.train_images}",
                                 "data.scale_jitter=[0.5, 1.5]", "data.crop_size=48", "data.batch_size=4",
                                 "data.num_workers=0", "data.masks=true", "data.check_images=exists"])
    dataset = build_train_dataset(cfg)

    def batches(n):
        loader = iter(build_train_loader(cfg, dataset, seed=3))
        return [next(loader) for _ in range(n)]

    first = batches(3)
    for images, targets in first:
        assert [tuple(i.shape) for i in images] == [(3, 48, 48)] * 4
        for t in targets:
            b = t["boxes"]
            assert t["masks"].shape == (len(b), 48, 48)
            assert len(t["labels"]) == len(t["iscrowd"]) == len(b)
            assert bool(((b >= 0) & (b <= 48)).all()) and bool((b[:, 2:] > b[:, :2]).all())
    again = batches(3)
    assert all(torch.equal(a, b) for (x, _), (y, _) in zip(first, again) for a, b in zip(x, y))
