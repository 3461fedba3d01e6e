"""RoI features from a feature pyramid (thesis ch. 4, sec. 4.4; FPN paper eq. (1)).

A RoI of width w and height h (image pixels) is pooled from level
    k = floor(k0 + log2(sqrt(w h) / 224)),  clamped to [min_level, max_level],
k0 = 4 (thesis eq. (4.1)): a 224 x 224 RoI, ImageNet's canonical size, reads P4.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .boxes import box_area
from .roi_align import roi_align, roi_pool


def assign_levels(boxes: Tensor, min_level: int = 2, max_level: int = 5, canonical_size: float = 224,
                  canonical_level: int = 4, eps: float = 1e-6) -> Tensor:
    """Eq. (4.1): boxes (R, 4) xyxy in image pixels -> (R,) int64 pyramid level k in [min_level, max_level].

    k = floor(canonical_level + log2(sqrt(area) / canonical_size) + eps), in float32 and in that
    order, as torchvision's LevelMapper computes it: the eps puts a box exactly at a boundary
    (sqrt(area) = 112, 224, 448) on the upper level despite rounding in log2. Boxes of zero
    area go to min_level.
    """
    scale = torch.sqrt(box_area(boxes.float()))  # (R,)
    k = torch.floor(canonical_level + torch.log2(scale / canonical_size) + torch.tensor(eps, dtype=torch.float32))
    return k.clamp(min_level, max_level).to(torch.int64)


def as_rois(boxes: Tensor, image: Tensor) -> Tensor:
    """boxes (R, 4), image (R,) the image index of each -> (R, 5) rois [image index, x0, y0, x1, y1]."""
    return torch.cat([image[:, None].to(torch.float32), boxes.float()], dim=1)


def concat_images(boxes: list) -> tuple:
    """Per-image boxes [(R_i, 4)] -> boxes (sum R_i, 4), image (sum R_i,) int64 the image index of each."""
    image = torch.cat([torch.full((b.shape[0],), i, dtype=torch.int64, device=b.device) for i, b in enumerate(boxes)])
    return torch.cat(boxes), image


def split_images(x: Tensor, image: Tensor, num_images: int) -> list:
    """x (R, ...) grouped by image, image (R,) -> num_images tensors, one per image (a host sync)."""
    return list(x.split(torch.bincount(image, minlength=num_images).tolist()))


def boxes_to_rois(boxes: list) -> Tensor:
    """Per-image boxes [(R_i, 4)] -> (sum R_i, 5) rois [image index, x0, y0, x1, y1]."""
    return as_rois(*concat_images(boxes))


def pool_pyramid(features: list, boxes, strides, output_size=7, sampling_ratio: int = 2, aligned: bool = False,
                 method: str = "align", canonical_size: float = 224, canonical_level: int = 4,
                 backend: Optional[str] = None) -> Tensor:
    """RoI features of every image's boxes, each from its eq. (4.1) level.

    features: [(B, C, H_l, W_l)] for the levels P_min..P_max (e.g. P2-P5; strides 4..32);
    boxes: rois (R, 5) [image index, x0, y0, x1, y1] or B tensors (R_i, 4), xyxy in the padded
    batch's pixels; strides: one per level, powers of 2. Returns (R, C, h, w), in the order of the
    rois (of torch.cat(boxes)).

    method "align": RoIAlign (sampling_ratio, aligned as `roi_align`); "pool": RoI max pooling.
    backend: passed to `roi_align` / `roi_pool` (None: their default, torchvision's kernel when importable, else ours).
    torchvision's MultiScaleRoIAlign infers each level's scale as 2^round(log2(H_l / max h_i)) from
    the largest resized image height; when the batch is padded to a multiple of the coarsest
    stride (32) that is exactly 1 / stride, which is what is used here.
    """
    if method not in ("align", "pool"):
        raise ValueError(f"pooling method must be 'align' or 'pool', got '{method}'")
    if len(features) != len(strides):
        raise ValueError(f"{len(features)} feature maps for {len(strides)} strides")
    levels_of = [int(round(math.log2(s))) for s in strides]
    if any(2 ** lv != s for lv, s in zip(levels_of, strides)):
        raise ValueError(f"strides must be powers of 2, got {list(strides)}")
    rois = (boxes if isinstance(boxes, Tensor) else boxes_to_rois(boxes)).to(features[0].device)  # (R, 5)
    level = assign_levels(rois[:, 1:], levels_of[0], levels_of[-1], canonical_size, canonical_level)  # (R,)
    kwargs = {} if backend is None else {"backend": backend}
    out = None
    for feat, lv, stride in zip(features, levels_of, strides):
        idx = torch.nonzero(level == lv, as_tuple=True)[0]  # (R_l,)
        if method == "align":
            pooled = roi_align(feat, rois[idx], output_size, 1.0 / stride, sampling_ratio, aligned, **kwargs)
        else:
            pooled = roi_pool(feat, rois[idx], output_size, 1.0 / stride, **kwargs)
        if out is None:
            out = pooled.new_zeros((rois.shape[0],) + pooled.shape[1:])  # (R, C, h, w)
        out.index_put_((idx,), pooled)  # (autograd takes it; the ONNX graph's ScatterND)
    return out
