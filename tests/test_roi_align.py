"""RoIAlign and RoI pooling: hand-computed values on a linear ramp, and torchvision's ops where importable."""

import pytest
import torch

from retinanet.ops.poolers import assign_levels
from retinanet.ops.roi_align import roi_align, roi_pool

try:  # the comparison tests need torchvision's compiled ops (in tvenv); the others run everywhere
    from torchvision.ops import roi_align as tv_roi_align, roi_pool as tv_roi_pool

    tv_roi_align(torch.zeros(1, 1, 2, 2), torch.zeros(1, 5), 1)
except Exception:
    tv_roi_align = tv_roi_pool = None
needs_tv = pytest.mark.skipif(tv_roi_align is None, reason="torchvision ops not importable")


def ramp(height=10, width=12):
    """(1, 1, H, W) feature map f[y, x] = 10 y + x: bilinear interpolation of it is exact."""
    y = torch.arange(height, dtype=torch.float32)[:, None]
    x = torch.arange(width, dtype=torch.float32)[None, :]
    return (10 * y + x)[None, None]


def test_roi_align_on_a_ramp_is_the_bin_centre():
    # The samples of a bin are symmetric about its centre and f is linear, so each output is f(centre).
    f = ramp()
    rois = torch.tensor([[0.0, 2, 2, 9, 9]])  # 7 x 7 pixels -> 1-pixel bins
    ph = torch.arange(7.0)[:, None]
    pw = torch.arange(7.0)[None, :]
    # aligned=False: bin (i, j) centred at (2 + i + 0.5, 2 + j + 0.5)
    expected = 10 * (2.5 + ph) + (2.5 + pw)
    for sr in (1, 2, 0):
        assert torch.allclose(roi_align(f, rois, 7, 1.0, sr, aligned=False)[0, 0], expected, atol=1e-5)
    # aligned=True: shifted by -0.5 pixel, centres at (2 + i, 2 + j)
    assert torch.allclose(roi_align(f, rois, 7, 1.0, 2, aligned=True)[0, 0], expected - 5.5, atol=1e-5)
    # spatial_scale 0.5: the same box in a 2x larger image
    assert torch.allclose(roi_align(f, rois * torch.tensor([1.0, 2, 2, 2, 2]), 7, 0.5, 2)[0, 0], expected, atol=1e-5)
    assert roi_align(f, rois, (7, 7), 1.0, 2).shape == (1, 1, 7, 7)


def test_roi_align_sample_points_by_hand():
    f = ramp()
    # One bin, one sample at the centre (x, y) = (3.25, 1.5): 10 * 1.5 + 3.25
    assert roi_align(f, torch.tensor([[0.0, 2.5, 1, 4, 2]]), 1, 1.0, 1).item() == pytest.approx(18.25)
    # aligned=False makes the RoI at least 1 pixel: [3, 3.2] x [1, 1.1] -> one sample at (3.5, 1.5)
    assert roi_align(f, torch.tensor([[0.0, 3, 1, 3.2, 1.1]]), 1, 1.0, 1).item() == pytest.approx(18.5)
    # Adaptive grid: a 4-pixel RoI into 1 bin takes ceil(4 / 1) = 4 samples per axis, at x = 0.5 .. 3.5.
    # On f = x^2 each sample interpolates linearly between its neighbours: 0.5, 2.5, 6.5, 12.5 -> mean 5.5;
    # one sample (sampling_ratio 1) at x = 2 reads 4. (f is constant along y.)
    sq = (torch.arange(12.0) ** 2)[None, None, None, :].expand(1, 1, 3, 12).contiguous()
    box = torch.tensor([[0.0, 0, 0, 4, 1]])
    assert roi_align(sq, box, 1, 1.0, 0).item() == pytest.approx(5.5)
    assert roi_align(sq, box, 1, 1.0, 1).item() == pytest.approx(4.0)
    # Border: a sample in [-1, 0] reads the first column, one below -1 reads 0.
    assert roi_align(f, torch.tensor([[0.0, -1.5, 0, -0.5, 1]]), 1, 1.0, 1).item() == pytest.approx(5.0)  # x = -1
    assert roi_align(f, torch.tensor([[0.0, -3, 0, -1.1, 1]]), 1, 1.0, 1).item() == 0.0  # x = -2.05
    # Past the last row/column (but within one pixel) the last one is read: x = 11.5 -> f(y, 11)
    assert roi_align(f, torch.tensor([[0.0, 11, 0, 12, 1]]), 1, 1.0, 1).item() == pytest.approx(5 + 11)
    # Batch index picks the image
    f2 = torch.cat([f, f + 1000])
    assert roi_align(f2, torch.tensor([[1.0, 2.5, 1, 4, 2]]), 1, 1.0, 1).item() == pytest.approx(1018.25)


