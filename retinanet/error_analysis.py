"""Where a detector's errors are: the TIDE breakdown, a confusion matrix, precision-recall per
category and calibration, from a results list and its ground truth.

AP says how good a detector is; it does not say what to fix. TIDE (Bolya et al., ECCV 2020) sorts
every false positive and missed object at IoU 0.5 into one of six kinds and reports, for each, the
AP50 the detector would gain if that kind alone were fixed (dAP, in AP points):

    Cls   right place (IoU >= 0.5 with an object), wrong class
    Loc   right class, poor box (0.1 <= IoU < 0.5 with an object of its class)
    Both  wrong class and poor box
    Dupe  right class and box, but the object was already taken by a higher-scoring detection
    Bkg   on background (IoU < 0.1 with every object)
    Miss  an object that no detection, right or wrong, is near

and two "special" oracles: FP (every false positive removed: perfect precision) and FN (every
missed object dropped from the count: perfect recall). The dAPs do not add up to 100 - AP50: each
is measured alone, and an error fixed changes what the others cost.

The IoU of a "right box" is TIDE's pos_thr, 0.5 by default. A detector that is near-perfect at
AP50 but not at the COCO AP (.50:.95) loses its AP to poor boxes, which IoU 0.5 counts as right:
`pos_thr` 0.75 (`retinanet analyze errors --iou 0.75`) sorts them as Loc errors instead, and the
confusion matrix and calibration are then read at that IoU too. `ap_by_iou` says where the AP
is lost: the AP at each of COCO's ten thresholds 0.50:0.05:0.95, whose mean is the AP, read from
the same COCOeval run's precision array (nothing is matched again).

The confusion matrix counts, at IoU 0.5 (pos_thr) and with the 100 best detections of each image, which
class each object was detected as: rows are the ground truth's categories and "background" (a
detection that matched nothing), columns the predicted ones and "background" (an object nothing
matched). Unlike COCOeval, detections are matched across categories, best score first, so a
wrong-class detection that outscores the right one takes the object. Crowd regions are not
matched there: a detection on one is a background row entry (COCOeval ignores it).

Calibration: do scores mean probabilities? Detections (COCOeval's 100 best per image, crowd
matches left out) are put in 10 equal-width score bins; in each, the share that are true
positives at IoU 0.5 (accuracy) against the mean score (confidence). ECE is the mean gap
|accuracy - confidence| weighted by the bins' counts, MCE the largest gap.

None of this is re-implemented here: hotcoco (the default COCOeval backend) computes all of it
(`COCOeval.tide_errors`, `.confusion_matrix`, `.calibration`), for boxes and, iou_type "segm",
masks. benchmarks/check_tide.py compares its TIDE figures with the reference implementation,
tidecv; the README states the differences.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from .evaluate import CocoEvaluation, PathLike, _unique_names

TIDE_MAIN = ("Cls", "Loc", "Both", "Dupe", "Bkg", "Miss")
TIDE_SPECIAL = ("FP", "FN")
PR_IOUS = (0.50, 0.75)
REPORT_JSON = "errors.json"
# one PNG per figure and IoU type, named "{iou_type}_{name}.png"
FIGURE_NAMES = ("tide", "confusion_matrix", "pr_per_category", "calibration")


@dataclass
class ErrorAnalysis:
    """The error analysis of one results list, for one IoU type ("bbox" or "segm").

    tide: {"AP50" (or "AP@{pos_thr}", e.g. "AP@0.75"): AP at IoU pos_thr before any fix,
           "dAP": {TIDE_MAIN kind: AP gain if fixed},
           "special": {"FP", "FN": AP gain}, "counts": {TIDE_MAIN kind: number of errors},
           "pos_thr", "bg_thr"}; AP and dAP are fractions (0.05 is 5 AP points).
    confusion: {"iou_thr", "categories": K names then "background", "cat_ids" (K,),
                "matrix": (K+1) x (K+1) counts, rows ground truth, columns predictions}.
    calibration: {"ece", "mce", "iou_thr", "num_detections", "bins": [{"lower", "upper",
                  "confidence", "accuracy", "count"}], "per_category": {name: ECE}}.
    evaluation: the COCOeval accumulation the precision-recall curves are read from.
    """

    iou_type: str
    tide: dict
    confusion: dict
    calibration: dict
    evaluation: CocoEvaluation

    def pr_curves(self) -> dict:
        """{"recall": (R,) recall thresholds, "0.5" / "0.75": {category name: (R,) precision, or None
        without ground truth}} (area all, 100 detections per image)."""
        ev = self.evaluation
        out = {"recall": ev.rec_thrs.tolist()}
        for iou in PR_IOUS:
            p = ev.category_pr_curves(iou)  # (R, K), -1 where the category has no ground truth
            out[f"{iou:g}"] = {name: (p[:, k].tolist() if (p[:, k] > -1).all() else None)
                               for k, name in enumerate(_unique_names(ev.cat_ids, ev.cat_names))}
        return out

    def ap_by_iou(self) -> dict:
        """{"0.5": AP at IoU 0.50, "0.55": ..., "0.95": ...}: COCO's AP at each of its IoU thresholds
        (area all, 100 detections per image; fractions, None without ground truth). Their mean is the
        COCO AP: read from the evaluation's precision array, as pycocotools' summarize() reads AP50."""
        ev = self.evaluation
        return {f"{t:g}": ev.ap_at_iou(float(t)) for t in np.round(ev.iou_thrs, 2)}

    def to_dict(self) -> dict:
        """Everything, as plain JSON-ready values."""
        return {"iou_type": self.iou_type, "tide": self.tide, "confusion": self.confusion,
                "calibration": self.calibration, "AP": _finite(self.evaluation.metrics()["AP"]),
                "ap_by_iou": self.ap_by_iou(), "pr_curves": self.pr_curves()}


def _finite(value) -> Optional[float]:
    """float, or None for NaN / missing (JSON has no NaN)."""
    return None if value is None or not math.isfinite(float(value)) else float(value)


def analyze_errors(gt: Union[PathLike, dict], results: Union[PathLike, list], iou_type: str = "bbox", *,
                   pos_thr: float = 0.5, bg_thr: float = 0.1, bins: int = 10) -> ErrorAnalysis:
    """TIDE errors, confusion matrix, per-category precision-recall and calibration of `results`.

    gt: a COCO ground truth file or dict; results: a COCO results file or list ({image_id,
    category_id, bbox, score}, and "segmentation" RLEs for iou_type "segm"). The inputs are checked
    as `evaluate_coco` checks them (errors name the file and the bad result, image id or category id).
    pos_thr: TIDE's and the confusion matrix's match IoU; bg_thr: TIDE's background IoU; bins: the
    number of score bins of the calibration.

    Example: `analyze_errors("instances_val2017.json", "detections.json").tide["dAP"]["Loc"]`.
    """
    from .evaluate import _evaluation, _run

    if not 0 < bg_thr < pos_thr < 1:
        raise ValueError(f"need 0 < bg_thr < pos_thr < 1, got bg_thr {bg_thr}, pos_thr {pos_thr}")
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    gt, ev = _run(gt, results, "hotcoco", iou_type, proposals=False)  # checked inputs, evaluated, accumulated
    evaluation = _evaluation(gt, ev)
    names = dict(zip(evaluation.cat_ids, _unique_names(evaluation.cat_ids, evaluation.cat_names)))

    t = ev.tide_errors(pos_thr=pos_thr, bg_thr=bg_thr)
    tide = {"AP50" if pos_thr == 0.5 else f"AP@{pos_thr:g}": _finite(t["ap_base"]),
            "dAP": {k: float(t["delta_ap"][k]) for k in TIDE_MAIN},
            "special": {k: float(t["delta_ap"][k]) for k in TIDE_SPECIAL},
            "counts": {k: int(t["counts"][k]) for k in TIDE_MAIN}, "pos_thr": pos_thr, "bg_thr": bg_thr}

    cm = ev.confusion_matrix(iou_thr=pos_thr, max_det=100)
    cat_ids = [int(c) for c in cm["cat_ids"]]
    confusion = {"iou_thr": pos_thr, "categories": [names[c] for c in cat_ids] + ["background"],
                 "cat_ids": cat_ids, "matrix": np.asarray(cm["matrix"]).astype(int).tolist()}

    c = ev.calibration(n_bins=bins, iou_threshold=pos_thr)
    calibration = {"ece": _finite(c["ece"]), "mce": _finite(c["mce"]), "iou_thr": pos_thr,
                   "num_detections": int(c["num_detections"]),
                   "bins": [{"lower": float(b["bin_lower"]), "upper": float(b["bin_upper"]),
                             "confidence": _finite(b["avg_confidence"]) if b["count"] else None,
                             "accuracy": _finite(b["avg_accuracy"]) if b["count"] else None,
                             "count": int(b["count"])} for b in c["bins"]],
                   "per_category": {name: _finite(v) for name, v in c["per_category"].items()}}
    return ErrorAnalysis(iou_type, tide, confusion, calibration, evaluation)


def format_tide_line(tide: dict, iou_type: str = "bbox") -> str:
    """One line: "TIDE bbox (AP50 91.23): dAP Cls 1.23 Loc 4.56 Both 0.12 Dupe 0.01 Bkg 2.34 Miss 3.45 |
    FP 5.67 FN 6.78", in AP points (x100, as tidecv prints them); `tide` is ErrorAnalysis.tide."""
    ap_key = next(k for k in tide if k.startswith("AP"))
    ap = tide[ap_key]
    main = " ".join(f"{k} {100 * tide['dAP'][k]:.2f}" for k in TIDE_MAIN)
    special = " ".join(f"{k} {100 * tide['special'][k]:.2f}" for k in TIDE_SPECIAL)
    return f"TIDE {iou_type} ({ap_key} {'n/a' if ap is None else f'{100 * ap:.2f}'}): dAP {main} | {special}"


