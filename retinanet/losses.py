"""Classification and box losses, and the example weighting and selection the papers compare.

Focal Loss paper (Lin et al.): alpha-balanced cross entropy (eq. 3), focal loss (eqs. 4-5), FL*
(eqs. 6-8), the softmax focal loss of footnote 1, OHEM selection (sec. 5.1).
IoU-balanced paper (Wu and Li): the normalized weights of eqs. (2) and (5); eq. (4) is w_loc * iou^lambda.
Box losses: smooth L1 (Fast R-CNN), GIoU (Rezatofighi et al. 2019).

Every function here is pure: tensors in, tensors out. `RetinaNet.compute_losses` (modeling/retinanet.py) picks
and combines them as `LossConfig` says.
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .ops.boxes import paired_giou
from .ops.nms import batched_nms
from .ops.postprocess import segment_rank


def _reduce(loss: Tensor, reduction: str) -> Tensor:
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.mean()
    raise ValueError(f"reduction must be 'none', 'sum' or 'mean', got '{reduction}'")


# ----------------------------------------------------------------------------------------------
# sigmoid losses: CE, alpha-balanced CE, focal loss, FL*


def sigmoid_focal_loss(logits: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0,
                       reduction: str = "none") -> Tensor:
    """Focal loss FL(p_t) = -alpha_t (1 - p_t)^gamma log(p_t) (eq. 5) on sigmoid outputs.

    logits, targets: same shape; targets are 0 or 1 per class. alpha < 0 disables the alpha
    weighting; gamma = 0 gives alpha-balanced cross entropy (eq. 3), and plain CE with alpha < 0.

    Written with x_t = x if y = 1 else -x, so that p_t = sigmoid(x_t) (eqs. 2, 6):
    log(p_t) = logsigmoid(x_t) and (1 - p_t)^gamma = exp(gamma * logsigmoid(-x_t)). Both are finite
    with finite gradients for any finite logit (no log of a clamped probability), also for gamma < 1.

    This is the reference formula, differentiated by autograd. Training uses
    `sigmoid_focal_loss_fast`, which gives the same values and gradients with far less time and memory.
    """
    targets = targets.to(logits.dtype)
    x_t = logits * (2 * targets - 1)
    loss = -F.logsigmoid(x_t)
    if gamma != 0:
        loss = loss * torch.exp(gamma * F.logsigmoid(-x_t))
    if alpha >= 0:
        loss = loss * (alpha * targets + (1 - alpha) * (1 - targets))
    return _reduce(loss, reduction)


def fl_star_loss(logits: Tensor, targets: Tensor, gamma: float = 2.0, beta: float = 1.0,
                 reduction: str = "none") -> Tensor:
    """FL* = -log(p*_t) / gamma with p*_t = sigmoid(gamma x_t + beta) (eqs. 6-8).

    logits, targets: same shape, targets 0 or 1. Its derivative is y (p*_t - 1) (eq. 11). Table 2
    of the paper: (gamma, beta) = (2, 1) and (4, 0) match FL; as in eqs. (7)-(8), no alpha weighting.
    """
    if gamma <= 0:
        raise ValueError(f"FL* needs gamma > 0 (it divides by gamma), got {gamma}")
    x_t = logits * (2 * targets.to(logits.dtype) - 1)
    return _reduce(-F.logsigmoid(gamma * x_t + beta) / gamma, reduction)


# ----------------------------------------------------------------------------------------------
# fast sigmoid focal loss: one pass computes the loss and its gradient


def _focal_loss_and_grad(logits: Tensor, targets: Tensor, weights: Optional[Tensor], alpha: float, gamma: float,
                         reduce: bool) -> tuple:
    """The focal loss (eq. 5) and its derivative in x, in one pass, in float32.

    The derivative is eq. (10) times alpha_t (and times the weight):
        dFL/dx = y alpha_t (1 - p_t)^gamma (gamma p_t log(p_t) + p_t - 1),  y in {-1, 1}.
    Returns (loss summed if `reduce`, else elementwise float32; gradient float32, logits' shape).
    Plain tensor ops, so that the same function runs eagerly or through torch.compile (which fuses
    it into one loop over the elements); run eagerly, the in-place ops and `del`s keep at most about
    five logits-sized float32 buffers alive at once.
    """
    pos_w, neg_w = (alpha, 1.0 - alpha) if alpha >= 0 else (1.0, 1.0)  # alpha_t for y = 1 and y = -1
    x = logits.float()
    positive = targets > 0.5  # (..., K) bool
    x_t = torch.where(positive, x, -x)
    log_p = F.logsigmoid(x_t)  # log(p_t)
    q = x_t.neg_().sigmoid_()  # 1 - p_t
    modulator = q.pow(gamma)  # (1 - p_t)^gamma
    grad = (1.0 - q).mul_(log_p).mul_(gamma).sub_(q).mul_(modulator)  # (1 - p_t)^gamma (gamma p_t log p_t + p_t - 1)
    del q
    grad = torch.where(positive, grad * pos_w, grad.mul_(-neg_w))  # times y alpha_t (the product is taken before mul_)
    loss = modulator.mul_(log_p).neg_()  # (1 - p_t)^gamma (-log p_t)
    del log_p
    if weights is not None:
        w = weights.float()
        grad.mul_(w)
        loss.mul_(w)
    if reduce:
        total = loss.sum()
        return neg_w * total + (pos_w - neg_w) * torch.where(positive, loss, 0.0).sum(), grad
    return loss.mul_(torch.where(positive, pos_w, neg_w)), grad


# Below this many elements the fused kernel is not worth its compile time (seconds to a minute, once
# per process): the eager kernel is used. Above it (a real batch: 2 images x 100k anchors x 80
# classes is 1.9e7) compiling pays for itself within the first iterations.
COMPILE_MIN_ELEMENTS = 1 << 22


@functools.lru_cache(maxsize=1)
def _compiled_kernel():
    return torch.compile(_focal_loss_and_grad, dynamic=True, fullgraph=True)


_compile_failed = False


def _run_kernel(logits: Tensor, targets: Tensor, weights: Optional[Tensor], alpha: float, gamma: float,
                reduce: bool, compile: Optional[bool]) -> tuple:
    global _compile_failed
    if compile is None:
        compile = logits.numel() >= COMPILE_MIN_ELEMENTS
    if torch.compiler.is_compiling():  # already inside a compiled region: it fuses the eager kernel itself
        compile = False
    with torch.autocast(device_type=logits.device.type, enabled=False):
        if compile and not _compile_failed:
            try:
                return _compiled_kernel()(logits, targets, weights, float(alpha), float(gamma), reduce)
            except Exception as e:  # no working compiler (or backend) here: the eager kernel is the same math
                _compile_failed = True
                warnings.warn(f"torch.compile of the focal loss failed ({type(e).__name__}: {e}); "
                              f"using the eager kernel", RuntimeWarning)
        return _focal_loss_and_grad(logits, targets, weights, float(alpha), float(gamma), reduce)


def _saved_grad_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the focal loss keeps its gradient in until backward: the logits' own, unless it
    has less range than float32. float16 would flush the easy negatives' gradients (about 3 p^3,
    1e-9 and less) to 0 before GradScaler's factor reaches them, so float16 logits keep float32."""
    return torch.float32 if torch.finfo(dtype).max < torch.finfo(torch.float32).max else dtype


class _SigmoidFocalLoss(torch.autograd.Function):
    """Forward computes the loss and the gradient together and saves only the gradient (logits' dtype,
    float32 for float16 logits: see `_saved_grad_dtype`).

    Backward scales the saved gradient in place and hands it on, rounded to the logits' dtype only
    after grad_output (the AMP loss scale) has multiplied it: no new logits-sized buffer beyond that
    rounding. The saved gradient is thereby used up; a second backward through the same graph
    (retain_graph=True) is refused by autograd's check of saved tensors' versions, not answered wrongly.
    """

    @staticmethod
    def forward(ctx, logits, targets, weights, alpha, gamma, reduction, compile):
        loss, grad = _run_kernel(logits, targets, weights, alpha, gamma, reduction != "none", compile)
        if reduction == "mean":
            n = logits.numel()
            loss, grad = loss / n, grad / n
        ctx.logits_dtype = logits.dtype
        ctx.save_for_backward(grad.to(_saved_grad_dtype(logits.dtype)))
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return grad.mul_(grad_output).to(ctx.logits_dtype), None, None, None, None, None, None


def sigmoid_focal_loss_fast(logits: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0,
                            weights: Optional[Tensor] = None, reduction: str = "sum",
                            compile: Optional[bool] = None) -> Tensor:
    """`sigmoid_focal_loss` (eq. 5, gamma = 0: eq. 3) with an analytical backward.

    logits (..., K) any float dtype; targets same shape, 0/1 (bool, integer or float); weights
    (optional, not differentiated) broadcastable to logits, e.g. (B, N, 1) with 0 for ignored
    anchors. reduction: "sum" (what training uses), "mean" or "none". The math is float32 whatever
    the logits' dtype; the loss comes back float32, the gradient in the logits' dtype (kept in float32
    for float16 logits until the incoming gradient, e.g. GradScaler's factor, has scaled it).

    Forward computes the loss and its gradient in one pass and keeps only the gradient, where
    autograd on the reference formula keeps about ten intermediate tensors. compile: None picks
    torch.compile (one fused loop) for inputs of at least `COMPILE_MIN_ELEMENTS` elements; True or
    False forces it. If compiling fails the eager kernel is used, with a warning.
    benchmarks/bench_focal.py measures both against the reference.
    """
    if reduction not in ("none", "sum", "mean"):
        raise ValueError(f"reduction must be 'none', 'sum' or 'mean', got '{reduction}'")
    if targets.shape != logits.shape:
        raise ValueError(f"targets {tuple(targets.shape)} must have the logits' shape {tuple(logits.shape)}")
    return _SigmoidFocalLoss.apply(logits, targets, weights, alpha, gamma, reduction, compile)


# ----------------------------------------------------------------------------------------------
# softmax focal loss (footnote 1)


def softmax_focal_loss(logits: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0,
                       reduction: str = "none") -> Tensor:
    """Multi-class focal loss -alpha_t (1 - p_t)^gamma log(p_t), p = softmax(logits) (footnote 1).

    logits (M, K + 1): K object classes then the background class (index K); targets (M,) int64
    in 0..K. alpha_t = alpha for object classes, 1 - alpha for background (as in Detectron's
    SoftmaxFocalLoss); alpha < 0 disables it. gamma = 0 is (alpha-balanced) softmax cross entropy.

    log(1 - p_t) is computed as logsumexp over the other classes minus logsumexp over all, so
    (1 - p_t)^gamma and its gradient stay finite also when p_t rounds to 1.
    """
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"softmax_focal_loss: logits must be (M, K+1) and targets (M,), got "
                         f"{tuple(logits.shape)} and {tuple(targets.shape)}")
    background = logits.shape[1] - 1
    t = targets[:, None]  # (M, 1)
    log_all = torch.logsumexp(logits, dim=1)  # (M,)
    log_p = logits.gather(1, t)[:, 0] - log_all  # log(p_t)
    loss = -log_p
    if gamma != 0:
        others = logits.scatter(1, t, float("-inf"))  # (M, K+1), the true class masked out
        log_q = torch.logsumexp(others, dim=1) - log_all  # log(1 - p_t)
        loss = loss * torch.exp(gamma * log_q)
    if alpha >= 0:
        loss = loss * torch.where(targets == background, 1.0 - alpha, alpha)
    return _reduce(loss, reduction)


