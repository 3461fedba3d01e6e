"""Pascal VOC XML <-> COCO.

One XML per image (`<annotation>` with `<filename>`, `<size>`, and an `<object>` per box: `<name>`,
`<difficult>`, `<bndbox>` xmin ymin xmax ymax).

Coordinates. VOC's are 1-based pixel indices, both ends included: (xmin 1, xmax W) is the whole
width (the VOC devkit's area is (xmax - xmin + 1) * (ymax - ymin + 1)). COCO's are 0-based and
continuous: pixel i covers [i - 1, i) of the line. So a VOC box becomes
[xmin - 1, ymin - 1, xmax - xmin + 1, ymax - ymin + 1] (x, y, width, height), which is detectron2's
conversion (`load_voc_instances`: xmin and ymin minus 1, xmax and ymax kept); torchvision's
VOCDetection returns the XML's strings unconverted. `one_based=False` reads files whose tools wrote
0-based continuous corners instead (x = xmin, width = xmax - xmin). The writer inverts the rule
(xmin = x + 1, xmax = x + width), in integers when they are, so COCO -> VOC -> COCO is exact.

`difficult`: VOC's evaluation ignores difficult objects (a detection on one is neither a true nor a
false positive, and a missed one is not counted). COCO's `iscrowd` = 1 means the same to COCO's
evaluation, and to this package's matcher (anchors it covers are ignored, neither object nor
background), so by default a difficult object becomes iscrowd 1, with "difficult": 1 kept on the
annotation; `difficult="keep"` keeps it as an ordinary object (iscrowd 0, "difficult": 1 kept), as
detectron2 does ("they don't hurt accuracy"). The writer marks crowd regions difficult.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from .common import (IMAGE_EXTENSIONS, ImageEntry, ObjectEntry, Problems, build_coco, check_declared_size,
                     coco_to_write, image_size, number, parse_xml)

DIFFICULT = ("crowd", "keep")


def _split(split: Path, xmls: list) -> list:
    """The XML files whose names (without .xml) the split file lists, sorted like the rest."""
    if not split.is_file():
        raise FileNotFoundError(f"split file not found: {split}")
    by_id = {}
    for xml in xmls:
        by_id.setdefault(xml.stem, xml)
    # VOCdevkit's per-class lists (ImageSets/Main/dog_train.txt) add a column, 1 / -1 / 0
    ids = [line.split()[0] for line in split.read_text(encoding="utf-8").splitlines() if line.strip()]
    missing = [i for i in ids if i not in by_id]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ValueError(f"{split}: image id {missing[0]}{more} has no XML file")
    return sorted(by_id[i] for i in set(ids))


def _voc_image(xml: Path, root, annotations: Path, images: Path) -> Optional[Path]:
    """The image an XML describes: `<filename>` in the images folder (at the XML's relative path, then at
    the top), else a file named like the XML with an image suffix; None if there is none."""
    rel = xml.parent.relative_to(annotations)
    filename = (root.findtext("filename") or "").strip()
    candidates = [images / rel / filename, images / filename] if filename else []
    candidates += [images / rel / (xml.stem + ext) for ext in IMAGE_EXTENSIONS]
    return next((c for c in candidates if c.is_file()), None)


def read_voc(annotations, *, images=None, names=None, difficult: str = "crowd", one_based: bool = True,
             split=None, image_root=None) -> dict:
    """A folder of Pascal VOC XML files (searched recursively) -> a COCO instances dict.

    images: the image folder (default: a `JPEGImages` folder beside `annotations`, as VOCdevkit has it,
    else `annotations` itself, as LabelImg saves). names: the class names in the order of the category
    ids (default: every name found, sorted). difficult: "crowd" or "keep" (module docstring).
    one_based: VOC's 1-based inclusive pixel indices (module docstring). split: a VOCdevkit list of
    image ids, one a line (ImageSets/Main/train.txt): only the XML files named so (default: all of
    them; an id without its XML is an error). image_root: the folder the
    COCO file_names are relative to (default `images`). Every problem (malformed XML, a missing image, a
    size that differs from the image's, a bad number) is collected and raised in one DataValidationError.
    """
    if difficult not in DIFFICULT:
        raise ValueError(f"difficult must be one of {', '.join(DIFFICULT)}, got {difficult!r}")
    annotations = Path(annotations).absolute()
    if not annotations.is_dir():
        raise FileNotFoundError(f"annotation folder not found: {annotations}")
    if images is None:
        images = annotations.parent / "JPEGImages" if (annotations.parent / "JPEGImages").is_dir() else annotations
    images = Path(images).absolute()
    if not images.is_dir():
        raise FileNotFoundError(f"image folder not found: {images}")
    xmls = sorted(annotations.rglob("*.xml"))
    if split is not None:
        xmls = _split(Path(split), xmls)
    if not xmls:
        raise ValueError(f"{annotations}: no .xml files")
    problems = Problems(annotations)
    entries = []
    for xml in xmls:
        root = parse_xml(xml, problems)
        if root is None:
            continue
        if root.tag != "annotation":
            problems.error(f"{xml}: not a Pascal VOC file (the root element is <{root.tag}>, not <annotation>)")
            continue
        image = _voc_image(xml, root, annotations, images)
        if image is None:
            problems.error(f"{xml}: image {(root.findtext('filename') or xml.stem).strip()} not found in {images}")
            continue
        size = image_size(image, str(xml), problems)
        if size is None:
            continue
        declared = tuple(int(number(root.findtext(f"size/{k}") or 0, k, str(xml), problems) or 0)
                         for k in ("height", "width"))
        if not check_declared_size(declared, size, str(xml), image, problems):
            continue
        entry = ImageEntry(image, *size)
        for i, obj in enumerate(root.iter("object")):
            where = f"{xml}: object {i}"
            label = (obj.findtext("name") or "").strip()
            if not label:
                problems.error(f"{where}: no <name>")
                continue
            corners = [number(obj.findtext(f"bndbox/{k}"), k, where, problems)
                       for k in ("xmin", "ymin", "xmax", "ymax")]
            if None in corners:
                continue
            x1, y1, x2, y2 = corners
            shift = 1.0 if one_based else 0.0
            bbox = [x1 - shift, y1 - shift, x2 - x1 + shift, y2 - y1 + shift]
            hard = (obj.findtext("difficult") or "0").strip() == "1"
            extra = {"difficult": 1} if hard else {}
            entry.objects.append(ObjectEntry(label, bbox, where, iscrowd=int(hard and difficult == "crowd"),
                                             extra=extra))
        entries.append(entry)
    problems.raise_if_any()
    if names is None:
        names = sorted({obj.label for entry in entries for obj in entry.objects})
        if not names:
            raise ValueError(f"{annotations}: no objects, so no class names; give them (--names classes.txt)")
    info = {"description": f"converted from Pascal VOC XML: {annotations}", "difficult": difficult,
            "voc_one_based": one_based}
    coco = build_coco(entries, list(names), Path(image_root or images), problems, info)
    problems.raise_if_any()
    return coco


def _number_text(value: float) -> str:
    """An integer as an integer ('12'), anything else as the shortest float that reads back exactly."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def write_voc(coco_json, image_root, output) -> dict:
    """A COCO dataset -> one Pascal VOC XML per image under `output` (`<file_name>.xml`: the image's path,
    suffix .xml) and `classes.txt` (the names in category-id order, for `read_voc(names=...)`).

    Boxes are read through `validate_coco` (clipped to the image, as training sees them; its errors
    raise) and written 1-based inclusive (module docstring); crowd regions are written difficult.
    Refuses to replace any existing file. Returns {"images", "boxes", "classes_txt", "warnings"}.
    """
    import xml.etree.ElementTree as ET

    from ...atomic import atomic_write
    report, targets, classes_txt = coco_to_write(coco_json, image_root, output, ".xml", "classes.txt")
    names = {c["id"]: c["name"] for c in report.categories}
    boxes = 0
    for image, target in zip(report.images, targets):
        root = ET.Element("annotation")
        ET.SubElement(root, "filename").text = Path(image["file_name"]).name
        size = ET.SubElement(root, "size")
        for key, value in (("width", image["width"]), ("height", image["height"]), ("depth", 3)):
            ET.SubElement(size, key).text = str(value)
        for ann in report.annotations[image["id"]]:
            obj = ET.SubElement(root, "object")
            ET.SubElement(obj, "name").text = names[ann["category_id"]]
            ET.SubElement(obj, "difficult").text = "1" if ann["iscrowd"] else "0"
            box = ET.SubElement(obj, "bndbox")
            x1, y1, x2, y2 = ann["bbox"]  # xyxy, 0-based continuous -> 1-based inclusive indices
            for key, value in (("xmin", x1 + 1), ("ymin", y1 + 1), ("xmax", x2), ("ymax", y2)):
                ET.SubElement(box, key).text = _number_text(value)
            boxes += 1
        ET.indent(root)
        target.parent.mkdir(parents=True, exist_ok=True)
        ET.ElementTree(root).write(target, encoding="utf-8", xml_declaration=True)
    with atomic_write(classes_txt, "w") as f:
        f.write("".join(c["name"] + "\n" for c in report.categories))
    return {"images": len(targets), "boxes": boxes, "classes_txt": str(classes_txt), "warnings": report.warnings}
