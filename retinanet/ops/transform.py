"""Image batching shared by every detector: the resize rule and the default image sizes of a padded batch
(and, in `Detector`, normalize and pad)."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def resized_size(height: int, width: int, min_size: int, max_size: int, rounding: str = "round") -> tuple:
    """Shorter side to `min_size`, unless the longer side would pass `max_size` (then that is capped).

    rounding "floor" is torchvision's GeneralizedRCNNTransform (checked against torchvision 0.29):
    the scale in float64, then interpolate(scale_factor=..., recompute_scale_factor=True) floors
    size * scale. E.g. 375 x 500 -> 800 x 1066 (rounding gives 800 x 1067).
    Each side is at least 1 pixel: at an aspect ratio above 2 max_size (2666 for 1333; with "floor",
    above max_size) the shorter side would otherwise be 0, e.g. 1 x 3000 -> 1 x 1333.
    """
    scale = min(min_size / min(height, width), max_size / max(height, width))
    if rounding == "floor":
        return max(1, int(math.floor(height * scale))), max(1, int(math.floor(width * scale)))
    return max(1, int(round(height * scale))), max(1, int(round(width * scale)))


def scaled_limits(min_size: int, max_size: int, scale: float) -> tuple:
    """The resize limits (min_size, max_size) scaled by `scale`, each rounded to a pixel: how a model is run
    at another test size (test-time augmentation's scales; `tools/speed_accuracy.py`'s sizes, scale =
    size / min_size), the longer side's cap moving with the shorter side's target."""
    return int(round(min_size * scale)), int(round(max_size * scale))


def resized_size_tensor(size: Tensor, min_size: int, max_size: int, rounding: str = "round") -> Tensor:
    """`resized_size` in tensor operations, for a graph that does not know the image's size (the end-to-end
    ONNX export, retinanet/export.py): size (2,) int64 (height, width) -> (2,) int64 resized (height, width).

    The same numbers as `resized_size`: float64 like Python's floats, and torch.round (ONNX Round)
    rounds halves to even as Python's round() does.
    """
    s = size.to(torch.float64)  # (2,)
    # (1,) tensors, not numbers or 0-d tensors: `number / tensor` is reciprocal() * number in PyTorch, and
    # the torchscript ONNX exporter computes 0-d tensors' arithmetic in float32; both round differently
    lo, hi = (torch.full((1,), float(v), dtype=torch.float64, device=size.device) for v in (min_size, max_size))
    scale = torch.minimum(lo / s.amin(dim=0, keepdim=True), hi / s.amax(dim=0, keepdim=True))  # (1,)
    out = torch.floor(s * scale) if rounding == "floor" else torch.round(s * scale)
    return out.clamp(min=1).to(torch.int64)


def default_image_sizes(images: Tensor, image_sizes=None) -> Tensor:
    """The (h, w) of each image in a padded batch, for a network that takes them: images (B, C, H, W),
    image_sizes (B, 2) int (h, w) of each image's region (top-left) as given (a tensor, returned as is,
    or a list of pairs), or None: every image fills the batch, (H, W) each. -> (B, 2) int64 on the
    images' device."""
    if image_sizes is None:
        return torch.tensor([images.shape[-2:]], dtype=torch.int64, device=images.device).expand(images.shape[0], 2)
    if isinstance(image_sizes, Tensor):
        return image_sizes
    return torch.as_tensor(image_sizes, dtype=torch.int64, device=images.device).reshape(-1, 2)
