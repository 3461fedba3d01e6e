"""A detection dataset read from a COCO instances JSON and an image folder.

Category ids may be any integers: sorted by id, they become contiguous labels 0..K-1
(`categories[label]` is {"id", "name"}, `label_to_category_id[label]` the id, and
`category_id_to_label` the way back). Crowd annotations (`iscrowd` 1) stay in the target,
flagged in `target["iscrowd"]`: the model ignores anchors they cover instead of learning them.
With masks=True (config `data.masks: true`) every annotation's segmentation is checked, kept as
compressed RLE (a few hundred bytes an instance) and decoded per item into `target["masks"]`, the
interface described in retinanet/ops/masks.py.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from ..ops.masks import decode_rles
from .images import ImageError, PathLike, load_image
from .transforms import PendingImage
from .validate import DataValidationError, ValidationReport, validate_coco

logger = logging.getLogger(__name__)

LANDSCAPE, PORTRAIT = 0, 1  # aspect groups: width >= height, width < height


class CocoDataset(Dataset):
    """COCO-format detection data, validated when constructed.

    Construction runs `validate_coco` (see retinanet/data/validate.py): any error raises one
    `DataValidationError` listing them all; warnings (dropped or clipped boxes) are logged. With
    `skip_unreadable`, images whose file exists but cannot be read (truncated, corrupt; found by
    check_images "decode") are left out instead, with a warning that lists each.

    `dataset[i]` (or `dataset[(i, seed)]`: the transforms then draw from a generator seeded with
    `seed`, which makes augmentation a pure function of the key) returns:
        image: (3, H, W) float32 RGB in [0, 1], after the transforms
        target: {"boxes": (G, 4) float32 xyxy in the transformed image's pixels,
                 "labels": (G,) int64 in 0..K-1, "iscrowd": (G,) bool,
                 "image_id": int (the JSON's id), "orig_size": (h, w) of the displayed image file,
                 with masks=True also "masks": (G, H, W) uint8 bit masks in the transformed image's
                 pixels (retinanet/ops/masks.py)}
    Without transforms the image and boxes are the file's, at its size (what evaluation wants: the
    model resizes in eval mode and returns boxes in these pixels). `item(key, pending=True)` returns
    the image as a uint8 `PendingImage` instead, its pixel operations not yet applied (GPU training).

    Example:
        >>> dataset = CocoDataset("annotations/instances_val2017.json", "val2017")  # doctest: +SKIP
        >>> image, target = dataset[0]  # doctest: +SKIP
    """

    def __init__(self, json_path: PathLike, image_dir: PathLike, *, transforms: Optional[Callable] = None,
                 strict: bool = False, check_images: str = "header", skip_unreadable: bool = False,
                 progress: bool = False, report: Optional[ValidationReport] = None, masks: bool = False):
        """report: an already computed `validate_coco` result for these files (skips validating again).
        progress: a progress bar while the images are read.
        masks: load the instance masks too (off: box-only training reads and stores no segmentation)."""
        if report is None:
            report = validate_coco(json_path, image_dir, strict=strict, check_images=check_images, progress=progress,
                                   masks=masks)
        if skip_unreadable and report.unreadable:
            left_out = report.leave_out_unreadable()
            logger.warning("%s: leaving out %d unreadable image(s) (data.skip_unreadable):\n%s", json_path,
                           len(left_out), "\n".join(f"  - {m}" for m in left_out))
        if report.unreadable:
            raise DataValidationError(str(json_path), report.errors,
                                      hint="data.skip_unreadable: true trains on the other images")
        report.raise_if_errors()
        if report.warnings:
            logger.warning("%s", report.format(max_lines=10))
        self.json_path, self.image_dir = str(json_path), Path(image_dir)
        self.transforms = transforms
        self.categories = [dict(c) for c in report.categories]
        self.label_to_category_id = [c["id"] for c in self.categories]
        self.category_id_to_label = {cid: label for label, cid in enumerate(self.label_to_category_id)}
        self.image_ids = [image["id"] for image in report.images]
        self.file_names = [image["file_name"] for image in report.images]
        self.sizes = np.array([[image["height"], image["width"]] for image in report.images],
                              dtype=np.int64).reshape(-1, 2)  # (N, 2) h, w of the displayed images
        # Annotations packed into flat arrays (not lists of dicts), so that DataLoader workers forked
        # from this process share the pages instead of copying them as reference counts change.
        anns = [report.annotations[iid] for iid in self.image_ids]
        counts = np.array([len(a) for a in anns], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(counts)])  # (N + 1,) image i: [offsets[i], offsets[i+1])
        flat = [a for per_image in anns for a in per_image]
        self.boxes = np.array([a["bbox"] for a in flat], dtype=np.float32).reshape(-1, 4)  # (A, 4) xyxy pixels
        self.labels = np.array([self.category_id_to_label[a["category_id"]] for a in flat], dtype=np.int64)  # (A,)
        self.crowd = np.array([a["iscrowd"] for a in flat], dtype=bool)  # (A,)
        self.masks = masks
        if masks:  # compressed RLE strings, concatenated: annotation a is rle_bytes[rle_offsets[a]:rle_offsets[a+1]]
            if any("segmentation" not in a for a in flat):
                raise ValueError(f"{json_path}: masks=True needs a report made with validate_coco(..., masks=True)")
            strings = [a["segmentation"]["counts"] for a in flat]
            self.rle_offsets = np.concatenate([[0], np.cumsum([len(c) for c in strings], dtype=np.int64)])
            self.rle_bytes = np.frombuffer(b"".join(strings), dtype=np.uint8)

    @property
    def num_classes(self) -> int:
        return len(self.categories)

    def __len__(self) -> int:
        return len(self.image_ids)

    def aspect_groups(self) -> list:
        """Per image LANDSCAPE (0, width >= height) or PORTRAIT (1), from the JSON sizes (no decoding)."""
        return [LANDSCAPE if w >= h else PORTRAIT for h, w in self.sizes.tolist()]

    def target(self, index: int) -> dict:
        """The annotations of image `index` in the file's pixels (before any transform)."""
        lo, hi = int(self.offsets[index]), int(self.offsets[index + 1])
        return {
            "boxes": torch.from_numpy(self.boxes[lo:hi].copy()),  # (G, 4) float32 xyxy
            "labels": torch.from_numpy(self.labels[lo:hi].copy()),  # (G,) int64
            "iscrowd": torch.from_numpy(self.crowd[lo:hi].copy()),  # (G,) bool
            "image_id": self.image_ids[index],
            "orig_size": (int(self.sizes[index, 0]), int(self.sizes[index, 1])),
            **({"masks": self.masks_of(index)} if self.masks else {}),
        }

    def masks_of(self, index: int) -> torch.Tensor:
        """(G, H, W) uint8 bit masks of image `index` at the file's size, in the order of its boxes."""
        h, w = int(self.sizes[index, 0]), int(self.sizes[index, 1])
        lo, hi = int(self.offsets[index]), int(self.offsets[index + 1])
        rles = [{"size": [h, w], "counts": self.rle_bytes[self.rle_offsets[a]:self.rle_offsets[a + 1]].tobytes()}
                for a in range(lo, hi)]
        return torch.from_numpy(decode_rles(rles, h, w))

    def __getitem__(self, key) -> tuple:
        return self.item(key)

    def item(self, key, pending: bool = False) -> tuple:
        """`dataset[key]`; with `pending`, the image is returned as a `PendingImage` instead: uint8, with
        the transforms' pixel operations recorded, not applied (`realize` applies them, on the GPU)."""
        index, seed = key if isinstance(key, tuple) else (key, None)
        where = f"{self.image_dir / self.file_names[index]} (image id {self.image_ids[index]})"
        try:
            array = load_image(self.image_dir / self.file_names[index])  # (H, W, 3) uint8, EXIF-oriented
        except ImageError as e:
            raise ImageError(where, e.reason) from None
        target = self.target(index)
        if array.shape[:2] != target["orig_size"]:
            h, w = target["orig_size"]
            raise ImageError(where, f"the JSON says height {h}, width {w}, but the displayed image "
                                    f"(EXIF orientation applied) is height {array.shape[0]}, width {array.shape[1]}")
        image = PendingImage.from_array(array)  # (3, H, W) uint8
        if self.transforms is not None:
            generator = torch.Generator().manual_seed(seed) if seed is not None else None
            image, target = self.transforms(image, target, generator)
        return (image if pending else image.realize()), target  # realized: (3, H, W) float32 in [0, 1]
