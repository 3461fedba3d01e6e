"""COCO bbox and segm metrics, and proposal recall, for a results list, computed by a well-kept
COCOeval implementation.

The metrics are COCO's (Lin's thesis, ch. 2; the Focal Loss paper reports AP, AP50, AP75,
APs, APm, APl): precision averaged over 101 recall points, over IoU thresholds .50:.05:.95,
with at most 100 detections per image. Nothing here re-implements COCOeval; three backends run it,
and all three give the same numbers as pycocotools, which stays the reference the tests compare to:

    hotcoco           Rust, the default
    faster-coco-eval  C++, in the test extra
    pycocotools       the reference

(COCOeval alone on 5000 images / 500k detections, on an idle 2-core machine: pycocotools 36 s,
faster-coco-eval 3.9 s, hotcoco 0.19 s; benchmarks/bench_eval.py times the whole command.)

Every backend exposes the accumulated `precision` array, so per-category AP, AP at single IoU
thresholds (AP60, AP70, AP80, AP90) and the precision-recall curves are read from it the way
pycocotools' own `summarize()` reads AP50: the mean over categories with ground truth of
`precision[iou, :, category, area="all", maxDets=100]`.

`iou_type="segm"` scores masks instead of boxes: every result then carries a `segmentation`, a
compressed RLE {"size": [h, w], "counts": str} of its image's size (what `Detections.to_coco` and
`ops.masks.encode_masks` write), and the ground truth's segmentations (polygons, RLE) are the
reference; IoU is mask IoU, a crowd region is matched by intersection over the detection's area.
A result's `bbox` is not read then: its box and area are its mask's (pycocotools' loadRes would
take the area of the bbox when there is one; detectron2 removes it for the same reason), so the
numbers are pycocotools' on the results without their `bbox`.

`proposal_recall` scores class-agnostic proposals as the proposal papers do (Lin's thesis, ch. 3,
Tables 3.2-3.3): COCOeval with useCats=0 (category ids ignored) and maxDets [10, 100, 1000] gives
AR@10, AR@100, AR@1000 and AR small/medium/large at 1000; AUC is AR averaged over the proposal
counts 1..1000, read from the same evaluation's per-image matches.

Inputs are checked before any backend sees them, with errors that name the file and the result
index or annotation id: pycocotools would crash on an empty results list, silently drop
detections of an unknown category and accept NaN boxes.
"""

from __future__ import annotations

import gc
import importlib
import io
import json
import math
from contextlib import contextmanager, redirect_stdout
from dataclasses import dataclass
from itertools import chain
from operator import itemgetter
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import numpy as np
import orjson

# backend name -> (module to import, pip package that provides it)
BACKENDS = {
    "hotcoco": ("hotcoco", "hotcoco"),
    "faster-coco-eval": ("faster_coco_eval", "faster-coco-eval"),
    "pycocotools": ("pycocotools", "pycocotools"),
}
DEFAULT_BACKEND = "hotcoco"
IOU_TYPES = ("bbox", "segm")

# proposal_recall's keys: AR at 10, 100, 1000 proposals; AR by object size at 1000; AUC (AR averaged over
# 1..1000 proposals), overall and by object size (the thesis's Tables 3.2-3.3).
PROPOSAL_KEYS = ("AR@10", "AR@100", "AR@1000", "ARs@1000", "ARm@1000", "ARl@1000", "AUC", "AUCs", "AUCm", "AUCl")
PROPOSAL_MAX_DETS = (10, 100, 1000)
PROPOSAL_BACKENDS = ("hotcoco", "pycocotools")  # faster-coco-eval keeps its per-image matches in C++

# COCOeval.stats, in pycocotools' order.
STAT_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
# AP at single IoU thresholds beyond COCO's 0.5 and 0.75, for the IoU-balanced study.
EXTRA_IOU_KEYS = {"AP60": 0.60, "AP70": 0.70, "AP80": 0.80, "AP90": 0.90}
METRIC_KEYS = STAT_KEYS + tuple(EXTRA_IOU_KEYS) + ("per_category",)

# Text of pycocotools' summary lines, one per entry of STAT_KEYS.
_STAT_LINES = (
    ("Average Precision", "AP", "0.50:0.95", "all", 100), ("Average Precision", "AP", "0.50", "all", 100),
    ("Average Precision", "AP", "0.75", "all", 100), ("Average Precision", "AP", "0.50:0.95", "small", 100),
    ("Average Precision", "AP", "0.50:0.95", "medium", 100), ("Average Precision", "AP", "0.50:0.95", "large", 100),
    ("Average Recall", "AR", "0.50:0.95", "all", 1), ("Average Recall", "AR", "0.50:0.95", "all", 10),
    ("Average Recall", "AR", "0.50:0.95", "all", 100), ("Average Recall", "AR", "0.50:0.95", "small", 100),
    ("Average Recall", "AR", "0.50:0.95", "medium", 100), ("Average Recall", "AR", "0.50:0.95", "large", 100),
)

