"""Does the fast path keep the accuracy? COCO AP of a trained model on its validation set, run
plain (fp32, NCHW, BatchNorm not folded), optimized (folded, channels_last) in fp32, and
optimized under bf16 autocast; with the time per image of each.

    python benchmarks/bench_precision.py --checkpoint demo/final.pt
    python benchmarks/bench_precision.py            # trains `retinanet demo` first (minutes)

The validation set is the one named in the checkpoint's config (data.val_json, data.val_images):
for a demo checkpoint, the synthetic shapes validation set.
"""

from __future__ import annotations

import argparse
import copy
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from retinanet.checkpoint import load_model  # noqa: E402
from retinanet.data import CocoDataset, build_test_loader  # noqa: E402
from retinanet.evaluate import detections_to_coco_results, run_coco_eval  # noqa: E402
from retinanet.optimize import autocast, optimize_for_inference  # noqa: E402


def evaluate(model, dtype, dataset, label_to_cat: list, batch_size: int) -> tuple:
    """(COCO metrics, seconds per image) of `model` under `dtype` autocast on `dataset`."""
    results, seconds = [], 0.0
    loader = build_test_loader(dataset, batch_size=batch_size)
    with torch.inference_mode(), autocast(model, dtype):
        for images, targets in loader:
            start = time.perf_counter()
            detections = model(images)
            seconds += time.perf_counter() - start
            results += detections_to_coco_results(detections, [t["image_id"] for t in targets], label_to_cat)
    return run_coco_eval(dataset.json_path, results).metrics(), seconds / len(dataset)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="a trained checkpoint (default: train `retinanet demo` first)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per forward pass")
    parser.add_argument("--tolerance", type=float, default=0.003, help="largest acceptable AP change")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint
        if checkpoint is None:
            print("training `retinanet demo` to have a model to measure ...", flush=True)
            out = Path(tmp) / "demo"
            subprocess.run([sys.executable, "-m", "retinanet", "demo", "--output", str(out), "--no-progress"],
                           cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
            checkpoint = str(out / "final.pt")
        model, cfg, categories = load_model(checkpoint)
        if not (cfg.data.val_json and cfg.data.val_images):
            raise ValueError(f"{checkpoint}: its config names no validation set (data.val_json, data.val_images)")
        dataset = CocoDataset(cfg.data.val_json, cfg.data.val_images, check_images="exists")
        label_to_cat = [c["id"] for c in categories]
        fast = optimize_for_inference(copy.deepcopy(model))
        variants = {"plain fp32": (model, None), "fast fp32 (folded, channels_last)": (fast, None),
                    "fast bf16 (folded, channels_last)": (fast, torch.bfloat16)}
        print(f"{checkpoint}: {cfg.model.backbone}, {len(dataset)} validation images ({cfg.data.val_json})")
        rows = {name: evaluate(m, dtype, dataset, label_to_cat, args.batch_size) for name, (m, dtype) in variants.items()}
    base = rows["plain fp32"][0]["AP"]
    print(f"  {'configuration':<36} {'AP':>8} {'AP50':>8} {'AP - fp32':>10} {'ms/image':>9}")
    worst = 0.0
    for name, (metrics, per_image) in rows.items():
        delta = metrics["AP"] - base
        worst = max(worst, abs(delta))
        print(f"  {name:<36} {metrics['AP']:>8.4f} {metrics['AP50']:>8.4f} {delta:>+10.4f} {1000 * per_image:>9.1f}")
    print(f"  largest AP change {worst:.4f}: {'within' if worst <= args.tolerance else 'OUTSIDE'} {args.tolerance}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
