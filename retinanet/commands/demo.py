"""`retinanet demo`: generate the shapes dataset, train a small model on it (on the GPU if there is one), evaluate it.

The model is a RetinaNet (retinanet/configs/demo.yaml) unless --config names another: any shipped
config (retinanet/configs/<name>.yaml, e.g. faster_rcnn_shapes for the FPN Faster R-CNN,
segprop_{deepmask,sharpmask,fpn}_shapes for the segment proposal models) or a YAML file.

Writes into --output (a new folder): everything `retinanet train` writes (checkpoints, config.yaml,
metrics.jsonl, loss_curve.png), detections.png (detections on validation images, ground truth in
thin white lines) and demo_metrics.json (on the held-out split: COCO AP, AP50, AP75 of a detector,
or segment proposal recall AR@10, AR@100, AR@1000 of a proposal model; all the metrics, timings,
the device; a detector's TIDE error breakdown, also printed as one line). key=value overrides apply
on top of the config.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Optional

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"
NUM_TRAIN, NUM_VAL, IMAGE_SIZE, DATA_SEED = 4000, 500, 192, 0
AP50_TARGET = 0.85
ARCH_NAMES = {"retinanet": "RetinaNet", "faster_rcnn": "FPN Faster R-CNN", "deepmask": "DeepMask",
              "sharpmask": "SharpMask", "fpn_masks": "FPN mask proposals"}
MAX_MINUTES = 7.0  # of training by default, so that the whole demo stays under 10 minutes on a slow machine


def register(sub) -> None:
    p = sub.add_parser("demo", help="train and evaluate a small model on generated shapes: RetinaNet, or any "
                                    "model.arch with --config (GPU or CPU, minutes)",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("overrides", nargs="*", metavar="key=value", help="changes to the config")
    p.add_argument("--config", default="demo", metavar="NAME|FILE",
                   help="a shipped config (retinanet/configs/NAME.yaml: demo (default, RetinaNet), "
                        "faster_rcnn_shapes (FPN Faster R-CNN), segprop_deepmask_shapes, segprop_sharpmask_shapes, "
                        "segprop_fpn_shapes (segment proposals, scored by AR); the paper-size configs run too, "
                        "slowly) or a YAML file")
    p.add_argument("--output", metavar="DIR",
                   help="a new folder for the results (default: the first of demo, demo-2, ... that does not exist)")
    p.add_argument("--minutes", type=float,
                   help="fit the training schedule into this many minutes, from the speed of a few timed "
                        f"iterations (default: the config's iterations, shortened if they would take more than "
                        f"{MAX_MINUTES:g} minutes here)")
    p.add_argument("--data-dir", metavar="DIR", help="where the shapes dataset is generated or reused "
                                                     "(default: ~/.cache/retinanet/shapes-<hash>)")
    p.add_argument("--device", default="auto",
                   help="auto (default: cuda when a GPU is available, else cpu) | cpu | cuda | cuda:N")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _default_output() -> Path:
    for i in range(1, 1000):
        path = Path("demo" if i == 1 else f"demo-{i}")
        if not path.exists():
            return path
    raise ValueError("demo, demo-2, ... demo-999 all exist; pass --output")


def fit_schedule(cfg, seconds_per_iteration: float, minutes: float) -> None:
    """Scale train.iterations to `minutes` and keep the LR steps, warmup and evaluations at the same fractions."""
    t = cfg.train
    iterations = max(10, int(minutes * 60 / seconds_per_iteration))
    scale = iterations / t.iterations
    t.lr_steps = [int(round(s * scale)) for s in t.lr_steps]
    t.warmup_iters = int(round(t.warmup_iters * scale))
    t.eval_every = int(round(t.eval_every * scale))
    t.checkpoint_every = max(1, int(round(t.checkpoint_every * scale)))
    t.iterations = iterations


def choose_device(name: str):
    """The torch.device the demo trains on: `name` as given (cpu, cuda, cuda:N), or for "auto" the
    GPU when one is available, else the CPU. A GPU that is asked for but absent is a ValueError."""
    from ..engine import resolve_device

    return resolve_device(name)


def describe_device(device) -> str:
    """"cpu", or "cuda:0 (NVIDIA H100 80GB HBM3)"."""
    import torch

    if device.type != "cuda":
        return str(device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    return f"cuda:{index} ({torch.cuda.get_device_name(index)})"


def time_iterations(cfg, dataset, count: int = 3, give_up_after: float = math.inf, device: str = "cpu") -> float:
    """Seconds per training iteration of `cfg` on `device` now (after one untimed iteration);
    math.inf if the timed iterations pass `give_up_after` seconds."""
    import torch

    from ..data.loader import build_train_loader
    from ..engine import autocast_dtype, build_optimizer
    from ..modeling import build_model
    from ..optimize import to_channels_last

    device = torch.device(device)

    def now() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # CUDA runs asynchronously: wait for the queued work
        return time.perf_counter()

    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg).train().to(device)
    if cfg.train.channels_last:
        to_channels_last(model)
    optimizer = build_optimizer(model, cfg)
    dtype = autocast_dtype(cfg.train.amp, device)
    batches = iter(build_train_loader(cfg, dataset, seed=cfg.train.seed))
    start = 0.0
    for i in range(count + 1):
        if i == 1:
            start = now()
        elif i > 1 and now() - start > give_up_after:
            return math.inf
        images, targets = next(batches)
        images = [image.to(device) for image in images]
        targets = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            losses = model(images, targets)
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
    return (now() - start) / count


def choose_threads(cfg, dataset) -> dict:
    """{threads: seconds per iteration} for one thread and for every core; the fastest is set in torch.

    On a machine whose cores other jobs also use, OpenMP threads spend their time waiting for each
    other, and one thread can be several times faster than all of them.
    """
    import torch

    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
        return {cfg.train.threads: time_iterations(cfg, dataset)}
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(1)
    timings = {1: time_iterations(cfg, dataset)}
    if cores > 1:
        torch.set_num_threads(cores)
        timings[cores] = time_iterations(cfg, dataset, give_up_after=3 * timings[1])
    torch.set_num_threads(min(timings, key=timings.get))
    return timings


def draw_detections(model, dataset, path: Path, *, count: int = 12, score_thresh: float = 0.5, scale: int = 2,
                    names: Optional[list] = None) -> None:
    """A grid of `count` validation images with detections (class color, label and score) above
    `score_thresh`, ground truth boxes in thin white lines. names: the model's class names by label
    (default the dataset's; a proposal model's one class is "object")."""
    import torch
    from PIL import Image, ImageDraw

    from ..atomic import atomic_write

    colors = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240)]
    names = names or [c["name"] for c in dataset.categories]
    model.eval()
    tiles = []
    for i in range(min(count, len(dataset))):
        image, target = dataset[i]
        with torch.no_grad():
            det = model([image])[0]
        pixels = (image.permute(1, 2, 0).clamp(0, 1) * 255).to(torch.uint8).numpy()  # (H, W, 3)
        tile = Image.fromarray(pixels).resize((pixels.shape[1] * scale, pixels.shape[0] * scale), Image.NEAREST)
        draw = ImageDraw.Draw(tile)
        for box in target["boxes"].tolist():
            draw.rectangle([v * scale for v in box], outline=(255, 255, 255), width=1)
        keep = det["scores"] >= score_thresh
        for box, score, label in zip(det["boxes"][keep].tolist(), det["scores"][keep].tolist(),
                                     det["labels"][keep].tolist()):
            color = colors[label % len(colors)]
            x1, y1, x2, y2 = (v * scale for v in box)
            draw.rectangle([x1, y1, x2, y2], outline=color, width=3)
            text = f"{names[label]} {score:.2f}"
            tx, ty = x1, max(0.0, y1 - 12)
            draw.rectangle(draw.textbbox((tx, ty), text), fill=color)
            draw.text((tx, ty), text, fill=(255, 255, 255))
        tiles.append(tile)
    columns = 4
    rows = -(-len(tiles) // columns)
    w, h = tiles[0].size
    sheet = Image.new("RGB", (columns * w + (columns - 1) * 4, rows * h + (rows - 1) * 4), (40, 40, 40))
    for i, tile in enumerate(tiles):
        sheet.paste(tile, ((i % columns) * (w + 4), (i // columns) * (h + 4)))
    with atomic_write(path, "wb") as f:
        sheet.save(f, format="PNG")


def time_to_ap50(metrics_path: Path, target: float) -> dict:
    """The first validation with AP50 >= target: {"iteration", "seconds" (since training started),
    "train_seconds" (the same without the time spent evaluating)}; {} if none reached it."""
    for line in metrics_path.read_text().splitlines():
        record = json.loads(line)
        if "val" in record and (record["val"].get("AP50") or 0.0) >= target:
            return {"iteration": record["iteration"], "seconds": record["time_s"], "train_seconds": record["train_s"]}
    return {}


def demo_config(name: str) -> Path:
    """A shipped config's file (retinanet/configs/<name>.yaml) or the YAML file `name`."""
    shipped = DEMO_CONFIG.parent / f"{name}.yaml"
    if shipped.is_file() and os.sep not in name:
        return shipped
    path = Path(name)
    if not path.is_file():
        names = ", ".join(sorted(p.stem for p in DEMO_CONFIG.parent.glob("*.yaml")))
        raise FileNotFoundError(f"--config {name}: neither a shipped config ({names}) nor a file")
    return path