PathLike = Union[str, Path]


class BackendNotInstalled(ImportError):
    """The chosen COCO evaluation backend is not installed; the message names the pip package."""


@dataclass
class CocoEvaluation:
    """What a COCOeval run accumulated, in pycocotools' layout (-1 marks "no ground truth here").

    stats (12,): COCOeval.stats in STAT_KEYS order.
    precision (T, R, K, A, M): T IoU thresholds, R recall thresholds, K categories, A area ranges, M maxDets.
    recall (T, K, A, M).
    iou_thrs (T,), rec_thrs (R,); cat_ids, cat_names (K,); area_labels (A,) ("all", "small", ...); max_dets (M,).
    """

    stats: np.ndarray
    precision: np.ndarray
    recall: np.ndarray
    iou_thrs: np.ndarray
    rec_thrs: np.ndarray
    cat_ids: list
    cat_names: list
    area_labels: list
    max_dets: list

    def _slice(self, iou: Optional[float]) -> np.ndarray:
        """precision at area "all", 100 detections, all IoU thresholds or one: (T or 1, R, K)."""
        p = self.precision[:, :, :, self.area_labels.index("all"), self.max_dets.index(100)]
        if iou is None:
            return p
        t = int(np.argmin(np.abs(self.iou_thrs - iou)))
        if not math.isclose(self.iou_thrs[t], iou, abs_tol=1e-9):
            raise ValueError(f"IoU threshold {iou} is not one of the evaluated {self.iou_thrs.tolist()}")
        return p[t:t + 1]

    def ap_at_iou(self, iou: float) -> Optional[float]:
        """AP at one IoU threshold, area all, 100 detections; None if no category has ground truth."""
        return _mean_defined(self._slice(iou))

    def per_category_ap(self) -> dict:
        """{category name: AP@[.50:.95]} for every GT category; None for a category without ground truth.

        Two categories with the same name are told apart as "name (id N)".
        """
        p = self._slice(None)  # (T, R, K)
        names = _unique_names(self.cat_ids, self.cat_names)
        return {name: _mean_defined(p[:, :, k]) for k, name in enumerate(names)}

    def category_pr_curves(self, iou: float) -> np.ndarray:
        """Precision (R, K) at each of rec_thrs, per category (area all, 100 detections); -1 where no GT."""
        return self._slice(iou)[0]

    def mean_pr_curve(self, iou: float) -> Optional[np.ndarray]:
        """Precision (R,) at each of rec_thrs, averaged over the categories with ground truth; None if none has."""
        p = self.category_pr_curves(iou)  # (R, K)
        defined = (p > -1).all(axis=0)  # (K,) a category is either all -1 (no GT) or all >= 0
        return p[:, defined].mean(axis=1) if defined.any() else None

    def metrics(self) -> dict:
        """The documented result dict: STAT_KEYS, EXTRA_IOU_KEYS (fractions, None where undefined), per_category."""
        out = {key: _defined(value) for key, value in zip(STAT_KEYS, self.stats.tolist())}
        out.update({key: self.ap_at_iou(iou) for key, iou in EXTRA_IOU_KEYS.items()})
        out["per_category"] = self.per_category_ap()
        return out


def _defined(value: float) -> Optional[float]:
    """pycocotools writes -1 for "no ground truth in this range"; that is None here, not a fraction."""
    return None if value <= -1 else float(value)


def _mean_defined(p: np.ndarray) -> Optional[float]:
    """Mean of the entries > -1, as pycocotools' summarize() does; None if there are none."""
    p = p[p > -1]
    return float(p.mean()) if p.size else None


def _unique_names(cat_ids: Sequence[int], cat_names: Sequence[str]) -> list:
    counts = {}
    for name in cat_names:
        counts[name] = counts.get(name, 0) + 1
    return [name if counts[name] == 1 else f"{name} (id {cid})" for cid, name in zip(cat_ids, cat_names)]


# ---------------------------------------------------------------------------------------------
# Reading and checking the inputs


@contextmanager
def _gc_paused():
    """Pause the cyclic garbage collector while half a million small dicts are built.

    Python's collector is triggered by container allocations and re-scans every live dict each
    time; measured on 500k results: orjson.loads 1.5 s with it running, 0.6 s paused.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def read_json(path: PathLike):
    """Parse a JSON file; a malformed one is a ValueError naming it.

    orjson is tried first (faster than json); it refuses the NaN/Infinity tokens that Python's
    json writes, so such a file is read again with json, to let the checks name the bad entry.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: file not found") from None
    except OSError as e:
        raise ValueError(f"{path}: cannot be read ({e.strerror})") from None
    with _gc_paused():
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError:
            pass  # perhaps NaN tokens: let json try
        try:
            return json.loads(data)
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not a valid JSON file ({e})") from None


