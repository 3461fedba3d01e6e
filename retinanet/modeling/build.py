"""`build_model(config)`: the one place that reads the config to build a detector (dispatch on model.arch)."""

from __future__ import annotations

import math

from ..config import Config, ModelConfig
from ..ops.anchors import AnchorGenerator
from ..ops.matcher import Matcher
from .backbone import FPN, ResNet
from .detector import Detector
from .retinanet import RetinaNet, RetinaNetHead


def build_model(config: Config) -> Detector:
    """A RetinaNet or a Faster R-CNN, as `config.model.arch` says."""
    config.validate()
    config.loss.validate()
    m = config.model
    backbone = ResNet(m.backbone, width=m.backbone_width, norm=m.backbone_norm, frozen_stages=m.frozen_stages,
                      norm_eps=m.backbone_norm_eps)
    if m.backbone_weights:
        from ..convert import load_backbone_weights

        load_backbone_weights(backbone, m.backbone_weights)
    if m.arch in ("deepmask", "sharpmask"):
        return _segment_proposals(config, backbone, None)
    fpn = FPN(backbone.out_channels, m.fpn_channels, m.min_level, m.max_level, m.p6_from)
    if m.arch == "fpn_masks":
        return _segment_proposals(config, backbone, fpn)
    anchors = build_anchor_generator(m)
    shared = dict(min_size=m.min_size, max_size=m.max_size, resize_rounding=m.resize_rounding,
                  size_divisibility=m.size_divisibility, pixel_mean=m.pixel_mean, pixel_std=m.pixel_std,
                  score_thresh=m.score_thresh, nms_thresh=m.nms_thresh, detections_per_image=m.detections_per_image,
                  class_agnostic_nms=m.class_agnostic_nms)
    if m.arch == "faster_rcnn":
        return _faster_rcnn(config, backbone, fpn, anchors, shared)
    head = RetinaNetHead(m.fpn_channels, anchors.num_anchors, m.num_classes, m.head_channels, m.head_convs,
                         m.head_norm, m.prior_prob,
                         classifier="softmax" if config.loss.cls == "softmax_focal" else "sigmoid", bias=m.head_bias)
    return RetinaNet(backbone, fpn, head, anchors, matcher=Matcher(m.fg_iou, m.bg_iou, m.allow_low_quality),
                     loss=config.loss, crowd_ioa=m.crowd_ioa, box_weights=m.box_weights, box_clamp=m.box_clamp,
                     topk_candidates=m.topk_candidates, **shared)


def build_anchor_generator(m: ModelConfig) -> AnchorGenerator:
    """The anchors of a RetinaNet, or of a Faster R-CNN's RPN: one base size per level P{min_level}..P{max_level}."""
    num_levels = m.max_level - m.min_level + 1
    if len(m.anchor_sizes) != num_levels:
        raise ValueError(f"model.anchor_sizes has {len(m.anchor_sizes)} sizes for {num_levels} levels "
                         f"(P{m.min_level}-P{m.max_level})")
    return AnchorGenerator(m.anchor_sizes, m.anchor_scales, m.anchor_ratios,
                           [2 ** lvl for lvl in range(m.min_level, m.max_level + 1)], m.anchor_offset, m.anchor_style)


