"""`retinanet analyze`: the papers' analysis figures (PNG and JSON).

  curves     Focal Loss paper Figures 1, 3, 4 (CE, FL, FL* and their derivatives)
  loss-cdf   Figure 6: CDF of the normalized loss of positive and negative anchors of a trained model
  iou        IoU-balanced paper Figures 2 and 3: average score by IoU, share of detections above IoU
"""

from __future__ import annotations

import json
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("analyze", help="the papers' analysis figures (loss curves, loss CDF, score vs IoU)",
                       description=__doc__, formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    p.add_argument("figure", choices=["curves", "loss-cdf", "iou"], help="which figure(s)")
    p.add_argument("--output", required=True, metavar="DIR", help="folder for the PNG and JSON files")
    p.add_argument("--checkpoint", metavar="C", action="append",
                   help="a trained checkpoint (loss-cdf: one RetinaNet, model.arch retinanet; iou: one or more "
                        "detectors, retinanet or faster_rcnn, drawn side by side)")
    p.add_argument("--label", action="append", metavar="NAME",
                   help="iou: a legend name per --checkpoint, in order (default: the checkpoint's folder name)")
    p.add_argument("--json", metavar="J", help="COCO instances JSON of the images to analyze (loss-cdf, iou)")
    p.add_argument("--images", metavar="D", help="the images folder of --json (loss-cdf, iou)")
    p.add_argument("--max-images", type=int, default=200, help="images to use (default 200)")
    p.add_argument("--gammas", type=float, nargs="+", default=[0.0, 0.5, 1.0, 2.0], help="gammas for loss-cdf")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..analysis import (anchor_samples, detection_ious, loss_cdfs, mean_score_by_iou, plot_iou_figures,
                            plot_loss_cdf, plot_loss_curves, share_above)
    from . import check_output_path

    check_output_path(args.output, "--output", folder=True)
    if args.max_images < 1:
        raise ValueError(f"--max-images must be >= 1, got {args.max_images}")
    if min(args.gammas) < 0:
        raise ValueError(f"--gammas must be >= 0 (gamma 0 is cross entropy), got {args.gammas}")
    out = Path(args.output)
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
