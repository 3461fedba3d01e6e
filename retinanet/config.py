"""The one typed config: dataclass sections, YAML loading, strict `key=value` overrides.

Every checkpoint stores `config_to_dict(cfg)` (plain dicts, lists and numbers), so a checkpoint
loads with `torch.load(..., weights_only=True)` and rebuilds the exact model with
`config_from_dict`. Unknown keys are an error that suggests the closest key.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional


@dataclass
class ModelConfig:
    """The detector: backbone, FPN, anchors, heads, matching, pre/post-processing.

    Defaults are the Focal Loss paper's RetinaNet (sec. 4) with Detectron's inference settings.
    `arch: faster_rcnn` is the FPN two-stage detector (thesis ch. 4); it uses the shared keys
    (backbone, FPN, anchors, inference, pre-processing) and the rpn_* and roi_* keys; see
    retinanet/configs/faster_rcnn_paper.yaml for its values. `arch: deepmask | sharpmask | fpn_masks` are
    class-agnostic segment proposals (thesis ch. 3 and sec. 4.6; retinanet/modeling/segment_proposals.py):
    the shared backbone, FPN and inference keys and the segprop_* keys (retinanet/configs/segprop_*.yaml).
    """

    arch: str = "retinanet"  # retinanet | faster_rcnn | deepmask | sharpmask | fpn_masks
    num_classes: int = 80
    # Backbone (sec. 4: ResNet + FPN). resnet18 | resnet34 | resnet50 | resnet101 | resnext101_32x8d
    backbone: str = "resnet50"
    backbone_width: int = 64  # channels of the stem; 64 is the standard ResNet, smaller for tiny models
    backbone_norm: str = "frozen_bn"  # frozen_bn (pretrained) | bn | gn
    backbone_norm_eps: float = 1e-5  # BatchNorm eps; torchvision's COCO RetinaNet weights need 0.0
    frozen_stages: int = 2  # 0: none, 1: stem, 2: stem + layer1 (paper/Detectron default), ... 5: all
    backbone_weights: Optional[str] = None  # a torchvision ImageNet ResNet state dict file
    # FPN (sec. 4, "Feature Pyramid Network Backbone")
    min_level: int = 3
    max_level: int = 7
    fpn_channels: int = 256
    p6_from: str = "c5"  # c5 (paper) | p5 (torchvision RetinaNet) | pool (FPN Faster R-CNN: P5 subsampled by 2)
    # Anchors (sec. 4, "Anchors"): one base size per level, times octave scales, times ratios (h/w)
    anchor_sizes: list = field(default_factory=lambda: [32.0, 64.0, 128.0, 256.0, 512.0])
    anchor_scales: list = field(default_factory=lambda: [1.0, 2 ** (1 / 3), 2 ** (2 / 3)])
    anchor_ratios: list = field(default_factory=lambda: [0.5, 1.0, 2.0])
    anchor_offset: float = 0.0  # centres at (i + offset) * stride; Detectron (Caffe2) used 0.5 - 1/(2*stride)
    anchor_style: str = "float"  # float | torchvision (int-truncated sizes, rounded corners, ratio-major)
    # Heads (sec. 4, "Classification Subnet", "Box Regression Subnet")
    head_convs: int = 4
    head_channels: int = 256
    head_norm: str = "none"  # none | gn
    head_bias: bool = True  # biases in the subnets' tower convs; torchvision's v2 (GroupNorm heads) has none
    prior_prob: float = 0.01  # pi (sec. 4.1, "Initialization")
    # Box coding: R-CNN (dx, dy, dw, dh) with weights; dw, dh clamped at log(1000/16)
    box_weights: list = field(default_factory=lambda: [1.0, 1.0, 1.0, 1.0])
    box_clamp: float = math.log(1000.0 / 16)
    # Matching (sec. 4, "Anchors"): IoU >= 0.5 foreground, < 0.4 background, between ignored
    fg_iou: float = 0.5
    bg_iou: float = 0.4
    allow_low_quality: bool = True
    crowd_ioa: float = 0.7  # anchors covered this much by a crowd box are ignored
    # Inference (sec. 4, "Inference")
    score_thresh: float = 0.05
    topk_candidates: int = 1000  # per level
    nms_thresh: float = 0.5
    detections_per_image: int = 100
    class_agnostic_nms: bool = False
    # Faster R-CNN's RPN (thesis sec. 4.4; torchvision's fasterrcnn_resnet50_fpn where the thesis is silent)
    rpn_fg_iou: float = 0.7  # positive anchors: IoU > 0.7, or the best anchor of a ground-truth box
    rpn_bg_iou: float = 0.3  # negative anchors: IoU < 0.3
    rpn_batch_per_image: int = 256  # anchors sampled per image for the RPN losses
    rpn_positive_fraction: float = 0.5
    rpn_pre_nms_top_n: list = field(default_factory=lambda: [2000, 1000])  # per level: training, testing
    rpn_post_nms_top_n: list = field(default_factory=lambda: [2000, 1000])  # per image: training, testing
    rpn_nms_thresh: float = 0.7
    # Faster R-CNN's Fast R-CNN head (thesis sec. 4.5)
    roi_min_level: int = 2  # RoIs pooled from P2..P5 by eq. (4.1)
    roi_max_level: int = 5
    roi_pooler: str = "align"  # align (RoIAlign) | pool (RoI pooling, as the thesis)
    roi_output_size: int = 7
    roi_sampling_ratio: int = 2
    roi_aligned: bool = False  # RoIAlign's half-pixel offset (torchvision's v1 weights: false)
    roi_head_dim: int = 1024  # the two hidden fc layers
    roi_fg_iou: float = 0.5  # foreground RoIs: IoU >= 0.5, background below
    roi_bg_iou: float = 0.5
    roi_batch_per_image: int = 512
    roi_positive_fraction: float = 0.25
    roi_box_weights: list = field(default_factory=lambda: [10.0, 10.0, 5.0, 5.0])
    # Segment proposals (arch deepmask | sharpmask | fpn_masks). Defaults: the thesis's DeepMask-ours and
    # SharpMask (sec. 3.4-3.5, released code: facebookresearch/deepmask) and FPN proposals (sec. 4.6).
    segprop_object_ratio: float = 128 / 224  # canonical object size / window size (sec. 3.4: 128 of 224)
    segprop_shift: float = 0.1  # positive: object centre within +-0.1 window (released code: 16 of 160 px)
    segprop_neg_shift: float = 0.3  # negative: every object centre >= 0.3 window away (48 of 160 px) or an octave off
    segprop_top_n: int = 1000  # windows kept (and refined by SharpMask) per image, so AR@1000 is meaningful
    segprop_mask_thresh: float = 0.2  # mask probabilities binarized at 0.2 (sec. 3.5, following DeepMask)
    # DeepMask / SharpMask: ResNet cut after conv4 (stride 16), trained on sampled patches
    segprop_window: int = 160  # W, the input window in px (Table 3.1: W 160); a multiple of 16
    segprop_context: int = 16  # px of image around each training window, each side (sec. 3.5: 32 in all)
    segprop_features: int = 128  # F, the 1x1 reduction (Table 3.1)
    segprop_head_dim: int = 512  # the shared vector of head C (sec. 3.4.2)
    segprop_mask_size: int = 56  # the coarse mask, m x m over the window (DeepMask: 56)
    segprop_scales: list = field(default_factory=lambda: [-2.5, 0.5, 0.5])  # pyramid 2^{min:step:max} as [min, max, step] (released 160 px code)
    segprop_windows_per_image: int = 32  # training windows per image, half centred on objects
    segprop_refine_k: int = 32  # SharpMask's k, schedule (b): k_m^i = k_s^i = k / 2^(i-1) (sec. 3.5.2)
    segprop_refine_after: int = 0  # SharpMask: feedforward training steps before the refinement stage (sec. 3.3.3)
    # FPN mask proposals: an MLP on k x k windows per level (5; 5 and 7 for half octaves), 14 x 14 masks
    segprop_mlp_windows: list = field(default_factory=lambda: [5, 7])
    segprop_mlp_hidden: int = 512
    segprop_fpn_mask_size: int = 14
    # Their labels and losses: "appendix", the FPN paper's appendix A (arXiv 1612.03144): each object assigned to
    # one (level, MLP) by its scale, sampled examples, a weighted mask loss; or "deepmask", DeepMask's window rules
    # on every window (segprop_object_ratio, _shift, _neg_shift), what fpn_masks did before the appendix was found.
    # A config stored before this key existed (a checkpoint's, an ONNX file's, a saved config.yaml) means
    # "deepmask" (`config_from_dict`). docs/segment_proposals.md has both.
    segprop_fpn_labels: str = "appendix"
    # appendix rules only:
    segprop_fpn_object_cells: float = 8.0  # the 5 x 5 MLP's canonical object, in its level's strides (32 px at P2);
    #                                        MLP j of n (in segprop_mlp_windows order) expects 2^(j/n) times that
    segprop_fpn_padding: float = 0.25  # the mask covers (1 + padding) x the canonical object (40 px at P2)
    segprop_fpn_radius: float = 1.0  # positive: the object's centre within +-radius strides of the location's
    segprop_fpn_batch_per_image: int = 128  # locations sampled per image for the losses (2048 from 16 images)
    segprop_fpn_positive_fraction: float = 0.25  # positives : negatives 1 : 3, negatives fill in for missing ones
    segprop_fpn_mask_weight: float = 10.0  # the mask loss's weight (the score loss's is 1)
    # Pre-processing (sec. 4.1: shorter side 800 px; Detectron caps the longer side at 1333)
    min_size: int = 800
    max_size: int = 1333
    resize_rounding: str = "round"  # round | floor (torchvision)
    size_divisibility: int = 32
    pixel_mean: list = field(default_factory=lambda: [0.485, 0.456, 0.406])
    pixel_std: list = field(default_factory=lambda: [0.229, 0.224, 0.225])


@dataclass
class LossConfig:
    """The training objective: which classification and box losses, and their parameters.

    Papers: FL = Focal Loss for Dense Object Detection; IoU-b = IoU-balanced Loss Functions for
    Single-stage Object Detection. The README's "Losses" table lists every choice with its equation.
    """

    # Classification loss, over all non-ignored anchors, / number of foreground anchors:
    #   focal          FL (eq. 5): alpha, gamma
    #   ce             alpha-balanced cross entropy (eq. 3; alpha < 0: plain CE): alpha
    #   fl_star        FL* (eqs. 6-8): gamma, beta
    #   softmax_focal  softmax FL over K classes + background (footnote 1): alpha, gamma; the
    #                  classifier then has K + 1 outputs per anchor
    #   ohem           cross entropy on each image's hard examples only (sec. 5.1): ohem_*
    cls: str = "focal"
    alpha: float = 0.25  # alpha-balance (FL eqs. 3, 5); < 0 disables it; FL Table 1b: 0.25 with gamma 2
    gamma: float = 2.0  # focusing parameter (FL eqs. 4-5) and FL*'s steepness (eq. 7)
    beta: float = 1.0  # FL*'s shift (FL eq. 7); Table 2: (gamma, beta) = (2, 1) or (4, 0)
    # OHEM (FL sec. 5.1, Table 1d: best batch 128, NMS 0.5)
    ohem_batch: int = 128  # B, anchors kept per image
    ohem_nms: float = 0.5  # NMS IoU threshold over the candidates' predicted boxes, ranked by loss
    ohem_ratio: int = 0  # 0: plain OHEM; r > 0: OHEM 1:r, negatives capped at r x positives (paper: 3)
    ohem_candidates: int = 10000  # highest-loss anchors per image that go into NMS
    # Box loss, over foreground anchors, / number of foreground anchors:
    #   smooth_l1  on the (dx, dy, dw, dh) deltas (Fast R-CNN); smooth_l1_beta 0 is L1
    #   giou       1 - GIoU of the decoded box with its ground-truth box
    box: str = "smooth_l1"
    smooth_l1_beta: float = 0.11  # Detectron's RetinaNet value (also IoU-b's best); 0 is L1
    box_weight: float = 1.0
    # IoU-balanced classification (IoU-b eqs. 1-2): each positive's ground-truth-class term weighted
    # by iou^eta (iou of its regressed box), renormalized so the positives' sum is unchanged
    iou_balanced_cls: bool = False
    eta: float = 1.5  # IoU-b Table 4: best 1.5
    # IoU-balanced localization (IoU-b eqs. 3-4): box loss of each positive weighted by w_loc * iou^lambda
    iou_balanced_loc: bool = False
    loc_lambda: float = 1.5  # lambda; IoU-b Table 4: best 1.5 (with w_loc 3.049 on COCO)
    # "auto": measured at the first step so that the box loss sum is unchanged (how IoU-b set it by
    # hand), then fixed and stored in the model (checkpointed); or a number, e.g. 3.049
    w_loc: str = "auto"
    loc_normalize: bool = False  # eq. (5): renormalize every step instead of w_loc
    sync_normalizer: bool = True  # under DDP, average the positive-anchor count over processes

    CLS_LOSSES = ("focal", "ce", "fl_star", "softmax_focal", "ohem")
    BOX_LOSSES = ("smooth_l1", "giou")

    def __post_init__(self):
        self.validate()

    def w_loc_value(self) -> Optional[float]:
        """w_loc as a number, or None for "auto"."""
        if str(self.w_loc).strip().lower() == "auto":
            return None
        try:
            value = float(self.w_loc)
        except ValueError:
            raise ConfigError(f"config key 'loss.w_loc' must be 'auto' or a number, got {self.w_loc!r}") from None
        if not value > 0:
            raise ConfigError(f"config key 'loss.w_loc' must be positive, got {self.w_loc!r}")
        return value

    def validate(self) -> None:
        """Reject unknown loss names and out-of-range parameters (called on load and by build_model)."""
        for key, choices in (("cls", self.CLS_LOSSES), ("box", self.BOX_LOSSES)):
            value = getattr(self, key)
            if value not in choices:
                raise ConfigError(f"config key 'loss.{key}': unknown loss '{value}'{_closest(str(value), choices)}; "
                                  f"choose one of {', '.join(choices)}")
        checks = [
            ("alpha", self.alpha <= 1, "at most 1 (negative disables it)"),
            ("gamma", self.gamma >= 0, "at least 0"),
            ("ohem_batch", self.ohem_batch >= 1, "at least 1"),
            ("ohem_nms", 0 < self.ohem_nms <= 1, "in (0, 1]"),
            ("ohem_ratio", self.ohem_ratio >= 0, "at least 0"),
            ("ohem_candidates", self.ohem_candidates >= 1, "at least 1"),
            ("smooth_l1_beta", self.smooth_l1_beta >= 0, "at least 0"),
            ("eta", self.eta >= 0, "at least 0"),
            ("loc_lambda", self.loc_lambda >= 0, "at least 0"),
        ]
        if self.cls == "fl_star":
            checks.append(("gamma", self.gamma > 0, "above 0 for fl_star (FL* divides by gamma)"))
        for key, ok, rule in checks:
            if not ok:
                raise ConfigError(f"config key 'loss.{key}' must be {rule}, got {getattr(self, key)!r}")
        if self.iou_balanced_cls and self.cls == "ohem":
            raise ConfigError("loss.iou_balanced_cls does not apply to loss.cls=ohem (OHEM trains with plain "
                              "cross entropy on the examples it picks)")
        self.w_loc_value()


@dataclass
class DataConfig:
    """Training and validation data: COCO-format files, training resize and flip, batching and loading."""

    train_json: Optional[str] = None  # COCO instances JSON
    train_images: Optional[str] = None  # folder that the JSON's file_name entries are relative to
    val_json: Optional[str] = None
    val_images: Optional[str] = None
    # Training resize: the shorter side per image (the paper trains and tests at one scale, 400-800 px,
    # Table 1e; its best model adds scale jitter, Table 3).
    # Empty: the model's min_size, so training and test images have the same scale.
    train_sizes: list = field(default_factory=list)
    train_size_sampling: str = "choice"  # choice: any of train_sizes | range: an int in [train_sizes[0], train_sizes[1]]
    train_max_size: Optional[int] = None  # the longer side at most; None: the model's max_size
    # Large-scale jitter instead of the shorter-side resize (retinanet/data/transforms.py ScaleJitterCrop; Ghiasi
    # et al. 2021, detectron2's LSJ): [min, max] factors of a crop_size x crop_size square to resize into, then a
    # random crop_size square crop (zero-mean padding). Empty: off. The LSJ papers use [0.1, 2.0] at 1024.
    scale_jitter: list = field(default_factory=list)
    crop_size: Optional[int] = None  # the square crop's side in pixels; needed by scale_jitter, used only by it
    flip_prob: float = 0.5  # horizontal flip, the paper's only augmentation (sec. 4.1)
    batch_size: int = 16  # images per iteration, all processes together (sec. 4.1: 16)
    num_workers: int = 2  # DataLoader worker processes per training process; 0 loads in the main process
    aspect_grouping: bool = True  # batch landscape (w >= h) and portrait images apart: less padding
    strict: bool = False  # boxes with width or height <= 0 are errors, not dropped with a warning
    # Before training: exists | header (size, EXIF orientation) | decode (every pixel, over every core; finds
    # truncated files; each file's result is cached beside the JSON, so only new or changed files cost time).
    check_images: str = "decode"
    skip_unreadable: bool = False  # false: an unreadable image stops training at start-up; true: left out, listed
    # Instance masks in the targets ("masks": (G, H, W) uint8, retinanet/ops/masks.py); off: no segmentation is read
    masks: bool = False


@dataclass
class TrainConfig:
    """The optimizer, learning-rate schedule, precision, checkpoints and logging of `retinanet train`.

    Defaults are the Focal Loss paper's schedule (sec. 4.1): SGD, 90k iterations at 16 images per
    iteration, LR 0.01 divided by 10 at 60k and 80k, weight decay 1e-4, momentum 0.9; and Detectron's
    linear warmup (500 iterations from 1/3 of the LR).
    """

    iterations: int = 90000
    optimizer: str = "sgd"  # sgd (the paper) | adamw (decoupled weight decay; faster from scratch on small data)
    # Learning rate. None: base_lr * data.batch_size / 16 (the linear scaling rule, Goyal et al. 2017);
    # a number here is used as given, whatever the batch size.
    lr: Optional[float] = None
    base_lr: float = 0.01  # at 16 images per iteration (sec. 4.1)
    momentum: float = 0.9  # sgd only; adamw keeps its default betas (0.9, 0.999)
    weight_decay: float = 1e-4  # sgd: L2 penalty; adamw: decay per step is lr * weight_decay (use ~0.05)
    decay_norm_bias: bool = True  # weight decay on norm weights and biases too (the paper); false skips them
    warmup_iters: int = 500  # linear warmup from warmup_factor * lr to lr (Detectron)
    warmup_factor: float = 1.0 / 3
    lr_steps: list = field(default_factory=lambda: [60000, 80000])  # iterations where the LR is multiplied by lr_gamma
    lr_gamma: float = 0.1
    clip_grad_norm: float = 0.0  # max global gradient norm; 0 disables clipping
    # Exponential moving average of the weights and BatchNorm statistics (retinanet/ema.py), with YOLOX's
    # ramp d_t = ema * (1 - exp(-t / ema_ramp)) at step t; evaluation, best.pt and final.pt use the average.
    ema: float = 0.0  # 0 disables it; YOLOX uses 0.9998
    ema_ramp: float = 2000.0  # YOLOX's 2000; a run much shorter than the ramp averages little
    accumulate: int = 1  # micro-batches per optimizer step; data.batch_size counts the images of all of them
    amp: str = "none"  # none | bf16 (autocast, CPU or GPU) | fp16 (autocast and a gradient scaler, GPU only)
    channels_last: bool = False  # NHWC memory layout (faster convolutions with oneDNN on CPU and tensor cores on GPU)
    # Each frozen_bn layer applied inside its conv, conv(x, W * scale) + shift, recomputed every step from the
    # unchanged weights (retinanet/optimize.py fold_frozen_bn_for_training): a pass over every backbone
    # activation less, forward and backward; the same losses and gradients up to float rounding (BENCHMARKS.md)
    fold_frozen_bn: bool = True
    sync_bn: bool = False  # under DDP on GPUs, BatchNorm statistics over all processes (model.backbone_norm bn)
    device: str = "auto"  # auto (cuda if available, else cpu) | cpu | cuda | cuda:N
    seed: int = 0
    deterministic: bool = False  # deterministic kernels (slower); exact resume on CPU holds either way
    threads: int = 0  # CPU threads for torch; 0 keeps torch's default
    checkpoint_every: int = 5000  # iterations between checkpoints (and one at the end)
    keep_checkpoints: int = 2  # newest periodic checkpoints kept, so a broken last one has a good predecessor
    eval_every: int = 0  # iterations between COCO evaluations on the validation set; 0: only at the end
    log_every: int = 20  # iterations between lines in metrics.jsonl


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    ARCHS = ("retinanet", "faster_rcnn", "deepmask", "sharpmask", "fpn_masks")
    PROPOSAL_ARCHS = ("deepmask", "sharpmask", "fpn_masks")  # class-agnostic segment proposals, one class
    # segprop_* keys that only some proposal models use
    _SEGPROP_ONLY = {"deepmask": ("window", "context", "features", "head_dim", "mask_size", "scales",
                                  "windows_per_image"),
                     "sharpmask": ("refine_k", "refine_after"),
                     "fpn_masks": ("mlp_windows", "mlp_hidden", "fpn_mask_size", "fpn_labels", "fpn_object_cells",
                                   "fpn_padding", "fpn_radius", "fpn_batch_per_image", "fpn_positive_fraction",
                                   "fpn_mask_weight")}
    FPN_LABELS = ("appendix", "deepmask")
    # fpn_masks keys that only one of its labelling rules reads (segprop_fpn_labels)
    _FPN_LABELS_ONLY = {"appendix": ("fpn_object_cells", "fpn_padding", "fpn_radius", "fpn_batch_per_image",
                                     "fpn_positive_fraction", "fpn_mask_weight"),
                        "deepmask": ("object_ratio", "shift", "neg_shift")}

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Reject an unknown arch and loss options that do not apply to it (on load and in build_model)."""
        self._validate_scale_jitter()
        arch = self.model.arch
        if arch not in self.ARCHS:
            raise ConfigError(f"config key 'model.arch': unknown detector '{arch}'{_closest(str(arch), self.ARCHS)}; "
                              f"choose one of {', '.join(self.ARCHS)}")
        self._validate_segprop()
        if arch == "faster_rcnn":
            default = LossConfig()
            why = {"cls": "Fast R-CNN trains its classifier with softmax cross entropy over K + 1 classes and the "
                          "RPN with binary cross entropy on sampled anchors (thesis sec. 4.4-4.5)",
                   "iou_balanced_cls": "it reweights a dense detector's positive anchors",
                   "iou_balanced_loc": "it is defined for a dense detector's positive anchors (IoU-b sec. 3.2)"}
            for key, reason in why.items():
                if getattr(self.loss, key) != getattr(default, key):
                    raise ConfigError(f"config key 'loss.{key}' does not apply to model.arch=faster_rcnn: {reason}")
            for key in ("rpn_pre_nms_top_n", "rpn_post_nms_top_n"):
                value = getattr(self.model, key)
                if len(value) != 2 or min(value) < 1:
                    raise ConfigError(f"config key 'model.{key}' must be [training, testing], both >= 1, got {value}")
            if self.model.roi_pooler not in ("align", "pool"):
                raise ConfigError(f"config key 'model.roi_pooler' must be 'align' or 'pool', got "
                                  f"'{self.model.roi_pooler}'")


    def _validate_scale_jitter(self) -> None:
        jitter, crop = self.data.scale_jitter, self.data.crop_size
        if not jitter:
            if crop is not None:
                raise ConfigError(f"config key 'data.crop_size' ({crop}) is used only with data.scale_jitter: "
                                  f"set data.scale_jitter=[min, max] too, or leave crop_size out")
            return
        if (len(jitter) != 2 or any(isinstance(x, bool) or not isinstance(x, (int, float)) for x in jitter)
                or not 0 < jitter[0] <= jitter[1]):
            raise ConfigError(f"config key 'data.scale_jitter' must be [min, max] with 0 < min <= max, got {jitter}")
        if crop is None or crop <= 0:
            raise ConfigError(f"config key 'data.scale_jitter' needs data.crop_size, a positive side of the square "
                              f"crop in pixels (e.g. the model's max_size), got {crop}")
        if self.data.train_sizes or self.data.train_max_size is not None:
            raise ConfigError("config keys 'data.train_sizes' / 'data.train_max_size' are the shorter-side resize, "
                              "which data.scale_jitter replaces: set one or the other")

    def _validate_segprop(self) -> None:
        """segprop_* keys only for the proposal models that use them; other models' keys refused for those."""
        arch, m, default = self.model.arch, self.model, ModelConfig()
        users = {"deepmask": ("deepmask",), "sharpmask": ("deepmask", "sharpmask"), "fpn_masks": ("fpn_masks",)}
        own = set()
        for group in users.get(arch, ()):
            own.update(self._SEGPROP_ONLY[group])
        for group, keys in self._SEGPROP_ONLY.items():
            for key in keys:
                if key not in own and getattr(m, f"segprop_{key}") != getattr(default, f"segprop_{key}"):
                    raise ConfigError(f"config key 'model.segprop_{key}' does not apply to model.arch={arch}")
        common = ("object_ratio", "shift", "neg_shift", "top_n", "mask_thresh")
        if arch not in self.PROPOSAL_ARCHS:
            for key in common:
                if getattr(m, f"segprop_{key}") != getattr(default, f"segprop_{key}"):
                    raise ConfigError(f"config key 'model.segprop_{key}' does not apply to model.arch={arch}")
            return
        foreign = [f.name for f in dataclasses.fields(ModelConfig)
                   if f.name.startswith(("rpn_", "roi_", "anchor_", "head_", "box_", "fg_", "bg_", "allow_", "crowd_",
                                         "prior_", "topk_")) and getattr(m, f.name) != getattr(default, f.name)]
        if foreign:
            raise ConfigError(f"config key 'model.{foreign[0]}' does not apply to model.arch={arch} (segment "
                              f"proposals have no anchors or box heads)")
        losses = [f.name for f in dataclasses.fields(LossConfig) if getattr(self.loss, f.name) != getattr(LossConfig(), f.name)]
        if losses:
            raise ConfigError(f"config key 'loss.{losses[0]}' does not apply to model.arch={arch}: segment proposals "
                              f"train with binary cross entropy on objectness and masks (thesis sec. 3.3.3)")
        if arch == "fpn_masks":
            self._validate_fpn_labels()
        checks = [("segprop_object_ratio", 0 < m.segprop_object_ratio <= 1), ("segprop_shift", m.segprop_shift >= 0),
                  ("segprop_neg_shift", m.segprop_neg_shift > m.segprop_shift), ("segprop_top_n", m.segprop_top_n >= 1),
                  ("segprop_mask_thresh", 0 < m.segprop_mask_thresh < 1),
                  ("segprop_window", m.segprop_window > 0 and m.segprop_window % 16 == 0),
                  ("segprop_context", m.segprop_context >= 0 and m.segprop_context % 16 == 0),
                  ("segprop_scales", len(m.segprop_scales) == 3 and m.segprop_scales[0] <= m.segprop_scales[1]
                   and m.segprop_scales[2] > 0),
                  ("segprop_refine_k", arch != "sharpmask" or m.segprop_refine_k >= 8),
                  ("segprop_mlp_windows", len(m.segprop_mlp_windows) >= 1
                   and all(int(k) % 2 == 1 for k in m.segprop_mlp_windows))]
        for key, ok in checks:
            if not ok:
                raise ConfigError(f"config key 'model.{key}' is out of range: {getattr(m, key)!r} (see retinanet/config.py)")

    def _validate_fpn_labels(self) -> None:
        """fpn_masks: the keys of the other labelling rule (segprop_fpn_labels) refused, the appendix's in range."""
        m, default = self.model, ModelConfig()
        rule = m.segprop_fpn_labels
        if rule not in self.FPN_LABELS:
            raise ConfigError(f"config key 'model.segprop_fpn_labels' must be one of {', '.join(self.FPN_LABELS)}, "
                              f"got {rule!r}")
        for other, keys in self._FPN_LABELS_ONLY.items():
            for key in keys:
                if other != rule and getattr(m, f"segprop_{key}") != getattr(default, f"segprop_{key}"):
                    raise ConfigError(f"config key 'model.segprop_{key}' does not apply to model.segprop_fpn_labels="
                                      f"{rule} (only to {other})")
        windows = [int(k) for k in m.segprop_mlp_windows]
        checks = [("segprop_fpn_object_cells", m.segprop_fpn_object_cells > 0),
                  ("segprop_fpn_padding", m.segprop_fpn_padding >= 0),
                  ("segprop_fpn_radius", m.segprop_fpn_radius > 0),
                  ("segprop_fpn_batch_per_image", m.segprop_fpn_batch_per_image >= 1),
                  ("segprop_fpn_positive_fraction", 0 < m.segprop_fpn_positive_fraction <= 1),
                  ("segprop_fpn_mask_weight", m.segprop_fpn_mask_weight >= 0),
                  # MLP j expects 2^(j/n) x the first's objects: larger windows for larger objects
                  ("segprop_mlp_windows", rule != "appendix" or windows == sorted(set(windows)))]
        for key, ok in checks:
            if not ok:
                raise ConfigError(f"config key 'model.{key}' is out of range: {getattr(m, key)!r} (see retinanet/config.py)")