def format_ap_by_iou_line(ap_by_iou: dict, iou_type: str = "bbox") -> str:
    """One line: "AP by IoU bbox: .50 98.80 .55 98.10 ... .95 31.20 | mean 82.70", in AP points;
    `ap_by_iou` is ErrorAnalysis.ap_by_iou() (the mean of the ten is the COCO AP)."""
    def points(v):
        return "n/a" if v is None else f"{100 * v:.2f}"

    cells = " ".join(f"{float(t):.2f}"[1:] + f" {points(v)}" for t, v in ap_by_iou.items())
    defined = [v for v in ap_by_iou.values() if v is not None]
    mean = sum(defined) / len(defined) if len(defined) == len(ap_by_iou) else None
    return f"AP by IoU {iou_type}: {cells} | mean {points(mean)}"


# ---------------------------------------------------------------------------------------------
# Figures


def output_files(out_dir: PathLike, iou_types: Sequence[str]) -> list:
    """The files `write_report` writes for these IoU types: errors.json, then the PNGs."""
    out = Path(out_dir)
    return [out / REPORT_JSON] + [out / f"{t}_{name}.png" for t in iou_types for name in FIGURE_NAMES]


def plot_tide(tide: dict, path: Path, title: str = "") -> None:
    """Bars of the AP gain of fixing each kind of error (left) and the FP / FN oracles (right). 900x350 px."""
    from .plots import _new_figure, _save_atomic

    fig = _new_figure(9.0, 3.5)
    left, right = fig.subplots(1, 2, width_ratios=[3, 1])
    for ax, keys, values, color in ((left, TIDE_MAIN, tide["dAP"], "tab:red"),
                                    (right, TIDE_SPECIAL, tide["special"], "tab:gray")):
        points = [100 * values[k] for k in keys]
        ax.bar(range(len(keys)), points, color=color)
        labels = [f"{k}\n({tide['counts'][k]})" if k in tide["counts"] else k for k in keys]
        ax.set_xticks(range(len(keys)), labels)
        for x, v in enumerate(points):
            ax.text(x, v, f"{v:.2f}", ha="center", va="bottom", fontsize=8)
        ax.set_ylim(0, max(points + [1.0]) * 1.15)
        ax.grid(axis="y", alpha=0.3)
    ap_key = next(k for k in tide if k.startswith("AP"))
    ap = "n/a" if tide[ap_key] is None else f"{100 * tide[ap_key]:.2f}"
    left.set(ylabel="dAP (AP points)", title=f"{title}TIDE: AP gain if fixed ({ap_key} {ap}; error counts)")
    right.set(title="special: all FP / all FN")
    _save_atomic(fig, path)


