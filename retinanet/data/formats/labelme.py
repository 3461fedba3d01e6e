"""LabelMe JSON -> COCO.

One JSON per image: `imagePath` (relative to the JSON), `imageHeight`, `imageWidth`, and `shapes`,
each {label, points [[x, y], ...], shape_type, group_id}. LabelMe's points are continuous pixel
coordinates with (0, 0) the top-left corner of the image, COCO's convention, so they are taken as
they are. A `rectangle` (two opposite corners, in any order) becomes a box; a `polygon` (3 points or
more; files older than shape_type have polygons only) becomes a COCO polygon segmentation and the
box that encloses it. Shapes that share a label and a `group_id` are one object (LabelMe's way of
drawing an occluded object in parts): their polygons together, their boxes' union (a rectangle in a
group with polygons joins as its four corners). Other shape types (point, line, linestrip, circle,
mask) have no box here: they are left out with a warning that counts them.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from .common import (IMAGE_EXTENSIONS, ImageEntry, ObjectEntry, Problems, build_coco, check_declared_size,
                     image_size)

logger = logging.getLogger(__name__)


def _points(shape: dict, where: str, problems: Problems):
    """The shape's points flattened [x1, y1, x2, y2, ...]; None, with an error, if malformed."""
    points = shape.get("points")
    ok = isinstance(points, list) and all(
        isinstance(p, list) and len(p) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in p)
        for p in points)
    if not ok:
        problems.error(f"{where}: 'points' must be a list of [x, y] numbers, got {points!r:.80}")
        return None
    return [float(v) for p in points for v in p]


def _read_one(path: Path, problems: Problems, skipped: dict):
    """One LabelMe file -> ImageEntry, or None with the errors reported."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        problems.error(f"{path}: cannot read the file: {e}")
        return None
    except json.JSONDecodeError as e:
        problems.error(f"{path}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}")
        return None
    if not isinstance(data, dict) or not isinstance(data.get("shapes"), list):
        problems.error(f"{path}: not a LabelMe file (no 'shapes' list)")
        return None
    image_path = str(data.get("imagePath") or "").replace("\\", "/")  # files saved on Windows
    candidates = [path.parent / image_path] if image_path else []
    candidates += [path.with_suffix(ext) for ext in IMAGE_EXTENSIONS]
    image = next((c for c in candidates if c.is_file()), None)
    if image is None:
        problems.error(f"{path}: image {image_path or path.stem} not found (imagePath is relative to the JSON)")
        return None
    size = image_size(image, str(path), problems)
    if size is None:
        return None
    declared = tuple(data.get(k) if isinstance(data.get(k), int) else 0 for k in ("imageHeight", "imageWidth"))
    if not check_declared_size(declared, size, str(path), image, problems):
        return None
    entry = ImageEntry(image, *size)
    groups = {}  # (label, group_id) -> the ObjectEntry its shapes make
    for i, shape in enumerate(data["shapes"]):
        where = f"{path}: shape {i}"
        if not isinstance(shape, dict) or not isinstance(shape.get("label"), str) or not shape["label"].strip():
            problems.error(f"{where}: a shape needs a non-empty 'label'")
            continue
        kind = shape.get("shape_type") or "polygon"
        if kind not in ("rectangle", "polygon"):
            skipped.setdefault(kind, [0, where])[0] += 1
            continue
        points = _points(shape, where, problems)
        if points is None:
            continue
        if kind == "rectangle" and len(points) != 4:
            problems.error(f"{where}: a rectangle has 2 points (opposite corners), got {len(points) // 2}")
            continue
        if kind == "polygon" and len(points) < 6:
            problems.error(f"{where}: a polygon needs at least 3 points, got {len(points) // 2}")
            continue
        xs, ys = points[0::2], points[1::2]
        x1, y1, x2, y2 = min(xs), min(ys), max(xs), max(ys)
        polygon = points if kind == "polygon" else None
        label, group = shape["label"].strip(), shape.get("group_id")
        key = (label, group) if group is not None else i  # an ungrouped shape is an object alone
        if key not in groups:
            groups[key] = ObjectEntry(label, [x1, y1, x2, y2], where, polygons=[polygon] if polygon else None)
            groups[key].extra["_rects"] = [] if polygon else [[x1, y1, x2, y2]]
            entry.objects.append(groups[key])
            continue
        obj = groups[key]  # another part of a grouped object
        obj.bbox = [min(obj.bbox[0], x1), min(obj.bbox[1], y1), max(obj.bbox[2], x2), max(obj.bbox[3], y2)]
        if polygon:
            obj.polygons = (obj.polygons or []) + [polygon]
        else:
            obj.extra["_rects"].append([x1, y1, x2, y2])
    for obj in entry.objects:
        rects = obj.extra.pop("_rects")
        if obj.polygons:  # rectangles grouped with polygons join the segmentation as their corners
            obj.polygons += [[a, b, c, b, c, d, a, d] for a, b, c, d in rects]
        x1, y1, x2, y2 = obj.bbox
        obj.bbox = [x1, y1, x2 - x1, y2 - y1]  # xyxy -> COCO's x, y, width, height
    return entry


def read_labelme(folder, *, names=None, image_root=None) -> dict:
    """A folder of LabelMe JSON files (searched recursively) -> a COCO instances dict.

    names: the class names in the order of the category ids (default: every label found, sorted).
    image_root: the folder the COCO file_names are relative to (default `folder`). Every problem is
    collected and raised in one DataValidationError naming the file and shape.
    """
    folder = Path(folder).absolute()
    if not folder.is_dir():
        raise FileNotFoundError(f"LabelMe folder not found: {folder}")
    files = sorted(folder.rglob("*.json"))
    if not files:
        raise ValueError(f"{folder}: no .json files")
    problems, skipped, entries = Problems(folder), {}, []
    for path in files:
        entry = _read_one(path, problems, skipped)
        if entry is not None:
            entries.append(entry)
    problems.raise_if_any()
    for kind, (count, first) in sorted(skipped.items()):
        logger.warning(f"left out {count} LabelMe shape(s) of type '{kind}' (first: {first}): only rectangles "
                       f"and polygons have a box")
    if names is None:
        names = sorted({obj.label for entry in entries for obj in entry.objects})
        if not names:
            raise ValueError(f"{folder}: no rectangles or polygons, so no class names; give them (--names)")
    info = {"description": f"converted from LabelMe JSON: {folder}",
            "left_out_shapes": {kind: count for kind, (count, _) in skipped.items()}}
    coco = build_coco(entries, list(names), Path(image_root or folder), problems, info)
    problems.raise_if_any()
    return coco
