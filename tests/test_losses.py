import math
import warnings

import pytest
import torch

from retinanet import losses
from retinanet.losses import (fl_star_loss, giou_loss, iou_balance_ratio, iou_balanced_weights, ohem_select,
                              sigmoid_focal_loss, sigmoid_focal_loss_fast, smooth_l1_loss, softmax_focal_loss,
                              softmax_prior_bias)


def _fl_eq5(x: float, y: int, alpha: float, gamma: float) -> float:
    """eq. (5) written out: -alpha_t (1 - p_t)^gamma log(p_t)."""
    p = 1 / (1 + math.exp(-x))
    p_t = p if y == 1 else 1 - p
    alpha_t = alpha if y == 1 else 1 - alpha
    return -alpha_t * (1 - p_t) ** gamma * math.log(p_t)


def _dfl_eq10(x: float, y: int, gamma: float) -> float:
    """eq. (10), with y in {-1, 1}: y (1 - p_t)^gamma (gamma p_t log(p_t) + p_t - 1)."""
    p = 1 / (1 + math.exp(-x))
    p_t = p if y == 1 else 1 - p
    ys = 1 if y == 1 else -1
    return ys * (1 - p_t) ** gamma * (gamma * p_t * math.log(p_t) + p_t - 1)


XS = [-4.0, -1.5, -0.3, 0.0, 0.7, 2.0, 5.0]


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0, 5.0])
@pytest.mark.parametrize("alpha", [0.25, 0.75])
def test_focal_loss_value_and_gradient_match_eqs_5_and_10(alpha, gamma):
    x = torch.tensor(XS * 2, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([1.0] * len(XS) + [0.0] * len(XS), dtype=torch.float64)
    loss = sigmoid_focal_loss(x, y, alpha=alpha, gamma=gamma)
    expected = [_fl_eq5(xi, int(yi), alpha, gamma) for xi, yi in zip(x.tolist(), y.tolist())]
    assert torch.allclose(loss, torch.tensor(expected, dtype=torch.float64), rtol=1e-10, atol=1e-12)
    loss.sum().backward()
    alpha_t = [alpha if yi == 1 else 1 - alpha for yi in y.tolist()]
    grad = [a * _dfl_eq10(xi, int(yi), gamma) for a, xi, yi in zip(alpha_t, x.tolist(), y.tolist())]
    assert torch.allclose(x.grad, torch.tensor(grad, dtype=torch.float64), rtol=1e-9, atol=1e-12)


def test_gamma_zero_is_alpha_balanced_cross_entropy():
    x = torch.randn(200, 5)
    y = (torch.rand(200, 5) > 0.7).float()
    ce = torch.nn.functional.binary_cross_entropy_with_logits(x, y, reduction="none")
    alpha_t = 0.25 * y + 0.75 * (1 - y)
    assert torch.allclose(sigmoid_focal_loss(x, y, alpha=0.25, gamma=0.0), alpha_t * ce, atol=1e-6)
    assert torch.allclose(sigmoid_focal_loss(x, y, alpha=-1, gamma=0.0), ce, atol=1e-6)  # alpha off: plain CE


def test_extreme_logits_are_finite_in_float32():
    x = torch.tensor([100.0, -100.0, 100.0, -100.0, 88.0, -88.0], requires_grad=True)
    y = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 1.0])
    for gamma in (0.0, 0.5, 2.0):
        x.grad = None
        loss = sigmoid_focal_loss(x, y, gamma=gamma)
        loss.sum().backward()
        assert torch.isfinite(loss).all() and torch.isfinite(x.grad).all()
        # confident and right: ~0 loss; confident and wrong: loss ~ alpha_t * 100
        assert loss[0] < 1e-30 and loss[1] < 1e-30
        assert loss[2].item() == pytest.approx(0.75 * 100, rel=1e-4)
        assert loss[3].item() == pytest.approx(0.25 * 100, rel=1e-4)


def test_focal_loss_at_pt_09_is_100x_lower_than_ce():
    # sec. 3.2: with gamma = 2, an example classified with p_t = 0.9 has 100x lower loss than CE
    x = torch.tensor([math.log(0.9 / 0.1)])
    y = torch.ones(1)
    ratio = sigmoid_focal_loss(x, y, alpha=-1, gamma=0.0) / sigmoid_focal_loss(x, y, alpha=-1, gamma=2.0)
    assert ratio.item() == pytest.approx(100.0, rel=1e-5)


