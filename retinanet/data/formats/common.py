"""What every format's reader shares: the COCO dict it builds, image sizes, names files, errors.

A reader turns its files into `ImageEntry` records (an image and its objects, boxes already in COCO's
[x, y, width, height], 0-based continuous pixels of the displayed image) and `build_coco` numbers them:
image ids 1..N and annotation ids 1..M in the order of the sorted file names, category ids 1..K in
the order of the names.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..images import ImageError, displayed_size
from ..validate import DataValidationError

# The image files a folder reader looks for (case-insensitive): what Pillow reads and annotation tools save.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
# Pixel coordinates are rounded to this many decimals: it removes the float noise of a product such as
# (0.5 - 0.1) * 100 = 40.00000000000001 and changes no coordinate by more than 5e-10 px.
DECIMALS = 9


def px(value: float) -> float:
    """A pixel coordinate as written to the COCO JSON (rounded to DECIMALS; -0.0 written as 0.0)."""
    return round(float(value), DECIMALS) + 0.0


@dataclass
class ObjectEntry:
    """One object of one image, in COCO terms.

    bbox: [x, y, width, height], 0-based continuous pixels (x = 0 is the left edge of the first column).
    polygons: COCO polygons [[x1, y1, x2, y2, ...], ...] in the same pixels, or None (a box only).
    where: the file (and line or object index) it came from, for error messages.
    extra: more keys for the COCO annotation (e.g. {"difficult": 1}).
    """

    label: str
    bbox: list
    where: str
    iscrowd: int = 0
    polygons: Optional[list] = None
    extra: dict = field(default_factory=dict)


@dataclass
class ImageEntry:
    """One image: its file, its displayed (EXIF-oriented) size, and its objects (none: a negative)."""

    path: Path
    height: int
    width: int
    objects: list = field(default_factory=list)


class Problems:
    """Every problem found in one conversion, raised at the end as one DataValidationError."""

    def __init__(self, source):
        self.source, self.errors, self.warnings = str(source), [], []

    def error(self, message: str) -> None:
        self.errors.append(message)

    def raise_if_any(self) -> None:
        if self.errors:
            raise DataValidationError(self.source, self.errors)


def image_size(path: Path, where: str, problems: Problems) -> Optional[tuple]:
    """(height, width) of the displayed image (EXIF orientation applied, as training reads it), from the
    file's header; None, with an error naming `where` (the annotation file), when it cannot be read."""
    try:
        return displayed_size(path)
    except ImageError as e:
        problems.error(f"{where}: image {path}: {e.reason}")
        return None


def check_declared_size(declared: tuple, actual: tuple, where: str, path: Path, problems: Problems) -> bool:
    """An annotation file that states its image's (height, width) must agree with the displayed image:
    its boxes were drawn on that size. A declared 0 (some tools write it) is not checked. True if they agree."""
    if any(d and d != a for d, a in zip(declared, actual)):
        problems.error(f"{where}: says the image is height {declared[0]}, width {declared[1]}, but {path} is "
                       f"displayed as height {actual[0]}, width {actual[1]} (EXIF orientation applied); "
                       f"its boxes would not match the image")
        return False
    return True


def find_images(folder: Path) -> list:
    """Every image file under `folder`, recursively, sorted by path."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def read_names(path) -> list:
    """Category names, in order, from a YOLO `data.yaml` (`names`: a list, or a dict {0: name, 1: ...})
    or a text file with one name a line (classes.txt, obj.names; blank lines skipped)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"names file not found: {path}")
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: invalid YAML: {e}".replace("\n", " ")) from None
        names = data.get("names") if isinstance(data, dict) else None
        if isinstance(names, dict):
            keys = sorted(names)
            if keys != list(range(len(keys))):
                raise ValueError(f"{path}: 'names' must number the classes 0..{len(keys) - 1}, got ids {keys}")
            names = [names[k] for k in keys]
        if not isinstance(names, list) or not names:
            raise ValueError(f"{path}: no 'names' list or dict {{0: name, ...}} of class names")
        names = [str(n) for n in names]
        if isinstance(data.get("nc"), int) and data["nc"] != len(names):
            raise ValueError(f"{path}: nc is {data['nc']} but 'names' has {len(names)} entries")
    else:
        names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not names:
            raise ValueError(f"{path}: no class names (one a line)")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"{path}: class name(s) {', '.join(duplicates)} appear more than once")
    return names


