"""Test-time augmentation: COCO AP and time per image of a checkpoint on its validation set, without TTA,
with the default TTA (scales 0.75, 1, 1.25 x flip) and with the flip alone (scale 1), each merged by
class-aware NMS (the default) and by NMS with box voting (`merge_detections(vote_iou=...)`).

    python benchmarks/bench_tta.py --checkpoint demo/final.pt [--vote-iou 0.8] [--limit 100]

The passes of a TTA setting run once per batch (`retinanet.tta.tta_passes`) and both merges use them, so
the two merges see the same detections; a setting's time per image is its passes' time plus its merge's
(the first batch, warm-up, left out). The validation set is the checkpoint config's data.val_json /
data.val_images (for a demo checkpoint, the synthetic shapes validation set).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import machine_report  # noqa: E402
from retinanet.checkpoint import load_model  # noqa: E402
from retinanet.data import CocoDataset, build_test_loader  # noqa: E402
from retinanet.evaluate import detections_to_coco_results, evaluate_coco  # noqa: E402
from retinanet.tta import DEFAULT_SCALES, merge_detections, tta_passes  # noqa: E402

KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AP90")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--vote-iou", type=float, default=0.8, help="box voting's IoU threshold (Detectron: 0.8)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--limit", type=int, default=0, help="only the first N images (0: all)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    print(machine_report("cpu"))
    model, cfg, categories = load_model(args.checkpoint, device="cpu")
    dataset = CocoDataset(cfg.data.val_json, cfg.data.val_images, check_images="exists")
    if args.limit:
        dataset = torch.utils.data.Subset(dataset, range(min(args.limit, len(dataset))))
    label_to_cat = [c["id"] for c in categories]
    settings = {"no TTA": None, "flip (scale 1)": ((1.0,), True),
                f"scales {list(DEFAULT_SCALES)} x flip": (DEFAULT_SCALES, True)}
    merges = {"nms": None, f"nms + vote {args.vote_iou}": args.vote_iou}
    results = {(s, m): [] for s in settings for m in merges}
    seconds = {key: 0.0 for key in results}
    timed = 0
    nms, cap, agnostic = model.nms_thresh, model.detections_per_image, model.class_agnostic_nms
    with torch.inference_mode():
        for step, (images, targets) in enumerate(build_test_loader(dataset, batch_size=args.batch_size)):
            ids = [t["image_id"] for t in targets]
            timed += len(images) if step else 0
            for name, setting in settings.items():  # interleaved batch by batch: load changes hit all alike
                start = time.perf_counter()
                if setting is None:
                    detections = model(images)
                    elapsed = time.perf_counter() - start
                    for merge in merges:
                        results[name, merge] += detections_to_coco_results(detections, ids, label_to_cat)
                        seconds[name, merge] += elapsed if step else 0.0
                    continue
                passes = tta_passes(model, images, scales=setting[0], flip=setting[1])
                pass_time = time.perf_counter() - start
                for merge, vote in merges.items():
                    start = time.perf_counter()
                    merged = [merge_detections(parts, nms, cap, agnostic, vote_iou=vote) for parts in passes]
                    seconds[name, merge] += (pass_time + time.perf_counter() - start) if step else 0.0
                    results[name, merge] += detections_to_coco_results(merged, ids, label_to_cat)
            print(f"\r{step + 1} batches", end="", file=sys.stderr)
    print(file=sys.stderr)
    gt = cfg.data.val_json
    if args.limit:
        import json

        data = json.loads(Path(gt).read_text())
        keep = {dataset.dataset.image_ids[i] for i in dataset.indices}
        gt = {**data, "images": [i for i in data["images"] if i["id"] in keep],
              "annotations": [a for a in data["annotations"] if a["image_id"] in keep]}
    print(f"\n{len(dataset)} images; checkpoint {args.checkpoint}")
    print("| setting | merge | " + " | ".join(KEYS) + " | ms / image |")
    print("|---|---|" + "---|" * (len(KEYS) + 1))
    for (name, merge), res in results.items():
        if settings[name] is None and merge != "nms":
            continue
        metrics = evaluate_coco(gt, res)
        cells = " | ".join("n/a" if metrics[k] is None else f"{metrics[k]:.3f}" for k in KEYS)
        print(f"| {name} | {merge if settings[name] else '-'} | {cells} | {1000 * seconds[name, merge] / timed:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
