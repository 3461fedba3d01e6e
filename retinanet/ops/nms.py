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
from typing import Optional

import torch
from torch import Tensor

from .boxes import box_iou
from .torchvision_ops import torchvision_op


@functools.lru_cache(maxsize=1)
def torchvision_batched_nms():
    """Batched NMS on torchvision's kernel if torchvision imports and its kernel runs, else None.

    One kernel call for all groups (torchvision.ops.batched_nms loops over the groups in Python
    above 1000 boxes on CPU): each group's boxes are shifted by group * (extent + 1), so boxes of
    different groups never overlap; in float64 the shifted coordinates stay exact to ~1e-9 pixels.
    """
    nms = torchvision_op("nms")
    if nms is None:
        return None

    def grouped_nms(boxes: Tensor, scores: Tensor, groups: Tensor, threshold: float) -> Tensor:
        if boxes.numel() == 0:
            return torch.zeros(0, dtype=torch.int64, device=boxes.device)
        boxes = boxes.double()
        offsets = groups.double() * (boxes.max() - boxes.min() + 1)  # (N,)
        return nms(boxes + offsets[:, None], scores.double(), threshold)

    return grouped_nms


def batched_nms(boxes: Tensor, scores: Tensor, groups: Tensor, threshold: float, backend: str = "auto",
                kinds: Optional[Tensor] = None, quota: Optional[list] = None) -> Tensor:
    """NMS within each group (e.g. image * num_classes + label).

    boxes (N, 4) xyxy, scores (N,), groups (N,) int -> indices of kept boxes, by decreasing score.
    backend: "auto" (torchvision if available), "torchvision" or "native".
    kinds (N,) int in [0, K) and quota (K ints): a caller that only uses the first quota[k] kept
    boxes of each kind in each group lets the native NMS stop early (see `native_batched_nms`);
    the boxes it returns are then a prefix of the full result per group, which holds those.
    """
    if backend not in ("auto", "torchvision", "native"):
        raise ValueError(f"unknown NMS backend '{backend}'")
    if backend != "native":
        tv = torchvision_batched_nms()
        if tv is not None:
            return tv(boxes, scores, groups, threshold)
        if backend == "torchvision":
            raise RuntimeError("torchvision NMS requested but torchvision is not importable")
    return native_batched_nms(boxes, scores, groups, threshold, kinds=kinds, quota=quota)


@torch.library.custom_op("retinanet::nms_by_class", mutates_args=())
def nms_by_class(boxes: Tensor, scores: Tensor, iou_threshold: float, score_threshold: float) -> Tensor:
    """ONNX's NonMaxSuppression operator, on `batched_nms`: boxes (B, N, 4) xyxy, scores (B, C, N) ->
    selected (S, 3) int64 rows [image, class, box].

    Within each (image, class), greedy NMS (IoU > iou_threshold suppresses) among the boxes whose
    score is > score_threshold; rows ordered by image, class, then decreasing score. One op so that
    the ONNX exporters write one NonMaxSuppression node (`retinanet/export.py` registers the
    translation); equal scores may be broken differently by onnxruntime.
    """
    img, cls, box = torch.nonzero(scores > score_threshold, as_tuple=True)  # (M,)
    groups = img * scores.shape[1] + cls
    kept = batched_nms(boxes[img, box], scores[img, cls, box], groups, iou_threshold)  # by decreasing score
    kept = kept[torch.sort(groups[kept], stable=True).indices]
    return torch.stack([img, cls, box], dim=1)[kept]


@nms_by_class.register_fake
def _nms_by_class_shape(boxes: Tensor, scores: Tensor, iou_threshold: float, score_threshold: float) -> Tensor:
    return scores.new_empty((torch.library.get_ctx().new_dynamic_size(), 3), dtype=torch.int64)


