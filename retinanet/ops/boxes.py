"""Pure box math on (N, 4) tensors. Boxes are xyxy in absolute pixels unless a name says otherwise."""

from __future__ import annotations

import math

import torch
from torch import Tensor

DEFAULT_CLAMP = math.log(1000.0 / 16)


def box_area(boxes: Tensor) -> Tensor:
    """(..., 4) xyxy -> (...) areas; degenerate boxes have area 0."""
    return (boxes[..., 2] - boxes[..., 0]).clamp(min=0) * (boxes[..., 3] - boxes[..., 1]).clamp(min=0)


def _intersection(a: Tensor, b: Tensor) -> Tensor:
    """(..., N, 4), (..., M, 4) -> (..., N, M) intersection areas (leading dimensions broadcast).
    Width and height are computed apart: (..., N, M) results, which vectorize better than (..., N, M, 2)."""
    w = (torch.min(a[..., :, None, 2], b[..., None, :, 2]) - torch.max(a[..., :, None, 0], b[..., None, :, 0]))
    h = (torch.min(a[..., :, None, 3], b[..., None, :, 3]) - torch.max(a[..., :, None, 1], b[..., None, :, 1]))
    return w.clamp(min=0) * h.clamp(min=0)


def box_iou(a: Tensor, b: Tensor) -> Tensor:
    """(N, 4), (M, 4) xyxy -> (N, M) intersection over union (0 where the union is 0).

    Leading dimensions broadcast: (B, N, 4), (M, 4) -> (B, N, M), each entry computed as in the 2-D case."""
    inter = _intersection(a, b)
    union = box_area(a)[..., :, None] + box_area(b)[..., None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=torch.finfo(inter.dtype).tiny), torch.zeros_like(inter))


def box_ioa(a: Tensor, b: Tensor, over: str = "a") -> Tensor:
    """(N, 4), (M, 4) -> (N, M) intersection over the area of `a` (over="b": of `b`; 0 where that area
    is 0); leading dimensions broadcast as in `box_iou`."""
    inter = _intersection(a, b)
    area = box_area(a)[..., :, None] if over == "a" else box_area(b)[..., None, :]
    return torch.where(area > 0, inter / area.clamp(min=torch.finfo(inter.dtype).tiny), torch.zeros_like(inter))


