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


def _ellipse(rng, height: int, width: int) -> np.ndarray:
    """(height, width) uint8 mask of a random axis-aligned ellipse, sides log-uniform 4..200 px."""
    a, b = np.exp(rng.uniform(np.log(2), np.log(100), size=2))
    cx, cy = rng.uniform(0, width), rng.uniform(0, height)
    ys, xs = np.mgrid[0:height, 0:width] + 0.5
    return ((((xs - cx) / a) ** 2 + ((ys - cy) / b) ** 2) <= 1).astype(np.uint8)


def make_segm_case_set(seed: int = 0, num_images: int = 16, height: int = 120, width: int = 160,
                       many: int = 0) -> tuple:
    """A COCO ground truth with segmentations and a results list with compressed-RLE masks.

    Non-contiguous image ids (5, 9, 13, ...) and category ids (CATEGORY_IDS); images 0-1 have no
    ground truth, images 2-3 no results. Ground truth segmentations in all three COCO forms: polygons
    (random quadrilaterals, some in two parts), compressed RLE (ellipses, overlapping each other) and
    uncompressed RLE for the ~15% crowd regions. Results: noisy copies of the GT masks (dilated,
    shifted, some with the wrong class), random ellipses, and detections inside crowd regions;
    `many` > 0 gives image 4 that many results (for proposals beyond 1000).
    """
    from pycocotools import mask as mask_api

    rng = np.random.default_rng(seed)
    images = [{"id": 5 + 4 * i, "width": width, "height": height, "file_name": f"{i}.png"} for i in range(num_images)]
    gt_cats = [c for c in CATEGORY_IDS if c != NO_GT_CATEGORY]
    anns, gt_masks = [], {}
    for i, im in enumerate(images):
        gt_masks[im["id"]] = []
        if i < 2:
            continue
        for _ in range(int(rng.integers(1, 8))):
            kind = rng.integers(3)
            crowd = rng.random() < 0.15
            if crowd or kind == 0:
                m = _ellipse(rng, height, width)
                if m.sum() == 0:
                    continue
                rle = mask_api.encode(np.asfortranarray(m))
                if crowd:  # uncompressed RLE: the run lengths, column-major, starting with zeros
                    flat = m.flatten(order="F")
                    change = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
                    counts = np.diff(np.concatenate([[0], change])).tolist()
                    seg = {"size": [height, width], "counts": counts[:-1] if sum(counts) > height * width else counts}
                else:
                    seg = {"size": [height, width], "counts": rle["counts"].decode()}
            else:
                parts = []
                for _ in range(int(kind)):  # 1 or 2 polygons
                    cx, cy = rng.uniform(0, width), rng.uniform(0, height)
                    r = np.exp(rng.uniform(np.log(3), np.log(60)))
                    angles = np.sort(rng.uniform(0, 2 * np.pi, size=4))
                    pts = np.stack([cx + r * np.cos(angles), cy + r * np.sin(angles)], 1).clip([0, 0], [width, height])
                    parts.append(pts.flatten().round(2).tolist())
                seg = parts
                rle = mask_api.merge(mask_api.frPyObjects(parts, height, width))
                m = mask_api.decode(rle)
                if m.sum() == 0:
                    continue
            x, y, w, h = mask_api.toBbox(mask_api.encode(np.asfortranarray(m))).tolist()
            anns.append({"id": len(anns) + 1, "image_id": im["id"], "category_id": int(rng.choice(gt_cats)),
                         "bbox": [x, y, w, h], "area": float(m.sum()), "iscrowd": int(crowd), "segmentation": seg})
            gt_masks[im["id"]].append((m, anns[-1]["category_id"]))
    results = []
    for i, im in enumerate(images):
        if i in (2, 3):
            continue
        own = gt_masks[im["id"]]
        count = many if (i == 4 and many) else int(rng.integers(0, 20))
        for _ in range(count):
            if own and rng.random() < 0.6:
                m, cat = own[int(rng.integers(len(own)))]
                m = np.roll(m, tuple(rng.integers(-3, 4, size=2)), axis=(0, 1))
                if rng.random() < 0.5:  # dilate by one pixel
                    m = m | np.roll(m, 1, axis=0) | np.roll(m, 1, axis=1)
                cat = cat if rng.random() < 0.8 else int(rng.choice(CATEGORY_IDS))
            else:
                m, cat = _ellipse(rng, height, width), int(rng.choice(CATEGORY_IDS))
            rle = mask_api.encode(np.asfortranarray(m.astype(np.uint8)))
            score = float(rng.random())
            results.append({"image_id": im["id"], "category_id": cat,
                            "score": round(score, 1) if rng.random() < 0.2 else score,
                            "segmentation": {"size": [height, width], "counts": rle["counts"].decode()},
                            "bbox": mask_api.toBbox(rle).tolist()})
    gt = {"images": images, "annotations": anns, "categories": [{"id": c, "name": f"class{c}"} for c in CATEGORY_IDS]}
    return gt, results


def pycocotools_eval(gt_path: str, results_path: str, iou_type: str, use_cats: int = 1, max_dets=None):
    """pycocotools' COCOeval run the documented way with the given parameters; returns the evaluator."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(gt_path)
        ev = COCOeval(coco_gt, coco_gt.loadRes(results_path), iou_type)
        ev.params.useCats = use_cats
        if max_dets is not None:
            ev.params.maxDets = list(max_dets)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev
