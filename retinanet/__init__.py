"""retinanet: RetinaNet (Focal Loss for Dense Object Detection) with FPN, in PyTorch.

The names below are imported on first use (PEP 562), so commands that never touch the model
(`retinanet eval` on a results file) do not pay the ~1.6 s it takes to import torch.
"""

import importlib

__version__ = "0.1.0"
__all__ = ["Config", "Detections", "Predictor", "RetinaNet", "build_model", "load_config", "__version__"]

# public name -> submodule that defines it
_LAZY = {"Config": "config", "load_config": "config", "RetinaNet": "modeling", "build_model": "modeling",
         "Predictor": "predict", "Detections": "predict"}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
