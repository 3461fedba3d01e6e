"""Inference post-processing (Focal Loss paper, sec. 4, "Inference").

Per image and pyramid level: keep (anchor, class) scores > threshold, the top `topk` of them,
decode their boxes; then class-aware NMS over all levels and the best `max_detections`.
The whole batch and all levels are handled at once (no Python loop over images, levels or
classes): candidates are found with a cheap per-anchor max over classes in logit space, and
the per-(image, level) top-k is a segmented rank computed with two stable sorts.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .boxes import clip_boxes, decode
from .nms import batched_nms


def segment_rank(segments: Tensor, scores: Tensor) -> tuple:
    """Order items by (segment, decreasing score) and rank them within their segment.

    segments (M,) int, scores (M,) -> order (M,) indices, rank (M,) rank of order[i] in its segment.
    """
    order = torch.sort(scores, descending=True, stable=True).indices
    order = order[torch.sort(segments[order], stable=True).indices]
    seg = segments[order]
    pos = torch.arange(seg.numel(), device=seg.device)
    is_start = torch.ones_like(seg, dtype=torch.bool)
    is_start[1:] = seg[1:] != seg[:-1]
    start_pos = torch.cummax(torch.where(is_start, pos, torch.zeros_like(pos)), dim=0).values
    return order, pos - start_pos


def top_per_image(image: Tensor, scores: Tensor, k: int, num_images: int, fields: dict) -> list:
    """Each image's k best items, split into one dict per image.

    image (N,) int64 in 0..num_images-1, scores (N,), fields {name: (N, ...) tensor} -> num_images dicts
    {name: (D_i, ...)} with D_i <= k: image i's items, by decreasing score (equal scores: in input order).
    """
    order, rank = segment_rank(image, scores)
    keep = order[rank < k]  # grouped by image, by decreasing score within
    counts = torch.bincount(image[keep], minlength=num_images).tolist()
    parts = [value[keep].split(counts) for value in fields.values()]  # per field, num_images tensors
    return [dict(zip(fields, per_image)) for per_image in zip(*parts)]


def postprocess(cls_logits: Tensor, box_deltas: Tensor, anchors: Tensor, level_sizes: list, image_sizes: list, *,
                score_thresh: float = 0.05, topk_candidates: int = 1000, nms_thresh: float = 0.5,
                max_detections: int = 100, box_weights=(1.0, 1.0, 1.0, 1.0), box_clamp: float = math.log(1000.0 / 16),
                class_agnostic: bool = False, nms_backend: str = "auto", classifier: str = "sigmoid",
                keep_classes: Optional[Tensor] = None) -> list:
    """Detections for a batch.

    cls_logits (B, N, K) for a sigmoid classifier, (B, N, K + 1) for a softmax one (background last,
    scores are the K classes' softmax probabilities); box_deltas (B, N, 4), anchors (N, 4) xyxy in the padded input;
    level_sizes: anchors per level (sums to N); image_sizes: [(h, w)] of each resized image
    (boxes are clipped to it). Returns per image {boxes (D, 4) xyxy, scores (D,), labels (D,)},
    sorted by decreasing score, in the resized image's pixels.
    keep_classes: (K,) bool or None; the classes left out are removed before the threshold and top-k
    (a sigmoid classifier's logits set to -inf; a softmax classifier's probabilities, computed over
    all K + 1 outputs, set to 0).
    """
    b = cls_logits.shape[0]
    device = cls_logits.device
    if classifier == "softmax":
        probs = torch.softmax(cls_logits.float(), dim=-1)[..., :-1]  # (B, N, K): background dropped
        if keep_classes is not None:
            probs = probs * keep_classes.to(device)
        img_idx, anchor_idx = torch.nonzero(probs.amax(dim=-1) > score_thresh, as_tuple=True)  # (M,)
        scores = probs[img_idx, anchor_idx]  # (M, K)
    elif classifier == "sigmoid":
        # Anchors whose best class could pass the threshold; the margin keeps the final
        # sigmoid(x) > thresh test (done in float32 below) exact.
        logit_thresh = math.log(score_thresh / (1 - score_thresh)) - 1e-3 if 0 < score_thresh < 1 else -math.inf
        if keep_classes is not None:
            cls_logits = cls_logits.masked_fill(~keep_classes.to(device), -math.inf)
        best = cls_logits.amax(dim=-1)  # (B, N)
        img_idx, anchor_idx = torch.nonzero(best.float() > logit_thresh, as_tuple=True)  # (M,)
        scores = torch.sigmoid(cls_logits[img_idx, anchor_idx].float())  # (M, K)
    else:
        raise ValueError(f"classifier must be 'sigmoid' or 'softmax', got '{classifier}'")
    k = scores.shape[1]
    cand, cls = torch.nonzero(scores > score_thresh, as_tuple=True)  # (C,)
    img_idx, anchor_idx, scores = img_idx[cand], anchor_idx[cand], scores[cand, cls]
    # Top-k per (image, level).
    level_ends = torch.tensor(level_sizes, device=device).cumsum(0)
    level = torch.bucketize(anchor_idx, level_ends, right=True)
    order, rank = segment_rank(img_idx * len(level_sizes) + level, scores)
    order = order[rank < topk_candidates]
    img_idx, anchor_idx, cls, scores = img_idx[order], anchor_idx[order], cls[order], scores[order]
    # Decode in float32 and clip to each image.
    boxes = decode(anchors[anchor_idx], box_deltas[img_idx, anchor_idx], box_weights, box_clamp)  # (C', 4)
    sizes = torch.tensor(image_sizes, dtype=torch.float32, device=device)[img_idx]  # (C', 2) h, w
    boxes = clip_boxes(boxes, sizes[:, 0], sizes[:, 1])
    groups = img_idx if class_agnostic else img_idx * k + cls
    keep = batched_nms(boxes, scores, groups, nms_thresh, backend=nms_backend)  # by decreasing score
    return top_per_image(img_idx[keep], scores[keep], max_detections, b,
                         {"boxes": boxes[keep], "scores": scores[keep], "labels": cls[keep]})
