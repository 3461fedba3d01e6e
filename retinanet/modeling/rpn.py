"""Region Proposal Network on a feature pyramid (thesis ch. 4, sec. 4.4; Faster R-CNN sec. 3.1).

One head, shared by every level P2..P6, predicts for each of the A anchors of a location an
objectness logit and box deltas. Proposals are the best-scoring decoded anchors of each level,
clipped, NMS'd per level, then the best of all levels per image. The conventions (anchor
order, top-k per level, clipping, small-box removal, NMS per level, loss normalization) are
torchvision 0.29's, so torchvision's fasterrcnn_resnet50_fpn weights give its proposals.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..losses import giou_loss, smooth_l1_loss
from ..ops.anchors import AnchorGenerator
from ..ops.boxes import clip_boxes, decode, encode
from ..ops.matcher import FOREGROUND, Matcher, match_targets
from ..ops.nms import nms_by_class
from ..ops.sampler import sample_balanced


def rpn_anchor_generator(sizes=(32, 64, 128, 256, 512), ratios=(0.5, 1.0, 2.0), strides=(4, 8, 16, 32, 64),
                         style: str = "torchvision") -> AnchorGenerator:
    """The thesis's RPN anchors (sec. 4.4): one area per level, 32^2 on P2 .. 512^2 on P6, 3 aspect ratios."""
    return AnchorGenerator(list(sizes), [1.0], list(ratios), list(strides), offset=0.0, style=style)


class RPNHead(nn.Module):
    """3x3 conv + ReLU, then 1x1 convs to A objectness logits and 4A deltas; shared across levels.

    Parameter names match torchvision's RPNHead checkpoints (conv, cls_logits, bbox_pred);
    torchvision's newer in-memory naming conv.0.0.* is accepted when loading.
    forward(features: L x (B, C, H_l, W_l)) -> objectness L x (B, N_l), deltas L x (B, N_l, 4),
    N_l = H_l W_l A in (H, W, A) order, the order of `AnchorGenerator`.
    """

    def __init__(self, in_channels: int, num_anchors: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, in_channels, 3, padding=1)
        self.cls_logits = nn.Conv2d(in_channels, num_anchors, 1)
        self.bbox_pred = nn.Conv2d(in_channels, num_anchors * 4, 1)
        for layer in (self.conv, self.cls_logits, self.bbox_pred):
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.zeros_(layer.bias)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in ("weight", "bias"):
            key = f"{prefix}conv.0.0.{name}"
            if key in state_dict:
                state_dict[f"{prefix}conv.{name}"] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, features: list) -> tuple:
        logits, deltas = [], []
        for x in features:
            t = F.relu(self.conv(x))
            b, _, h, w = t.shape
            logits.append(self.cls_logits(t).permute(0, 2, 3, 1).reshape(b, -1))  # (B, H*W*A)
            d = self.bbox_pred(t)  # (B, A*4, H, W)
            deltas.append(d.view(b, -1, 4, h, w).permute(0, 3, 4, 1, 2).reshape(b, -1, 4))  # (B, H*W*A, 4)
        return logits, deltas


