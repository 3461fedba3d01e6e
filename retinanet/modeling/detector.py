"""The contract every detector keeps, and the one inference path every caller takes.

A detector is an `nn.Module` with three steps that callers may run together or apart:

    batch = model.preprocess(images)          # ImageBatch: resized, normalized, padded (B, 3, H, W)
    outputs = model.run_network(batch)        # model.network(batch.tensor[, batch.sizes_tensor()]): a
                                              # tuple of tensors, everything with weights (what ONNX exports)
    detections = model.postprocess(outputs, batch, score_thresh=..., keep_classes=...)

- `model(images)` in eval mode is exactly those three steps with the model's own settings, and
  returns per image {"boxes" (D, 4) xyxy in the original image's pixels, "scores" (D,), "labels"
  (D,) in 0..K-1} (and "masks" for detectors that predict them), best first.
- `model(images, targets)` in train mode returns a dict of named scalar losses; the engine sums them.
  Training images are already at the size to train on (the data pipeline resizes and jitters), so
  `preprocess(images, resize=False)` only normalizes and pads them. Targets held on the CPU are
  checked first (`check_targets`: errors name the image); targets already on an accelerator are
  not, since reading them would make the step wait for the device: the engine checks each batch
  on the CPU before it moves it.

`Predictor`, `OnnxDetector`, `retinanet eval/predict/export/analyze` and the engine use these
methods and nothing else, so none of them re-implements a detector's pre- or post-processing.
`postprocess` needs no weights: `OnnxDetector` builds the model on the meta device and replaces
`network` with the ONNX graph.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.boxes import scale_boxes
from ..ops.matcher import check_labels
from ..ops.transform import resized_size
from ..syncs import to_device


@dataclass
class ImageBatch:
    """A padded batch and the sizes needed to map detections back.

    tensor (B, 3, H, W) float32, normalized, zero-padded to multiples of `size_divisibility`;
    image_sizes: [(h, w)] of each image after resizing (its region of the batch, top-left);
    original_sizes: [(h, w)] of each image as given.
    """

    tensor: Tensor
    image_sizes: list
    original_sizes: list

    def sizes_tensor(self) -> Tensor:
        """image_sizes as a (B, 2) int64 tensor on the batch's device (a network input)."""
        return torch.tensor(self.image_sizes, dtype=torch.int64, device=self.tensor.device).reshape(-1, 2)


