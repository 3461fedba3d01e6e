"""Cross-check of `retinanet analyze errors`' TIDE figures (hotcoco's `COCOeval.tide_errors`) against
the reference implementation, tidecv 1.0.1 (Bolya et al.'s own code), on the same detections.

    # tidecv is not a dependency of the package: install it beside, and point PYTHONPATH at it for this script
    pip install --no-deps --target /work/ckpt/tide/site tidecv==1.0.1
    PYTHONPATH=$PWD:/work/ckpt/tide/site python benchmarks/check_tide.py \
        [--checkpoint /work/ckpt/demo/final.pt --json VAL.json --images VAL/ | --results R.json --json VAL.json] \
        [--iou-type bbox|segm] [--save-results R.json] [--output check.json]
    PYTHONPATH=$PWD:/work/ckpt/tide/site python benchmarks/check_tide.py --boxes-as-masks   # segm
    PYTHONPATH=$PWD:/work/ckpt/tide/site python benchmarks/check_tide.py --differences

Prints, per error kind, both dAPs (AP points at IoU 0.5), their difference, and both error counts;
then both baselines (AP50) and the special FP / FN oracles. The defaults are the demo checkpoint on
the 500 validation images of the demo's shapes dataset.

tidecv's plotting needs opencv, pandas and seaborn, and its dataset downloader appdirs; none is used
here (no plots, no downloads), so stand-ins are put in sys.modules when they are missing. The ground
truth and results are handed to tidecv's `Data` the way its `datasets.COCO` / `COCOResult` load them
(crowd annotations as ignore regions), except that masks are only read in mask mode.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = Path.home() / ".cache" / "retinanet" / "shapes-3d73013508be"
KINDS = ("Cls", "Loc", "Both", "Dupe", "Bkg", "Miss")


class _Anything:
    """Any attribute, any call: what tidecv's plotting set-up touches in a stand-in module."""

    def __getattr__(self, name):
        return self

    def __call__(self, *args, **kwargs):
        return self

    def __getitem__(self, key):
        return self


def import_tidecv():
    for name in ("cv2", "pandas", "seaborn", "appdirs"):  # plotting / download only
        try:
            __import__(name)
        except ImportError:
            stub = types.ModuleType(name)
            stub.__getattr__ = lambda attr: _Anything()  # cv2.FONT_HERSHEY_SIMPLEX, sns.set_palette(...), ...
            if name == "appdirs":  # TIDE() makes its data folder (for downloads) on start: a temporary one
                stub.user_data_dir = lambda *a, **k: tempfile.mkdtemp(prefix="tidecv-")
            sys.modules[name] = stub
    try:
        import tidecv
    except ImportError:
        sys.exit("tidecv is not importable: pip install --no-deps --target DIR tidecv==1.0.1, then "
                 "PYTHONPATH=$PWD:DIR python benchmarks/check_tide.py")
    return tidecv


def tidecv_errors(gt: dict, results: list, mode: str) -> dict:
    """tidecv's dAP (fractions) and counts: {"AP50", "dAP": {kind}, "special": {"FP", "FN"}, "counts": {kind}}."""
    tidecv = import_tidecv()
    from tidecv import TIDE
    from tidecv import functions as f
    from tidecv.data import Data

    masks = mode == "segm"
    sizes = {im["id"]: (im["width"], im["height"]) for im in gt["images"]}
    truth = Data("gt", max_dets=100)
    for im in gt["images"]:
        truth.add_image(im["id"], im.get("file_name", str(im["id"])))
    for c in gt["categories"]:
        truth.add_class(c["id"], c["name"])
    for a in gt["annotations"]:
        mask = f.toRLE(a["segmentation"], *sizes[a["image_id"]]) if masks else None
        add = truth.add_ignore_region if a.get("iscrowd", 0) else truth.add_ground_truth
        add(a["image_id"], a["category_id"], a["bbox"], mask)
    preds = Data("results")
    for r in results:
        preds.add_detection(r["image_id"], r["category_id"], r["score"], r.get("bbox"),
                            r.get("segmentation") if masks else None)
    tide = TIDE(mode=TIDE.MASK if masks else TIDE.BOX)
    run = tide.evaluate(truth, preds, name="results")
    main = {e.short_name: v / 100 for e, v in run.fix_main_errors().items()}
    special = {e.short_name: v / 100 for e, v in run.fix_special_errors().items()}
    counts = {e.short_name: n for e, n in run.count_errors().items()}
    del tidecv
    return {"AP50": run.ap / 100, "dAP": {k: main[k] for k in KINDS},
            "special": {"FP": special["FalsePos"], "FN": special["FalseNeg"]}, "counts": {k: counts[k] for k in KINDS}}


