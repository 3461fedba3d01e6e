"""Greedy non-maximum suppression: torchvision's kernel when it imports and works, else our own.

Our NMS is exact greedy NMS (a box is dropped when its IoU with a kept, higher-scoring box of the
same group is > threshold), done with tensor ops: candidates are sorted by (group, score) and
processed in blocks; within a block the greedy rule keep[j] = not any(keep[i] and iou[i, j] > t,
i < j) is solved by fixed-point iteration (it has one solution, reached after at most block-size
iterations, usually a handful), and a block is first pruned by the kept boxes of its own group
from earlier blocks. Memory stays O(block * kept-in-group).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from .boxes import box_iou


@functools.lru_cache(maxsize=1)
def torchvision_batched_nms():
    """Batched NMS on torchvision's kernel if torchvision imports and its kernel runs, else None.

    One kernel call for all groups (torchvision.ops.batched_nms loops over the groups in Python
    above 1000 boxes on CPU): each group's boxes are shifted by group * (extent + 1), so boxes of
    different groups never overlap; in float64 the shifted coordinates stay exact to ~1e-9 pixels.
    """
    try:
        from torchvision.ops import nms

        nms(torch.zeros(1, 4), torch.zeros(1), 0.5)
    except Exception:  # not installed, or its compiled ops do not load with this torch build
        return None

    def grouped_nms(boxes: Tensor, scores: Tensor, groups: Tensor, threshold: float) -> Tensor:
        if boxes.numel() == 0:
            return torch.zeros(0, dtype=torch.int64, device=boxes.device)
        boxes = boxes.double()
        offsets = groups.double() * (boxes.max() - boxes.min() + 1)  # (N,)
        return nms(boxes + offsets[:, None], scores.double(), threshold)

    return grouped_nms


def batched_nms(boxes: Tensor, scores: Tensor, groups: Tensor, threshold: float, backend: str = "auto") -> Tensor:
    """NMS within each group (e.g. image * num_classes + label).

    boxes (N, 4) xyxy, scores (N,), groups (N,) int -> indices of kept boxes, by decreasing score.
    backend: "auto" (torchvision if available), "torchvision" or "native".
    """
    if backend not in ("auto", "torchvision", "native"):
        raise ValueError(f"unknown NMS backend '{backend}'")
    if backend != "native":
        tv = torchvision_batched_nms()
        if tv is not None:
            return tv(boxes, scores, groups, threshold)
        if backend == "torchvision":
            raise RuntimeError("torchvision NMS requested but torchvision is not importable")
    return native_batched_nms(boxes, scores, groups, threshold)


def native_batched_nms(boxes: Tensor, scores: Tensor, groups: Tensor, threshold: float, block: int = 512) -> Tensor:
    """Exact greedy NMS per group in tensor ops (see module docstring). Same contract as `batched_nms`."""
    n = boxes.shape[0]
    if n == 0:
        return torch.zeros(0, dtype=torch.int64, device=boxes.device)
    boxes = boxes.float()
    # Sort by group, then by decreasing score (stable: equal scores keep input order).
    order = torch.sort(scores.float(), descending=True, stable=True).indices
    order = order[torch.sort(groups[order], stable=True).indices]
    boxes, groups_sorted = boxes[order], groups[order]
    keep = torch.zeros(n, dtype=torch.bool, device=boxes.device)
    group_starts = torch.searchsorted(groups_sorted, groups_sorted[::block].contiguous())  # first index of each block's first group
    for bi, start in enumerate(range(0, n, block)):
        b, g = boxes[start:start + block], groups_sorted[start:start + block]  # (m, 4), (m,)
        alive = torch.ones(b.shape[0], dtype=torch.bool, device=boxes.device)
        first = int(group_starts[bi])
        if first < start:  # kept boxes of the same group(s) in earlier blocks
            prev = torch.arange(first, start, device=boxes.device)[keep[first:start]]
            if prev.numel():
                hit = (box_iou(boxes[prev], b) > threshold) & (groups_sorted[prev][:, None] == g[None, :])
                alive = ~hit.any(dim=0)
        sup = (box_iou(b, b) > threshold) & (g[:, None] == g[None, :])
        sup = torch.triu(sup, diagonal=1) & alive[:, None]  # sup[i, j]: i (earlier) can suppress j
        sup_f = sup.float()
        k = alive
        while True:
            k_new = alive & ((k.float() @ sup_f) == 0)
            if torch.equal(k_new, k):
                break
            k = k_new
        keep[start:start + b.shape[0]] = k
    kept = order[keep]
    return kept[torch.sort(scores[kept].float(), descending=True, stable=True).indices]


def reference_nms(boxes: Tensor, scores: Tensor, groups: Tensor, threshold: float) -> Tensor:
    """The textbook loop, one box pair at a time. For tests only."""
    order = sorted(range(len(scores)), key=lambda i: -float(scores[i]))
    kept: list = []
    for i in order:
        if all(int(groups[i]) != int(groups[j]) or float(box_iou(boxes[i:i + 1], boxes[j:j + 1])) <= threshold for j in kept):
            kept.append(i)
    return torch.tensor(kept, dtype=torch.int64)