def relative_name(path: Path, image_root: Path, where: str, problems: Problems) -> Optional[str]:
    """The COCO file_name of `path`: its path under `image_root` (with /); None, with an error, outside it."""
    try:
        return path.resolve().relative_to(image_root.resolve()).as_posix()
    except ValueError:
        problems.error(f"{where}: image {path} is not under the image folder {image_root} (--images)")
        return None


def build_coco(entries: list, names: list, image_root: Path, problems: Problems, info: dict) -> dict:
    """ImageEntry records -> a COCO instances dict.

    names: the category names in order (category id = position + 1); a label not among them is an
    error naming its file. Images keep the order of `entries` (ids 1..N), annotations follow their
    image (ids 1..M). `area` is width * height for a box and the rasterized mask's pixel count for a
    polygon (pycocotools, as COCO's own annotations have it).
    """
    from pycocotools import mask as mask_api

    category_ids = {name: i + 1 for i, name in enumerate(names)}
    coco = {"info": info, "images": [], "annotations": [],
            "categories": [{"id": i + 1, "name": name} for i, name in enumerate(names)]}
    for entry in entries:
        file_name = relative_name(entry.path, image_root, str(entry.path), problems)
        if file_name is None:
            continue
        image_id = len(coco["images"]) + 1
        coco["images"].append({"id": image_id, "file_name": file_name, "height": entry.height, "width": entry.width})
        for obj in entry.objects:
            if obj.label not in category_ids:
                problems.error(f"{obj.where}: unknown class '{obj.label}' (the names are: {', '.join(names)})")
                continue
            x, y, w, h = (px(v) for v in obj.bbox)
            if not all(math.isfinite(v) for v in (x, y, w, h)):
                problems.error(f"{obj.where}: non-finite coordinates")
                continue
            if w <= 0 or h <= 0:
                problems.error(f"{obj.where}: box [x {x:g}, y {y:g}, width {w:g}, height {h:g}] has no area")
                continue
            annotation = {"id": len(coco["annotations"]) + 1, "image_id": image_id,
                          "category_id": category_ids[obj.label], "bbox": [x, y, w, h], "area": px(w * h),
                          "iscrowd": obj.iscrowd}
            if obj.polygons is not None:
                polygons = [[px(v) for v in polygon] for polygon in obj.polygons]
                rle = mask_api.merge(mask_api.frPyObjects(polygons, entry.height, entry.width))
                annotation["segmentation"] = polygons
                annotation["area"] = float(mask_api.area(rle))
            annotation.update(obj.extra)
            coco["annotations"].append(annotation)
    return coco


def polygon_box(points: list) -> list:
    """[x1, y1, x2, y2, ...] -> the [x, y, width, height] that encloses it."""
    xs, ys = points[0::2], points[1::2]
    return [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]


def parse_xml(path: Path, problems: Problems):
    """The root element of an XML file; None, with an error naming the file (and line, column), if malformed."""
    import xml.etree.ElementTree as ET

    try:
        return ET.parse(path).getroot()
    except ET.ParseError as e:
        line, column = e.position
        problems.error(f"{path}: malformed XML at line {line}, column {column + 1}: {str(e).split(':')[0]}")
    except OSError as e:
        problems.error(f"{path}: cannot read the file: {e.strerror or e}")
    return None


def number(text, what: str, where: str, problems: Problems) -> Optional[float]:
    """A finite number from an XML text or attribute; None, with an error naming `where`, otherwise."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        problems.error(f"{where}: {what} must be a number, got {text!r}")
        return None
    if not math.isfinite(value):
        problems.error(f"{where}: {what} must be finite, got {text!r}")
        return None
    return value


def refuse_existing(paths: list) -> None:
    """Raise, before anything is written, if any of `paths` exists: a user's file is never replaced."""
    existing = [p for p in paths if p.exists()]
    if existing:
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        raise ValueError(f"{existing[0]} exists{more}; give an empty or new output folder")


def coco_to_write(coco_json, image_root, output, suffix: str, index_file: str) -> tuple:
    """The start of a writer from COCO (`write_yolo`, `write_voc`): the dataset read through `validate_coco`
    (its errors raise), one target per image (`<file_name>` with `suffix`, under `output`) and the index
    file, none of them existing yet -> (report, targets, index_path)."""
    from ..validate import validate_coco

    report = validate_coco(coco_json, image_root, check_images="header")
    report.raise_if_errors()
    output = Path(output)
    targets = [output / Path(image["file_name"]).with_suffix(suffix) for image in report.images]
    index_path = output / index_file
    refuse_existing(targets + [index_path])
    return report, targets, index_path
