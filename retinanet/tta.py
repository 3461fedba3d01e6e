"""Test-time augmentation: a detector run at several scales, with and without a horizontal flip, and the
detections merged.

Each pass is the model's own inference path (`Detector.preprocess` at a scaled size, `run_network`,
`postprocess`), so boxes come back in the original image's pixels; a flipped pass's boxes are
mirrored back (x -> W - x). The passes' detections are merged per image by class-aware NMS at the
model's NMS threshold, keeping the best `max_detections` (MMDetection's RetinaNet TTA merges the
same way: `configs/retinanet/retinanet_tta.py`, nms 0.5, 100 per image).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from .ops.nms import batched_nms

DEFAULT_SCALES = (0.75, 1.0, 1.25)


def flip_boxes(boxes: Tensor, width: int) -> Tensor:
    """Boxes (N, 4) xyxy of a horizontally flipped image of `width` px -> the same boxes in the unflipped image."""
    return torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)


def merge_detections(parts: list, nms_thresh: float, max_detections: int, class_agnostic: bool = False) -> dict:
    """Several passes' detections of one image ({"boxes", "scores", "labels"} each) -> one set:
    NMS over all of them (per class, or across classes with `class_agnostic`), the best
    `max_detections`, by decreasing score."""
    boxes = torch.cat([p["boxes"].float() for p in parts])
    scores = torch.cat([p["scores"].float() for p in parts])
    labels = torch.cat([p["labels"] for p in parts])
    keep = batched_nms(boxes, scores, torch.zeros_like(labels) if class_agnostic else labels, nms_thresh)
    keep = keep[:max_detections]
    return {"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]}


def tta_detections(model, images: list, *, network=None, scales: Sequence[float] = DEFAULT_SCALES,
                   flip: bool = True, device=None, score_thresh: Optional[float] = None,
                   nms_thresh: Optional[float] = None, max_detections: Optional[int] = None,
                   class_agnostic: Optional[bool] = None, keep_classes: Optional[Tensor] = None) -> list:
    """Detections of `model` (a Detector) on `images` ((3, H, W) tensors, uint8 or float in [0, 1]) with
    test-time augmentation: for each scale s, the model's resize with min_size * s and max_size * s,
    plain and (with `flip`) mirrored; merged per image by class-aware NMS.

    network: what runs the network on an ImageBatch (default: model.run_network; `Predictor` passes
    its own, with its device and precision). Other settings: see `Detector.postprocess`.
    """
    network = network or model.run_network
    nms = model.nms_thresh if nms_thresh is None else float(nms_thresh)
    cap = model.detections_per_image if max_detections is None else int(max_detections)
    agnostic = model.class_agnostic_nms if class_agnostic is None else bool(class_agnostic)
    settings = dict(score_thresh=score_thresh, nms_thresh=nms_thresh, max_detections=max_detections,
                    class_agnostic=class_agnostic, keep_classes=keep_classes)
    passes = [[] for _ in images]
    for mirrored in ([False, True] if flip else [False]):
        inputs = [img.flip(-1) for img in images] if mirrored else list(images)
        for s in scales:
            batch = model.preprocess(inputs, device=device, min_size=round(model.min_size * s),
                                     max_size=round(model.max_size * s))
            for i, det in enumerate(model.postprocess(network(batch), batch, **settings)):
                if mirrored:
                    det = dict(det, boxes=flip_boxes(det["boxes"], images[i].shape[-1]))
                passes[i].append(det)
    return [merge_detections(parts, nms, cap, agnostic) for parts in passes]