def difference_cases() -> dict:
    """Two hand-made cases where hotcoco (COCOeval's rules) and tidecv differ by design: {name: (gt, results)}."""
    cats = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}, {"id": 3, "name": "c"}]
    images = [{"id": 1, "width": 1000, "height": 1000, "file_name": "1.png"}]
    anns = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "area": 100, "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 2, "bbox": [500, 500, 10, 10], "area": 100, "iscrowd": 0}]
    gt = {"images": images, "annotations": anns, "categories": cats}
    hit_a = {"image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "score": 0.95}
    hit_b = {"image_id": 1, "category_id": 2, "bbox": [500, 500, 10, 10], "score": 0.5}
    # 101 'a' detections outscore the 'b' hit: COCOeval keeps 100 per image and category, tidecv 100 per image
    many = [{"image_id": 1, "category_id": 1, "bbox": [20 + 5 * i, 900, 4, 4], "score": 0.9} for i in range(100)]
    # a 'c' detection, without any 'c' in the ground truth: COCOeval leaves 'c' out of the mean, tidecv counts AP 0
    stray = {"image_id": 1, "category_id": 3, "bbox": [300, 300, 10, 10], "score": 0.9}
    return {"over 100 detections in an image": (gt, [hit_a, *many, hit_b]),
            "a category without ground truth": (gt, [hit_a, hit_b, stray])}


def boxes_as_masks(results: list, gt: dict) -> list:
    """Each result with "segmentation": its [x, y, w, h] box as a compressed RLE of its image's size."""
    from pycocotools import mask as mask_utils

    sizes = {im["id"]: (im["height"], im["width"]) for im in gt["images"]}
    out = []
    for r in results:
        x, y, w, h = r["bbox"]
        rle = mask_utils.merge(mask_utils.frPyObjects([[x, y, x + w, y, x + w, y + h, x, y + h]],
                                                      *sizes[r["image_id"]]))
        out.append({**r, "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()}})
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default="/work/ckpt/demo/final.pt", help="a detector to predict with")
    p.add_argument("--results", help="COCO results instead of --checkpoint")
    p.add_argument("--json", default=str(SHAPES / "val.json"), help="ground truth (default: the demo's validation)")
    p.add_argument("--images", default=str(SHAPES / "val"), help="images of --json, with --checkpoint")
    p.add_argument("--iou-type", default="bbox", choices=["bbox", "segm"])
    p.add_argument("--save-results", help="write the checkpoint's results here")
    p.add_argument("--output", help="write both breakdowns as JSON here")
    p.add_argument("--boxes-as-masks", action="store_true",
                   help="segm for a box detector: each result's box as a rectangular mask (RLE), scored by mask "
                        "IoU against the ground truth's polygons")
    p.add_argument("--differences", action="store_true",
                   help="instead: the two hand-made cases where the two differ by design")
    args = p.parse_args(argv)
    if args.differences:
        from retinanet.error_analysis import analyze_errors

        for name, (gt, results) in difference_cases().items():
            ours, ref = analyze_errors(gt, results).tide, tidecv_errors(gt, results, "bbox")
            print(f"{name}: AP50 hotcoco {100 * ours['AP50']:.2f}, tidecv {100 * ref['AP50']:.2f}; "
                  f"errors hotcoco {ours['counts']}, tidecv {ref['counts']}; dAP Bkg hotcoco "
                  f"{100 * ours['dAP']['Bkg']:.2f}, tidecv {100 * ref['dAP']['Bkg']:.2f}")
        return 0

    from retinanet.error_analysis import analyze_errors, predict_results
    from retinanet.evaluate import read_json

    gt = read_json(args.json)
    if args.results:
        results = read_json(args.results)
    else:
        results = predict_results(args.checkpoint, args.json, args.images, device="cpu", workers=0)
        if args.save_results:
            Path(args.save_results).write_text(json.dumps(results))
    if args.boxes_as_masks:
        results = boxes_as_masks(results, gt)
        args.iou_type = "segm"
    start = time.perf_counter()
    ours = analyze_errors(gt, results, args.iou_type).tide
    ours_s = time.perf_counter() - start
    start = time.perf_counter()
    ref = tidecv_errors(gt, results, args.iou_type)
    ref_s = time.perf_counter() - start

    source = args.results or f"{args.checkpoint} on {args.json}"
    print(f"{args.iou_type} TIDE of {len(results)} detections ({source}); dAP in AP points at IoU 0.5")
    print(f"{'':8s} {'hotcoco':>9s} {'tidecv':>9s} {'diff':>9s} | {'count':>6s} {'tidecv':>6s}")
    rows = [("AP50", ours["AP50"], ref["AP50"], None, None)]
    rows += [(k, ours["dAP"][k], ref["dAP"][k], ours["counts"][k], ref["counts"][k]) for k in KINDS]
    rows += [(k, ours["special"][k], ref["special"][k], None, None) for k in ("FP", "FN")]
    for name, a, b, n, m in rows:
        counts = f"{n:6d} {m:6d}" if n is not None else ""
        print(f"{name:8s} {100 * a:9.3f} {100 * b:9.3f} {100 * (a - b):+9.1e} | {counts}")
    worst = max(abs(a - b) for _, a, b, _, _ in rows)
    same_counts = all(n == m for _, _, _, n, m in rows)
    print(f"largest |difference|: {100 * worst:.1e} AP points; counts {'equal' if same_counts else 'DIFFER'}")
    load = os.getloadavg()
    print(f"time: hotcoco (checks, COCOeval, TIDE, confusion, calibration) {ours_s:.2f} s, tidecv TIDE {ref_s:.2f} s; "
          f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} (a shared machine: noisy)")
    if args.output:
        Path(args.output).write_text(json.dumps({"hotcoco": ours, "tidecv": ref, "source": source}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
