"""Memory and time of instance masks in the training data, on COCO-sized images.

    python benchmarks/bench_masks.py [--images 64] [--instances 7.3]

A generated COCO-like set (480 x 640 images, a Poisson number of instances per image with COCO's mean
of 7.3, octagon polygons, 1% crowd regions as uncompressed RLE) goes through `CocoDataset` with the
training transforms of the paper's setting (shorter side 800, longer <= 1333, flip), once with
`masks=True` and once without. Printed: the bytes per image of each form a mask can take (the
polygons, the compressed RLE the dataset keeps, the (G, H, W) uint8 target), the target's bytes for a
batch of 16, and the time per item with and without masks.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import orjson
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64, help="images in the generated set")
    parser.add_argument("--instances", type=float, default=7.3, help="mean instances per image (COCO train: 7.3)")
    args = parser.parse_args()

    import torch

    from bench_eval import add_masks, make_coco_set
    from retinanet.data.coco import CocoDataset
    from retinanet.data.transforms import Compose, RandomHorizontalFlip, ResizeShortestSide

    torch.set_num_threads(1)
    gt, results = make_coco_set(num_images=args.images, gt_per_image=args.instances, dets_per_image=1)
    add_masks(gt, results)
    polygon_bytes = sum(8 * len(p) for a in gt["annotations"] if isinstance(a["segmentation"], list)
                        for p in a["segmentation"])  # float64 coordinates
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        folder.mkdir()
        blank = Image.fromarray(np.zeros((480, 640, 3), dtype=np.uint8))
        for im in gt["images"]:
            blank.save(folder / im["file_name"], format="PNG")
        gt_path = Path(tmp) / "gt.json"
        gt_path.write_bytes(orjson.dumps(gt))
        transforms = Compose([ResizeShortestSide([800], 1333), RandomHorizontalFlip(0.5)])
        datasets = {flag: CocoDataset(gt_path, folder, transforms=transforms, masks=flag, check_images="exists")
                    for flag in (False, True)}
        times = {False: [], True: []}
        target_bytes, instances = [], []
        for _ in range(3):  # interleaved: load changes hit both alike
            for flag, dataset in datasets.items():
                start = time.perf_counter()
                for i in range(len(dataset)):
                    _, target = dataset[(i, i)]
                    if flag and len(times[True]) == 0:
                        target_bytes.append(target["masks"].numel() * target["masks"].element_size())
                        instances.append(len(target["masks"]))
                times[flag].append((time.perf_counter() - start) / len(dataset))
        rle_bytes = len(datasets[True].rle_bytes)
    n = args.images
    size = tuple(target["masks"].shape[1:]) if len(target["masks"]) else "(no instances)"
    print(f"{n} images 480x640 -> {size}, {sum(instances) / n:.2f} instances per image")
    print(f"per image: polygons {polygon_bytes / n / 1e3:.2f} kB (float64), compressed RLE kept by the dataset "
          f"{rle_bytes / n / 1e3:.2f} kB, target masks (G, H, W) uint8 {np.mean(target_bytes) / 2 ** 20:.2f} MiB")
    print(f"batch of 16: target masks {16 * np.mean(target_bytes) / 2 ** 20:.0f} MiB")
    print(f"time per item (median of 3): boxes only {1e3 * np.median(times[False]):.1f} ms, "
          f"with masks {1e3 * np.median(times[True]):.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
