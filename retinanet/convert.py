"""Use the weights people already have: torchvision ImageNet ResNets and its COCO RetinaNet."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Optional

import torch
from torch import nn


def read_state_dict(path: str) -> dict:
    """A state dict from a file, loaded as data only (`weights_only=True`): nothing in it can run."""
    from .checkpoint import load_data_file

    p = Path(path)
    obj = load_data_file(p, "PyTorch weights file")
    for key in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{p}: expected a state dict (a mapping of names to tensors)")
    return obj


def load_backbone_weights(backbone: nn.Module, path: str, verbose: bool = True) -> tuple:
    """Load a torchvision ImageNet ResNet checkpoint (names like `layer1.0.conv1.weight`) into our ResNet.

    The classifier (`fc.*`) is dropped. Returns (missing, unexpected) key lists and prints them.
    """
    state = {k: v for k, v in read_state_dict(path).items() if not k.startswith("fc.")}
    own = backbone.state_dict()
    mismatched = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if mismatched:
        k = mismatched[0]
        raise ValueError(f"{path}: shape mismatch for '{k}': file {tuple(state[k].shape)}, model {tuple(own[k].shape)} "
                         f"({len(mismatched)} mismatched keys; is it the same ResNet depth and width?)")
    result = backbone.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys]
    unexpected = [k for k in result.unexpected_keys if not k.endswith("num_batches_tracked")]
    if verbose:
        print(f"loaded backbone weights from {path}: {len(state) - len(unexpected)} tensors, "
              f"{len(missing)} missing{': ' + ', '.join(missing[:10]) if missing else ''}, "
              f"{len(unexpected)} unexpected{': ' + ', '.join(unexpected[:10]) if unexpected else ''}")
    return missing, unexpected


# ----------------------------------------------------------------------------------------------
# torchvision's retinanet_resnet50_fpn (v1) and retinanet_resnet50_fpn_v2 -> a checkpoint of ours
#
# Key mapping (ours <- torchvision; torchvision's current names, with the older names it still loads):
#   backbone.{...}                  <- backbone.body.{...}                           (ResNet; num_batches_tracked dropped)
#   fpn.lateral.{i}.{w,b}           <- backbone.fpn.inner_blocks.{i}.0.{w,b}         (older: inner_blocks.{i}.{w,b})
#   fpn.output.{i}.{w,b}            <- backbone.fpn.layer_blocks.{i}.0.{w,b}         (older: layer_blocks.{i}.{w,b})
#   fpn.extra.0 / fpn.extra.1       <- backbone.fpn.extra_blocks.p6 / .p7
#   head.cls_subnet.tower.{2j}      <- head.classification_head.conv.{j}.0           (older: conv.{2j}), j = 0..3
#   head.cls_subnet.predictor       <- head.classification_head.cls_logits
#   head.box_subnet.tower.{2j}      <- head.regression_head.conv.{j}.0               (older: conv.{2j})
#   head.box_subnet.predictor       <- head.regression_head.bbox_reg
# v2 (GroupNorm heads, tower convs without bias): our tower is (conv, GroupNorm, ReLU) x 4, so
#   head.*.tower.{3j}               <- head.*_head.conv.{j}.0                        (conv weight only)
#   head.*.tower.{3j + 1}           <- head.*_head.conv.{j}.1                        (GroupNorm weight, bias)
# and v2's backbone has BatchNorm2d (its num_batches_tracked counters are not carried over).
# No tensor is permuted: both models order a location's A = 9 anchors ratio-major (anchor_style
# "torchvision") and lay the head's channels out as anchor * K + class (boxes: anchor * 4 + coord).

# torchvision's 91 COCO label slots: label i is COCO category id i; "__background__" (0) and "N/A"
# are ids that COCO never used. They are kept (the head has outputs for them) and marked
# placeholder, so that `Predictor` leaves them out unless asked for.
TORCHVISION_COCO_NAMES = [
    "__background__", "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "N/A", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse",
    "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "N/A", "backpack", "umbrella", "N/A", "N/A", "handbag",
    "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove",
    "skateboard", "surfboard", "tennis racket", "bottle", "N/A", "wine glass", "cup", "fork", "knife", "spoon",
    "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake",
    "chair", "couch", "potted plant", "bed", "N/A", "dining table", "N/A", "N/A", "toilet", "N/A", "tv", "laptop",
    "mouse", "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "N/A",
    "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
]
PLACEHOLDER_NAMES = ("__background__", "N/A")


TORCHVISION_ARCHS = ("retinanet_resnet50_fpn", "retinanet_resnet50_fpn_v2")
TORCHVISION_TWO_STAGE = "fasterrcnn_resnet50_fpn"


def torchvision_retinanet_config(num_classes: int = 91, bn_eps: Optional[float] = None,
                                 arch: str = "retinanet_resnet50_fpn"):
    """The config under which our RetinaNet computes what torchvision's `arch` computes.

    bn_eps: the backbone's BatchNorm eps. None: the one torchvision's COCO weights run with, 0.0 for
    v1 (it sets FrozenBatchNorm eps to 0 when it loads them; 1e-5 for a v1 model built without them)
    and 1e-5 for v2 (ordinary BatchNorm2d, whatever the weights).
    """
    from .config import Config

    if arch not in TORCHVISION_ARCHS:
        raise ValueError(f"unknown torchvision architecture '{arch}' (expected one of {', '.join(TORCHVISION_ARCHS)})")
    v2 = arch == "retinanet_resnet50_fpn_v2"
    if bn_eps is None:
        bn_eps = 1e-5 if v2 else 0.0
    cfg = Config()
    m = cfg.model
    m.num_classes = num_classes
    m.backbone, m.backbone_width, m.backbone_norm, m.backbone_norm_eps = "resnet50", 64, "frozen_bn", bn_eps
    m.frozen_stages = 2  # trainable_backbone_layers=3: conv1 and layer1 frozen
    m.min_level, m.max_level, m.fpn_channels, m.p6_from = 3, 7, 256, "p5"  # LastLevelP6P7(256, 256): P6 from P5
    m.anchor_sizes = [32.0, 64.0, 128.0, 256.0, 512.0]  # x, int(x * 2^(1/3)), int(x * 2^(2/3))
    m.anchor_scales = [1.0, 2 ** (1.0 / 3), 2 ** (2.0 / 3)]
    m.anchor_ratios = [0.5, 1.0, 2.0]
    m.anchor_offset, m.anchor_style = 0.0, "torchvision"
    m.head_convs, m.head_channels, m.head_norm = 4, 256, "none"
    m.box_weights, m.box_clamp = [1.0, 1.0, 1.0, 1.0], math.log(1000.0 / 16)
    m.score_thresh, m.topk_candidates, m.nms_thresh, m.detections_per_image = 0.05, 1000, 0.5, 300
    m.class_agnostic_nms = False
    m.min_size, m.max_size, m.resize_rounding, m.size_divisibility = 800, 1333, "floor", 32
    m.pixel_mean, m.pixel_std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    if v2:  # torchvision models/detection/retinanet.py, retinanet_resnet50_fpn_v2 (PR #5756)
        m.backbone_norm = "bn"  # resnet50(weights=...) with its default BatchNorm2d, also under the COCO weights
        m.p6_from = "c5"  # LastLevelP6P7(2048, 256): in_channels != out_channels, so P6 is computed from C5
        # Conv2dNormActivation(norm_layer=partial(nn.GroupNorm, 32)): conv without bias, GroupNorm(32), ReLU
        m.head_norm, m.head_bias = "gn", False
        cfg.loss.box = "giou"  # head.regression_head._loss_type = "giou" (decoded boxes, BoxCoder weights 1, 1, 1, 1)
    return cfg


def torchvision_faster_rcnn_config(num_classes: int = 91, bn_eps: float = 0.0):
    """The config under which our Faster R-CNN computes what torchvision's fasterrcnn_resnet50_fpn (v1) computes.

    num_classes: torchvision's count, background included (91 for COCO); ours is one less (our
    label l is torchvision's l + 1). bn_eps: 0.0 for torchvision's COCO weights (it sets
    FrozenBatchNorm eps to 0 when it loads them), 1e-5 for a model built without them.
    """
    from .config import Config

    cfg = Config()
    m = cfg.model
    m.arch, m.num_classes = "faster_rcnn", num_classes - 1
    m.backbone, m.backbone_width, m.backbone_norm, m.backbone_norm_eps = "resnet50", 64, "frozen_bn", bn_eps
    m.frozen_stages = 2  # trainable_backbone_layers=3: conv1 and layer1 frozen
    m.min_level, m.max_level, m.fpn_channels, m.p6_from = 2, 6, 256, "pool"  # LastLevelMaxPool: P6 from P5
    m.anchor_sizes = [32.0, 64.0, 128.0, 256.0, 512.0]  # ((32,), (64,), ...), aspect ratios (0.5, 1, 2) per level
    m.anchor_scales, m.anchor_ratios = [1.0], [0.5, 1.0, 2.0]
    m.anchor_offset, m.anchor_style = 0.0, "torchvision"
    m.rpn_fg_iou, m.rpn_bg_iou, m.rpn_batch_per_image, m.rpn_positive_fraction = 0.7, 0.3, 256, 0.5
    m.rpn_pre_nms_top_n, m.rpn_post_nms_top_n, m.rpn_nms_thresh = [2000, 1000], [2000, 1000], 0.7
    m.roi_min_level, m.roi_max_level, m.roi_pooler = 2, 5, "align"  # MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2)
    m.roi_output_size, m.roi_sampling_ratio, m.roi_aligned, m.roi_head_dim = 7, 2, False, 1024
    m.roi_fg_iou, m.roi_bg_iou, m.roi_batch_per_image, m.roi_positive_fraction = 0.5, 0.5, 512, 0.25
    m.roi_box_weights, m.box_clamp = [10.0, 10.0, 5.0, 5.0], math.log(1000.0 / 16)
    m.score_thresh, m.nms_thresh, m.detections_per_image = 0.05, 0.5, 100
    m.min_size, m.max_size, m.resize_rounding, m.size_divisibility = 800, 1333, "floor", 32
    m.pixel_mean, m.pixel_std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    cfg.loss.smooth_l1_beta = 1.0 / 9  # torchvision's RPN and box-head losses
    return cfg


def torchvision_categories(num_classes: int) -> list:
    """Label i -> {"id": i, "name": ...}; placeholder slots carry "placeholder": True.

    91 classes: torchvision's COCO names. Otherwise torchvision's convention that label 0 is the
    background, and "class_i" for the rest.
    """
    if num_classes == len(TORCHVISION_COCO_NAMES):
        names = TORCHVISION_COCO_NAMES
    else:
        names = ["__background__"] + [f"class_{i}" for i in range(1, num_classes)]
    return [{"id": i, "name": n, **({"placeholder": True} if n in PLACEHOLDER_NAMES else {})} for i, n in enumerate(names)]


_HEADS = {"cls_subnet": "classification_head", "box_subnet": "regression_head"}


def _tower_layer(match, block: int) -> str:
    """Our tower layer i -> torchvision's conv block j = i // block: its conv (.0) or GroupNorm (.1).

    block: our layers per conv block, 2 (conv, ReLU: v1) or 3 (conv, GroupNorm, ReLU: v2).
    """
    i = int(match[2])
    j, r = divmod(i, block)
    if r == block - 1:  # the block's ReLU
        raise ValueError(f"tower layer {i} is a ReLU: it has no parameters")
    return f"head.{_HEADS[match[1]]}.conv.{j}.{r}.{match[3]}"


def _tower_block(state: dict) -> int:
    """Layers per tower conv block in our state dict: 3 when the heads have GroupNorm (tower.1 has weights), else 2."""
    return 3 if "head.cls_subnet.tower.1.weight" in state else 2


_OURS_TO_TORCHVISION = [
    (r"backbone\.(.+)", lambda m: f"backbone.body.{m[1]}"),
    (r"fpn\.lateral\.(\d+)\.(weight|bias)", lambda m: f"backbone.fpn.inner_blocks.{m[1]}.0.{m[2]}"),
    (r"fpn\.output\.(\d+)\.(weight|bias)", lambda m: f"backbone.fpn.layer_blocks.{m[1]}.0.{m[2]}"),
    (r"fpn\.extra\.([01])\.(weight|bias)", lambda m: f"backbone.fpn.extra_blocks.p{int(m[1]) + 6}.{m[2]}"),
    (r"head\.(cls_subnet|box_subnet)\.tower\.(\d+)\.(weight|bias)", _tower_layer),
    (r"head\.cls_subnet\.predictor\.(weight|bias)", lambda m: f"head.classification_head.cls_logits.{m[1]}"),
    (r"head\.box_subnet\.predictor\.(weight|bias)", lambda m: f"head.regression_head.bbox_reg.{m[1]}"),
    # Faster R-CNN: torchvision's current RPNHead wraps its conv as conv.0.0 (Conv2dNormActivation)
    (r"rpn\.head\.conv\.(weight|bias)", lambda m: f"rpn.head.conv.0.0.{m[1]}"),
    (r"(rpn\.head\.(?:cls_logits|bbox_pred)\.(?:weight|bias))", lambda m: m[1]),
    (r"(roi_heads\.box_(?:head\.fc[67]|predictor\.(?:cls_score|bbox_pred))\.(?:weight|bias))", lambda m: m[1]),
]


def torchvision_name(key: str, tower_block: int = 2) -> str:
    """Our state-dict key -> torchvision's (current layout) key for the same tensor.

    tower_block: 2 for heads without normalization (v1), 3 for GroupNorm heads (v2).
    """
    for pattern, rename in _OURS_TO_TORCHVISION:
        m = re.fullmatch(pattern, key)
        if m:
            return rename(m, tower_block) if rename is _tower_layer else rename(m)
    raise ValueError(f"'{key}' has no counterpart in torchvision's retinanet_resnet50_fpn")


def normalize_torchvision_keys(state: dict) -> dict:
    """torchvision's older key layout -> its current one, as its own `_load_from_state_dict` does.

    Drops `num_batches_tracked` (BatchNorm2d counters; FrozenBatchNorm has none) and a DDP
    `module.` prefix.
    """
    out = {}
    for key, value in state.items():
        if key.startswith("module."):
            key = key[len("module."):]
        if key.endswith("num_batches_tracked"):
            continue
        key = re.sub(r"^(backbone\.fpn\.(?:inner|layer)_blocks\.\d+)\.(weight|bias)$", r"\1.0.\2", key)
        key = re.sub(r"^rpn\.head\.conv\.(weight|bias)$", r"rpn.head.conv.0.0.\1", key)  # torchvision < 0.13
        m = re.fullmatch(r"(head\.(?:classification|regression)_head\.conv)\.(\d+)\.(weight|bias)", key)
        if m and int(m[2]) % 2 == 0:  # v1 head: Sequential(conv, relu, conv, relu, ...)
            key = f"{m[1]}.{int(m[2]) // 2}.0.{m[3]}"
        out[key] = value
    return out


def to_torchvision_state_dict(state: dict) -> dict:
    """Our RetinaNet state dict (torchvision config) -> torchvision's key names. Inverse of `from_torchvision_state_dict`."""
    block = _tower_block(state)
    return {torchvision_name(k, block): v for k, v in state.items()}


