"""Check a COCO instances JSON and its image folder before training; report every problem at once.

`validate_coco` never stops at the first problem: it returns a `ValidationReport` whose `errors`
and `warnings` each name the file and the image id or annotation id, plus the cleaned data the
dataset trains on. `report.raise_if_errors()` raises one `DataValidationError` listing them all.

Errors (training cannot start): malformed JSON (line, column), missing or mistyped keys, duplicate
image / annotation / category ids, an annotation whose image id or category id is unknown, non-finite
box coordinates, a missing image file, an unreadable image, and an image whose displayed (EXIF-oriented)
size differs from the JSON's height and width.

Warnings (the box is repaired or dropped): width or height <= 0 (dropped; an error with strict=True),
a box partly outside its image (clipped to it), a box wholly outside (dropped).

Segmentations (`masks=True`, what `data.masks: true` and `retinanet check-data --masks` ask for),
errors: a missing or malformed `segmentation`, a polygon with fewer than 3 points or an odd number of
coordinates, polygon coordinates more than MASK_MARGIN (1) pixel outside the image, an RLE whose size
differs from the image's, RLE counts that do not add up to height * width (for compressed RLE: a string
that is not the canonical encoding of a height x width mask, which is what pycocotools and hotcoco
write), and an empty mask. Warning: the decoded mask's box differs from `bbox` by more than
MASK_BOX_TOLERANCE (2) pixels at any edge.

Image checks, `check_images`: "exists" only looks for the files; "header" also reads each header
for the displayed size; "decode" decodes every pixel, which finds truncated files, over every core,
and remembers each file's result in a cache beside the JSON (retinanet/data/image_checks.py), so
that only new or changed files are decoded again. An image that exists but cannot be read is also
listed in `report.unreadable`; `report.leave_out_unreadable()` drops those images instead
(training's `data.skip_unreadable`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .image_checks import ReadStats, read_images
from .images import PathLike

CHECK_LEVELS = ("exists", "header", "decode")
MASK_MARGIN = 1.0  # px: polygon coordinates may lie this far outside the image (annotation tools round)
MASK_BOX_TOLERANCE = 2.0  # px: largest accepted difference between an edge of the mask's box and of bbox


class DataValidationError(ValueError):
    """Every error found in one dataset, one per line."""

    def __init__(self, json_path: str, errors: list, hint: str = ""):
        lines = "\n".join(f"  - {e}" for e in errors)
        hint = f"\n({hint})" if hint else ""
        super().__init__(f"{json_path}: {len(errors)} problem(s) in the dataset:\n{lines}{hint}")
        self.errors = list(errors)


@dataclass
class ValidationReport:
    """The outcome of `validate_coco`.

    images: valid image records in JSON order, each {"id", "file_name", "height", "width"}.
    annotations: image id -> kept annotations, each {"id", "category_id", "bbox": [x1, y1, x2, y2]
        (xyxy, absolute pixels of the displayed image, clipped to it), "iscrowd": bool}; with
        masks=True also "segmentation": the checked mask as a compressed RLE (`ops.masks.segmentation_to_rle`).
    categories: {"id", "name"} sorted by id.
    unreadable: images whose file exists but cannot be read, each {"id", "file_name", "error"} (the
        message, also in `errors`).
    read_stats: how the image files were read (decoded now or taken from the cache).
    """

    json_path: str
    image_dir: str
    errors: list = field(default_factory=list)
    warnings: list = field(default_factory=list)
    images: list = field(default_factory=list)
    annotations: dict = field(default_factory=dict)
    categories: list = field(default_factory=list)
    unreadable: list = field(default_factory=list)
    read_stats: ReadStats = field(default_factory=ReadStats)

    @property
    def ok(self) -> bool:
        return not self.errors

    def summary(self) -> str:
        kept = sum(len(a) for a in self.annotations.values())
        crowd = sum(a["iscrowd"] for anns in self.annotations.values() for a in anns)
        return (f"{self.json_path}: {len(self.images)} images, {kept} annotations kept ({crowd} crowd), "
                f"{len(self.categories)} categories; {len(self.errors)} errors, {len(self.warnings)} warnings")

    def format(self, max_lines: int = 0) -> str:
        """Errors, then warnings, then the summary; `max_lines` > 0 shows at most that many of each."""
        out = []
        for kind, items in (("error", self.errors), ("warning", self.warnings)):
            shown = items[:max_lines] if max_lines > 0 else items
            out += [f"{kind}: {m}" for m in shown]
            if len(shown) < len(items):
                out.append(f"... and {len(items) - len(shown)} more {kind}s (retinanet check-data lists them all)")
        out.append(self.summary())
        return "\n".join(out)

    def raise_if_errors(self) -> None:
        if self.errors:
            raise DataValidationError(self.json_path, self.errors)

    def leave_out_unreadable(self) -> list:
        """Drop the unreadable images and their annotations; their errors become warnings.

        Returns the messages of the images left out (file, image id, reason), one per image.
        """
        left_out = [u["error"] for u in self.unreadable]
        dropped, messages = {u["id"] for u in self.unreadable}, set(left_out)
        self.errors = [e for e in self.errors if e not in messages]
        self.warnings += [f"{m}; left out" for m in left_out]
        self.images = [image for image in self.images if image["id"] not in dropped]
        self.annotations = {iid: anns for iid, anns in self.annotations.items() if iid not in dropped}
        self.unreadable = []
        return left_out


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _read_json(path: Path, report: ValidationReport):
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        report.errors.append(f"{path}: annotation file not found")
        return None
    except (OSError, UnicodeDecodeError) as e:
        report.errors.append(f"{path}: cannot read the annotation file: {e}")
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        report.errors.append(f"{path}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}")
        return None


def _section(data: dict, key: str, path: Path, report: ValidationReport):
    """The list under `key`, or None (with an error) when it is missing or not a list."""
    if key not in data:
        report.errors.append(f"{path}: missing top-level key '{key}'")
        return None
    if not isinstance(data[key], list):
        report.errors.append(f"{path}: '{key}' must be a list, got {type(data[key]).__name__}")
        return None
    return data[key]


def _missing(record, keys: tuple, where: str, path: Path, report: ValidationReport) -> bool:
    """Report a record that is not an object or lacks keys; True when anything is missing."""
    if not isinstance(record, dict):
        report.errors.append(f"{path}: {where}: expected an object, got {type(record).__name__}")
        return True
    absent = [k for k in keys if k not in record]
    if absent:
        report.errors.append(f"{path}: {where}: missing key(s) {', '.join(repr(k) for k in absent)}")
    return bool(absent)


def _check_categories(records: list, path: Path, report: ValidationReport) -> set:
    """Valid categories go to report.categories (sorted by id); returns every category id seen."""
    seen = {}
    for i, cat in enumerate(records):
        where = f"categories[{i}]"
        if _missing(cat, ("id", "name"), where, path, report):
            continue
        if not _is_int(cat["id"]):
            report.errors.append(f"{path}: {where}: category id must be an integer, got {cat['id']!r}")
            continue
        if cat["id"] in seen:
            report.errors.append(f"{path}: duplicate category id {cat['id']} "
                                 f"(categories[{seen[cat['id']]}] and categories[{i}])")
            continue
        seen[cat["id"]] = i
        if not isinstance(cat["name"], str):
            report.errors.append(f"{path}: category id {cat['id']}: name must be a string, got {cat['name']!r}")
            continue
        report.categories.append({"id": cat["id"], "name": cat["name"]})
    if not records:
        report.errors.append(f"{path}: 'categories' is empty; a detector needs at least one class")
    report.categories.sort(key=lambda c: c["id"])
    return set(seen)


def _positive_int(value) -> bool:
    return _is_number(value) and math.isfinite(value) and float(value).is_integer() and value > 0


def _new_id(record, i: int, section: str, kind: str, seen: dict, path: Path, report: ValidationReport):
    """The integer id of `section[i]`, recorded in `seen` (id -> index); None, with an error reported,
    when the id is missing, not an integer, or already used."""
    where = f"{section}[{i}]"
    if not isinstance(record, dict) or not _is_int(record.get("id")):
        if not _missing(record, ("id",), where, path, report):
            report.errors.append(f"{path}: {where}: {kind} id must be an integer, got {record['id']!r}")
        return None
    rid = record["id"]
    if rid in seen:
        report.errors.append(f"{path}: duplicate {kind} id {rid} ({section}[{seen[rid]}] and {section}[{i}])")
        return None
    seen[rid] = i
    return rid


def _check_image_records(records: list, path: Path, report: ValidationReport) -> tuple:
    """Valid image records -> report.images; returns (every image id seen, id -> valid record)."""
    seen, valid = {}, {}
    for i, img in enumerate(records):
        iid = _new_id(img, i, "images", "image", seen, path, report)
        if iid is None:
            continue
        where = f"image id {iid}"
        if _missing(img, ("file_name", "height", "width"), where, path, report):
            continue
        problems = []
        if not isinstance(img["file_name"], str) or not img["file_name"]:
            problems.append(f"file_name must be a non-empty string, got {img['file_name']!r}")
        for key in ("height", "width"):
            if not _positive_int(img[key]):
                problems.append(f"{key} must be a positive integer, got {img[key]!r}")
        if problems:
            report.errors += [f"{path}: {where}: {p}" for p in problems]
            continue
        record = {"id": iid, "file_name": img["file_name"], "height": int(img["height"]), "width": int(img["width"])}
        valid[iid] = record
        report.images.append(record)
    return set(seen), valid


def _is_number_list(value) -> bool:
    return isinstance(value, list) and all(_is_number(v) and math.isfinite(v) for v in value)


def check_segmentation(segmentation, height: int, width: int, bbox_xyxy: list) -> tuple:
    """Check one COCO segmentation against its image size and box.

    Returns (errors, warnings, rle): lists of messages (without the file and annotation id, which the
    caller adds), and the mask as a compressed RLE, or None when there are errors.
    """
    from pycocotools import mask as mask_api

    from ..ops.masks import segmentation_to_rle

    errors = []
    if isinstance(segmentation, list):
        if not segmentation:
            return ["empty segmentation (no polygons)"], [], None
        for k, polygon in enumerate(segmentation):
            if not _is_number_list(polygon):
                errors.append(f"polygon {k} must be a list of finite numbers [x1, y1, x2, y2, ...], "
                              f"got {polygon!r:.80}")
            elif len(polygon) % 2:
                errors.append(f"polygon {k} has an odd number of coordinates ({len(polygon)})")
            elif len(polygon) < 6:
                errors.append(f"polygon {k} has {len(polygon) // 2} point(s); a polygon needs at least 3")
            else:
                xs, ys = polygon[0::2], polygon[1::2]
                if (min(xs) < -MASK_MARGIN or max(xs) > width + MASK_MARGIN or min(ys) < -MASK_MARGIN
                        or max(ys) > height + MASK_MARGIN):
                    errors.append(f"polygon {k} reaches outside the {width}x{height} image by more than "
                                  f"{MASK_MARGIN:g} px: x in [{min(xs):g}, {max(xs):g}], "
                                  f"y in [{min(ys):g}, {max(ys):g}]")
    elif isinstance(segmentation, dict) and "size" in segmentation and "counts" in segmentation:
        size, counts = segmentation["size"], segmentation["counts"]
        if not (isinstance(size, list) and len(size) == 2 and all(_is_int(v) for v in size)):
            return [f"RLE size must be [height, width], got {size!r:.80}"], [], None
        if size != [height, width]:
            return [f"RLE size {size} (height, width) differs from the image's [{height}, {width}]"], [], None
        if isinstance(counts, list):
            if not all(_is_int(c) and c >= 0 for c in counts):
                errors.append("RLE counts must be non-negative integers")
            elif sum(counts) != height * width:
                errors.append(f"RLE counts add up to {sum(counts)}, not height * width = {height * width}")
        elif isinstance(counts, str):
            errors += _check_compressed_counts(counts, height, width)
        else:
            errors.append(f"RLE counts must be a list of integers or a string, got {type(counts).__name__}")
    else:
        return [f"segmentation must be a list of polygons or an RLE {{size, counts}}, "
                f"got {segmentation!r:.80}"], [], None
    if errors:
        return errors, [], None
    rle = segmentation_to_rle(segmentation, height, width)
    if mask_api.area(rle) == 0:
        return ["empty mask (no pixel inside the segmentation)"], [], None
    x, y, w, h = mask_api.toBbox(rle).tolist()
    mask_box = [x, y, x + w, y + h]
    gap = max(abs(a - b) for a, b in zip(mask_box, bbox_xyxy))
    warnings = []
    if gap > MASK_BOX_TOLERANCE:
        warnings.append(f"the mask's box [{x:g}, {y:g}, {w:g}, {h:g}] (x, y, w, h) differs from bbox by {gap:.1f} px "
                        f"(more than {MASK_BOX_TOLERANCE:g})")
    return [], warnings, rle


def _check_compressed_counts(counts: str, height: int, width: int) -> list:
    """A compressed RLE string must be the canonical encoding of a height x width mask.

    Run lengths are not decoded by hand: hotcoco's decoder (memory-safe on a bad string; pycocotools'
    C decoder does not check the runs against height * width, so runs that fall short leave pixels
    uninitialized and runs that go beyond write past the mask) decodes it and pycocotools encodes the
    result again; a string whose runs do not add up to height * width cannot come back unchanged.
    """
    import hotcoco
    from pycocotools import mask as mask_api

    try:
        bits = hotcoco.mask.decode({"size": [height, width], "counts": counts.encode("ascii")})
        again = mask_api.encode(np.asfortranarray(bits, dtype=np.uint8))["counts"].decode("ascii")
    except Exception as e:  # noqa: BLE001 - any failure of the decoder means a malformed string
        return [f"compressed RLE counts cannot be decoded ({e})"]
    if again != counts:
        return [f"compressed RLE counts do not describe exactly height * width = {height * width} pixels"]
    return []


def _check_annotations(records: list, path: Path, image_ids, images: dict, category_ids, strict: bool,
                       report: ValidationReport, masks: bool = False) -> None:
    """Valid annotations -> report.annotations (converted to xyxy and clipped), problems -> errors/warnings.

    image_ids / category_ids: every id the JSON declares (None when that section is missing, so that
    its absence is reported once rather than once per annotation).
    """
    seen = {}
    for i, ann in enumerate(records):
        aid = _new_id(ann, i, "annotations", "annotation", seen, path, report)
        if aid is None:
            continue
        where = f"annotation id {aid}"
        if _missing(ann, ("image_id", "category_id", "bbox"), where, path, report):
            continue
        iid, cid, bbox = ann["image_id"], ann["category_id"], ann["bbox"]
        where = f"annotation id {aid} (image id {iid})"
        problems = []
        if not _is_int(iid):
            problems.append(f"image_id must be an integer, got {iid!r}")
        elif image_ids is not None and iid not in image_ids:
            problems.append(f"unknown image id {iid}")
        if not _is_int(cid):
            problems.append(f"category_id must be an integer, got {cid!r}")
        elif category_ids is not None and cid not in category_ids:
            problems.append(f"unknown category id {cid}")
        crowd = ann.get("iscrowd", 0)
        if crowd not in (0, 1) or isinstance(crowd, float):
            problems.append(f"iscrowd must be 0 or 1, got {crowd!r}")
        if not isinstance(bbox, list) or len(bbox) != 4 or not all(_is_number(v) for v in bbox):
            problems.append(f"bbox must be a list of 4 numbers [x, y, width, height], got {bbox!r}")
        elif not all(math.isfinite(v) for v in bbox):
            problems.append(f"non-finite bbox coordinates {bbox!r}")
        if problems:
            report.errors += [f"{path}: {where}: {p}" for p in problems]
            continue
        x, y, w, h = (float(v) for v in bbox)
        if w <= 0 or h <= 0:
            sides = " and ".join(f"{name} {value} <= 0" for name, value in (("width", bbox[2]), ("height", bbox[3]))
                                 if value <= 0)
            message = f"{path}: {where}: box {bbox!r} has {sides}"
            if strict:
                report.errors.append(message)
            else:
                report.warnings.append(message + "; dropped")
            continue
        image = images.get(iid)
        if image is None:  # the image record itself has an error, already reported
            continue
        box = [x, y, x + w, y + h]  # COCO [x, y, w, h] -> xyxy, absolute pixels
        clipped = [min(max(box[0], 0.0), image["width"]), min(max(box[1], 0.0), image["height"]),
                   min(max(box[2], 0.0), image["width"]), min(max(box[3], 0.0), image["height"])]
        size = f"{image['width']}x{image['height']}"
        if clipped[2] <= clipped[0] or clipped[3] <= clipped[1]:
            report.warnings.append(f"{path}: {where}: box {bbox!r} lies wholly outside the {size} image; dropped")
            continue
        if clipped != box:
            report.warnings.append(f"{path}: {where}: box {bbox!r} extends outside the {size} image; clipped")
        kept = {"id": aid, "category_id": cid, "bbox": clipped, "iscrowd": bool(crowd)}
        if masks:
            if "segmentation" not in ann:
                report.errors.append(f"{path}: {where}: no 'segmentation' (masks were asked for)")
                continue
            errors, warnings, kept["segmentation"] = check_segmentation(ann["segmentation"], image["height"],
                                                                        image["width"], clipped)
            report.errors += [f"{path}: {where}: {m}" for m in errors]
            report.warnings += [f"{path}: {where}: {m}" for m in warnings]
            if errors:
                continue
        report.annotations[iid].append(kept)


def _check_files(image_dir: Path, check_images: str, report: ValidationReport, progress: bool,
                 workers: int, cache: bool) -> None:
    """Every valid image record's file exists (and, by level, reads, with the JSON's size)."""
    files = [image_dir / image["file_name"] for image in report.images]
    if check_images == "exists":
        for image, file in zip(report.images, files):
            if not file.is_file():
                report.errors.append(f"{file} (image id {image['id']}): image file not found")
        return
    results, report.read_stats = read_images(files, decode=check_images == "decode", workers=workers,
                                             json_path=report.json_path if cache else None, progress=progress)
    for image, file, result in zip(report.images, files, results):
        where = f"{file} (image id {image['id']})"
        if result.error is not None:
            report.errors.append(f"{where}: {result.error}")
            if result.error != "image file not found":
                report.unreadable.append({"id": image["id"], "file_name": image["file_name"],
                                          "error": report.errors[-1]})
            continue
        if (result.height, result.width) != (image["height"], image["width"]):
            report.errors.append(f"{where}: the JSON says height {image['height']}, width {image['width']}, but the "
                                 f"displayed image (EXIF orientation applied) is height {result.height}, "
                                 f"width {result.width}")


def validate_coco(json_path: PathLike, image_dir: PathLike, *, strict: bool = False, check_images: str = "header",
                  progress: bool = False, workers: int = 0, cache: bool = True, masks: bool = False) -> ValidationReport:
    """Check a COCO instances JSON and its images; every problem found goes into the returned report.

    json_path: the annotation file. image_dir: the folder the images' file_name entries are relative to.
    strict: boxes with width or height <= 0 are errors instead of being dropped with a warning.
    check_images: "exists" | "header" | "decode" (see the module docstring).
    progress: show a progress bar while reading images.
    masks: also check every annotation's `segmentation` and keep it (see the module docstring).
    workers: processes that decode (check_images "decode"); 0: every core this process may use.
    cache: with "decode", reuse and update the per-file results kept beside the JSON (image_checks.py).
    """
    if check_images not in CHECK_LEVELS:
        raise ValueError(f"check_images must be one of {', '.join(CHECK_LEVELS)}, got '{check_images}'")
    path, image_dir = Path(json_path), Path(image_dir)
    report = ValidationReport(json_path=str(path), image_dir=str(image_dir))
    if not image_dir.is_dir():
        report.errors.append(f"{image_dir}: image folder not found")
    data = _read_json(path, report)
    if data is None:
        return report
    if not isinstance(data, dict):
        report.errors.append(f"{path}: the top level must be an object with 'images', 'annotations' and "
                             f"'categories', got {type(data).__name__}")
        return report
    image_records = _section(data, "images", path, report)
    annotation_records = _section(data, "annotations", path, report)
    category_records = _section(data, "categories", path, report)

    category_ids = _check_categories(category_records, path, report) if category_records is not None else None
    image_ids, images = (_check_image_records(image_records, path, report) if image_records is not None
                         else (None, {}))
    report.annotations = {image["id"]: [] for image in report.images}
    if annotation_records is not None:
        _check_annotations(annotation_records, path, image_ids, images, category_ids, strict, report, masks)
    if image_dir.is_dir():
        _check_files(image_dir, check_images, report, progress, workers, cache)
    return report