def _column(records: list, key: str, describe) -> list:
    """[r[key] for r in records], with a ValueError naming the first record that is not a dict or lacks the key."""
    try:
        return list(map(itemgetter(key), records))
    except (KeyError, TypeError, IndexError):
        for i, r in enumerate(records):
            if not isinstance(r, dict):
                raise ValueError(f"{describe(i)} is not a JSON object: {r!r:.80}") from None
            if key not in r:
                raise ValueError(f"{describe(i)} has no '{key}'") from None
        raise


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and -(2 ** 63) <= v < 2 ** 63


def _is_number(v) -> bool:
    """An int or float that float64 can hold (inf/nan are numbers here; the finiteness check names them)."""
    return isinstance(v, float) or (isinstance(v, int) and not isinstance(v, bool) and abs(v) < 2 ** 1023)


def _int_array(values: list, key: str, describe) -> np.ndarray:
    """(N,) int64 from a list that must hold only integers."""
    arr = np.array(values) if values else np.zeros(0, dtype=np.int64)
    if arr.ndim != 1 or arr.dtype.kind != "i":
        i = next(i for i, v in enumerate(values) if not _is_int(v))
        raise ValueError(f"{describe(i)}: '{key}' must be a 64-bit integer, got {values[i]!r:.80}")
    return arr.astype(np.int64, copy=False)


def _float_array(values: list, key: str, describe, width: Optional[int] = None) -> np.ndarray:
    """(N,) or (N, width) float64 from a list of numbers, or of `width`-long lists of numbers; all finite.

    Lists of lists are read with one flat np.fromiter (measured 0.08 s for 500k boxes, against 0.17 s
    for np.array's nested type inference); like float(), that also takes numeric strings.
    """
    n = len(values)
    try:
        if width is None:
            arr = np.array(values) if n else np.zeros(0)
            ok = arr.ndim == 1 and arr.dtype.kind in "iuf"
        else:
            ok = bool((np.fromiter(map(len, values), dtype=np.int64, count=n) == width).all())
            arr = np.fromiter(chain.from_iterable(values), dtype=np.float64, count=n * width).reshape(n, width)
    except (TypeError, ValueError, OverflowError):  # an entry that is not a list, or not a number
        ok = False
    if not ok:
        for i, v in enumerate(values):
            good = _is_number(v) if width is None else (
                isinstance(v, (list, tuple)) and len(v) == width and all(_is_number(x) for x in v))
            if not good:
                what = "a number" if width is None else f"a list of {width} numbers"
                raise ValueError(f"{describe(i)}: '{key}' must be {what}, got {v!r:.80}")
        arr = np.array(values, dtype=np.float64)  # all numbers, some too big for int64
    arr = arr.astype(np.float64, copy=False)
    bad = ~np.isfinite(arr) if width is None else ~np.isfinite(arr).all(axis=1)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{describe(i)}: '{key}' is not finite: {values[i]!r}")
    return arr


def _check_boxes(boxes: np.ndarray, key: str, describe) -> None:
    """xywh boxes (N, 4) must have width and height >= 0."""
    bad = (boxes[:, 2:] < 0).any(axis=1)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{describe(i)}: '{key}' [x, y, w, h] has a negative size: {boxes[i].tolist()}")


def _check_unique(ids: np.ndarray, what: str, source: str) -> None:
    uniq, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        raise ValueError(f"{source}: duplicate {what} ids {_some(uniq[counts > 1])}")


def _some(ids: np.ndarray, n: int = 20) -> str:
    """'[1, 2, 3]' or '[1, 2, ... (and 40 more)]'."""
    ids = ids.tolist()
    more = f", ... (and {len(ids) - n} more)" if len(ids) > n else ""
    return "[" + ", ".join(map(str, ids[:n])) + more + "]"


def _unknown(ids: np.ndarray, known: np.ndarray) -> np.ndarray:
    return np.setdiff1d(np.unique(ids), known)


