"""RetinaNet: backbone -> FPN -> classification and box subnets -> (loss | postprocess).

Focal Loss paper, sec. 4 and Figure 3.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .anchors import AnchorGenerator
from .backbone import FPN, ResNet
from .boxes import encode
from .config import Config, LossConfig
from .losses import sigmoid_focal_loss, smooth_l1_loss
from .matcher import FOREGROUND, Matcher, ignore_crowd
from .postprocess import postprocess


class Subnet(nn.Module):
    """`num_convs` x [3x3 conv, (GroupNorm), ReLU], then a 3x3 conv to `out_channels` (sec. 4)."""

    def __init__(self, in_channels: int, channels: int, out_channels: int, num_convs: int = 4, norm: str = "none"):
        super().__init__()
        layers = []
        for i in range(num_convs):
            layers.append(nn.Conv2d(in_channels if i == 0 else channels, channels, 3, padding=1))
            if norm == "gn":
                layers.append(nn.GroupNorm(32, channels))
            elif norm != "none":
                raise ValueError(f"head_norm must be 'none' or 'gn', got '{norm}'")
            layers.append(nn.ReLU(inplace=True))
        self.tower = nn.Sequential(*layers)
        self.predictor = nn.Conv2d(channels, out_channels, 3, padding=1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):  # Gaussian sigma 0.01, bias 0 (sec. 4.1, "Initialization")
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.predictor(self.tower(x))


class RetinaNetHead(nn.Module):
    """The classification (K*A outputs) and box (4*A, class-agnostic) subnets, shared across levels."""

    def __init__(self, in_channels: int, num_anchors: int, num_classes: int, channels: int = 256,
                 num_convs: int = 4, norm: str = "none", prior_prob: float = 0.01):
        super().__init__()
        self.num_classes = num_classes
        self.cls_subnet = Subnet(in_channels, channels, num_anchors * num_classes, num_convs, norm)
        self.box_subnet = Subnet(in_channels, channels, num_anchors * 4, num_convs, norm)
        # b = -log((1 - pi) / pi): every anchor starts with foreground probability pi (sec. 4.1)
        nn.init.constant_(self.cls_subnet.predictor.bias, -math.log((1 - prior_prob) / prior_prob))

    def forward(self, features: list) -> tuple:
        """features: L x (B, C, H_l, W_l) -> cls_logits (B, N, K), box_deltas (B, N, 4), N = sum H_l*W_l*A."""
        cls, box = [], []
        for f in features:
            b = f.shape[0]
            # (B, A*K, H, W) -> (B, H, W, A*K) -> (B, H*W*A, K): channel a*K + k is anchor a, class k
            cls.append(self.cls_subnet(f).permute(0, 2, 3, 1).reshape(b, -1, self.num_classes))
            box.append(self.box_subnet(f).permute(0, 2, 3, 1).reshape(b, -1, 4))
        return torch.cat(cls, dim=1), torch.cat(box, dim=1)


def resized_size(height: int, width: int, min_size: int, max_size: int, rounding: str = "round") -> tuple:
    """Shorter side to `min_size`, unless the longer side would pass `max_size` (then that is capped).

    rounding "floor" is torchvision's GeneralizedRCNNTransform (checked against torchvision 0.29):
    the scale in float64, then interpolate(scale_factor=..., recompute_scale_factor=True) floors
    size * scale. E.g. 375 x 500 -> 800 x 1066 (rounding gives 800 x 1067).
    """
    scale = min(min_size / min(height, width), max_size / max(height, width))
    if rounding == "floor":
        return int(math.floor(height * scale)), int(math.floor(width * scale))
    return int(round(height * scale)), int(round(width * scale))


class RetinaNet(nn.Module):
    """RetinaNet (Lin et al., Focal Loss for Dense Object Detection).

    Eval mode: `model(images)` takes a list of (3, H, W) RGB float tensors in [0, 1], any sizes.
    Each is resized (shorter side `min_size`, longer side at most `max_size`), normalized and
    padded into a batch; returns per image a dict with `boxes` (D, 4) xyxy in the original
    image's pixels (clipped to it), `scores` (D,) and `labels` (D,) in 0..K-1.

    Train mode: `model(images, targets)` takes images at the size to train on (the data pipeline
    resizes and jitters) and per image {"boxes": (G, 4) xyxy pixels, "labels": (G,) in 0..K-1,
    "iscrowd": (G,) optional}; returns {"cls": loss, "box": loss}, each normalized by the number of
    foreground anchors in the batch (sec. 4.1).

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

    def __init__(self, backbone: ResNet, fpn: FPN, head: RetinaNetHead, anchor_generator: AnchorGenerator, *,
                 matcher: Matcher, loss: LossConfig, crowd_ioa: float = 0.7,
                 box_weights=(1.0, 1.0, 1.0, 1.0), box_clamp: float = math.log(1000.0 / 16),
                 score_thresh: float = 0.05, topk_candidates: int = 1000, nms_thresh: float = 0.5,
                 detections_per_image: int = 100, class_agnostic_nms: bool = False,
                 min_size: int = 800, max_size: int = 1333, resize_rounding: str = "round", size_divisibility: int = 32,
                 pixel_mean=(0.485, 0.456, 0.406), pixel_std=(0.229, 0.224, 0.225)):
        super().__init__()
        self.backbone, self.fpn, self.head = backbone, fpn, head
        self.anchor_generator = anchor_generator
        self.matcher = matcher
        self.loss_cfg = loss
        self.crowd_ioa = crowd_ioa
        self.box_weights = tuple(box_weights)
        self.box_clamp = box_clamp
        self.score_thresh, self.topk_candidates, self.nms_thresh = score_thresh, topk_candidates, nms_thresh
        self.detections_per_image, self.class_agnostic_nms = detections_per_image, class_agnostic_nms
        self.min_size, self.max_size, self.resize_rounding = min_size, max_size, resize_rounding
        self.size_divisibility = size_divisibility
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).reshape(3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).reshape(3, 1, 1), persistent=False)

    @property
    def num_classes(self) -> int:
        return self.head.num_classes

    # ------------------------------------------------------------------ pre-processing
    def preprocess(self, images: list, resize: bool) -> tuple:
        """images: list of (3, H, W) in [0, 1] -> batch (B, 3, H', W') padded, sizes [(h, w)] before padding."""
        if isinstance(images, Tensor) and images.dim() == 3:
            raise ValueError("images must be a list of (3, H, W) tensors or a (B, 3, H, W) tensor")
        normed, sizes = [], []
        for i, img in enumerate(images):
            if img.dim() != 3 or img.shape[0] != 3:
                raise ValueError(f"image {i}: expected a (3, H, W) RGB tensor, got shape {tuple(img.shape)}")
            img = (img.to(self.pixel_mean.device, torch.float32) - self.pixel_mean) / self.pixel_std
            if resize:
                size = resized_size(img.shape[1], img.shape[2], self.min_size, self.max_size, self.resize_rounding)
                if size != tuple(img.shape[1:]):
                    img = F.interpolate(img[None], size=size, mode="bilinear", align_corners=False)[0]
            normed.append(img)
            sizes.append((img.shape[1], img.shape[2]))
        d = self.size_divisibility
        h = int(math.ceil(max(s[0] for s in sizes) / d) * d)
        w = int(math.ceil(max(s[1] for s in sizes) / d) * d)
        batch = normed[0].new_zeros(len(normed), 3, h, w)
        for img, t in zip(normed, batch):
            t[:, : img.shape[1], : img.shape[2]].copy_(img)
        return batch, sizes

    # ------------------------------------------------------------------ forward
    def forward_features(self, batch: Tensor) -> tuple:
        """batch (B, 3, H, W) normalized -> cls_logits (B, N, K), box_deltas (B, N, 4), anchors (N, 4), level sizes."""
        features = self.fpn(self.backbone(batch))
        cls_logits, box_deltas = self.head(features)
        level_anchors = self.anchor_generator([f.shape[-2:] for f in features], batch.shape[-2:], batch.device)
        return cls_logits, box_deltas, torch.cat(level_anchors), [a.shape[0] for a in level_anchors]

    def forward(self, images, targets: Optional[list] = None):
        if self.training:
            if targets is None:
                raise ValueError("in train mode the model needs targets (use model.eval() for inference)")
            batch, _ = self.preprocess(images, resize=False)
            cls_logits, box_deltas, anchors, _ = self.forward_features(batch)
            return self.compute_losses(cls_logits, box_deltas, anchors, targets)
        original = [(img.shape[-2], img.shape[-1]) for img in images]
        batch, sizes = self.preprocess(images, resize=True)
        cls_logits, box_deltas, anchors, level_sizes = self.forward_features(batch)
        detections = self.postprocess(cls_logits, box_deltas, anchors, level_sizes, sizes)
        for det, (h, w), (oh, ow) in zip(detections, sizes, original):
            scale = torch.tensor([ow / w, oh / h, ow / w, oh / h], device=det["boxes"].device)
            det["boxes"] = det["boxes"] * scale
        return detections

    def postprocess(self, cls_logits, box_deltas, anchors, level_sizes, image_sizes) -> list:
        return postprocess(cls_logits, box_deltas, anchors, level_sizes, image_sizes,
                           score_thresh=self.score_thresh, topk_candidates=self.topk_candidates,
                           nms_thresh=self.nms_thresh, max_detections=self.detections_per_image,
                           box_weights=self.box_weights, box_clamp=self.box_clamp,
                           class_agnostic=self.class_agnostic_nms)

    # ------------------------------------------------------------------ training targets and losses
    @torch.no_grad()
    def assign_targets(self, anchors: Tensor, targets: list) -> tuple:
        """Match anchors to each image's boxes.

        Returns labels (B, N) int8 in {-1 ignore, 0 background, 1 foreground}, matched boxes
        (B, N, 4) xyxy and matched classes (B, N) int64 (both meaningful where labels == 1).
        Matching is per image (images have different box counts); everything after is batched.
        """
        labels, boxes, classes = [], [], []
        for i, t in enumerate(targets):
            gt = t["boxes"].to(anchors.device, torch.float32).reshape(-1, 4)
            gt_cls = t["labels"].to(anchors.device, torch.int64).reshape(-1)
            if gt.shape[0] != gt_cls.shape[0]:
                raise ValueError(f"image {i}: {gt.shape[0]} boxes but {gt_cls.shape[0]} labels")
            if gt_cls.numel() and (gt_cls.min() < 0 or gt_cls.max() >= self.num_classes):
                raise ValueError(f"image {i}: labels must be in 0..{self.num_classes - 1}, got {gt_cls.tolist()}")
            crowd = t.get("iscrowd")
            crowd = (crowd.to(anchors.device).reshape(-1).bool() if crowd is not None
                     else torch.zeros(gt.shape[0], dtype=torch.bool, device=anchors.device))
            real, crowd_boxes = gt[~crowd], gt[crowd]
            matched, lab = self.matcher.match_boxes(real, anchors)
            lab = ignore_crowd(lab, anchors, crowd_boxes, self.crowd_ioa)
            if real.shape[0] == 0:
                real, cls = anchors.new_zeros(1, 4), gt_cls.new_zeros(1)
            else:
                cls = gt_cls[~crowd]
            labels.append(lab)
            boxes.append(real[matched])
            classes.append(cls[matched])
        return torch.stack(labels), torch.stack(boxes), torch.stack(classes)

    def num_foreground(self, labels: Tensor) -> Tensor:
        """Foreground anchors in the batch, averaged over processes under DDP, at least 1 (sec. 4.1)."""
        num = (labels == FOREGROUND).sum().float()
        if self.loss_cfg.sync_normalizer and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(num)
            num = num / torch.distributed.get_world_size()
        return num.clamp(min=1.0)

    def compute_losses(self, cls_logits: Tensor, box_deltas: Tensor, anchors: Tensor, targets: list) -> dict:
        """Focal loss over all non-ignored anchors and smooth L1 over foreground anchors, for the whole
        batch at once, both divided by the number of foreground anchors."""
        labels, gt_boxes, gt_classes = self.assign_targets(anchors, targets)  # (B, N), (B, N, 4), (B, N)
        normalizer = self.num_foreground(labels)
        fg = labels == FOREGROUND  # (B, N)
        valid = labels >= 0
        cls_targets = torch.zeros_like(cls_logits, dtype=torch.float32)  # (B, N, K)
        cls_targets[fg, gt_classes[fg]] = 1.0
        cfg = self.loss_cfg
        if cfg.cls != "focal":
            raise ValueError(f"unknown classification loss '{cfg.cls}'")
        cls_loss = sigmoid_focal_loss(cls_logits[valid].float(), cls_targets[valid], cfg.alpha, cfg.gamma, "sum")
        target_deltas = encode(anchors[None].expand_as(gt_boxes)[fg], gt_boxes[fg], self.box_weights)  # (F, 4)
        if cfg.box != "smooth_l1":
            raise ValueError(f"unknown box loss '{cfg.box}'")
        box_loss = smooth_l1_loss(box_deltas[fg].float(), target_deltas, cfg.smooth_l1_beta, "sum")
        return {"cls": cls_loss / normalizer, "box": cfg.box_weight * box_loss / normalizer}


