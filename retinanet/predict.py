"""Inference on image files, Pillow images and arrays: `Predictor`, and the detections it returns.

    >>> from retinanet import Predictor
    >>> predictor = Predictor.from_checkpoint("model.pt", score_threshold=0.3)
    >>> det = predictor("street.jpg")           # or a PIL image, or an (H, W, 3) uint8 RGB array
    >>> det.boxes, det.scores, det.names        # xyxy in the image's own pixels, best first

The pipeline is the model's own (retinanet/modeling/detector.py): `preprocess` (RGB uint8 -> [0, 1]
-> normalize -> resize -> pad), `network`, `postprocess` (for RetinaNet: score threshold, top-k per
level, decode, NMS, cap; boxes scaled back to the original image). The ONNX runtime detector
(retinanet/export.py) is a `Predictor` whose network is the ONNX graph.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from .modeling.detector import ImageBatch, keep_classes_mask
from .ops.segprop import RLEMasks
from .syncs import to_device
from .tiling import DEFAULT_MERGE, DEFAULT_OVERLAP, check_tiling, tiled_detections
from .tta import DEFAULT_SCALES, tta_detections


@dataclass
class Detections:
    """The detections of one image, best first.

    boxes (D, 4) float32 xyxy in the pixels of the image as given (EXIF orientation applied for files),
    scores (D,) float32, labels (D,) int64 model labels 0..K-1, category_ids (D,) int64 (the dataset's
    ids, categories[label]["id"]), names: D class names. image_size: (height, width).
    masks: None (a box detector), or each detection's mask in the same pixels as `ops.segprop.RLEMasks`
    (compressed run lengths; masks[i] or iterating: (height, width) bool arrays; np.asarray: (D, height, width)).
    """

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    category_ids: np.ndarray
    names: list
    image_size: tuple
    source: str = ""
    masks: Optional[RLEMasks] = None

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


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class Predictor:
    """A detector in eval mode with its categories: images in, `Detections` out.

    Runs the model's own inference path (`Detector.preprocess`, `network`, `postprocess`: see
    retinanet/modeling/detector.py), so its detections are `model(images)`'s.

    Args:
        model: a detector (`build_model`; put in eval mode and moved to `device`).
        categories: label i -> {"id", "name"}, as stored in checkpoints (entries with
            "placeholder": True are left out by default).
        device: "cpu", "cuda", "cuda:1", ... (default: cuda when available).
        bf16: run the network under bfloat16 autocast (CPUs with AVX512-BF16/AMX, recent GPUs);
            decoding and NMS stay in float32.
        score_threshold, nms_threshold, max_detections, class_agnostic: override the model's inference settings.
        classes: names or category ids to detect (default: every non-placeholder class). Other classes
            are removed before the score threshold, top-k and NMS, as if the model had no such outputs.
        batch_size: images per forward pass.
        tta: test-time augmentation (retinanet/tta.py): False (default), True (shorter side 0.75x,
            1x and 1.25x the model's, each plain and flipped), or a list of scales (with flips).
        tile: tiled inference for large images (retinanet/tiling.py): None (default), or the side in
            pixels of the square crops, each resized as the model resizes any image (the model's
            min_size runs them at the image's own resolution). Box detectors only; not with `tta`.
        tile_overlap: the crops' overlap, a fraction of `tile` in [0, 1) (default 0.25).
        tile_full_image: also run the whole image resized as usual and merge it in (default True, as SAHI).
        tile_merge: how the passes' detections are merged: "nms" (default: class-aware NMS at the NMS
            threshold) or "greedy_nmm" (SAHI's GREEDYNMM, IoS 0.5: a box cut by a crop border joins the
            whole one; measured worse at low score thresholds, see retinanet/tiling.py).

    Example:
        >>> predictor = Predictor.from_checkpoint("model.pt", device="cpu", classes=["person"])
        >>> det = predictor("img.jpg")
        >>> [(name, float(s)) for name, s in zip(det.names, det.scores)]
    """

    def __init__(self, model, categories: list, *, device: Optional[str] = None, bf16: bool = False,
                 score_threshold: Optional[float] = None, nms_threshold: Optional[float] = None,
                 max_detections: Optional[int] = None, class_agnostic: Optional[bool] = None,
                 classes: Optional[Sequence] = None, batch_size: int = 4, tta=False, tile: Optional[int] = None,
                 tile_overlap: float = DEFAULT_OVERLAP, tile_full_image: bool = True, tile_merge: str = DEFAULT_MERGE):
        if len(categories) != model.num_classes:
            raise ValueError(f"{len(categories)} categories for a model with {model.num_classes} classes")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device or default_device())
        self.model = model if _on_meta(model) else model.to(self.device).eval()
        self.bf16 = bf16
        self.categories = list(categories)
        self.settings = dict(score_thresh=score_threshold, nms_thresh=nms_threshold, max_detections=max_detections,
                             class_agnostic=class_agnostic)
        self.batch_size = batch_size
        self.tta_scales = tuple(DEFAULT_SCALES) if tta is True else tuple(float(x) for x in tta) if tta else ()
        if self.tta_scales and getattr(model, "class_agnostic_proposals", False):
            raise ValueError("test-time augmentation merges boxes, not masks: it does not apply to segment proposals")
        if tile is not None:
            check_tiling(tile, tile_overlap, tile_merge)
            if self.tta_scales:
                raise ValueError("tiled inference and test-time augmentation do not combine: choose one")
            if getattr(model, "class_agnostic_proposals", False):
                raise ValueError("tiled inference merges boxes, not masks: it does not apply to segment proposals")
        self.tile = None if tile is None else int(tile)
        self.tiling = dict(overlap=float(tile_overlap), full_image=bool(tile_full_image), merge=tile_merge)
        if classes is None:
            self.labels = [i for i, c in enumerate(self.categories) if not c.get("placeholder")]
        else:
            self.labels = resolve_classes(classes, self.categories)
        self.keep_classes = keep_classes_mask(model.num_classes, self.labels)  # (K,) bool
        self._names = [c["name"] for c in self.categories]
        self._ids = np.array([int(c["id"]) for c in self.categories], dtype=np.int64)

    @classmethod
    def from_checkpoint(cls, path: str, *, device: Optional[str] = None, **kwargs) -> "Predictor":
        """A predictor for the model in a checkpoint file (see retinanet/checkpoint.py)."""
        from .checkpoint import load_model

        model, _, categories = load_model(path, device=str(device or default_device()))
        return cls(model, categories, device=device, **kwargs)

    @property
    def score_threshold(self) -> float:
        return self.model.score_thresh if self.settings["score_thresh"] is None else self.settings["score_thresh"]

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

    def network(self, batch: ImageBatch) -> tuple:
        """The model's network on a preprocessed batch, on this predictor's device and precision."""
        batch = ImageBatch(batch.tensor.to(self.device), batch.image_sizes, batch.original_sizes)
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            return self.model.run_network(batch)

    @torch.inference_mode()
    def predict_arrays(self, arrays: list) -> list:
        """(H, W, 3) uint8 RGB arrays -> Detections per array (one forward pass for all of them)."""
        if not arrays:
            return []
        images = [torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1) for a in arrays]  # (3, H, W) uint8
        device = None if _on_meta(self.model) else self.device
        if device is not None:  # uint8 to the device (pinned on a GPU: not waiting); preprocess converts it there
            images = [to_device(image.pin_memory() if device.type == "cuda" else image, device) for image in images]
        if self.tta_scales:
            dets = tta_detections(self.model, images, network=self.network, scales=self.tta_scales, device=device,
                                  keep_classes=self.keep_classes, **self.settings)
        elif self.tile is not None:
            dets = tiled_detections(self.model, images, tile=self.tile, batch_size=self.batch_size,
                                    network=self.network, device=device, keep_classes=self.keep_classes,
                                    **self.tiling, **self.settings)
        else:
            batch = self.model.preprocess(images, device=device)
            dets = self.model.postprocess(self.network(batch), batch, keep_classes=self.keep_classes,
                                          **self.settings)
        out = []
        for det, array in zip(dets, arrays):
            labels = det["labels"].cpu().numpy().astype(np.int64)
            out.append(Detections(boxes=det["boxes"].float().cpu().numpy(), scores=det["scores"].float().cpu().numpy(),
                                  labels=labels, category_ids=self._ids[labels], names=[self._names[i] for i in labels],
                                  image_size=tuple(array.shape[:2]),
                                  masks=det.get("masks")))
        return out


def _on_meta(model) -> bool:
    """A model built on the meta device (weights elsewhere, e.g. in an ONNX file: `OnnxDetector`)."""
    return any(p.is_meta for p in model.parameters())


def draw_detections(image: np.ndarray, det: Detections, min_score: float = 0.0):
    """A Pillow RGB copy of `image` ((H, W, 3) uint8) with the boxes, class names and scores >= min_score drawn,
    and each drawn detection's mask, if it has masks, as a translucent overlay of its box's color."""
    from PIL import Image, ImageDraw, ImageFont

    pixels = np.ascontiguousarray(image)
    if det.masks is not None:
        pixels = pixels.astype(np.float32)
        for i in reversed(range(len(det))):  # one mask decoded at a time
            score, label = float(det.scores[i]), int(det.labels[i])
            if score >= min_score:
                mask = np.asarray(det.masks[i], dtype=bool)
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
