"""Test-time augmentation: a detector run at several scales, with and without a horizontal flip, and the
detections merged.

Each pass is the model's own inference path (`Detector.preprocess` at a scaled size, `run_network`,
`postprocess`), so boxes come back in the original image's pixels; a flipped pass's boxes are
mirrored back (x -> W - x). The passes' detections are merged per image by class-aware NMS at the
model's NMS threshold, keeping the best `max_detections` (MMDetection's RetinaNet TTA merges the
same way: `configs/retinanet/retinanet_tta.py`, nms 0.5, 100 per image), and then, by default, each
kept box is replaced by the score-weighted mean of the same class's boxes that overlap it with IoU
>= 0.8 (box voting, as Detectron's TEST.BBOX_VOTE). On the shapes demo (500 validation images,
README "Test-time augmentation") voting adds 0.041 AP to the default TTA (0.701 -> 0.742; AP90
0.241 -> 0.403) for under 1% more time: six passes place a box six slightly different ways, and the
mean is closer than the best-scored one. `vote_iou=None` gives plain NMS.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from .ops.boxes import box_iou, flip_boxes
from .ops.nms import batched_nms
from .ops.transform import scaled_limits

DEFAULT_SCALES = (0.75, 1.0, 1.25)
DEFAULT_VOTE_IOU = 0.8  # Detectron's TEST.BBOX_VOTE.VOTE_TH; not tuned on the demo


def merge_detections(parts: list, nms_thresh: float, max_detections: int, class_agnostic: bool = False,
                     vote_iou: Optional[float] = DEFAULT_VOTE_IOU) -> dict:
    """Several passes' detections of one image ({"boxes", "scores", "labels"} each) -> one set:
    NMS over all of them (per class, or across classes with `class_agnostic`), the best
    `max_detections`, by decreasing score.

    vote_iou: None keeps the NMS survivors' boxes. A threshold (default 0.8, Detectron's TEST.BBOX_VOTE)
    replaces each survivor's box by the score-weighted mean of every box of its class (any class with
    `class_agnostic`), from every pass, whose IoU with it is >= vote_iou, itself included: box voting
    (Gidaris & Komodakis 2015, sec. 3.3); scores and labels stay the survivor's.
    """
    boxes = torch.cat([p["boxes"].float() for p in parts])  # (N, 4) xyxy, all passes
    scores = torch.cat([p["scores"].float() for p in parts])  # (N,)
    labels = torch.cat([p["labels"] for p in parts])  # (N,)
    groups = torch.zeros_like(labels) if class_agnostic else labels
    keep = batched_nms(boxes, scores, groups, nms_thresh)
    keep = keep[:max_detections]
    kept = boxes[keep]  # (K, 4)
    if vote_iou is not None and len(keep):
        voters = (box_iou(kept, boxes) >= vote_iou) & (groups[keep][:, None] == groups[None, :])  # (K, N)
        voters[torch.arange(len(keep)), keep] = True  # its own vote, also for an empty box (IoU 0 / 0)
        weights = voters * scores[None, :]  # (K, N); every row sums to > 0
        kept = (weights / weights.sum(dim=1, keepdim=True)) @ boxes  # a lone voter's weight is exactly 1
    return {"boxes": kept, "scores": scores[keep], "labels": labels[keep]}


def tta_passes(model, images: list, *, network=None, scales: Sequence[float] = DEFAULT_SCALES, flip: bool = True,
               device=None, **settings) -> list:
    """Per image, the list of its passes' detections (scale by scale, unflipped then flipped), each in the
    original image's pixels; what `tta_detections` merges. Arguments as `tta_detections`; `settings` go
    to `Detector.postprocess`."""
    network = network or model.run_network
    passes = [[] for _ in images]
    for mirrored in ([False, True] if flip else [False]):
        inputs = [img.flip(-1) for img in images] if mirrored else list(images)
        for s in scales:
            min_size, max_size = scaled_limits(model.min_size, model.max_size, s)
            batch = model.preprocess(inputs, device=device, min_size=min_size, max_size=max_size)
            for i, det in enumerate(model.postprocess(network(batch), batch, **settings)):
                if mirrored:
                    det = dict(det, boxes=flip_boxes(det["boxes"], images[i].shape[-1]))
                passes[i].append(det)
    return passes


def tta_detections(model, images: list, *, network=None, scales: Sequence[float] = DEFAULT_SCALES,
                   flip: bool = True, device=None, score_thresh: Optional[float] = None,
                   nms_thresh: Optional[float] = None, max_detections: Optional[int] = None,
                   class_agnostic: Optional[bool] = None, keep_classes: Optional[Tensor] = None,
                   vote_iou: Optional[float] = DEFAULT_VOTE_IOU) -> list:
    """Detections of `model` (a Detector) on `images` ((3, H, W) tensors, uint8 or float in [0, 1]) with
    test-time augmentation: for each scale s, the model's resize with min_size * s and max_size * s,
    plain and (with `flip`) mirrored; merged per image by class-aware NMS and box voting at IoU
    `vote_iou` (None: NMS alone; `merge_detections`).

    network: what runs the network on an ImageBatch (default: model.run_network; `Predictor` passes
    its own, with its device and precision). Other settings: see `Detector.postprocess`.
    """
    nms = model.nms_thresh if nms_thresh is None else float(nms_thresh)
    cap = model.detections_per_image if max_detections is None else int(max_detections)
    agnostic = model.class_agnostic_nms if class_agnostic is None else bool(class_agnostic)
    passes = tta_passes(model, images, network=network, scales=scales, flip=flip, device=device,
                        score_thresh=score_thresh, nms_thresh=nms_thresh, max_detections=max_detections,
                        class_agnostic=class_agnostic, keep_classes=keep_classes)
    return [merge_detections(parts, nms, cap, agnostic, vote_iou=vote_iou) for parts in passes]
