"""The papers' analysis figures, as data (pure functions) and as PNGs.

Focal Loss paper: Figure 1 (CE vs FL over p_t), Figures 3 and 4 (CE, FL, FL* over x_t and their
derivatives). The checkpoint-based figures (Figure 6, the loss CDF, and the IoU-balanced paper's
Figures 2 and 3) are computed by `retinanet analyze` from a trained model.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .losses import fl_star_loss, sigmoid_focal_loss

FIGURE1_GAMMAS = (0.0, 0.5, 1.0, 2.0, 5.0)
# Figures 3 and 4: CE, FL with gamma 2, and FL* at the two settings of Table 2
FIGURE3_LOSSES = (("CE", "ce", {}), ("FL, gamma=2", "focal", {"gamma": 2.0}),
                  ("FL*, gamma=2, beta=1", "fl_star", {"gamma": 2.0, "beta": 1.0}),
                  ("FL*, gamma=4, beta=0", "fl_star", {"gamma": 4.0, "beta": 0.0}))


def focal_curve(p_t: torch.Tensor, gamma: float) -> torch.Tensor:
    """FL(p_t) = -(1 - p_t)^gamma log(p_t) (eq. 4, no alpha); gamma = 0 is CE (Figure 1)."""
    x_t = torch.logit(p_t.double())  # p_t = sigmoid(x_t)
    return sigmoid_focal_loss(x_t, torch.ones_like(x_t), alpha=-1, gamma=gamma)


def loss_of_xt(x_t: torch.Tensor, kind: str, **params) -> tuple:
    """(loss, d loss / d x_t) at the foreground target y = 1, where x = x_t (Figures 3 and 4)."""
    x = x_t.double().clone().requires_grad_(True)
    y = torch.ones_like(x)
    if kind == "ce":
        loss = sigmoid_focal_loss(x, y, alpha=-1, gamma=0.0)
    elif kind == "focal":
        loss = sigmoid_focal_loss(x, y, alpha=-1, gamma=params.get("gamma", 2.0))
    elif kind == "fl_star":
        loss = fl_star_loss(x, y, gamma=params.get("gamma", 2.0), beta=params.get("beta", 1.0))
    else:
        raise ValueError(f"unknown loss '{kind}' (expected ce, focal or fl_star)")
    (grad,) = torch.autograd.grad(loss.sum(), x)
    return loss.detach(), grad


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_loss_curves(output_dir: str) -> list:
    """Write figure1_ce_vs_fl.png and figure3_4_losses_and_derivatives.png into output_dir."""
    from .atomic import atomic_write

    plt = _pyplot()
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []

    p_t = torch.linspace(0.001, 0.999, 500, dtype=torch.float64)
    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=80)
    for gamma in FIGURE1_GAMMAS:
        ax.plot(p_t, focal_curve(p_t, gamma), label=f"gamma = {gamma:g}")
    ax.set(xlabel="probability of ground truth class (p_t)", ylabel="loss", ylim=(0, 5),
           title="Figure 1: focal loss -(1 - p_t)^gamma log(p_t)")
    ax.axvspan(0.6, 1.0, color="0.92")
    ax.text(0.62, 4.2, "well-classified\nexamples", fontsize=9)
    ax.legend()
    written.append(_save(fig, out / "figure1_ce_vs_fl.png", atomic_write, plt))

    x_t = torch.linspace(-10, 10, 500, dtype=torch.float64)
    fig, (ax_loss, ax_grad) = plt.subplots(1, 2, figsize=(10, 4), dpi=80)
    for name, kind, params in FIGURE3_LOSSES:
        loss, grad = loss_of_xt(x_t, kind, **params)
        ax_loss.plot(x_t, loss, label=name)
        ax_grad.plot(x_t, grad, label=name)
    ax_loss.set(xlabel="x_t", ylabel="loss", ylim=(0, 5), title="Figure 3: loss as a function of x_t")
    ax_grad.set(xlabel="x_t", ylabel="d loss / d x_t", ylim=(-1.3, 0.1), title="Figure 4: derivatives (eqs. 9-11)")
    ax_loss.legend(), ax_grad.legend()
    written.append(_save(fig, out / "figure3_4_losses_and_derivatives.png", atomic_write, plt))
    return written


def _save(fig, path: Path, atomic_write, plt) -> str:
    fig.tight_layout()
    with atomic_write(path) as f:
        fig.savefig(f, format="png")
    plt.close(fig)
    return str(path)


# ----------------------------------------------------------------------------------------------
# From a trained model (Focal Loss paper Figure 6; IoU-balanced paper Figures 2 and 3)

FIGURE6_GAMMAS = (0.0, 0.5, 1.0, 2.0)
IOU_BINS = tuple(round(0.05 * i, 2) for i in range(10, 21))  # 0.50, 0.55, ..., 1.00
IOU_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)


def normalized_loss_cdf(losses: torch.Tensor) -> tuple:
    """Sort losses from lowest to highest, normalize them to sum to one, and return the CDF:
    (fraction of samples (n,), cumulative normalized loss (n,)), as in Figure 6."""
    losses = torch.sort(losses.double().flatten()).values
    n = losses.numel()
    fraction = torch.arange(1, n + 1, dtype=torch.float64) / max(n, 1)
    return fraction, torch.cumsum(losses, 0) / losses.sum().clamp(min=1e-300)


@torch.no_grad()
def anchor_samples(model, dataset, max_images: int = 100, max_negatives: int = 1_000_000, seed: int = 0) -> tuple:
    """Classification logits and one-hot targets of the foreground and background anchors of a model
    on the first `max_images` images: (pos_logits (P, K), pos_targets (P, K), neg_logits (M, K)).
    Images are resized as at test time; negatives are subsampled to at most `max_negatives`."""
    from .data.transforms import ResizeShortestSide
    from .ops.matcher import BACKGROUND, FOREGROUND

    model.eval()
    resize = ResizeShortestSide([model.min_size], model.max_size, rounding=model.resize_rounding)
    pos_l, pos_t, neg_l = [], [], []
    for i in range(min(max_images, len(dataset))):
        image, target = resize(*dataset[i])
        batch = model.preprocess([image], resize=False).tensor
        cls_logits, _, anchors, _ = model.forward_features(batch)  # (1, N, K)
        labels, _, classes = model.assign_targets(anchors, [target])
        logits = cls_logits[0].float()
        fg, bg = labels[0] == FOREGROUND, labels[0] == BACKGROUND
        onehot = torch.zeros_like(logits[fg])
        onehot[torch.arange(onehot.shape[0]), classes[0][fg]] = 1.0
        pos_l.append(logits[fg]), pos_t.append(onehot), neg_l.append(logits[bg])
    pos_logits, pos_targets, neg_logits = torch.cat(pos_l), torch.cat(pos_t), torch.cat(neg_l)
    if neg_logits.shape[0] > max_negatives:
        keep = torch.randperm(neg_logits.shape[0], generator=torch.Generator().manual_seed(seed))[:max_negatives]
        neg_logits = neg_logits[keep]
    return pos_logits, pos_targets, neg_logits


def loss_cdfs(pos_logits, pos_targets, neg_logits, gammas=FIGURE6_GAMMAS) -> dict:
    """{gamma: {"positive": (x, y), "negative": (x, y)}}: the CDF of each anchor's focal loss (summed
    over its K classes, no alpha: it cancels in the normalization), for each gamma (Figure 6)."""
    out = {}
    for gamma in gammas:
        pos = sigmoid_focal_loss(pos_logits, pos_targets, alpha=-1, gamma=gamma).sum(dim=1)
        neg = sigmoid_focal_loss(neg_logits, torch.zeros_like(neg_logits), alpha=-1, gamma=gamma).sum(dim=1)
        out[gamma] = {"positive": normalized_loss_cdf(pos), "negative": normalized_loss_cdf(neg)}
    return out


def plot_loss_cdf(cdfs: dict, path: str) -> str:
    from .atomic import atomic_write

    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=80)
    for ax, kind in zip(axes, ("positive", "negative")):
        for gamma, curves in cdfs.items():
            x, y = curves[kind]
            step = max(1, x.numel() // 2000)  # a few thousand points draw the same curve
            ax.plot(x[::step], y[::step], label=f"gamma = {gamma:g}")
        ax.set(xlabel=f"fraction of {kind} samples", ylabel="cumulative normalized loss", xlim=(0, 1), ylim=(0, 1),
               title=f"Figure 6: {kind} samples")
        ax.legend()
    return _save(fig, Path(path), atomic_write, plt)


@torch.no_grad()
def detection_ious(model, dataset, max_images: int = 500, batch_size: int = 8) -> tuple:
    """(scores (D,), ious (D,)) of the model's detections: each detection's IoU with the best
    overlapping non-crowd ground-truth box of its class in its image (0 if none)."""
    from .ops.boxes import box_iou

    model.eval()
    scores, ious = [], []
    n = min(max_images, len(dataset))
    for start in range(0, n, batch_size):
        items = [dataset[i] for i in range(start, min(n, start + batch_size))]
        detections = model([image for image, _ in items])
        for det, (_, target) in zip(detections, items):
            gt = target["boxes"][~target["iscrowd"]]
            gt_labels = target["labels"][~target["iscrowd"]]
            iou = box_iou(det["boxes"], gt)  # (D, G)
            iou = torch.where(det["labels"][:, None] == gt_labels[None, :], iou, torch.zeros_like(iou))
            ious.append(iou.amax(dim=1) if gt.shape[0] else torch.zeros(len(det["boxes"])))
            scores.append(det["scores"])
    return torch.cat(scores), torch.cat(ious)


def mean_score_by_iou(scores, ious, bins=IOU_BINS) -> list:
    """IoU-balanced Figure 2: [(lo, hi, mean score or None, count)] for detections with lo <= IoU < hi
    (the last bin includes 1.0)."""
    rows = []
    for lo, hi in zip(bins[:-1], bins[1:]):
        sel = (ious >= lo) & ((ious < hi) if hi < bins[-1] else (ious <= hi))
        count = int(sel.sum())
        rows.append((lo, hi, float(scores[sel].mean()) if count else None, count))
    return rows


def share_above(ious, thresholds=IOU_THRESHOLDS) -> list:
    """IoU-balanced Figure 3: [(t, fraction of detections with IoU >= t)]."""
    n = max(ious.numel(), 1)
    return [(t, float((ious >= t).sum()) / n) for t in thresholds]


def plot_iou_figures(models: dict, path: str) -> str:
    """IoU-balanced Figures 2 and 3 side by side; models: {label: (scores (D,), ious (D,))}, one bar
    colour per model (the paper compares the baseline with IoU-balanced classification)."""
    from .atomic import atomic_write

    plt = _pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4), dpi=80)
    width = 0.8 / max(len(models), 1)
    for i, (label, (scores, ious)) in enumerate(models.items()):
        shift = (i - (len(models) - 1) / 2) * width  # this model's bar beside the others'
        rows = mean_score_by_iou(scores, ious)
        a.bar([j + shift for j in range(len(rows))], [r[2] or 0.0 for r in rows], width=width, label=label)
        shares = share_above(ious)
        b.bar([j + shift for j in range(len(shares))], [100 * v for _, v in shares], width=width, label=label)
    a.set_xticks(range(len(IOU_BINS) - 1), [f"{lo:.2f}" for lo in IOU_BINS[:-1]], rotation=45)
    a.set(xlabel="IoU with ground truth (bin start)", ylabel="average score",
          title="IoU-balanced Fig. 2: average score by IoU")
    b.set_xticks(range(len(IOU_THRESHOLDS)), [f">= {t:g}" for t in IOU_THRESHOLDS])
    b.set(xlabel="IoU threshold", ylabel="% of detections", title="IoU-balanced Fig. 3: detections above IoU")
    if len(models) > 1:
        a.legend()
        b.legend()
    return _save(fig, Path(path), atomic_write, plt)
