"""Classification and box losses (Focal Loss paper, sec. 3; Detectron's smooth L1)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _reduce(loss: Tensor, reduction: str) -> Tensor:
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.mean()
    raise ValueError(f"reduction must be 'none', 'sum' or 'mean', got '{reduction}'")


def sigmoid_focal_loss(logits: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0,
                       reduction: str = "none") -> Tensor:
    """Focal loss FL(p_t) = -alpha_t (1 - p_t)^gamma log(p_t) (eq. 5) on sigmoid outputs.

    logits, targets: same shape; targets are 0 or 1 per class. alpha < 0 disables the alpha
    weighting; gamma = 0 gives alpha-balanced cross entropy (eq. 3).

    Written with x_t = x if y = 1 else -x, so that p_t = sigmoid(x_t) (eqs. 2, 6):
    log(p_t) = logsigmoid(x_t) and (1 - p_t)^gamma = exp(gamma * logsigmoid(-x_t)). Both are finite
    with finite gradients for any finite logit (no log of a clamped probability), also for gamma < 1.
    """
    targets = targets.to(logits.dtype)
    x_t = logits * (2 * targets - 1)
    loss = -F.logsigmoid(x_t)
    if gamma != 0:
        loss = loss * torch.exp(gamma * F.logsigmoid(-x_t))
    if alpha >= 0:
        loss = loss * (alpha * targets + (1 - alpha) * (1 - targets))
    return _reduce(loss, reduction)


def smooth_l1_loss(pred: Tensor, target: Tensor, beta: float = 0.11, reduction: str = "none") -> Tensor:
    """Smooth L1 (Huber / beta): 0.5 d^2 / beta where |d| < beta, else |d| - 0.5 beta; beta = 0 is L1."""
    diff = (pred - target).abs()
    if beta > 0:
        loss = torch.where(diff < beta, 0.5 * diff * diff / beta, diff - 0.5 * beta)
    else:
        loss = diff
    return _reduce(loss, reduction)
