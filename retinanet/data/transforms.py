"""Training transforms on (image, target) pairs: shorter-side resize with scale jitter, large-scale
jitter (resize by a random factor, then a fixed-size square crop), horizontal flip.

Each transform takes `image` (3, H, W) float in [0, 1] (or a `PendingImage`: a uint8 image whose
pixel operations are recorded, to be applied later on the GPU), `target` {"boxes": (G, 4) xyxy absolute
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

from ..ops.boxes import flip_boxes, scale_boxes
from ..ops.masks import flip_masks, resize_masks
from ..ops.transform import resized_size
from ..syncs import to_device
from .images import to_chw

SIZE_SAMPLING = ("choice", "range")


# ----------------------------------------------------------------------------------------------
# pixel operations, now (float tensors) or later (PendingImage)


def resize_image(image, height: int, width: int):
    """(3, H, W) -> (3, height, width): torch bilinear, align_corners=False, no antialiasing."""
    if isinstance(image, PendingImage):
        return image.then("resize", height, width)
    return F.interpolate(image[None], size=(height, width), mode="bilinear", align_corners=False)[0]


def flip_image(image):
    """Mirror left-right."""
    if isinstance(image, PendingImage):
        return image.then("flip")
    return image.flip(-1)


def crop_pad_image(image, top: int, left: int, size: int, fill: Sequence[float]):
    """The size x size window at (top, left); where it passes the image's bottom or right edge,
    `fill` per channel."""
    if isinstance(image, PendingImage):
        return image.then("crop", top, left, size, tuple(fill))
    window_h, window_w = min(size, image.shape[1] - top), min(size, image.shape[2] - left)
    out = image.new_empty(image.shape[0], size, size)
    for channel, value in zip(out, fill):  # a fill per channel, no host-to-device copy
        channel.fill_(value)
    out[:, :window_h, :window_w] = image[:, top:top + window_h, left:left + window_w]
    return out


_APPLY = {"resize": resize_image, "flip": flip_image, "crop": crop_pad_image}


class PendingImage:
    """A uint8 image and the pixel operations the transforms chose for it, applied later.

    The training loader of a GPU run keeps images in uint8 until they reach the device: a quarter of
    float32's bytes through the worker queues, pinned memory and the copy, and the conversion,
    resizing, cropping and flipping run on the GPU. `realize` applies the operations a float image
    would have had on the CPU, with the same functions in the same order, so on the same device the
    result is bitwise that of the float path (tests/data/test_pending_images.py).

    data: (3, H, W) uint8, as `from_array` makes it (`images.to_chw`: a view of the (H, W, 3) array,
    whose channels-last strides the copies keep, as the float path's conversion does).
    ops: ("resize", h, w) | ("flip",) | ("crop", top, left, size, fill), in order.
    """

    def __init__(self, data: Tensor, ops: tuple = ()):
        if data.dtype != torch.uint8 or data.dim() != 3:
            raise ValueError(f"PendingImage needs a (3, H, W) uint8 tensor, got {data.dtype} {tuple(data.shape)}")
        self.data, self.ops = data, tuple(ops)

    @classmethod
    def from_array(cls, array) -> "PendingImage":
        """(H, W, 3) uint8 numpy array (`load_image`) -> a PendingImage with no operations."""
        return cls(to_chw(array))

    @property
    def shape(self) -> torch.Size:
        """(3, H, W) after the operations."""
        h, w = self.data.shape[1:]
        for op in self.ops:
            if op[0] == "resize":
                h, w = op[1], op[2]
            elif op[0] == "crop":
                h = w = op[3]
        return torch.Size((self.data.shape[0], h, w))

    def then(self, *op) -> "PendingImage":
        return PendingImage(self.data, self.ops + (op,))

    def pin_memory(self) -> "PendingImage":
        """The same image in pinned memory (DataLoader(pin_memory=True) calls this)."""
        return PendingImage(self.data.pin_memory(), self.ops)

    def realize(self, device=None) -> Tensor:
        """(3, H, W) float32 in [0, 1] on `device` (default: where the data is): the uint8 data is
        copied there first (`syncs.to_device`: without waiting), then converted (as
        `images.to_tensor`) and the operations applied."""
        image = self.data if device is None else to_device(self.data, device)
        image = image.to(torch.float32).div_(255.0)
        for name, *args in self.ops:
            image = _APPLY[name](image, *args)
        return image


# ----------------------------------------------------------------------------------------------
# transforms


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
        image = resize_image(image, new_h, new_w)
        target = {**target, "boxes": scale_boxes(target["boxes"], new_w / width, new_h / height)}
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
        target = {**target, "boxes": flip_boxes(target["boxes"], width)}  # (G, 4) xyxy
        if "masks" in target:
            target["masks"] = flip_masks(target["masks"])
        return flip_image(image), target


class ScaleJitterCrop:
    """Large-scale jitter (Ghiasi et al. 2021, "Simple Copy-Paste", sec. 3; detectron2's LSJ recipe
    `ResizeScale` + `FixedSizeCrop`, torchvision's reference `ScaleJitter` + `FixedSizeCrop`): resize so
    the image fits in a crop_size x crop_size square times a factor drawn uniformly from `scale_range`,
    then take a random crop_size x crop_size window, padding at the bottom and right where the image is
    smaller. Every output is crop_size x crop_size.

    Resize: r = factor * min(crop_size / H, crop_size / W), new size (round(H r), round(W r)) (the
    references' rule; torchvision truncates, detectron2 rounds); bilinear as `ResizeShortestSide`.
    Crop: top and left drawn independently and uniformly from 0..max(new - crop_size, 0) (the
    references draw one fraction for both). Padding: `fill` per channel (e.g. the model's pixel mean,
    so it normalizes to 0 like the model's own batch padding); masks pad with 0.
    Boxes: shifted by the crop and clipped to the image pixels inside the window; a box (crowd or not)
    left with no area is dropped with its label, crowd flag and mask, like detectron2 and torchvision
    (no minimum fraction of the original area). An image may be left with no boxes: a negative.
    """

    def __init__(self, crop_size: int, scale_range: Sequence[float], fill: Sequence[float] = (0.0, 0.0, 0.0)):
        lo, hi = (float(x) for x in scale_range)
        if crop_size <= 0 or not 0 < lo <= hi:
            raise ValueError(f"scale jitter needs crop_size > 0 and 0 < min <= max, got {crop_size}, {[lo, hi]}")
        self.crop_size, self.scale_range, self.fill = int(crop_size), (lo, hi), tuple(float(f) for f in fill)

    def draw(self, height: int, width: int, generator: Optional[torch.Generator] = None) -> tuple:
        """(new height, new width, top, left) for one image; exactly three draws from the generator."""
        lo, hi = self.scale_range
        factor = lo + (hi - lo) * float(torch.rand((), generator=generator))
        r = factor * min(self.crop_size / height, self.crop_size / width)
        new_h, new_w = max(1, round(height * r)), max(1, round(width * r))
        top = int(torch.randint(max(new_h - self.crop_size, 0) + 1, (1,), generator=generator))
        left = int(torch.randint(max(new_w - self.crop_size, 0) + 1, (1,), generator=generator))
        return new_h, new_w, top, left

    def apply(self, image: Tensor, target: dict, new_h: int, new_w: int, top: int, left: int) -> tuple:
        """Resize to (new_h, new_w), crop the window at (top, left), pad to crop_size (see the class)."""
        height, width = image.shape[-2:]
        size = self.crop_size
        boxes = target["boxes"]  # (G, 4) xyxy
        masks = target.get("masks")  # (G, H, W) uint8 or None
        if (new_h, new_w) != (height, width):
            image = resize_image(image, new_h, new_w)
            boxes = scale_boxes(boxes, new_w / width, new_h / height)
            if masks is not None:
                masks = resize_masks(masks, new_h, new_w)
        window_h, window_w = min(size, new_h - top), min(size, new_w - left)  # image pixels inside the crop
        out = crop_pad_image(image, top, left, size, self.fill)  # (3, size, size)
        boxes = boxes - torch.tensor([left, top, left, top], dtype=boxes.dtype)
        limit = torch.tensor([window_w, window_h, window_w, window_h], dtype=boxes.dtype)
        boxes = torch.minimum(boxes.clamp(min=0), limit)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])  # (G,) some area left
        target = {**target, "boxes": boxes[keep]}
        for key in ("labels", "iscrowd"):
            if key in target:
                target[key] = target[key][keep]
        if masks is not None:
            cropped = masks.new_zeros((int(keep.sum()), size, size))  # (G', size, size)
            cropped[:, :window_h, :window_w] = masks[keep][:, top:top + window_h, left:left + window_w]
            target["masks"] = cropped
        return out, target

    def __call__(self, image: Tensor, target: dict, generator: Optional[torch.Generator] = None) -> tuple:
        return self.apply(image, target, *self.draw(*image.shape[-2:], generator=generator))
