"""Do the anchors fit the objects? Anchor coverage of a dataset, and anchors fitted to it.

A ground-truth box trains the detector only through the anchors that the matcher makes foreground for it
(retinanet/ops/matcher.py). `anchor_coverage` asks, for every non-crowd box of a COCO dataset, what
training will ask: with the image resized as training resizes it (`resized_size`, the model's min/max
size) and padded to `size_divisibility`, the config's anchors (the real `AnchorGenerator`, built as
`build_model` builds it) and the matcher's thresholds (RetinaNet: fg_iou / bg_iou / allow_low_quality;
Faster R-CNN: the RPN's rpn_fg_iou / rpn_bg_iou, low-quality matches always on), what is the box's best
anchor IoU? Each box is then exactly one of

    covered         best IoU >= fg: at least one anchor is foreground by the threshold itself;
    low-quality     0 < best IoU < fg and allow_low_quality: only the low-quality rule makes its best
                    anchor(s) foreground (reported apart: best IoU in [bg, fg), or below bg, where that
                    anchor would otherwise even be a background example);
    never           no anchor is ever foreground for it: best IoU < fg without the low-quality rule,
                    or best IoU 0.

Each box is measured alone: an anchor that overlaps two boxes goes to the one it overlaps most, which
this report does not model, and a horizontal flip is not applied (it mirrors a box's offset from the
grid, which for an image width that is a multiple of every stride changes nothing but at the right
edge: on the shapes dataset the flipped coverage is identical). Each image is padded alone (a batch pads to its largest image, which only adds anchors
beyond an image's own padding).

Fast and exact. The IoU of a box with an anchor of a given shape is increasing in the intersection,
and the intersection is the product of the x overlap and the y overlap, each a function of the distance
between the anchor's centre and the box's that never increases with that distance. So on each level and
for each of the A anchor shapes, the best anchor is centred on one of the two grid columns and one of the
two grid rows around the box's centre (clamped to the grid): 2 x-candidates and 2 y-candidates per
shape and level, L * A IoUs per box in all instead of one per anchor in the image. The candidate anchors
are computed with the generator's own float32 arithmetic; tests/test_anchor_coverage.py checks the result
against `box_iou` with every anchor of the real generator and of a model's forward pass (equal to 1e-6).

`fit_anchors` searches anchor sizes (one per level), scales and ratios of the config's counts (so the
heads keep their shape) that maximize the covered fraction, with the same exact measure.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .ops.boxes import paired_iou, scale_boxes
from .ops.transform import resized_size

SIZE_BUCKETS = ("small", "medium", "large")  # COCO: area < 32^2, < 96^2, above, in the original image
ASPECT_EDGES = (1 / 3, 2 / 3, 3 / 2, 3)  # h / w
ASPECT_BUCKETS = ("h/w < 1/3", "1/3-2/3", "2/3-3/2", "3/2-3", "h/w > 3")
STATUS = ("covered", "low-quality only", "never")
COVERED, LOW_QUALITY, NEVER = 0, 1, 2
WARN_BELOW = 0.95


# ----------------------------------------------------------------------------------------------
# the best anchor IoU of each box


def matcher_settings(config) -> dict:
    """The matcher that a config's anchors are trained with: {"detector", "fg", "bg", "low_quality"}."""
    m = config.model
    if m.arch == "retinanet":
        return {"detector": "RetinaNet", "fg": m.fg_iou, "bg": m.bg_iou, "low_quality": bool(m.allow_low_quality)}
    if m.arch == "faster_rcnn":  # retinanet/modeling/rpn.py: Matcher(fg, bg, allow_low_quality=True)
        return {"detector": "Faster R-CNN's RPN", "fg": m.rpn_fg_iou, "bg": m.rpn_bg_iou, "low_quality": True}
    raise ValueError(f"model.arch '{m.arch}' has no anchors (anchor coverage is for retinanet and faster_rcnn)")