def from_torchvision_state_dict(state: dict, reference: dict) -> dict:
    """torchvision retinanet_resnet50_fpn state dict -> ours, checked key by key and shape by shape.

    reference: our model's state dict (gives the expected keys and shapes). Every tensor must find
    its place and every place must be filled; the errors list what did not. BatchNorm's
    `num_batches_tracked` counters keep the reference's values (they only matter for BatchNorm
    without momentum, which neither model uses).
    """
    tv = normalize_torchvision_keys(state)
    block = _tower_block(reference)
    counters = {k: v for k, v in reference.items() if k.endswith("num_batches_tracked")}
    ours_of = {torchvision_name(k, block): k for k in reference if k not in counters}
    unexpected = sorted(k for k in tv if k not in ours_of)
    missing = sorted(k for k in ours_of if k not in tv)
    if unexpected or missing:
        what = TORCHVISION_TWO_STAGE if any(k.startswith("rpn.") for k in reference) else "retinanet_resnet50_fpn"
        raise ValueError(f"not a torchvision {what} state dict: "
                         + (f"{len(unexpected)} unexpected keys ({', '.join(unexpected[:5])}) " if unexpected else "")
                         + (f"{len(missing)} missing keys ({', '.join(missing[:5])})" if missing else ""))
    out = dict(counters)
    for tv_key, ours in ours_of.items():
        value = tv[tv_key]
        if tuple(value.shape) != tuple(reference[ours].shape):
            raise ValueError(f"'{tv_key}' has shape {tuple(value.shape)}, expected {tuple(reference[ours].shape)} for '{ours}'")
        out[ours] = value.to(reference[ours].dtype)
    return out


