"""Training transforms on (image, target) pairs: shorter-side resize with scale jitter, horizontal flip.

Each transform takes `image` (3, H, W) float in [0, 1], `target` {"boxes": (G, 4) xyxy absolute
pixels, ..., optional "masks": (G, H, W) uint8 bit masks} and a `torch.Generator` (None: torch's
global RNG), and returns the new pair; the boxes follow the pixels exactly, the masks to within a pixel
(resized by the value at each new pixel's centre, `ops.masks.resize_masks`). Pixel coordinates are
continuous: pixel column i spans [i, i + 1), so a box edge at x maps to x * new_width / width under
resizing and to width - x under a flip.

Resizing uses `retinanet.model.resized_size`, the rule the model applies at test time, and the same
interpolation (torch bilinear, align_corners=False, no antialiasing), so that a training image at
shorter side s looks like a test image at min_size s.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..ops.masks import flip_masks, resize_masks
from ..ops.transform import resized_size

SIZE_SAMPLING = ("choice", "range")


class Compose:
    """Apply transforms in order, all drawing from the same generator."""

    def __init__(self, transforms: Sequence):
        self.transforms = list(transforms)

    def __call__(self, image: Tensor, target: dict, generator: Optional[torch.Generator] = None) -> tuple:
        for t in self.transforms:
            image, target = t(image, target, generator)
        return image, target


class ResizeShortestSide:
    """Resize so the shorter side is a size drawn per image, unless the longer side would pass max_size.

    sizes: with sampling="choice", any of these, uniformly (one entry: no jitter); with "range",
        [lo, hi] and a uniform integer in lo..hi inclusive (detectron2's "range" sampling).
    max_size: cap on the longer side. rounding: as `resized_size` ("round" | "floor").
    """

    def __init__(self, sizes: Sequence[int], max_size: int, *, sampling: str = "choice", rounding: str = "round"):
        if sampling not in SIZE_SAMPLING:
            raise ValueError(f"size sampling must be one of {', '.join(SIZE_SAMPLING)}, got '{sampling}'")
        sizes = [int(s) for s in sizes]
        if not sizes or min(sizes) <= 0:
            raise ValueError(f"training sizes must be positive integers, got {sizes}")
        if sampling == "range" and (len(sizes) != 2 or sizes[0] > sizes[1]):
            raise ValueError(f"range sampling needs [lo, hi] with lo <= hi, got {sizes}")
        if max_size <= 0:
            raise ValueError(f"max_size must be positive, got {max_size}")
        self.sizes, self.max_size, self.sampling, self.rounding = sizes, int(max_size), sampling, rounding

    def draw_size(self, generator: Optional[torch.Generator] = None) -> int:
        """One shorter-side size; exactly one draw from the generator either way."""
        if self.sampling == "range":
            return int(torch.randint(self.sizes[0], self.sizes[1] + 1, (1,), generator=generator))
        return self.sizes[int(torch.randint(len(self.sizes), (1,), generator=generator))]

    def __call__(self, image: Tensor, target: dict, generator: Optional[torch.Generator] = None) -> tuple:
        height, width = image.shape[-2:]
        new_h, new_w = resized_size(height, width, self.draw_size(generator), self.max_size, self.rounding)
        if (new_h, new_w) == (height, width):
            return image, target
        image = F.interpolate(image[None], size=(new_h, new_w), mode="bilinear", align_corners=False)[0]
        scale = torch.tensor([new_w / width, new_h / height, new_w / width, new_h / height])  # (4,) x, y, x, y
        target = {**target, "boxes": target["boxes"] * scale}
        if "masks" in target:
            target["masks"] = resize_masks(target["masks"], new_h, new_w)
        return image, target


class RandomHorizontalFlip:
    """Mirror left-right with probability `prob`: x -> width - x, so (x1, x2) -> (width - x2, width - x1)."""

    def __init__(self, prob: float = 0.5):
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"flip probability must be in [0, 1], got {prob}")
        self.prob = prob

    def __call__(self, image: Tensor, target: dict, generator: Optional[torch.Generator] = None) -> tuple:
        if float(torch.rand((), generator=generator)) >= self.prob:  # always one draw, so the RNG stream is stable
            return image, target
        width = image.shape[-1]
        boxes = target["boxes"]  # (G, 4) xyxy
        flipped = torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)
        target = {**target, "boxes": flipped}
        if "masks" in target:
            target["masks"] = flip_masks(target["masks"])
        return image.flip(-1), target