def load_ground_truth(gt: Union[PathLike, dict]) -> dict:
    """A COCO ground truth dict (read from a path if given one), checked for what evaluation relies on.

    images need unique int ids; categories unique int ids and a name; annotations a unique int id,
    an image_id and category_id that exist, a finite bbox [x, y, w, h] with w, h >= 0, and an area
    (COCO's size ranges use it; pycocotools fails without it). iscrowd is optional (0).
    The dict is not modified.
    """
    source = str(gt) if isinstance(gt, (str, Path)) else "ground truth"
    data = read_json(gt) if isinstance(gt, (str, Path)) else gt
    if not isinstance(data, dict):
        raise ValueError(f"{source}: expected a COCO object with 'images', 'annotations', 'categories'")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise ValueError(f"{source}: '{key}' must be a list")
    images, anns, cats = data["images"], data["annotations"], data["categories"]

    def image(i):
        return f"{source}: image {i}"

    def category(i):
        return f"{source}: category {i}"

    def where(i):
        ann_id = anns[i].get("id") if isinstance(anns[i], dict) else None
        return f"{source}: annotation {i}" + (f" (id {ann_id})" if ann_id is not None else "")

    image_ids = _int_array(_column(images, "id", image), "id", image)
    _check_unique(image_ids, "image", source)
    cat_ids = _int_array(_column(cats, "id", category), "id", category)
    _check_unique(cat_ids, "category", source)
    for i, name in enumerate(_column(cats, "name", category)):
        if not isinstance(name, str):
            raise ValueError(f"{category(i)}: 'name' must be a string, got {name!r}")
    ann_ids = _int_array(_column(anns, "id", where), "id", where)
    _check_unique(ann_ids, "annotation", source)
    for key, known, listed_in in (("image_id", image_ids, "images"), ("category_id", cat_ids, "categories")):
        unknown = _unknown(_int_array(_column(anns, key, where), key, where), known)
        if unknown.size:
            raise ValueError(f"{source}: annotations name {unknown.size} {key}s absent from "
                             f"'{listed_in}': {_some(unknown)}")
    boxes = _float_array(_column(anns, "bbox", where), "bbox", where, width=4)
    _check_boxes(boxes, "bbox", where)
    areas = _float_array(_column(anns, "area", where), "area", where)
    crowd = [a.get("iscrowd", 0) for a in anns]
    bad = next((i for i, c in enumerate(crowd) if c not in (0, 1)), None)
    if bad is not None:
        raise ValueError(f"{where(bad)}: 'iscrowd' must be 0 or 1, got {crowd[bad]!r}")
    if (areas < 0).any():
        raise ValueError(f"{where(int(np.flatnonzero(areas < 0)[0]))}: 'area' is negative")
    return data


def ground_truth_subset(gt: Union[PathLike, dict], image_ids: Sequence[int]) -> dict:
    """The checked ground truth (`load_ground_truth`) of the images `image_ids` only: their `images`
    entries and annotations, with every category.

    What a model run on part of a dataset is scored against: images left out (data.skip_unreadable
    drops unreadable ones) would otherwise count their objects as misses. Returns `gt`'s own dict
    when `image_ids` are all its images; an id absent from `gt` is a ValueError.
    """
    source = str(gt) if isinstance(gt, (str, Path)) else "ground truth"
    data = load_ground_truth(gt)
    wanted = {int(i) for i in image_ids}
    known = {int(image["id"]) for image in data["images"]}
    if wanted - known:
        raise ValueError(f"{source}: {len(wanted - known)} image ids are absent from its images: "
                         f"{_some(np.array(sorted(wanted - known)))}")
    if wanted == known:
        return data
    return {**data, "images": [image for image in data["images"] if int(image["id"]) in wanted],
            "annotations": [a for a in data["annotations"] if int(a["image_id"]) in wanted]}


def check_gt_segmentations(gt: dict, source: str = "ground truth") -> None:
    """Every annotation of a checked GT dict has a `segmentation` COCOeval can read: a non-empty list of
    polygons (flat lists of at least 6 numbers, even in length) or an RLE whose size is its image's."""
    sizes = {im["id"]: [im.get("height"), im.get("width")] for im in gt["images"]}
    for i, ann in enumerate(gt["annotations"]):
        where = f"{source}: annotation {i} (id {ann['id']})"
        seg = ann.get("segmentation")
        if isinstance(seg, list):
            if not seg or not all(isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0 for p in seg):
                raise ValueError(f"{where}: 'segmentation' must be polygons, each a flat list [x1, y1, x2, y2, ...] "
                                 f"of at least 3 points, got {seg!r:.80}")
        elif isinstance(seg, dict) and "counts" in seg and "size" in seg:
            if list(seg["size"]) != sizes[ann["image_id"]]:
                raise ValueError(f"{where}: RLE size {seg['size']} differs from image {ann['image_id']}'s "
                                 f"[height, width] {sizes[ann['image_id']]}")
        else:
            raise ValueError(f"{where}: no 'segmentation' (polygons or RLE), which iou_type 'segm' needs")