def test_reductions():
    x, y = torch.randn(4, 3), torch.zeros(4, 3)
    full = sigmoid_focal_loss(x, y)
    assert torch.allclose(sigmoid_focal_loss(x, y, reduction="sum"), full.sum())
    assert torch.allclose(sigmoid_focal_loss(x, y, reduction="mean"), full.mean())
    with pytest.raises(ValueError):
        sigmoid_focal_loss(x, y, reduction="max")


def test_smooth_l1_by_hand():
    pred = torch.tensor([0.0, 0.05, 1.0, -2.0])
    target = torch.zeros(4)
    # beta 0.11: |d| < beta -> 0.5 d^2 / beta; else |d| - beta / 2
    expected = torch.tensor([0.0, 0.5 * 0.0025 / 0.11, 1 - 0.055, 2 - 0.055])
    assert torch.allclose(smooth_l1_loss(pred, target, beta=0.11), expected)
    assert torch.allclose(smooth_l1_loss(pred, target, beta=0.0), pred.abs())


# ---------------------------------------------------------------------------------------------- CE, eq. (9)

def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


@pytest.mark.parametrize("alpha", [-1.0, 0.25, 0.75])
def test_cross_entropy_gradient_matches_eq_9(alpha):
    # gamma = 0: dCE/dx = y (p_t - 1) (eq. 9), times alpha_t for the alpha-balanced form (eq. 3)
    x = torch.tensor(XS * 2, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([1.0] * len(XS) + [0.0] * len(XS), dtype=torch.float64)
    sigmoid_focal_loss(x, y, alpha=alpha, gamma=0.0).sum().backward()
    expected = []
    for xi, yi in zip(x.tolist(), y.tolist()):
        ys = 1 if yi == 1 else -1
        p_t = _sigmoid(ys * xi)
        alpha_t = 1.0 if alpha < 0 else (alpha if yi == 1 else 1 - alpha)
        expected.append(alpha_t * ys * (p_t - 1))
    assert torch.allclose(x.grad, torch.tensor(expected, dtype=torch.float64), rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------------- FL*, eqs. (6)-(8), (11)

@pytest.mark.parametrize("gamma,beta", [(2.0, 1.0), (4.0, 0.0), (1.0, -0.5)])  # Table 2's two settings, and one more
def test_fl_star_value_and_gradient_match_eqs_8_and_11(gamma, beta):
    x = torch.tensor(XS * 2, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([1.0] * len(XS) + [0.0] * len(XS), dtype=torch.float64)
    loss = fl_star_loss(x, y, gamma=gamma, beta=beta)
    value, grad = [], []
    for xi, yi in zip(x.tolist(), y.tolist()):
        ys = 1 if yi == 1 else -1
        p_star = _sigmoid(gamma * ys * xi + beta)  # eqs. (6), (7)
        value.append(-math.log(p_star) / gamma)  # eq. (8)
        grad.append(ys * (p_star - 1))  # eq. (11)
    assert torch.allclose(loss, torch.tensor(value, dtype=torch.float64), rtol=1e-10, atol=1e-12)
    loss.sum().backward()
    assert torch.allclose(x.grad, torch.tensor(grad, dtype=torch.float64), rtol=1e-10, atol=1e-12)


def test_fl_star_rejects_gamma_zero():
    with pytest.raises(ValueError, match="gamma > 0"):
        fl_star_loss(torch.zeros(2), torch.ones(2), gamma=0.0)


# ---------------------------------------------------------------------------------------------- fast focal loss

@pytest.mark.parametrize("alpha,gamma", [(0.25, 2.0), (0.75, 0.0), (-1.0, 0.0), (0.5, 0.5), (-1.0, 5.0)])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_fast_focal_equals_reference_value_and_gradient(alpha, gamma, reduction):
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(3, 50, 7, generator=g, dtype=torch.float64) * 4).requires_grad_()
    y = torch.rand(3, 50, 7, generator=g) > 0.8
    w = (torch.rand(3, 50, 1, generator=g) > 0.1).double()  # like the valid-anchor mask
    ref = sigmoid_focal_loss(x, y.double(), alpha, gamma) * w
    ref = {"none": ref, "sum": ref.sum(), "mean": ref.mean()}[reduction]
    upstream = torch.rand_like(ref)  # a non-trivial incoming gradient
    (ref_grad,) = torch.autograd.grad((ref * upstream).sum(), x)
    fast = sigmoid_focal_loss_fast(x, y, alpha, gamma, weights=w, reduction=reduction, compile=False)
    (fast_grad,) = torch.autograd.grad((fast * upstream).sum(), x)
    assert fast.dtype == torch.float32 and fast.shape == ref.shape
    assert torch.allclose(fast.double(), ref, rtol=1e-5, atol=1e-6)
    assert torch.allclose(fast_grad, ref_grad, rtol=1e-5, atol=1e-7)


def test_fast_focal_bfloat16_inputs_within_tolerance():
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(400, 10, generator=g) * 3).bfloat16().requires_grad_()
    y = (torch.rand(400, 10, generator=g) > 0.9).float()
    fast = sigmoid_focal_loss_fast(x, y, compile=False)
    fast.backward()
    assert x.grad.dtype == torch.bfloat16
    ref_x = x.detach().float().requires_grad_()  # the same bf16 values, in float32
    ref = sigmoid_focal_loss(ref_x, y, reduction="sum")
    ref.backward()
    assert fast.item() == pytest.approx(ref.item(), rel=1e-5)  # the math is float32 in both
    assert torch.allclose(x.grad.float(), ref_x.grad, rtol=1e-2, atol=1e-4)  # the gradient is stored in bf16


def test_fast_focal_float16_gradient_survives_until_the_scaler_scales_it():
    # Under fp16 autocast the logits are float16 and GradScaler multiplies the loss by e.g. 65536.
    # The easy negatives' gradients (here 9e-11 to 5e-3, about 3 p^3) are below float16's smallest subnormal
    # (6e-8) or lose most of their bits there: they must be kept in float32 until grad_output has
    # scaled them, then rounded once to float16.
    x16 = torch.linspace(-8.0, -2.0, 200).half().requires_grad_()
    y = torch.zeros(200)
    scale = 65536.0
    loss = sigmoid_focal_loss_fast(x16, y, compile=False)
    (loss * scale).backward()
    assert x16.grad.dtype == torch.float16
    x32 = x16.detach().float().requires_grad_()  # the same float16 values, in float32
    (sigmoid_focal_loss(x32, y, reduction="sum") * scale).backward()
    expected = x32.grad.half().float()  # the float32 gradient, scaled, rounded once to float16
    assert (expected != 0).all() and (x32.grad / scale).abs().lt(6e-8).sum() > 50  # the test covers the small ones
    assert torch.allclose(x16.grad.float(), expected, rtol=2e-3, atol=6e-8)  # atol: float16's subnormal step


def test_fast_focal_extreme_logits_are_finite():
    x = torch.tensor([100.0, -100.0, 100.0, -100.0, 88.0, -88.0], requires_grad=True)
    y = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 1.0])
    for gamma in (0.0, 0.5, 2.0):
        x.grad = None
        loss = sigmoid_focal_loss_fast(x, y, gamma=gamma, reduction="none", compile=False)
        loss.sum().backward()
        assert torch.isfinite(loss).all() and torch.isfinite(x.grad).all()
        assert loss[2].item() == pytest.approx(0.75 * 100, rel=1e-4)
        assert x.grad[2].item() == pytest.approx(-0.75 * -1, rel=1e-4)  # eq. (10), y = -1, p_t -> 0: alpha_t