def detect_torchvision_arch(state: dict) -> str:
    """"retinanet_resnet50_fpn", "retinanet_resnet50_fpn_v2" or "fasterrcnn_resnet50_fpn" from a
    (normalized) torchvision state dict.

    v2 has GroupNorm in its heads (`head.classification_head.conv.0.1.weight`) and computes P6 from
    C5 (`backbone.fpn.extra_blocks.p6.weight` takes 2048 channels, v1's takes P5's 256).
    """
    if "roi_heads.box_predictor.cls_score.weight" in state:
        return TORCHVISION_TWO_STAGE
    gn = "head.classification_head.conv.0.1.weight" in state
    p6 = state.get("backbone.fpn.extra_blocks.p6.weight")
    if p6 is None:
        raise ValueError("no 'backbone.fpn.extra_blocks.p6.weight': not a torchvision RetinaNet state dict")
    from_c5 = p6.shape[1] != p6.shape[0]
    if gn != from_c5:
        raise ValueError(f"GroupNorm heads {'with' if gn else 'without'} P6 from {'C5' if from_c5 else 'P5'}: "
                         "neither retinanet_resnet50_fpn (no GroupNorm, P5) nor _v2 (GroupNorm, C5)")
    return "retinanet_resnet50_fpn_v2" if gn else "retinanet_resnet50_fpn"


