"""Image batching shared by every detector: the resize rule (and, in `Detector`, normalize and pad)."""

from __future__ import annotations

import math


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
