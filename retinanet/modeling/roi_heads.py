"""Fast R-CNN box head on a feature pyramid (thesis ch. 4, sec. 4.4; Fast R-CNN, Girshick 2015).

Each proposal is pooled from its eq. (4.1) level (P2-P5) into 7 x 7 features, passed through two
1024-d fully connected layers and classified into K + 1 classes (background = index 0) with a
class-specific box regression. The conventions (sampling, targets, losses, inference) are
torchvision 0.29's, so torchvision's fasterrcnn_resnet50_fpn weights give its detections.

The steps are separate methods (pool / predict / postprocess; sample / losses) so a caller can
run them apart, e.g. export `predict` and batch the rest.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..losses import giou_loss, smooth_l1_loss
from ..ops.boxes import clip_boxes, decode, encode
from ..ops.matcher import BACKGROUND, FOREGROUND, Matcher, check_labels, match_targets, pad_targets
from ..ops.nms import batched_nms
from ..ops.poolers import as_rois, pool_pyramid
from ..ops.postprocess import top_per_image
from ..ops.sampler import sample_balanced


class TwoMLPHead(nn.Module):
    """(R, C, 7, 7) pooled features -> (R, representation_size): fc6, ReLU, fc7, ReLU (torchvision's names)."""

    def __init__(self, in_features: int, representation_size: int = 1024):
        super().__init__()
        self.fc6 = nn.Linear(in_features, representation_size)
        self.fc7 = nn.Linear(representation_size, representation_size)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.fc7(F.relu(self.fc6(x.flatten(1)))))


class FastRCNNPredictor(nn.Module):
    """(R, D) -> class logits (R, K + 1), background first, and deltas (R, 4 (K + 1)), 4 per class."""

    def __init__(self, in_features: int, num_classes: int):
        super().__init__()
        self.cls_score = nn.Linear(in_features, num_classes)
        self.bbox_pred = nn.Linear(in_features, num_classes * 4)

    def forward(self, x: Tensor) -> tuple:
        x = x.flatten(1)
        return self.cls_score(x), self.bbox_pred(x)


