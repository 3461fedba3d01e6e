"""Helpers for the data tests: small image files and COCO JSON written into tmp_path."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image


def save_image(path, array, **save_kwargs):
    """Write a uint8 (H, W) or (H, W, 3) array as an image file (format from the suffix)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path, **save_kwargs)
    return path


def coco(images, annotations, categories=None) -> dict:
    return {"images": images, "annotations": annotations,
            "categories": categories if categories is not None else [{"id": 1, "name": "thing"}]}


def image_record(image_id, file_name, height, width) -> dict:
    return {"id": image_id, "file_name": file_name, "height": height, "width": width}


def annotation(ann_id, image_id, bbox, category_id=1, iscrowd=0) -> dict:
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": bbox, "iscrowd": iscrowd}


@pytest.fixture
def write_json(tmp_path):
    """write_json(obj, name="ann.json") -> path; NaN is written as the JSON token NaN."""

    def write(obj, name="ann.json"):
        path = tmp_path / name
        path.write_text(json.dumps(obj, indent=1))
        return path

    return write
