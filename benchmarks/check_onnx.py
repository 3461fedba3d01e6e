"""An exported model against PyTorch on a COCO-format validation set: how many images get the same
detections, how large the differences are where they do not, and the AP of each.

    PYTHONPATH=$PWD python benchmarks/check_onnx.py --checkpoint run/final.pt --json val.json \
        --images val/ [--exporter dynamo|torchscript] [--limit 500] [--workdir /tmp/onnx_check]

Same detections: the same number, the same labels in the same order, boxes within 1e-3 px and scores
within 1e-4. Where they differ, the output says whether the proposals (two-stage models) already
differ: onnxruntime's NonMaxSuppression may break equal scores another way than PyTorch's.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retinanet.checkpoint import load_model  # noqa: E402
from retinanet.compare import match_detections  # noqa: E402
from retinanet.evaluate import evaluate_coco  # noqa: E402
from retinanet.export import OnnxDetector, export_onnx  # noqa: E402
from retinanet.predict import Predictor  # noqa: E402


def _same_set(a, b) -> bool:
    """The same detections up to order among near-equal scores (one to one: label, box within 1e-3 px,
    score within 1e-4; retinanet.compare, as `retinanet export`'s check and the tests)."""
    return match_detections(b, a, score_atol=1e-4, box_atol=1e-3, cut_slack=False).same


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--json", required=True, help="COCO ground truth of the images")
    p.add_argument("--images", required=True)
    p.add_argument("--exporter", default="dynamo", choices=["dynamo", "torchscript"])
    p.add_argument("--limit", type=int, default=0, help="the first N images only (0: all)")
    p.add_argument("--workdir", default="/tmp/onnx_check")
    args = p.parse_args()

    torch.set_num_threads(max(torch.get_num_threads(), 1))
    model, cfg, categories = load_model(args.checkpoint, device="cpu")
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    path = work / f"model_{args.exporter}.onnx"
    start = time.perf_counter()
    export_onnx(model, cfg, categories, str(path), exporter=args.exporter)
    print(f"{cfg.model.arch}: exported with {args.exporter} in {time.perf_counter() - start:.1f} s")

    ours, theirs = Predictor(model, categories, device="cpu"), OnnxDetector(str(path))
    gt = json.loads(Path(args.json).read_text())
    images = gt["images"][:args.limit] if args.limit else gt["images"]
    results = {"pytorch": [], "onnx": []}
    same = proposals_differ = 0
    worst_box = worst_score = 0.0
    differing = []
    for info in images:
        array = np.asarray(Image.open(Path(args.images) / info["file_name"]).convert("RGB"))
        a, b = ours(array), theirs(array)
        results["pytorch"] += a.to_coco(info["id"])
        results["onnx"] += b.to_coco(info["id"])
        if len(a) == len(b) and np.array_equal(a.labels, b.labels):
            box = float(np.abs(a.boxes - b.boxes).max()) if len(a) else 0.0
            score = float(np.abs(a.scores - b.scores).max()) if len(a) else 0.0
            if box <= 1e-3 and score <= 1e-4:
                same += 1
                worst_box, worst_score = max(worst_box, box), max(worst_score, score)
                continue
        batch = model.preprocess([torch.from_numpy(array).permute(2, 0, 1)])
        with torch.no_grad():
            out_a = model.run_network(batch)
        out_b = theirs.network(batch)
        differ = any(x.shape != y.shape for x, y in zip(out_a, out_b))
        proposals_differ += differ
        differing.append(f"image {info['id']}: {len(a)} vs {len(b)} detections"
                         + (", the same set in another order" if _same_set(a, b) else "")
                         + (", network outputs of different shapes" if differ else ""))
    print(f"{len(images)} images: {same} with the same detections (max box difference {worst_box:.1e} px, "
          f"score {worst_score:.1e}); {len(images) - same} differ, {proposals_differ} of them with network "
          f"outputs of different shapes (proposals)")
    for line in differing[:20]:
        print("  " + line)
    subset = {**gt, "images": images, "annotations": [a for a in gt["annotations"]
                                                      if a["image_id"] in {i["id"] for i in images}]}
    for name, res in results.items():
        m = evaluate_coco(subset, res)
        print(f"{name}: AP {m['AP']:.4f} AP50 {m['AP50']:.4f} AP75 {m['AP75']:.4f}")


if __name__ == "__main__":
    main()
