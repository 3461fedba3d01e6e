"""YOLO txt labels (darknet, ultralytics) <-> COCO.

One text file per image, one object a line: `class cx cy w h`, the box's centre and size divided by
the image's width and height (so in [0, 1]), or ultralytics' segment lines `class x1 y1 x2 y2 x3 y3 ...`
(a polygon, normalized the same way). Class k is the k-th name of `data.yaml`'s `names` (a list, or a
dict {0: name, ...}) or of `classes.txt` / `obj.names` (one a line); it becomes COCO category id k + 1
(COCO numbers categories from 1; detectron2 asks for ids in [1, K]), and the names are kept.

Where the labels are, as ultralytics looks for them: the image `.../images/train/a.jpg` has the label
`.../labels/train/a.txt` (the last `images` folder of the path becomes `labels`); darknet keeps
`a.txt` beside `a.jpg`. The first layout is used when any image has its label there, else the second;
`labels=` names the folder explicitly (a label's path under it = the image's path under `images`).
An image without a label file, or with an empty one, is a negative and is kept; a label file without
an image is an error.

The normalized coordinates are multiplied by the size of the image as displayed (EXIF orientation
applied, read from the file's header), as ultralytics' loader does and as this package trains on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from ...atomic import atomic_write
from .common import (IMAGE_EXTENSIONS, ImageEntry, ObjectEntry, Problems, build_coco, find_images, image_size,
                     coco_to_write, polygon_box, read_names)

NAME_FILES = ("data.yaml", "dataset.yaml", "classes.txt", "obj.names")
# '.12g': 12 significant digits, so a coordinate read back is within 1e-12 of the image size (1e-8 px
# on a 10,000 px image) of the box written
PRECISION = ".12g"


def _mirrored_label(image: Path) -> Optional[Path]:
    """ultralytics' rule: the last `images` folder in the path -> `labels`, the suffix -> .txt."""
    parts = image.parts
    if "images" not in parts[:-1]:
        return None
    i = len(parts) - 2 - parts[-2::-1].index("images")
    return Path(*parts[:i], "labels", *parts[i + 1:]).with_suffix(".txt")


def _label_rule(images: Path, files: list, labels: Optional[Path]):
    """(image -> label path, a description of the layout) for this dataset."""
    if labels is not None:
        return (lambda p: labels / p.relative_to(images).with_suffix(".txt")), f"labels under {labels}"
    if any((m := _mirrored_label(p)) is not None and m.is_file() for p in files):
        return (lambda p: _mirrored_label(p) or p.with_suffix(".txt")), "images/ -> labels/ folders"
    return (lambda p: p.with_suffix(".txt")), "labels beside the images"


def find_names(folders: list) -> Optional[Path]:
    """The first data.yaml, dataset.yaml, classes.txt or obj.names in `folders` (in that order, folder by folder)."""
    for folder in folders:
        for name in NAME_FILES:
            if (folder / name).is_file():
                return folder / name
    return None


def _parse_label_file(label: Path, entry: ImageEntry, names: list, problems: Problems) -> None:
    """The objects of one label file -> entry.objects; every bad line -> an error naming file and line."""
    try:
        text = label.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        problems.error(f"{label}: cannot read the label file: {e}")
        return
    for n, line in enumerate(text.splitlines(), 1):
        tokens = line.split()
        if not tokens:
            continue
        where = f"{label}:{n}"
        try:
            values = [float(t) for t in tokens]
        except ValueError:
            problems.error(f"{where}: not a list of numbers: {line.strip()!r:.80}")
            continue
        k, coords = values[0], values[1:]
        if len(coords) != 4 and (len(coords) < 6 or len(coords) % 2):
            problems.error(f"{where}: expected 'class cx cy w h' (5 values) or a polygon 'class x1 y1 x2 y2 x3 y3 "
                           f"...', got {len(values)} values")
            continue
        if not k.is_integer() or not 0 <= k < len(names):
            problems.error(f"{where}: unknown class id {tokens[0]} (the names have ids 0..{len(names) - 1})")
            continue
        outside = [t for t, v in zip(tokens[1:], coords) if not 0.0 <= v <= 1.0]  # also catches nan
        if outside:
            problems.error(f"{where}: coordinates must be normalized to [0, 1] (divided by the image width and "
                           f"height), got {', '.join(outside)}")
            continue
        W, H = entry.width, entry.height
        if len(coords) == 4:
            cx, cy, w, h = coords
            obj = ObjectEntry(names[int(k)], [cx * W - w * W / 2, cy * H - h * H / 2, w * W, h * H], where)
        else:
            points = [v * (W if i % 2 == 0 else H) for i, v in enumerate(coords)]
            obj = ObjectEntry(names[int(k)], polygon_box(points), where, polygons=[points])
        entry.objects.append(obj)