def test_compiled_fast_focal_equals_reference(monkeypatch):
    """The torch.compile'd kernel that every real training batch goes through, run here on a small input.

    Compiling takes about 10 s for the first (alpha, gamma) on a 2-core CPU (12-18 s in a busy
    test run with an empty inductor cache), and about 2 s for each further pair (floats are
    specialized). The size threshold is lowered so that the default choice (compile=None), the one
    training makes, picks the compiled kernel; a compile failure fails the test instead of falling back.
    """
    calls = []
    real = losses._compiled_kernel

    def spy():
        calls.append(1)
        return real()
    monkeypatch.setattr(losses, "_compiled_kernel", spy)
    monkeypatch.setattr(losses, "_compile_failed", False)
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(2, 300, 5, generator=g) * 4).requires_grad_()
    y = torch.rand(2, 300, 5, generator=g) > 0.9
    w = (torch.rand(2, 300, 1, generator=g) > 0.1).float()
    monkeypatch.setattr(losses, "COMPILE_MIN_ELEMENTS", x.numel())
    for alpha, gamma in ((0.25, 2.0), (-1.0, 0.0)):
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # a fallback to the eager kernel fails here
            fast = sigmoid_focal_loss_fast(x, y, alpha, gamma, weights=w)
        (fast_grad,) = torch.autograd.grad(fast, x)
        ref = (sigmoid_focal_loss(x, y.float(), alpha, gamma) * w).sum()
        (ref_grad,) = torch.autograd.grad(ref, x)
        assert fast.item() == pytest.approx(ref.item(), rel=1e-5)
        assert torch.allclose(fast_grad, ref_grad, rtol=1e-5, atol=1e-7)
    assert len(calls) == 2 and not losses._compile_failed


