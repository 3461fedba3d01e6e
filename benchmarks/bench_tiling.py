"""Tiled inference on large scenes: COCO AP, APs, AR and time per image of a checkpoint trained on small images,
without tiling and with it (NMS vs greedy non-maximum merging, with and without the whole-image pass).

    python benchmarks/bench_tiling.py --checkpoint /work/ckpt/demo/final.pt [--num-images 20] [--tile 192]

The scenes are `retinanet.data.synthetic.make_large_scenes` (2048 x 2048, 200-400 shapes of 8-40 px each,
seeded, cached under ~/.cache/retinanet): the shapes demo's classes, which a 192 px model given the whole
image sees shrunk ~10x, to 1-4 px. Each setting is a `Predictor` (the package's own path); its
time per image is the mean over the images after the first (warm-up), one thread by default.

Detection caps: the detector keeps `detections_per_image` per image in all (100 for the demo), which
on scenes with 200-400 objects caps recall near 1/3; every setting here keeps --max-detections (default
1000; the untiled and the default tiled settings are also shown at the checkpoint's 100). COCOeval's
maxDets counts per image *and category* (pycocotools evaluateImg cuts each (image, category)'s
detections), here ~77 objects per class and image, so AR100 is only slightly below AR at maxDets 1000,
which the table also gives (AP, APs, AR, ARs: pycocotools with params.maxDets [1, 100, 1000]).
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from contextlib import redirect_stdout
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import machine_report  # noqa: E402
from retinanet import Predictor  # noqa: E402
from retinanet.data.images import load_image  # noqa: E402
from retinanet.data.synthetic import make_large_scenes  # noqa: E402
from retinanet.evaluate import evaluate_coco, load_ground_truth  # noqa: E402


def settings(tile: int, overlap: float, cap: int) -> dict:
    """name -> Predictor keyword arguments."""
    tiled = dict(tile=tile, tile_overlap=overlap, max_detections=cap)
    return {
        "untiled, 100 dets": {},
        f"untiled, {cap} dets": dict(max_detections=cap),
        "tiled, nms + whole": dict(tiled, tile_merge="nms", tile_full_image=True),
        "tiled, greedy_nmm + whole": dict(tiled, tile_merge="greedy_nmm", tile_full_image=True),
        "tiled, nms, crops only": dict(tiled, tile_merge="nms", tile_full_image=False),
        "tiled, greedy_nmm, crops only": dict(tiled, tile_merge="greedy_nmm", tile_full_image=False),
        "tiled, nms + whole, 100 dets": dict(tiled, max_detections=100, tile_merge="nms"),
        # SAHI's detection models drop scores below 0.3 (DetectionModel confidence_threshold) before merging
        "tiled, nms + whole, score > 0.3": dict(tiled, tile_merge="nms", score_threshold=0.3),
        "tiled, greedy_nmm + whole, score > 0.3": dict(tiled, tile_merge="greedy_nmm", score_threshold=0.3),
    }


def coco_at_1000(gt: dict, results: list) -> dict:
    """AP, APs and AR (maxDets 1000), ARs: pycocotools with maxDets [1, 100, 1000]."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        ev = COCOeval(coco_gt, coco_gt.loadRes(results), "bbox")
        ev.params.maxDets = [1, 100, 1000]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    s = ev.stats
    return {"AP@1000": s[0], "APs@1000": s[3], "AR@1000": s[8], "ARs@1000": s[9]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="a model trained on small images (the shapes demo's)")
    p.add_argument("--num-images", type=int, default=20, help="large scenes to generate and evaluate (default 20)")
    p.add_argument("--image-size", type=int, default=2048)
    p.add_argument("--tile", type=int, help="tile side in px (default: the model's min_size)")
    p.add_argument("--overlap", type=float, default=0.25)
    p.add_argument("--max-detections", type=int, default=1000, help="detections kept per image (default 1000)")
    p.add_argument("--batch-size", type=int, default=8, help="crops per forward pass")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--only", nargs="+", metavar="NAME", help="only the settings whose names start with these")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    scenes = make_large_scenes(num_images=args.num_images, image_size=args.image_size)
    gt = load_ground_truth(str(scenes.json))
    probe = Predictor.from_checkpoint(args.checkpoint, device="cpu")
    tile = args.tile or min(probe.model.min_size, probe.model.max_size)
    images = [(img["id"], load_image(scenes.images / img["file_name"])) for img in gt["images"]]
    objects = len(gt["annotations"])
    print(f"{len(images)} scenes of {args.image_size} px, {objects} objects ({objects / len(images):.0f} per image), "
          f"{sum(a['area'] < 32 ** 2 for a in gt['annotations']) / objects:.0%} small; model min/max size "
          f"{probe.model.min_size}/{probe.model.max_size}; tile {tile}, overlap {args.overlap}")
    print(machine_report("cpu"))

    rows = []
    for name, kwargs in settings(tile, args.overlap, args.max_detections).items():
        if args.only and not any(name.startswith(o) for o in args.only):
            continue
        predictor = Predictor.from_checkpoint(args.checkpoint, device="cpu", batch_size=args.batch_size, **kwargs)
        results, seconds = [], []
        for image_id, array in images:
            start = time.perf_counter()
            det = predictor(array)
            seconds.append(time.perf_counter() - start)
            results += det.to_coco(image_id)
        metrics = evaluate_coco(gt, results)
        metrics.update(coco_at_1000(gt, results))
        steady = seconds[1:] or seconds
        rows.append((name, metrics, statistics.mean(steady), len(results) / len(images)))
        print(f"  {name}: AP {metrics['AP']:.3f} APs {metrics['APs']:.3f} AR100 {metrics['AR100']:.3f} "
              f"AR@1000 {metrics['AR@1000']:.3f}, {statistics.mean(steady):.2f} s/image", file=sys.stderr)

    print()
    print("| setting | AP | APs | AR100 | AP@1000 | APs@1000 | AR@1000 | ARs@1000 | dets/image | s/image |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, m, sec, dets in rows:
        print(f"| {name} | {m['AP']:.3f} | {m['APs']:.3f} | {m['AR100']:.3f} | {m['AP@1000']:.3f} | "
              f"{m['APs@1000']:.3f} | {m['AR@1000']:.3f} | {m['ARs@1000']:.3f} | {dets:.0f} | {sec:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
