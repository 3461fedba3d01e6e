"""The detectors: a shared backbone (ResNet + FPN) and one module per detector.

`build_model(config)` is the one function that reads the config to build a model.
"""

from .retinanet import RetinaNet, RetinaNetHead, build_model

__all__ = ["RetinaNet", "RetinaNetHead", "build_model"]
