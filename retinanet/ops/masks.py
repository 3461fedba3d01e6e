"""Instance masks: COCO segmentations to bit masks and back, mask boxes, mask IoU, resize and flip.

The mask target interface (what the data pipeline gives a mask-producing model, and what the
RetinaNet model ignores):

    target["masks"]: (G, H, W) torch.uint8 bit masks, 1 inside the instance, one per box of
    target["boxes"] in the same order (crowd regions included, flagged by target["iscrowd"]);
    H, W are the image tensor's own size after the transforms (resized, maybe flipped). A model
    that pads its batch pads the masks the same way (zeros to the bottom and right), so mask
    pixel (y, x) is image pixel (y, x) before and after padding.

Pixel coordinates are continuous as everywhere in the package: pixel column i spans [i, i + 1), so a
mask's box is (first column, first row, last column + 1, last row + 1), xyxy.

COCO `segmentation` comes in three forms, all read by pycocotools' mask API (nothing here decodes
run lengths by hand): polygons (a list of flat [x1, y1, x2, y2, ...] lists), uncompressed RLE
({"size": [h, w], "counts": [int, ...]}, used for crowd regions) and compressed RLE
({"size": [h, w], "counts": "string"}, what results files and `encode_masks` hold).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


def segmentation_to_rle(segmentation, height: int, width: int) -> dict:
    """Any COCO segmentation -> one compressed RLE {"size": [height, width], "counts": bytes}.

    Polygons of one instance are merged (their union), as pycocotools' `COCO.annToRLE` does.
    The input is not checked: `retinanet.data.validate` checks annotations before they get here.
    """
    from pycocotools import mask as mask_api

    if isinstance(segmentation, list):  # polygons
        return mask_api.merge(mask_api.frPyObjects(segmentation, height, width))
    if isinstance(segmentation.get("counts"), list):  # uncompressed RLE
        return mask_api.frPyObjects(segmentation, height, width)
    counts = segmentation["counts"]
    return {"size": list(segmentation["size"]), "counts": counts.encode() if isinstance(counts, str) else counts}


def decode_rles(rles: Sequence[dict], height: int, width: int) -> np.ndarray:
    """Compressed RLEs of one image -> (G, height, width) uint8 bit masks (G may be 0)."""
    from pycocotools import mask as mask_api

    if not rles:
        return np.zeros((0, height, width), dtype=np.uint8)
    return np.ascontiguousarray(mask_api.decode(list(rles)).transpose(2, 0, 1))  # (H, W, G) -> (G, H, W)


def encode_masks(masks) -> list:
    """(D, H, W) bit masks (bool or uint8, numpy or torch, or `ops.segprop.RLEMasks`) -> D compressed RLEs with str
    counts (JSON-ready)."""
    from pycocotools import mask as mask_api

    from .segprop import RLEMasks

    if isinstance(masks, RLEMasks):  # run lengths already (segment proposals): never decoded
        return [dict(rle) for rle in masks.rles]
    masks = masks.detach().cpu().numpy() if isinstance(masks, Tensor) else np.asarray(masks)
    if masks.ndim != 3:
        raise ValueError(f"expected (D, H, W) masks, got shape {masks.shape}")
    if not len(masks):
        return []
    rles = mask_api.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))  # wants (H, W, D), Fortran
    return [{"size": [int(s) for s in r["size"]], "counts": r["counts"].decode("ascii")} for r in rles]


def masks_to_boxes(masks: Tensor) -> Tensor:
    """(G, H, W) bit masks -> (G, 4) float32 xyxy boxes of their pixels' edges; an empty mask gives zeros.

    Example: a mask whose pixels are rows 1-3 and columns 2-4 has the box (2, 1, 5, 4).
    """
    g, h, w = masks.shape
    if g == 0:
        return torch.zeros((0, 4), dtype=torch.float32, device=masks.device)
    rows, cols = masks.bool().any(dim=2), masks.bool().any(dim=1)  # (G, H), (G, W)
    iy = torch.arange(h, device=masks.device)
    ix = torch.arange(w, device=masks.device)
    x1 = torch.where(cols, ix, w).amin(dim=1)
    x2 = torch.where(cols, ix + 1, 0).amax(dim=1)
    y1 = torch.where(rows, iy, h).amin(dim=1)
    y2 = torch.where(rows, iy + 1, 0).amax(dim=1)
    boxes = torch.stack([x1, y1, x2, y2], dim=1).float()  # (G, 4)
    return torch.where(cols.any(dim=1, keepdim=True), boxes, torch.zeros_like(boxes))


def mask_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of every pair of bit masks: a (N, H, W), b (M, H, W) -> (N, M) float32; 0 where both are empty."""
    a = a.flatten(1).float()  # (N, H*W)
    b = b.flatten(1).float()  # (M, H*W)
    inter = a @ b.T  # (N, M)
    union = a.sum(1)[:, None] + b.sum(1)[None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=1), torch.zeros_like(inter))


def resize_masks(masks: Tensor, height: int, width: int) -> Tensor:
    """(G, h, w) bit masks -> (G, height, width), each new pixel taking the value under its centre.

    "nearest-exact" maps pixel centres (i + 0.5) * scale, the continuous-coordinate convention of the
    boxes, so a resized mask's box is its scaled box to within one pixel.
    """
    if masks.shape[-2:] == (height, width):
        return masks
    if masks.shape[0] == 0:
        return masks.new_zeros((0, height, width))
    return F.interpolate(masks[None], size=(height, width), mode="nearest-exact")[0]


def flip_masks(masks: Tensor) -> Tensor:
    """Mirror (G, H, W) masks left-right, as `RandomHorizontalFlip` mirrors the image."""
    return masks.flip(-1)
