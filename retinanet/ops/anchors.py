"""The anchor grid for every pyramid level (Focal Loss paper, sec. 4, "Anchors").

On level l (stride 2^l) each location gets A = len(scales) * len(ratios) anchors of area
(base_l * scale)^2 and aspect ratio h/w = ratio; base_l runs 32..512 on P3..P7.
Anchors are xyxy in the padded input's pixels, ordered location-major
(row, column, then anchor index), which is the order the heads' outputs are flattened in.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..syncs import to_device


def cell_anchors(size: float, scales, ratios, style: str = "float") -> Tensor:
    """The A anchors of one location, centred at (0, 0): (A, 4) xyxy.

    style "float": sizes base * scale as floats, order scale-major (for each scale, each ratio),
    as in detectron2. style "torchvision": sizes int-truncated, corners rounded, ratio-major,
    which is what torchvision's AnchorGenerator computes (needed to reuse its weights exactly).
    """
    if style == "float":
        rows = []
        for scale in scales:
            area = (size * scale) ** 2
            for ratio in ratios:
                w = math.sqrt(area / ratio)
                h = ratio * w
                rows.append([-w / 2, -h / 2, w / 2, h / 2])
        return torch.tensor(rows, dtype=torch.float32)
    if style == "torchvision":
        sizes = torch.tensor([float(int(size * s)) for s in scales], dtype=torch.float32)
        ratios_t = torch.as_tensor(ratios, dtype=torch.float32)
        h_ratios = torch.sqrt(ratios_t)
        w_ratios = 1 / h_ratios
        ws = (w_ratios[:, None] * sizes[None, :]).reshape(-1)  # ratio-major
        hs = (h_ratios[:, None] * sizes[None, :]).reshape(-1)
        return (torch.stack([-ws, -hs, ws, hs], dim=1) / 2).round()
    raise ValueError(f"unknown anchor style '{style}' (expected 'float' or 'torchvision')")


class AnchorGenerator:
    """Anchors for a list of feature maps, cached per (feature sizes, image size, device).

    Args:
        sizes: one base size per level, e.g. [32, 64, 128, 256, 512] for P3..P7.
        scales: octave scales per base size, e.g. [1, 2^(1/3), 2^(2/3)].
        ratios: aspect ratios h/w, e.g. [0.5, 1, 2].
        strides: one stride per level, e.g. [8, 16, 32, 64, 128].
        offset: anchor centres at ((j + offset) * stride, (i + offset) * stride).
        style: "float" or "torchvision" (see `cell_anchors`); with "torchvision" the stride of
            each level is image_size // feature_size, as torchvision computes it.
    """

    def __init__(self, sizes, scales, ratios, strides, offset: float = 0.0, style: str = "float"):
        if len(sizes) != len(strides):
            raise ValueError(f"{len(sizes)} anchor sizes for {len(strides)} pyramid levels")
        self.strides = list(strides)
        self.offset = offset
        self.style = style
        self.cells = [cell_anchors(s, scales, ratios, style) for s in sizes]  # L x (A, 4)
        self.num_anchors = len(scales) * len(ratios)
        self._cache: dict = {}

    def grid(self, level: int, height: int, width: int, image_size, device) -> Tensor:
        """(H*W*A, 4) anchors of one level."""
        if self.style == "torchvision":
            sy, sx = image_size[0] // height, image_size[1] // width
        else:
            sy = sx = self.strides[level]
        ys = (torch.arange(height, dtype=torch.float32, device=device) + self.offset) * sy
        xs = (torch.arange(width, dtype=torch.float32, device=device) + self.offset) * sx
        cy, cx = torch.meshgrid(ys, xs, indexing="ij")
        shifts = torch.stack([cx, cy, cx, cy], dim=-1).reshape(-1, 1, 4)  # (H*W, 1, 4)
        return (shifts + to_device(self.cells[level], device)[None]).reshape(-1, 4)  # (H*W*A, 4)

    def __call__(self, feature_sizes, image_size, device) -> list:
        """feature_sizes: [(H_l, W_l)] per level; image_size: the padded (H, W). -> L x (H_l*W_l*A, 4)."""
        if _tracing():  # a cached tensor would leak the tracer's fake tensors into later calls
            return [self.grid(i, h, w, image_size, device) for i, (h, w) in enumerate(feature_sizes)]
        key = (tuple(map(tuple, feature_sizes)), tuple(image_size) if self.style == "torchvision" else None, str(device))
        if key not in self._cache:
            if len(self._cache) > 64:
                self._cache.clear()
            self._cache[key] = [self.grid(i, h, w, image_size, device) for i, (h, w) in enumerate(feature_sizes)]
        return self._cache[key]


def _tracing() -> bool:
    """Whether an exporter or compiler is tracing the current call (ONNX export, torch.export, torch.compile)."""
    compiler = getattr(torch, "compiler", None)
    return bool(torch.jit.is_tracing() or (compiler is not None and (
        compiler.is_compiling() or (hasattr(compiler, "is_exporting") and compiler.is_exporting()))))