def convert_torchvision_retinanet(src: str, dst: str, bn_eps: Optional[float] = None, arch: str = "auto") -> dict:
    """Read torchvision's retinanet_resnet50_fpn or _v2 weights from `src`, write a checkpoint of ours to `dst`.

    arch: "auto" (from the keys: `detect_torchvision_arch`) or one of TORCHVISION_ARCHS, which must
    then agree with the keys. bn_eps: see `torchvision_retinanet_config` (None: the arch's).
    The class count comes from the classification layer (91 for torchvision's COCO models).
    Returns the checkpoint written.
    """
    from .checkpoint import make_checkpoint, save_atomic
    from .modeling import build_model

    state = normalize_torchvision_keys(read_state_dict(src))
    if "roi_heads.box_predictor.cls_score.weight" in state or arch == TORCHVISION_TWO_STAGE:
        if arch not in ("auto", TORCHVISION_TWO_STAGE):
            raise ValueError(f"{src}: --arch {arch}, but the weights are {TORCHVISION_TWO_STAGE}'s (RPN and RoI heads)")
        return _convert_torchvision_faster_rcnn(src, dst, state, 0.0 if bn_eps is None else bn_eps)
    cls_bias = state.get("head.classification_head.cls_logits.bias")
    if cls_bias is None:
        raise ValueError(f"{src}: no 'head.classification_head.cls_logits.bias'; "
                         "is this torchvision's retinanet_resnet50_fpn or retinanet_resnet50_fpn_v2?")
    try:
        found = detect_torchvision_arch(state)
    except ValueError as e:
        raise ValueError(f"{src}: {e}") from None
    if arch not in ("auto", found):
        raise ValueError(f"{src}: --arch {arch}, but the weights are {found}'s "
                         f"({'GroupNorm heads, P6 from C5' if found.endswith('v2') else 'no GroupNorm, P6 from P5'})")
    anchors_per_location = 9
    if cls_bias.numel() % anchors_per_location:
        raise ValueError(f"{src}: {cls_bias.numel()} classification outputs is not a multiple of {anchors_per_location} anchors")
    num_classes = cls_bias.numel() // anchors_per_location
    cfg = torchvision_retinanet_config(num_classes=num_classes, bn_eps=bn_eps, arch=found)
    model = build_model(cfg)
    try:
        model.load_state_dict(from_torchvision_state_dict(state, model.state_dict()))
    except ValueError as e:
        raise ValueError(f"{src}: {e}") from None
    ckpt = make_checkpoint(model, cfg, torchvision_categories(num_classes),
                           converted_from=f"torchvision {found}: {Path(src).name}")
    save_atomic(ckpt, dst)
    return ckpt