def softmax_prior_bias(num_classes: int, prior_prob: float) -> Tensor:
    """Bias of the K + 1 softmax logits so that the total object probability starts at pi.

    Object classes 0, background log(K (1 - pi) / pi): each object class then has probability
    1 / (K + K (1 - pi) / pi) = pi / K, together pi (the softmax form of sec. 3.3 / 4.1).
    """
    bias = torch.zeros(num_classes + 1)
    bias[num_classes] = math.log(num_classes * (1 - prior_prob) / prior_prob)
    return bias


# ----------------------------------------------------------------------------------------------
# box losses


def smooth_l1_loss(pred: Tensor, target: Tensor, beta: float = 0.11, reduction: str = "none") -> Tensor:
    """Smooth L1 (Huber / beta): 0.5 d^2 / beta where |d| < beta, else |d| - 0.5 beta; beta = 0 is L1."""
    diff = (pred - target).abs()
    if beta > 0:
        loss = torch.where(diff < beta, 0.5 * diff * diff / beta, diff - 0.5 * beta)
    else:
        loss = diff
    return _reduce(loss, reduction)


def giou_loss(pred_boxes: Tensor, target_boxes: Tensor, reduction: str = "none") -> Tensor:
    """1 - GIoU(pred[i], target[i]) (Rezatofighi et al. 2019): (N, 4), (N, 4) xyxy -> (N,), in [0, 2]."""
    return _reduce(1.0 - paired_giou(pred_boxes, target_boxes), reduction)


