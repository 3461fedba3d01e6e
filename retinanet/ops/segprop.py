"""Segment proposals' window geometry: pyramid scales, window boxes, patch labels, crops and mask pasting.

A *window* is a square image region in which a proposal model predicts one mask (m x m, covering the
window) and one objectness score: DeepMask's input window W (thesis sec. 3.4), or the image region of
an FPN mask MLP (thesis sec. 4.6, Fig. 4.4). A window expects an object of `canonical` px (DeepMask:
128 of 224, sec. 3.4; the released code's 92 of 160) centred in it. Windows are xyxy boxes in
continuous pixel coordinates (pixel column i spans [i, i + 1)), as everywhere in the package.

Labels follow the released DeepMask code's sampling rules (facebookresearch/deepmask DataSampler):
a window is positive for an object centred within +-`shift` window px of its centre (both axes) whose
size max(w, h) is within 2^(+-scale_tol) of the canonical size; negative when every object's centre
is at least `neg_shift` window px away or its size is an octave or more off; ignored otherwise.

The FPN mask proposals' rules of the FPN paper's appendix A (arXiv 1612.03144; `mlp_object_sizes`,
`assign_to_scales`, `label_locations`) instead give each object to ONE (level, MLP): the one whose
canonical object size is nearest to the object's max(w, h) in log space; a location of that (level, MLP)
is positive for it when the object's centre lies within +-radius px (one stride) of the location's
centre on both axes, and negative when no object given to that (level, MLP) is that close. The window of
such a location is its mask region, (1 + padding) x the canonical size, centred on the location.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .matcher import ignore_crowd


def pyramid_scales(min_exp: float, max_exp: float, step: float) -> list:
    """Image scales 2^min_exp, 2^(min_exp + step), ..., 2^max_exp (ends included).

    Example: pyramid_scales(-2, 1, 0.5) is the thesis's 2^{-2:0.5:1} (sec. 3.5), seven scales
    [0.25, 0.354, 0.5, 0.707, 1, 1.414, 2].
    """
    if step <= 0 or max_exp < min_exp:
        raise ValueError(f"pyramid exponents need min <= max and step > 0, got {min_exp}, {max_exp}, {step}")
    count = int(math.floor((max_exp - min_exp) / step + 1e-6)) + 1
    return [2.0 ** (min_exp + i * step) for i in range(count)]


def grid_windows(grid_h: int, grid_w: int, *, stride: float, window: float, offset: float, scale: float = 1.0,
                 device=None) -> Tensor:
    """The windows of a convolutional grid, in the unscaled image's pixels: (grid_h * grid_w, 4) xyxy, row-major.

    Output (i, j) of a sliding-window model on an image scaled by `scale` (and shifted by `offset` px
    of padding) sees the scaled image's square [j * stride - offset, j * stride - offset + window)
    (x; y alike with i); in the original image that is the same square divided by `scale`.
    Example: stride 16, window 80, offset 40, scale 2: output (0, 1) -> (-12, -20, 28, 20).
    """
    ys = torch.arange(grid_h, dtype=torch.float32, device=device) * stride - offset
    xs = torch.arange(grid_w, dtype=torch.float32, device=device) * stride - offset
    y0, x0 = torch.meshgrid(ys, xs, indexing="ij")  # (grid_h, grid_w) each
    boxes = torch.stack([x0, y0, x0 + window, y0 + window], dim=-1).reshape(-1, 4)  # (grid_h * grid_w, 4)
    return boxes / scale


def label_windows(windows: Tensor, gt_boxes: Tensor, *, object_ratio: float, shift: float, neg_shift: float,
                  scale_tol: float, crowd_boxes: Optional[Tensor] = None, crowd_ioa: float = 0.7) -> tuple:
    """Label square windows against one image's objects (the released DeepMask code's rules; module docstring).

    windows (P, 4) xyxy squares; gt_boxes (G, 4) xyxy. object_ratio: canonical object size / window
    size; shift, neg_shift: centre distances as fractions of the window side; scale_tol: log2
    tolerance of the size for positives. crowd_boxes (C, 4): crowd regions (COCO's iscrowd), neither
    objects nor background, as for the detectors (`ops.matcher.ignore_crowd`) and in COCO evaluation:
    they make no window positive, and a window that is not positive for an object is ignored where a
    crowd region would have made it positive or ignored by the rules, or covers >= crowd_ioa of it.
    Returns (labels (P,) int64 in {1 positive, 0 negative, -1 ignored}, matched (P,) int64: the
    positive's object (the closest centre among qualifying ones), 0 elsewhere).

    Example: window (0, 0, 100, 100), object_ratio 0.5, shift 0.1, neg_shift 0.3, scale_tol 0.25;
    object (30, 30, 80, 80) (centre 55, size 50): centre 5 px off, size exact -> positive;
    object (60, 60, 110, 110) (centre 85): 35 px off >= 30 -> negative; the same as a crowd region:
    also negative; (30, 30, 80, 80) as a crowd region: ignored.
    """
    rules = dict(object_ratio=object_ratio, shift=shift, neg_shift=neg_shift, scale_tol=scale_tol)
    qualifies, near = _window_relations(windows, gt_boxes, **rules)  # (P, G) each
    labels = torch.where(qualifies.any(1), 1, torch.where(near.any(1), -1, 0))  # (P,)
    dist = _centre_distance(windows, gt_boxes)  # (P, G)
    matched = torch.where(qualifies, dist, torch.full_like(dist, float("inf"))).argmin(dim=1) if dist.shape[1] \
        else torch.zeros_like(labels)
    if crowd_boxes is not None and crowd_boxes.shape[0]:
        crowd_qualifies, crowd_near = _window_relations(windows, crowd_boxes, **rules)
        labels = torch.where((labels == 0) & (crowd_qualifies | crowd_near).any(1), -1, labels)
        labels = ignore_crowd(labels, windows, crowd_boxes, crowd_ioa)
    return labels.to(torch.int64), torch.where(labels == 1, matched, torch.zeros_like(matched)).to(torch.int64)


def mlp_object_sizes(strides: list, num_mlps: int, object_cells: float) -> list:
    """The canonical object size (px) of every (level, MLP) of the FPN mask proposals, level by level, MLP by MLP
    (their output order): MLP j of `num_mlps` on a level of stride s expects object_cells * s * 2^(j / num_mlps) px
    (FPN appendix A: 8 cells, {32, ..., 512} px over P2-P6 for the 5 x 5 MLP, sqrt(2) times that for the 7 x 7).

    Example: strides [4, 8], 2 MLPs, 8 cells -> [32, 45.25, 64, 90.51].
    """
    return [object_cells * s * 2.0 ** (j / num_mlps) for s in strides for j in range(num_mlps)]


def assign_to_scales(boxes: Tensor, sizes) -> Tensor:
    """Each box's (level, MLP): boxes (G, 4) xyxy, sizes (S,) canonical object sizes (`mlp_object_sizes`) -> (G,)
    int64 index of the size nearest to the box's scale max(w, h) in log space (FPN appendix A: "objects at
    intermediate scales are mapped to the nearest scale in log space"); scales beyond the ends go to the nearest end;
    a scale exactly between two sizes goes to the smaller.

    Example: sizes [32, 45.25, 64]: scale 40 -> 1 (log2 distances 0.32 and 0.18), 12 -> 0, 600 -> 2.
    """
    sizes = torch.as_tensor(sizes, dtype=torch.float32, device=boxes.device)
    if boxes.shape[0] == 0:
        return torch.zeros(0, dtype=torch.int64, device=boxes.device)
    scale = (boxes[:, 2:] - boxes[:, :2]).amax(dim=1).clamp(min=1e-6)  # (G,)
    gap = (torch.log2(scale)[:, None] - torch.log2(sizes)[None]).abs()  # (G, S)
    return gap.argmin(dim=1)  # the first of equal minima: sizes ascend, so the smaller


def label_locations(centres: Tensor, block: Tensor, radius: Tensor, gt_boxes: Tensor, gt_block: Tensor, *,
                    crowd_boxes: Optional[Tensor] = None, crowd_block: Optional[Tensor] = None,
                    windows: Optional[Tensor] = None, crowd_ioa: float = 0.7) -> tuple:
    """Label the FPN mask proposals' locations by FPN appendix A's rules (module docstring).

    centres (P, 2) x, y: each location's centre in px; block (P,) int64: its (level, MLP); radius (P,): the
    positive range in px (one stride of its level); gt_boxes (G, 4) xyxy and gt_block (G,) each object's (level,
    MLP) (`assign_to_scales`). A location is positive for an object of its own block whose centre lies within
    +-radius of its centre on both axes (<=); of several, the nearest centre (Euclidean; then the first object). It is
    negative when no object of its block is that close: objects given to other blocks do not count, however close.
    crowd_boxes (C, 4) / crowd_block (C,): crowd regions (iscrowd), neither objects nor background: a location that is
    not positive is ignored where a crowd region of its block would have made it positive, or where its window
    (windows (P, 4), its mask region) is covered >= crowd_ioa by a crowd region (`ops.matcher.ignore_crowd`).
    Returns (labels (P,) int64 in {1, 0, -1}, matched (P,) int64: the positive's object, 0 elsewhere).

    Example: centres (2, 2) and (6, 2) of a block, radius 4; an object of that block centred at (9, 2): 7 px from
    the first (negative), 3 from the second (positive); an object of another block at (2, 2) changes nothing.
    """
    def within(boxes: Tensor, blocks: Tensor) -> Tensor:  # (P, G): the box would make the location positive
        box_centre = (boxes[:, :2] + boxes[:, 2:]) / 2  # (G, 2)
        offset = (box_centre[None] - centres[:, None]).abs().amax(dim=2)  # (P, G) Chebyshev distance, px
        return (offset <= radius[:, None] + 1e-6) & (blocks[None] == block[:, None])

    qualifies = within(gt_boxes, gt_block)  # (P, G)
    labels = qualifies.any(1).to(torch.int64)  # (P,) 1 or 0
    if gt_boxes.shape[0]:
        box_centre = (gt_boxes[:, :2] + gt_boxes[:, 2:]) / 2
        dist = (box_centre[None] - centres[:, None]).pow(2).sum(2)  # (P, G) squared Euclidean
        matched = torch.where(qualifies, dist, torch.full_like(dist, float("inf"))).argmin(dim=1)
    else:
        matched = torch.zeros_like(labels)
    if crowd_boxes is not None and crowd_boxes.shape[0]:
        labels = torch.where((labels == 0) & within(crowd_boxes, crowd_block).any(1), -1, labels)
        if windows is not None:
            labels = ignore_crowd(labels, windows, crowd_boxes, crowd_ioa)
    return labels.to(torch.int64), torch.where(labels == 1, matched, torch.zeros_like(matched)).to(torch.int64)


def _centre_distance(windows: Tensor, boxes: Tensor) -> Tensor:
    """(P, 4) windows, (G, 4) boxes -> (P, G) Chebyshev distance of the centres in window sides."""
    side = windows[:, 2] - windows[:, 0]  # (P,)
    centre = (windows[:, :2] + windows[:, 2:]) / 2  # (P, 2)
    box_centre = (boxes[:, :2] + boxes[:, 2:]) / 2  # (G, 2)
    return (box_centre[None] - centre[:, None]).abs().amax(dim=2) / side[:, None]


def _window_relations(windows: Tensor, boxes: Tensor, *, object_ratio: float, shift: float, neg_shift: float,
                      scale_tol: float) -> tuple:
    """(P, 4) windows, (G, 4) boxes -> (qualifies (P, G): the box would make the window positive, near (P, G):
    the box rules out a negative), by the rules of `label_windows`."""
    side = windows[:, 2] - windows[:, 0]  # (P,)
    size = (boxes[:, 2:] - boxes[:, :2]).amax(dim=1).clamp(min=1e-6)  # (G,)
    dist = _centre_distance(windows, boxes)  # (P, G)
    log_ratio = torch.log2(size[None] / (object_ratio * side[:, None])).abs()  # (P, G)
    eps = 1e-6
    qualifies = (dist <= shift + eps) & (log_ratio <= scale_tol + eps)
    near = (dist < neg_shift - eps) & (log_ratio < 1.0 - eps)
    return qualifies, near


def _affine_grid(windows: Tensor, out_h: int, out_w: int, height: int, width: int) -> Tensor:
    """grid_sample coordinates (align_corners=False) of an out_h x out_w sampling of each window of an
    image tensor of height x width: (P, out_h, out_w, 2)."""
    t = (torch.arange(out_w, dtype=torch.float32, device=windows.device) + 0.5) / out_w  # (out_w,) in (0, 1)
    s = (torch.arange(out_h, dtype=torch.float32, device=windows.device) + 0.5) / out_h  # (out_h,)
    x = windows[:, 0, None] + t[None] * (windows[:, 2] - windows[:, 0])[:, None]  # (P, out_w) pixel coordinates
    y = windows[:, 1, None] + s[None] * (windows[:, 3] - windows[:, 1])[:, None]  # (P, out_h)
    gx = (2 * x / width - 1)[:, None, :].expand(-1, out_h, -1)
    gy = (2 * y / height - 1)[:, :, None].expand(-1, -1, out_w)
    return torch.stack([gx, gy], dim=-1)


def extend_edges(images: Tensor, image_sizes: Tensor) -> Tensor:
    """images (B, C, H, W), each image in its top-left image_sizes (B, 2) (h, w) -> the same, each image's last row
    and column repeated over the rest of the batch: resampling it then reads only its own pixels (bilinear
    interpolation clamps at the image's edge, as for the image alone)."""
    b, c, h, w = images.shape
    rows = torch.minimum(torch.arange(h, device=images.device), image_sizes[:, :1] - 1)  # (B, H)
    cols = torch.minimum(torch.arange(w, device=images.device), image_sizes[:, 1:] - 1)  # (B, W)
    images = images.gather(2, rows[:, None, :, None].expand(b, c, h, w))
    return images.gather(3, cols[:, None, None, :].expand(b, c, h, w))


def reflect_pad(images: Tensor, image_sizes: Tensor, pad: int, multiple: int) -> Tensor:
    """Pad each image of a batch by `pad` px on every side, reflected at its own edges (as F.pad's "reflect":
    pixel -i is pixel i) as far as its size allows and 0 beyond, whatever the batch holds beside it.

    images (B, C, H, W), each image in its top-left image_sizes (B, 2) (h, w) -> (B, C, H', W') with
    H' = H + 2 pad rounded up to a multiple of `multiple` (W' alike); image pixel (y, x) at (y + pad, x + pad).
    Example: a row [a, b, c] (w = 3) in a batch 5 px wide, pad 3, multiple 16 -> [0, c, b, a, b, c, b, a, 0, ..., 0]
    (16 in all): reflection reaches w - 1 = 2 px on each side; the rest is 0."""
    b, c, h, w = images.shape
    out_h, out_w = h + 2 * pad + (-(h + 2 * pad) % multiple), w + 2 * pad + (-(w + 2 * pad) % multiple)
    (rows, row_ok), (cols, col_ok) = (_reflected(n, image_sizes[:, i:i + 1], pad, limit)
                                      for i, (n, limit) in enumerate([(out_h, h), (out_w, w)]))
    images = images.gather(2, rows[:, None, :, None].expand(b, c, out_h, w))  # (B, C, H', W)
    images = images.gather(3, cols[:, None, None, :].expand(b, c, out_h, out_w))  # (B, C, H', W')
    keep = row_ok[:, None, :, None] & col_ok[:, None, None, :]  # (B, 1, H', W')
    return torch.where(keep, images, torch.zeros((), dtype=images.dtype, device=images.device))


def _reflected(count: int, size: Tensor, pad: int, limit: int) -> tuple:
    """Along one axis of `reflect_pad`: output positions 0..count-1 -> (source index (B, count) in [0, limit), valid
    (B, count) bool) for images of `size` (B, 1) pixels placed at `pad`."""
    p = torch.arange(count, device=size.device) - pad  # (count,) position relative to the image
    src = torch.where(p < 0, -p, torch.where(p >= size, 2 * (size - 1) - p, p))  # (B, count)
    valid = (src >= 0) & (src < size) & (p < size + pad)
    return src.clamp(0, limit - 1), valid


def crop_windows(images: Tensor, windows: Tensor, size: int, image_sizes: Optional[list] = None) -> Tensor:
    """Resample square windows of a batch: images (B, C, H, W), windows (B, n, 4) xyxy in its pixels ->
    (B * n, C, size, size), image b's windows first; bilinear, each image reflected at its own edges
    (sec. 3.5), so a window reads only its image's pixels, never the batch's padding: image_sizes
    [(h, w)] each image's region of the batch (top-left; default: the whole batch)."""
    b, n = windows.shape[:2]
    h, w = images.shape[-2:]
    sizes = torch.tensor(image_sizes if image_sizes is not None else [(h, w)] * b, dtype=torch.float32,
                         device=windows.device).reshape(b, 1, 1, 2)  # (B, 1, 1, 2) h, w
    t = (torch.arange(size, dtype=torch.float32, device=windows.device) + 0.5) / size  # (size,) in (0, 1)
    x = windows[..., 0, None] + t * (windows[..., 2] - windows[..., 0])[..., None]  # (B, n, size) pixel coordinates
    y = windows[..., 1, None] + t * (windows[..., 3] - windows[..., 1])[..., None]
    x, y = _reflect(x, sizes[..., 1]), _reflect(y, sizes[..., 0])
    gx = (2 * x / w - 1)[:, :, None, :].expand(-1, -1, size, -1)  # (B, n, size, size)
    gy = (2 * y / h - 1)[:, :, :, None].expand(-1, -1, -1, size)
    grid = torch.stack([gx, gy], dim=-1).reshape(b, n * size, size, 2)  # the n crops of an image stacked vertically
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.reshape(b, images.shape[1], n, size, size).transpose(1, 2).reshape(b * n, images.shape[1], size, size)


def _reflect(x: Tensor, size: Tensor) -> Tensor:
    """Continuous pixel coordinates reflected at an image's edges 0 and `size` (repeatedly, as grid_sample's
    reflection padding), then clamped to its first and last pixel centres: bilinear taps stay in the image."""
    t = torch.remainder(x, 2 * size)
    t = torch.where(t > size, 2 * size - t, t)
    return torch.minimum(t.clamp(min=0.5), size - 0.5)


def mask_targets(masks: Tensor, windows: Tensor, size: int) -> Tensor:
    """Each window's object mask on a size x size grid over the window: masks (P, H, W) (each window's own
    object), windows (P, 4) -> (P, size, size) float in {0, 1} (bilinear, >= 0.5; 0 outside the image)."""
    if masks.shape[0] == 0:
        return masks.new_zeros((0, size, size), dtype=torch.float32)
    h, w = masks.shape[-2:]
    grid = _affine_grid(windows, size, size, h, w)
    sampled = F.grid_sample(masks[:, None].float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return (sampled[:, 0] >= 0.5).float()


def _interpolation_matrix(pixels: Tensor, lo: Tensor, hi: Tensor, size: int, m: int) -> Tensor:
    """Bilinear weights from m samples over [lo, hi) to the centres of pixels (N, P) (integer indices along an
    axis of `size` pixels): (N, P, m).

    Row p holds the two taps of pixel p (grid_sample's align_corners=False convention, border-clamped);
    rows of pixels outside [lo, hi) or outside the image are zero."""
    centres = pixels.float() + 0.5  # (N, P)
    u = (centres - lo[:, None]) / (hi - lo)[:, None]  # (N, P) position in the window, 0..1
    src = u * m - 0.5  # (N, P) continuous index of the m samples
    i0 = src.floor()
    frac = src - i0
    i0 = i0.long()
    weights = torch.zeros(pixels.shape + (m,), dtype=torch.float32, device=lo.device)
    weights.scatter_add_(2, i0.clamp(0, m - 1)[..., None], (1 - frac)[..., None])
    weights.scatter_add_(2, (i0 + 1).clamp(0, m - 1)[..., None], frac[..., None])
    inside = (u >= 0) & (u <= 1) & (pixels >= 0) & (pixels < size)
    return weights * inside[..., None]


class RLEMasks:
    """D bit masks of one height x width image as COCO compressed RLEs: the compact form in which segment
    proposals hand over their masks (a few bytes a run; as (D, H, W) bool they would take D H W bytes).

    rles: D dicts {"size": [height, width], "counts": str}, COCO's (what `ops.masks.encode_masks` writes,
    JSON-ready). len(masks) is D and masks.shape (D, height, width); masks[i] is mask i as a (height, width)
    bool array; masks[index] (a slice, or an integer or bool array, list or tensor) the selected masks as
    RLEMasks; iterating gives the (height, width) arrays one at a time; np.asarray(masks) or masks.numpy()
    decodes all of them, (D, height, width) bool: the dense form, only when a caller asks for it.
    """

    def __init__(self, rles: list, height: int, width: int):
        self.rles, self.height, self.width = list(rles), int(height), int(width)

    def __len__(self) -> int:
        return len(self.rles)

    @property
    def shape(self) -> tuple:
        return (len(self.rles), self.height, self.width)

    def __getitem__(self, index):
        if isinstance(index, (int, np.integer)):
            return self._decode([self.rles[index]])[0]
        if isinstance(index, slice):
            return RLEMasks(self.rles[index], self.height, self.width)
        index = np.asarray(index.cpu() if isinstance(index, Tensor) else index).reshape(-1)
        if index.dtype == bool:
            index = np.flatnonzero(index)
        return RLEMasks([self.rles[i] for i in index.tolist()], self.height, self.width)

    def __iter__(self):
        for rle in self.rles:
            yield self._decode([rle])[0]

    def numpy(self) -> np.ndarray:
        """(D, height, width) bool."""
        return self._decode(self.rles)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        dense = self.numpy()
        return dense if dtype is None else dense.astype(dtype)

    def __repr__(self) -> str:
        return f"RLEMasks({len(self)} masks, {self.height} x {self.width})"

    def _decode(self, rles: list) -> np.ndarray:
        from .masks import decode_rles

        return decode_rles(rles, self.height, self.width).astype(bool)


def paste_masks(masks: Tensor, windows: Tensor, height: int, width: int, threshold: float,
                chunk_pixels: int = 1 << 22) -> tuple:
    """Window masks into image pixels: masks (N, m, m) probabilities over windows (N, 4) xyxy -> (the N masks
    of a height x width image as RLEMasks, boxes (N, 4) float32 xyxy of each mask's pixels, as
    `ops.masks.masks_to_boxes`: zeros for an empty mask, on the masks' device). Pixel (y, x) is set where
    the bilinear value at its centre (x + 0.5, y + 0.5) is >= threshold > 0 (the mask's values clamped at
    its border); pixels outside a window are not.

    Each mask is computed over its window's pixels only (clipped to the image), a few masks at a time
    (at most about `chunk_pixels` pixels in all), and kept as run lengths: memory does not grow with
    N x height x width. Bilinear interpolation is separable, so each paste is two small matrix products,
    Wx (w, m) @ mask^T (m, m) @ Wy^T (m, h), each column of the image's pixels top to bottom (COCO's RLE order)."""
    from pycocotools import mask as mask_api

    if threshold <= 0:
        raise ValueError(f"the mask threshold must be above 0 (pixels outside every window are 0), got {threshold}")
    n, m = masks.shape[0], masks.shape[-1]
    boxes = torch.zeros((n, 4), dtype=torch.float32, device=masks.device)
    empty = mask_api.frPyObjects({"size": [height, width], "counts": [height * width]}, height, width)["counts"]
    rles = [{"size": [height, width], "counts": empty.decode("ascii")} for _ in range(n)]
    if n == 0:
        return RLEMasks(rles, height, width), boxes
    windows = windows.float()
    start, end = _hot_region(masks.float(), windows, threshold)
    start = start.floor().clamp(min=0).long()  # (N, 2) x, y: the first pixel column and row that may be set
    end = torch.minimum(end.ceil().long(), torch.tensor([width, height], device=windows.device))  # after the last
    extent = (end - start).clamp(min=0).cpu()  # (N, 2) columns, rows
    order = (extent[:, 0] * extent[:, 1]).argsort(descending=True)
    order = order[extent[order].prod(1) > 0].tolist()  # windows that overlap the image, largest first
    probs = masks.float().transpose(1, 2)  # (N, m, m) mask^T
    for chunk in _chunks(order, extent.tolist(), chunk_pixels):
        idx = torch.tensor(chunk, device=masks.device)
        cw, ch = (int(v) for v in extent[chunk].amax(0))
        x0, y0 = start[idx, 0], start[idx, 1] - 1  # (c,): one row above each crop, and one below, are 0
        cols = x0[:, None] + torch.arange(cw, device=masks.device)  # (c, cw) image columns
        rows = y0[:, None] + torch.arange(ch + 2, device=masks.device)  # (c, ch + 2) image rows
        wx = _interpolation_matrix(cols, windows[idx, 0], windows[idx, 2], width, m)  # (c, cw, m)
        wy = _interpolation_matrix(rows, windows[idx, 1], windows[idx, 3], height, m)  # (c, ch + 2, m)
        bits = wx @ probs[idx] @ wy.transpose(1, 2) >= threshold  # (c, cw, ch + 2): pixel (y0 + j, x0 + i) at [i, j]
        k, col, row = (bits[:, :, 1:] != bits[:, :, :-1]).nonzero(as_tuple=True)  # where runs of 1s start or end
        x, y = x0[k] + col, y0[k] + row + 1  # the run's first pixel, or the pixel after its last
        boxes[idx] = _run_boxes(k, x, y, len(chunk))
        for i, counts in zip(chunk, _run_lengths(k, x * height + y, len(chunk), height * width)):
            rles[i] = {"size": [height, width], "counts": counts}
        compressed = mask_api.frPyObjects([rles[i] for i in chunk], height, width)
        for i, rle in zip(chunk, compressed):
            rles[i] = {"size": [height, width], "counts": rle["counts"].decode("ascii")}
    return RLEMasks(rles, height, width), boxes


def _hot_region(masks: Tensor, windows: Tensor, threshold: float) -> tuple:
    """masks (N, m, m) over windows (N, 4) -> where in the image a pasted pixel can reach the threshold: (start,
    end) (N, 2) x, y pixel coordinates, a pixel of margin included (start >= end: nowhere).

    A pasted value is a convex combination of the mask values at its (up to) 4 taps, so it reaches the
    threshold only where a tap does: within the mask cells [j0, j1] that do, i.e. pixel centres in
    [lo + (j0 - 1/2) s, lo + (j1 + 3/2) s) (s = window side / m), within the window."""
    m = masks.shape[-1]
    hot = masks >= threshold  # (N, m, m) rows y, columns x
    hot_x, hot_y = hot.any(1), hot.any(2)  # (N, m) each
    cells = torch.arange(m, device=masks.device)
    first = torch.stack([torch.where(a, cells, m).amin(1) for a in (hot_x, hot_y)], dim=1)  # (N, 2) x, y; m if none
    last = torch.stack([torch.where(a, cells, -1).amax(1) for a in (hot_x, hot_y)], dim=1)  # -1 if none
    lo, side = windows[:, :2], (windows[:, 2:] - windows[:, :2]) / m  # (N, 2) each
    start = torch.maximum(lo + (first - 0.5) * side, lo) - 1.5  # centres from c: pixels from c - 1/2; 1 px margin
    end = torch.minimum(lo + (last + 1.5) * side, windows[:, 2:]) + 1.5  # to c - 1/2, end exclusive; 1 px margin
    return start, torch.where((last >= 0).all(1, keepdim=True), end, start)


def _chunks(order: list, extents: list, budget: int):
    """Split `order` (mask indices, largest window first) into runs whose (count x widest x tallest) <= budget."""
    chunk, cw, ch = [], 0, 0
    for i in order:
        w, h = extents[i]
        if chunk and (len(chunk) + 1) * max(cw, w) * max(ch, h) > budget:
            yield chunk
            chunk, cw, ch = [], 0, 0
        chunk.append(i)
        cw, ch = max(cw, w), max(ch, h)
    if chunk:
        yield chunk


def _run_boxes(k: Tensor, x: Tensor, y: Tensor, count: int) -> Tensor:
    """The transitions of `count` masks (mask k, image column x, row y: where a run of 1s starts, or the row after it
    ends) -> (count, 4) float32 xyxy boxes of the masks' pixels (zeros for a mask without transitions: empty)."""
    boxes = torch.zeros((count, 4), dtype=torch.int64, device=k.device)
    if k.numel():
        big = torch.full((count,), torch.iinfo(torch.int64).max, device=k.device)
        boxes[:, 0] = big.scatter_reduce(0, k, x, "amin")
        boxes[:, 1] = big.scatter_reduce(0, k, y, "amin")  # the topmost start
        boxes[:, 2] = torch.zeros_like(big).scatter_reduce(0, k, x + 1, "amax")
        boxes[:, 3] = torch.zeros_like(big).scatter_reduce(0, k, y, "amax")  # the lowest end
        boxes *= torch.zeros_like(big, dtype=torch.bool).index_fill(0, k, True)[:, None]
    return boxes.float()


def _run_lengths(k: Tensor, pos: Tensor, count: int, total: int) -> list:
    """The transitions of `count` masks (mask k, index pos in the image's column-major pixels; sorted) -> for each mask,
    the COCO run lengths (np.uint32): alternating runs of 0s and 1s in column-major order, starting with 0s."""
    # a run ending at the bottom of a column and one starting at the top of the next are one run
    joined = (pos[1:] == pos[:-1]) & (k[1:] == k[:-1])
    drop = torch.zeros_like(pos, dtype=torch.bool)
    drop[1:] |= joined
    drop[:-1] |= joined
    k, pos = k[~drop].cpu().numpy(), pos[~drop].cpu().numpy()
    bounds = np.searchsorted(k, np.arange(count + 1))
    out = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        ends = pos[a:b] if b > a and pos[b - 1] == total else np.append(pos[a:b], total)
        out.append(np.diff(ends, prepend=0).astype(np.uint32))  # no empty run of 0s at the end (as COCO's encode)
    return out