def run(args) -> int:
    from ..atomic import atomic_write
    from ..checkpoint import load_model
    from ..config import load_config
    from ..data.coco import CocoDataset
    from ..data.loader import build_train_dataset
    from ..data.synthetic import make_shapes_dataset
    from ..engine import check_output_dir, headline_metrics, train

    started = time.perf_counter()
    config_file = demo_config(args.config)
    load_config(str(config_file), list(args.overrides))  # a typo fails now, not after the data is generated
    if args.minutes is not None and args.minutes <= 0:
        raise ValueError(f"--minutes must be positive, got {args.minutes:g}")
    output = Path(args.output) if args.output else _default_output()
    check_output_dir(output, resuming=False)
    device = choose_device(args.device)
    no_gpu = " (no GPU found)" if args.device == "auto" and device.type == "cpu" else ""
    print(f"device: {describe_device(device)}{no_gpu}; --device to choose")
    print(f"shapes dataset: {NUM_TRAIN} training, {NUM_VAL} validation images of {IMAGE_SIZE} px "
          f"(generated once, then reused) ...")
    paths = make_shapes_dataset(args.data_dir, num_train=NUM_TRAIN, num_val=NUM_VAL, image_size=IMAGE_SIZE,
                                seed=DATA_SEED)
    print(f"  in {paths.root} ({time.perf_counter() - started:.0f} s)")
    cfg = load_config(str(config_file), [f"data.train_json={paths.train_json}", f"data.train_images={paths.train_images}",
                                         f"data.val_json={paths.val_json}", f"data.val_images={paths.val_images}",
                                         *args.overrides])
    cfg.train.device = str(device)
    dataset = build_train_dataset(cfg)
    cfg.model.num_classes = dataset.num_classes
    if device.type == "cuda":
        seconds = time_iterations(cfg, dataset, device=str(device))
        timings = {str(device): seconds}
        print(f"seconds per training iteration on {device}: {seconds:.3f}")
    else:
        timings = choose_threads(cfg, dataset)
        cfg.train.threads = min(timings, key=timings.get)
        seconds = timings[cfg.train.threads]
        timed = [f"{t} thread(s) {s:.2f}" if math.isfinite(s) else f"{t} thread(s) over {3 * timings[1]:.1f} (stopped)"
                 for t, s in timings.items()]
        print(f"seconds per training iteration: {', '.join(timed)}; training with {cfg.train.threads}")
    expected = cfg.train.iterations * seconds / 60
    if args.minutes is not None or expected > MAX_MINUTES:
        minutes = args.minutes if args.minutes is not None else MAX_MINUTES
        planned = cfg.train.iterations
        fit_schedule(cfg, seconds, minutes)
        print(f"  {planned} iterations would take {expected:.1f} minutes: {cfg.train.iterations} iterations fit in "
              f"{minutes:g} minutes (LR steps, warmup and evaluations at the same fractions)")

    summary = train(cfg, str(output), progress=not args.no_progress)
    model, _, categories = load_model(summary["final"])
    val = CocoDataset(paths.val_json, paths.val_images, check_images="exists")
    draw_detections(model, val, output / "detections.png", names=[c["name"] for c in categories])
    metrics = summary["val"]
    _, shown = headline_metrics(metrics)  # AP, AP50, AP75 (detectors) or AR@10, AR@100, AR@1000 (proposals)
    proposals = "AP" not in metrics
    reached = {} if proposals else time_to_ap50(output / "metrics.jsonl", AP50_TARGET)
    tide = None
    if not proposals:  # where the held-out errors are: TIDE (retinanet/error_analysis.py)
        from ..error_analysis import analyze_errors, predict_results

        results = predict_results(summary["final"], paths.val_json, paths.val_images, device=str(device), workers=0)
        tide = analyze_errors(paths.val_json, results).tide
    total = time.perf_counter() - started
    report = {**{k: metrics[k] for k in shown}, "metrics": metrics,
              "iterations": cfg.train.iterations, "training_seconds": summary["seconds"], "total_seconds": total,
              **({} if proposals else {"ap50_target": AP50_TARGET, "ap50_target_reached": reached, "tide": tide}),
              "device": describe_device(device),
              "threads": cfg.train.threads if device.type == "cpu" else None,
              "seconds_per_iteration_timed": {str(k): v if math.isfinite(v) else None for k, v in timings.items()},
              "dataset": str(paths.root), "num_train": NUM_TRAIN, "num_val": NUM_VAL, "image_size": IMAGE_SIZE}
    with atomic_write(output / "demo_metrics.json", "w") as f:
        json.dump(report, f, indent=2)
    print()
    print(f"{ARCH_NAMES.get(cfg.model.arch, cfg.model.arch)} demo: {cfg.train.iterations} iterations on "
          f"{describe_device(device)}, {summary['seconds'] / 60:.1f} min training, {total / 60:.1f} min in all")
    print("  held-out COCO " + "   ".join(f"{k} {metrics[k]:.3f}" for k in shown if metrics[k] is not None)
          + ("   (segment proposal recall; box_AR... for their boxes in demo_metrics.json)" if proposals else ""))
    if reached:
        print(f"  AP50 >= {AP50_TARGET} first measured at iteration {reached['iteration']}, "
              f"{reached['seconds'] / 60:.1f} min into training ({reached['train_seconds'] / 60:.1f} min without "
              f"the evaluations)")
    if "per_category" in metrics:
        print("  per class: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics["per_category"].items() if v is not None))
    if tide is not None:
        from ..error_analysis import format_tide_line

        print("  " + format_tide_line(tide) + "   (`retinanet analyze errors` for the figures)")
    print(f"  results in {output}/: detections.png, loss_curve.png, demo_metrics.json, final.pt")
    return 0
