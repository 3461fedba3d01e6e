"""Anchor coverage of a 100k-box dataset: `retinanet check-data --config` without the image checks.

    python benchmarks/bench_anchor_coverage.py [--boxes 100000] [--repeat 3]

A synthetic COCO JSON (COCO-like image sizes 480-640 x 640, 1-300 px boxes, 10 per image) is written to a
temporary folder; the table gives the time to read and validate the JSON (`load_boxes`), and for three
configs (the paper's RetinaNet at 800 px: 9 anchors on P3-P7; Faster R-CNN's RPN at 800 px: 3 anchors on
P2-P6; the demo at 192 px) the time of the coverage itself (resize + exact best IoU of every box), the
median of --repeat runs, on one thread.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from retinanet.anchor_coverage import anchor_coverage, load_boxes  # noqa: E402
from retinanet.config import load_config  # noqa: E402


def synthetic_coco(path: Path, boxes: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    n_images = max(1, boxes // 10)
    heights = rng.choice([480, 512, 600, 640], size=n_images)
    images = [{"id": i + 1, "file_name": f"{i}.jpg", "height": int(h), "width": 640} for i, h in enumerate(heights)]
    anns = []
    for j in range(boxes):
        image = j % n_images
        h_img = int(heights[image])
        w, h = np.exp(rng.uniform(0, np.log(300), size=2))
        x, y = rng.uniform(0, 640 - w), rng.uniform(0, max(1.0, h_img - h))
        h = min(h, h_img - y)
        anns.append({"id": j + 1, "image_id": image + 1, "category_id": 1 + j % 5, "bbox": [x, y, w, h],
                     "area": w * h, "iscrowd": 0})
    cats = [{"id": k + 1, "name": f"class{k + 1}"} for k in range(5)]
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--boxes", type=int, default=100_000)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(1)
    configs = [("RetinaNet, paper (P3-P7, A=9, 800 px)", load_config(None)),
               ("Faster R-CNN RPN (P2-P6, A=3, 800 px)", load_config(str(ROOT / "retinanet/configs/faster_rcnn_paper.yaml"))),
               ("demo (P3-P6, A=9, 192 px)", load_config(str(ROOT / "retinanet/configs/demo.yaml")))]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "instances.json"
        synthetic_coco(path, args.boxes)
        times = []
        for _ in range(args.repeat):
            started = time.perf_counter()
            boxes = load_boxes(path)
            times.append(time.perf_counter() - started)
        print(f"{len(boxes.ann_ids)} boxes in {boxes.num_images} images; load average {os.getloadavg()[0]:.2f}; "
              f"1 thread")
        print(f"| step | seconds (median of {args.repeat}) | covered |")
        print("|---|---|---|")
        print(f"| read + validate the JSON (load_boxes) | {statistics.median(times):.2f} | |")
        for name, cfg in configs:
            runs = [anchor_coverage(boxes, cfg) for _ in range(args.repeat)]
            print(f"| coverage: {name} | {statistics.median(r.seconds for r in runs):.2f} | "
                  f"{100 * runs[0].covered:.1f}% |")


if __name__ == "__main__":
    main()
