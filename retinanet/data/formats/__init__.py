"""Datasets in other formats -> COCO instances JSON (and COCO -> YOLO / Pascal VOC for the way back).

Training reads COCO (retinanet/data/coco.py); these readers turn YOLO txt, Pascal VOC XML, LabelMe
JSON and CVAT for images 1.1 XML into the same COCO dict, and `write_coco` saves it, so that one
reader, one validator (`validate_coco`) and one loader serve every format. What all of them do:

- every image is kept, with or without objects (negatives teach the detector background);
- image ids are 1..N in the order of the sorted file paths, annotation ids 1..M in image order,
  category ids 1..K in the order of the class names (YOLO class k -> category k + 1), names kept;
- sizes are the displayed image's (EXIF orientation applied, from the file's header, as training
  reads it): YOLO's normalized coordinates are multiplied by them, and a size that an annotation file
  states and that differs is an error;
- boxes are COCO's [x, y, width, height], 0-based continuous pixels (x = 0 is the image's left edge);
  polygons, where the format has them, are kept as COCO polygon segmentation with their box;
- every problem is collected and raised once (`DataValidationError`, one line each, naming the
  file and the line, object or shape).

globox (a library that reads and writes these formats) is not used: its conversion is not exact for
this purpose. It reads VOC corners without the 1-based shift and drops `difficult`, reads image
sizes with its own header parser (no EXIF orientation), finds YOLO images from their label files (an
image without one, a negative, is lost), keeps LabelMe polygons as boxes only, leaves CVAT polygons
out, and numbers categories from 0 (named by the YOLO class id) or in sorted-name order.
"""

from __future__ import annotations

import json
from pathlib import Path

from ...atomic import atomic_write
from .common import read_names
from .cvat import read_cvat
from .labelme import read_labelme
from .voc import read_voc, write_voc
from .yolo import read_yolo, write_yolo

READERS = {"yolo": read_yolo, "voc": read_voc, "labelme": read_labelme, "cvat": read_cvat}
WRITERS = {"yolo": write_yolo, "voc": write_voc}


def write_coco(coco: dict, path, overwrite: bool = False) -> None:
    """Write a COCO dict as JSON, atomically (a crash leaves the old file or the new one).

    An existing file is replaced only with overwrite=True (a user's file is never lost by mistake).
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise ValueError(f"{path} exists; give another output file, or --overwrite to replace it")
    with atomic_write(path, "w") as f:
        json.dump(coco, f)  # ASCII, non-ASCII names escaped: right whatever the locale's encoding
        f.write("\n")


__all__ = ["READERS", "WRITERS", "read_cvat", "read_labelme", "read_names", "read_voc", "read_yolo", "write_coco",
           "write_voc", "write_yolo"]