def read_yolo(images, *, labels=None, names=None, image_root=None) -> dict:
    """A YOLO dataset -> a COCO instances dict.

    images: the folder searched (recursively) for images. labels: the folder of the label files
    (default: found by the rules in the module docstring). names: a list of class names, or a
    data.yaml / classes.txt path (default: the first of NAME_FILES in the labels folder, the images
    folder or the two above it). image_root: the folder the COCO `file_name`s are relative to (default
    `images`). Raises FileNotFoundError for a missing folder, DataValidationError listing every
    problem (bad lines with file and line number, label files without an image, unreadable images).
    The dict's "info" says which names file and which layout were used.
    """
    images = Path(images).absolute()
    labels = Path(labels).absolute() if labels is not None else None
    if not images.is_dir():
        raise FileNotFoundError(f"image folder not found: {images}")
    if labels is not None and not labels.is_dir():
        raise FileNotFoundError(f"label folder not found: {labels}")
    files = find_images(images)
    if not files:
        raise ValueError(f"{images}: no image files ({', '.join(IMAGE_EXTENSIONS)})")
    label_of, layout = _label_rule(images, files, labels)
    names_source = "the list given"
    if names is None:
        first_label_dir = label_of(files[0]).parent
        folders = [labels, images, images.parent, images.parent.parent, first_label_dir, first_label_dir.parent]
        found = find_names([f for f in dict.fromkeys(folders) if f is not None])
        if found is None:
            raise ValueError(f"no class names: found no {', '.join(NAME_FILES)} in {images} or the two folders above "
                             f"it; give them (--names data.yaml or classes.txt)")
        names = found
    if not isinstance(names, (list, tuple)):
        names_source, names = str(names), read_names(names)
    names = [str(n) for n in names]

    problems = Problems(images)
    entries, label_files = [], {}
    for image in files:
        label = label_of(image)
        if label in label_files:
            problems.error(f"{label}: the label file of two images, {label_files[label]} and {image}")
            continue
        label_files[label] = image
        size = image_size(image, str(label), problems)
        if size is None:
            continue
        entry = ImageEntry(image, *size)
        if label.is_file():
            _parse_label_file(label, entry, names, problems)
        entries.append(entry)
    # label files with no image: every .txt in the folders where this dataset's labels are
    for folder in sorted({label.parent for label in label_files}):
        for label in sorted(folder.glob("*.txt")) if folder.is_dir() else ():
            if label not in label_files and label.name not in NAME_FILES:
                problems.error(f"{label}: label file without an image (no {label.stem}"
                               f"{{{','.join(IMAGE_EXTENSIONS)}}} where the images are)")
    problems.raise_if_any()
    info = {"description": f"converted from YOLO labels: {images}", "names": names_source, "layout": layout}
    coco = build_coco(entries, names, Path(image_root or images), problems, info)
    problems.raise_if_any()
    return coco


def write_yolo(coco_json, image_root, output) -> dict:
    """A COCO dataset -> YOLO labels under `output`: `<file_name>.txt` (the image's path, suffix .txt;
    an empty file for an image without objects) and `data.yaml` with the names in category-id order.

    The dataset is read through `validate_coco` (boxes as training sees them: clipped to the image;
    its errors raise). Class k is the k-th category sorted by id. Crowd regions have no YOLO form and
    are left out. Refuses to replace any existing file. Returns {"images", "boxes", "crowd_left_out",
    "data_yaml", "warnings"}. Read back with `read_yolo(image_root, labels=output)`.
    """
    import yaml

    report, targets, data_yaml = coco_to_write(coco_json, image_root, output, ".txt", "data.yaml")
    index = {c["id"]: k for k, c in enumerate(report.categories)}
    boxes = crowd = 0
    for image, target in zip(report.images, targets):
        W, H = image["width"], image["height"]
        lines = []
        for ann in report.annotations[image["id"]]:
            if ann["iscrowd"]:
                crowd += 1
                continue
            x1, y1, x2, y2 = ann["bbox"]  # xyxy, absolute pixels, clipped to the image
            values = ((x1 + x2) / 2 / W, (y1 + y2) / 2 / H, (x2 - x1) / W, (y2 - y1) / H)
            lines.append(" ".join([str(index[ann["category_id"]])] + [format(v, PRECISION) for v in values]))
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        boxes += len(lines)
    with atomic_write(data_yaml, "w") as f:
        yaml.safe_dump({"nc": len(report.categories), "names": [c["name"] for c in report.categories]}, f,
                       sort_keys=False, allow_unicode=True)
    return {"images": len(targets), "boxes": boxes, "crowd_left_out": crowd, "data_yaml": str(data_yaml),
            "warnings": report.warnings}

