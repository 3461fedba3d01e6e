"""Speed against accuracy of detectors at several test input sizes: the Focal Loss paper's Figure 2
(COCO AP against inference time, one curve per detector, a point per input scale).

    python tools/speed_accuracy.py --checkpoint RetinaNet=runs/a/final.pt --checkpoint "Faster R-CNN=runs/b/final.pt" \
        --sizes 128 160 192 256 --json val.json --images val/ --output speed_accuracy/ [--max-images N] [--threads 1]

Each checkpoint is loaded once and run at each size: the model's own resize, shorter side `size`
and longer side at most max_size * size / min_size (the model's ratio, as test-time augmentation
scales it), set on the loaded detector's min_size / max_size, which are what its `preprocess`
reads (the same model as a checkpoint whose config says model.min_size = size). Everything else
goes through the detector's contract, `model(images)` (retinanet/modeling/detector.py): nothing of
its pre- or post-processing is redone here.

AP: COCO box AP (retinanet.evaluate.evaluate_coco, the package's evaluation) of the detections on
the first N images of --json/--images, scored against those images only; the checkpoint's
categories map its labels to category ids, as `retinanet eval --checkpoint` maps them.
Time, ms/image: `model(images)` on one image at a time (batch 1), on --threads threads (default 1),
from the decoded uint8 image to the detections: pre-processing (conversion, normalization, resize,
padding), the network and post-processing (decoding, NMS), as the engine's ms_per_image measures
it (image decoding left out); the median over the images, after --warmup untimed passes at that
size. The median, not the mean: on a shared machine a few images stall on other processes.

Writes speed_accuracy.json ({"rows": one per (checkpoint, size)}, the command's settings) and
speed_accuracy.png into --output, and prints the table. --output may be a new or empty folder, or
one holding only these two files (an earlier run of this tool); anything else is refused before
any work. Timings on a busy machine are noisy: the load average is recorded with them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

OUTPUT_FILES = ("speed_accuracy.json", "speed_accuracy.png")


def parse_checkpoint(text: str) -> tuple:
    """"NAME=PATH" -> (NAME, PATH); a bare PATH is named after its folder."""
    name, sep, path = text.partition("=")
    if not sep:
        name, path = Path(text).resolve().parent.name, text
    if not name or not path:
        raise ValueError(f"--checkpoint {text!r}: expected NAME=PATH")
    return name, path


def check_output_folder(path) -> None:
    """Refuse, before any work, an --output that is not a folder this tool may write: a new or empty
    folder, or one holding only OUTPUT_FILES (its own earlier output)."""
    from retinanet.commands import check_output_path

    check_output_path(path, "--output", folder=True)
    p = Path(path)
    if p.is_dir():
        others = sorted(e.name for e in p.iterdir() if e.name not in OUTPUT_FILES)
        if others:
            listed = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
            raise ValueError(f"--output {p}: refusing to write into a folder with other files ({listed}); "
                             f"give a new or empty folder")


def load_images(json_path, images_dir, max_images) -> tuple:
    """(dataset, [(image (3, H, W) uint8, image_id)] of its first max_images images, decoded once)."""
    from retinanet.data.coco import CocoDataset

    dataset = CocoDataset(json_path, images_dir, check_images="exists")
    n = len(dataset) if max_images is None else min(max_images, len(dataset))
    if n == 0:
        raise ValueError(f"{json_path}: no images to evaluate")
    items = []
    for i in range(n):
        image, target = dataset.item(i, pending=True)  # a PendingImage: uint8, no pixel operation (no transforms)
        items.append((image.data, target["image_id"]))
    return dataset, items


def measure(model, items, label_to_cat, *, warmup: int = 3, device=None) -> tuple:
    """(COCO results, [seconds of `model([image])` per image]) of the model at its current size."""
    import torch

    from retinanet.evaluate import detections_to_coco_results

    device = device or model.device

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    results, seconds = [], []
    with torch.inference_mode():
        for _ in range(warmup):
            model([items[0][0].to(device)])
        for image, image_id in items:
            image = image.to(device)
            sync()
            start = time.perf_counter()
            detections = model([image])
            sync()
            seconds.append(time.perf_counter() - start)
            results += detections_to_coco_results(detections, [image_id], label_to_cat)
    return results, seconds


def speed_accuracy(checkpoints: list, sizes: list, json_path, images_dir, *, max_images=None, warmup: int = 3,
                   device: str = "cpu", log=print) -> list:
    """One row per (checkpoint, size): {"name", "checkpoint", "size", "min_size", "max_size",
    "trained_size", "AP", "AP50", "AP75", "APs", "APm", "APl", "ms_per_image" (median),
    "ms_mean", "images"}. checkpoints: [(name, path)]."""
    import torch

    from retinanet.checkpoint import load_model
    from retinanet.evaluate import evaluate_coco, ground_truth_subset
    from retinanet.ops.transform import scaled_limits

    dataset, items = load_images(json_path, images_dir, max_images)
    gt = ground_truth_subset(json_path, [image_id for _, image_id in items])
    device = torch.device(device)
    rows = []
    for name, path in checkpoints:
        model, cfg, categories = load_model(path, device=str(device))
        if getattr(model, "class_agnostic_proposals", False):
            raise ValueError(f"{path}: a segment proposal model (model.arch {cfg.model.arch}), without classes "
                             f"or AP; give a detector (model.arch retinanet or faster_rcnn)")
        label_to_cat = [c["id"] for c in categories]
        placeholders = {c["id"] for c in categories if c.get("placeholder")}
        trained = (model.min_size, model.max_size)
        for size in sizes:
            model.min_size, model.max_size = scaled_limits(*trained, size / trained[0])
            results, seconds = measure(model, items, label_to_cat, warmup=warmup, device=device)
            results = [r for r in results if r["category_id"] not in placeholders]
            metrics = evaluate_coco(gt, results)
            row = {"name": name, "checkpoint": str(path), "size": size, "min_size": model.min_size,
                   "max_size": model.max_size, "trained_size": trained[0],
                   **{k: metrics[k] for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")},
                   "ms_per_image": 1000 * statistics.median(seconds), "ms_mean": 1000 * statistics.fmean(seconds),
                   "images": len(items)}
            rows.append(row)
            log(format_row(row))
        model.min_size, model.max_size = trained
    return rows


def _points(v) -> str:
    return "  n/a" if v is None else f"{100 * v:5.1f}"


TABLE_HEADER = f"{'detector':<24} {'size':>5} {'AP':>5} {'AP50':>5} {'AP75':>5} {'ms/img':>7} {'mean':>7}"


def format_row(row: dict) -> str:
    return (f"{row['name']:<24} {row['size']:>5} {_points(row['AP'])} {_points(row['AP50'])} {_points(row['AP75'])} "
            f"{row['ms_per_image']:7.2f} {row['ms_mean']:7.2f}")


def plot(rows: list, path: Path, title: str = "") -> None:
    """AP (y) against median ms/image (x): a line per checkpoint, a marker per size labelled with it."""
    from retinanet.plots import _new_figure, _save_atomic

    fig = _new_figure(6.5, 4.5)
    ax = fig.add_subplot()
    for name in dict.fromkeys(r["name"] for r in rows):
        mine = sorted((r for r in rows if r["name"] == name), key=lambda r: r["size"])
        xs = [r["ms_per_image"] for r in mine]
        ys = [100 * (r["AP"] or 0.0) for r in mine]
        line, = ax.plot(xs, ys, "-o", label=name)
        for r, x, y in zip(mine, xs, ys):
            ax.annotate(str(r["size"]), (x, y), textcoords="offset points", xytext=(4, -10), fontsize=8,
                        color=line.get_color())
    ax.set(xlabel="inference time (ms / image, median, batch 1)", ylabel="COCO AP",
           title=title or "speed / accuracy by test input size")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    _save_atomic(fig, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", action="append", required=True, metavar="NAME=PATH",
                   help="a detector checkpoint and its name in the table and plot (repeat for several)")
    p.add_argument("--sizes", type=int, nargs="+", required=True, metavar="S",
                   help="test input sizes: the shorter side (model.min_size) to run each checkpoint at")
    p.add_argument("--json", required=True, metavar="J", help="COCO instances JSON (the ground truth)")
    p.add_argument("--images", required=True, metavar="D", help="the images folder of --json")
    p.add_argument("--output", required=True, metavar="DIR", help="folder for speed_accuracy.json and .png")
    p.add_argument("--max-images", type=int, metavar="N", help="only the first N images of --json (default all)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--warmup", type=int, default=3, help="untimed passes before each (checkpoint, size) (default 3)")
    p.add_argument("--device", default="cpu", help="cpu (default) | cuda | cuda:N")
    args = p.parse_args(argv)
    try:
        checkpoints = [parse_checkpoint(c) for c in args.checkpoint]
        names = [n for n, _ in checkpoints]
        if len(set(names)) != len(names):
            raise ValueError(f"two checkpoints have the same name ({', '.join(names)}): give NAME=PATH")
        if min(args.sizes) < 1 or len(set(args.sizes)) != len(args.sizes):
            raise ValueError(f"--sizes must be positive and distinct, got {args.sizes}")
        if (args.max_images is not None and args.max_images < 1) or args.threads < 1 or args.warmup < 0:
            raise ValueError("--max-images and --threads must be >= 1 and --warmup >= 0")
        inputs = [("--json", args.json), ("--images", args.images)] + [("--checkpoint", c) for _, c in checkpoints]
        for flag, path in inputs:
            if not Path(path).exists():
                raise FileNotFoundError(f"{flag} {path}: not found")
        check_output_folder(args.output)
        import torch

        torch.set_num_threads(args.threads)
        load = os.getloadavg()
        print(TABLE_HEADER)
        rows = speed_accuracy(checkpoints, args.sizes, args.json, args.images, max_images=args.max_images,
                              warmup=args.warmup, device=args.device)
    except (ValueError, OSError) as e:  # user errors, and what the system refused: as the retinanet CLI says them
        from retinanet.cli import _one_problem

        print(f"error: {_one_problem(e)}", file=sys.stderr)
        return 1
    from retinanet.atomic import atomic_write

    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    report = {"tool": "speed_accuracy", "command": "python tools/speed_accuracy.py " + " ".join(
                  sys.argv[1:] if argv is None else argv),
              "threads": args.threads, "device": args.device, "warmup": args.warmup,
              "loadavg_before": list(load), "loadavg_after": list(os.getloadavg()),
              "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "rows": rows}
    with atomic_write(out / OUTPUT_FILES[0], "w") as f:
        json.dump(report, f, indent=2, allow_nan=False)
        f.write("\n")
    plot(rows, out / OUTPUT_FILES[1])
    print(f"load average before {', '.join(f'{v:.2f}' for v in load)}, after "
          f"{', '.join(f'{v:.2f}' for v in report['loadavg_after'])} ({os.cpu_count()} CPUs)")
    print(f"wrote {out / OUTPUT_FILES[0]}, {out / OUTPUT_FILES[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