class RegionProposalNetwork(nn.Module):
    """Proposals and RPN losses from a feature pyramid.

    Args (keyword, torchvision's defaults for Faster R-CNN with FPN):
        fg_iou, bg_iou: an anchor is positive with IoU >= fg_iou with a ground-truth box, or when it
            is a box's best anchor (ties included); negative below bg_iou; otherwise ignored.
        batch_size_per_image, positive_fraction: anchors sampled per image for the losses.
        pre_nms_top_n, post_nms_top_n: {"training": n, "testing": n}, chosen by self.training:
            candidates per level and image before NMS, proposals per image after.
        nms_thresh: NMS IoU within each level; min_size: proposals with a side below it are dropped;
        score_thresh: proposals need objectness probability >= it (0: keep all, as torchvision).
        box_weights, box_clamp: the delta parameterization; smooth_l1_beta: of the box loss;
        box_loss: "smooth_l1" on the deltas, or "giou" (1 - GIoU of the decoded box).
        crowd_ioa: anchors covered this much by a crowd box (iscrowd) are ignored, not negatives.

    forward(features: L x (B, C, H_l, W_l), image_size: (H, W) of the padded batch, image_sizes:
    (B, 2) (h, w) of each resized image (a tensor or a list of pairs), targets: optional [{"boxes" (G, 4)
    xyxy, optional "iscrowd"}]) -> (boxes (P, 4) xyxy in the batch's pixels and image (P,) int64: the
    proposals of all images, detached, grouped by image and by decreasing objectness within;
    losses: {"rpn_cls", "rpn_box"} when targets are given, else {}).
    """

    def __init__(self, head: RPNHead, anchor_generator: AnchorGenerator, *, fg_iou: float = 0.7,
                 bg_iou: float = 0.3, batch_size_per_image: int = 256, positive_fraction: float = 0.5,
                 pre_nms_top_n=None, post_nms_top_n=None, nms_thresh: float = 0.7, min_size: float = 1e-3,
                 score_thresh: float = 0.0, box_weights=(1.0, 1.0, 1.0, 1.0), box_clamp: float = math.log(1000.0 / 16),
                 smooth_l1_beta: float = 1.0 / 9, box_loss: str = "smooth_l1", crowd_ioa: float = 0.7):
        super().__init__()
        if box_loss not in ("smooth_l1", "giou"):
            raise ValueError(f"box_loss must be 'smooth_l1' or 'giou', got '{box_loss}'")
        self.head = head
        self.anchor_generator = anchor_generator
        self.matcher = Matcher(fg_iou, bg_iou, allow_low_quality=True)
        self.batch_size_per_image, self.positive_fraction = batch_size_per_image, positive_fraction
        self.pre_nms_top_n = dict(pre_nms_top_n or {"training": 2000, "testing": 1000})
        self.post_nms_top_n = dict(post_nms_top_n or {"training": 2000, "testing": 1000})
        self.nms_thresh, self.min_size, self.score_thresh = nms_thresh, min_size, score_thresh
        self.box_weights, self.box_clamp = tuple(box_weights), box_clamp
        self.smooth_l1_beta, self.box_loss, self.crowd_ioa = smooth_l1_beta, box_loss, crowd_ioa

    def _mode(self) -> str:
        return "training" if self.training else "testing"

    def anchors(self, features: list, image_size) -> list:
        """-> L x (H_l W_l A, 4) anchors xyxy in the padded batch's pixels."""
        return self.anchor_generator([f.shape[-2:] for f in features], tuple(image_size), features[0].device)

    def forward(self, features: list, image_size, image_sizes, targets=None) -> tuple:
        objectness, deltas = self.head(features)  # L x (B, N_l), L x (B, N_l, 4)
        anchors = self.anchors(features, image_size)
        predicted, made = [o.shape[1] for o in objectness], [a.shape[0] for a in anchors]
        if predicted != made:
            raise ValueError(f"the head predicts {predicted} anchors per level, the generator makes "
                             f"{made}: num_anchors does not match the generator's")
        boxes, _, image = self.propose([o.detach() for o in objectness], [d.detach() for d in deltas], anchors,
                                       image_sizes)
        losses = {} if targets is None else self.losses(torch.cat(objectness, 1), torch.cat(deltas, 1),
                                                        torch.cat(anchors), targets)
        return boxes, image, losses

    @torch.no_grad()
    def propose(self, objectness: list, deltas: list, anchors: list, image_sizes) -> tuple:
        """objectness L x (B, N_l), deltas L x (B, N_l, 4), anchors L x (N_l, 4), image_sizes (B, 2) (h, w)
        -> boxes (P, 4), scores (P,) objectness probabilities, image (P,) int64: every image's
        proposals, grouped by image, by decreasing score within.

        Per image and level the pre_nms_top_n best logits; decode; clip to the image (h_i, w_i);
        drop boxes with a side < min_size and probabilities < score_thresh; NMS within each
        (image, level); the post_nms_top_n best per image. Tensor operations only (one loop over
        the levels, none over images), so the same code is the ONNX graph: the per-(image, level)
        NMS is one NonMaxSuppression with the levels as its classes.
        """
        pre, post = self.pre_nms_top_n[self._mode()], self.post_nms_top_n[self._mode()]
        device = objectness[0].device
        boxes, logits, level = [], [], []
        for lv, (o, d, a) in enumerate(zip(objectness, deltas, anchors)):
            top, idx = o.topk(_at_most(pre, o, 1), dim=1)  # (B, k_l): torch.topk per level, as torchvision
            boxes.append(decode(a[idx], d.gather(1, idx[..., None].expand(-1, -1, 4)), self.box_weights,
                                self.box_clamp))  # (B, k_l, 4)
            logits.append(top)
            level.append(torch.full_like(idx[0], lv))
        boxes, logits, level = torch.cat(boxes, 1), torch.cat(logits, 1), torch.cat(level)  # (B, K, 4), (B, K), (K,)
        sizes = torch.as_tensor(image_sizes, device=device).to(boxes.dtype).reshape(-1, 2)  # (B, 2) h, w
        boxes = clip_boxes(boxes, sizes[:, 0, None], sizes[:, 1, None])  # each image's to its own (h, w)
        scores = torch.sigmoid(logits.float())  # (B, K)
        valid = ((boxes[..., 2] - boxes[..., 0] >= self.min_size) & (boxes[..., 3] - boxes[..., 1] >= self.min_size)
                 & (scores >= self.score_thresh))
        on_level = level[None, :] == torch.arange(len(objectness), device=device)[:, None]  # (L, K)
        by_level = torch.where(valid[:, None, :] & on_level[None], scores[:, None, :], -1.0)  # (B, L, K)
        selected = nms_by_class(boxes, by_level, self.nms_thresh, -0.5)  # (S, 3) image, level, candidate
        img, cand = selected[:, 0], selected[:, 2]
        kept = torch.full_like(scores, -1.0)  # (B, K): the score of each NMS survivor, -1 elsewhere
        kept[img, cand] = scores[img, cand]
        # (B, P) by decreasing score; ties: the earlier level and rank first (ONNX TopK's rule as well)
        if torch.onnx.is_in_onnx_export():
            best, idx = kept.topk(_at_most(post, kept, 1), dim=1)
        else:
            best, idx = kept.sort(dim=1, descending=True, stable=True)
            best, idx = best[:, :post], idx[:, :post]
        keep = best >= 0
        image = torch.arange(kept.shape[0], device=device)[:, None].expand_as(idx)[keep]
        return boxes.gather(1, idx[..., None].expand(-1, -1, 4))[keep], best[keep], image

    @torch.no_grad()
    def assign_targets(self, anchors: Tensor, targets: list) -> tuple:
        """-> labels (B, N) int8 in {-1 ignore, 0 background, 1 foreground}, matched boxes (B, N, 4) xyxy:
        `match_targets` (crowd boxes match nothing and make the background anchors they cover ignored;
        an image without boxes: every anchor background), the whole batch at once."""
        labels, boxes, _ = match_targets(self.matcher, anchors, targets, self.crowd_ioa)
        return labels, boxes

    def losses(self, objectness: Tensor, deltas: Tensor, anchors: Tensor, targets: list) -> dict:
        """"rpn_cls": binary cross entropy averaged over the sampled anchors of the batch;
        "rpn_box": box loss summed over the sampled positives, divided by the number of sampled
        anchors (as torchvision; both over the whole batch)."""
        labels, gt_boxes = self.assign_targets(anchors, targets)  # (B, N), (B, N, 4)
        sampled = sample_balanced(labels, self.batch_size_per_image, self.positive_fraction)  # (B, N)
        img, idx = torch.nonzero(sampled, as_tuple=True)  # (S,)
        num_sampled = max(img.numel(), 1)
        target = (labels[img, idx] == FOREGROUND).to(torch.float32)
        cls = F.binary_cross_entropy_with_logits(objectness[img, idx].float(), target, reduction="sum") / num_sampled
        pos = target.bool()
        img, idx = img[pos], idx[pos]  # (P,) the sampled positives
        d, a, gt = deltas[img, idx].float(), anchors[idx], gt_boxes[img, idx]
        if self.box_loss == "giou":
            box = giou_loss(decode(a, d, self.box_weights, self.box_clamp), gt).sum()
        else:
            box = smooth_l1_loss(d, encode(a, gt, self.box_weights), self.smooth_l1_beta).sum()
        return {"rpn_cls": cls, "rpn_box": box / num_sampled}


def _at_most(k: int, x: Tensor, dim: int):
    """min(k, x.shape[dim]); while the torchscript tracer records, a tensor, so that the ONNX graph's
    TopK follows the input's size instead of the size seen when exporting."""
    if torch.jit.is_tracing():
        return torch.clamp(torch._shape_as_tensor(x)[dim], max=k)
    return min(k, x.shape[dim])