def test_fast_focal_falls_back_to_eager_when_compiling_fails(monkeypatch):
    # a real torch.compile whose backend fails, as one without a working C++ compiler does
    def failing_backend(gm, example_inputs):
        raise RuntimeError("no C++ compiler")
    compiled = torch.compile(losses._focal_loss_and_grad, dynamic=True, fullgraph=True, backend=failing_backend)
    monkeypatch.setattr(losses, "_compiled_kernel", lambda: compiled)
    monkeypatch.setattr(losses, "_compile_failed", False)
    x = torch.randn(20, 4, requires_grad=True)
    y = torch.rand(20, 4) > 0.7
    with pytest.warns(RuntimeWarning, match="(?s)torch.compile of the focal loss failed.*no C\\+\\+ compiler"):
        loss = sigmoid_focal_loss_fast(x, y, compile=True)
    (grad,) = torch.autograd.grad(loss, x)
    ref = sigmoid_focal_loss(x, y.float(), reduction="sum")
    (ref_grad,) = torch.autograd.grad(ref, x)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    assert torch.allclose(grad, ref_grad, rtol=1e-5, atol=1e-7)
    assert losses._compile_failed  # later calls go straight to the eager kernel
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sigmoid_focal_loss_fast(x, y, compile=True)  # no second try, no second warning


def test_fast_focal_rejects_mismatched_targets():
    with pytest.raises(ValueError, match="logits' shape"):
        sigmoid_focal_loss_fast(torch.zeros(4, 3), torch.zeros(4, 2))


# ---------------------------------------------------------------------------------------------- softmax focal loss

def test_softmax_focal_loss_by_hand_and_gradient():
    # 2 object classes + background (index 2)
    z = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 3.0], [-2.0, 4.0, 0.3]], dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0, 2, 1])
    alpha, gamma = 0.25, 2.0
    loss = softmax_focal_loss(z, t, alpha=alpha, gamma=gamma)
    p = torch.softmax(z.detach(), dim=1)
    value, grad = [], torch.zeros_like(p)
    for i, ti in enumerate(t.tolist()):
        p_t = p[i, ti].item()
        alpha_t = 1 - alpha if ti == 2 else alpha
        value.append(-alpha_t * (1 - p_t) ** gamma * math.log(p_t))
        # dFL/dz_j = alpha_t (1 - p_t)^(gamma - 1) (gamma p_t log p_t + p_t - 1) (delta_tj - p_j);
        # for j = t this is eq. (10) with y = 1
        common = alpha_t * (1 - p_t) ** (gamma - 1) * (gamma * p_t * math.log(p_t) + p_t - 1)
        for j in range(3):
            grad[i, j] = common * ((j == ti) - p[i, j].item())
    assert torch.allclose(loss, torch.tensor(value, dtype=torch.float64), rtol=1e-10)
    loss.sum().backward()
    assert torch.allclose(z.grad, grad, rtol=1e-9, atol=1e-12)


def test_softmax_focal_gamma_zero_is_softmax_cross_entropy():
    z = torch.randn(50, 6)
    t = torch.randint(0, 6, (50,))
    ce = torch.nn.functional.cross_entropy(z, t, reduction="none")
    assert torch.allclose(softmax_focal_loss(z, t, alpha=-1, gamma=0.0), ce, atol=1e-6)
    alpha_t = torch.where(t == 5, 0.75, 0.25)  # background (index 5) gets 1 - alpha
    assert torch.allclose(softmax_focal_loss(z, t, alpha=0.25, gamma=0.0), alpha_t * ce, atol=1e-6)


def test_softmax_focal_confident_and_right_has_finite_gradient():
    z = torch.tensor([[60.0, -60.0, 0.0]], requires_grad=True)  # p_t rounds to 1 in float32
    softmax_focal_loss(z, torch.tensor([0]), gamma=0.5).sum().backward()
    assert torch.isfinite(z.grad).all()


def test_softmax_prior_bias_gives_total_foreground_probability_pi():
    for k, pi in ((80, 0.01), (3, 0.2)):
        p = torch.softmax(softmax_prior_bias(k, pi).double(), dim=0)
        assert p[:k].sum().item() == pytest.approx(pi, rel=1e-6)
        assert torch.allclose(p[:k], torch.full((k,), pi / k, dtype=torch.float64))