class Detector(nn.Module):
    """Base class of every detector: the shared pre-processing and the contract (see the module docstring).

    Subclasses set `num_classes`, the inference settings (`score_thresh`, `nms_thresh`,
    `detections_per_image`, `class_agnostic_nms`) and implement `network`, `postprocess_outputs`
    and `losses`.
    """

    network_inputs: tuple = ("images",)  # what `network` takes (ONNX inputs): images, and image_sizes if named
    output_names: tuple = ()  # names of `network`'s outputs (ONNX)
    onnx_unsupported: Optional[str] = None  # why `network` cannot be exported to ONNX, if it cannot

    def __init__(self, *, min_size: int, max_size: int, resize_rounding: str = "round", size_divisibility: int = 32,
                 pixel_mean=(0.485, 0.456, 0.406), pixel_std=(0.229, 0.224, 0.225)):
        super().__init__()
        self.min_size, self.max_size, self.resize_rounding = min_size, max_size, resize_rounding
        self.size_divisibility = size_divisibility
        self.pixel_mean = tuple(float(v) for v in pixel_mean)
        self.pixel_std = tuple(float(v) for v in pixel_std)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # ------------------------------------------------------------------ the contract
    def preprocess(self, images, resize: bool = True, device=None, min_size: Optional[int] = None,
                   max_size: Optional[int] = None) -> ImageBatch:
        """images: list of (3, H, W) RGB tensors, float in [0, 1] or uint8 (0..255), any sizes ->
        ImageBatch. With `resize`, shorter side `min_size` and longer at most `max_size` (the model's,
        unless given: test-time augmentation resizes to other scales). `device`: where the batch is
        made (default: the images'); uint8 images travel there before conversion."""
        min_size = self.min_size if min_size is None else min_size
        max_size = self.max_size if max_size is None else max_size
        if isinstance(images, Tensor) and images.dim() == 3:
            raise ValueError("images must be a list of (3, H, W) tensors or a (B, 3, H, W) tensor")
        if len(images) == 0:
            raise ValueError("no images")
        normed, sizes, original = [], [], []
        stats = {}  # device -> (mean, std), each (3, 1, 1) float32, made once per call
        for i, img in enumerate(images):
            if img.dim() != 3 or img.shape[0] != 3:
                raise ValueError(f"image {i}: expected a (3, H, W) RGB tensor, got shape {tuple(img.shape)}")
            img = to_device(img, device) if device is not None else img
            original.append((img.shape[1], img.shape[2]))
            if img.dtype == torch.uint8:
                img = img.to(torch.float32) / 255.0
            if img.device not in stats:
                stats[img.device] = tuple(_channel_values(v, img.device) for v in (self.pixel_mean, self.pixel_std))
            mean, std = stats[img.device]
            img = (img.to(torch.float32) - mean) / std
            if resize:
                size = resized_size(img.shape[1], img.shape[2], min_size, max_size, self.resize_rounding)
                if size != tuple(img.shape[1:]):
                    img = F.interpolate(img[None], size=size, mode="bilinear", align_corners=False)[0]
            normed.append(img)
            sizes.append((img.shape[1], img.shape[2]))
        d = self.size_divisibility
        h = int(math.ceil(max(s[0] for s in sizes) / d) * d)
        w = int(math.ceil(max(s[1] for s in sizes) / d) * d)
        batch = normed[0].new_zeros(len(normed), 3, h, w)  # (B, 3, H, W)
        for img, t in zip(normed, batch):
            t[:, : img.shape[1], : img.shape[2]].copy_(img)
        return ImageBatch(batch, sizes, original)

    def network(self, images: Tensor, image_sizes: Optional[Tensor] = None) -> tuple:
        """images (B, 3, H, W) normalized and padded; image_sizes (B, 2) int64, each image's (h, w) in it
        (used by detectors that list "image_sizes" in `network_inputs`) -> the outputs (a tuple of tensors)."""
        raise NotImplementedError

    def run_network(self, batch: ImageBatch) -> tuple:
        """`network` on a preprocessed batch, with the inputs it takes."""
        if "image_sizes" in self.network_inputs:
            return self.network(batch.tensor, batch.sizes_tensor())
        return self.network(batch.tensor)

    def postprocess(self, outputs: tuple, batch: ImageBatch, *, score_thresh: Optional[float] = None,
                    nms_thresh: Optional[float] = None, max_detections: Optional[int] = None,
                    class_agnostic: Optional[bool] = None, keep_classes: Optional[Tensor] = None) -> list:
        """The network's outputs -> per image {"boxes", "scores", "labels"} in the original image's pixels.

        Settings left None are the model's. keep_classes: (K,) bool, the classes to detect; the
        others are removed before the score threshold, top-k and NMS, as if the model had no such
        outputs (a softmax classifier still normalizes over all of its outputs).
        """
        settings = dict(score_thresh=self.score_thresh if score_thresh is None else float(score_thresh),
                        nms_thresh=self.nms_thresh if nms_thresh is None else float(nms_thresh),
                        max_detections=self.detections_per_image if max_detections is None else int(max_detections),
                        class_agnostic=self.class_agnostic_nms if class_agnostic is None else bool(class_agnostic))
        if keep_classes is not None:
            keep_classes = torch.as_tensor(keep_classes, dtype=torch.bool)
            if keep_classes.shape != (self.num_classes,):
                raise ValueError(f"keep_classes must have shape ({self.num_classes},), got {tuple(keep_classes.shape)}")
            if bool(keep_classes.all()):
                keep_classes = None
        detections = self.postprocess_outputs(outputs, batch.image_sizes, keep_classes=keep_classes, **settings)
        return rescale_to_original(detections, batch)

    def postprocess_outputs(self, outputs: tuple, image_sizes: list, *, score_thresh: float, nms_thresh: float,
                            max_detections: int, class_agnostic: bool, keep_classes: Optional[Tensor]) -> list:
        """Detections in the resized images' pixels (see `postprocess`)."""
        raise NotImplementedError

    def losses(self, batch: ImageBatch, targets: list) -> dict:
        """A batch at the size to train on (normalized, padded) and its targets per image -> {name: scalar loss}."""
        raise NotImplementedError

    def check_targets(self, targets: list) -> None:
        """Raise a ValueError naming the image if a target is malformed (`check_targets`)."""
        check_targets(targets)

    def forward(self, images, targets: Optional[list] = None):
        if self.training:
            if targets is None:
                raise ValueError("in train mode the model needs targets (use model.eval() for inference)")
            if all(t["boxes"].device.type == "cpu" for t in targets):  # free on the CPU (see the module docstring)
                self.check_targets(targets)
            return self.losses(self.preprocess(images, resize=False, device=self.device), targets)
        batch = self.preprocess(images, device=self.device)
        return self.postprocess(self.run_network(batch), batch)