def load_results(results: Union[PathLike, list], gt: dict, gt_name: str = "the ground truth", *,
                 iou_type: str = "bbox", categories: bool = True):
    """COCO detection results (a path to a JSON list, or the list) -> (N, 7) float64 array.

    Each result is {"image_id": int, "category_id": int, "bbox": [x, y, w, h], "score": float}.
    iou_type "segm": each result has "segmentation" (compressed RLE of its image's size) instead of
    or besides "bbox"; returns (the array, and the list of RLEs); the array's box columns are then 0,
    not read: the backends compute each box from its mask.
    categories=False (proposals): category_id is not read; the rows get the first GT category's id.
    Rows are [image_id, x, y, w, h, score, category_id], the layout pycocotools' loadRes takes.
    Errors (ValueError) name the file and the index of the first bad result, or list the image
    and category ids that `gt` does not have. Extraction is one vectorized pass per field;
    the per-result Python loops run only to find the culprit once a check has failed.
    """
    source = str(results) if isinstance(results, (str, Path)) else "results"
    records = read_json(results) if isinstance(results, (str, Path)) else results
    if not isinstance(records, list):
        raise ValueError(f"{source}: expected a JSON list of results "
                         f"{{image_id, category_id, bbox, score}}, got {type(records).__name__}")

    def where(i):
        return f"{source}: result {i}"

    if iou_type not in IOU_TYPES:
        raise ValueError(f"unknown iou_type {iou_type!r}; choose one of {', '.join(IOU_TYPES)}")
    rles = None
    with _gc_paused():
        image_ids = _int_array(_column(records, "image_id", where), "image_id", where)
        if categories:
            cat_ids = _int_array(_column(records, "category_id", where), "category_id", where)
        else:
            first = min((c["id"] for c in gt["categories"]), default=1)
            cat_ids = np.full(len(records), first, dtype=np.int64)
        if iou_type == "segm":  # the backends take each result's box and area from its mask
            rles = _segmentations(_column(records, "segmentation", where), image_ids, gt, where)
            boxes = np.zeros((len(rles), 4))
        else:
            boxes = _float_array(_column(records, "bbox", where), "bbox", where, width=4)  # (N, 4) xywh
        scores = _float_array(_column(records, "score", where), "score", where)
    _check_boxes(boxes, "bbox", where)
    # The backends take a float64 array, exact for integers up to 2**53.
    too_big = np.abs(np.concatenate([image_ids, cat_ids])) >= 2 ** 53
    if too_big.any():
        raise ValueError(f"{source}: ids beyond 2**53 are not supported: "
                         f"{_some(np.concatenate([image_ids, cat_ids])[too_big])}")
    unknown = _unknown(image_ids, np.array([im["id"] for im in gt["images"]], dtype=np.int64))
    if unknown.size:
        raise ValueError(f"{source}: {unknown.size} image ids are absent from {gt_name}: {_some(unknown)}")
    unknown = _unknown(cat_ids, np.array([c["id"] for c in gt["categories"]], dtype=np.int64))
    if unknown.size:
        raise ValueError(f"{source}: {unknown.size} category ids are absent from {gt_name} "
                         f"(COCOeval would silently drop them): {_some(unknown)}")
    dets = np.concatenate([image_ids[:, None], boxes, scores[:, None], cat_ids[:, None]], axis=1).astype(np.float64)
    return dets if rles is None else (dets, rles)


def _segmentations(values: list, image_ids: np.ndarray, gt: dict, describe) -> list:
    """Results' segmentations, checked: each a compressed RLE {"size": [h, w], "counts": str} of its image's
    [height, width] (an unknown image id is left for the caller's check to name). Returned as given."""
    sizes = {im["id"]: [im.get("height"), im.get("width")] for im in gt["images"]}
    for i, (seg, image_id) in enumerate(zip(values, image_ids.tolist())):
        try:
            ok = isinstance(seg["counts"], (str, bytes)) and seg["size"] == sizes.get(image_id, seg["size"])
        except (KeyError, TypeError):
            ok = False
        if not ok:
            size = seg.get("size") if isinstance(seg, dict) else None
            if isinstance(seg, dict) and isinstance(seg.get("counts"), (str, bytes)) and isinstance(size, list):
                raise ValueError(f"{describe(i)}: RLE size {size} differs from image {image_id}'s "
                                 f"[height, width] {sizes[image_id]}")
            raise ValueError(f"{describe(i)}: 'segmentation' must be a compressed RLE "
                             f"{{\"size\": [h, w], \"counts\": str}}, got {seg!r:.80}")
    return values


# ---------------------------------------------------------------------------------------------
# Running a backend