def test_roi_align_no_rois_and_gradient():
    f = ramp().requires_grad_()
    assert roi_align(f, torch.zeros(0, 5), 7).shape == (0, 1, 7, 7)
    # one sample at (x, y) = (3.25, 1.5): weights 0.75/0.25 on columns 3/4, 0.5/0.5 on rows 1/2
    roi_align(f, torch.tensor([[0.0, 2.5, 1, 4, 2]]), 1, 1.0, 1).sum().backward()
    g = f.grad[0, 0]
    assert g[1, 3].item() == pytest.approx(0.375) and g[2, 4].item() == pytest.approx(0.125)
    assert g.sum().item() == pytest.approx(1.0) and (g != 0).sum().item() == 4


@pytest.mark.parametrize("backend", ["native", pytest.param("torchvision", marks=needs_tv)])
def test_roi_pool_by_hand(backend):
    f = ramp()
    # [0, 3] x [0, 3] inclusive -> 4 x 4 pixels, 2 x 2 bins of 2 x 2: maxima at their bottom-right corners
    out = roi_pool(f, torch.tensor([[0.0, 0, 0, 3, 3]]), 2, backend=backend)
    assert out[0, 0].tolist() == [[11.0, 13.0], [31.0, 33.0]]
    # Corners are rounded half away from zero (C's round): 0.5 -> 1 and 2.5 -> 3, so rows/cols 1..3 -> max 33
    # (round-half-to-even would give 0..2 -> 22)
    assert roi_pool(f, torch.tensor([[0.0, 1, 1, 5, 5]]), 1, 0.5, backend=backend).item() == 33.0
    # A bin entirely outside the map is 0
    assert roi_pool(f, torch.tensor([[0.0, 20, 20, 30, 30]]), 1, backend=backend).item() == 0.0
    # The gradient goes to the maximum only
    g = ramp().requires_grad_()
    roi_pool(g, torch.tensor([[0.0, 0, 0, 3, 3]]), 1, backend=backend).sum().backward()
    assert g.grad[0, 0, 3, 3].item() == 1.0 and g.grad.sum().item() == 1.0


def pyramid_rois(n, seed, image=(800, 1088), batch=2):
    """n boxes of every size (1 px to the whole image, all aspect ratios, some past the border)."""
    g = torch.Generator().manual_seed(seed)
    h, w = image
    xy = torch.rand(n, 2, generator=g) * torch.tensor([w, h]) * 1.1 - 30
    wh = torch.rand(n, 2, generator=g) ** 3 * torch.tensor([w, h]) + 0.1
    return torch.cat([torch.randint(0, batch, (n, 1), generator=g).float(), xy, xy + wh], 1)