# ----------------------------------------------------------------------------------------------
# IoU-balanced weights (IoU-balanced paper, sec. 3)


def iou_balance_ratio(iou: Tensor, losses: Tensor, power: float) -> Tensor:
    """sum(losses) / sum(iou^power * losses), the normalizer of eqs. (2) and (5); 1 when the denominator is 0.

    iou, losses: (P,). Returns a float32 scalar, no gradient. `w_loc: auto` measures this at the first step.
    """
    with torch.no_grad():
        losses = losses.float()
        den = (iou.float().pow(power) * losses).sum()
        return torch.where(den > 0, losses.sum() / den.clamp(min=torch.finfo(den.dtype).tiny), torch.ones_like(den))


def iou_balanced_weights(iou: Tensor, losses: Tensor, power: float) -> Tensor:
    """w_i = iou_i^power * sum_j L_j / sum_j iou_j^power L_j (eq. 2 with eta, eq. 5 with lambda).

    iou: (P,) IoU of each positive's regressed box with its ground-truth box; losses: (P,) the
    positives' unweighted losses. Returns (P,) float32 weights, detached, with sum(w * L) = sum(L).
    If every iou is 0 (the denominator is 0) all weights are 1.
    """
    with torch.no_grad():
        scaled = iou.float().pow(power)
        den = (scaled * losses.float()).sum()
        return torch.where(den > 0, scaled * iou_balance_ratio(iou, losses, power), torch.ones_like(scaled))


