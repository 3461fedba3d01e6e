import math

import pytest
import torch

from retinanet.losses import sigmoid_focal_loss, smooth_l1_loss


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