class ConfigError(ValueError):
    pass


# ----------------------------------------------------------------------------------------------
# dict <-> dataclass


def config_to_dict(cfg: Any) -> dict:
    """Plain nested dict of the config (safe for `torch.load(weights_only=True)` and YAML)."""
    return dataclasses.asdict(cfg)


def _field_types(cls) -> dict:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _closest(name: str, options) -> str:
    match = difflib.get_close_matches(name, list(options), n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""


# The segprop_* keys of every config written by config_to_dict / save_config since the segment proposals came (all
# at once), before model.segprop_fpn_labels: a model section naming all of them was written by the package, not by
# hand (a hand-written fpn_masks config has no reason to name DeepMask's window or SharpMask's k).
_SEGPROP_KEYS_BEFORE_FPN_LABELS = frozenset(
    f"segprop_{k}" for k in ("object_ratio", "shift", "neg_shift", "top_n", "mask_thresh", "window", "context",
                             "features", "head_dim", "mask_size", "scales", "windows_per_image", "refine_k",
                             "refine_after", "mlp_windows", "mlp_hidden", "fpn_mask_size"))


def _stored_before_fpn_labels(model: dict) -> dict:
    """A model section stored before segprop_fpn_labels existed keeps its meaning: fpn_masks then used DeepMask's
    labelling rules, so such a section without the key reads as segprop_fpn_labels: deepmask (the default became
    "appendix"). Hand-written (partial) sections get the default."""
    if (model.get("arch") == "fpn_masks" and "segprop_fpn_labels" not in model
            and _SEGPROP_KEYS_BEFORE_FPN_LABELS <= set(model)):
        return {**model, "segprop_fpn_labels": "deepmask"}
    return model


def as_current(stored: dict) -> dict:
    """A stored config (a checkpoint's, a run's result.json) as this version writes it: keys added since
    filled in with what the stored config meant (`config_from_dict`), so that it compares equal to the
    same config built today; as stored if it no longer reads (then a comparison names the difference)."""
    try:
        return config_to_dict(config_from_dict(stored))
    except (ConfigError, TypeError, ValueError):
        return stored


def config_from_dict(data: dict, cls=Config, where: str = "") -> Any:
    """Build a config dataclass from a (possibly partial) nested dict; unknown keys are errors.

    A stored config (a checkpoint's, an ONNX file's, a saved config.yaml: every key written) from before a key
    whose default changed its meaning reads as it did then (`_stored_before_fpn_labels`)."""
    if not isinstance(data, dict):
        raise ConfigError(f"config{(' ' + where) if where else ''}: expected a mapping, got {type(data).__name__}")
    if cls is ModelConfig:  # (a Config's model section comes here too)
        data = _stored_before_fpn_labels(data)
    types = _field_types(cls)
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in types:
            raise ConfigError(f"unknown config key '{path}'{_closest(key, types)}")
        typ = types[key]
        if dataclasses.is_dataclass(typ):
            kwargs[key] = config_from_dict(value, typ, path)
        else:
            kwargs[key] = _coerce(value, typ, path)
    return cls(**kwargs)


def _coerce(value: Any, typ: Any, path: str) -> Any:
    origin = typing.get_origin(typ)
    args = typing.get_args(typ)
    if origin is typing.Union:  # Optional[X]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _coerce(value, [a for a in args if a is not type(None)][0], path)
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ConfigError(f"config key '{path}' must be true or false, got {value!r}")
    if typ is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            if isinstance(value, str):
                try:
                    return int(value)
                except ValueError:
                    pass
            raise ConfigError(f"config key '{path}' must be an integer, got {value!r}")
        return int(value)
    if typ is float:
        if isinstance(value, bool):
            raise ConfigError(f"config key '{path}' must be a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"config key '{path}' must be a number, got {value!r}") from None
    if typ is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"config key '{path}' must be a string, got {value!r}")
        return str(value)
    if typ is list or origin is list:
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"config key '{path}' must be a list, got {value!r}")
        return value
    return value