@needs_tv
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [2, 0])
def test_roi_align_equals_torchvision_on_a_pyramid(aligned, sampling_ratio):
    g = torch.Generator().manual_seed(1)
    feats = [torch.randn(2, 8, 800 // s, 1088 // s, generator=g) for s in (4, 8, 16, 32)]
    rois = pyramid_rois(1000, 2)
    level = assign_levels(rois[:, 1:]) - 2
    worst = 0.0
    for lvl, (feat, stride) in enumerate(zip(feats, (4, 8, 16, 32))):
        r = rois[level == lvl]
        ours = roi_align(feat, r, 7, 1 / stride, sampling_ratio, aligned)
        ref = tv_roi_align(feat, r, 7, 1 / stride, sampling_ratio, aligned)
        worst = max(worst, (ours - ref).abs().max().item())
    # every box also on the finest level (large RoIs, large adaptive grids)
    r = rois[:200]
    worst = max(worst, (roi_align(feats[0], r, 7, 0.25, sampling_ratio, aligned)
                        - tv_roi_align(feats[0], r, 7, 0.25, sampling_ratio, aligned)).abs().max().item())
    print(f"roi_align aligned={aligned} sampling_ratio={sampling_ratio}: max |ours - torchvision| = {worst:.2e}")
    assert worst < 1e-5


@needs_tv
def test_torchvision_backend_is_torchvision_kernel():
    g = torch.Generator().manual_seed(9)
    feat = torch.randn(2, 3, 25, 34, generator=g)
    rois = pyramid_rois(100, 10)
    assert torch.equal(roi_align(feat, rois, 7, 1 / 32, 2, backend="torchvision"), tv_roi_align(feat, rois, 7, 1 / 32, 2))


@needs_tv
def test_auto_backend_is_torchvision_in_inference_and_ours_in_cpu_training():
    g = torch.Generator().manual_seed(9)
    feat = torch.randn(2, 16, 25, 34, generator=g)
    rois = pyramid_rois(200, 10)
    with torch.no_grad():
        assert torch.equal(roi_align(feat.requires_grad_(), rois, 7, 1 / 32, 2), tv_roi_align(feat, rois, 7, 1 / 32, 2))
    ours = roi_align(feat, rois, 7, 1 / 32, 2)  # the features need a gradient: our sparse kernel
    assert torch.equal(ours, roi_align(feat, rois, 7, 1 / 32, 2, backend="native"))
    assert not torch.equal(ours, tv_roi_align(feat, rois, 7, 1 / 32, 2))  # another summation order...
    assert torch.allclose(ours, tv_roi_align(feat, rois, 7, 1 / 32, 2), rtol=0, atol=1e-6)  # ...the same values


@pytest.mark.parametrize("sampling_ratio", [2, 0])
def test_roi_align_matrix_entries_are_sorted_and_unique(sampling_ratio):
    """The sparse matrix is declared coalesced without a sort: (row, col) must strictly increase."""
    from retinanet.ops.roi_align import _roi_align_matrix

    rois = pyramid_rois(500, 2, image=(200, 272))  # long thin RoIs read a bin's rows in two taps per sample
    rows, cols, values, order = _roi_align_matrix(rois, (7, 7), 0.25, sampling_ratio, False, (50, 68))
    key = rows * (2 * 50 * 68) + cols
    assert bool((key[1:] > key[:-1]).all()) and bool((values != 0).all())
    assert torch.equal(order.sort().values, torch.arange(500))
    # a RoI's bilinear weights sum to 1 per bin where all samples fall inside the map
    inside = (rois[:, 1] >= 0) & (rois[:, 2] >= 0) & (rois[:, 3] <= 271) & (rois[:, 4] <= 199)
    per_bin = torch.zeros(500 * 49).index_add_(0, rows, values).view(500, 49)[torch.argsort(order)]
    assert inside.sum() > 50 and torch.allclose(per_bin[inside], torch.ones(1), atol=1e-5)


def test_roi_align_gradient_is_deterministic_and_layout_free():
    g = torch.Generator().manual_seed(4)
    feat = torch.randn(2, 16, 25, 34, generator=g)
    rois = pyramid_rois(300, 4)
    grad_out = torch.randn(300, 16, 7, 7, generator=g)
    grads = []
    for layout in (torch.contiguous_format, torch.contiguous_format, torch.channels_last):
        x = feat.clone(memory_format=layout).requires_grad_()
        (roi_align(x, rois, 7, 1 / 32, 2, backend="native") * grad_out).sum().backward()
        grads.append(x.grad)
    assert torch.equal(grads[0], grads[1]) and torch.equal(grads[0], grads[2])
    assert grads[0].abs().sum() > 0


def test_backend_names():
    with pytest.raises(ValueError, match="backend"):
        roi_align(ramp(), torch.zeros(1, 5), 1, backend="cuda")
    with pytest.raises(ValueError, match="backend"):
        roi_pool(ramp(), torch.zeros(1, 5), 1, backend="cuda")
    if tv_roi_align is None:
        with pytest.raises(RuntimeError, match="not importable"):
            roi_align(ramp(), torch.zeros(1, 5), 1, backend="torchvision")


@needs_tv
@pytest.mark.parametrize("aligned,sampling_ratio", [(False, 2), (True, 0)])
def test_roi_align_gradient_equals_torchvision(aligned, sampling_ratio):
    g = torch.Generator().manual_seed(3)
    feat = torch.randn(2, 3, 25, 34, generator=g, dtype=torch.float64)
    rois = pyramid_rois(300, 4).double()
    grad_out = torch.randn(300, 3, 7, 7, generator=g, dtype=torch.float64)
    a, b = feat.clone().requires_grad_(), feat.clone().requires_grad_()
    (roi_align(a, rois, 7, 1 / 32, sampling_ratio, aligned) * grad_out).sum().backward()
    (tv_roi_align(b, rois, 7, 1 / 32, sampling_ratio, aligned) * grad_out).sum().backward()
    diff = (a.grad - b.grad).abs().max().item()
    print(f"roi_align gradient aligned={aligned}: max diff {diff:.1e}")
    assert diff < 1e-10


@needs_tv
def test_roi_pool_equals_torchvision():
    g = torch.Generator().manual_seed(5)
    feat = torch.randn(2, 4, 50, 68, generator=g)
    rois = pyramid_rois(500, 6)
    a, b = feat.clone().requires_grad_(), feat.clone().requires_grad_()
    ours, ref = roi_pool(a, rois, 7, 1 / 16, backend="native"), tv_roi_pool(b, rois, 7, 1 / 16)
    assert torch.equal(ours, ref)
    grad_out = torch.randn(ours.shape, generator=g)
    (ours * grad_out).sum().backward()
    (ref * grad_out).sum().backward()
    assert torch.allclose(a.grad, b.grad, atol=1e-6)


@pytest.mark.parametrize("sampling_ratio", [2, 0])
def test_many_rois_at_once_equal_one_at_a_time(sampling_ratio):
    # RoIs of very different shapes are processed in groups; the result must not depend on the company
    g = torch.Generator().manual_seed(7)
    feat = torch.randn(2, 3, 40, 50, generator=g)
    rois = pyramid_rois(40, 8, image=(160, 200))
    rois[0, 1:] = torch.tensor([0.0, 0, 199, 3])  # long and thin: bins read many columns
    together = roi_align(feat, rois, 7, 0.25, sampling_ratio, aligned=True)
    alone = torch.cat([roi_align(feat, rois[i:i + 1], 7, 0.25, sampling_ratio, aligned=True) for i in range(40)])
    assert torch.allclose(together, alone, atol=1e-6)
    assert torch.equal(roi_pool(feat, rois, 7, 0.25, backend="native"),
                       torch.cat([roi_pool(feat, rois[i:i + 1], 7, 0.25, backend="native") for i in range(40)]))


def smooth_pyramid_level(channels=4, height=200, width=256):
    """(1, C, H, W) smooth features: a stride-4 level of an 800 x 1024 image, where bf16 positions
    (8 significant bits) would move in whole-pixel steps."""
    y = torch.linspace(0, 6.28, height)[:, None]
    x = torch.linspace(0, 8.2, width)[None, :]
    return torch.stack([torch.sin(3 * y + c) * torch.cos(2 * x - c) + 0.1 * c for c in range(channels)])[None]


def low_precision(dtype):
    """Skip where this CPU's torch cannot run `dtype` under autocast (fp16 on older builds)."""
    try:
        with torch.autocast("cpu", dtype=dtype):
            torch.ones(2, 2).to(dtype) @ torch.ones(2, 2)
    except RuntimeError as e:  # pragma: no cover - depends on the build
        pytest.skip(f"{dtype} not supported on this CPU: {e}")
    return dtype


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_features_are_pooled_at_float32_positions(dtype):
    """bf16 / fp16 features (train.amp, eval --bf16, Predictor(bf16=True)) are pooled as their float32 values
    would be, rounded once: coordinates, bilinear weights and sums in float32. Exact, since the float32
    computation on the same values is the same sparse product. Before the fix, positions computed in bf16
    (and weights summed in it) gave errors of 27x the output's own rounding on this level (0.107 against
    0.0039; fp16: 0.012 against 0.0005); RoI max pooling, which rounds only the corners, was off by 0.18."""
    dtype = low_precision(dtype)
    g = torch.Generator().manual_seed(0)
    feat = smooth_pyramid_level().to(dtype)  # the reference below pools exactly these values, in float32
    xy = torch.rand(64, 2, generator=g) * torch.tensor([824.0, 600.0])
    rois = torch.cat([torch.zeros(64, 1), xy, xy + 16 + torch.rand(64, 2, generator=g) * 180], 1)
    ref = roi_align(feat.float(), rois, 7, 0.25, 2, backend="native")
    rounding = (ref.to(dtype).float() - ref).abs().max().item()  # what the output dtype alone costs
    assert 0 < rounding < 0.01
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=dtype, enabled=autocast):
            out = roi_align(feat, rois, 7, 0.25, 2, backend="native")
            pooled = roi_pool(feat, rois, 7, 0.25, backend="native")
        assert out.dtype == dtype and pooled.dtype == dtype
        assert (out.float() - ref).abs().max().item() <= rounding
        assert torch.equal(out, ref.to(dtype))
        assert torch.equal(pooled, roi_pool(feat.float(), rois, 7, 0.25, backend="native").to(dtype))
    # the gradient, likewise: A^T @ grad_out in float32, rounded once
    a, b = feat.clone().requires_grad_(), feat.float().requires_grad_()
    with torch.autocast("cpu", dtype=dtype):
        roi_align(a, rois, 7, 0.25, 2, backend="native").sum().backward()
    roi_align(b, rois, 7, 0.25, 2, backend="native").sum().backward()
    assert a.grad.dtype == dtype and torch.equal(a.grad, b.grad.to(dtype))


def test_torchvision_kernels_get_float32_rois_and_features(monkeypatch):
    """torchvision's kernels compute in their inputs' dtype: with bf16 features they are called on float32
    features and RoIs (before the fix, RoIs cast to bf16: image coordinates in 4-pixel steps at 512-1024
    px) and their output is rounded to bf16 once. Checked with a stand-in kernel that records its inputs,
    so that it runs where torchvision does not."""
    import retinanet.ops.roi_align as ra

    seen = []

    def stand_in(name):
        native = {"roi_align": roi_align, "roi_pool": roi_pool}[name]

        def op(features, rois, *args):
            seen.append((name, features.dtype, rois.dtype))
            return native(features, rois, *args, backend="native")
        return op

    monkeypatch.setattr(ra, "torchvision_op", stand_in)
    feat = smooth_pyramid_level(2).bfloat16()
    rois = torch.tensor([[0.0, 513.0, 517.0, 771.0, 783.0]])  # bf16 would make them 512, 516, 772, 784
    out = roi_align(feat, rois, 7, 0.25, 2, backend="torchvision")
    pooled = roi_pool(feat, rois, 7, 0.25, backend="torchvision")
    assert seen == [("roi_align", torch.float32, torch.float32), ("roi_pool", torch.float32, torch.float32)]
    assert out.dtype == pooled.dtype == torch.bfloat16
    assert torch.equal(out, roi_align(feat.float(), rois, 7, 0.25, 2, backend="native").bfloat16())
    assert torch.equal(pooled, roi_pool(feat.float(), rois, 7, 0.25, backend="native").bfloat16())


@needs_tv
def test_torchvision_kernels_with_bf16_features_equal_float32_rounded_once():
    feat = smooth_pyramid_level().bfloat16()
    rois = pyramid_rois(200, 11, image=(800, 1024), batch=1)
    for ours, ref in ((roi_align(feat, rois, 7, 0.25, 2, backend="torchvision"),
                       tv_roi_align(feat.float(), rois, 7, 0.25, 2)),
                      (roi_pool(feat, rois, 7, 0.25, backend="torchvision"), tv_roi_pool(feat.float(), rois, 7, 0.25))):
        assert ours.dtype == torch.bfloat16 and torch.equal(ours, ref.bfloat16())