def _convert_torchvision_faster_rcnn(src: str, dst: str, state: dict, bn_eps: float) -> dict:
    """torchvision fasterrcnn_resnet50_fpn (v1) weights (normalized keys) -> a checkpoint of ours at `dst`.

    torchvision's label 0 is the background; its labels 1..K are our 0..K-1, with category ids and
    names from its COCO list (placeholders for "N/A").
    """
    from .checkpoint import make_checkpoint, save_atomic
    from .modeling import build_model

    cls_bias = state.get("roi_heads.box_predictor.cls_score.bias")
    if cls_bias is None:
        raise ValueError(f"{src}: no 'roi_heads.box_predictor.cls_score.bias'; is this torchvision's "
                         f"{TORCHVISION_TWO_STAGE}?")
    cfg = torchvision_faster_rcnn_config(num_classes=cls_bias.numel(), bn_eps=bn_eps)
    model = build_model(cfg)
    try:
        model.load_state_dict(from_torchvision_state_dict(state, model.state_dict()))
    except ValueError as e:
        raise ValueError(f"{src}: {e}") from None
    categories = torchvision_categories(cls_bias.numel())[1:]  # without the background slot
    ckpt = make_checkpoint(model, cfg, categories, converted_from=f"torchvision {TORCHVISION_TWO_STAGE}: {Path(src).name}")
    save_atomic(ckpt, dst)
    return ckpt