def plot_confusion_matrix(confusion: dict, path: Path, title: str = "") -> None:
    """The (K+1) x (K+1) matrix, coloured by the share of its row, each cell's count written in it."""
    from .plots import _new_figure, _save_atomic

    counts = np.asarray(confusion["matrix"], dtype=np.float64)  # (K+1, K+1) rows GT, columns predicted
    share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    n = len(confusion["categories"])
    side = 2.5 + 0.6 * n
    fig = _new_figure(side + 1.0, side)
    ax = fig.add_subplot()
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, label="share of the row")
    for i in range(n):
        for j in range(n):
            if counts[i, j]:
                ax.text(j, i, f"{int(counts[i, j])}", ha="center", va="center", fontsize=8,
                        color="white" if share[i, j] > 0.5 else "black")
    ax.set_xticks(range(n), confusion["categories"], rotation=45, ha="right")
    ax.set_yticks(range(n), confusion["categories"])
    ax.set(xlabel="predicted", ylabel="ground truth",
           title=f"{title}confusion at IoU {confusion['iou_thr']:g}")
    _save_atomic(fig, path)


def plot_reliability(calibration: dict, path: Path, title: str = "") -> None:
    """Reliability diagram: accuracy per score bin against the diagonal, and the bins' counts below."""
    from .plots import _new_figure, _save_atomic

    fig = _new_figure(5.0, 6.0)
    top, bottom = fig.subplots(2, 1, height_ratios=[3, 1], sharex=True)
    bins = calibration["bins"]
    centers = [(b["lower"] + b["upper"]) / 2 for b in bins]
    widths = [b["upper"] - b["lower"] for b in bins]
    filled = [b["count"] > 0 for b in bins]
    top.bar([c for c, f in zip(centers, filled) if f], [b["accuracy"] for b in bins if b["count"]],
            width=[w for w, f in zip(widths, filled) if f], edgecolor="black", color="tab:blue", label="accuracy")
    top.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    top.plot([b["confidence"] for b in bins if b["count"]], [b["accuracy"] for b in bins if b["count"]], "o",
             color="tab:orange", markersize=4, label="(mean score, accuracy)")
    ece = "n/a" if calibration["ece"] is None else f"{calibration['ece']:.3f}"
    mce = "n/a" if calibration["mce"] is None else f"{calibration['mce']:.3f}"
    top.set(xlim=(0, 1), ylim=(0, 1), ylabel=f"true positives at IoU {calibration['iou_thr']:g}",
            title=f"{title}reliability: ECE {ece}, MCE {mce}")
    top.legend(loc="upper left", fontsize=8)
    bottom.bar(centers, [b["count"] for b in bins], width=widths, edgecolor="black", color="0.7")
    bottom.set(xlabel="score", ylabel="detections")
    _save_atomic(fig, path)