class RoIHeads(nn.Module):
    """Box classification and regression of proposals.

    Args (keyword; torchvision's defaults):
        num_classes: K object classes (the predictor has K + 1 outputs, background = 0).
        strides, output_size, sampling_ratio, aligned, pooler: RoI pooling from the levels with
            these strides ("align": RoIAlign, "pool": RoI max pooling; see `pool_pyramid`).
        fg_iou, bg_iou: a proposal is foreground with IoU >= fg_iou with a box, background below
            bg_iou, ignored in between; batch_size_per_image, positive_fraction: RoIs sampled per image.
        box_weights, box_clamp: the delta parameterization (10, 10, 5, 5); smooth_l1_beta: of the
            box loss; box_loss: "smooth_l1" on the deltas or "giou" (1 - GIoU of the decoded box).
        score_thresh, nms_thresh, detections_per_image: inference.
        crowd_ioa: background proposals covered this much by a crowd box (iscrowd) are ignored.
        pool_backend: the RoIAlign / RoI pooling kernel (`pool_pyramid`'s backend; None: the defaults;
            "torchvision" reproduces torchvision's pooled features bitwise, for parity checks).

    Training: forward_train(features, proposals, image, targets) -> {"roi_cls", "roi_box"}.
    Inference: postprocess(*predict(features, rois), proposals, image, image_sizes) -> detections.
    features: the pyramid, finest level first (only the first len(strides) levels are read, so
    P2-P6 may be passed as is); proposals (R, 4) xyxy in the padded batch's pixels, image (R,) the
    image of each; rois (R, 5): [image, x0, y0, x1, y1] (`as_rois`).
    """

    def __init__(self, box_head: nn.Module, box_predictor: nn.Module, *, num_classes: int,
                 strides=(4, 8, 16, 32), output_size: int = 7, sampling_ratio: int = 2, aligned: bool = False,
                 pooler: str = "align", fg_iou: float = 0.5, bg_iou: float = 0.5, batch_size_per_image: int = 512,
                 positive_fraction: float = 0.25, box_weights=(10.0, 10.0, 5.0, 5.0),
                 box_clamp: float = math.log(1000.0 / 16), smooth_l1_beta: float = 1.0 / 9,
                 box_loss: str = "smooth_l1", score_thresh: float = 0.05, nms_thresh: float = 0.5,
                 detections_per_image: int = 100, crowd_ioa: float = 0.7, pool_backend: Optional[str] = None):
        super().__init__()
        if pooler not in ("align", "pool"):
            raise ValueError(f"pooler must be 'align' or 'pool', got '{pooler}'")
        if box_loss not in ("smooth_l1", "giou"):
            raise ValueError(f"box_loss must be 'smooth_l1' or 'giou', got '{box_loss}'")
        self.box_head, self.box_predictor = box_head, box_predictor
        self.num_classes = num_classes
        self.strides, self.output_size = tuple(strides), output_size
        self.sampling_ratio, self.aligned, self.pooler, self.pool_backend = sampling_ratio, aligned, pooler, pool_backend
        self.matcher = Matcher(fg_iou, bg_iou, allow_low_quality=False)
        self.batch_size_per_image, self.positive_fraction = batch_size_per_image, positive_fraction
        self.box_weights, self.box_clamp = tuple(box_weights), box_clamp
        self.smooth_l1_beta, self.box_loss, self.crowd_ioa = smooth_l1_beta, box_loss, crowd_ioa
        self.score_thresh, self.nms_thresh, self.detections_per_image = score_thresh, nms_thresh, detections_per_image

    @property
    def min_level(self) -> int:
        """The finest pyramid level pooled from (2 for strides 4..32)."""
        return int(round(math.log2(self.strides[0])))

    @property
    def max_level(self) -> int:
        """The coarsest pyramid level pooled from (5 for strides 4..32)."""
        return int(round(math.log2(self.strides[-1])))

    # ------------------------------------------------------------------ features and predictions
    def pool(self, features: list, rois: Tensor) -> Tensor:
        """rois (R, 5) -> (R, C, 7, 7) pooled features."""
        return pool_pyramid(features[:len(self.strides)], rois, self.strides, self.output_size,
                            self.sampling_ratio, self.aligned, self.pooler, backend=self.pool_backend)

    def predict(self, features: list, rois: Tensor) -> tuple:
        """rois (R, 5) -> class_logits (R, K + 1), box_regression (R, 4 (K + 1))."""
        return self.box_predictor(self.box_head(self.pool(features, rois)))

    # ------------------------------------------------------------------ training
    @torch.no_grad()
    def sample(self, proposals: Tensor, image: Tensor, targets: list) -> tuple:
        """Add each image's boxes to its proposals (R, 4) (image (R,) the image of each), label them and
        sample a minibatch.

        -> rois (S, 5) [image, x0, y0, x1, y1] sampled RoIs (by image, then by index within it),
        labels (S,) int64 (class + 1, 0 background), matched boxes (S, 4) (meaningful where labels > 0).
        The whole batch at once, no loop over images: each image's proposals and then its boxes, padded
        into (B, P, 4), are matched by `match_targets` (crowd boxes are not added, match nothing, and make
        the background proposals they cover ignored) and sampled by `sample_balanced`. A label outside
        0..K-1 is a ValueError naming the image.
        """
        b = len(targets)
        padded = pad_targets(targets, proposals.device)
        gt, gt_cls, real, _ = padded  # (B, G, 4), (B, G), (B, G)
        if gt_cls.device.type == "cpu":  # on an accelerator the host checked them (engine, Detector.forward): no wait
            check_labels(gt_cls, self.num_classes, [f"image {i}" for i in range(b)], valid=real)
        boxes, present = _proposals_then_boxes(proposals.detach().float(), image, gt, real)  # (B, P, 4), (B, P)
        labels, matched, classes = match_targets(self.matcher, boxes, targets, self.crowd_ioa, padded=padded)
        labels = torch.where(labels == FOREGROUND, classes + 1, torch.where(labels == BACKGROUND, 0, -1))
        labels = torch.where(present, labels, -1)  # (B, P) int64: class + 1, 0 background, -1 ignored or padding
        keep = sample_balanced(labels, self.batch_size_per_image, self.positive_fraction)  # (B, P)
        img, idx = torch.nonzero(keep, as_tuple=True)  # (S,), by image then index
        return as_rois(boxes[img, idx], img), labels[img, idx], matched[img, idx]

    def forward_train(self, features: list, proposals: Tensor, image: Tensor, targets: list) -> dict:
        """-> {"roi_cls": cross entropy averaged over the sampled RoIs, "roi_box": box loss of the
        foreground RoIs (for their ground-truth class) summed, divided by the number of sampled RoIs}."""
        rois, labels, gt_boxes = self.sample(proposals, image, targets)
        class_logits, box_regression = self.predict(features, rois)
        return self.losses(class_logits, box_regression, rois[:, 1:], labels, gt_boxes)

    def losses(self, class_logits: Tensor, box_regression: Tensor, rois: Tensor, labels: Tensor,
               gt_boxes: Tensor) -> dict:
        """class_logits (S, K + 1), box_regression (S, 4 (K + 1)), rois (S, 4), labels (S,), gt_boxes (S, 4)."""
        num = max(labels.numel(), 1)
        cls = F.cross_entropy(class_logits.float(), labels, reduction="sum") / num
        fg = torch.nonzero(labels > 0, as_tuple=True)[0]  # (F,)
        deltas = box_regression.view(-1, class_logits.shape[1], 4)[fg, labels[fg]].float()  # (F, 4)
        if self.box_loss == "giou":
            box = giou_loss(decode(rois[fg], deltas, self.box_weights, self.box_clamp), gt_boxes[fg]).sum()
        else:
            box = smooth_l1_loss(deltas, encode(rois[fg], gt_boxes[fg], self.box_weights), self.smooth_l1_beta).sum()
        return {"roi_cls": cls, "roi_box": box / num}

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def postprocess(self, class_logits: Tensor, box_regression: Tensor, proposals: Tensor, image: Tensor,
                    image_sizes: list, *,
                    score_thresh: Optional[float] = None, nms_thresh: Optional[float] = None,
                    detections_per_image: Optional[int] = None, keep_classes: Optional[Tensor] = None) -> list:
        """Detections per image: [{"boxes" (D, 4) xyxy in the resized image's pixels, "scores" (D,),
        "labels" (D,) in 0..K-1}], by decreasing score.

        Softmax over K + 1 classes; each class's box decoded from its proposal and clipped to
        the image (h_i, w_i); background dropped; (proposal, class) pairs with score > score_thresh
        (and a class in keep_classes (K,) bool, if given) and both sides >= 0.01 px; NMS per
        (image, class); the best detections_per_image per image. Batched: no loop over images or classes.
        """
        score_thresh = self.score_thresh if score_thresh is None else score_thresh
        nms_thresh = self.nms_thresh if nms_thresh is None else nms_thresh
        max_det = self.detections_per_image if detections_per_image is None else detections_per_image
        device = class_logits.device
        b, r = len(image_sizes), class_logits.shape[0]
        probs = torch.softmax(class_logits.float(), dim=-1)[:, 1:]  # (R, K) background dropped
        k = probs.shape[1]
        candidate = probs > score_thresh
        if keep_classes is not None:
            candidate &= keep_classes.to(device)[None, :]
        roi, cls = torch.nonzero(candidate, as_tuple=True)  # (M,)
        rois = proposals.float().reshape(-1, 4)
        deltas = box_regression.view(r, k + 1, 4)[roi, cls + 1]  # (M, 4)
        boxes = decode(rois[roi], deltas, self.box_weights, self.box_clamp)  # (M, 4)
        img = image[roi]
        sizes = torch.tensor(image_sizes, dtype=torch.float32, device=device).reshape(-1, 2)[img]  # (M, 2) h, w
        boxes = clip_boxes(boxes, sizes[:, 0], sizes[:, 1])
        scores = probs[roi, cls]
        big = (boxes[:, 2] - boxes[:, 0] >= 1e-2) & (boxes[:, 3] - boxes[:, 1] >= 1e-2)
        boxes, scores, cls, img = boxes[big], scores[big], cls[big], img[big]
        keep = batched_nms(boxes, scores, img * k + cls, nms_thresh)  # by decreasing score
        return top_per_image(img[keep], scores[keep], max_det, b,
                             {"boxes": boxes[keep], "scores": scores[keep], "labels": cls[keep]})


