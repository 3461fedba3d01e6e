"""Anchors -> ground truth (Focal Loss paper, sec. 4, "Anchors").

Labels: -1 ignore, 0 background, 1 foreground.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .boxes import box_ioa, box_iou

IGNORE, BACKGROUND, FOREGROUND = -1, 0, 1


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

    def __init__(self, high: float = 0.5, low: float = 0.4, allow_low_quality: bool = True, chunk_elems: int = 1 << 24):
        if low > high:
            raise ValueError(f"matcher: low threshold {low} is above high threshold {high}")
        self.high = high
        self.low = low
        self.allow_low_quality = allow_low_quality
        self.chunk_elems = chunk_elems

    def __call__(self, iou: Tensor) -> tuple:
        """iou: (G, N) -> matched (N,) int64 index into the G boxes, labels (N,) int8 in {-1, 0, 1}.

        With G = 0 every anchor is background (matched 0, to be ignored by the caller).
        """
        n = iou.shape[1]
        if iou.shape[0] == 0:
            return (torch.zeros(n, dtype=torch.int64, device=iou.device),
                    torch.zeros(n, dtype=torch.int8, device=iou.device))
        best, matched = iou.max(dim=0)  # (N,)
        labels = self._labels(best)
        if self.allow_low_quality:
            gt_best = iou.max(dim=1, keepdim=True).values  # (G, 1)
            low_quality = ((iou == gt_best) & (gt_best > 0)).any(dim=0)  # (N,)
            labels[low_quality] = FOREGROUND
        return matched, labels

    def _labels(self, best: Tensor) -> Tensor:
        labels = torch.full(best.shape, IGNORE, dtype=torch.int8, device=best.device)
        labels[best < self.low] = BACKGROUND
        labels[best >= self.high] = FOREGROUND
        return labels

    def match_boxes(self, gt_boxes: Tensor, anchors: Tensor) -> tuple:
        """Like `__call__` on box_iou(gt_boxes, anchors), without holding the whole (G, N) matrix
        when it would exceed `chunk_elems` elements: IoU is computed for a few boxes at a time."""
        g, n = gt_boxes.shape[0], anchors.shape[0]
        if g * n <= self.chunk_elems or g == 0:
            return self(box_iou(gt_boxes, anchors))
        rows = max(1, self.chunk_elems // n)
        best = torch.full((n,), -1.0, device=anchors.device)
        matched = torch.zeros(n, dtype=torch.int64, device=anchors.device)
        gt_best = []
        for start in range(0, g, rows):
            iou = box_iou(gt_boxes[start:start + rows], anchors)  # (rows, N)
            chunk_best, chunk_idx = iou.max(dim=0)
            better = chunk_best > best  # strict: earlier boxes win ties, as argmax does
            best = torch.where(better, chunk_best, best)
            matched = torch.where(better, chunk_idx + start, matched)
            gt_best.append(iou.max(dim=1).values)
        labels = self._labels(best)
        if self.allow_low_quality:
            gt_best = torch.cat(gt_best)  # (G,)
            low_quality = torch.zeros(n, dtype=torch.bool, device=anchors.device)
            for start in range(0, g, rows):
                iou = box_iou(gt_boxes[start:start + rows], anchors)
                col = gt_best[start:start + rows, None]
                low_quality |= ((iou == col) & (col > 0)).any(dim=0)
            labels[low_quality] = FOREGROUND
        return matched, labels


def ignore_crowd(labels: Tensor, anchors: Tensor, crowd_boxes: Tensor, threshold: float) -> Tensor:
    """Background anchors covered by a crowd box for >= `threshold` of their own area become ignored.

    labels: (N,) in {-1, 0, 1}; anchors (N, 4); crowd_boxes (C, 4). Foreground anchors (matched to
    a real box) stay foreground. Returns new labels.
    """
    if crowd_boxes.numel() == 0:
        return labels
    covered = box_ioa(anchors, crowd_boxes).amax(dim=1) >= threshold  # (N,)
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