def write_report(analyses: Sequence[ErrorAnalysis], out_dir: PathLike, extra: Optional[dict] = None) -> list:
    """errors.json ({iou_type: ErrorAnalysis.to_dict(), plus `extra`}) and the four PNGs of each
    analysis into `out_dir` (made if missing), each file written atomically; returns the paths."""
    import json

    from .atomic import atomic_write
    from .plots import plot_pr_per_category

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for a in analyses:
        prefix = f"{a.iou_type}: "
        figures = {"tide": lambda p: plot_tide(a.tide, p, prefix),
                   "confusion_matrix": lambda p: plot_confusion_matrix(a.confusion, p, prefix),
                   "pr_per_category": lambda p: plot_pr_per_category(a.evaluation, p),
                   "calibration": lambda p: plot_reliability(a.calibration, p, prefix)}
        for name in FIGURE_NAMES:
            path = out / f"{a.iou_type}_{name}.png"
            figures[name](path)
            written.append(path)
    report = {**(extra or {}), **{a.iou_type: a.to_dict() for a in analyses}}
    with atomic_write(out / REPORT_JSON, "w") as f:
        json.dump(report, f, indent=2, allow_nan=False)
        f.write("\n")
    return [out / REPORT_JSON] + written


# ---------------------------------------------------------------------------------------------
# Detections of a checkpoint


def predict_results(checkpoint: PathLike, gt_json: PathLike, images: PathLike, *, device: str = "auto",
                    batch_size: int = 8, workers: int = 2) -> list:
    """COCO results of a checkpoint's detector (model.arch retinanet or faster_rcnn; with masks when
    it predicts them) on every image of a COCO dataset, through `retinanet eval`'s own prediction path
    (commands/eval.py run_model: the model's contract, batched, float32)."""
    from argparse import Namespace

    from .checkpoint import load_checkpoint
    from .commands.eval import run_model

    arch = load_checkpoint(str(checkpoint))["config"].get("model", {}).get("arch", "retinanet")
    if arch in ("deepmask", "sharpmask", "fpn_masks"):
        raise ValueError(f"{checkpoint} is a segment proposal model (model.arch {arch}), without classes: "
                         f"its errors are not a detector's (use `retinanet eval --proposals` for its recall)")
    args = Namespace(checkpoint=str(checkpoint), json=str(gt_json), images=str(images), device=device,
                     batch_size=batch_size, workers=workers, bf16=False, tta=False, tta_scales=None,
                     proposals=False, save_results=None, iou_type=("bbox",))
    return run_model(args)