def _proposals_then_boxes(proposals: Tensor, image: Tensor, gt: Tensor, real: Tensor) -> tuple:
    """Each image's proposals followed by its boxes (the boxes are proposals too, as torchvision), as one
    padded batch: proposals (R, 4) with image (R,) in 0..B-1, boxes gt (B, G, 4) with real (B, G) bool
    (the boxes to add: not padding, not crowd) -> boxes (B, P, 4) (zeros after each image's own) and
    present (B, P) bool, P = the most proposals + boxes of an image. Each image's proposals keep their
    order, its boxes follow in theirs. One host read (P)."""
    b, g = real.shape
    device = proposals.device
    num_proposals = torch.bincount(image, minlength=b)  # (B,)
    num = num_proposals + real.sum(dim=1)  # (B,)
    p = int(num.max()) if b else 0
    by_image = torch.sort(image, stable=True).indices  # (R,)
    first = num_proposals.cumsum(0) - num_proposals  # (B,) where each image's proposals start in by_image
    position = torch.empty_like(image)  # (R,) of each proposal within its image
    position[by_image] = torch.arange(image.numel(), device=device) - first[image[by_image]]
    out = proposals.new_zeros(b, p + g, 4)  # columns p.. take the boxes not added (one each), then are cut off
    out[image, position] = proposals
    column = torch.where(real, num_proposals[:, None] + real.cumsum(dim=1) - 1, p + torch.arange(g, device=device))
    out.scatter_(1, column[..., None].expand(-1, -1, 4), gt)  # (B, G) columns, distinct within each row
    present = torch.arange(p, device=device)[None, :] < num[:, None]  # (B, P)
    return out[:, :p], present
