"""Use the weights people already have: torchvision ImageNet ResNets (and, later, its RetinaNet)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


def read_state_dict(path: str) -> dict:
    """A state dict from a file, loaded as data only (`weights_only=True`): nothing in it can run."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"weights file not found: {p}")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{p}: not a readable PyTorch weights file ({type(e).__name__}: {e})") from None
    for key in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{p}: expected a state dict (a mapping of names to tensors)")
    return obj


def load_backbone_weights(backbone: nn.Module, path: str, verbose: bool = True) -> tuple:
    """Load a torchvision ImageNet ResNet checkpoint (names like `layer1.0.conv1.weight`) into our ResNet.

    The classifier (`fc.*`) is dropped. Returns (missing, unexpected) key lists and prints them.
    """
    state = {k: v for k, v in read_state_dict(path).items() if not k.startswith("fc.")}
    own = backbone.state_dict()
    mismatched = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if mismatched:
        k = mismatched[0]
        raise ValueError(f"{path}: shape mismatch for '{k}': file {tuple(state[k].shape)}, model {tuple(own[k].shape)} "
                         f"({len(mismatched)} mismatched keys; is it the same ResNet depth and width?)")
    result = backbone.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys]
    unexpected = [k for k in result.unexpected_keys if not k.endswith("num_batches_tracked")]
    if verbose:
        print(f"loaded backbone weights from {path}: {len(state) - len(unexpected)} tensors, "
              f"{len(missing)} missing{': ' + ', '.join(missing[:10]) if missing else ''}, "
              f"{len(unexpected)} unexpected{': ' + ', '.join(unexpected[:10]) if unexpected else ''}")
    return missing, unexpected
