import math

import torch

from retinanet.ops.boxes import (box_ioa, box_iou, clip_boxes, decode, encode, flip_boxes, paired_giou, paired_iou,
                                 scale_boxes)


def test_iou_table_by_hand():
    a = torch.tensor([[0.0, 0, 10, 10], [5, 5, 15, 15]])
    b = torch.tensor([[0.0, 0, 10, 10], [0, 0, 5, 5], [20, 20, 30, 30], [10, 0, 20, 10]])
    # a0-b0 identical; a0-b1 25/100; a0-b2 disjoint; a0-b3 touching edge (0 area)
    # a1-b0 inter 25, union 175; a1-b1 inter 0; a1-b3 inter 25 (x 10-15, y 5-10), union 175
    expected = torch.tensor([[1.0, 0.25, 0.0, 0.0], [25 / 175, 0.0, 0.0, 25 / 175]])
    assert torch.allclose(box_iou(a, b), expected)
    assert torch.allclose(paired_iou(a, b[[0, 3]]), torch.tensor([1.0, 25 / 175]))


def test_iou_of_degenerate_boxes_is_zero_not_nan():
    a = torch.tensor([[3.0, 3, 3, 3]])
    assert box_iou(a, a).item() == 0.0
    assert box_ioa(a, torch.tensor([[0.0, 0, 10, 10]])).item() == 0.0


def test_ioa_is_over_the_first_box():
    anchor = torch.tensor([[0.0, 0, 10, 10]])
    crowd = torch.tensor([[0.0, 0, 10, 7], [0, 0, 100, 100]])
    assert torch.allclose(box_ioa(anchor, crowd), torch.tensor([[0.7, 1.0]]))


def test_giou_by_hand():
    a = torch.tensor([[0.0, 0, 2, 2]])
    b = torch.tensor([[3.0, 0, 5, 2]])  # disjoint: iou 0, hull 5x2=10, union 8 -> giou = -2/10
    assert torch.allclose(paired_giou(a, b), torch.tensor([-0.2]))
    assert torch.allclose(paired_giou(a, a), torch.tensor([1.0]))


def test_encode_by_hand_and_round_trip():
    anchors = torch.tensor([[0.0, 0, 10, 20]])  # cx 5, cy 10, w 10, h 20
    boxes = torch.tensor([[2.0, 4, 22, 24]])  # cx 12, cy 14, w 20, h 20
    d = encode(anchors, boxes, (1.0, 1.0, 1.0, 1.0))
    assert torch.allclose(d, torch.tensor([[0.7, 0.2, math.log(2.0), 0.0]]))
    d10 = encode(anchors, boxes, (10.0, 10.0, 5.0, 5.0))
    assert torch.allclose(d10, torch.tensor([[7.0, 2.0, 5 * math.log(2.0), 0.0]]))
    g = torch.Generator().manual_seed(1)
    a = torch.rand(50, 2, generator=g) * 100
    anchors = torch.cat([a, a + torch.rand(50, 2, generator=g) * 50 + 1], 1)
    b = torch.rand(50, 2, generator=g) * 100
    boxes = torch.cat([b, b + torch.rand(50, 2, generator=g) * 50 + 1], 1)
    for w in [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)]:
        assert torch.allclose(decode(anchors, encode(anchors, boxes, w), w), boxes, atol=1e-4)


def test_decode_clamps_log_size():
    anchors = torch.tensor([[0.0, 0, 16, 16]])
    huge = torch.tensor([[0.0, 0, 50.0, 50.0]])
    out = decode(anchors, huge)  # dw, dh clamped at log(1000/16): the box is 1000 x 1000 around (8, 8)
    assert torch.allclose(out, torch.tensor([[8 - 500.0, 8 - 500.0, 8 + 500.0, 8 + 500.0]]))
    assert torch.isfinite(out).all()


def test_decode_is_float32_under_bf16_input():
    anchors = torch.tensor([[100.0, 100, 612, 612]])
    deltas = torch.tensor([[0.013, -0.021, 0.05, -0.03]])
    assert decode(anchors, deltas.bfloat16()).dtype == torch.float32


def test_clip():
    b = torch.tensor([[-5.0, -1, 50, 70], [10, 10, 20, 20]])
    assert torch.equal(clip_boxes(b, 60, 40), torch.tensor([[0.0, 0, 40, 60], [10, 10, 20, 20]]))


