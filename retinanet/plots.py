"""PNG figures of a COCO evaluation, for people who would rather look than read.

    pr_curves.png        precision-recall at IoU 0.50 and 0.75, averaged over categories
    ap_by_size.png       AP and AR (IoU .50:.95) for small, medium and large objects
    pr_per_category.png  (optional) one small precision-recall panel per category

Drawn with matplotlib's object API on the Agg canvas (no pyplot, no global backend switch), and
each file written atomically: a crash leaves the old file or the new one, never half of one.
"""

from __future__ import annotations

import math
from pathlib import Path

from .atomic import atomic_write
from .evaluate import CocoEvaluation

DPI = 100
PLOT_FILES = ("pr_curves.png", "ap_by_size.png", "pr_per_category.png")
PR_IOUS = (0.50, 0.75)
_COLORS = {0.50: "tab:blue", 0.75: "tab:orange"}


def _new_figure(width_in: float, height_in: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save_atomic(fig, path: Path) -> None:
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=DPI)


def plot_pr_curves(evaluation: CocoEvaluation, path: Path) -> None:
    """Precision against recall at IoU 0.50 and 0.75 (area all, 100 detections), mean over categories.

    Each curve's mean height is the AP at that IoU, shown in the legend. 600x450 px.
    """
    fig = _new_figure(6.0, 4.5)
    ax = fig.add_subplot()
    for iou in PR_IOUS:
        curve = evaluation.mean_pr_curve(iou)  # (R,) or None
        if curve is not None:
            ax.plot(evaluation.rec_thrs, curve, color=_COLORS[iou], label=f"IoU {iou:.2f}: AP {curve.mean():.3f}")
    if not ax.lines:
        ax.text(0.5, 0.5, "no ground truth", ha="center", va="center", transform=ax.transAxes)
    else:
        ax.legend(loc="upper right")
    with_gt = int((evaluation.category_pr_curves(PR_IOUS[0]) > -1).all(axis=0).sum())
    ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="recall", ylabel="precision",
           title=f"Precision-recall, mean over the {with_gt} categories with ground truth")
    ax.grid(alpha=0.3)
    _save_atomic(fig, path)


def plot_ap_by_size(metrics: dict, path: Path) -> None:
    """Bars of AP and AR (IoU .50:.95) for small (< 32^2 px), medium and large (> 96^2 px) objects. 600x400 px.

    A size without ground truth (None in `metrics`) gets no bar and an "n/a" label.
    """
    fig = _new_figure(6.0, 4.0)
    ax = fig.add_subplot()
    sizes = ("small", "medium", "large")
    width = 0.38
    for offset, kind, color in ((-width / 2, "AP", "tab:blue"), (width / 2, "AR", "tab:green")):
        values = [metrics[f"{kind}{size[0]}"] for size in sizes]  # APs, APm, APl / ARs, ARm, ARl
        ax.bar([x + offset for x, v in enumerate(values) if v is not None], [v for v in values if v is not None],
               width=width, color=color, label=kind)
        for x, v in enumerate(values):
            ax.text(x + offset, (v or 0) + 0.01, "n/a" if v is None else f"{v:.3f}", ha="center", va="bottom",
                    fontsize=8)
    ax.legend(loc="upper left")
    ax.set_xticks(range(len(sizes)), [f"{s}\n({r})" for s, r in zip(sizes, ("< 32²", "32²-96²", "> 96²"))])
    overall = "n/a" if metrics["AP"] is None else f"{metrics['AP']:.3f}"
    ax.set(ylim=(0, 1.05), ylabel="IoU .50:.95", title=f"AP and AR by object size (AP, all sizes: {overall})")
    ax.grid(axis="y", alpha=0.3)
    _save_atomic(fig, path)


def plot_pr_per_category(evaluation: CocoEvaluation, path: Path) -> None:
    """One precision-recall panel per category (IoU 0.50 and 0.75), in a near-square grid, 2 in per panel."""
    k = len(evaluation.cat_ids)
    cols = max(1, math.ceil(math.sqrt(k)))
    rows = max(1, math.ceil(k / cols))
    fig = _new_figure(2.0 * cols, 2.0 * rows)
    grid = fig.subplots(rows, cols, squeeze=False, sharex=True, sharey=True)
    curves = {iou: evaluation.category_pr_curves(iou) for iou in PR_IOUS}  # iou -> (R, K)
    for idx, ax in enumerate(grid.flat):
        if idx >= k:
            ax.set_axis_off()
            continue
        aps = []
        for iou, p in curves.items():
            if (p[:, idx] > -1).all():
                ax.plot(evaluation.rec_thrs, p[:, idx], color=_COLORS[iou], linewidth=1)
                aps.append(f"{p[:, idx].mean():.2f}")
        ax.set_title(f"{evaluation.cat_names[idx]}\nAP50/75 {'/'.join(aps) if aps else 'no GT'}", fontsize=7)
        ax.tick_params(labelsize=6)
        ax.set(xlim=(0, 1), ylim=(0, 1.02))
    fig.suptitle("Precision-recall per category: " + ", ".join(
        f"{_COLORS[iou].removeprefix('tab:')} IoU {iou:.2f}" for iou in PR_IOUS), fontsize=9)
    _save_atomic(fig, path)


def write_plots(evaluation: CocoEvaluation, metrics: dict, out_dir, per_category: bool = False) -> list:
    """Write pr_curves.png, ap_by_size.png (and pr_per_category.png) into `out_dir`; returns their paths."""
    paths = [Path(out_dir) / name for name in PLOT_FILES[:3 if per_category else 2]]
    plot_pr_curves(evaluation, paths[0])
    plot_ap_by_size(metrics, paths[1])
    if per_category:
        plot_pr_per_category(evaluation, paths[2])
    return paths
