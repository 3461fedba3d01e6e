"""Time `retinanet eval` end to end (JSON loading, validation, COCO evaluation) on a generated set.

    python benchmarks/bench_eval.py [--images 5000] [--skip-pycocotools] [--iou-type segm]

The set is generated deterministically (seeded) in a temporary folder: COCO-like non-contiguous
category ids, ~7 ground-truth boxes per image (1% crowd), and 100 detections per image - jittered
copies of the ground truth (some with the wrong class) plus random boxes. Each backend runs the
real command (`python -m retinanet eval`) in a fresh process; the figures are the wall time of the
command as the user would see it (interpreter start included) and its CPU time, which a busy
machine stretches less.

With --iou-type segm every box also gets a mask, as COCO has them: the ground truth an octagon
polygon inscribed in its box (crowd regions: the box's pixels as uncompressed RLE), each detection
the octagon of its own box as compressed RLE; `retinanet eval --iou-type segm` then scores the masks.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import orjson

# The 80 COCO category ids: 1..90 with gaps.
COCO_CATEGORY_IDS = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]


def make_coco_set(num_images: int = 5000, gt_per_image: float = 7.0, dets_per_image: int = 100,
                  seed: int = 0) -> tuple:
    """A COCO ground truth dict and a results list, generated with numpy from `seed`.

    Image sizes 640x480; GT boxes xywh with sides 4..300 px; each detection is either a jittered
    GT box (60%, its class kept 80% of the time) or a uniformly random box; scores uniform in (0, 1).
    """
    rng = np.random.default_rng(seed)
    cats = np.array(COCO_CATEGORY_IDS)
    image_ids = np.arange(num_images) * 2 + 1  # non-contiguous image ids
    num_gt = rng.poisson(gt_per_image, size=num_images)  # (I,)
    gt_img = np.repeat(image_ids, num_gt)  # (G,)
    g = gt_img.size
    wh = rng.uniform(4, 300, size=(g, 2))
    xy = rng.uniform(0, 1, size=(g, 2)) * (np.array([640.0, 480.0]) - wh).clip(min=1)
    gt_boxes = np.concatenate([xy, wh], axis=1)  # (G, 4) xywh
    gt_cats = rng.choice(cats, size=g)
    crowd = rng.random(g) < 0.01
    gt = {
        "images": [{"id": int(i), "width": 640, "height": 480, "file_name": f"{i:012d}.jpg"} for i in image_ids],
        "annotations": [{"id": k + 1, "image_id": int(gt_img[k]), "category_id": int(gt_cats[k]),
                         "bbox": gt_boxes[k].tolist(), "area": float(wh[k, 0] * wh[k, 1]), "iscrowd": int(crowd[k])}
                        for k in range(g)],
        "categories": [{"id": int(c), "name": f"class_{c}", "supercategory": "thing"} for c in cats],
    }
    # Detections: per image, dets_per_image rows; rows drawing from a GT copy pick one GT of that image.
    d = num_images * dets_per_image
    det_img_idx = np.repeat(np.arange(num_images), dets_per_image)  # (D,)
    first_gt = np.concatenate([[0], np.cumsum(num_gt)[:-1]])  # (I,) index of each image's first GT
    has_gt = num_gt[det_img_idx] > 0
    from_gt = has_gt & (rng.random(d) < 0.6)
    pick = first_gt[det_img_idx] + (rng.random(d) * np.maximum(num_gt[det_img_idx], 1)).astype(int)
    pick = np.where(from_gt, pick, 0).clip(max=max(g - 1, 0))
    rand_wh = rng.uniform(4, 300, size=(d, 2))
    rand_boxes = np.concatenate([rng.uniform(0, 1, size=(d, 2)) * (np.array([640.0, 480.0]) - rand_wh).clip(min=1),
                                 rand_wh], axis=1)
    jitter = rng.normal(0, 0.1, size=(d, 4)) * np.repeat(gt_boxes[pick][:, 2:], 2, axis=1) if g else 0
    boxes = np.where(from_gt[:, None], (gt_boxes[pick] + jitter) if g else rand_boxes, rand_boxes)
    boxes[:, 2:] = boxes[:, 2:].clip(min=1)
    det_cats = np.where(from_gt & (rng.random(d) < 0.8), gt_cats[pick] if g else 0, rng.choice(cats, size=d))
    scores = rng.random(d)
    results = [{"image_id": int(image_ids[det_img_idx[k]]), "category_id": int(det_cats[k]),
                "bbox": boxes[k].tolist(), "score": float(scores[k])} for k in range(d)]
    return gt, results


def _octagons(boxes: np.ndarray) -> np.ndarray:
    """(N, 4) xywh boxes -> (N, 16) flat octagon polygons [x1, y1, ..., x8, y8] inscribed in them."""
    x, y, w, h = boxes.T
    fx = np.array([0.3, 0.7, 1, 1, 0.7, 0.3, 0, 0])  # corners cut at 30% of each side
    fy = np.array([0, 0, 0.3, 0.7, 1, 1, 0.7, 0.3])
    px = x[:, None] + fx * w[:, None]  # (N, 8)
    py = y[:, None] + fy * h[:, None]
    return np.stack([px, py], axis=2).reshape(len(boxes), 16)


def _box_rle_counts(box: list, height: int, width: int) -> list:
    """Uncompressed RLE counts (column-major runs, zeros first) of the pixels a box [x, y, w, h] covers."""
    x0, y0 = int(box[0]), int(box[1])
    x1, y1 = min(int(np.ceil(box[0] + box[2])), width), min(int(np.ceil(box[1] + box[3])), height)
    counts = [x0 * height + y0]
    for _ in range(x0, x1):
        counts += [y1 - y0, height - (y1 - y0)]
    counts[-1] += (width - x1) * height - y0  # the last gap runs to the end of the image
    return counts


def add_masks(gt: dict, results: list) -> None:
    """Give every annotation and result of `make_coco_set` a segmentation (see the module docstring)."""
    from pycocotools import mask as mask_api

    for ann in gt["annotations"]:
        if ann["iscrowd"]:
            ann["segmentation"] = {"size": [480, 640], "counts": _box_rle_counts(ann["bbox"], 480, 640)}
        else:
            ann["segmentation"] = [_octagons(np.array([ann["bbox"]]))[0].round(2).tolist()]
    polygons = _octagons(np.array([r["bbox"] for r in results]))  # (D, 16)
    rles = mask_api.frPyObjects(polygons.tolist(), 480, 640)  # one RLE per polygon, computed in C
    for r, rle in zip(results, rles):
        r["segmentation"] = {"size": [480, 640], "counts": rle["counts"].decode()}
        del r["bbox"]


def in_process_stages(gt_path: Path, dt_path: Path, iou_type: str = "bbox") -> dict:
    """Seconds spent, inside one process, on each stage of `retinanet eval` with the default backend."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from retinanet.evaluate import _run_hotcoco, load_ground_truth, load_results

    start = time.perf_counter()
    gt = load_ground_truth(gt_path)
    t_gt = time.perf_counter()
    if iou_type == "segm":
        dets, rles = load_results(dt_path, gt, iou_type="segm")
    else:
        dets, rles = load_results(dt_path, gt), None
    t_dt = time.perf_counter()
    _run_hotcoco(gt, dets, rles)
    t_eval = time.perf_counter()
    return {"read+check GT": t_gt - start, "read+check results": t_dt - t_gt, "COCOeval": t_eval - t_dt}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=5000, help="images (80 categories, 100 detections each)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated set")
    parser.add_argument("--skip-pycocotools", action="store_true", help="do not run the slow reference backend")
    parser.add_argument("--iou-type", default="bbox", choices=["bbox", "segm"], help="score boxes or masks")
    args = parser.parse_args()
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs (wall times stretch when it exceeds them)")

    gt, results = make_coco_set(num_images=args.images, seed=args.seed)
    if args.iou_type == "segm":
        add_masks(gt, results)
    print(f"{len(gt['images'])} images, {len(gt['categories'])} categories, "
          f"{len(gt['annotations'])} GT boxes, {len(results)} detections")
    backends = [("hotcoco", "hotcoco"), ("faster-coco-eval", "faster_coco_eval"), ("pycocotools", "pycocotools")]
    if args.skip_pycocotools:
        backends = backends[:-1]
    repo = Path(__file__).resolve().parent.parent
    times = {}
    with tempfile.TemporaryDirectory() as tmp:
        gt_path, dt_path = Path(tmp) / "gt.json", Path(tmp) / "results.json"
        gt_path.write_bytes(orjson.dumps(gt))
        dt_path.write_bytes(orjson.dumps(results))
        print(f"GT {gt_path.stat().st_size / 1e6:.1f} MB, results {dt_path.stat().st_size / 1e6:.1f} MB")
        for name, module in backends:
            if importlib.util.find_spec(module) is None:
                print(f"{name:17s} not installed, skipped")
                continue
            cmd = [sys.executable, "-m", "retinanet", "eval", "--gt", str(gt_path), "--results", str(dt_path),
                   "--backend", name, "--output", str(Path(tmp) / f"metrics-{name}.json"), "--iou-type", args.iou_type]
            cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
            start = time.perf_counter()
            proc = subprocess.run(cmd, cwd=repo, capture_output=True, text=True)
            times[name] = time.perf_counter() - start
            cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
            if proc.returncode != 0:
                print(proc.stdout, proc.stderr, file=sys.stderr)
                return 1
            ap = orjson.loads((Path(tmp) / f"metrics-{name}.json").read_bytes())["AP"]
            print(f"{name:17s} {times[name]:7.2f} s wall  {cpu:7.2f} s CPU (user+sys)   AP {ap:.6f}")
        stages = in_process_stages(gt_path, dt_path, args.iou_type)
        print("in process, hotcoco: " + ", ".join(f"{name} {t:.2f} s" for name, t in stages.items()))
    if "pycocotools" in times:
        for name, t in list(times.items())[:-1]:
            print(f"{name:17s} {times['pycocotools'] / t:7.1f}x faster than pycocotools")
    return 0


if __name__ == "__main__":
    sys.exit(main())