def _import_backend(backend: str):
    if backend not in BACKENDS:
        raise ValueError(f"unknown COCO evaluation backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    module, package = BACKENDS[backend]
    try:
        return importlib.import_module(module)
    except ImportError:
        raise BackendNotInstalled(f"the '{backend}' evaluation backend needs the '{package}' package: "
                                  f"pip install {package}") from None


def _copy_for_python_backend(gt: dict) -> dict:
    """Copies of the GT annotations, with iscrowd 0 where it is missing (as hotcoco reads it).

    pycocotools and faster-coco-eval write an 'ignore' key into each GT annotation, and
    pycocotools' computeIoU needs 'iscrowd' (its evaluate() already treats a missing one as 0).
    """
    return {**gt, "annotations": [{"iscrowd": 0, **a} for a in gt["annotations"]]}


def _result_dicts(dets: np.ndarray, rles: Optional[list] = None) -> list:
    """(N, 7) rows -> result dicts of plain Python numbers, for the backends written in Python.

    Their loadRes also takes the array, but then indexes it one numpy scalar at a time
    (measured on 500k detections: faster-coco-eval's loadRes 1.4 s CPU from the array, 1.1 s from these).
    """
    if rles is not None:  # segm: the backends compute each result's box and area from its mask
        return [{"image_id": int(row[0]), "segmentation": rle, "score": row[5], "category_id": int(row[6])}
                for row, rle in zip(dets.tolist(), rles)]
    return [{"image_id": int(row[0]), "bbox": row[1:5], "score": row[5], "category_id": int(row[6])}
            for row in dets.tolist()]


def _configure(ev, proposals: bool) -> None:
    """Proposals: category ids ignored (useCats 0) and maxDets 10, 100, 1000, so that stats[6:12] are
    AR@10, AR@100, AR@1000 and AR small/medium/large at 1000."""
    if proposals:
        ev.params.useCats = 0
        ev.params.maxDets = list(PROPOSAL_MAX_DETS)


def _run_hotcoco(gt: dict, dets: np.ndarray, rles: Optional[list] = None, proposals: bool = False):
    hotcoco = _import_backend("hotcoco")
    coco_gt = hotcoco.COCO()
    coco_gt.dataset = gt  # copied into Rust; indexed on assignment
    if rles is None:
        ev = hotcoco.COCOeval(coco_gt, coco_gt.loadRes(dets), "bbox")
    else:
        ev = hotcoco.COCOeval(coco_gt, coco_gt.loadRes(_result_dicts(dets, rles)), "segm")
    _configure(ev, proposals)
    ev.evaluate()
    ev.accumulate()
    ev.summary_lines()  # fills ev.stats without printing
    return ev


def _run_faster_coco_eval(gt: dict, dets: np.ndarray, rles: Optional[list] = None, proposals: bool = False):
    fce = _import_backend("faster-coco-eval")
    coco_gt = fce.COCO(_copy_for_python_backend(gt))
    ev = fce.COCOeval_faster(coco_gt, coco_gt.loadRes(_result_dicts(dets, rles)), "bbox" if rles is None else "segm")
    _configure(ev, proposals)
    ev.evaluate()
    ev.accumulate()
    ev.summarize()  # prints through a logger at a level that is off by default
    return ev


def _run_pycocotools(gt: dict, dets: np.ndarray, rles: Optional[list] = None, proposals: bool = False):
    _import_backend("pycocotools")
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with redirect_stdout(io.StringIO()):  # pycocotools prints progress and the summary
        coco_gt = COCO()
        coco_gt.dataset = _copy_for_python_backend(gt)
        coco_gt.createIndex()
        if len(dets):
            coco_dt = coco_gt.loadRes(_result_dicts(dets, rles))
        else:  # loadRes fails on an empty list: build the empty results set it would have made
            coco_dt = COCO()
            coco_dt.dataset = {"images": gt["images"], "categories": gt["categories"], "annotations": []}
            coco_dt.createIndex()
        ev = COCOeval(coco_gt, coco_dt, "bbox" if rles is None else "segm")
        _configure(ev, proposals)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev


_RUNNERS = {"hotcoco": _run_hotcoco, "faster-coco-eval": _run_faster_coco_eval, "pycocotools": _run_pycocotools}


def _run(gt, results, backend: str, iou_type: str, proposals: bool) -> tuple:
    """Check the inputs and run the backend's COCOeval; returns (the checked GT dict, the evaluator)."""
    if iou_type not in IOU_TYPES:
        raise ValueError(f"unknown iou_type {iou_type!r}; choose one of {', '.join(IOU_TYPES)}")
    _import_backend(backend)  # fail on a missing backend before reading big files
    gt_name = str(gt) if isinstance(gt, (str, Path)) else "the ground truth"
    gt = load_ground_truth(gt)
    if iou_type == "segm":
        check_gt_segmentations(gt, gt_name)
        dets, rles = load_results(results, gt, gt_name, iou_type="segm", categories=not proposals)
    else:
        dets, rles = load_results(results, gt, gt_name, categories=not proposals), None  # (N, 7)
    with _gc_paused():  # the Python backends build a dict per detection (measured: faster-coco-eval -20% CPU)
        return gt, _RUNNERS[backend](gt, dets, rles, proposals)


def run_coco_eval(gt: Union[PathLike, dict], results: Union[PathLike, list],
                  backend: str = DEFAULT_BACKEND, iou_type: str = "bbox") -> CocoEvaluation:
    """Check the inputs, run COCOeval (iou_type "bbox" or "segm") with `backend`, return what it accumulated.

    gt: a COCO ground truth file or dict; results: a COCO results file or list (may be empty:
    every metric with ground truth is then 0). Neither input is modified.
    """
    gt, ev = _run(gt, results, backend, iou_type, proposals=False)
    return _evaluation(gt, ev)


def _evaluation(gt: dict, ev) -> CocoEvaluation:
    """What an evaluated and accumulated COCOeval (any backend) holds, as a CocoEvaluation."""
    params = ev.params
    names = {c["id"]: c["name"] for c in gt["categories"]}
    cat_ids = [int(c) for c in params.catIds]
    return CocoEvaluation(
        stats=np.asarray(ev.stats, dtype=np.float64),
        precision=np.asarray(ev.eval["precision"], dtype=np.float64),
        recall=np.asarray(ev.eval["recall"], dtype=np.float64),
        iou_thrs=np.asarray(params.iouThrs, dtype=np.float64),
        rec_thrs=np.asarray(params.recThrs, dtype=np.float64),
        cat_ids=cat_ids,
        cat_names=[names[c] for c in cat_ids],
        area_labels=list(params.areaRngLbl),
        max_dets=[int(m) for m in params.maxDets],
    )


def evaluate_coco(gt: Union[PathLike, dict], results: Union[PathLike, list],
                  backend: str = DEFAULT_BACKEND, iou_type: str = "bbox") -> dict:
    """COCO bbox (or, iou_type="segm", mask) metrics of `results` against `gt`.

    Returns {AP, AP50, AP75, APs, APm, APl, AR1, AR10, AR100, ARs, ARm, ARl, AP60, AP70, AP80, AP90:
    fraction in [0, 1], or None where there is no ground truth (pycocotools' -1);
    per_category: {category name: AP or None}}.

    Example: `evaluate_coco("instances_val2017.json", "detections.json")["AP50"]`.
    """
    return run_coco_eval(gt, results, backend=backend, iou_type=iou_type).metrics()


def proposal_recall(gt: Union[PathLike, dict], results: Union[PathLike, list], iou_type: str = "bbox",
                    backend: str = DEFAULT_BACKEND) -> dict:
    """Average recall of class-agnostic proposals (boxes, or iou_type="segm": masks) against `gt`.

    results: COCO results with a score and a bbox (or segmentation); category_id, if present, is
    ignored, and every ground truth object counts whatever its category (COCOeval useCats=0).
    Per image the best 1000 proposals by score are kept; equal scores keep the results' order
    (pycocotools with useCats=0 would order them by category id first: the numbers are its own on
    the results with one category id).
    Returns {PROPOSAL_KEYS: fraction, or None where the ground truth has no object of that size}:
    AR@10, AR@100, AR@1000 (AR: recall averaged over IoU .50:.05:.95, as COCOeval computes it
    with maxDets [10, 100, 1000]); ARs/ARm/ARl@1000 by object area (< 32^2, 32^2-96^2, > 96^2);
    AUC, AUCs, AUCm, AUCl: AR averaged over the proposal counts 1, 2, ..., 1000 (Lin's thesis,
    Tables 3.2-3.3).

    Example: `proposal_recall("instances_val2017.json", "proposals.json", "segm")["AR@100"]`.
    """
    if backend not in PROPOSAL_BACKENDS:
        raise ValueError(f"proposal recall needs COCOeval's per-image matches, which backend {backend!r} does not "
                         f"keep; choose one of {', '.join(PROPOSAL_BACKENDS)}")
    _, ev = _run(gt, results, backend, iou_type, proposals=True)
    out = {key: _defined(value) for key, value in zip(PROPOSAL_KEYS[:6], np.asarray(ev.stats)[6:12].tolist())}
    curves = recall_by_count(ev)  # {area label: (1000,) AR at 1..1000 proposals, or None}
    for key, area in zip(PROPOSAL_KEYS[6:], ("all", "small", "medium", "large")):
        out[key] = None if curves[area] is None else float(curves[area].mean())
    return out


def recall_by_count(ev) -> dict:
    """{area label: (M,) AR at 1..M proposals per image, M = maxDets[-1], or None where no GT counts}.

    From an evaluated (useCats=0) COCOeval's per-image results: recall at m proposals is what
    COCOeval's accumulate() gives with maxDets m, the matched, non-ignored detections among each
    image's m best over the non-ignored ground truth, but read for every m in one pass (accumulate()
    would sort every detection of the dataset once per m).
    """
    max_det = int(ev.params.maxDets[-1])
    labels = list(ev.params.areaRngLbl)
    ranges = [tuple(r) for r in ev.params.areaRng]
    num_thrs = len(ev.params.iouThrs)
    hits = {label: np.zeros((num_thrs, max_det)) for label in labels}  # (T, M) true positives at each rank
    num_gt = dict.fromkeys(labels, 0)
    for e in ev.evalImgs:
        if e is None or int(e["maxDet"]) != max_det:
            continue
        label = labels[ranges.index(tuple(e["aRng"]))]
        num_gt[label] += int((~np.asarray(e["gtIgnore"], dtype=bool)).sum())
        matches = np.asarray(e["dtMatches"]).reshape(num_thrs, -1)[:, :max_det]  # (T, D) GT id or 0, best first
        if matches.shape[1]:
            ignored = np.asarray(e["dtIgnore"], dtype=bool).reshape(num_thrs, -1)[:, :max_det]
            hits[label][:, :matches.shape[1]] += (matches != 0) & ~ignored
    return {label: np.cumsum(hits[label], axis=1).mean(axis=0) / num_gt[label] if num_gt[label] else None
            for label in labels}


def detections_to_coco_results(detections: Sequence[Mapping], image_ids: Sequence[int],
                               label_to_cat_id: Union[Sequence[int], Mapping[int, int]]) -> list:
    """Model outputs -> COCO results list.

    detections: per image {"boxes": (D, 4) xyxy absolute pixels of the original image, "scores": (D,),
    "labels": (D,) contiguous class indices} (torch tensors or numpy arrays); image_ids: the COCO
    image id of each; label_to_cat_id: label -> COCO category id (a sequence indexed by label, e.g.
    [c["id"] for c in checkpoint["categories"]], or a dict).
    Returns [{"image_id", "category_id", "bbox": [x, y, w, h], "score"}], image by image in input order;
    where a detection dict has "masks" ((D, H, W) bit masks in the original image's pixels), each entry
    also has "segmentation", its mask as compressed RLE (for iou_type "segm").
    Values keep full precision: float32 model outputs are widened to float64 before w = x2 - x1,
    which is then exact, so x2 = x + w recovers the model's box bit for bit.
    """
    if len(detections) != len(image_ids):
        raise ValueError(f"{len(detections)} detection dicts but {len(image_ids)} image ids")
    if isinstance(label_to_cat_id, Mapping):
        lookup = dict(label_to_cat_id)
    else:
        lookup = dict(enumerate(label_to_cat_id))
    out = []
    for det, image_id in zip(detections, image_ids):
        boxes = _as_numpy(det["boxes"]).astype(np.float64).reshape(-1, 4)  # (D, 4) xyxy
        scores = _as_numpy(det["scores"]).astype(np.float64).reshape(-1)  # (D,)
        labels = _as_numpy(det["labels"]).astype(np.int64).reshape(-1)  # (D,)
        if not len(boxes) == len(scores) == len(labels):
            raise ValueError(f"image id {image_id}: {len(boxes)} boxes, {len(scores)} scores, {len(labels)} labels")
        unknown = sorted(set(labels.tolist()) - set(lookup))
        if unknown:
            raise ValueError(f"image id {image_id}: labels {unknown} have no category id in label_to_cat_id")
        xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)  # (D, 4)
        cats = [lookup[label] for label in labels.tolist()]
        entries = [{"image_id": int(image_id), "category_id": int(c), "bbox": b, "score": s}
                   for c, b, s in zip(cats, xywh.tolist(), scores.tolist())]
        if det.get("masks") is not None:  # a mask detector: each result also carries its mask as RLE
            from .ops.masks import encode_masks

            rles = encode_masks(det["masks"])
            if len(rles) != len(entries):
                raise ValueError(f"image id {image_id}: {len(rles)} masks for {len(entries)} boxes")
            for entry, rle in zip(entries, rles):
                entry["segmentation"] = rle
        out.extend(entries)
    return out