def _faster_rcnn(config: Config, backbone: ResNet, fpn: FPN, anchors: AnchorGenerator, shared: dict) -> Detector:
    from .faster_rcnn import FasterRCNN
    from .roi_heads import FastRCNNPredictor, RoIHeads, TwoMLPHead
    from .rpn import RegionProposalNetwork, RPNHead

    m, loss = config.model, config.loss
    if not (m.min_level <= m.roi_min_level <= m.roi_max_level <= min(m.max_level, 5)):
        raise ValueError(f"model.roi_min_level..roi_max_level (P{m.roi_min_level}-P{m.roi_max_level}) must lie in "
                         f"the FPN's P{m.min_level}-P{min(m.max_level, 5)}")
    rpn = RegionProposalNetwork(
        RPNHead(m.fpn_channels, anchors.num_anchors), anchors, fg_iou=m.rpn_fg_iou, bg_iou=m.rpn_bg_iou,
        batch_size_per_image=m.rpn_batch_per_image, positive_fraction=m.rpn_positive_fraction,
        pre_nms_top_n=dict(training=m.rpn_pre_nms_top_n[0], testing=m.rpn_pre_nms_top_n[1]),
        post_nms_top_n=dict(training=m.rpn_post_nms_top_n[0], testing=m.rpn_post_nms_top_n[1]),
        nms_thresh=m.rpn_nms_thresh, smooth_l1_beta=loss.smooth_l1_beta)
    pooled = m.fpn_channels * m.roi_output_size ** 2
    roi_heads = RoIHeads(
        TwoMLPHead(pooled, m.roi_head_dim), FastRCNNPredictor(m.roi_head_dim, m.num_classes + 1),
        num_classes=m.num_classes, strides=tuple(2 ** k for k in range(m.roi_min_level, m.roi_max_level + 1)),
        output_size=m.roi_output_size, sampling_ratio=m.roi_sampling_ratio, aligned=m.roi_aligned,
        pooler=m.roi_pooler, fg_iou=m.roi_fg_iou, bg_iou=m.roi_bg_iou, batch_size_per_image=m.roi_batch_per_image,
        positive_fraction=m.roi_positive_fraction, box_weights=tuple(m.roi_box_weights),
        box_clamp=m.box_clamp if m.box_clamp else math.log(1000.0 / 16), smooth_l1_beta=loss.smooth_l1_beta,
        box_loss=loss.box, score_thresh=m.score_thresh, nms_thresh=m.nms_thresh,
        detections_per_image=m.detections_per_image)
    return FasterRCNN(backbone, fpn, rpn, roi_heads, num_classes=m.num_classes, **shared)


def _segment_proposals(config: Config, backbone: ResNet, fpn) -> Detector:
    from ..ops.segprop import pyramid_scales
    from .segment_proposals import DeepMask, FPNMaskProposals

    m = config.model
    common = dict(object_ratio=m.segprop_object_ratio, shift=m.segprop_shift, neg_shift=m.segprop_neg_shift,
                  top_n=m.segprop_top_n, mask_thresh=m.segprop_mask_thresh, score_thresh=m.score_thresh,
                  nms_thresh=m.nms_thresh, detections_per_image=m.detections_per_image, min_size=m.min_size,
                  max_size=m.max_size, resize_rounding=m.resize_rounding, size_divisibility=m.size_divisibility,
                  pixel_mean=m.pixel_mean, pixel_std=m.pixel_std)
    if m.arch == "fpn_masks":
        return FPNMaskProposals(backbone, fpn, mlp_windows=tuple(int(k) for k in m.segprop_mlp_windows),
                                hidden=m.segprop_mlp_hidden, mask_size=m.segprop_fpn_mask_size,
                                labels=m.segprop_fpn_labels, object_cells=m.segprop_fpn_object_cells,
                                padding=m.segprop_fpn_padding, radius=m.segprop_fpn_radius,
                                batch_per_image=m.segprop_fpn_batch_per_image,
                                positive_fraction=m.segprop_fpn_positive_fraction,
                                mask_weight=m.segprop_fpn_mask_weight, **common)
    lo, hi, step = m.segprop_scales
    return DeepMask(backbone, window=m.segprop_window, context=m.segprop_context, features=m.segprop_features,
                    head_dim=m.segprop_head_dim, mask_size=m.segprop_mask_size, scales=pyramid_scales(lo, hi, step),
                    windows_per_image=m.segprop_windows_per_image, scale_tol=step / 2,
                    refine_k=m.segprop_refine_k if m.arch == "sharpmask" else 0,
                    refine_after=m.segprop_refine_after, **common)