def paired_iou(a: Tensor, b: Tensor) -> Tensor:
    """(..., 4), (..., 4) -> (...) IoU of a[i] with b[i]."""
    lt = torch.max(a[..., :2], b[..., :2])
    rb = torch.min(a[..., 2:], b[..., 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = box_area(a) + box_area(b) - inter
    return torch.where(union > 0, inter / union.clamp(min=torch.finfo(inter.dtype).tiny), torch.zeros_like(inter))


def paired_giou(a: Tensor, b: Tensor) -> Tensor:
    """(..., 4), (..., 4) -> (...) generalized IoU (Rezatofighi et al. 2019) of a[i] with b[i]."""
    lt = torch.max(a[..., :2], b[..., :2])
    rb = torch.min(a[..., 2:], b[..., 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = box_area(a) + box_area(b) - inter
    iou = inter / union.clamp(min=1e-7)
    hull_wh = (torch.max(a[..., 2:], b[..., 2:]) - torch.min(a[..., :2], b[..., :2])).clamp(min=0)
    hull = hull_wh[..., 0] * hull_wh[..., 1]
    return iou - (hull - union) / hull.clamp(min=1e-7)


def xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)


def cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)


def _centre_size(boxes: Tensor) -> Tensor:
    """(..., 4) xyxy -> (..., 4) cx, cy, w, h with cx = x0 + 0.5 w, the rounding torchvision's BoxCoder
    uses (not (x0 + x1) / 2, which can differ in the last bit), so decoded boxes match it bitwise."""
    w = boxes[..., 2] - boxes[..., 0]
    h = boxes[..., 3] - boxes[..., 1]
    return torch.stack([boxes[..., 0] + 0.5 * w, boxes[..., 1] + 0.5 * h, w, h], dim=-1)


def encode(anchors: Tensor, boxes: Tensor, weights=(1.0, 1.0, 1.0, 1.0)) -> Tensor:
    """R-CNN box parameterization (Girshick et al.): the deltas that take `anchors` to `boxes`.

    anchors, boxes: (..., 4) xyxy -> (..., 4) deltas (dx, dy, dw, dh), each times its weight:
    dx = wx * (x - xa) / wa, dw = ww * log(w / wa), and the same for y, h.
    """
    wx, wy, ww, wh = weights
    a = _centre_size(anchors)
    b = _centre_size(boxes)
    dx = wx * (b[..., 0] - a[..., 0]) / a[..., 2]
    dy = wy * (b[..., 1] - a[..., 1]) / a[..., 3]
    dw = ww * torch.log(b[..., 2] / a[..., 2])
    dh = wh * torch.log(b[..., 3] / a[..., 3])
    return torch.stack([dx, dy, dw, dh], dim=-1)


def decode(anchors: Tensor, deltas: Tensor, weights=(1.0, 1.0, 1.0, 1.0), clamp: float = DEFAULT_CLAMP) -> Tensor:
    """Inverse of `encode`: (..., 4) anchors xyxy and deltas -> (..., 4) boxes xyxy.

    dw, dh are clamped at `clamp` (log(1000/16) by default) so exp() cannot overflow. Computed in
    float32 whatever the input dtype: decoding in bf16 would move boxes by several pixels.
    """
    deltas = deltas.float()
    anchors = anchors.float()
    wx, wy, ww, wh = weights
    a = _centre_size(anchors)
    dx = deltas[..., 0] / wx
    dy = deltas[..., 1] / wy
    dw = (deltas[..., 2] / ww).clamp(max=clamp)
    dh = (deltas[..., 3] / wh).clamp(max=clamp)
    cx = dx * a[..., 2] + a[..., 0]
    cy = dy * a[..., 3] + a[..., 1]
    w = torch.exp(dw) * a[..., 2]
    h = torch.exp(dh) * a[..., 3]
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)


def clip_boxes(boxes: Tensor, height, width) -> Tensor:
    """Clip (..., 4) xyxy boxes to their image [0, width] x [0, height].

    height, width: numbers (one image), or tensors that broadcast with boxes[..., 0], one size per box:
    e.g. (N,) for N boxes of different images, (B, 1) for a (B, K, 4) batch of B images' boxes.
    """
    h = torch.as_tensor(height, dtype=boxes.dtype, device=boxes.device)[..., None]  # (..., 1), against (..., 2)
    w = torch.as_tensor(width, dtype=boxes.dtype, device=boxes.device)[..., None]
    x = boxes[..., 0::2].clamp(min=0).minimum(w)  # (..., 2) x0, x1
    y = boxes[..., 1::2].clamp(min=0).minimum(h)
    return torch.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], dim=-1)


def flip_boxes(boxes: Tensor, width) -> Tensor:
    """(..., 4) xyxy boxes in an image `width` pixels wide -> the same boxes in that image mirrored
    left-right: x -> width - x, so (x0, x1) -> (width - x1, width - x0). Its own inverse."""
    return torch.stack([width - boxes[..., 2], boxes[..., 1], width - boxes[..., 0], boxes[..., 3]], dim=-1)


def scale_boxes(boxes: Tensor, sx: float, sy: float) -> Tensor:
    """(..., 4) xyxy boxes times (sx, sy, sx, sy): the same boxes in the image resized by sx horizontally and
    sy vertically (sx = new width / width). The factors are float32 (float64 for float64 boxes), so the
    result is float32 for float32, bf16 or integer boxes."""
    dtype = torch.float64 if boxes.dtype == torch.float64 else torch.float32
    return boxes * torch.tensor([sx, sy, sx, sy], dtype=dtype, device=boxes.device)


def shift_boxes(boxes: Tensor, dx: float, dy: float) -> Tensor:
    """(..., 4) xyxy boxes plus (dx, dy, dx, dy): boxes of a crop whose top-left corner is at (dx, dy) in
    an image -> the same boxes in the image's pixels (tiled inference). float32 (float64 stays float64)."""
    dtype = torch.float64 if boxes.dtype == torch.float64 else torch.float32
    return boxes.to(dtype) + torch.tensor([dx, dy, dx, dy], dtype=dtype, device=boxes.device)