def _as_numpy(x) -> np.ndarray:
    """torch tensor (any device) or array-like -> numpy array."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


# ---------------------------------------------------------------------------------------------
# Text output


def _fmt(value: Optional[float]) -> str:
    return "  n/a" if value is None else f"{value:.3f}"


def format_summary(metrics: dict) -> str:
    """pycocotools' 12 summary lines (n/a where it prints -1), then AP at IoU .60/.70/.80/.90."""
    lines = []
    for key, (title, short, iou, area, max_dets) in zip(STAT_KEYS, _STAT_LINES):
        lines.append(f" {title:<18s} ({short}) @[ IoU={iou:<9s} | area={area:>6s} | maxDets={max_dets:>3d} ] = "
                     f"{_fmt(metrics[key])}")
    for key, iou in EXTRA_IOU_KEYS.items():
        lines.append(f" {'Average Precision':<18s} (AP) @[ IoU={iou:<9.2f} | area={'all':>6s} | maxDets={100:>3d} ] = "
                     f"{_fmt(metrics[key])}")
    return "\n".join(lines)


def format_proposals(metrics: dict) -> str:
    """proposal_recall's numbers, one a line, in COCOeval's summary style (n/a where undefined)."""
    areas = ("all", "all", "all", "small", "medium", "large", "all", "small", "medium", "large")
    counts = ("10", "100", "1000", "1000", "1000", "1000") + ("1..1000",) * 4
    lines = []
    for key, area, count in zip(PROPOSAL_KEYS, areas, counts):
        title = "Area under AR curve" if key.startswith("AUC") else "Average Recall"
        lines.append(f" {title:<19s} ({key:>8s}) @[ IoU=0.50:0.95 | area={area:>6s} | proposals={count:>7s} ] = "
                     f"{_fmt(metrics[key])}")
    return "\n".join(lines)


def format_per_category(per_category: dict, columns: int = 3) -> str:
    """A table of per-category AP (in %, '-' for a category without ground truth), `columns` pairs wide."""
    cells = [(name, "-" if ap is None else f"{100 * ap:.1f}") for name, ap in per_category.items()]
    if not cells:
        return "(no categories)"
    width = max(len("category"), *(len(name) for name, _ in cells))
    rows = (len(cells) + columns - 1) // columns
    header = " | ".join(f"{'category':<{width}s} {'AP':>5s}" for _ in range(min(columns, len(cells))))
    lines = [header, "-" * len(header)]
    for r in range(rows):
        row = cells[r::rows]
        lines.append(" | ".join(f"{name:<{width}s} {ap:>5s}" for name, ap in row))
    return "\n".join(lines)
