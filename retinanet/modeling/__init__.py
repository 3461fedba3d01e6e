"""The detectors: a shared backbone (ResNet + FPN), the contract every caller uses (`Detector`), and
one module per detector (retinanet.py; faster_rcnn.py with rpn.py and roi_heads.py).

`build_model(config)` is the one function that reads the config to build a model.
"""

from .build import build_model
from .detector import Detector, ImageBatch
from .retinanet import RetinaNet, RetinaNetHead

__all__ = ["Detector", "ImageBatch", "RetinaNet", "RetinaNetHead", "build_model"]
