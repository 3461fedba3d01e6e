"""FPN Faster R-CNN (Lin et al., Feature Pyramid Networks; thesis ch. 4): the two-stage comparator of the
Focal Loss paper's Table 3.

ResNet -> FPN P2-P6 -> RPN (proposals, thesis sec. 4.4) -> Fast R-CNN RoI heads on P2-P5 (sec. 4.5).
Training is approximate joint training: no gradient flows through the proposals.
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from .backbone import FPN, ResNet
from ..ops.poolers import as_rois
from ..ops.transform import default_image_sizes
from .detector import Detector, ImageBatch, check_targets
from .roi_heads import RoIHeads
from .rpn import RegionProposalNetwork


class FasterRCNN(Detector):
    """FPN Faster R-CNN; the contract is `Detector`'s (retinanet/modeling/detector.py).

    Train mode: `model(images, targets)` -> {"rpn_cls", "rpn_box", "roi_cls", "roi_box"}.
    Eval mode: `model(images)` -> per image {"boxes", "scores", "labels"} in original pixels.

    `network(images, image_sizes)` returns (class_logits (R, K + 1) with background at index 0,
    box_regression (R, 4 (K + 1)), proposals (R, 4) xyxy in the padded batch's pixels, proposal_image
    (R,) int64: the image of each proposal), R = all images' proposals together.
    """

    network_inputs = ("images", "image_sizes")
    output_names = ("class_logits", "box_regression", "proposals", "proposal_image")

    def __init__(self, backbone: ResNet, fpn: FPN, rpn: RegionProposalNetwork, roi_heads: RoIHeads, *,
                 num_classes: int, score_thresh: float = 0.05, nms_thresh: float = 0.5,
                 detections_per_image: int = 100, class_agnostic_nms: bool = False,
                 min_size: int = 800, max_size: int = 1333, resize_rounding: str = "round", size_divisibility: int = 32,
                 pixel_mean=(0.485, 0.456, 0.406), pixel_std=(0.229, 0.224, 0.225)):
        super().__init__(min_size=min_size, max_size=max_size, resize_rounding=resize_rounding,
                         size_divisibility=size_divisibility, pixel_mean=pixel_mean, pixel_std=pixel_std)
        if class_agnostic_nms:
            raise ValueError("class_agnostic_nms is not supported by faster_rcnn (its NMS is per class, [TV])")
        self.backbone, self.fpn, self.rpn, self.roi_heads = backbone, fpn, rpn, roi_heads
        self.num_classes = num_classes
        self.score_thresh, self.nms_thresh = score_thresh, nms_thresh
        self.detections_per_image, self.class_agnostic_nms = detections_per_image, class_agnostic_nms

    def _roi_features(self, features: list) -> list:
        """The pyramid levels the RoI heads pool from (P2..P5 of P2..P6), finest first."""
        first = self.roi_heads.min_level - self.fpn.min_level
        return features[first:first + self.roi_heads.max_level - self.roi_heads.min_level + 1]

    # ------------------------------------------------------------------ the Detector contract
    def network(self, images: Tensor, image_sizes: Optional[Tensor] = None) -> tuple:
        """images (B, 3, H, W), image_sizes (B, 2) int (h, w) of each resized image (default: the padded size)."""
        image_sizes = default_image_sizes(images, image_sizes)
        features = self.fpn(self.backbone(images))
        proposals, image, _ = self.rpn(features, images.shape[-2:], image_sizes)
        class_logits, box_regression = self.roi_heads.predict(self._roi_features(features), as_rois(proposals, image))
        return class_logits, box_regression, proposals, image

    def postprocess_outputs(self, outputs: tuple, image_sizes: list, *, score_thresh: float, nms_thresh: float,
                            max_detections: int, class_agnostic: bool, keep_classes: Optional[Tensor]) -> list:
        if class_agnostic:
            raise ValueError("class-agnostic NMS is not supported by faster_rcnn")
        class_logits, box_regression, proposals, proposal_image = outputs
        return self.roi_heads.postprocess(class_logits, box_regression, proposals, proposal_image, image_sizes,
                                          score_thresh=score_thresh, nms_thresh=nms_thresh,
                                          detections_per_image=max_detections, keep_classes=keep_classes)

    def check_targets(self, targets: list) -> None:
        """`Detector.check_targets`, and labels in 0..K-1 (on the host: the engine calls it before the
        batch moves to the device; `RoIHeads.sample` checks the labels again)."""
        check_targets(targets, num_classes=self.num_classes)

    def losses(self, batch: ImageBatch, targets: list) -> dict:
        features = self.fpn(self.backbone(batch.tensor))
        proposals, image, rpn_losses = self.rpn(features, batch.tensor.shape[-2:], batch.image_sizes, targets)
        roi_losses = self.roi_heads.forward_train(self._roi_features(features), proposals, image, targets)
        return {**rpn_losses, **roi_losses}