def _channel_values(values: Sequence[float], device: torch.device) -> Tensor:
    """(3,) floats -> (3, 1, 1) float32 on `device`, copied there without waiting for the device."""
    return to_device(torch.tensor(values, dtype=torch.float32).reshape(3, 1, 1), device)


def check_targets(targets: list, num_classes: Optional[int] = None) -> None:
    """Raise a ValueError naming the image (its index, and its "image_id" when the target has one) if
    a target is malformed: "boxes" not (G, 4), not finite, or with x2 < x1 or y2 < y1; "labels" (when
    present) not G of them, or (with `num_classes`) outside 0..num_classes-1; "iscrowd" not G flags.

    The values are read on the host (tensors elsewhere are copied there first, which waits for the
    device): the engine calls this on the CPU, before a batch moves to the GPU.
    """
    for i, t in enumerate(targets):
        where = f"image {i}" + (f" (image id {t['image_id']})" if "image_id" in t else "")
        boxes = t["boxes"]
        if boxes.dim() != 2 or boxes.shape[-1] != 4:
            if boxes.numel():  # an empty tensor of any shape is "no boxes"
                raise ValueError(f"{where}: boxes must be (G, 4) xyxy, got shape {tuple(boxes.shape)}")
        boxes = boxes.detach().cpu().reshape(-1, 4).numpy()
        g = boxes.shape[0]
        if not np.isfinite(boxes).all():
            raise ValueError(f"{where}: boxes must be finite, got {boxes[~np.isfinite(boxes).all(axis=1)].tolist()}")
        bad = (boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])
        if bad.any():
            raise ValueError(f"{where}: boxes must be xyxy with x2 >= x1 and y2 >= y1, got {boxes[bad].tolist()}")
        for key in ("labels", "iscrowd"):
            if key in t and t[key].numel() != g:
                raise ValueError(f"{where}: {g} boxes but {t[key].numel()} {key}")
        if num_classes is not None and "labels" in t:
            check_labels(t["labels"].detach().cpu().reshape(-1), num_classes, where)


def rescale_to_original(detections: list, batch: ImageBatch) -> list:
    """Scale each image's boxes from its resized size to its original size (in place; returns the list)."""
    for det, (h, w), (oh, ow) in zip(detections, batch.image_sizes, batch.original_sizes):
        if (h, w) != (oh, ow):
            det["boxes"] = scale_boxes(det["boxes"], ow / w, oh / h)
    return detections


def keep_classes_mask(num_classes: int, labels: Sequence[int]) -> Tensor:
    """(K,) bool, True for the given labels."""
    keep = torch.zeros(num_classes, dtype=torch.bool)
    keep[list(labels)] = True
    return keep