def build_model(config: Config) -> RetinaNet:
    """The one place that reads the config to build a RetinaNet."""
    m = config.model
    backbone = ResNet(m.backbone, width=m.backbone_width, norm=m.backbone_norm, frozen_stages=m.frozen_stages,
                      norm_eps=m.backbone_norm_eps)
    if m.backbone_weights:
        from .convert import load_backbone_weights

        load_backbone_weights(backbone, m.backbone_weights)
    fpn = FPN(backbone.out_channels, m.fpn_channels, m.min_level, m.max_level, m.p6_from)
    num_levels = m.max_level - m.min_level + 1
    if len(m.anchor_sizes) != num_levels:
        raise ValueError(f"model.anchor_sizes has {len(m.anchor_sizes)} sizes for {num_levels} levels "
                         f"(P{m.min_level}-P{m.max_level})")
    anchors = AnchorGenerator(m.anchor_sizes, m.anchor_scales, m.anchor_ratios,
                              [2 ** lvl for lvl in range(m.min_level, m.max_level + 1)], m.anchor_offset, m.anchor_style)
    head = RetinaNetHead(m.fpn_channels, anchors.num_anchors, m.num_classes, m.head_channels, m.head_convs,
                         m.head_norm, m.prior_prob)
    return RetinaNet(backbone, fpn, head, anchors, matcher=Matcher(m.fg_iou, m.bg_iou, m.allow_low_quality),
                     loss=config.loss, crowd_ioa=m.crowd_ioa, box_weights=m.box_weights, box_clamp=m.box_clamp,
                     score_thresh=m.score_thresh, topk_candidates=m.topk_candidates, nms_thresh=m.nms_thresh,
                     detections_per_image=m.detections_per_image, class_agnostic_nms=m.class_agnostic_nms,
                     min_size=m.min_size, max_size=m.max_size, resize_rounding=m.resize_rounding,
                     size_divisibility=m.size_divisibility, pixel_mean=m.pixel_mean, pixel_std=m.pixel_std)
