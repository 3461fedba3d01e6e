"""retinanet: RetinaNet (Focal Loss for Dense Object Detection) with FPN, in PyTorch."""

from .config import Config, load_config
from .model import RetinaNet, build_model
from .predict import Detections, Predictor

__version__ = "0.1.0"
__all__ = ["Config", "Detections", "Predictor", "RetinaNet", "build_model", "load_config", "__version__"]
