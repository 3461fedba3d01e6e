"""COCO-format data: image loading, validation, the dataset, transforms, loaders, synthetic shapes.

Flow: `validate_coco` (every problem at once) -> `CocoDataset` (images via `load_image`, boxes xyxy)
-> transforms (resize with scale jitter, flip; masks with the boxes when `data.masks` is on)
-> `TrainBatchSampler` + `collate` -> the model. On a GPU the training images stay uint8
(`PendingImage`) until `batch_to_device` has copied them: converted, resized, cropped and flipped there;
evaluation's images stay uint8 until `images_to_device` has copied them, for the model's preprocess to convert.
The `build_*` functions in loader.py are the ones that read `cfg.data`.
"""

from .coco import CocoDataset
from .images import ImageError, load_image
from .loader import (TrainBatchSampler, batch_to_device, build_test_loader, build_train_dataset, build_train_loader,
                     build_val_dataset, collate, images_to_device)
from .synthetic import make_shapes_dataset
from .transforms import PendingImage
from .validate import DataValidationError, ValidationReport, validate_coco

__all__ = ["CocoDataset", "DataValidationError", "ImageError", "PendingImage", "TrainBatchSampler", "ValidationReport",
           "batch_to_device", "build_test_loader", "build_train_dataset", "build_train_loader", "build_val_dataset",
           "collate", "images_to_device", "load_image", "make_shapes_dataset", "validate_coco"]