# ---------------------------------------------------------------------------------------------- box losses

def test_giou_loss_by_hand():
    pred = torch.tensor([[0.0, 0, 2, 2], [0, 0, 1, 1], [5, 5, 9, 8]])
    target = torch.tensor([[1.0, 1, 3, 3], [2, 0, 3, 1], [5, 5, 9, 8]])
    # overlap 1, union 7, hull 9: 1 - (1/7 - 2/9); disjoint: IoU 0, union 2, hull 3: 1 + 1/3; identical: 0
    expected = torch.tensor([1 - (1 / 7 - 2 / 9), 1 + 1 / 3, 0.0])
    assert torch.allclose(giou_loss(pred, target), expected, atol=1e-6)


# ---------------------------------------------------------------------------------------------- IoU-balanced weights

def test_iou_balanced_weights_by_hand_keep_the_sum():
    iou = torch.tensor([0.5, 1.0, 0.8])
    loss = torch.tensor([1.0, 3.0, 2.0])
    w = iou_balanced_weights(iou, loss, power=1.0)
    # eq. (2): iou_i * sum(L) / sum(iou L) = iou_i * 6 / (0.5 + 3 + 1.6)
    assert torch.allclose(w, iou * 6 / 5.1)
    assert (w * loss).sum().item() == pytest.approx(loss.sum().item())
    w15 = iou_balanced_weights(iou, loss, power=1.5)
    assert (w15 * loss).sum().item() == pytest.approx(6.0)
    assert iou_balance_ratio(iou, loss, 1.0).item() == pytest.approx(6 / 5.1)


def test_iou_balanced_weights_fall_back_to_one_and_carry_no_gradient():
    loss = torch.tensor([1.0, 2.0], requires_grad=True)
    assert torch.equal(iou_balanced_weights(torch.zeros(2), loss, 1.5), torch.ones(2))
    iou = torch.tensor([0.3, 0.9], requires_grad=True)
    w = iou_balanced_weights(iou, loss, 1.5)
    assert not w.requires_grad
    # so the gradient of the weighted loss is the weight times the gradient of the loss, per element
    (w * loss).sum().backward()
    assert torch.equal(loss.grad, w)
    assert iou.grad is None


# ---------------------------------------------------------------------------------------------- OHEM selection

def _ohem_example():
    """One image, six anchors with known losses (scores). Anchor 1 overlaps anchor 0 with IoU 90/110."""
    boxes = torch.tensor([[0.0, 0, 10, 10], [1, 0, 11, 10], [20, 0, 30, 10],
                          [0, 20, 10, 30], [20, 20, 30, 30], [40, 40, 50, 50]])[None]  # (1, 6, 4)
    scores = torch.tensor([[5.0, 4.0, 3.0, 1.0, float("-inf"), 2.0]])  # anchor 4 is ignored
    return scores, boxes


def test_ohem_hand_made_example():
    scores, boxes = _ohem_example()
    none = torch.zeros(1, 6, dtype=torch.bool)
    # NMS 0.5 drops anchor 1 (IoU 0.82 with anchor 0); survivors by loss: 0, 2, 5, 3; keep 3
    img, anchor = ohem_select(scores, boxes, none, batch_size=3, nms_thresh=0.5)
    assert anchor.tolist() == [0, 2, 5] and img.tolist() == [0, 0, 0]
    # NMS 0.9 keeps it
    assert ohem_select(scores, boxes, none, batch_size=3, nms_thresh=0.9)[1].tolist() == [0, 1, 2]
    # more room than survivors: all four, never the ignored anchor
    assert ohem_select(scores, boxes, none, batch_size=10, nms_thresh=0.5)[1].tolist() == [0, 2, 5, 3]
    # only the 2 highest-loss anchors are candidates for NMS
    assert ohem_select(scores, boxes, none, batch_size=10, nms_thresh=0.5, candidates=2)[1].tolist() == [0]


