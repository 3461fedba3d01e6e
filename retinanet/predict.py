"""Inference on image files, Pillow images and arrays: `Predictor`, and the detections it returns.

    >>> from retinanet import Predictor
    >>> predictor = Predictor.from_checkpoint("model.pt", score_threshold=0.3)
    >>> det = predictor("street.jpg")           # or a PIL image, or an (H, W, 3) uint8 RGB array
    >>> det.boxes, det.scores, det.names        # xyxy in the image's own pixels, best first

The pipeline is the model's: RGB uint8 -> [0, 1] -> normalize -> resize (shorter side `min_size`,
longer at most `max_size`) -> pad to a multiple of `size_divisibility` -> backbone, FPN, heads ->
score threshold, top-k per level, decode, NMS, cap (retinanet/ops/postprocess.py) -> boxes scaled back
to the original image. `DetectorBase` holds everything but the network, so the ONNX runtime
detector (retinanet/export.py) runs the same pre- and post-processing around its graph.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .config import ModelConfig
from .ops.transform import resized_size
from .ops.postprocess import postprocess


@dataclass
class Detections:
    """The detections of one image, best first.

    boxes (D, 4) float32 xyxy in the pixels of the image as given (EXIF orientation applied for files),
    scores (D,) float32, labels (D,) int64 model labels 0..K-1, category_ids (D,) int64 (the dataset's
    ids, categories[label]["id"]), names: D class names. image_size: (height, width).
    masks: None (a box detector), or (D, height, width) bool, each detection's mask in the same pixels.
    """

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    category_ids: np.ndarray
    names: list
    image_size: tuple
    source: str = ""
    masks: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return len(self.scores)

    def to_coco(self, image_id: int, file_name: Optional[str] = None) -> list:
        """COCO results entries: {image_id, category_id, bbox [x, y, w, h], score} (+ file_name); with masks
        also "segmentation", the mask as compressed RLE ({"size": [h, w], "counts": str}), for --iou-type segm."""
        from .ops.masks import encode_masks

        rles = encode_masks(self.masks) if self.masks is not None else [None] * len(self)
        out = []
        for (x0, y0, x1, y1), score, cat, rle in zip(self.boxes.tolist(), self.scores.tolist(),
                                                      self.category_ids.tolist(), rles):
            entry = {"image_id": image_id, "category_id": int(cat),
                     "bbox": [round(x0, 3), round(y0, 3), round(x1 - x0, 3), round(y1 - y0, 3)], "score": score}
            if rle is not None:
                entry["segmentation"] = rle
            if file_name is not None:
                entry["file_name"] = file_name
            out.append(entry)
        return out


def to_rgb_uint8(item, where: str = "image") -> np.ndarray:
    """A path, a Pillow image or an (H, W, 3) uint8 RGB array -> (H, W, 3) uint8 RGB array.

    Files and Pillow images go through the data layer's rules (EXIF orientation, modes); an array is
    taken as it is. Errors name `where`.
    """
    from PIL import Image, ImageOps

    if isinstance(item, np.ndarray):
        if item.ndim != 3 or item.shape[2] != 3 or item.dtype != np.uint8:
            raise ValueError(f"{where}: expected an (H, W, 3) uint8 RGB array, got shape {item.shape} dtype {item.dtype}")
        if item.shape[0] == 0 or item.shape[1] == 0:
            raise ValueError(f"{where}: empty image {item.shape}")
        return item
    if isinstance(item, (str, Path)):
        from .data.images import load_image

        return load_image(item)
    if isinstance(item, Image.Image):
        from .data.images import to_rgb_array

        return to_rgb_array(ImageOps.exif_transpose(item), where)
    raise TypeError(f"{where}: expected a file path, a PIL image or an (H, W, 3) uint8 array, got {type(item).__name__}")


def prepare_batch(images: list, *, pixel_mean, pixel_std, min_size: int, max_size: int, rounding: str,
                  size_divisibility: int) -> tuple:
    """RGB uint8 (H, W, 3) arrays -> (B, 3, H', W') float32 normalized, resized, zero-padded batch, and
    the resized (h, w) of each image. Computes exactly what `RetinaNet.preprocess(resize=True)` does
    with the images as (3, H, W) floats in [0, 1]."""
    mean = torch.tensor(pixel_mean, dtype=torch.float32).reshape(3, 1, 1)
    std = torch.tensor(pixel_std, dtype=torch.float32).reshape(3, 1, 1)
    normed, sizes = [], []
    for array in images:
        img = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1).to(torch.float32) / 255.0  # (3, H, W)
        img = (img - mean) / std
        size = resized_size(img.shape[1], img.shape[2], min_size, max_size, rounding)
        if size != tuple(img.shape[1:]):
            img = F.interpolate(img[None], size=size, mode="bilinear", align_corners=False)[0]
        normed.append(img)
        sizes.append(size)
    h = int(math.ceil(max(s[0] for s in sizes) / size_divisibility) * size_divisibility)
    w = int(math.ceil(max(s[1] for s in sizes) / size_divisibility) * size_divisibility)
    batch = torch.zeros(len(normed), 3, h, w)  # (B, 3, H', W')
    for img, t in zip(normed, batch):
        t[:, : img.shape[1], : img.shape[2]].copy_(img)
    return batch, sizes


def resolve_classes(classes, categories: list) -> list:
    """Names (case-insensitive; every category of that name) or category ids -> sorted model labels.

    Errors list what exists (with a close match)."""
    by_name = {}
    for i, c in enumerate(categories):
        by_name.setdefault(c["name"].lower(), []).append(i)
    by_id = {int(c["id"]): i for i, c in enumerate(categories)}
    labels = set()
    for item in classes:
        text = str(item).strip()
        if text.lower() in by_name:
            labels.update(by_name[text.lower()])
        elif text.lstrip("-").isdigit() and int(text) in by_id:
            labels.add(by_id[int(text)])
        else:
            names = [c["name"] for c in categories if not c.get("placeholder")]
            hint = difflib.get_close_matches(text, names, n=1, cutoff=0.5)
            raise ValueError(f"unknown class '{text}'" + (f" (did you mean '{hint[0]}'?)" if hint else "")
                             + f"; classes are names or category ids: {', '.join(names[:20])}"
                             + (", ..." if len(names) > 20 else ""))
    if not labels:
        raise ValueError("no classes given to detect")
    return sorted(labels)


class DetectorBase:
    """Pre- and post-processing around a network that maps a normalized, padded batch to head outputs.

    Subclasses implement `head_outputs(batch) -> (cls_logits (B, N, K), box_deltas (B, N, 4),
    anchors (N, 4) xyxy in the padded batch's pixels, anchors per pyramid level)`.

    Args:
        config: the model config (resize, normalization and inference settings).
        categories: label i -> {"id", "name"} (entries with "placeholder": True are left out by default).
        score_threshold, nms_threshold, max_detections, class_agnostic: override the config's inference settings.
        classes: names or category ids to detect (default: every non-placeholder class). Other classes
            are removed before the score threshold, top-k and NMS, as if the model had no such outputs.
        batch_size: images per forward pass.
    """

    def __init__(self, config: ModelConfig, categories: list, *, score_threshold: Optional[float] = None,
                 nms_threshold: Optional[float] = None, max_detections: Optional[int] = None,
                 class_agnostic: Optional[bool] = None, classes: Optional[Sequence] = None, batch_size: int = 4):
        if len(categories) != config.num_classes:
            raise ValueError(f"{len(categories)} categories for a model with {config.num_classes} classes")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.config = config
        self.categories = list(categories)
        self.score_threshold = config.score_thresh if score_threshold is None else float(score_threshold)
        self.nms_threshold = config.nms_thresh if nms_threshold is None else float(nms_threshold)
        self.max_detections = config.detections_per_image if max_detections is None else int(max_detections)
        self.class_agnostic = config.class_agnostic_nms if class_agnostic is None else bool(class_agnostic)
        self.batch_size = batch_size
        if classes is None:
            labels = [i for i, c in enumerate(self.categories) if not c.get("placeholder")]
        else:
            labels = resolve_classes(classes, self.categories)
        self.labels = labels
        keep = torch.zeros(config.num_classes, dtype=torch.bool)
        keep[labels] = True
        self._excluded = None if bool(keep.all()) else ~keep  # (K,) True for classes left out
        self._names = [c["name"] for c in self.categories]
        self._ids = np.array([int(c["id"]) for c in self.categories], dtype=np.int64)

    def head_outputs(self, batch: Tensor) -> tuple:
        raise NotImplementedError

    def __call__(self, images):
        """One input (path, PIL image, (H, W, 3) uint8 RGB array) -> Detections; a list -> list of Detections."""
        if isinstance(images, (list, tuple)):
            arrays = [to_rgb_uint8(item, f"image {i}" if not isinstance(item, (str, Path)) else str(item))
                      for i, item in enumerate(images)]
            out = []
            for start in range(0, len(arrays), self.batch_size):
                out += self.predict_arrays(arrays[start:start + self.batch_size])
            for det, item in zip(out, images):
                det.source = str(item) if isinstance(item, (str, Path)) else ""
            return out
        return self([images])[0]

    @torch.inference_mode()
    def predict_arrays(self, arrays: list) -> list:
        """(H, W, 3) uint8 RGB arrays -> Detections per array (one forward pass for all of them)."""
        if not arrays:
            return []
        c = self.config
        batch, sizes = prepare_batch(arrays, pixel_mean=c.pixel_mean, pixel_std=c.pixel_std, min_size=c.min_size,
                                     max_size=c.max_size, rounding=c.resize_rounding,
                                     size_divisibility=c.size_divisibility)
        cls_logits, box_deltas, anchors, level_sizes = self.head_outputs(batch)
        if self._excluded is not None:
            cls_logits = cls_logits.masked_fill(self._excluded.to(cls_logits.device), -math.inf)
        dets = postprocess(cls_logits, box_deltas, anchors, level_sizes, sizes, score_thresh=self.score_threshold,
                           topk_candidates=c.topk_candidates, nms_thresh=self.nms_threshold,
                           max_detections=self.max_detections, box_weights=c.box_weights, box_clamp=c.box_clamp,
                           class_agnostic=self.class_agnostic)
        out = []
        for det, (h, w), array in zip(dets, sizes, arrays):
            oh, ow = array.shape[:2]
            scale = torch.tensor([ow / w, oh / h, ow / w, oh / h], device=det["boxes"].device)
            labels = det["labels"].cpu().numpy().astype(np.int64)
            out.append(Detections(boxes=(det["boxes"] * scale).float().cpu().numpy(),
                                  scores=det["scores"].float().cpu().numpy(), labels=labels,
                                  category_ids=self._ids[labels], names=[self._names[i] for i in labels],
                                  image_size=(oh, ow)))
        return out


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class Predictor(DetectorBase):
    """A RetinaNet in eval mode with its categories: images in, `Detections` out.

    Args:
        model: a `RetinaNet` (put in eval mode and moved to `device`).
        categories: label i -> {"id", "name"}, as stored in checkpoints.
        device: "cpu", "cuda", "cuda:1", ... (default: cuda when available).
        bf16: run the network under bfloat16 autocast (CPUs with AVX512-BF16/AMX, recent GPUs);
            decoding and NMS stay in float32.
        Other keyword arguments: see `DetectorBase`.

    Example:
        >>> predictor = Predictor.from_checkpoint("model.pt", device="cpu", classes=["person"])
        >>> [(name, float(s)) for name, s in zip(det.names, det.scores)]  # det = predictor("img.jpg")
    """

    def __init__(self, model, categories: list, *, device: Optional[str] = None, bf16: bool = False, **kwargs):
        self.device = torch.device(device or default_device())
        self.model = model.to(self.device).eval()
        self.bf16 = bf16
        super().__init__(_model_config(model), categories, **kwargs)

    @classmethod
    def from_checkpoint(cls, path: str, *, device: Optional[str] = None, **kwargs) -> "Predictor":
        """A predictor for the model in a checkpoint file (see retinanet/checkpoint.py)."""
        from .checkpoint import load_model

        model, _, categories = load_model(path, device=str(device or default_device()))
        return cls(model, categories, device=device, **kwargs)

    def head_outputs(self, batch: Tensor) -> tuple:
        batch = batch.to(self.device)
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            return self.model.forward_features(batch)


def _model_config(model) -> ModelConfig:
    """The inference-relevant settings a built RetinaNet holds, as a ModelConfig."""
    cfg = ModelConfig()
    cfg.num_classes = model.num_classes
    cfg.min_size, cfg.max_size, cfg.resize_rounding = model.min_size, model.max_size, model.resize_rounding
    cfg.size_divisibility = model.size_divisibility
    cfg.pixel_mean = model.pixel_mean.flatten().tolist()
    cfg.pixel_std = model.pixel_std.flatten().tolist()
    cfg.score_thresh, cfg.topk_candidates, cfg.nms_thresh = model.score_thresh, model.topk_candidates, model.nms_thresh
    cfg.detections_per_image, cfg.class_agnostic_nms = model.detections_per_image, model.class_agnostic_nms
    cfg.box_weights, cfg.box_clamp = list(model.box_weights), model.box_clamp
    return cfg


def draw_detections(image: np.ndarray, det: Detections, min_score: float = 0.0):
    """A Pillow RGB copy of `image` ((H, W, 3) uint8) with the boxes, class names and scores >= min_score drawn,
    and each drawn detection's mask, if it has masks, as a translucent overlay of its box's color."""
    from PIL import Image, ImageDraw, ImageFont

    pixels = np.ascontiguousarray(image)
    if det.masks is not None:
        pixels = pixels.astype(np.float32)
        for mask, score, label in reversed(list(zip(det.masks, det.scores.tolist(), det.labels.tolist()))):
            if score >= min_score:
                mask = np.asarray(mask, dtype=bool)
                pixels[mask] = (1 - MASK_ALPHA) * pixels[mask] + MASK_ALPHA * np.array(_PALETTE[label % len(_PALETTE)])
        pixels = np.round(pixels).astype(np.uint8)
    canvas = Image.fromarray(pixels)
    draw = ImageDraw.Draw(canvas)
    side = min(canvas.size)
    width = max(1, round(side / 300))
    try:
        font = ImageFont.load_default(size=max(10, side // 40))
    except TypeError:  # Pillow < 10.1: one fixed-size bitmap font
        font = ImageFont.load_default()
    rows = list(zip(det.boxes.tolist(), det.scores.tolist(), det.labels.tolist(), det.names))
    for box, score, label, name in reversed(rows):  # the best detection is drawn last, on top
        if score < min_score:
            continue
        color = _PALETTE[label % len(_PALETTE)]
        draw.rectangle(box, outline=color, width=width)
        text = f"{name} {score:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        x0, y0 = box[0], max(0.0, box[1] - (bottom - top) - 2 * width)  # above the box, inside the image
        left, top, right, bottom = draw.textbbox((x0, y0), text, font=font)
        draw.rectangle((left - width, top - width, right + width, bottom + width), fill=color)
        draw.text((x0, y0), text, fill=(255, 255, 255), font=font)
    return canvas


MASK_ALPHA = 0.45  # opacity of a mask overlay in draw_detections

# Tableau 10: distinct and readable with white text.
_PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
            (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]
