"""Anchors -> ground truth (Focal Loss paper, sec. 4, "Anchors").

Labels: -1 ignore, 0 background, 1 foreground.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from ..syncs import to_device
from .boxes import box_ioa, box_iou

IGNORE, BACKGROUND, FOREGROUND = -1, 0, 1


def chunk_limit(device: torch.device, chunk_elems: Optional[int] = None) -> int:
    """How many IoU values matching computes at a time: `chunk_elems` if given, else by device. On the CPU a
    block that stays in cache with its temporaries, 1 << 20: 110,592 anchors x 50 boxes x 8 images (the dense
    shapes regime) match in 1.45 s instead of 3.97 s with 1 << 24 on one Zen 3 thread, with the same result
    (benchmarks/bench_matcher.py); on a GPU 1 << 24, fewer kernel launches."""
    if chunk_elems is not None:
        return chunk_elems
    return 1 << 20 if torch.device(device).type == "cpu" else 1 << 24


class Matcher:
    """Assign each anchor the ground-truth box it overlaps most, and a label.

    IoU >= high: foreground; IoU < low: background; in between: ignored. With
    `allow_low_quality`, each ground-truth box also claims the anchors of its highest IoU
    (ties included, only where that IoU > 0), as in the RPN rule the paper adopts; such an
    anchor keeps its own best box as its match.

    Worked example (high 0.5, low 0.4), IoU rows = 3 gt boxes, columns = 4 anchors:

        iou = [[0.9, 0.3, 0.0, 0.1],
               [0.1, 0.45, 0.2, 0.0],
               [0.0, 0.0, 0.35, 0.0]]
        matched = [0, 1, 2, 0]  (argmax over rows)
        labels  = [1, 1, 1, 0]  anchor 0: 0.9 fg; anchor 1: 0.45 would be ignored, but is gt 1's
                                best anchor; anchor 2: 0.35 would be background, but is gt 2's
                                best; anchor 3: 0.1 background.
    """

    def __init__(self, high: float = 0.5, low: float = 0.4, allow_low_quality: bool = True,
                 chunk_elems: Optional[int] = None):
        if low > high:
            raise ValueError(f"matcher: low threshold {low} is above high threshold {high}")
        self.high = high
        self.low = low
        self.allow_low_quality = allow_low_quality
        self.chunk_elems = chunk_elems

    def __call__(self, iou: Tensor, valid: Optional[Tensor] = None) -> tuple:
        """iou: (G, N) -> matched (N,) int64 index into the G boxes, labels (N,) int8 in {-1, 0, 1}.

        A padded batch works the same way: iou (B, G, N) with valid (B, G) bool (False for padding
        rows) -> matched (B, N), labels (B, N). An invalid row's IoU counts as -1, below every real
        one, so image b gets what its valid rows alone would give (index into G); ties go to the
        first row, as argmax does. With no (valid) box every anchor is background, matched 0 (to
        be ignored by the caller). No host synchronization, no data-dependent shapes.
        """
        if valid is not None:
            iou = torch.where(valid[..., None], iou, -1.0)
        if iou.shape[-2] == 0:
            shape = iou.shape[:-2] + iou.shape[-1:]
            return (torch.zeros(shape, dtype=torch.int64, device=iou.device),
                    torch.zeros(shape, dtype=torch.int8, device=iou.device))
        best, matched = iou.max(dim=-2)  # (..., N)
        labels = self._labels(best)
        if self.allow_low_quality:
            labels = torch.where(self._low_quality(iou), FOREGROUND, labels)
        return matched, labels

    def _labels(self, best: Tensor) -> Tensor:
        labels = torch.where(best < self.low, BACKGROUND, IGNORE).to(torch.int8)
        return torch.where(best >= self.high, FOREGROUND, labels).to(torch.int8)

    @staticmethod
    def _low_quality(iou: Tensor) -> Tensor:
        """(..., G, N) -> (..., N) bool: anchors whose IoU with some box equals that box's best (> 0)."""
        gt_best = iou.amax(dim=-1, keepdim=True)  # (..., G, 1)
        return ((iou == gt_best) & (gt_best > 0)).any(dim=-2)

    def match_boxes(self, gt_boxes: Tensor, anchors: Tensor, valid: Optional[Tensor] = None) -> tuple:
        """Like `__call__` on box_iou(gt_boxes, anchors), without holding the whole IoU matrix when
        it would exceed `chunk_elems` elements (default: `chunk_limit`'s): IoU is computed for a
        few boxes (of every image) at a time, at least one.

        gt_boxes (G, 4), or a padded batch (B, G, 4) with valid (B, G) bool; anchors (N, 4), or (B, N, 4)
        each image's own (the RoI heads' proposals) -> matched (N,) or (B, N) int64, labels (N,) or (B, N) int8.
        """
        g, n = gt_boxes.shape[-2], anchors.shape[-2]
        lead = gt_boxes.shape[:-2]  # () or (B,)
        per_row = n * math.prod(lead)  # IoU values of one row of every image
        limit = chunk_limit(anchors.device, self.chunk_elems)
        if g * per_row <= limit or g == 0:
            return self(box_iou(gt_boxes, anchors), valid)
        rows = max(1, limit // per_row)
        best = torch.full((*lead, n), -1.0, device=anchors.device)
        matched = torch.zeros((*lead, n), dtype=torch.int64, device=anchors.device)
        low_quality = torch.zeros((*lead, n), dtype=torch.bool, device=anchors.device)
        for start in range(0, g, rows):
            iou = box_iou(gt_boxes[..., start:start + rows, :], anchors)  # (..., rows, N)
            if valid is not None:
                iou = torch.where(valid[..., start:start + rows, None], iou, -1.0)
            chunk_best, chunk_idx = iou.max(dim=-2)
            better = chunk_best > best  # strict: earlier boxes win ties, as argmax does
            best = torch.where(better, chunk_best, best)
            matched = torch.where(better, chunk_idx + start, matched)
            if self.allow_low_quality:  # a row's best IoU is over all N anchors, all in this chunk
                low_quality |= self._low_quality(iou)
        labels = self._labels(best)
        if self.allow_low_quality:
            labels = torch.where(low_quality, FOREGROUND, labels)
        return matched, labels


def ignore_crowd(labels: Tensor, anchors: Tensor, crowd_boxes: Tensor, threshold: float,
                 valid: Optional[Tensor] = None, chunk_elems: Optional[int] = None) -> Tensor:
    """Background anchors covered by a crowd box for >= `threshold` of their own area become ignored.

    labels: (N,) in {-1, 0, 1}; anchors (N, 4); crowd_boxes (C, 4). Or a padded batch: labels
    (B, N), crowd_boxes (B, C, 4) with valid (B, C) bool (False: padding, or not a crowd box), anchors
    (N, 4) or each image's own (B, N, 4).
    Foreground anchors (matched to a real box) stay foreground. Returns new labels. The IoA is
    computed for a few crowd boxes at a time (at most about `chunk_elems` values), with no host
    synchronization.
    """
    c, n = crowd_boxes.shape[-2], anchors.shape[-2]
    if c == 0 or n == 0:  # (no anchors: an image with no proposals and only crowd boxes)
        return labels
    rows = max(1, chunk_limit(anchors.device, chunk_elems) // (n * math.prod(crowd_boxes.shape[:-2])))
    covered = torch.zeros(labels.shape, dtype=torch.bool, device=labels.device)
    for start in range(0, c, rows):
        ioa = box_ioa(crowd_boxes[..., start:start + rows, :], anchors, over="b")  # (..., rows, N), of each anchor
        if valid is not None:
            ioa = torch.where(valid[..., start:start + rows, None], ioa, -1.0)
        covered |= ioa.amax(dim=-2) >= threshold  # (..., N)
    return torch.where(covered & (labels == BACKGROUND), torch.full_like(labels, IGNORE), labels)


def split_crowd(target: dict, device=None) -> tuple:
    """One image's target {"boxes" (G, 4), "labels" (G,), optional "iscrowd" (G,)} ->
    (boxes (G', 4) float32, labels (G',) int64 of the non-crowd boxes, crowd boxes (C, 4)).
    Labels default to zeros when absent (the RPN needs boxes only)."""
    boxes = torch.as_tensor(target["boxes"], dtype=torch.float32, device=device).reshape(-1, 4)
    labels = target.get("labels")
    labels = (torch.zeros(boxes.shape[0], dtype=torch.int64, device=boxes.device) if labels is None
              else torch.as_tensor(labels, device=boxes.device).reshape(-1).to(torch.int64))
    if labels.shape[0] != boxes.shape[0]:
        raise ValueError(f"{boxes.shape[0]} boxes but {labels.shape[0]} labels")
    crowd = target.get("iscrowd")
    if crowd is None:
        return boxes, labels, boxes[:0]
    crowd = torch.as_tensor(crowd, device=boxes.device).reshape(-1).bool()
    return boxes[~crowd], labels[~crowd], boxes[crowd]


def pad_targets(targets: list, device=None) -> tuple:
    """Per-image targets [{"boxes" (G_i, 4), "labels" (G_i,), optional "iscrowd" (G_i,)}] -> one padded batch:
    boxes (B, G, 4) float32 xyxy, labels (B, G) int64, real (B, G) bool (a box that is not a crowd region),
    crowd (B, G) bool (None when no target has "iscrowd", or, on the CPU, none is set), with
    G = max(1, max G_i); padding rows are zero and in neither mask. Padded where the targets are (on
    the CPU: host work only), then moved to `device` without waiting for it. Shapes come from the
    tensors' sizes; values are read only from host memory (the crowd flags, on the CPU). A target whose
    labels or crowd flags are not one per box is a ValueError naming the image.
    """
    b = len(targets)
    src = targets[0]["boxes"].device if b else torch.device("cpu")
    g = max([1] + [t["boxes"].numel() // 4 for t in targets])
    boxes = torch.zeros(b, g, 4, dtype=torch.float32, device=src)
    labels = torch.zeros(b, g, dtype=torch.int64, device=src)
    present = torch.zeros(b, g, dtype=torch.bool, device=src)
    with_crowd = any("iscrowd" in t for t in targets)
    if with_crowd and src.type == "cpu":  # host memory: whether any box is a crowd region is free to read
        with_crowd = any(t["iscrowd"].numpy().any() for t in targets if "iscrowd" in t)
    crowd = torch.zeros(b, g, dtype=torch.bool, device=src)
    for i, t in enumerate(targets):
        n = t["boxes"].numel() // 4
        for key in ("labels", "iscrowd"):
            if key in t and t[key].numel() != n:
                raise ValueError(f"image {i}: {n} boxes but {t[key].numel()} {key}")
        boxes[i, :n] = t["boxes"].reshape(-1, 4)
        if "labels" in t:  # (the RPN's targets need boxes only)
            labels[i, :n] = t["labels"].reshape(-1)
        present[i, :n] = True
        if "iscrowd" in t:
            crowd[i, :n] = t["iscrowd"].reshape(-1).bool()
    if device is not None:
        boxes, labels, present, crowd = (to_device(x, device) for x in (boxes, labels, present, crowd))
    return boxes, labels, present & ~crowd, (present & crowd) if with_crowd else None


@torch.no_grad()
def match_targets(matcher: Matcher, anchors: Tensor, targets: list, crowd_ioa: float,
                  padded: Optional[tuple] = None) -> tuple:
    """Match anchors to each image's boxes, the whole batch at once: RetinaNet's and the RPN's anchors
    (N, 4), the same for every image, or the RoI heads' proposals, each image's own (B, N, 4).

    Returns labels (B, N) int8 in {-1 ignore, 0 background, 1 foreground}, matched boxes (B, N, 4)
    xyxy and matched classes (B, N) int64 (both meaningful where labels == 1; an image without boxes
    gets zeros). Crowd boxes match nothing, and background anchors they cover (IoA >= crowd_ioa) are
    ignored. The boxes are padded into (B, G, 4) with a mask, so the result is each image's own
    matching (tests/test_assign_targets.py, tests/test_roi_heads.py) without a host synchronization:
    label values are not checked here (`check_labels`). padded: `pad_targets(targets, anchors.device)`,
    if the caller has it already.
    """
    if padded is None:
        padded = pad_targets(targets, anchors.device)
    gt, gt_cls, real, crowd = padded  # (B, G, 4), (B, G), (B, G), (B, G) or None
    matched, labels = matcher.match_boxes(gt, anchors, valid=real)  # (B, N) index into G
    if crowd is not None:
        labels = ignore_crowd(labels, anchors, gt, crowd_ioa, valid=crowd, chunk_elems=matcher.chunk_elems)
    has_box = real.any(dim=1, keepdim=True)  # (B, 1)
    boxes = torch.where(has_box[..., None], gt.gather(1, matched[..., None].expand(-1, -1, 4)), 0.0)
    classes = torch.where(has_box, gt_cls.gather(1, matched), 0)
    return labels, boxes, classes


def check_labels(labels: Tensor, num_classes: int, names, valid: Optional[Tensor] = None) -> None:
    """Raise a ValueError "<name>: labels must be in 0..K-1, got [...]" unless every label is a class index.

    labels (G,) of one image, with `names` its name (e.g. "image 3 (image id 42)"); or a padded batch (B, G)
    with `names` one name per image and valid (B, G) bool, the entries that are labels (default: all). The
    first image with a bad label is named, with its labels. Checked in numpy on the host: free for CPU
    tensors (no tensor read that a device-sync check would count), one copy from an accelerator.
    """
    if labels.dim() == 1:
        labels, names, valid = labels[None], [names], None if valid is None else valid[None]
    labels = labels.detach().cpu().numpy()
    valid = np.ones(labels.shape, dtype=bool) if valid is None else valid.detach().cpu().numpy()
    bad = valid & ((labels < 0) | (labels >= num_classes))  # (B, G)
    if bad.any():
        i = int(np.flatnonzero(bad.any(axis=1))[0])
        raise ValueError(f"{names[i]}: labels must be in 0..{num_classes - 1}, got {labels[i][valid[i]].tolist()}")
