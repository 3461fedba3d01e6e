"""Eq. (4.1) level assignment at its boundaries, and pooling from a pyramid."""

from collections import OrderedDict

import pytest
import torch

from retinanet.ops.poolers import assign_levels, pool_pyramid

try:
    from torchvision.ops import MultiScaleRoIAlign
    from torchvision.ops.poolers import LevelMapper

    MultiScaleRoIAlign(["0"], 7, 2)({"0": torch.zeros(1, 1, 8, 8)}, [torch.tensor([[0.0, 0, 4, 4]])], [(32, 32)])
except Exception:
    MultiScaleRoIAlign = LevelMapper = None
needs_tv = pytest.mark.skipif(MultiScaleRoIAlign is None, reason="torchvision ops not importable")


def squares(sides):
    s = torch.tensor(sides, dtype=torch.float32)
    return torch.stack([torch.zeros_like(s) + 10, torch.zeros_like(s) + 20, s + 10, s + 20], dim=1)


def test_levels_at_the_boundaries():
    # k = floor(4 + log2(side / 224)): 112 -> 3, 224 -> 4, 448 -> 5 exactly at the boundary, one level lower just below
    sides = [1, 56, 111.9, 112, 223.9, 224, 447.9, 448, 2000]
    assert assign_levels(squares(sides)).tolist() == [2, 2, 2, 3, 3, 4, 4, 5, 5]
    # sqrt(w h) is what counts: 56 x 224 has sqrt(area) 112 -> P3; 448 x 112 -> 224 -> P4
    boxes = torch.tensor([[0.0, 0, 56, 224], [0, 0, 448, 112]])
    assert assign_levels(boxes).tolist() == [3, 4]
    # clamping to other pyramids (P2-P6), other canonical level
    assert assign_levels(squares([8, 3000]), 2, 6).tolist() == [2, 6]
    assert assign_levels(squares([224]), canonical_level=5).tolist() == [5]
    # eps: just below a boundary by less than eps in log2 still goes up (as torchvision)
    assert assign_levels(squares([112 * (1 - 1e-7)])).tolist() == [3]
    assert assign_levels(torch.zeros(0, 4)).shape == (0,)


@needs_tv
def test_levels_equal_torchvision_level_mapper():
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(2000, 2, generator=g) * 500
    boxes = torch.cat([xy, xy + torch.rand(2000, 2, generator=g) ** 2 * 900 + 0.5], 1)
    boxes = torch.cat([boxes, squares([111.99999, 112, 112.00001, 224, 448, 447.99997])])
    ref = LevelMapper(2, 5)([boxes]) + 2
    assert torch.equal(assign_levels(boxes), ref)


def test_pool_pyramid_reads_each_box_from_its_level():
    # level l's features are constant = l, so each output says which level it came from
    strides = (4, 8, 16, 32)
    feats = [torch.full((2, 3, 640 // s, 640 // s), float(lv)) for lv, s in zip((2, 3, 4, 5), strides)]
    boxes = [squares([20, 300]), squares([150, 200, 500])]
    for method in ("align", "pool"):
        out = pool_pyramid(feats, boxes, strides, output_size=3, method=method)
        assert out.shape == (5, 3, 3, 3)
        # sides 20, 300, 150, 200, 500 -> floor(4 + log2(side / 224)) = 2, 4, 3, 3, 5, in the boxes' order
        expected = torch.tensor([2.0, 4, 3, 3, 5])[:, None, None, None].expand_as(out)
        assert torch.allclose(out, expected, atol=1e-5)
    with pytest.raises(ValueError, match="method"):
        pool_pyramid(feats, boxes, strides, method="max")


def test_pool_pyramid_uses_each_image_features():
    feats = [torch.stack([torch.zeros(1, 8, 8), torch.ones(1, 8, 8)]) for _ in range(4)]
    boxes = [squares([10]), squares([10, 10])]
    out = pool_pyramid(feats, boxes, (4, 8, 16, 32), output_size=2)
    assert out[:, 0].flatten(1).amax(dim=1).tolist() == [0.0, 1.0, 1.0]


@needs_tv
@pytest.mark.parametrize("sampling_ratio", [2, 0])
def test_pool_pyramid_equals_multiscale_roi_align(sampling_ratio):
    # Padded batch 800 x 1088 (multiples of 32), resized images 800 x 1066 and 781 x 1088: torchvision's
    # inferred scales 2^round(log2(H_l / 800)) are exactly 1 / stride.
    g = torch.Generator().manual_seed(0)
    strides = (4, 8, 16, 32)
    feats = [torch.randn(2, 8, 800 // s, 1088 // s, generator=g) for s in strides]
    boxes = []
    for _ in range(2):
        xy = torch.rand(500, 2, generator=g) * torch.tensor([1000.0, 700])
        boxes.append(torch.cat([xy, xy + torch.rand(500, 2, generator=g) ** 2 * 600 + 1], 1))
    ref = MultiScaleRoIAlign(["0", "1", "2", "3"], 7, sampling_ratio)(
        OrderedDict((str(i), f) for i, f in enumerate(feats)), boxes, [(800, 1066), (781, 1088)])
    ours = pool_pyramid(feats, boxes, strides, 7, sampling_ratio)
    diff = (ours - ref).abs().max().item()
    print(f"pool_pyramid sampling_ratio={sampling_ratio}: max |ours - MultiScaleRoIAlign| = {diff:.2e}")
    assert diff < 1e-5
