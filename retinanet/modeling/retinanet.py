"""RetinaNet: backbone -> FPN -> classification and box subnets -> (loss | postprocess).

Focal Loss paper, sec. 4 and Figure 3.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import LossConfig
from ..losses import (fl_star_loss, giou_loss, iou_balanced_weights, ohem_select, sigmoid_focal_loss,
                      sigmoid_focal_loss_fast, smooth_l1_loss, softmax_focal_loss, softmax_prior_bias)
from ..ops.anchors import AnchorGenerator
from ..ops.boxes import decode, encode, paired_iou
from ..ops.matcher import FOREGROUND, Matcher, match_targets
from ..ops.postprocess import postprocess
from .backbone import FPN, ResNet, make_norm
from .detector import Detector, ImageBatch, check_targets


class Subnet(nn.Module):
    """`num_convs` x [3x3 conv, (GroupNorm), ReLU], then a 3x3 conv to `out_channels` (sec. 4).

    bias: whether the tower's convs have biases (the predictor always has one); torchvision's
    retinanet_resnet50_fpn_v2 has none before its GroupNorms.
    """

    def __init__(self, in_channels: int, channels: int, out_channels: int, num_convs: int = 4, norm: str = "none",
                 bias: bool = True):
        super().__init__()
        layers = []
        for i in range(num_convs):
            layers.append(nn.Conv2d(in_channels if i == 0 else channels, channels, 3, padding=1, bias=bias))
            if norm == "gn":
                layers.append(make_norm("gn", channels))  # 32 groups, fewer when channels is not a multiple
            elif norm != "none":
                raise ValueError(f"head_norm must be 'none' or 'gn', got '{norm}'")
            layers.append(nn.ReLU(inplace=True))
        self.tower = nn.Sequential(*layers)
        self.predictor = nn.Conv2d(channels, out_channels, 3, padding=1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):  # Gaussian sigma 0.01, bias 0 (sec. 4.1, "Initialization")
                nn.init.normal_(m.weight, std=0.01)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.predictor(self.tower(x))


class RetinaNetHead(nn.Module):
    """The classification and box (4*A, class-agnostic) subnets, shared across levels.

    classifier "sigmoid" (the paper): K logits per anchor, one sigmoid each. "softmax" (for the
    softmax focal loss, footnote 1): K + 1 logits per anchor, the K classes then background.
    """

    def __init__(self, in_channels: int, num_anchors: int, num_classes: int, channels: int = 256,
                 num_convs: int = 4, norm: str = "none", prior_prob: float = 0.01, classifier: str = "sigmoid",
                 bias: bool = True):
        super().__init__()
        if classifier not in ("sigmoid", "softmax"):
            raise ValueError(f"classifier must be 'sigmoid' or 'softmax', got '{classifier}'")
        self.num_classes = num_classes
        self.classifier = classifier
        self.num_logits = num_classes + 1 if classifier == "softmax" else num_classes  # per anchor
        self.cls_subnet = Subnet(in_channels, channels, num_anchors * self.num_logits, num_convs, norm, bias)
        self.box_subnet = Subnet(in_channels, channels, num_anchors * 4, num_convs, norm, bias)
        bias = self.cls_subnet.predictor.bias  # (A * num_logits,): channel a * num_logits + k
        with torch.no_grad():
            if classifier == "sigmoid":  # b = -log((1 - pi) / pi): foreground probability pi at the start (sec. 4.1)
                bias.fill_(-math.log((1 - prior_prob) / prior_prob))
            else:  # background log(K (1 - pi) / pi), classes 0: total foreground probability pi
                bias.copy_(softmax_prior_bias(num_classes, prior_prob).repeat(num_anchors))

    def forward(self, features: list) -> tuple:
        """features: L x (B, C, H_l, W_l) -> cls_logits (B, N, num_logits), box_deltas (B, N, 4), N = sum H_l*W_l*A."""
        cls, box = [], []
        for f in features:
            b = f.shape[0]
            # (B, A*K, H, W) -> (B, H, W, A*K) -> (B, H*W*A, K): channel a*K + k is anchor a, logit k
            cls.append(self.cls_subnet(f).permute(0, 2, 3, 1).reshape(b, -1, self.num_logits))
            box.append(self.box_subnet(f).permute(0, 2, 3, 1).reshape(b, -1, 4))
        return torch.cat(cls, dim=1), torch.cat(box, dim=1)


class RetinaNet(Detector):
    """RetinaNet (Lin et al., Focal Loss for Dense Object Detection); the contract is `Detector`'s.

    Eval mode: `model(images)` takes a list of (3, H, W) RGB tensors (float in [0, 1] or uint8), any
    sizes. Each is resized (shorter side `min_size`, longer side at most `max_size`), normalized and
    padded into a batch; returns per image a dict with `boxes` (D, 4) xyxy in the original
    image's pixels (clipped to it), `scores` (D,) and `labels` (D,) in 0..K-1.

    Train mode: `model(images, targets)` takes images at the size to train on (the data pipeline
    resizes and jitters) and per image {"boxes": (G, 4) xyxy pixels, "labels": (G,) in 0..K-1,
    "iscrowd": (G,) optional}; returns {"cls": loss, "box": loss}, each normalized by the number of
    foreground anchors in the batch (sec. 4.1).

    `network(batch)` returns (cls_logits (B, N, K) (K + 1 with a softmax classifier), box_deltas
    (B, N, 4), then one (H_l * W_l * A, 4) xyxy anchor tensor per level, in the padded batch's pixels).

    Example:
        >>> from retinanet import build_model
        >>> from retinanet.config import Config
        >>> cfg = Config()
        >>> cfg.model.backbone, cfg.model.num_classes = "resnet18", 3
        >>> model = build_model(cfg).eval()
        >>> out = model([torch.rand(3, 240, 320)])
        >>> sorted(out[0])
        ['boxes', 'labels', 'scores']
    """

    foreground_by_index: Optional[bool] = None  # the box loss's selection (`_foreground_box_loss`); None: on the CPU

    def __init__(self, backbone: ResNet, fpn: FPN, head: RetinaNetHead, anchor_generator: AnchorGenerator, *,
                 matcher: Matcher, loss: LossConfig, crowd_ioa: float = 0.7,
                 box_weights=(1.0, 1.0, 1.0, 1.0), box_clamp: float = math.log(1000.0 / 16),
                 score_thresh: float = 0.05, topk_candidates: int = 1000, nms_thresh: float = 0.5,
                 detections_per_image: int = 100, class_agnostic_nms: bool = False,
                 min_size: int = 800, max_size: int = 1333, resize_rounding: str = "round", size_divisibility: int = 32,
                 pixel_mean=(0.485, 0.456, 0.406), pixel_std=(0.229, 0.224, 0.225)):
        super().__init__(min_size=min_size, max_size=max_size, resize_rounding=resize_rounding,
                         size_divisibility=size_divisibility, pixel_mean=pixel_mean, pixel_std=pixel_std)
        self.backbone, self.fpn, self.head = backbone, fpn, head
        self.anchor_generator = anchor_generator
        self.matcher = matcher
        loss.validate()
        needs = "softmax" if loss.cls == "softmax_focal" else "sigmoid"
        if head.classifier != needs:
            raise ValueError(f"loss.cls={loss.cls} needs a {needs} classifier, the head has a {head.classifier} one")
        self.loss_cfg = loss
        # IoU-balanced localization's w_loc: a fixed number, or "auto" (None): measured at the first
        # step into this buffer (NaN until then), so it is checkpointed and a resumed run keeps it
        self.w_loc_fixed = loss.w_loc_value()
        if loss.iou_balanced_loc and not loss.loc_normalize and self.w_loc_fixed is None:
            self.register_buffer("w_loc", torch.tensor(float("nan")))
        self.crowd_ioa = crowd_ioa
        self.box_weights = tuple(box_weights)
        self.box_clamp = box_clamp
        self.score_thresh, self.topk_candidates, self.nms_thresh = score_thresh, topk_candidates, nms_thresh
        self.detections_per_image, self.class_agnostic_nms = detections_per_image, class_agnostic_nms
        self.output_names = ("cls_logits", "box_deltas") + tuple(
            f"anchors_p{fpn.min_level + i}" for i in range(len(anchor_generator.strides)))

    @property
    def num_classes(self) -> int:
        return self.head.num_classes

    # ------------------------------------------------------------------ the Detector contract
    def network(self, batch: Tensor, image_sizes: Optional[Tensor] = None) -> tuple:
        """batch (B, 3, H, W) -> (cls_logits (B, N, K or K + 1), box_deltas (B, N, 4), L x anchors (N_l, 4)).
        image_sizes is not used: boxes are clipped to each image in post-processing."""
        features = self.fpn(self.backbone(batch))
        cls_logits, box_deltas = self.head(features)
        anchors = self.anchor_generator([f.shape[-2:] for f in features], batch.shape[-2:], batch.device)
        return (cls_logits, box_deltas, *anchors)

    def postprocess_outputs(self, outputs: tuple, image_sizes: list, *, score_thresh: float, nms_thresh: float,
                            max_detections: int, class_agnostic: bool, keep_classes: Optional[Tensor]) -> list:
        cls_logits, box_deltas, *anchors = outputs
        return postprocess(cls_logits, box_deltas, torch.cat(anchors), [a.shape[0] for a in anchors], image_sizes,
                           score_thresh=score_thresh, topk_candidates=self.topk_candidates, nms_thresh=nms_thresh,
                           max_detections=max_detections, box_weights=self.box_weights, box_clamp=self.box_clamp,
                           class_agnostic=class_agnostic, classifier=self.head.classifier, keep_classes=keep_classes)

    def losses(self, batch: ImageBatch, targets: list) -> dict:
        cls_logits, box_deltas, anchors, _ = self.forward_features(batch.tensor)
        return self.compute_losses(cls_logits, box_deltas, anchors, targets)

    def forward_features(self, batch: Tensor) -> tuple:
        """batch (B, 3, H, W) normalized -> cls_logits (B, N, K), box_deltas (B, N, 4), anchors (N, 4), level sizes."""
        cls_logits, box_deltas, *anchors = self.network(batch)
        return cls_logits, box_deltas, torch.cat(anchors), [a.shape[0] for a in anchors]

    # ------------------------------------------------------------------ training targets and losses
    def check_targets(self, targets: list) -> None:
        """`Detector.check_targets`, and labels in 0..K-1."""
        check_targets(targets, num_classes=self.num_classes)

    @torch.no_grad()
    def assign_targets(self, anchors: Tensor, targets: list) -> tuple:
        """-> labels (B, N) int8 in {-1, 0, 1}, matched boxes (B, N, 4), matched classes (B, N): `match_targets`,
        the whole batch at once and without a host synchronization (targets: see `check_targets`)."""
        return match_targets(self.matcher, anchors, targets, self.crowd_ioa)

    def _normalizer(self, count: Tensor) -> Tensor:
        """A count of anchors in the batch, averaged over processes under DDP (`sync_normalizer`), at least 1."""
        num = count.float()
        if self.loss_cfg.sync_normalizer and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(num)
            num = num / torch.distributed.get_world_size()
        return num.clamp(min=1.0)

    def num_foreground(self, labels: Tensor) -> Tensor:
        """Foreground anchors in the batch, averaged over processes under DDP, at least 1 (sec. 4.1)."""
        return self._normalizer((labels == FOREGROUND).sum())

    def compute_losses(self, cls_logits: Tensor, box_deltas: Tensor, anchors: Tensor, targets: list) -> dict:
        """The losses `loss_cfg` chooses, for the whole batch at once (no loop over images).

        cls_logits (B, N, K) (K + 1 with a softmax classifier), box_deltas (B, N, 4), anchors (N, 4).
        The classification loss is summed over all non-ignored anchors, the box loss over the
        foreground anchors, both divided by the number of foreground anchors in the batch (sec. 4.1);
        OHEM instead averages over the anchors it keeps (see `_ohem_losses`).
        Every anchor is computed and the foreground ones selected by a mask, so that no shape
        depends on the data and nothing waits for the device (OHEM's selection is the exception).
        Returns {"cls": scalar, "box": scalar}.
        """
        labels, gt_boxes, gt_classes = self.assign_targets(anchors, targets)  # (B, N), (B, N, 4), (B, N)
        if self.loss_cfg.cls == "ohem":
            return self._ohem_losses(cls_logits, box_deltas, anchors, labels, gt_boxes, gt_classes)
        fg = labels == FOREGROUND  # (B, N) the foreground anchors
        box_loss, iou = self._foreground_box_loss(box_deltas, anchors, gt_boxes, fg)  # (B, N), 0 off the foreground
        cls_loss = self._cls_loss(cls_logits, labels, gt_classes, fg, iou)
        normalizer = self.num_foreground(labels)
        return {"cls": cls_loss / normalizer, "box": self.loss_cfg.box_weight * box_loss.sum() / normalizer}

    def _cls_loss(self, cls_logits: Tensor, labels: Tensor, gt_classes: Tensor, fg: Tensor,
                  iou: Optional[Tensor]) -> Tensor:
        """Classification loss summed over the non-ignored anchors (and classes).

        fg (B, N) bool: the foreground anchors; iou (B, N): their regressed boxes' IoU with their
        ground truth, 0 elsewhere (needed for `iou_balanced_cls`).
        """
        cfg = self.loss_cfg
        valid = labels >= 0  # (B, N)
        if cfg.cls == "softmax_focal":
            target = torch.where(fg, gt_classes, self.num_classes)  # (B, N), background = K
            per_anchor = softmax_focal_loss(cls_logits.flatten(0, 1).float(), target.flatten(), cfg.alpha,
                                            cfg.gamma).view_as(target) * valid  # (B, N)
            total, gt_terms = per_anchor.sum(), torch.where(fg, per_anchor, 0.0)
        else:
            targets = torch.zeros_like(cls_logits, dtype=torch.bool)  # (B, N, K): one-hot on the foreground
            targets.scatter_(2, gt_classes[..., None], fg[..., None])
            gamma = 0.0 if cfg.cls == "ce" else cfg.gamma
            if cfg.cls == "fl_star":
                total = (fl_star_loss(cls_logits.float(), targets, cfg.gamma, cfg.beta) * valid[..., None]).sum()
            else:  # focal, ce: one fused pass (same values as sigmoid_focal_loss)
                total = sigmoid_focal_loss_fast(cls_logits, targets, cfg.alpha, gamma, weights=valid[..., None])
            if not cfg.iou_balanced_cls:
                return total
            gt_logits = cls_logits.gather(2, gt_classes[..., None])[..., 0].float()  # (B, N) the matched class's logit
            ones = torch.ones_like(gt_logits)
            gt_terms = (fl_star_loss(gt_logits, ones, cfg.gamma, cfg.beta) if cfg.cls == "fl_star"
                        else sigmoid_focal_loss(gt_logits, ones, cfg.alpha, gamma))  # (B, N)
            gt_terms = torch.where(fg, gt_terms, 0.0)
        if cfg.iou_balanced_cls:
            # IoU-balanced eqs. (1)-(2): positive i's ground-truth-class term counts w_i times instead of
            # once; its other class terms and all negatives keep weight 1 (as the authors' code does)
            weights = iou_balanced_weights(iou, gt_terms.detach(), cfg.eta)
            total = total + ((weights - 1) * gt_terms).sum()
        return total

    def _foreground_box_loss(self, box_deltas: Tensor, anchors: Tensor, gt_boxes: Tensor, fg: Tensor) -> tuple:
        """`_box_loss` of the foreground anchors fg (B, N), as (B, N) tensors that are 0 elsewhere.

        On an accelerator every anchor is computed and the foreground selected by the mask: no shape
        depends on the data, so nothing waits for the device. On the CPU, where reading how many
        anchors are foreground costs nothing, only those are computed (`foreground_by_index`; a few
        hundred of some 10^5 anchors), then put in place.
        """
        by_index = self.foreground_by_index
        if by_index is None:
            by_index = fg.device.type == "cpu"
        if not by_index:
            return self._box_loss(box_deltas, anchors, gt_boxes, fg)
        img, anchor = torch.nonzero(fg, as_tuple=True)  # (P,)
        loss, iou = self._box_loss(box_deltas[img, anchor], anchors[anchor], gt_boxes[img, anchor])
        zeros = torch.zeros(fg.shape, dtype=loss.dtype, device=fg.device)
        return zeros.index_put((img, anchor), loss), None if iou is None else zeros.index_put((img, anchor), iou)

    def _box_loss(self, deltas: Tensor, anchors: Tensor, gt: Tensor, fg: Optional[Tensor] = None) -> tuple:
        """Box loss of anchors (..., 4) predicting deltas (..., 4) for boxes gt (..., 4) (xyxy; shapes broadcast).

        fg (...) bool: which are foreground; the others get loss 0 (and IoU 0), computed with their own
        anchor as the target so that nothing is infinite. None: all are.
        Returns (loss (...) per anchor, IoU-balanced when `iou_balanced_loc`; iou (...) of each
        regressed box with its ground-truth box, detached, or None when no option needs it).
        """
        cfg = self.loss_cfg
        deltas = deltas.float()
        if fg is not None:
            gt = torch.where(fg[..., None], gt, anchors)
        iou = None
        if cfg.iou_balanced_cls or cfg.iou_balanced_loc:
            with torch.no_grad():
                iou = paired_iou(decode(anchors, deltas, self.box_weights, self.box_clamp), gt)
                if fg is not None:
                    iou = torch.where(fg, iou, 0.0)
        loss = self._unweighted_box_loss(deltas, anchors, gt)
        if fg is not None:
            loss = torch.where(fg, loss, 0.0)
        if cfg.iou_balanced_loc:
            loss = loss * self._loc_weights(iou, loss.detach())
        return loss, iou

    def _unweighted_box_loss(self, deltas: Tensor, anchors: Tensor, gt: Tensor) -> Tensor:
        """deltas, anchors, gt (..., 4) xyxy -> (...) smooth L1 summed over the 4 deltas, or 1 - GIoU."""
        if self.loss_cfg.box == "giou":
            return giou_loss(decode(anchors, deltas, self.box_weights, self.box_clamp), gt)
        return smooth_l1_loss(deltas, encode(anchors, gt, self.box_weights), self.loss_cfg.smooth_l1_beta).sum(dim=-1)

    def _loc_weights(self, iou: Tensor, losses: Tensor) -> Tensor:
        """IoU-balanced localization weights, detached: w_loc * iou^lambda (eq. 4), or eq. (5).

        iou, losses: the positives' (anything else with loss 0 adds nothing to the sums)."""
        cfg = self.loss_cfg
        if cfg.loc_normalize:
            return iou_balanced_weights(iou, losses, cfg.loc_lambda)
        if self.w_loc_fixed is not None:
            return self.w_loc_fixed * iou.float().pow(cfg.loc_lambda)
        # w_loc: auto. Until it is measured (nothing to measure yet: no positive with IoU > 0), eq. (5)'s
        # weights; chosen on the device, so that no step waits to read the buffer
        self._measure_w_loc(iou, losses)
        return torch.where(torch.isnan(self.w_loc), iou_balanced_weights(iou, losses, cfg.loc_lambda),
                           self.w_loc * iou.float().pow(cfg.loc_lambda))

    @torch.no_grad()
    def _measure_w_loc(self, iou: Tensor, losses: Tensor) -> None:
        """w_loc = sum(L) / sum(iou^lambda L) over this step's positives (summed over processes under
        DDP): the value that keeps the localization loss sum unchanged at the first step, which is how
        the IoU-balanced paper set it by hand (sec. 3.2). Stored in the `w_loc` buffer at the first step
        where the denominator is > 0 and kept after, so it is checkpointed and a resumed run keeps it.
        Decided on the device (no host synchronization); under DDP the two sums are all-reduced every
        step (every process takes the same branch)."""
        sums = torch.stack([losses.float().sum(), (iou.float().pow(self.loss_cfg.loc_lambda) * losses.float()).sum()])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(sums)
        self.w_loc.copy_(torch.where(torch.isnan(self.w_loc) & (sums[1] > 0), sums[0] / sums[1], self.w_loc))

    def _ohem_losses(self, cls_logits: Tensor, box_deltas: Tensor, anchors: Tensor, labels: Tensor,
                     gt_boxes: Tensor, gt_classes: Tensor) -> dict:
        """OHEM (sec. 5.1): train on each image's hard examples only.

        Every non-ignored anchor is scored by its loss: sigmoid cross entropy summed over the K
        classes, plus its box loss if it is foreground. `ohem_select` keeps, per image, the
        `ohem_batch` highest-loss anchors that survive NMS (`ohem_nms`) among the `ohem_candidates`
        highest; with `ohem_ratio` r > 0, OHEM 1:r. NMS compares the anchors' predicted boxes
        (decoded from the current box deltas), as OHEM in Fast R-CNN compares its RoIs, the regions
        being classified; before any training they are the anchors themselves.
        "cls": cross entropy (no alpha, no gamma) summed over the K classes of the kept anchors,
        divided by their number; "box": box loss of the kept foreground anchors, divided by their
        number (at least 1). Anchors not kept contribute nothing.
        """
        cfg = self.loss_cfg
        fg = labels == FOREGROUND  # (B, N)
        img, anchor = torch.nonzero(fg, as_tuple=True)  # (P,)
        targets = torch.zeros_like(cls_logits, dtype=torch.float32)  # (B, N, K)
        targets[img, anchor, gt_classes[img, anchor]] = 1.0
        with torch.no_grad():
            scores = F.binary_cross_entropy_with_logits(cls_logits.float(), targets, reduction="none")
            scores = scores.sum(dim=2)  # (B, N) cross entropy summed over the K classes
            box_deltas_f = box_deltas.float()
            scores[img, anchor] += self._unweighted_box_loss(box_deltas_f[img, anchor], anchors[anchor],
                                                             gt_boxes[img, anchor])
            scores = scores.masked_fill(labels < 0, float("-inf"))  # ignored anchors are never picked
            boxes = decode(anchors, box_deltas_f, self.box_weights, self.box_clamp)  # (B, N, 4) predicted boxes
            kept_img, kept_anchor = ohem_select(scores, boxes, fg, cfg.ohem_batch, cfg.ohem_nms, cfg.ohem_ratio,
                                                cfg.ohem_candidates)  # (S,)
        cls_loss = F.binary_cross_entropy_with_logits(cls_logits[kept_img, kept_anchor].float(),
                                                      targets[kept_img, kept_anchor], reduction="sum")
        kept_fg = fg[kept_img, kept_anchor]  # (S,)
        img, anchor = kept_img[kept_fg], kept_anchor[kept_fg]  # (S',) the kept foreground anchors
        box_loss, _ = self._box_loss(box_deltas[img, anchor], anchors[anchor], gt_boxes[img, anchor])
        return {"cls": cls_loss / self._normalizer(torch.tensor(kept_img.numel(), device=cls_logits.device)),
                "box": cfg.box_weight * box_loss.sum() / self._normalizer(kept_fg.sum())}
