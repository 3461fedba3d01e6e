"""`retinanet eval`: COCO bbox or mask metrics, or proposal recall, of a results file against a ground
truth file, or of a model on a dataset.

    retinanet eval --gt instances_val2017.json --results detections.json [--iou-type bbox|segm|bbox,segm] \
        [--proposals] [--output metrics.json] [--backend hotcoco|faster-coco-eval|pycocotools] [--plots DIR]
    retinanet eval --checkpoint model.pt --json instances_val2017.json --images val2017/ \
        [--save-results detections.json] [--output metrics.json] [--batch-size 8] [--device cpu] [--bf16] \
        [--tta [--tta-scales 0.75 1 1.25]]

Prints pycocotools' 12 summary lines, AP at IoU .60/.70/.80/.90 and a per-category AP table;
--output writes them as JSON (keys: AP, AP50, AP75, APs, APm, APl, AR1, AR10, AR100, ARs, ARm, ARl,
AP60, AP70, AP80, AP90 as fractions, null where the ground truth has nothing to measure, and
per_category: {name: AP}). --iou-type segm scores the results' `segmentation` masks (compressed
RLE) instead of their boxes; with two types (bbox,segm) the JSON holds one such dict per type,
{"bbox": {...}, "segm": {...}}, and --plots one folder per type. --proposals scores the results as
class-agnostic proposals (category ids ignored; up to 1000 per image) and reports
AR@10, AR@100, AR@1000, ARs/ARm/ARl@1000 and AUC, AUCs, AUCm, AUCl (AR averaged over 1..1000
proposals; `retinanet.evaluate.proposal_recall`). A mode that first runs a model to make the results
list calls `report_results()` with that list.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional, Sequence, Union


def register(sub) -> None:
    from ..evaluate import BACKENDS, DEFAULT_BACKEND

    p = sub.add_parser("eval", help="COCO metrics (box or mask AP; proposal AR with --proposals) of a results file, "
                                    "or of a checkpoint's model (any model.arch) on a dataset",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--gt", metavar="GT.json", help="COCO ground truth (images, annotations, categories)")
    p.add_argument("--results", metavar="DT.json",
                   help="COCO results: a JSON list of {image_id, category_id, bbox [x, y, w, h], score}")
    p.add_argument("--checkpoint", metavar="C", help="instead of --results: run this model over --json/--images")
    p.add_argument("--json", metavar="J", help="with --checkpoint: the dataset's COCO instances JSON (the ground truth)")
    p.add_argument("--images", metavar="D", help="with --checkpoint: the dataset's image folder")
    p.add_argument("--save-results", metavar="DT.json", help="with --checkpoint: also write the detections as COCO results")
    p.add_argument("--batch-size", type=int, default=8, help="with --checkpoint: images per forward pass (default 8)")
    p.add_argument("--workers", type=int, default=2, help="with --checkpoint: image-loading worker processes (default 2)")
    p.add_argument("--device", default="auto", help="with --checkpoint: auto | cpu | cuda | cuda:N")
    p.add_argument("--bf16", action="store_true", help="with --checkpoint: bfloat16 autocast for the network")
    p.add_argument("--tta", action="store_true",
                   help="with --checkpoint of a box detector (model.arch retinanet, faster_rcnn; not segment "
                        "proposals, whose masks it cannot merge): test-time augmentation (retinanet/tta.py): shorter "
                        "side 0.75x, 1x, 1.25x the model's, each plain and flipped, merged by class-aware NMS with "
                        "box voting")
    p.add_argument("--tta-scales", type=float, nargs="+", metavar="S",
                   help="with --tta: other scales (factors of the model's size), e.g. --tta-scales 1 (flip only)")
    p.add_argument("--output", metavar="metrics.json", help="write the metrics as JSON here")
    p.add_argument("--iou-type", default="bbox", type=_iou_types, metavar="TYPES",
                   help="what to score: bbox (default), segm (the results' RLE masks) or both, comma-separated: "
                        "bbox,segm")
    p.add_argument("--proposals", action="store_true",
                   help="score class-agnostic proposals: AR@10/100/1000, AR by size at 1000, AUC "
                        "(category ids ignored); required for a segment proposal checkpoint (model.arch deepmask, "
                        "sharpmask, fpn_masks)")
    p.add_argument("--backend", default=DEFAULT_BACKEND, choices=list(BACKENDS),
                   help=f"COCOeval implementation (default {DEFAULT_BACKEND}; all give pycocotools' numbers)")
    p.add_argument("--plots", metavar="DIR", help="write PNG figures here: pr_curves.png, ap_by_size.png")
    p.add_argument("--plots-per-category", action="store_true",
                   help="with --plots, also pr_per_category.png: one precision-recall panel per category")
    p.set_defaults(func=run)


def _iou_types(text: str) -> tuple:
    """'bbox,segm' -> ("bbox", "segm"); each a known type, none twice."""
    import argparse

    from ..evaluate import IOU_TYPES

    types = tuple(t.strip() for t in text.split(","))
    unknown = [t for t in types if t not in IOU_TYPES]
    if unknown or not types or len(set(types)) != len(types):
        raise argparse.ArgumentTypeError(f"expected {', '.join(IOU_TYPES)} or a comma-separated list of them "
                                         f"without repeats, got {text!r}")
    return types


def run(args) -> int:
    from ..evaluate import BackendNotInstalled
    from . import check_output_path

    for flag, value, folder in (("--output", args.output, False), ("--save-results", args.save_results, False),
                                ("--plots", args.plots, True)):
        if value:
            check_output_path(value, flag, folder=folder)
    if args.plots_per_category and not args.plots:
        raise ValueError("--plots-per-category needs --plots DIR")
    if args.proposals and args.plots:
        raise ValueError("--plots draws precision curves, which proposals do not have; leave out --plots")
    if args.checkpoint:
        if args.gt or args.results:
            raise ValueError("give either --gt and --results, or --checkpoint with --json and --images")
        if not (args.json and args.images):
            raise ValueError("--checkpoint needs --json J and --images D")
        if args.tta_scales and not args.tta:
            raise ValueError("--tta-scales needs --tta")
        if args.tta_scales and min(args.tta_scales) <= 0:
            raise ValueError(f"--tta-scales must be positive, got {args.tta_scales}")
        if args.batch_size < 1 or args.workers < 0:
            raise ValueError(f"--batch-size must be >= 1 and --workers >= 0, got {args.batch_size} and {args.workers}")
        gt, results, protect = args.json, run_model(args), [args.checkpoint]
    else:
        if args.tta:
            raise ValueError("--tta runs a model: it needs --checkpoint")
        if not (args.gt and args.results):
            raise ValueError("give --gt GT.json and --results DT.json (or --checkpoint with --json and --images)")
        gt, results, protect = args.gt, args.results, []
    try:
        report_results(gt, results, backend=args.backend, output=args.output, plots=args.plots,
                       plots_per_category=args.plots_per_category, protect=protect, iou_types=args.iou_type,
                       proposals=args.proposals)
    except BackendNotInstalled as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def run_model(args) -> list:
    """COCO results of the checkpoint's model on every image of --json/--images (batched, progress bar);
    with --tta, of `tta_detections` (the same function as `Predictor(tta=...)`). Prints the model's
    time per image (loading, conversion to results and the first batch's warm-up left out)."""
    import contextlib
    import time

    import torch
    from tqdm import tqdm

    from ..checkpoint import load_model
    from ..data.coco import CocoDataset
    from ..data.loader import build_test_loader, images_to_device
    from ..engine import resolve_device
    from ..evaluate import detections_to_coco_results
    from ..tta import DEFAULT_SCALES, tta_detections

    device = resolve_device(args.device)
    model, cfg, categories = load_model(args.checkpoint, device=str(device))
    if getattr(model, "class_agnostic_proposals", False) and not args.proposals:  # its AP would be meaningless
        raise ValueError(f"{args.checkpoint}: a segment proposal model (model.arch {cfg.model.arch}: one class, "
                         f"'object'), scored by recall, not AP: add --proposals (and --iou-type segm for its masks)")
    if args.tta and getattr(model, "class_agnostic_proposals", False):  # as Predictor(tta=...) refuses
        raise ValueError(f"--tta: test-time augmentation merges boxes, not masks: it does not apply to segment "
                         f"proposals ({args.checkpoint}: model.arch {cfg.model.arch})")
    if args.save_results:
        for source in (args.json, args.checkpoint):
            if _same_file(Path(args.save_results), Path(source)):
                raise ValueError(f"refusing to overwrite the input file {source} with --save-results")
    dataset = CocoDataset(args.json, args.images, check_images="exists")
    label_to_cat = [c["id"] for c in categories]
    placeholders = {c["id"] for c in categories if c.get("placeholder")}  # e.g. torchvision's unused slots
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if args.bf16 else contextlib.nullcontext()
    scales = tuple(args.tta_scales or DEFAULT_SCALES) if args.tta else ()
    results, timed_images, timed_seconds = [], 0, 0.0
    loader = build_test_loader(dataset, batch_size=args.batch_size, num_workers=args.workers,
                               pin_memory=device.type == "cuda", pending_images=True)
    with torch.inference_mode(), amp:
        for step, (images, targets) in enumerate(tqdm(loader, desc="eval", unit="batch", file=sys.stderr)):
            images = images_to_device(images, device)  # uint8: the model's preprocess converts it there
            start = time.perf_counter()
            detections = tta_detections(model, images, scales=scales, device=device) if scales else model(images)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if step > 0:  # the first batch warms up (allocations, kernel choice)
                timed_images, timed_seconds = timed_images + len(images), timed_seconds + time.perf_counter() - start
            if "segm" in args.iou_type and "masks" not in detections[0]:
                raise ValueError("--iou-type segm needs masks, which this checkpoint's model does not predict (a "
                                 "mask model, e.g. model.arch deepmask, sharpmask or fpn_masks, does); evaluate a "
                                 "results file with segmentations (--gt, --results) instead")
            results += detections_to_coco_results(detections, [t["image_id"] for t in targets], label_to_cat)
    results = [r for r in results if r["category_id"] not in placeholders]
    per_image = f", {1000 * timed_seconds / timed_images:.1f} ms per image" if timed_images else ""
    how = f" with TTA at scales {list(scales)} x flip" if scales else ""
    print(f"{len(results)} detections on {len(dataset)} images{how}{per_image}", file=sys.stderr)
    if args.save_results:
        _write_json_atomic(results, Path(args.save_results))
        print(f"results written to {args.save_results}")
    return results


def report_results(gt: Union[str, Path, dict], results: Union[str, Path, list], *, backend: str,
                   output: Optional[str] = None, plots: Optional[str] = None, plots_per_category: bool = False,
                   protect: Sequence = (), iou_types: Sequence[str] = ("bbox",), proposals: bool = False) -> dict:
    """Evaluate `results` against `gt`, print the metrics, write --output JSON and --plots PNGs.

    gt / results: paths or the loaded dict / list (e.g. made by detections_to_coco_results).
    protect: more input files (a checkpoint, say); an output path that is one of them, or gt or
    results, is refused before any work. iou_types: "bbox" and/or "segm". proposals: proposal recall
    (`proposal_recall`) instead of the detection metrics.
    Returns the metrics dict (see evaluate_coco, proposal_recall) of the one IoU type, or
    {iou type: metrics dict} for several.
    """
    from ..evaluate import (format_per_category, format_proposals, format_summary, proposal_recall,
                            run_coco_eval)
    from ..plots import PLOT_FILES

    iou_types = tuple(iou_types)
    plot_dirs = {t: Path(plots) / t if len(iou_types) > 1 else Path(plots) for t in iou_types} if plots else {}

    if output and Path(output).is_dir():
        raise ValueError(f"--output {output} is a folder; give a file name such as {Path(output) / 'metrics.json'}")
    if plots and Path(plots).exists() and not Path(plots).is_dir():
        raise ValueError(f"--plots {plots} is a file; give a folder")
    targets = [Path(output)] if output else []
    targets += [folder / name for folder in plot_dirs.values() for name in PLOT_FILES]
    inputs = [p for p in (gt, results) if isinstance(p, (str, Path))] + list(protect)
    for target in targets:
        for source in inputs:
            if _same_file(target, Path(source)):
                raise ValueError(f"refusing to overwrite the input file {source} with {target}")

    by_type = {}
    for iou_type in iou_types:
        if len(iou_types) > 1:
            print(f"== {iou_type} ==")
        if proposals:
            by_type[iou_type] = proposal_recall(gt, results, iou_type, backend=backend)
            print(format_proposals(by_type[iou_type]))
            continue
        evaluation = run_coco_eval(gt, results, backend=backend, iou_type=iou_type)
        metrics = by_type[iou_type] = evaluation.metrics()
        print(format_summary(metrics))
        print()
        print("Per-category AP (%), IoU .50:.95:")
        print(format_per_category(metrics["per_category"]))
        if iou_type in plot_dirs:
            from ..plots import write_plots

            paths = write_plots(evaluation, metrics, plot_dirs[iou_type], per_category=plots_per_category)
            print(f"plots written to {plot_dirs[iou_type]}: {', '.join(p.name for p in paths)}")
    metrics = by_type if len(iou_types) > 1 else by_type[iou_types[0]]
    if output:
        _write_json_atomic(metrics, Path(output))
        print(f"metrics written to {output}")
    return metrics


def _same_file(a: Path, b: Path) -> bool:
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


def _write_json_atomic(obj, path: Path) -> None:
    import json

    from ..atomic import atomic_write

    with atomic_write(path, "w") as f:
        json.dump(obj, f, indent=2, allow_nan=False)
        f.write("\n")
