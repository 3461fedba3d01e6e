"""torchvision's compiled kernels (NMS, RoIAlign, RoI pooling), used where torchvision imports and they run.

The package never requires torchvision: each caller falls back to its own implementation when
`torchvision_op` returns None.
"""

from __future__ import annotations

import functools

import torch

_PROBES = {  # one call on tiny inputs per kernel: importing is not enough, the compiled op must load and run
    "nms": lambda op: op(torch.zeros(1, 4), torch.zeros(1), 0.5),
    "roi_align": lambda op: op(torch.zeros(1, 1, 2, 2), torch.zeros(1, 5), 1),
    "roi_pool": lambda op: op(torch.zeros(1, 1, 2, 2), torch.zeros(1, 5), 1),
}


@functools.lru_cache(maxsize=None)
def torchvision_op(name: str):
    """torchvision.ops.<name> ("nms", "roi_align" or "roi_pool") if torchvision imports and that kernel runs,
    else None. Probed once per name and process."""
    if name not in _PROBES:
        raise ValueError(f"unknown torchvision op '{name}' (one of {sorted(_PROBES)})")
    try:
        import torchvision.ops

        op = getattr(torchvision.ops, name)
        _PROBES[name](op)
    except Exception:  # not installed, or its compiled ops do not load with this torch build
        return None
    return op
