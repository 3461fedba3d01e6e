"""Training transforms: boxes follow the pixels exactly under resizing and flipping."""

from __future__ import annotations

import pytest
import torch

from retinanet.data.transforms import Compose, RandomHorizontalFlip, ResizeShortestSide
from retinanet.ops.transform import resized_size


def _target(boxes):
    return {"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.zeros(len(boxes), dtype=torch.int64)}


def _block_image(height, width, box):
    """(3, H, W) zeros with ones inside the integer box (x1, y1, x2, y2)."""
    image = torch.zeros(3, height, width)
    x1, y1, x2, y2 = box
    image[:, y1:y2, x1:x2] = 1.0
    return image


def _extent(image):
    """xyxy of the pixels > 0.5 in channel 0."""
    ys, xs = torch.nonzero(image[0] > 0.5, as_tuple=True)
    return [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]


def test_resize_halves_image_and_boxes_and_the_pixels_agree():
    image = _block_image(20, 40, (4, 2, 10, 8))
    resize = ResizeShortestSide([10], 100)
    out, target = resize(image, _target([[4, 2, 10, 8]]))
    assert out.shape == (3, 10, 20)
    assert target["boxes"].tolist() == [[2.0, 1.0, 5.0, 4.0]]
    # scale 1/2 with align_corners=False averages input pixels 2i and 2i+1: the block maps exactly
    assert _extent(out) == [2, 1, 5, 4]
    assert out[0, 1:4, 2:5].eq(1).all() and out[0].sum() == 9
    assert target["labels"].tolist() == [0]


def test_resize_caps_the_longer_side():
    image = torch.zeros(3, 20, 40)
    out, target = ResizeShortestSide([30], 50)(image, _target([[4, 2, 10, 8]]))
    assert out.shape == (3, 25, 50)  # scale min(30 / 20, 50 / 40) = 1.25
    assert target["boxes"].tolist() == [[5.0, 2.5, 12.5, 10.0]]


def test_resize_uses_the_models_rule_per_axis_scale():
    image = torch.zeros(3, 37, 53)
    box = [[1.0, 2.0, 30.0, 35.0]]
    for size in (16, 25, 50, 101):
        out, target = ResizeShortestSide([size], 64)(image, _target(box))
        h, w = resized_size(37, 53, size, 64)
        assert tuple(out.shape[1:]) == (h, w)
        expected = torch.tensor(box) * torch.tensor([w / 53, h / 37, w / 53, h / 37])
        assert torch.equal(target["boxes"], expected)
    out, _ = ResizeShortestSide([25], 64, rounding="floor")(image, _target(box))
    assert tuple(out.shape[1:]) == resized_size(37, 53, 25, 64, "floor") == (25, 35)


def test_extreme_aspect_ratios_keep_at_least_one_pixel():
    """A 1 x 3000 strip at max_size 1333 scales by 0.444: its height rounds to 0 (and floors to 0 from a
    ratio of 1333: 1 x 1400), which interpolate cannot make. The shorter side keeps at least 1 pixel."""
    assert resized_size(1, 3000, 800, 1333) == (1, 1333)
    assert resized_size(3000, 1, 800, 1333) == (1333, 1)
    assert resized_size(1, 1400, 800, 1333, "floor") == (1, 1333)
    assert resized_size(2, 4000, 800, 1333) == (1, 1333)  # 2 * 0.333 = 0.67 rounds to 1 already: unchanged
    out, target = ResizeShortestSide([800], 1333)(torch.zeros(3, 1, 3000), _target([[0.0, 0.0, 3000.0, 1.0]]))
    assert out.shape == (3, 1, 1333) and target["boxes"].tolist() == [[0.0, 0.0, 1333.0, 1.0]]
    from retinanet.modeling.detector import Detector

    batch = Detector(min_size=800, max_size=1333).preprocess([torch.rand(3, 1, 3000), torch.rand(3, 4000, 1)])
    assert batch.image_sizes == [(1, 1333), (1333, 1)] and batch.tensor.shape == (2, 3, 1344, 1344)


def test_resize_to_the_same_size_returns_the_input():
    image, target = torch.rand(3, 10, 12), _target([[1, 1, 3, 3]])
    out, out_target = ResizeShortestSide([10], 100)(image, target)
    assert out is image and out_target is target


def test_flip_is_exact():
    image = _block_image(10, 40, (4, 2, 10, 8))
    out, target = RandomHorizontalFlip(1.0)(image, _target([[4, 2, 10, 8], [0, 0, 40, 10]]))
    assert target["boxes"].tolist() == [[30.0, 2.0, 36.0, 8.0], [0.0, 0.0, 40.0, 10.0]]
    assert _extent(out) == [30, 2, 36, 8]
    assert torch.equal(out, image.flip(-1))
    back, back_target = RandomHorizontalFlip(1.0)(out, target)
    assert torch.equal(back, image) and back_target["boxes"].tolist() == [[4, 2, 10, 8], [0, 0, 40, 10]]


def test_flip_probability_zero_and_one_and_empty_boxes():
    image, target = torch.rand(3, 4, 6), _target([[1, 1, 2, 2]])
    out, same = RandomHorizontalFlip(0.0)(image, target)
    assert out is image and same is target
    _, empty = RandomHorizontalFlip(1.0)(image, {"boxes": torch.zeros(0, 4)})
    assert empty["boxes"].shape == (0, 4)
    with pytest.raises(ValueError):
        RandomHorizontalFlip(1.5)


def test_size_sampling_choice_and_range():
    generator = torch.Generator().manual_seed(0)
    choice = ResizeShortestSide([8, 12, 16], 100)
    drawn = {choice.draw_size(generator) for _ in range(100)}
    assert drawn == {8, 12, 16}
    ranged = ResizeShortestSide([3, 5], 100, sampling="range")
    drawn = {ranged.draw_size(generator) for _ in range(100)}
    assert drawn == {3, 4, 5}
    for bad in ([5, 3], [3, 4, 5]):
        with pytest.raises(ValueError, match="range"):
            ResizeShortestSide(bad, 100, sampling="range")
    with pytest.raises(ValueError):
        ResizeShortestSide([0], 100)
    with pytest.raises(ValueError):
        ResizeShortestSide([8], 100, sampling="uniform")


def test_compose_is_a_pure_function_of_the_generator_seed():
    transforms = Compose([ResizeShortestSide([10, 20, 30], 100), RandomHorizontalFlip(0.5)])
    image, target = torch.rand(3, 20, 30), _target([[1, 2, 10, 12]])
    runs = [transforms(image, target, torch.Generator().manual_seed(seed)) for seed in (7, 7, *range(20))]
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1]["boxes"], runs[1][1]["boxes"])
    shapes = {tuple(r[0].shape) for r in runs}
    flips = {round(r[1]["boxes"][0, 0].item() / r[0].shape[-1], 6) for r in runs}  # x1 / width: 1/30 or 20/30
    assert len(shapes) == 3 and len(flips) == 2
