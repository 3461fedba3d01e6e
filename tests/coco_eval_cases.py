"""Small COCO ground truth / results pairs for the evaluation tests, and pycocotools as the reference."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np

# Non-contiguous ids; category 12 has detections but no ground truth.
CATEGORY_IDS = (1, 3, 7, 12, 90)
NO_GT_CATEGORY = 12


def make_edge_case_set(seed: int = 0, num_images: int = 40) -> tuple:
    """A COCO ground truth dict and results list covering COCOeval's edge cases.

    Non-contiguous image ids (7, 10, 13, ...); images 0-3 have no ground truth; images 4-7 have
    no detections; ~8% crowd boxes, with detections on them; image 8 has 150 detections (more
    than maxDets=100); category 12 has detections but no ground truth; box sides from 4 to 300 px
    (log-uniform: small, medium and large objects); a quarter of the scores rounded to 0.1 (ties).
    """
    rng = np.random.default_rng(seed)
    images = [{"id": 7 + 3 * i, "width": 640, "height": 480, "file_name": f"{i}.jpg"} for i in range(num_images)]
    gt_cats = [c for c in CATEGORY_IDS if c != NO_GT_CATEGORY]
    anns = []
    for i, im in enumerate(images):
        if i < 4:
            continue
        for _ in range(int(rng.integers(1, 7))):
            w, h = np.exp(rng.uniform(np.log(4), np.log(300), size=2))  # log-uniform: small to large
            x, y = rng.uniform(0, 640 - w), rng.uniform(0, 480 - h)
            anns.append({"id": len(anns) + 1, "image_id": im["id"], "category_id": int(rng.choice(gt_cats)),
                         "bbox": [float(x), float(y), float(w), float(h)], "area": float(w * h),
                         "iscrowd": int(rng.random() < 0.08)})
    results = []
    for i, im in enumerate(images):
        if 4 <= i < 8:
            continue
        own = [a for a in anns if a["image_id"] == im["id"]]
        for _ in range(150 if i == 8 else int(rng.integers(0, 25))):
            if own and rng.random() < 0.6:  # a jittered copy of a GT box (crowd ones included)
                a = own[int(rng.integers(len(own)))]
                box = np.array(a["bbox"]) + rng.normal(0, 0.08, size=4) * np.repeat(a["bbox"][2:], 2)
                box[2:] = np.abs(box[2:])
                cat = a["category_id"] if rng.random() < 0.8 else int(rng.choice(CATEGORY_IDS))
            else:
                w, h = np.exp(rng.uniform(np.log(4), np.log(300), size=2))
                box = np.array([rng.uniform(0, 640 - w), rng.uniform(0, 480 - h), w, h])
                cat = int(rng.choice(CATEGORY_IDS))
            score = float(rng.random())
            results.append({"image_id": im["id"], "category_id": cat, "bbox": box.tolist(),
                            "score": round(score, 1) if rng.random() < 0.25 else score})
    gt = {"images": images, "annotations": anns,
          "categories": [{"id": c, "name": f"class{c}"} for c in CATEGORY_IDS]}
    return gt, results


def write_json(path, obj) -> str:
    path.write_text(json.dumps(obj))
    return str(path)


def pycocotools_reference(gt_path: str, results_path: str):
    """pycocotools run the documented way (COCO(file), loadRes(file)); returns the COCOeval object."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(gt_path)
        ev = COCOeval(coco_gt, coco_gt.loadRes(results_path), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev


def reference_ap(ev, category_index=None, iou=None) -> float:
    """AP as pycocotools' summarize() computes it (area all, maxDets 100), optionally for one category / IoU."""
    p = ev.eval["precision"][:, :, :, 0, -1]  # (T, R, K)
    if iou is not None:
        p = p[np.isclose(ev.params.iouThrs, iou)]
    if category_index is not None:
        p = p[:, :, category_index]
    p = p[p > -1]
    return float(p.mean()) if p.size else -1.0