def test_ohem_ratio_hand_made_example():
    scores, boxes = _ohem_example()
    positive = torch.tensor([[False, False, True, True, False, False]])
    # 1:1 with batch 4: 2 positives (2, 3) and 2 negatives (0, 5), by loss
    assert ohem_select(scores, boxes, positive, 4, 0.5, ratio=1)[1].tolist() == [0, 2, 5, 3]
    # 1:1 with batch 2: one positive (the harder, 2) and one negative (0)
    assert ohem_select(scores, boxes, positive, 2, 0.5, ratio=1)[1].tolist() == [0, 2]
    # 1:3 with one positive: 3 negatives at most, so 1 + 2 available negatives
    one = torch.tensor([[False, False, False, True, False, False]])
    assert ohem_select(scores, boxes, one, 8, 0.5, ratio=3)[1].tolist() == [0, 2, 5, 3]
    # an image with no positives keeps `ratio` negatives
    none = torch.zeros(1, 6, dtype=torch.bool)
    assert ohem_select(scores, boxes, none, 8, 0.5, ratio=2)[1].tolist() == [0, 2]


def _grid_boxes(n: int, size: float = 10.0) -> torch.Tensor:
    """n disjoint boxes on a grid: NMS keeps them all."""
    i = torch.arange(n, dtype=torch.float32)
    x0, y0 = (i % 20) * 2 * size, (i // 20) * 2 * size
    return torch.stack([x0, y0, x0 + size, y0 + size], dim=1)


def test_ohem_keeps_exactly_b_per_image_or_all_survivors():
    n = 60
    boxes = torch.stack([_grid_boxes(n), _grid_boxes(n)])  # (2, 60, 4)
    boxes[0, 1] = boxes[0, 0] + 1  # one pair that overlaps in image 0
    scores = torch.rand(2, n)
    scores[1, 5:] = float("-inf")  # image 1 has only 5 anchors to pick from
    positive = torch.rand(2, n) > 0.5
    img, anchor = ohem_select(scores, boxes, positive, batch_size=16, nms_thresh=0.5)
    assert torch.bincount(img, minlength=2).tolist() == [16, 5]
    for i in range(2):  # each image's picks are its highest-loss survivors, by decreasing loss
        picked = scores[i, anchor[img == i]]
        assert torch.all(picked[:-1] >= picked[1:])
        assert not torch.isinf(picked).any()


def test_ohem_1_to_3_keeps_the_ratio_when_positives_suffice():
    n = 200
    boxes = _grid_boxes(n)[None].repeat(2, 1, 1)
    scores = torch.rand(2, n)
    positive = torch.zeros(2, n, dtype=torch.bool)
    positive[0, :50] = True  # plenty of positives
    positive[1, :3] = True  # few: 3 positives, 9 negatives
    img, anchor = ohem_select(scores, boxes, positive, batch_size=64, nms_thresh=0.5, ratio=3)
    pos = positive[img, anchor]
    assert (pos[img == 0].sum().item(), (~pos[img == 0]).sum().item()) == (16, 48)
    assert (pos[img == 1].sum().item(), (~pos[img == 1]).sum().item()) == (3, 9)
    # the kept positives of image 0 are its 16 highest-loss positives
    top_pos = scores[0, :50].topk(16).indices.sort().values
    assert torch.equal(anchor[(img == 0) & pos].sort().values, top_pos)


def test_fast_focal_backward_twice_is_refused_not_wrong():
    # the backward scales the saved gradient in place; autograd's version check catches a reuse
    x = torch.randn(10, 3, requires_grad=True)
    loss = sigmoid_focal_loss_fast(x, torch.rand(10, 3) > 0.5, compile=False)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("ratio", [0, 3])
def test_ohem_select_with_early_stopping_nms_equals_full_nms(ratio, monkeypatch):
    import retinanet.losses as L
    from retinanet.ops.nms import native_batched_nms

    g = torch.Generator().manual_seed(0)
    b, n = 3, 2500
    xy = torch.rand(b, n, 2, generator=g) * 150
    boxes = torch.cat([xy, xy + 8 + torch.rand(b, n, 2, generator=g) * 40], dim=2)
    scores = torch.rand(b, n, generator=g)
    scores[0, :5] = float("-inf")
    positive = torch.rand(b, n, generator=g) < 0.01
    fast = L.ohem_select(scores, boxes, positive, 64, 0.5, ratio)
    monkeypatch.setattr(L, "batched_nms", lambda bx, sc, gr, t, **kw: native_batched_nms(bx, sc, gr, t))
    full = L.ohem_select(scores, boxes, positive, 64, 0.5, ratio)
    assert fast[0].tolist() == full[0].tolist() and fast[1].tolist() == full[1].tolist()
    if ratio == 0:
        assert len(full[0]) == 3 * 64
    else:  # at most 64 // 4 positives per image
        assert max(int(positive[full[0], full[1]][full[0] == i].sum()) for i in range(b)) <= 16