def random_boxes(n, seed, extent=200.0):
    """(n, 4) xyxy boxes, some past every border."""
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * extent * 1.4 - 0.2 * extent
    return torch.cat([xy, xy + torch.rand(n, 2, generator=g) * extent * 0.6], 1)


def test_clip_to_each_images_size():
    b = torch.tensor([[-5.0, -1, 50, 70], [10, 10, 20, 20], [-5.0, -1, 50, 70]])
    h, w = torch.tensor([60.0, 15, 100]), torch.tensor([40.0, 15, 30])  # one image per box
    assert clip_boxes(b, h, w).tolist() == [[0.0, 0, 40, 60], [10, 10, 15, 15], [0, 0, 30, 70]]
    # a (B, K, 4) batch with (B, 1) sizes: each image's boxes to its own size
    batch = clip_boxes(torch.stack([b, b]), torch.tensor([[60.0], [15]]), torch.tensor([[40.0], [15]]))
    assert batch[0].tolist() == clip_boxes(b, 60, 40).tolist() and batch[1].tolist() == clip_boxes(b, 15, 15).tolist()


def test_clip_equals_the_copies_it_replaced():
    """rpn.py, roi_heads.py and ops/postprocess.py each clipped with their own four clamps; bitwise the same."""
    boxes = random_boxes(500, 0)
    image = torch.randint(0, 3, (500,), generator=torch.Generator().manual_seed(1))
    sizes = torch.tensor([[120.0, 160], [200, 90], [64, 64]])[image]  # (N, 2) h, w
    old = torch.stack([boxes[:, 0].clamp(min=0).minimum(sizes[:, 1]), boxes[:, 1].clamp(min=0).minimum(sizes[:, 0]),
                       boxes[:, 2].clamp(min=0).minimum(sizes[:, 1]), boxes[:, 3].clamp(min=0).minimum(sizes[:, 0])], dim=1)
    assert torch.equal(clip_boxes(boxes, sizes[:, 0], sizes[:, 1]), old)
    batch, per_image = boxes.view(5, 100, 4), torch.tensor([[120.0, 160], [200, 90], [64, 64], [1, 1], [300, 300]])
    h, w = per_image[:, 0, None], per_image[:, 1, None]  # (B, 1)
    old = torch.stack([batch[..., 0].clamp(min=0).minimum(w), batch[..., 1].clamp(min=0).minimum(h),
                       batch[..., 2].clamp(min=0).minimum(w), batch[..., 3].clamp(min=0).minimum(h)], dim=-1)
    assert torch.equal(clip_boxes(batch, h, w), old)


def test_flip_by_hand_and_equals_the_copies_it_replaced():
    boxes = torch.tensor([[10.0, 20.0, 30.0, 40.0], [0.0, 0.0, 100.0, 5.0]])
    assert flip_boxes(boxes, 100).tolist() == [[70.0, 20.0, 90.0, 40.0], [0.0, 0.0, 100.0, 5.0]]
    assert flip_boxes(torch.zeros(0, 4), 100).shape == (0, 4)
    boxes = random_boxes(300, 2)
    old = torch.stack([137 - boxes[:, 2], boxes[:, 1], 137 - boxes[:, 0], boxes[:, 3]], dim=1)  # tta.py, transforms.py
    assert torch.equal(flip_boxes(boxes, 137), old)
    assert torch.allclose(flip_boxes(flip_boxes(boxes, 137), 137), boxes, rtol=0, atol=1e-4)  # 137 - (137 - x) rounds
    assert torch.equal(flip_boxes(boxes.view(3, 100, 4), 137), old.view(3, 100, 4))


def test_scale_by_hand_and_equals_the_copies_it_replaced():
    assert scale_boxes(torch.tensor([[10.0, 20, 30, 40]]), 0.5, 2.0).tolist() == [[5.0, 40, 15, 80]]
    boxes = random_boxes(300, 3)
    sx, sy = 1333 / 640, 800 / 481
    old = boxes * torch.tensor([sx, sy, sx, sy])  # transforms.py (twice), detector.py: float32 factors
    assert torch.equal(scale_boxes(boxes, sx, sy), old)
    assert scale_boxes(boxes.bfloat16(), sx, sy).dtype == torch.float32  # as the float32 factors made it
    assert torch.equal(scale_boxes(boxes.bfloat16(), sx, sy), boxes.bfloat16() * torch.tensor([sx, sy, sx, sy]))
    assert scale_boxes(boxes.double(), sx, sy).dtype == torch.float64  # factors not rounded to float32
    assert scale_boxes(torch.zeros(0, 4), sx, sy).shape == (0, 4)
