"""`retinanet analyze`: the papers' analysis figures (PNG and JSON).

  curves     Focal Loss paper Figures 1, 3, 4 (CE, FL, FL* and their derivatives)
  loss-cdf   Figure 6: CDF of the normalized loss of positive and negative anchors of a trained model
  iou        IoU-balanced paper Figures 2 and 3: average score by IoU, share of detections above IoU
  errors     where the errors are (retinanet/error_analysis.py): TIDE breakdown, confusion matrix,
             precision-recall per category at IoU 0.5 and 0.75, calibration (ECE), and the AP at each
             of COCO's IoU thresholds 0.50:0.05:0.95; of a results file (--json GT --results R.json)
             or of a detector's checkpoint (--checkpoint C --json GT --images D); boxes, and masks
             when the results have segmentations. --iou T: TIDE's (and the confusion matrix's and
             calibration's) match IoU, 0.5 by default; 0.75 counts the boxes that COCO AP's higher
             thresholds reject as Loc errors
"""

from __future__ import annotations

import json
from pathlib import Path

TIDE_BG_IOU = 0.1  # error_analysis.analyze_errors' bg_thr (kept here: the parser imports nothing heavy)


def register(sub) -> None:
    p = sub.add_parser("analyze", help="the papers' analysis figures (loss curves, loss CDF, score vs IoU) and where a "
                                       "detector's errors are (TIDE, confusion matrix, calibration)",
                       description=__doc__, formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    p.add_argument("figure", choices=["curves", "loss-cdf", "iou", "errors"], help="which figure(s)")
    p.add_argument("--output", required=True, metavar="DIR", help="folder for the PNG and JSON files")
    p.add_argument("--checkpoint", metavar="C", action="append",
                   help="a trained checkpoint (loss-cdf: one RetinaNet, model.arch retinanet; iou: one or more "
                        "detectors, retinanet or faster_rcnn, drawn side by side; errors: one detector, run "
                        "over every image of --json/--images)")
    p.add_argument("--label", action="append", metavar="NAME",
                   help="iou: a legend name per --checkpoint, in order (default: the checkpoint's folder name)")
    p.add_argument("--json", metavar="J", help="COCO instances JSON of the images to analyze (the ground truth)")
    p.add_argument("--images", metavar="D",
                   help="the images folder of --json (loss-cdf, iou; errors with --checkpoint)")
    p.add_argument("--results", metavar="R.json",
                   help="errors: COCO results to analyze, instead of --checkpoint (with 'segmentation' RLEs for masks)")
    p.add_argument("--iou-type", choices=["auto", "bbox", "segm"], default="auto",
                   help="errors: boxes, masks, or auto (default: boxes, and masks too when the results have "
                        "segmentations)")
    p.add_argument("--iou", type=float, metavar="T",
                   help=f"errors: the IoU a detection needs to be right (TIDE's pos_thr; also the confusion "
                        f"matrix's and calibration's), between TIDE's background IoU {TIDE_BG_IOU:g} and 1 "
                        f"(default 0.5)")
    p.add_argument("--device", default="auto", help="errors with --checkpoint: auto | cpu | cuda | cuda:N")
    p.add_argument("--max-images", type=int, default=200, help="loss-cdf, iou: images to use (default 200)")
    p.add_argument("--gammas", type=float, nargs="+", default=[0.0, 0.5, 1.0, 2.0], help="gammas for loss-cdf")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..analysis import (anchor_samples, detection_ious, loss_cdfs, mean_score_by_iou, plot_iou_figures,
                            plot_loss_cdf, plot_loss_curves, share_above)
    from . import check_output_path

    check_output_path(args.output, "--output", folder=True)
    if args.iou is not None and args.figure != "errors":
        raise ValueError(f"--iou is for analyze errors (TIDE's match IoU), not analyze {args.figure}")
    if args.max_images < 1:
        raise ValueError(f"--max-images must be >= 1, got {args.max_images}")
    if min(args.gammas) < 0:
        raise ValueError(f"--gammas must be >= 0 (gamma 0 is cross entropy), got {args.gammas}")
    out = Path(args.output)
    if args.figure == "errors":
        return run_errors(args)
    if args.figure == "curves":
        for path in plot_loss_curves(str(out)):
            print(f"wrote {path}")
        return 0
    missing = [flag for flag, value in (("--checkpoint", args.checkpoint), ("--json", args.json),
                                        ("--images", args.images)) if not value]
    if missing:
        raise ValueError(f"analyze {args.figure} needs {', '.join(missing)}")
    from ..atomic import atomic_write
    from ..checkpoint import load_model
    from ..data.coco import CocoDataset

    dataset = CocoDataset(args.json, args.images, check_images="exists")

    def load(path):
        model, cfg, _ = load_model(path)
        arch = cfg.model.arch
        if args.figure == "loss-cdf" and arch != "retinanet":
            raise ValueError(f"{path} is a {arch} model; Figure 6's anchor losses need a RetinaNet (model.arch "
                             f"retinanet)")
        if getattr(model, "class_agnostic_proposals", False):
            raise ValueError(f"{path} is a segment proposal model (model.arch {arch}), without classes; the IoU "
                             f"figures need a detector (model.arch retinanet or faster_rcnn)")
        if dataset.num_classes != model.num_classes:
            raise ValueError(f"{args.json} has {dataset.num_classes} categories, the model in {path} {model.num_classes}")
        return model

    if args.figure == "loss-cdf":
        if len(args.checkpoint) != 1:
            raise ValueError("analyze loss-cdf takes one --checkpoint (the gammas are applied to its predictions)")
        cdfs = loss_cdfs(*anchor_samples(load(args.checkpoint[0]), dataset, args.max_images), gammas=args.gammas)
        png = plot_loss_cdf(cdfs, str(out / "figure6_loss_cdf.png"))
        # The share of the loss carried by the hardest 20% of samples, per gamma (sec. 5.1's reading of Figure 6)
        summary = {f"{g:g}": {kind: 1 - float(y[int(0.8 * (len(y) - 1))]) for kind, (_, y) in c.items()}
                   for g, c in cdfs.items()}
        data = {"hardest_20_percent_share_of_loss": summary}
        name = "figure6_loss_cdf.json"
    else:
        labels = list(args.label or [])
        if labels and len(labels) != len(args.checkpoint):
            raise ValueError(f"{len(labels)} --label for {len(args.checkpoint)} --checkpoint")
        labels = labels or [Path(c).resolve().parent.name for c in args.checkpoint]
        if len(set(labels)) != len(labels):
            raise ValueError(f"two checkpoints have the same label ({', '.join(labels)}): give --label")
        models = {label: detection_ious(load(c), dataset, args.max_images) for label, c in zip(labels, args.checkpoint)}
        png = plot_iou_figures(models, str(out / "iou_figures.png"))
        data = {"models": [{"label": label, "checkpoint": c, "detections": int(scores.numel()),
                            "mean_score_by_iou": [{"iou_from": lo, "iou_to": hi, "mean_score": m, "count": n}
                                                  for lo, hi, m, n in mean_score_by_iou(scores, ious)],
                            "share_at_or_above_iou": {f"{t:g}": v for t, v in share_above(ious)}}
                           for (label, (scores, ious)), c in zip(models.items(), args.checkpoint)]}
        name = "iou_figures.json"
    with atomic_write(out / name, "w") as f:
        json.dump(data, f, indent=2)
    print(f"wrote {png} and {out / name}")
    print(json.dumps(data, indent=2)[:2000])
    return 0


def run_errors(args) -> int:
    """`analyze errors`: errors.json and the {bbox,segm}_{tide,confusion_matrix,pr_per_category,calibration}.png
    figures in --output. Every file it would write must be new, and the inputs exist, before any work."""
    from ..error_analysis import (analyze_errors, format_ap_by_iou_line, format_tide_line, output_files,
                                  predict_results, write_report)
    from ..evaluate import read_json

    iou = 0.5 if args.iou is None else args.iou
    if not TIDE_BG_IOU < iou < 1:  # math.nan fails this too
        raise ValueError(f"--iou must be above TIDE's background IoU {TIDE_BG_IOU:g} and below 1, got {args.iou}")
    if not args.json:
        raise ValueError("analyze errors needs --json GT.json (the ground truth)")
    if bool(args.results) == bool(args.checkpoint):
        raise ValueError("analyze errors needs either --results R.json or --checkpoint C (with --images D)")
    if args.checkpoint and (len(args.checkpoint) != 1 or not args.images):
        raise ValueError("analyze errors takes one --checkpoint, and --images D to run it on")
    for flag, path in (("--json", args.json), ("--results", args.results), ("--images", args.images)):
        if path and not Path(path).exists():
            raise FileNotFoundError(f"{flag} {path}: not found")
    existing = [str(p) for p in output_files(args.output, ("bbox", "segm")) if p.exists()]
    if existing:
        raise ValueError(f"--output {args.output}: refusing to overwrite {', '.join(existing)}; give a new folder")
    if args.checkpoint:
        results = predict_results(args.checkpoint[0], args.json, args.images, device=args.device)
    else:
        results = read_json(args.results)
    has_masks = isinstance(results, list) and bool(results) and isinstance(results[0], dict) \
        and "segmentation" in results[0]
    if args.iou_type == "segm" and not has_masks:
        raise ValueError(f"--iou-type segm: {args.results or args.checkpoint[0]} has no segmentations (masks)")
    iou_types = {"auto": ("bbox", "segm") if has_masks else ("bbox",), "bbox": ("bbox",), "segm": ("segm",)}
    # a results file is read again by the checks, so that their errors name it
    analyses = [analyze_errors(args.json, args.results or results, t, pos_thr=iou, bg_thr=TIDE_BG_IOU)
                for t in iou_types[args.iou_type]]
    source = {"ground_truth": str(args.json), **({"results": str(args.results)} if args.results else
                                                  {"checkpoint": str(args.checkpoint[0]), "images": str(args.images)})}
    paths = write_report(analyses, args.output, extra={"source": source})
    for a in analyses:
        print(format_tide_line(a.tide, a.iou_type))
        print(format_ap_by_iou_line(a.ap_by_iou(), a.iou_type))
        ece = a.calibration["ece"]
        print(f"  calibration at IoU {a.calibration['iou_thr']:g}: ECE {'n/a' if ece is None else f'{ece:.4f}'} "
              f"over {a.calibration['num_detections']} detections; error counts "
              + " ".join(f"{k} {v}" for k, v in a.tide["counts"].items()))
    print(f"wrote {', '.join(str(p) for p in paths)}")
    return 0
