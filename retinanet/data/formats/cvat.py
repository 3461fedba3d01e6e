"""CVAT for images 1.1 XML -> COCO.

One XML for the whole task or project: `<meta>` lists the labels, then an `<image name width height>`
per image with its shapes: `<box label xtl ytl xbr ybr [rotation]>` and `<polygon label
points="x1,y1;x2,y2;...">`. CVAT's coordinates are continuous pixels with (0, 0) the image's top-left
corner (a box's width is xbr - xtl), COCO's convention, so they are taken as they are. A polygon
becomes a COCO polygon segmentation and the box that encloses it. A rotated box (rotation other than
0) has no exact axis-aligned form and is an error. Other shapes (polyline, points, ellipse, mask,
cuboid, skeleton) and image tags are left out with a warning that counts them.
"""

from __future__ import annotations

import logging
from pathlib import Path

from .common import (ImageEntry, ObjectEntry, Problems, build_coco, check_declared_size, image_size, number,
                     parse_xml, polygon_box)

logger = logging.getLogger(__name__)


def _polygon(text, where: str, problems: Problems):
    """'x1,y1;x2,y2;...' -> [x1, y1, x2, y2, ...]; None, with an error, if malformed or under 3 points."""
    try:
        points = [float(v) for pair in (text or "").split(";") for v in pair.split(",", 1)]
    except ValueError:
        points = None
    if points is None or len(points) % 2 or len(points) < 6:
        problems.error(f"{where}: points must be 'x1,y1;x2,y2;x3,y3...' (at least 3 points), got {text!r:.80}")
        return None
    return points


def read_cvat(xml, *, images=None, names=None, image_root=None) -> dict:
    """A CVAT for images 1.1 XML file -> a COCO instances dict.

    images: the folder the `<image name>`s are relative to (default: an `images` folder beside the
    XML, as CVAT's export has it, else the XML's folder). names: the class names in the order of the
    category ids (default: the labels of `<meta>` in their order, else every label found, sorted).
    image_root: the folder the COCO file_names are relative to (default `images`). Every problem is
    collected and raised in one DataValidationError naming the file and image.
    """
    xml = Path(xml).absolute()
    if not xml.is_file():
        raise FileNotFoundError(f"CVAT XML file not found: {xml}")
    if images is None:
        images = xml.parent / "images" if (xml.parent / "images").is_dir() else xml.parent
    images = Path(images).absolute()
    if not images.is_dir():
        raise FileNotFoundError(f"image folder not found: {images}")
    problems = Problems(xml)
    root = parse_xml(xml, problems)
    problems.raise_if_any()
    if root.tag != "annotations":
        raise ValueError(f"{xml}: not a CVAT for images file (the root element is <{root.tag}>, not <annotations>)")
    if root.find("track") is not None:
        raise ValueError(f"{xml}: has <track>s: that is CVAT for video; export the task as CVAT for images 1.1")
    skipped, entries = {}, []
    for node in root.iter("image"):
        name = node.get("name") or ""
        where = f"{xml}: image '{name}'"
        path = images / name
        if not name or not path.is_file():
            problems.error(f"{where}: image file not found in {images}")
            continue
        size = image_size(path, where, problems)
        if size is None:
            continue
        declared = tuple(int(number(node.get(k) or 0, k, where, problems) or 0) for k in ("height", "width"))
        if not check_declared_size(declared, size, where, path, problems):
            continue
        entry = ImageEntry(path, *size)
        for i, shape in enumerate(node):
            shape_where = f"{where}, {shape.tag} {i}"
            label = (shape.get("label") or "").strip()
            if shape.tag == "box":
                corners = [number(shape.get(k), k, shape_where, problems) for k in ("xtl", "ytl", "xbr", "ybr")]
                rotation = number(shape.get("rotation") or 0, "rotation", shape_where, problems)
                if None in corners or rotation is None:
                    continue
                if rotation % 360:
                    problems.error(f"{shape_where}: rotated by {rotation:g} degrees; only axis-aligned boxes convert")
                    continue
                x1, y1, x2, y2 = corners
                entry.objects.append(ObjectEntry(label, [x1, y1, x2 - x1, y2 - y1], shape_where))
            elif shape.tag == "polygon":
                points = _polygon(shape.get("points"), shape_where, problems)
                if points is not None:
                    entry.objects.append(ObjectEntry(label, polygon_box(points), shape_where, polygons=[points]))
            else:
                skipped.setdefault(shape.tag, [0, shape_where])[0] += 1
        entries.append(entry)
    problems.raise_if_any()
    for kind, (count, first) in sorted(skipped.items()):
        logger.warning(f"left out {count} CVAT <{kind}> element(s) (first: {first}): only boxes and polygons "
                       f"have a box")
    if names is None:
        names = [n.strip() for n in (e.findtext("name") for e in root.iterfind("meta//labels/label")) if n]
        names = list(dict.fromkeys(names)) or sorted({o.label for e in entries for o in e.objects})
        if not names:
            raise ValueError(f"{xml}: no labels in <meta> and no boxes or polygons, so no class names")
    entries.sort(key=lambda e: str(e.path))
    info = {"description": f"converted from CVAT for images 1.1: {xml}",
            "left_out_shapes": {kind: count for kind, (count, _) in skipped.items()}}
    coco = build_coco(entries, list(names), Path(image_root or images), problems, info)
    problems.raise_if_any()
    return coco
