"""RoIAlign (Mask R-CNN, He et al. 2017) and RoI pooling (Fast R-CNN, Girshick 2015) on tensors.

Both follow torchvision.ops.roi_align / roi_pool exactly (same sample points, same boundary
rules, same rounding), so a model converted from torchvision pools the same features. They are
vectorized over RoIs. Bilinear sampling is separable, so each RoIAlign bin is a weighted sum of
the few feature rows x columns it reads (3 x 3 or 4 x 4 with sampling_ratio 2 on an FPN level),
with weights summed over its sample points: RoIAlign is one sparse matrix A (bins x feature
pixels), the output A @ features and the gradient A^T @ grad_output, two sparse-dense products
over channels-last rows. RoI pooling gathers the window of every bin, one row x column step at a
time for all RoIs at once; its gradient goes through autograd to the maxima.

rois: (R, 5) [batch index, x0, y0, x1, y1] in image pixels; spatial_scale maps them to the
feature map (1 / stride).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .torchvision_ops import torchvision_op


def _pair(size) -> tuple:
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _coordinate_dtype(features: Tensor) -> torch.dtype:
    """The dtype RoI coordinates, sample positions and weights are computed in: float32, or float64 for
    float64 features. Never the features' bf16: with 8 significant bits, sample positions on a 128-256
    pixel feature map would move in whole-pixel steps and RoI corners at 512-1024 image pixels in 4-pixel
    steps (fp16, 11 bits: 1-pixel steps from 1024 pixels)."""
    return torch.float64 if features.dtype == torch.float64 else torch.float32


def _axis_taps(start: Tensor, bin_size: Tensor, grid: Tensor, num_bins: int, max_grid: int, length: int) -> tuple:
    """The feature rows (or columns) one axis of each bin reads, with their bilinear weights.

    start, bin_size, grid: (R,) RoI start, bin size (feature pixels) and samples per bin (per
    RoI; samples at index >= grid are masked off). Returns index (R, P, T) int64 and weight
    (R, P, T): bin p reads rows index[..., t] with weights weight[..., t], the sum over the bin's
    samples of torchvision's interpolation weights (0 for samples outside [-1, length]). T is
    the smaller of 2 * max_grid (each sample's two rows) and the most distinct rows a bin
    touches (consecutive rows first .. first + K - 1, each row's weights summed): the second
    is smaller for bins under 2 pixels, the first for long thin RoIs. Either way the rows of a bin
    are in increasing order and a row has a nonzero weight at most once.
    """
    device, dtype = start.device, start.dtype
    p = torch.arange(num_bins, device=device, dtype=dtype)  # (P,)
    i = torch.arange(max_grid, device=device, dtype=dtype)  # (G,)
    gridf = grid.to(dtype).clamp(min=1)
    # the sample coordinate, in the order torchvision's kernel evaluates it (same rounding)
    coord = (start[:, None, None] + p[None, :, None] * bin_size[:, None, None]) \
        + (i[None, None, :] + 0.5) * bin_size[:, None, None] / gridf[:, None, None]  # (R, P, G)
    used = (i[None, None, :] < grid[:, None, None]) & (coord >= -1.0) & (coord <= length)
    coord = coord.clamp(min=0)
    low = coord.to(torch.int64)  # floor, coord >= 0
    at_end = low >= length - 1
    low = torch.where(at_end, torch.full_like(low, length - 1), low)
    high = torch.where(at_end, low, low + 1)
    frac = torch.where(at_end, torch.zeros_like(coord), coord - low.to(dtype))  # weight of `high`
    w_low = torch.where(used, 1.0 - frac, torch.zeros_like(frac))
    w_high = torch.where(used, frac, torch.zeros_like(frac))
    first = torch.where(used, low, torch.full_like(low, length)).amin(dim=2)  # (R, P)
    first = torch.where(first >= length, torch.zeros_like(first), first)  # bins without samples
    last = torch.where(used, high, torch.full_like(high, -1)).amax(dim=2)
    k = int((last - first).amax().clamp(min=0)) + 1
    if k >= 2 * max_grid:  # each sample's two rows, sorted; a row read twice gets its weights summed once
        index, order = torch.cat([low, high], dim=2).sort(dim=2)
        weight = torch.cat([w_low, w_high], dim=2).gather(2, order)
        for t in range(index.shape[2] - 1, 0, -1):
            same = index[..., t] == index[..., t - 1]
            weight[..., t - 1] += torch.where(same, weight[..., t], 0.0)
            weight[..., t].masked_fill_(same, 0.0)
        return index, weight
    ks = torch.arange(k, device=device)
    weight = ((low - first[..., None])[..., None] == ks).to(dtype) * w_low[..., None] \
        + ((high - first[..., None])[..., None] == ks).to(dtype) * w_high[..., None]  # (R, P, G, K)
    return (first[..., None] + ks).clamp(max=length - 1), weight.sum(dim=2)


class _SparseRoIAlign(torch.autograd.Function):
    """out = A @ rows of the features, for the sparse A given by COO entries (row, col, value), sorted by
    (row, col) and unique: features (B, C, H, W) as (B*H*W, C) channels-last rows -> (M, C).

    The backward is A^T @ grad_out, another sparse-dense product (its entries sorted by (col, row) with
    a stable sort on col), returned in the features' memory format (a gradient in another layout than
    the rest of the network slows every op it reaches). Each output row is one thread's ordered sum:
    deterministic. torchvision's CPU RoIAlign backward loops over RoIs, channels and samples one float
    at a time on one thread; this runs vectorized over the C channels of each row, on every thread.

    Both products are in the weights' dtype (float32, or float64), with autocast off, and rounded to the
    features' dtype once at the end: with bf16 features, bf16 weights and sums would add several times
    the output's own rounding error.
    """

    @staticmethod
    def forward(ctx, features: Tensor, rows: Tensor, cols: Tensor, values: Tensor, num_rows: int) -> Tensor:
        b, c, h, w = features.shape
        flat = features.permute(0, 2, 3, 1).reshape(b * h * w, c)  # (B*H*W, C); free if channels_last
        ctx.save_for_backward(rows, cols, values)
        ctx.num_rows, ctx.shape = num_rows, features.shape
        ctx.channels_last = not features.is_contiguous() and features.is_contiguous(memory_format=torch.channels_last)
        with torch.autocast(device_type=features.device.type, enabled=False):
            a = _coo(rows, cols, values, (num_rows, flat.shape[0]))
            return torch.sparse.mm(a, flat.to(values.dtype)).to(flat.dtype)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        rows, cols, values = ctx.saved_tensors
        b, c, h, w = ctx.shape
        by_col = torch.argsort(cols, stable=True)  # rows stay increasing within a column
        a_t = _coo(cols[by_col], rows[by_col], values[by_col], (b * h * w, ctx.num_rows))
        with torch.autocast(device_type=grad_out.device.type, enabled=False):
            grad = torch.sparse.mm(a_t, grad_out.to(values.dtype).contiguous()).to(grad_out.dtype)
        grad = grad.view(b, h, w, c).permute(0, 3, 1, 2)  # channels_last
        return (grad if ctx.channels_last else grad.contiguous()), None, None, None, None


def _coo(rows: Tensor, cols: Tensor, values: Tensor, size: tuple) -> Tensor:
    """A sparse COO matrix from entries already sorted by (row, col) and unique: no sort needed."""
    return torch.sparse_coo_tensor(torch.stack([rows, cols]), values, size, is_coalesced=True, check_invariants=False)


def _kernel(name: str, backend: str):
    """torchvision's kernel for `name` if `backend` asks for it ("torchvision") or allows it ("auto") and
    it is importable; None for ours ("native", or "auto" without torchvision)."""
    if backend not in ("auto", "native", "torchvision"):
        raise ValueError(f"unknown {name} backend '{backend}'")
    op = None if backend == "native" else torchvision_op(name)
    if op is None and backend == "torchvision":
        raise RuntimeError(f"torchvision {name} requested but torchvision is not importable")
    return op


def roi_align(features: Tensor, rois: Tensor, output_size, spatial_scale: float = 1.0, sampling_ratio: int = -1,
              aligned: bool = False, backend: str = "auto") -> Tensor:
    """RoIAlign: features (B, C, H, W), rois (R, 5) -> (R, C, h, w) with output_size (h, w).

    Each output bin averages grid_h x grid_w bilinear samples at regularly spaced points in the
    bin; grid = sampling_ratio, or ceil(roi size / output size) per RoI when sampling_ratio <= 0
    (RoIs are padded to the largest grid of their group and the extra samples masked off).
    aligned=False is the original RoIAlign (RoIs at least 1 x 1 feature pixel); aligned=True shifts
    the RoI by -0.5 pixel so that pixel centres line up (detectron2's ROIAlignV2). Samples more than one pixel
    outside the map count as 0; samples within one pixel of the map are clamped to its border.

    backend "native" (ours: the sparse matrix of the module docstring) or "torchvision" (its kernel:
    the same values up to float rounding, bitwise torchvision's). "auto" (default): torchvision's
    kernel when importable, except on the CPU when the features need a gradient (training): there
    ours, since torchvision's CPU backward is one thread of scalar loops (for the 1024 sampled RoIs of
    two 512 x 512 images, 0.8 s against 0.12 s for ours on one thread, forward 0.32 s against 0.14 s).

    Either way, bf16 and fp16 features (autocast, bf16 inference) are pooled with positions, weights and
    sums in float32, and the output rounded to the features' dtype once (`_coordinate_dtype`).
    """
    if torch.onnx.is_in_onnx_export():  # one op, which the exporters write as ONNX RoiAlign
        return torch.ops.retinanet.roi_align(features, rois, float(spatial_scale), *_pair(output_size),
                                             int(sampling_ratio), bool(aligned))
    return _roi_align(features, rois, output_size, spatial_scale, sampling_ratio, aligned, backend)


def _roi_align(features: Tensor, rois: Tensor, output_size, spatial_scale: float, sampling_ratio: int,
               aligned: bool, backend: str) -> Tensor:
    tv = _kernel("roi_align", backend)
    if tv is not None and not (backend == "auto" and features.device.type == "cpu" and features.requires_grad
                               and torch.is_grad_enabled()):
        coord = _coordinate_dtype(features)  # its kernel computes positions in its inputs' dtype
        return tv(features.to(coord), rois.to(coord), _pair(output_size), spatial_scale, sampling_ratio,
                  aligned).to(features.dtype)
    out_h, out_w = _pair(output_size)
    b, c, height, width = features.shape
    r = rois.shape[0]
    if r == 0:
        return features.new_zeros(r, c, out_h, out_w)
    rows, cols, values, order = _roi_align_matrix(
        rois.to(_coordinate_dtype(features)), (out_h, out_w), spatial_scale,
        sampling_ratio, aligned, (height, width))
    out = _SparseRoIAlign.apply(features, rows, cols, values, r * out_h * out_w).view(r, out_h, out_w, c)  # in `order`
    if not torch.equal(order, torch.arange(r, device=order.device)):
        out = out[torch.argsort(order)]
    return out.permute(0, 3, 1, 2).contiguous()  # (R, C, h, w)


def _roi_align_matrix(rois: Tensor, output_size: tuple, spatial_scale: float, sampling_ratio: int, aligned: bool,
                      map_size: tuple) -> tuple:
    """RoIAlign as a sparse matrix A: out[m] = sum_n A[m, n] flat[n] for the bins m = (roi, i, j) of
    roi_align's output and the feature pixels n = (image, y, x) of the (B*H*W, C) rows.

    rois (R, 5) in `_coordinate_dtype` (float32 also for bf16 and fp16 features). Returns COO entries
    rows, cols (int64) and values (nnz,) in the rois' dtype, sorted by (row, col), unique, zeros left
    out: each bin's bilinear weights, summed over its samples and divided by their count; and order
    (R,): the RoIs are grouped (below), so row m is bin (i, j) of RoI order[m // (h * w)].
    """
    out_h, out_w = output_size
    height, width = map_size
    r = rois.shape[0]
    offset = 0.5 if aligned else 0.0
    x0, y0 = rois[:, 1] * spatial_scale - offset, rois[:, 2] * spatial_scale - offset
    x1, y1 = rois[:, 3] * spatial_scale - offset, rois[:, 4] * spatial_scale - offset
    roi_w, roi_h = x1 - x0, y1 - y0
    if not aligned:
        roi_w, roi_h = roi_w.clamp(min=1.0), roi_h.clamp(min=1.0)
    bin_h, bin_w = roi_h / out_h, roi_w / out_w
    if sampling_ratio > 0:
        grid_h = torch.full((r,), sampling_ratio, dtype=torch.int64, device=rois.device)
        grid_w = grid_h
    else:
        grid_h = torch.ceil(roi_h / out_h).clamp(min=0).to(torch.int64)
        grid_w = torch.ceil(roi_w / out_w).clamp(min=0).to(torch.int64)
    count = (grid_h * grid_w).clamp(min=1).to(rois.dtype)  # (R,)
    base = rois[:, 0].to(torch.int64) * (height * width)  # (R,)
    # RoIs whose bins read very different numbers of rows/columns (a long thin RoI, a large adaptive
    # grid) go in separate groups, so that the others are not padded to their size: groups by the
    # power of 2 above the rows (columns) a bin reads, about min(2 grid, bin size + 2), from 4 up (with
    # sampling_ratio 2, every RoI is in one group: no reordering of the output).
    need_y = torch.minimum(2 * grid_h, torch.floor(bin_h).to(torch.int64) + 2).clamp(min=4)  # (R,)
    need_x = torch.minimum(2 * grid_w, torch.floor(bin_w).to(torch.int64) + 2).clamp(min=4)
    key = torch.ceil(torch.log2(need_y.double())) * 64 + torch.ceil(torch.log2(need_x.double()))  # (R,)
    bins = torch.arange(out_h * out_w, device=rois.device).view(1, out_h, out_w, 1, 1)
    entries, order = [], []
    for k in torch.unique(key).tolist():
        sel = torch.nonzero(key == k, as_tuple=True)[0]  # (R_g,)
        ys, wy = _axis_taps(y0[sel], bin_h[sel], grid_h[sel], out_h, max(int(grid_h[sel].max()), 1), height)
        xs, wx = _axis_taps(x0[sel], bin_w[sel], grid_w[sel], out_w, max(int(grid_w[sel].max()), 1), width)
        wy = wy / count[sel, None, None]  # (R_g, h, Ty)
        row_start = base[sel, None, None] + ys * width  # (R_g, h, Ty)
        pixel = row_start[:, :, None, :, None] + xs[:, None, :, None, :]  # (R_g, h, w, Ty, Tx)
        weight = wy[:, :, None, :, None] * wx[:, None, :, None, :]  # (R_g, h, w, Ty, Tx)
        nonzero = weight != 0  # pixels increase along (Ty, Tx): rows and columns are sorted and unique
        position = sum(len(o) for o in order) + torch.arange(sel.numel(), device=rois.device)  # (R_g,)
        row = (position.view(-1, 1, 1, 1, 1) * (out_h * out_w) + bins).expand_as(pixel)
        entries.append((row[nonzero], pixel[nonzero], weight[nonzero]))
        order.append(sel)
    return (*(torch.cat(parts) for parts in zip(*entries)), torch.cat(order))


@torch.library.custom_op("retinanet::roi_align", mutates_args=())
def _roi_align_op(features: Tensor, rois: Tensor, spatial_scale: float, output_height: int, output_width: int,
                  sampling_ratio: int, aligned: bool) -> Tensor:
    """`roi_align` as one operator, for the ONNX exporters (inference only: no autograd formula)."""
    return _roi_align(features, rois, (output_height, output_width), spatial_scale, sampling_ratio, aligned, "auto")


@_roi_align_op.register_fake
def _roi_align_shape(features, rois, spatial_scale, output_height, output_width, sampling_ratio, aligned):
    return features.new_empty((rois.shape[0], features.shape[1], output_height, output_width))


class _MaxGather(torch.autograd.Function):
    """out[m] = max over t with valid[t, m] of flat[index[t, m]] (0 where no t is valid): flat (N, C),
    index and valid (T, M) -> (M, C). The first maximum in t order wins, and gets the gradient."""

    @staticmethod
    def forward(ctx, flat: Tensor, index: Tensor, valid: Tensor) -> Tensor:
        out = flat.new_full((index.shape[1], flat.shape[1]), float("-inf"))
        arg = torch.zeros(out.shape, dtype=torch.int64, device=flat.device)  # t of the maximum
        buf = torch.empty_like(out)
        better = torch.empty(out.shape, dtype=torch.bool, device=flat.device)
        for t in range(index.shape[0]):
            torch.index_select(flat, 0, index[t], out=buf)
            buf.masked_fill_(~valid[t, :, None], float("-inf"))
            torch.gt(buf, out, out=better)  # strict: an equal later value does not replace the first
            torch.where(better, buf, out, out=out)
            arg.masked_fill_(better, t)
        empty = ~valid.any(dim=0)  # (M,) bins with no pixel
        out.masked_fill_(empty[:, None], 0.0)
        ctx.save_for_backward(index.t().gather(1, arg), empty)  # (M, C) row of each maximum
        ctx.num_rows = flat.shape[0]
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        rows, empty = ctx.saved_tensors
        c = grad_out.shape[1]
        grad = grad_out.new_zeros(ctx.num_rows * c)
        channel = torch.arange(c, device=grad_out.device)
        grad.index_add_(0, (rows * c + channel).flatten(), grad_out.masked_fill(empty[:, None], 0.0).flatten())
        return grad.view(ctx.num_rows, c), None, None


def _round_half_away(x: Tensor) -> Tensor:
    """C's round(): halves away from zero (torch.round rounds halves to even)."""
    return torch.sign(x) * torch.floor(x.abs() + 0.5)


def roi_pool(features: Tensor, rois: Tensor, output_size, spatial_scale: float = 1.0, backend: str = "auto") -> Tensor:
    """RoI max pooling (Fast R-CNN, sec. 2.1), torchvision.ops.roi_pool's conventions.

    features (B, C, H, W), rois (R, 5) -> (R, C, h, w). The RoI is rounded to feature pixels
    (corners rounded half away from zero, both ends inclusive, at least 1 x 1); bin (i, j) is the
    max over rows [floor(i * bin_h), ceil((i + 1) * bin_h)) (offset by the RoI start, clipped to
    the map) and likewise for columns; an empty bin is 0. The gradient goes to the maximum
    (the first one in row-major order on ties, as torchvision).

    backend: "auto" uses torchvision's kernel when it is importable (the same values; several
    times faster on CPU, where a max over each window is a tight loop), "native" our gathers,
    "torchvision" requires it.
    """
    if torch.onnx.is_in_onnx_export():  # one op, which the exporters write as ONNX MaxRoiPool
        return torch.ops.retinanet.roi_pool(features, rois, float(spatial_scale), *_pair(output_size))
    return _roi_pool(features, rois, output_size, spatial_scale, backend)


def _roi_pool(features: Tensor, rois: Tensor, output_size, spatial_scale: float, backend: str) -> Tensor:
    tv = _kernel("roi_pool", backend)
    if tv is not None:
        coord = _coordinate_dtype(features)  # its kernel computes the bins in its inputs' dtype
        return tv(features.to(coord), rois.to(coord), _pair(output_size), spatial_scale).to(features.dtype)
    out_h, out_w = _pair(output_size)
    b, c, height, width = features.shape
    r = rois.shape[0]
    if r == 0:
        return features.new_zeros(r, c, out_h, out_w)
    coord = _coordinate_dtype(features)
    rois = rois.to(coord)
    start_x = _round_half_away(rois[:, 1] * spatial_scale).to(torch.int64)
    start_y = _round_half_away(rois[:, 2] * spatial_scale).to(torch.int64)
    end_x = _round_half_away(rois[:, 3] * spatial_scale).to(torch.int64)
    end_y = _round_half_away(rois[:, 4] * spatial_scale).to(torch.int64)
    roi_w = (end_x - start_x + 1).clamp(min=1).to(coord)
    roi_h = (end_y - start_y + 1).clamp(min=1).to(coord)
    bin_w, bin_h = roi_w / out_w, roi_h / out_h  # (R,)

    def bounds(bin_size: Tensor, start: Tensor, n: int, length: int) -> tuple:
        p = torch.arange(n, device=features.device, dtype=coord)
        lo = torch.floor(p[None] * bin_size[:, None]).to(torch.int64) + start[:, None]
        hi = torch.ceil((p[None] + 1) * bin_size[:, None]).to(torch.int64) + start[:, None]
        return lo.clamp(0, length), hi.clamp(0, length)  # (R, n) each, [lo, hi)

    y_lo, y_hi = bounds(bin_h, start_y, out_h, height)
    x_lo, x_hi = bounds(bin_w, start_x, out_w, width)
    flat = features.permute(0, 2, 3, 1).reshape(b * height * width, c)  # (B*H*W, C)
    base = rois[:, 0].to(torch.int64) * (height * width)
    dys = torch.arange(max(int((y_hi - y_lo).amax()), 1), device=features.device)  # window rows
    dxs = torch.arange(max(int((x_hi - x_lo).amax()), 1), device=features.device)
    rows = y_lo[..., None] + dys  # (R, h, Ty)
    cols = x_lo[..., None] + dxs  # (R, w, Tx)
    valid = (rows < y_hi[..., None])[:, :, None, :, None] & (cols < x_hi[..., None])[:, None, :, None, :]
    idx = (base[:, None, None] + rows.clamp(max=height - 1) * width)[:, :, None, :, None] \
        + cols.clamp(max=width - 1)[:, None, :, None, :]  # (R, h, w, Ty, Tx), row-major within the window
    m = r * out_h * out_w
    out = _MaxGather.apply(flat, idx.reshape(m, -1).t().contiguous(), valid.reshape(m, -1).t().contiguous())
    return out.view(r, out_h, out_w, c).permute(0, 3, 1, 2).contiguous()


@torch.library.custom_op("retinanet::roi_pool", mutates_args=())
def _roi_pool_op(features: Tensor, rois: Tensor, spatial_scale: float, output_height: int, output_width: int) -> Tensor:
    """`roi_pool` as one operator, for the ONNX exporters (inference only: no autograd formula)."""
    return _roi_pool(features, rois, (output_height, output_width), spatial_scale, "auto")


@_roi_pool_op.register_fake
def _roi_pool_shape(features, rois, spatial_scale, output_height, output_width):
    return features.new_empty((rois.shape[0], features.shape[1], output_height, output_width))
