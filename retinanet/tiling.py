"""Tiled inference for images much larger than the ones a model was trained on (SAHI: Akyol et al. 2022).

A model resizes every image to its `min_size` / `max_size` rule, so a 2048 x 2048 scene given to a
model trained at 192 px shrinks ~10x and its 20 px objects become 2 px. Tiled inference cuts the
image into overlapping `tile` x `tile` crops and runs each crop through the model's own inference
path (`Detector.preprocess`, `run_network`, `postprocess`: the crop is resized exactly as the model
resizes any image), optionally plus the whole image resized as usual (SAHI's "standard prediction",
which keeps the objects larger than a tile). Each crop's detections come back in the crop's pixels
and are shifted by the crop's corner into the image's; then the passes are merged.

Tile size and the model's scale: a `tile` x `tile` crop is resized like any image, by
min(min_size / tile, max_size / tile). `tile = min(min_size, max_size)` runs the crops at the image's
own resolution (scale 1), the scale at which the objects should look as they did in training when
the large image has the training set's pixel size; a larger tile is shrunk (fewer, coarser crops), a
smaller one enlarged. Where the image is smaller than `tile` along a side, the crops take the image's
whole side (one crop: the image itself, which is then exactly the untiled prediction).

Grid (`tile_starts`): along a side of L px, n = 1 + ceil((L - tile) / step) crops, step = tile -
floor(overlap * tile), the first at 0 and the last ending at L, the others spread evenly between
(start_i = round(i * (L - tile) / (n - 1))): every overlap is at least the one asked for, and the last
crop is shifted inward rather than left as a sliver (SAHI shifts only the last one; spreading them
gives the same number of crops with no near-duplicate pair).

Merging (`merge_tiled`): an object cut by a crop border is seen whole by the crop that overlaps it and
as a part by the other; the part's box lies inside the whole's.
- "nms": class-aware NMS at the model's NMS threshold (retinanet/ops/nms.py), best first.
- "greedy_nmm": SAHI's greedy non-maximum merging (its default postprocess, GREEDYNMM with the IOS
  match metric at 0.5): best first, each kept box absorbs the lower-scored boxes of its class whose
  intersection over the smaller box's area is >= the threshold; the kept box grows to the union of
  the boxes it absorbs and keeps its class and its (the best) score. A half box inside the whole has
  IoS ~1 but IoU ~0.5, which NMS at 0.5 may keep as a second detection.
Measured on the large-scene set (benchmarks/bench_tiling.py, BENCHMARKS.md "Tiled inference for large
images"), NMS wins by far at the score threshold COCO evaluation uses (0.05), and so is DEFAULT_MERGE:
among the many low-scored boxes a detector keeps there, one that covers a real object and part of its
neighbour has IoS 1 with the object's box, and merging grows that box into the union. At SAHI's usual
score threshold (0.3, where such boxes are gone) the two merges are close.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional

import torch
from torch import Tensor

from .ops.boxes import box_area, box_ioa, shift_boxes
from .ops.nms import batched_nms

MERGE_METHODS = ("nms", "greedy_nmm")
DEFAULT_MERGE = "nms"  # measured: BENCHMARKS.md "Tiled inference for large images"
DEFAULT_OVERLAP = 0.25
DEFAULT_MATCH_THRESHOLD = 0.5  # SAHI's postprocess_match_threshold (IOS)


def check_tiling(tile, overlap: float, merge: str = DEFAULT_MERGE) -> None:
    """Raise a ValueError (one line) for a tile size that is not a positive integer, an overlap outside
    [0, 1) or an unknown merge method."""
    if isinstance(tile, bool) or not isinstance(tile, numbers.Integral) or tile < 1:
        raise ValueError(f"tile must be a positive number of pixels, got {tile!r}")
    if not (isinstance(overlap, (int, float)) and 0.0 <= overlap < 1.0):
        raise ValueError(f"tile overlap must be in [0, 1) (a fraction of the tile), got {overlap!r}")
    if merge not in MERGE_METHODS:
        raise ValueError(f"unknown tile merge '{merge}'; use one of {', '.join(MERGE_METHODS)}")


def tile_starts(length: int, tile: int, overlap: float) -> list:
    """Start offsets of the crops along one side of `length` px (see the module docstring): each crop
    spans [start, start + min(tile, length)). Example: length 500, tile 192, overlap 0.25: step 144,
    n = 1 + ceil(308 / 144) = 4, starts [0, 103, 205, 308]."""
    check_tiling(tile, overlap)
    if length <= tile:
        return [0]
    step = tile - int(math.floor(overlap * tile))  # >= 1 since overlap < 1
    n = 1 + math.ceil((length - tile) / step)
    return [round(i * (length - tile) / (n - 1)) for i in range(n)]


def tile_grid(height: int, width: int, tile: int, overlap: float) -> list:
    """The crops of a height x width image: [(x0, y0, x1, y1)] integer pixel corners, row by row (all the
    same size: min(tile, height) x min(tile, width))."""
    tile = int(tile)
    th, tw = min(tile, height), min(tile, width)
    xs, ys = tile_starts(width, tile, overlap), tile_starts(height, tile, overlap)
    return [(x, y, x + tw, y + th) for y in ys for x in xs]


def greedy_nmm(boxes: Tensor, scores: Tensor, groups: Tensor,
               match_threshold: float = DEFAULT_MATCH_THRESHOLD) -> tuple:
    """SAHI's greedy non-maximum merging with the IoS match metric, within each group (class).

    boxes (N, 4) xyxy, scores (N,), groups (N,) int. In order of decreasing score, each box not yet
    absorbed is kept and absorbs the remaining boxes of its group whose IoS with it (intersection over
    the smaller of the two areas) is >= match_threshold; it then merges them in order of decreasing
    score, each only if it still matches the grown box (IoS >= match_threshold), into the union of the
    two boxes; a member that no longer matches is dropped (as in SAHI: its cluster took it). Scores
    stay the kept box's (the best of its cluster).
    -> (kept indices (M,) by decreasing score, merged boxes (M, 4) float32).
    """
    boxes = boxes.float()
    n = boxes.shape[0]
    if n == 0:
        return torch.zeros(0, dtype=torch.int64, device=boxes.device), boxes.new_zeros(0, 4)
    order = torch.sort(scores.float(), descending=True, stable=True).indices.tolist()
    rank = [0] * n
    for r, i in enumerate(order):
        rank[i] = r
    areas = box_area(boxes).tolist()
    pairs = _near_pairs(boxes, groups)  # (P, 2)
    ios = _ios(boxes[pairs[:, 0], None], boxes[pairs[:, 1], None])[:, 0, 0]  # (P,) one call for all pairs
    matches = [[] for _ in range(n)]  # i -> the boxes of its group with IoS >= match_threshold
    for i, j in pairs[ios >= match_threshold].tolist():
        matches[i].append(j)
        matches[j].append(i)
    free = [True] * n
    kept, merged = [], []
    for i in order:
        if not free[i]:
            continue
        free[i] = False
        members = sorted((j for j in matches[i] if free[j]), key=rank.__getitem__)  # best first
        box = boxes[i:i + 1]  # (1, 4)
        for j in members:  # SAHI checks each against the box merged so far
            free[j] = False
            # no need to compute where it cannot fail: the merged box holds box i, so a member no larger
            # than box i (IoS = intersection / its own area) intersects it at least as much as box i
            if areas[j] <= areas[i] or float(_ios(box, boxes[j:j + 1])[0, 0]) >= match_threshold:
                box = torch.cat([torch.minimum(box[:, :2], boxes[j:j + 1, :2]),
                                 torch.maximum(box[:, 2:], boxes[j:j + 1, 2:])], dim=1)
        kept.append(i)
        merged.append(box)
    return torch.tensor(kept, dtype=torch.int64, device=boxes.device), torch.cat(merged)


def _near_pairs(boxes: Tensor, groups: Tensor, cell: float = 64.0) -> Tensor:
    """boxes (N, 4) xyxy, groups (N,) -> (P, 2) int64 pairs (i < j) of the same group whose boxes share a
    cell of a `cell` px grid: every pair that may intersect, among the ~10^4 boxes of a scene's crops,
    found without an N x N matrix."""
    cells = torch.floor(boxes.detach().cpu().double() / cell).long().tolist()  # (N, 4) cell ranges
    buckets: dict = {}
    for i, ((cx0, cy0, cx1, cy1), g) in enumerate(zip(cells, groups.tolist())):
        for cy in range(cy0, cy1 + 1):
            for cx in range(cx0, cx1 + 1):
                buckets.setdefault((g, cx, cy), []).append(i)
    pairs = {(a, b) for members in buckets.values() for k, a in enumerate(members) for b in members[k + 1:]}
    return torch.tensor(sorted(pairs), dtype=torch.int64, device=boxes.device).reshape(-1, 2)


def _ios(a: Tensor, b: Tensor) -> Tensor:
    """(N, 4), (M, 4) xyxy -> (N, M) intersection over the smaller of the two areas (SAHI's IOS):
    the larger of the intersection over a's area and over b's."""
    return torch.maximum(box_ioa(a, b, over="a"), box_ioa(a, b, over="b"))


def merge_tiled(parts: list, *, method: str = DEFAULT_MERGE, nms_thresh: float = 0.5, max_detections: int = 100,
                class_agnostic: bool = False, match_threshold: float = DEFAULT_MATCH_THRESHOLD) -> dict:
    """The detections of one image's passes (crops shifted into the image's pixels, and the whole image),
    each {"boxes" (D, 4) xyxy, "scores" (D,), "labels" (D,)} -> one set, the best `max_detections` by
    decreasing score. method "nms": NMS per class (across classes with `class_agnostic`) at `nms_thresh`;
    "greedy_nmm": `greedy_nmm` per class (likewise) at `match_threshold`."""
    if method not in MERGE_METHODS:
        raise ValueError(f"unknown tile merge '{method}'; use one of {', '.join(MERGE_METHODS)}")
    boxes = torch.cat([p["boxes"].float() for p in parts])  # (N, 4) xyxy, all passes
    scores = torch.cat([p["scores"].float() for p in parts])  # (N,)
    labels = torch.cat([p["labels"] for p in parts])  # (N,)
    groups = torch.zeros_like(labels) if class_agnostic else labels
    if method == "nms":
        keep = batched_nms(boxes, scores, groups, nms_thresh)[:max_detections]
        return {"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]}
    keep, merged = greedy_nmm(boxes, scores, groups, match_threshold)
    return {"boxes": merged[:max_detections], "scores": scores[keep[:max_detections]],
            "labels": labels[keep[:max_detections]]}


def tiled_detections(model, images: list, *, tile: int, overlap: float = DEFAULT_OVERLAP, full_image: bool = True,
                     merge: str = DEFAULT_MERGE, batch_size: int = 4, network=None, device=None,
                     score_thresh: Optional[float] = None, nms_thresh: Optional[float] = None,
                     max_detections: Optional[int] = None, class_agnostic: Optional[bool] = None,
                     keep_classes: Optional[Tensor] = None,
                     match_threshold: float = DEFAULT_MATCH_THRESHOLD) -> list:
    """Detections of `model` (a box Detector) on `images` ((3, H, W) tensors, uint8 or float in [0, 1]) by
    tiled inference: per image its `tile_grid` crops (`batch_size` crops per forward pass, across images),
    plus with `full_image` the whole image (skipped where one crop is the whole image), each through
    `model.preprocess` / `network` / `model.postprocess` with the given settings (each pass keeps up to
    `max_detections`); crop detections shifted by the crop's corner, then `merge_tiled` -> per image
    {"boxes" xyxy in the image's pixels, "scores", "labels"}, the best `max_detections`.

    An image that is one crop (no side longer than `tile`) gets the model's own detections, unmerged:
    exactly the untiled prediction. network: what runs the network on an ImageBatch (default
    model.run_network; `Predictor` passes its own).
    """
    check_tiling(tile, overlap, merge)
    if getattr(model, "class_agnostic_proposals", False):
        raise ValueError("tiled inference merges boxes, not masks: it does not apply to segment proposals")
    network = network or model.run_network
    settings = dict(score_thresh=score_thresh, nms_thresh=nms_thresh, max_detections=max_detections,
                    class_agnostic=class_agnostic, keep_classes=keep_classes)
    passes = [[] for _ in images]  # per image: its passes' detections in its pixels
    crops = []  # (image index, x0, y0, (3, h, w) crop)
    whole = []  # indices of the images that also run whole
    for i, image in enumerate(images):
        grid = tile_grid(image.shape[-2], image.shape[-1], tile, overlap)
        crops += [(i, x0, y0, image[:, y0:y1, x0:x1]) for x0, y0, x1, y1 in grid]
        if full_image and len(grid) > 1:
            whole.append(i)

    def run(inputs: list) -> list:
        batch = model.preprocess(inputs, device=device)
        return model.postprocess(network(batch), batch, **settings)

    for start in range(0, len(crops), batch_size):
        chunk = crops[start:start + batch_size]
        for (i, x0, y0, _), det in zip(chunk, run([c for *_, c in chunk])):
            passes[i].append(dict(det, boxes=shift_boxes(det["boxes"], x0, y0)) if (x0, y0) != (0, 0) else det)
    for start in range(0, len(whole), batch_size):
        chunk = whole[start:start + batch_size]
        for i, det in zip(chunk, run([images[i] for i in chunk])):
            passes[i].append(det)
    nms = model.nms_thresh if nms_thresh is None else float(nms_thresh)
    cap = model.detections_per_image if max_detections is None else int(max_detections)
    agnostic = model.class_agnostic_nms if class_agnostic is None else bool(class_agnostic)
    return [parts[0] if len(parts) == 1 else
            merge_tiled(parts, method=merge, nms_thresh=nms, max_detections=cap, class_agnostic=agnostic,
                        match_threshold=match_threshold)
            for parts in passes]