def _block_keep(b: Tensor, g: Tensor, alive: Tensor, threshold: float) -> Tensor:
    """Greedy NMS inside one block, given which of its boxes earlier blocks left alive. -> keep (m,) bool."""
    sup = (box_iou(b, b) > threshold) & (g[:, None] == g[None, :])
    sup = torch.triu(sup, diagonal=1) & alive[:, None]  # sup[i, j]: i (earlier) can suppress j
    sup_f = sup.float()
    k = alive
    while True:
        k_new = alive & ((k.float() @ sup_f) == 0)
        if torch.equal(k_new, k):
            return k
        k = k_new


def _sort_by_group_and_score(scores: Tensor, groups: Tensor) -> Tensor:
    """Order by group, then by decreasing score (stable: equal scores keep input order)."""
    order = torch.sort(scores.float(), descending=True, stable=True).indices
    return order[torch.sort(groups[order], stable=True).indices]


def native_batched_nms(boxes: Tensor, scores: Tensor, groups: Tensor, threshold: float, block: int = 512,
                       kinds: Optional[Tensor] = None, quota: Optional[list] = None) -> Tensor:
    """Exact greedy NMS per group in tensor ops (see module docstring). Same contract as `batched_nms`.

    With kinds/quota, each group is processed block by block until, for every kind k, it has
    quota[k] kept boxes of that kind or has no box of that kind left: greedy NMS decides a box
    from the boxes ranked above it only, so the kept boxes found so far are exactly the full
    result's first ones. (OHEM needs the first 128 survivors of ~7,000 boxes per image.)
    """
    n = boxes.shape[0]
    if n == 0:
        return torch.zeros(0, dtype=torch.int64, device=boxes.device)
    if quota is not None:
        return _native_nms_with_quota(boxes.float(), scores, groups, threshold, block, kinds, list(quota))
    boxes = boxes.float()
    order = _sort_by_group_and_score(scores, groups)
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
        keep[start:start + b.shape[0]] = _block_keep(b, g, alive, threshold)
    kept = order[keep]
    return kept[torch.sort(scores[kept].float(), descending=True, stable=True).indices]


def _native_nms_with_quota(boxes: Tensor, scores: Tensor, groups: Tensor, threshold: float, block: int,
                           kinds: Tensor, quota: list) -> Tensor:
    """native_batched_nms with early stopping per group (one group at a time: groups are few here)."""
    if kinds is None:
        kinds = torch.zeros_like(groups)
    order = _sort_by_group_and_score(scores, groups)
    boxes, groups_sorted, kinds = boxes[order], groups[order], kinds[order]
    num_kinds = len(quota)
    quota_t = torch.tensor(quota, dtype=torch.int64)
    keep = torch.zeros(boxes.shape[0], dtype=torch.bool, device=boxes.device)
    _, counts = torch.unique_consecutive(groups_sorted, return_counts=True)
    start = 0
    for count in counts.tolist():
        end = start + count
        # boxes of each kind not yet processed in this group: a kind with none left needs no more
        left = torch.zeros(num_kinds, dtype=torch.int64)
        left.index_add_(0, kinds[start:end].cpu(), torch.ones(count, dtype=torch.int64))
        kept_idx = torch.zeros(0, dtype=torch.int64, device=boxes.device)
        have = torch.zeros(num_kinds, dtype=torch.int64)
        for s in range(start, end, block):
            b = boxes[s:min(s + block, end)]
            g = groups_sorted[s:min(s + block, end)]
            alive = torch.ones(b.shape[0], dtype=torch.bool, device=boxes.device)
            if kept_idx.numel():
                alive = ~(box_iou(boxes[kept_idx], b) > threshold).any(dim=0)
            k = _block_keep(b, g, alive, threshold)
            keep[s:s + b.shape[0]] = k
            kept_idx = torch.cat([kept_idx, s + k.nonzero()[:, 0]])
            kb = kinds[s:s + b.shape[0]].cpu()
            have += torch.bincount(kb[k.cpu()], minlength=num_kinds)
            left -= torch.bincount(kb, minlength=num_kinds)
            if bool(((have >= quota_t) | (left == 0)).all()):
                break
        start = end
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