# ----------------------------------------------------------------------------------------------
# files and overrides


def load_config(path: Optional[str] = None, overrides: Optional[list] = None) -> Config:
    """Defaults, then a YAML file (partial is fine), then `key=value` overrides, in that order."""
    data: dict = {}
    if path is not None:
        data = read_yaml(path)
    for item in overrides or []:
        apply_override(data, item)
    return config_from_dict(data)


def read_yaml(path: str) -> dict:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: not a YAML text file (a checkpoint or another binary file?)") from None
    except yaml.YAMLError as e:  # one line: where and what (PyYAML's own message spans several)
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = "; ".join(filter(None, [getattr(e, "context", None), getattr(e, "problem", None)])) or str(e)
        raise ConfigError(f"{p}: invalid YAML{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of config sections")
    return data


def _all_leaf_paths(cls=Config, prefix: str = "") -> list:
    out = []
    for name, typ in _field_types(cls).items():
        path = f"{prefix}{name}"
        if dataclasses.is_dataclass(typ):
            out += _all_leaf_paths(typ, path + ".")
        else:
            out.append(path)
    return out


def resolve_key(key: str) -> str:
    """'model.backbone' stays; a bare leaf name ('backbone') resolves if it is unique."""
    paths = _all_leaf_paths()
    if key in paths:
        return key
    leaf_matches = [p for p in paths if p.rsplit(".", 1)[-1] == key]
    if len(leaf_matches) == 1:
        return leaf_matches[0]
    if len(leaf_matches) > 1:
        raise ConfigError(f"config key '{key}' is ambiguous: use one of {', '.join(leaf_matches)}")
    leaves = {p.rsplit(".", 1)[-1]: p for p in paths}
    hint = difflib.get_close_matches(key, paths + list(leaves), n=1, cutoff=0.5)
    suggestion = f" (did you mean '{leaves.get(hint[0], hint[0])}'?)" if hint else ""
    raise ConfigError(f"unknown config key '{key}'{suggestion}")


def apply_override(data: dict, item: str) -> None:
    """Apply one `key=value` (value parsed as YAML: numbers, lists, true/false) to a nested dict."""
    import yaml

    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like key=value")
    key, raw = item.split("=", 1)
    path = resolve_key(key.strip())
    try:
        value = yaml.safe_load(raw) if raw.strip() != "" else ""
    except yaml.YAMLError:
        value = raw
    node = data
    parts = path.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def save_config(cfg: Config, path: str) -> None:
    import yaml

    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