# ----------------------------------------------------------------------------------------------
# OHEM (Shrivastava et al.; Focal Loss paper sec. 5.1)


def ohem_select(scores: Tensor, boxes: Tensor, positive: Tensor, batch_size: int, nms_thresh: float,
                ratio: int = 0, candidates: int = 10000) -> tuple:
    """Pick each image's hard examples: the highest-loss anchors that survive NMS.

    scores (B, N): each anchor's loss, -inf for anchors that must not be picked (ignored);
    boxes (B, N, 4) xyxy, the boxes NMS compares; positive (B, N) bool, foreground anchors.
    Per image: the `candidates` highest scores (so that NMS stays tractable), NMS at `nms_thresh`
    ranked by score, then the `batch_size` highest survivors. With `ratio` r > 0 (OHEM 1:r, as
    SSD): at most floor(batch_size / (1 + r)) positives, and negatives capped at r times the kept
    positives (and at the rest of the batch); an image with no positive survivor keeps r negatives,
    as if it had one positive, so that it still teaches the background.

    Returns (image index (S,), anchor index (S,)) int64 of the kept anchors, grouped by image,
    by decreasing score within. The whole batch is handled at once (NMS groups = images).
    """
    b, n = scores.shape
    k = min(candidates, n)
    top_scores, top_idx = scores.topk(k, dim=1)  # (B, k)
    finite = torch.isfinite(top_scores)
    img = torch.arange(b, device=scores.device)[:, None].expand(b, k)[finite]  # (C,)
    anchor = top_idx[finite]
    score = top_scores[finite]
    # Only each image's first batch_size survivors (OHEM 1:r: first batch_size // (1 + r) positives
    # and batch_size negatives) can be picked below, so the native NMS may stop there.
    is_pos = positive[img, anchor]
    quota = [batch_size] if ratio <= 0 else [batch_size, batch_size // (1 + ratio)]
    keep = batched_nms(boxes[img, anchor], score, img, nms_thresh,
                       kinds=is_pos.long() if ratio > 0 else None, quota=quota)  # by decreasing score
    img, anchor, score = img[keep], anchor[keep], score[keep]
    pos = is_pos[keep]
    if ratio <= 0:
        order, rank = segment_rank(img, score)
        chosen = order[rank < batch_size]
    else:
        order, rank = segment_rank(img * 2 + pos.long(), score)  # ranked among the image's positives / negatives
        num_pos = torch.bincount(img[pos], minlength=b).clamp(max=batch_size // (1 + ratio))  # (B,)
        num_neg = torch.minimum(ratio * num_pos.clamp(min=1), batch_size - num_pos)  # (B,)
        limit = torch.where(pos[order], num_pos[img[order]], num_neg[img[order]])
        chosen = order[rank < limit]
        chosen = chosen[segment_rank(img[chosen], score[chosen])[0]]  # back to per image, by score
    return img[chosen], anchor[chosen]