def anchor_generator(config):
    """The config's `AnchorGenerator`, built by the function `build_model` builds it with."""
    from .modeling.build import build_anchor_generator

    matcher_settings(config)  # an arch without anchors: one clear error
    return build_anchor_generator(config.model)


def padded_size(height, width, divisibility: int):
    """Resized (h, w) -> the padded input's (H, W) (each image alone), as `Detector.preprocess` pads."""
    d = max(1, int(divisibility))
    return -(-np.asarray(height) // d) * d, -(-np.asarray(width) // d) * d


@torch.no_grad()
def best_anchor_iou(boxes: torch.Tensor, padded_sizes: torch.Tensor, generator, chunk: int = 4096) -> torch.Tensor:
    """The best IoU of each box with the anchors of its image: max(box_iou(box, all anchors)), equal to it up
    to float32 rounding (an anchor's width is computed from its own centre, so two anchors of one shape may
    differ in the last bit; tests/test_anchor_coverage.py: within 1e-6).

    boxes: (N, 4) float32 xyxy in the resized image's pixels; padded_sizes: (N, 2) int64, the padded
    input (H, W) of each box's image; generator: an `AnchorGenerator` (its strides are 2^level, and the
    level's feature map is ceil(H / stride) x ceil(W / stride), what the ResNet/FPN produce from a padded
    input). -> (N,) float32. Boxes are taken `chunk` at a time: (chunk, L, A) values at once.
    """
    n = boxes.shape[0]
    best = torch.zeros(n, dtype=torch.float32)
    boxes = boxes.to(torch.float32)
    padded_sizes = torch.as_tensor(padded_sizes, dtype=torch.int64).reshape(-1, 2)
    for start in range(0, n, chunk):
        b = boxes[start:start + chunk]  # (C, 4)
        hw = padded_sizes[start:start + chunk]  # (C, 2)
        level_best = []
        for level, stride in enumerate(generator.strides):
            cells = generator.cells[level]  # (A, 4) xyxy around (0, 0)
            feat = -(-hw // stride)  # (C, 2) feature map (H_l, W_l)
            if generator.style == "torchvision":  # the generator's stride: image_size // feature_size
                steps = hw // feat  # (C, 2) (sy, sx)
            else:
                steps = torch.full_like(hw, int(stride))
            x = _best_centre(b[:, 0], b[:, 2], cells[:, 0], cells[:, 2], steps[:, 1], feat[:, 1], generator.offset)
            y = _best_centre(b[:, 1], b[:, 3], cells[:, 1], cells[:, 3], steps[:, 0], feat[:, 0], generator.offset)
            anchors = torch.stack([x + cells[:, 0], y + cells[:, 1], x + cells[:, 2], y + cells[:, 3]], dim=-1)  # (C, A, 4)
            level_best.append(paired_iou(b[:, None, :], anchors).amax(dim=1))  # (C,)
        best[start:start + chunk] = torch.stack(level_best, dim=1).amax(dim=1)
    return best


def _best_centre(lo, hi, cell_lo, cell_hi, step, count, offset: float) -> torch.Tensor:
    """One axis: of the grid centres (k + offset) * step, k = 0..count-1, the one whose anchor (centre +
    [cell_lo, cell_hi]) overlaps [lo, hi] most. lo, hi, step, count: (C,); cell_lo, cell_hi: (A,) -> (C, A).

    The overlap never increases with the distance from the box's centre, so the best is the grid
    centre just below or just above it (clamped to the grid); both are tried, in the generator's float32
    arithmetic ((k + offset) * step, then + cell), and the one with the larger overlap (computed as
    `box_iou` computes it) is kept.
    """
    centre = (lo + hi) / 2
    t = torch.floor(centre / step.to(torch.float32) - offset)  # (C,)
    last = (count - 1).to(torch.float32)
    best_x, best_overlap = None, None
    for k in (t, t + 1):
        k = torch.minimum(torch.clamp(k, min=0.0), last)
        x = ((k + offset) * step.to(torch.float32))[:, None]  # (C, 1)
        overlap = (torch.min(hi[:, None], x + cell_hi) - torch.max(lo[:, None], x + cell_lo)).clamp(min=0)  # (C, A)
        if best_x is None:
            best_x, best_overlap = x.expand_as(overlap), overlap
        else:
            better = overlap > best_overlap
            best_x = torch.where(better, x, best_x)
            best_overlap = torch.where(better, overlap, best_overlap)
    return best_x


# ----------------------------------------------------------------------------------------------
# the boxes of a dataset


@dataclass
class Boxes:
    """The non-crowd boxes of a dataset, one row each (numpy arrays), and what was left out.

    boxes: (N, 4) float32 xyxy in the original image; image_hw: (N, 2) the image's (h, w); area: (N,)
    COCO's `area` (the annotation's own, as COCOeval uses, else the box's); ann_ids, image_ids,
    category_ids: (N,); categories: id -> name.
    """

    boxes: np.ndarray
    image_hw: np.ndarray
    area: np.ndarray
    ann_ids: np.ndarray
    image_ids: np.ndarray
    category_ids: np.ndarray
    categories: dict
    num_images: int
    num_crowd: int
    source: str = ""


def load_boxes(data, image_dir=None) -> Boxes:
    """A `ValidationReport` (retinanet/data/validate.py), a `CocoDataset`, or a COCO JSON path (validated
    by `validate_coco`: with `image_dir`, the files must exist; without, only the JSON is checked; its
    errors raise) -> Boxes. Boxes are the validated ones (clipped to the image; empty ones dropped)."""
    from .data.validate import ValidationReport, validate_coco

    if hasattr(data, "boxes") and hasattr(data, "offsets") and hasattr(data, "json_path"):  # a CocoDataset
        data = validate_coco(data.json_path, data.image_dir, check_images="exists")
    elif not isinstance(data, ValidationReport):
        path = Path(data)
        if image_dir is None:  # the JSON alone: its file as the "folder" skips the file checks, with one known error
            data = validate_coco(path, path, check_images="exists")
            data.errors = [e for e in data.errors if e != f"{path}: image folder not found"]
        else:
            data = validate_coco(path, Path(image_dir), check_images="exists")
    if data.errors:
        data.raise_if_errors()
    areas = _json_areas(data.json_path)
    hw = {im["id"]: (im["height"], im["width"]) for im in data.images}
    rows, crowd = [], 0
    for image_id, anns in data.annotations.items():
        for a in anns:
            if a["iscrowd"]:
                crowd += 1
                continue
            rows.append((a["id"], image_id, a["category_id"], *a["bbox"]))
    if rows:
        table = np.array(rows, dtype=np.float64)
        ann_ids, image_ids, cats = (table[:, i].astype(np.int64) for i in range(3))
        boxes = table[:, 3:7].astype(np.float32)
    else:
        ann_ids = image_ids = cats = np.zeros(0, dtype=np.int64)
        boxes = np.zeros((0, 4), dtype=np.float32)
    image_hw = np.array([hw[i] for i in image_ids], dtype=np.int64).reshape(-1, 2)
    box_area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    area = np.array([areas.get(int(i), a) for i, a in zip(ann_ids, box_area)], dtype=np.float64)
    return Boxes(boxes, image_hw, area, ann_ids, image_ids, cats, {c["id"]: c["name"] for c in data.categories},
                 len(data.images), crowd, str(data.json_path))


def _json_areas(json_path) -> dict:
    """Annotation id -> its positive finite `area` (the validated report keeps boxes only)."""
    try:
        records = json.loads(Path(json_path).read_text(encoding="utf-8")).get("annotations", [])
    except (OSError, ValueError, AttributeError):
        return {}
    out = {}
    for a in records:
        area = a.get("area") if isinstance(a, dict) else None
        if isinstance(area, (int, float)) and math.isfinite(area) and area > 0:
            out[a.get("id")] = float(area)
    return out


def resized_boxes(boxes: Boxes, min_size: int, max_size: int, rounding: str = "round", divisibility: int = 32):
    """The boxes in the resized images, as the training transform scales them (`scale_boxes`), and each
    image's padded size: (N, 4) float32 tensor, (N, 2) int64 tensor."""
    n = len(boxes.ann_ids)
    if n == 0:
        return torch.zeros(0, 4), torch.zeros(0, 2, dtype=torch.int64)
    sizes = {}
    for h, w in np.unique(boxes.image_hw, axis=0):
        sizes[(int(h), int(w))] = resized_size(int(h), int(w), min_size, max_size, rounding)
    new = np.array([sizes[(int(h), int(w))] for h, w in boxes.image_hw], dtype=np.int64)  # (N, 2)
    out = torch.empty(n, 4)
    old = boxes.image_hw
    src = torch.from_numpy(boxes.boxes)
    for (h, w), (nh, nw) in sizes.items():  # one scale per image size, the factors of the transform
        rows = torch.from_numpy(np.flatnonzero((old[:, 0] == h) & (old[:, 1] == w)))
        out[rows] = scale_boxes(src[rows], nw / w, nh / h)
    ph, pw = padded_size(new[:, 0], new[:, 1], divisibility)
    return out, torch.from_numpy(np.stack([ph, pw], axis=1))


# ----------------------------------------------------------------------------------------------
# the report


@dataclass
class CoverageReport:
    """The best anchor IoU of every non-crowd box and what it means for matching (see the module docstring).

    best_iou, status (0 covered, 1 low-quality only, 2 never), size_bucket (index into SIZE_BUCKETS),
    aspect_bucket (into ASPECT_BUCKETS), resized_wh: (N,) / (N, 2) numpy arrays, in the boxes' order.
    """

    boxes: Boxes
    best_iou: np.ndarray
    resized_wh: np.ndarray
    fg: float
    bg: float
    low_quality: bool
    detector: str
    anchors: str
    resize: str
    seconds: float
    status: np.ndarray = field(init=False)
    size_bucket: np.ndarray = field(init=False)
    aspect_bucket: np.ndarray = field(init=False)

    def __post_init__(self):
        self.status = classify(self.best_iou, self.fg, self.low_quality)
        self.size_bucket = np.digitize(self.boxes.area, [32 ** 2, 96 ** 2])
        w = np.maximum(self.boxes.boxes[:, 2] - self.boxes.boxes[:, 0], 1e-9)
        self.aspect_bucket = np.digitize((self.boxes.boxes[:, 3] - self.boxes.boxes[:, 1]) / w, ASPECT_EDGES)

    @property
    def num_boxes(self) -> int:
        return int(self.best_iou.shape[0])

    @property
    def covered(self) -> float:
        """The fraction of boxes with an anchor of IoU >= fg (1.0 with no boxes)."""
        return float((self.status == COVERED).mean()) if self.num_boxes else 1.0

    def summary(self, mask: Optional[np.ndarray] = None) -> dict:
        """{"boxes", "covered", "low_quality", "low_quality_below_bg", "never", "median_iou"} of the boxes in `mask`."""
        sel = slice(None) if mask is None else mask
        s, iou = self.status[sel], self.best_iou[sel]
        n = int(s.shape[0])
        frac = (lambda x: float(x.sum()) / n) if n else (lambda x: 0.0)
        return {"boxes": n, "covered": frac(s == COVERED), "low_quality": frac(s == LOW_QUALITY),
                "low_quality_below_bg": frac((s == LOW_QUALITY) & (iou < self.bg)), "never": frac(s == NEVER),
                "median_iou": float(np.median(iou)) if n else 0.0}

    def breakdown(self) -> dict:
        """{"all": summary, "size": {bucket: summary}, "aspect": {...}, "category": {name: ...}} (empty buckets left out)."""
        out = {"all": self.summary(), "size": {}, "aspect": {}, "category": {}}
        for i, name in enumerate(SIZE_BUCKETS):
            if (self.size_bucket == i).any():
                out["size"][name] = self.summary(self.size_bucket == i)
        for i, name in enumerate(ASPECT_BUCKETS):
            if (self.aspect_bucket == i).any():
                out["aspect"][name] = self.summary(self.aspect_bucket == i)
        for cid, name in self.boxes.categories.items():
            if (self.boxes.category_ids == cid).any():
                out["category"][name] = self.summary(self.boxes.category_ids == cid)
        return out

    def worst(self, count: int = 10) -> list:
        """The `count` boxes of lowest best IoU: {"annotation_id", "image_id", "category", "width", "height"
        (resized pixels), "best_iou", "status"}."""
        order = np.argsort(self.best_iou, kind="stable")[:count]
        return [{"annotation_id": int(self.boxes.ann_ids[i]), "image_id": int(self.boxes.image_ids[i]),
                 "category": self.boxes.categories.get(int(self.boxes.category_ids[i]), "?"),
                 "width": float(self.resized_wh[i, 0]), "height": float(self.resized_wh[i, 1]),
                 "best_iou": float(self.best_iou[i]), "status": STATUS[self.status[i]]} for i in order]

    def to_dict(self) -> dict:
        return {"detector": self.detector, "anchors": self.anchors, "resize": self.resize, "fg_iou": self.fg,
                "bg_iou": self.bg, "allow_low_quality": self.low_quality, "images": self.boxes.num_images,
                "crowd_left_out": self.boxes.num_crowd, "seconds": self.seconds, **self.breakdown(),
                "worst": self.worst()}

    def warning(self) -> Optional[str]:
        """A one-line warning when fewer than 95% of the boxes are covered, else None."""
        if not self.num_boxes or self.covered >= WARN_BELOW:
            return None
        return (f"warning: only {100 * self.covered:.1f}% of the boxes have an anchor with IoU >= {self.fg:g} "
                f"(fewer than {100 * WARN_BELOW:.0f}%): change the anchors (--fit-anchors) or the input size")

    def format(self, worst: int = 10) -> str:
        lq = "on" if self.low_quality else "off"
        lines = [f"anchor coverage of {self.detector}'s anchors: {self.anchors}",
                 f"  matcher: foreground IoU >= {self.fg:g}, background < {self.bg:g}, low-quality matches {lq}; "
                 f"{self.resize}",
                 f"  {self.num_boxes} boxes in {self.boxes.num_images} images ({self.boxes.num_crowd} crowd boxes "
                 f"left out); measured in {self.seconds:.2f} s",
                 f"  {'':<18}{'boxes':>8}{'covered':>9}{'low-q':>8}{'(< bg)':>8}{'never':>8}{'median IoU':>12}"]
        b = self.breakdown()

        def row(name, s):
            return (f"  {name:<18}{s['boxes']:>8}{100 * s['covered']:>8.1f}%{100 * s['low_quality']:>7.1f}%"
                    f"{100 * s['low_quality_below_bg']:>7.1f}%{100 * s['never']:>7.1f}%{s['median_iou']:>12.3f}")

        lines.append(row("all", b["all"]))
        for group in ("size", "aspect", "category"):
            for name, s in b[group].items():
                lines.append(row(f"{group[0]}: {name}"[:18], s))
        if self.num_boxes and worst:
            lines.append(f"  lowest best IoU (annotation id, image id, category, w x h resized, best IoU):")
            for w in self.worst(worst):
                lines.append(f"    {w['annotation_id']:>8} {w['image_id']:>8}  {w['category']:<12} "
                             f"{w['width']:.0f} x {w['height']:.0f}  {w['best_iou']:.3f} ({w['status']})")
        lines.append("  covered: an anchor with IoU >= fg; low-q: only the low-quality rule makes one foreground "
                     "((< bg): its IoU is below bg); never: no anchor is foreground")
        warning = self.warning()
        if warning:
            lines.append(warning)
        return "\n".join(lines)


def classify(best_iou: np.ndarray, fg: float, low_quality: bool) -> np.ndarray:
    """(N,) best IoU -> (N,) int8: 0 covered (>= fg), 1 low-quality only (in (0, fg), with the rule on), 2 never."""
    best_iou = np.asarray(best_iou)
    status = np.full(best_iou.shape, NEVER, dtype=np.int8)
    if low_quality:
        status[best_iou > 0] = LOW_QUALITY
    status[best_iou >= fg] = COVERED
    return status


def describe_anchors(m) -> str:
    sizes = "/".join(f"{s:g}" for s in m.anchor_sizes)
    scales = ", ".join(f"{s:.3g}" for s in m.anchor_scales)
    ratios = ", ".join(f"{r:.3g}" for r in m.anchor_ratios)
    return f"P{m.min_level}-P{m.max_level} sizes {sizes}, scales [{scales}], ratios (h/w) [{ratios}]"


def anchor_coverage(data, config, image_dir=None) -> CoverageReport:
    """The anchor coverage report of a dataset under a config (see the module docstring).

    data: a COCO JSON path (with `image_dir`, default its folder), a `ValidationReport` or a `CocoDataset`
    (or already loaded `Boxes`); config: a `Config`. Images are resized to the model's min_size / max_size
    (what training does without data.train_sizes or scale jitter, and what testing does).
    """
    boxes = data if isinstance(data, Boxes) else load_boxes(data, image_dir)
    settings = matcher_settings(config)
    generator = anchor_generator(config)
    m = config.model
    started = time.perf_counter()
    resized, padded = resized_boxes(boxes, m.min_size, m.max_size, m.resize_rounding, m.size_divisibility)
    best = best_anchor_iou(resized, padded, generator).numpy()
    seconds = time.perf_counter() - started
    wh = (resized[:, 2:] - resized[:, :2]).numpy()
    resize = f"images resized to shorter side {m.min_size}, longer <= {m.max_size}, padded to x{m.size_divisibility}"
    d = config.data
    if d.scale_jitter or (d.train_sizes and list(d.train_sizes) != [m.min_size]):
        resize += (" (the test size: training also draws other sizes, data.train_sizes / scale_jitter; "
                   "override model.min_size to measure one of them)")
    return CoverageReport(boxes, best, wh, settings["fg"], settings["bg"], settings["low_quality"],
                          settings["detector"], describe_anchors(m), resize, seconds)


# ----------------------------------------------------------------------------------------------
# anchors fitted to the data


@dataclass
class FitResult:
    """What `fit_anchors` found. before: the config's covered fraction; candidates: method ->
    {"anchor_sizes", "anchor_scales", "anchor_ratios", "covered", "median_iou"} measured on every box;
    chosen: the method with the highest coverage ("config" when nothing beat it)."""

    detector: str
    fg: float
    before: float
    candidates: dict
    chosen: str
    num_boxes: int
    sample: int
    seconds: float

    @property
    def anchors(self) -> dict:
        c = self.candidates[self.chosen]
        return {k: c[k] for k in ("anchor_sizes", "anchor_scales", "anchor_ratios")}

    @property
    def after(self) -> float:
        return self.candidates[self.chosen]["covered"]

    def snippet(self) -> str:
        """The chosen anchors as a YAML config snippet (the `model:` keys to put in a config)."""
        a = self.anchors
        return "\n".join(["model:"] + [f"  {k}: [{', '.join(f'{v:g}' for v in a[k])}]" for k in a])

    def format(self) -> str:
        lines = [f"anchors fitted to {self.num_boxes} boxes ({self.detector}, covered: an anchor with IoU >= "
                 f"{self.fg:g}; searched on {self.sample} of them, {self.seconds:.1f} s):"]
        for name, c in self.candidates.items():
            lines.append(f"  {name:<8} covered {100 * c['covered']:5.1f}%  median best IoU {c['median_iou']:.3f}  "
                         f"sizes {_short(c['anchor_sizes'])} scales {_short(c['anchor_scales'])} "
                         f"ratios {_short(c['anchor_ratios'])}")
        if self.chosen == "config":
            lines.append(f"the config's anchors are the best found ({100 * self.before:.1f}% covered): keep them")
        else:
            lines.append(f"best: {self.chosen}, coverage {100 * self.before:.1f}% -> {100 * self.after:.1f}%; "
                         f"the config snippet (same number of anchors per location, so the heads keep their shape):")
            lines.append(self.snippet())
        return "\n".join(lines)


def _short(values) -> str:
    return "[" + ", ".join(f"{v:g}" for v in values) + "]"


def _kmeans_1d(values: np.ndarray, k: int, iterations: int = 100) -> np.ndarray:
    """Lloyd's k-means on a line, started at the quantiles: (k,) sorted centres."""
    centres = np.quantile(values, (np.arange(k) + 0.5) / k)
    for _ in range(iterations):
        assign = np.abs(values[:, None] - centres[None]).argmin(axis=1)
        new = np.array([values[assign == j].mean() if (assign == j).any() else centres[j] for j in range(k)])
        if np.allclose(new, centres):
            break
        centres = new
    return np.sort(centres)


def kmeans_anchors(wh: np.ndarray, levels: int, scales: int, ratios: int) -> dict:
    """Anchors of the config's layout from k-means of the (resized) box shapes wh (N, 2): L * S clusters
    of log(sqrt(w h)) and R clusters of log(h / w). For two centred boxes of one aspect ratio, 1 - IoU =
    1 - (small / large)^2 is a function of their log-size difference alone, so the size clusters are those
    of k-means on 1 - IoU (YOLOv2's), restricted to the layout: sorted, level l takes clusters
    l*S..l*S+S-1, its base size the first, and the scales are the clusters' mean ratios to it. The grid
    (a level's stride) is ignored, which is what the evolutionary search adds."""
    w, h = np.maximum(wh[:, 0], 1e-6), np.maximum(wh[:, 1], 1e-6)
    size = _kmeans_1d(0.5 * np.log(w * h), levels * scales).reshape(levels, scales)  # log sizes
    ratio = _kmeans_1d(np.log(h / w), ratios)
    return {"anchor_sizes": np.exp(size[:, 0]).tolist(),
            "anchor_scales": np.exp((size - size[:, :1]).mean(axis=0)).tolist(),
            "anchor_ratios": np.exp(ratio).tolist()}


def _rounded(anchors: dict) -> dict:
    """Values as a config file would hold them: sizes to 0.1 px, scales and ratios to 3 decimals; sorted."""
    return {"anchor_sizes": sorted(round(float(v), 1) for v in anchors["anchor_sizes"]),
            "anchor_scales": sorted(round(float(v), 3) for v in anchors["anchor_scales"]),
            "anchor_ratios": sorted(round(float(v), 3) for v in anchors["anchor_ratios"])}


def fit_anchors(data, config, image_dir=None, *, generations: int = 300, sample: int = 20000, seed: int = 0,
                methods=("kmeans", "evolve")) -> FitResult:
    """Anchor sizes (one per level), scales and ratios, as many as the config has, that maximize the
    fraction of boxes covered (best anchor IoU >= the matcher's fg threshold, measured exactly as
    `anchor_coverage` does: the real generator, the resized images, the grid).

    methods: "kmeans" (`kmeans_anchors`: the box shapes alone) and "evolve" (in the manner of YOLOv5's
    autoanchor: from the better of the config's and k-means' anchors, `generations` random multiplicative
    mutations of the log sizes, scales and ratios, each kept if it raises the fitness: the covered fraction,
    plus 0.01 x the mean of min(best IoU / fg, 1) so that near misses guide the search). The search runs
    on `sample` boxes drawn with `seed`; every candidate is then measured on all boxes. -> FitResult.
    """
    boxes = data if isinstance(data, Boxes) else load_boxes(data, image_dir)
    settings = matcher_settings(config)
    m = config.model
    started = time.perf_counter()
    resized, padded = resized_boxes(boxes, m.min_size, m.max_size, m.resize_rounding, m.size_divisibility)
    n = resized.shape[0]
    if n == 0:
        raise ValueError(f"{boxes.source}: no (non-crowd) boxes to fit anchors to")
    rng = np.random.default_rng(seed)
    pick = torch.from_numpy(np.sort(rng.choice(n, size=min(n, sample), replace=False)))
    fg = settings["fg"]

    def measure(anchors: dict, rows=None) -> np.ndarray:
        cfg = copy.deepcopy(config)
        for k, v in anchors.items():
            setattr(cfg.model, k, list(v))
        sel = slice(None) if rows is None else rows
        return best_anchor_iou(resized[sel], padded[sel], anchor_generator(cfg)).numpy()

    def fitness(best: np.ndarray) -> float:
        return float((best >= fg).mean() + 0.01 * np.minimum(best / fg, 1.0).mean())

    current = _rounded({k: getattr(m, k) for k in ("anchor_sizes", "anchor_scales", "anchor_ratios")})
    found = {"config": current}
    if "kmeans" in methods or "evolve" in methods:
        wh = (resized[pick, 2:] - resized[pick, :2]).numpy()
        found["kmeans"] = _rounded(kmeans_anchors(wh, len(m.anchor_sizes), len(m.anchor_scales),
                                                  len(m.anchor_ratios)))
    if "evolve" in methods:
        start = max(("config", "kmeans"), key=lambda name: fitness(measure(found[name], pick)))
        found["evolve"] = _evolve(found[start], lambda a: fitness(measure(a, pick)), generations, rng)
    if "kmeans" not in methods:
        found.pop("kmeans", None)
    candidates = {}
    for name, anchors in found.items():
        best = measure(anchors)
        candidates[name] = {**anchors, "covered": float((best >= fg).mean()), "median_iou": float(np.median(best))}
    chosen = max(candidates, key=lambda name: (candidates[name]["covered"], name == "config"))
    return FitResult(settings["detector"], fg, candidates["config"]["covered"], candidates, chosen, n,
                     int(pick.shape[0]), time.perf_counter() - started)


def _evolve(anchors: dict, fitness, generations: int, rng, sigma: float = 0.1, mutation_prob: float = 0.9) -> dict:
    """Random search from `anchors`: each generation multiplies every size, scale (the first, 1, stays) and
    ratio, each with probability `mutation_prob`, by exp(r * N(0, sigma)) (r uniform in [0, 1) per
    generation, as YOLOv5's autoanchor mutates), rescales so that the smallest scale is 1, rounds as a
    config holds values, and keeps the result if its fitness is higher."""
    best, best_fit = anchors, fitness(anchors)
    genes = np.log(np.concatenate([best["anchor_sizes"], best["anchor_scales"], best["anchor_ratios"]]))
    nl, ns = len(best["anchor_sizes"]), len(best["anchor_scales"])
    frozen = np.zeros(genes.shape, dtype=bool)
    frozen[nl] = True  # the first scale stays 1: sizes x scales would otherwise be two names for one thing
    for _ in range(generations):
        step = np.zeros_like(genes)
        while not step.any():
            mask = (rng.random(genes.shape) < mutation_prob) & ~frozen
            step = mask * rng.random() * rng.standard_normal(genes.shape) * sigma
        trial = np.exp(genes + step)
        scales = np.sort(trial[nl:nl + ns])  # the smallest scale back to 1, its factor moved into the sizes
        candidate = _rounded({"anchor_sizes": trial[:nl] * scales[0], "anchor_scales": scales / scales[0],
                              "anchor_ratios": trial[nl + ns:]})
        fit = fitness(candidate)
        if fit > best_fit:
            best, best_fit = candidate, fit
            genes = np.log(np.concatenate([best["anchor_sizes"], best["anchor_scales"], best["anchor_ratios"]]))
    return best
