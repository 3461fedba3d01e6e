"""Every GPU check and benchmark in one run, and one summary table at the end.

    python benchmarks/gpu.py --quick                  # the main figures, under 8 minutes on one H100
    python benchmarks/gpu.py                          # more repeats, longer runs, a compiled training step
    python benchmarks/gpu.py --device cpu --quick     # a dry run without a GPU: small sizes, few iterations
    python benchmarks/gpu.py --only inference,train --json gpu.json

Items (`--only`, default all, in this order):
  tests        pytest tests/test_cuda.py (sync-free step, fp16/bf16, NMS, Predictor, DDP, compile): pass/fail
  inference    batch 1, 800x1067 image: our fast path (folded BatchNorm, channels_last) in fp32, bf16,
               fp16 against torchvision's retinanet_resnet50_fpn in fp32 with the same weights (when
               torchvision imports; else our plain fp32), and how far their detections agree
  batch        the same at batch 8, ms per image
  postprocess  post-processing alone (163k anchors x 91 classes, ~5000 scores above 0.05), ours vs torchvision's
  train        a training step (forward, losses, backward, SGD) of batch 16 at 800x800: ours bf16
               channels_last (and fp32) against torchvision fp32, images/s; peak CUDA memory per training
               image; host synchronizations in one step of ours
  e2e          `retinanet train` (retinanet.engine.train) on JPEG files written to a temp folder, through
               the real loader (uint8 pinned batches, resized on the GPU), bf16 channels_last: images/s
  loader       the training loader alone on the same files: images/s, GPU path (uint8) and float path
  syncs        host synchronizations per step of the engine (tiny model, 2 micro-batches per step)
  frcnn        FPN Faster R-CNN against torchvision's fasterrcnn_resnet50_fpn with the same weights
               (benchmarks/bench_faster_rcnn.py in a subprocess): inference at 800x1066 and a training
               step of 2 images of 512 px, each configuration's ms and ratio; needs torchvision
With `--device cpu` the sizes shrink (inference at 256 px, batch 2, training steps of 2 images of
256 px, a few iterations) so that a 2-core machine finishes in minutes; the figures then only show
that every item runs. Models have random weights in torchvision's R50-FPN layout (benchmarks/common.py).
A failing item is a row of the table ("FAILED: ...", the traceback on stderr); the others go on.
The exit code is 1 if an item failed or tests/test_cuda.py did not pass.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import (ROOT, calibrated_model, compare_detections, cpu_model, load_average,  # noqa: E402
                    set_candidate_load, time_interleaved, torchvision_layout_config, torchvision_module,
                    torchvision_postprocess, torchvision_retinanet)

ITEMS = ["tests", "inference", "batch", "postprocess", "train", "e2e", "loader", "syncs", "frcnn"]


@dataclass
class Profile:
    """Sizes and counts of one run."""

    infer: tuple  # (min_size, max_size, (h, w) of the test image)
    many: int  # the inference batch of the `batch` item
    train_batch: int
    train_size: int
    repeats: int  # timed rounds per configuration
    warmup: int
    e2e_images: int  # JPEG files written
    e2e_shape: tuple  # (h, w) of each file
    e2e_min_size: int  # the model's shorter side (the loader resizes to it)
    e2e_batch: int
    e2e_iterations: int
    loader_batches: int
    workers: int  # loader worker processes


def profile(device: str, quick: bool) -> Profile:
    workers = max(1, min(8, (os.cpu_count() or 2) - 1))
    if device.startswith("cuda"):
        return Profile(infer=(800, 1333, (800, 1067)), many=8, train_batch=16, train_size=800,
                       repeats=5 if quick else 10, warmup=2, e2e_images=128 if quick else 256, e2e_shape=(480, 640),
                       e2e_min_size=800, e2e_batch=16, e2e_iterations=30 if quick else 90,
                       loader_batches=20 if quick else 50, workers=workers)
    return Profile(infer=(256, 427, (256, 341)), many=2, train_batch=2, train_size=256, repeats=2 if quick else 3,
                   warmup=1, e2e_images=16, e2e_shape=(120, 160), e2e_min_size=128, e2e_batch=2,
                   e2e_iterations=4 if quick else 8, loader_batches=4, workers=min(2, workers))


@dataclass
class Row:
    item: str
    config: str
    value: str
    unit: str = ""
    versus: str = ""  # against the item's baseline
    note: str = ""
    failed: bool = False


# ---------------------------------------------------------------------------------------------- environment


def environment(device: str) -> dict:
    """The card, driver and library versions (and the CPU, which feeds the GPU)."""
    tv = torchvision_module()
    env = {"python": platform.python_version(), "torch": torch.__version__,
           "torchvision": tv.__version__ if tv is not None else "absent (baselines: our plain fp32)",
           "cpu": f"{cpu_model()}, {os.cpu_count()} cores", "load average": load_average()}
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        env["gpu"] = f"{props.name}, {props.total_memory / 2 ** 30:.0f} GiB, {props.multi_processor_count} SMs"
        try:
            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=30).stdout.split()[0]
        except (OSError, IndexError, subprocess.SubprocessError):
            env["driver"] = "unknown (nvidia-smi did not answer)"
        env["cuda (torch build)"] = torch.version.cuda
        env["cudnn"] = str(torch.backends.cudnn.version())
        env["settings"] = (f"cudnn.benchmark {torch.backends.cudnn.benchmark}, cudnn TF32 "
                           f"{torch.backends.cudnn.allow_tf32}, matmul TF32 {torch.backends.cuda.matmul.allow_tf32}")
    else:
        env["gpu"] = "none: --device cpu (a dry run; figures are not GPU figures)"
        env["settings"] = f"torch threads {torch.get_num_threads()}"
    return env


# ---------------------------------------------------------------------------------------------- items


def item_tests(args, prof: Profile, shared: dict) -> list:
    """tests/test_cuda.py in a subprocess: its summary line."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_cuda.py"]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    summary = next((line.strip("= ") for line in reversed(lines) if " in " in line and (
        "passed" in line or "failed" in line or "skipped" in line or "error" in line)), f"exit code {proc.returncode}")
    failed = [line.split("::", 1)[-1].split(" - ")[0] for line in lines if line.startswith(("FAILED", "ERROR"))]
    if proc.returncode != 0 and not failed:
        print("\n".join(lines[-40:]), file=sys.stderr)
    note = ("failed: " + ", ".join(failed)) if failed else ("no CUDA: every test skipped" if "skipped" in summary
                                                            and "passed" not in summary else "")
    return [Row("tests", "pytest tests/test_cuda.py", summary.split(" in ")[0], "", "", note[:200],
                failed=proc.returncode != 0)]


def _variants(args, prof: Profile, shared: dict) -> tuple:
    """The inference configurations (built once for `inference`, `batch`, `postprocess`) and the image."""
    if "variants" not in shared:
        from bench_inference import build_variants

        min_size, max_size, (h, w) = prof.infer
        torch.manual_seed(1)
        image = torch.rand(3, h, w)
        ns = argparse.Namespace(device=args.device, candidates=5000, quick=True, compile=False,
                                dtypes=["fp32", "bf16", "fp16"] if args.device.startswith("cuda") else ["fp32", "bf16"])
        shared["variants"] = (build_variants(ns, min_size, max_size, image), image.to(args.device))
    return shared["variants"]


def _time_variants(args, prof: Profile, variants: list, images: list) -> dict:
    def call(v):
        def fn():
            with v.context():
                v.model(images)
        return fn

    return time_interleaved({v.name: call(v) for v in variants}, repeats=prof.repeats, warmup=prof.warmup,
                            device=args.device)


def _timing_rows(item: str, times: dict, per: int, unit: str) -> list:
    base_name = next(iter(times))
    base = statistics.median(times[base_name])
    rows = []
    for name, samples in times.items():
        med = statistics.median(samples)
        rows.append(Row(item, name + (" (baseline)" if name == base_name else ""), f"{1000 * med / per:.1f}", unit,
                        f"{base / med:.2f}x", f"range {1000 * min(samples) / per:.1f}-{1000 * max(samples) / per:.1f}"))
    return rows


def item_inference(args, prof: Profile, shared: dict) -> list:
    variants, image = _variants(args, prof, shared)
    h, w = prof.infer[2]
    rows = _timing_rows("inference", _time_variants(args, prof, variants, [image]), 1, f"ms ({h}x{w}, b1)")
    results = {}
    for v in variants:
        with v.context():
            results[v.name] = v.model([image])
    base = variants[0].name
    for v in variants[1:]:
        if v.name.startswith("ours"):
            rel = 1e-3 if v.dtype is None else 5e-2  # reduced precision moves scores, boxes and the ranking
            c = compare_detections(results[v.name], results[base], rel=rel)
            rows.append(Row("inference", f"detections: {v.name.split(' (')[0]}", f"{c['matched']}/{c['total']}",
                            f"same label, box within {rel:g}", f"vs {base}",
                            f"worst box difference {c['worst_rel']:.1e} relative; {c['count_ours']} detections"))
    return rows


def item_batch(args, prof: Profile, shared: dict) -> list:
    variants, image = _variants(args, prof, shared)
    chosen = [v for v in variants if v.name == variants[0].name or v.name.startswith("ours fast")]
    times = _time_variants(args, prof, chosen, [image] * prof.many)
    return _timing_rows("batch", times, prof.many, f"ms/image (b{prof.many})")


def item_postprocess(args, prof: Profile, shared: dict) -> list:
    from retinanet.modeling.detector import ImageBatch

    variants, image = _variants(args, prof, shared)
    model = next(v.model for v in variants if v.name == "ours plain fp32")  # its candidate load is set
    with torch.no_grad():
        pre = model.preprocess([image])
        cls_logits, box_deltas, anchors, level_sizes = model.forward_features(pre.tensor)
    above = int((torch.sigmoid(cls_logits) > model.score_thresh).sum())
    split = anchors.split(level_sizes)
    fns = {}
    if torchvision_module() is not None:
        net = next(v.model for v in variants if v.name == "torchvision fp32")
        fns["torchvision postprocess_detections"] = lambda: torchvision_postprocess(
            net, cls_logits, box_deltas, anchors, level_sizes, pre.image_sizes)
    fns["ours, vectorized"] = lambda: model.postprocess((cls_logits, box_deltas, *split),
                                                        ImageBatch(None, pre.image_sizes, pre.image_sizes))
    with torch.no_grad():
        times = time_interleaved(fns, repeats=prof.repeats * 2, warmup=prof.warmup, device=args.device)
    rows = _timing_rows("postprocess", times, 1, "ms")
    rows[-1].note += f"; {cls_logits.shape[1]} anchors x {cls_logits.shape[2]} classes, {above} scores > 0.05"
    return rows


def item_train(args, prof: Profile, shared: dict) -> list:
    from bench_train import make_step

    from retinanet.syncs import SyncRecorder

    cuda = args.device.startswith("cuda")
    size, count = prof.train_size, prof.train_batch
    state = calibrated_model(torchvision_layout_config(min_size=size, max_size=size)).state_dict()
    names = ["torchvision fp32"] if torchvision_module() is not None else ["ours fp32"]
    names += ["ours fp32 channels_last", "ours bf16 channels_last"]
    if not args.quick and cuda:
        names.append("ours bf16 channels_last compiled")
    steps = {name: make_step(name, state, args.device, count=count, size=size)[0] for name in names}
    times = time_interleaved(steps, repeats=prof.repeats, warmup=prof.warmup, device=args.device)
    rows = []
    base = statistics.median(times[names[0]])
    for name in names:
        med = statistics.median(times[name])
        rows.append(Row("train", name + (" (baseline)" if name == names[0] else ""), f"{count / med:.3g}",
                        f"images/s (b{count}, {size}x{size})", f"{base / med:.2f}x",
                        f"step {1000 * med:.0f} ms, range {1000 * min(times[name]):.0f}-{1000 * max(times[name]):.0f}"))
    with SyncRecorder() as syncs:  # one step of ours: model forward/backward, SGD, and the benchmark's loss read
        steps["ours bf16 channels_last"]()
    rows.append(Row("train", "host syncs in one step of ours", str(len(syncs.records)), "syncs", "",
                    "; ".join(f"{op} at {where.rsplit('/', 1)[-1]}" for op, where in syncs.records[:4])
                    + " (1 expected on a GPU: bench_train.py reading the loss; on the CPU the box loss's"
                    " nonzero, free there, adds 1)"))
    del steps
    gc.collect()
    if cuda:
        for name in names:
            if name.endswith("compiled"):
                continue
            torch.cuda.empty_cache()
            step, _ = make_step(name, state, args.device, count=count, size=size)
            step()  # the optimizer state exists from here on
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            step()
            peak = torch.cuda.max_memory_allocated()
            del step
            rows.append(Row("train", f"peak CUDA memory: {name}", f"{peak / count / 2 ** 30:.2f}", "GiB/image",
                            "", f"{peak / 2 ** 30:.1f} GiB for the batch of {count}, weights and momentum included"))
    else:
        rows.append(Row("train", "peak CUDA memory", "n/a", "", "", "CPU run"))
    return rows


def write_jpeg_dataset(folder: Path, count: int, shape: tuple, seed: int = 0) -> tuple:
    """`count` JPEG files (smooth background, 1-8 filled rectangles, mild noise) and their COCO JSON."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True)
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w]
    images, annotations = [], []
    for i in range(count):
        img = rng.uniform(40, 215, 3) + yy[..., None] * rng.uniform(-0.15, 0.15, 3) + xx[..., None] * rng.uniform(
            -0.15, 0.15, 3)
        for _ in range(int(rng.integers(1, 9))):
            bw, bh = int(rng.integers(w // 16, w // 2)), int(rng.integers(h // 16, h // 2))
            x, y = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
            img[y:y + bh, x:x + bw] = rng.uniform(0, 255, 3)
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": int(rng.integers(1, 5)),
                                "bbox": [x, y, bw, bh], "area": bw * bh, "iscrowd": 0})
        img = np.clip(img + rng.normal(0, 4, img.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(folder / "images" / f"{i:05d}.jpg", quality=90)
        images.append({"id": i + 1, "file_name": f"{i:05d}.jpg", "height": h, "width": w})
    categories = [{"id": c, "name": f"class{c}"} for c in range(1, 5)]
    json_path = folder / "train.json"
    json_path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return json_path, folder / "images"


def _jpeg_config(args, prof: Profile, shared: dict):
    """The e2e/loader config on the JPEG files (written once per run)."""
    if "jpegs" not in shared:
        folder = Path(tempfile.mkdtemp(prefix="retinanet-gpu-bench-"))
        shared["tmp"] = folder
        shared["jpegs"] = write_jpeg_dataset(folder / "data", prof.e2e_images, prof.e2e_shape)
    json_path, images = shared["jpegs"]
    cfg = torchvision_layout_config(num_classes=4, min_size=prof.e2e_min_size, max_size=prof.e2e_min_size * 5 // 3)
    d, t = cfg.data, cfg.train
    d.train_json, d.train_images = str(json_path), str(images)
    d.batch_size, d.num_workers = prof.e2e_batch, prof.workers
    t.device, t.lr, t.warmup_iters = args.device, 0.001, 5
    t.channels_last = True
    t.amp = "bf16" if args.device.startswith("cuda") else "none"  # bf16 on a CPU without AMX is slower
    return cfg


def item_e2e(args, prof: Profile, shared: dict) -> list:
    from retinanet.engine import train

    cfg = _jpeg_config(args, prof, shared)
    t = cfg.train
    t.iterations = prof.e2e_iterations
    t.log_every = max(1, prof.e2e_iterations // 3)
    t.checkpoint_every = prof.e2e_iterations
    out = shared["tmp"] / f"run-{time.time_ns()}"
    start = time.perf_counter()
    train(cfg, str(out), progress=False)
    wall = time.perf_counter() - start
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "loss" in line]
    speeds = [r["images_per_s"] for r in logged]
    steady = speeds[1:] or speeds  # the first window holds the warm-up (and the focal loss's compilation)
    h, w = prof.e2e_shape
    return [Row("e2e", f"retinanet train, {t.amp} channels_last, {prof.workers} workers",
                f"{statistics.median(steady):.3g}", f"images/s (b{prof.e2e_batch})", "",
                f"{h}x{w} JPEGs -> shorter side {prof.e2e_min_size}; windows of {t.log_every} iterations: "
                + ", ".join(f"{s:.1f}" for s in speeds) + f"; {wall:.0f} s in all with start-up"),
            Row("e2e", "final loss", f"{logged[-1]['loss']:.3f}", "", "", f"iteration {logged[-1]['iteration']}")]


def item_loader(args, prof: Profile, shared: dict) -> list:
    from retinanet.data.loader import build_train_dataset, build_train_loader

    cfg = _jpeg_config(args, prof, shared)
    dataset = build_train_dataset(cfg)
    cuda = args.device.startswith("cuda")
    rows = []
    for label, pending in (("uint8, pinned (the GPU path)" if cuda else "uint8 (the GPU path)", True),
                           ("float32, resized on the CPU (the CPU path)", False)):
        batches = iter(build_train_loader(cfg, dataset, seed=0, pin_memory=cuda and pending, pending_images=pending))
        next(batches)  # worker start-up
        start, count = time.perf_counter(), 0
        for _ in range(prof.loader_batches):
            images, _ = next(batches)
            count += len(images)
        rate = count / (time.perf_counter() - start)
        rows.append(Row("loader", label, f"{rate:.0f}", "images/s", "",
                        f"{prof.workers} workers, {prof.loader_batches} batches of {prof.e2e_batch}"))
        del batches
    return rows


def item_syncs(args, prof: Profile, shared: dict) -> list:
    """Syncs the engine adds per step: a run of 4 iterations minus a run of 2, tiny model."""
    from retinanet.config import Config
    from retinanet.data.synthetic import make_shapes_dataset
    from retinanet.engine import train
    from retinanet.syncs import SyncRecorder

    folder = Path(tempfile.mkdtemp(prefix="retinanet-gpu-syncs-"))
    shapes = make_shapes_dataset(str(folder / "data"), num_train=8, num_val=2, image_size=64, seed=0)
    counts = []
    for iterations in (2, 4):
        cfg = Config()
        m, d, t = cfg.model, cfg.data, cfg.train
        m.num_classes, m.backbone, m.backbone_width, m.backbone_norm, m.frozen_stages = 4, "resnet18", 8, "gn", 0
        m.fpn_channels = m.head_channels = 16
        m.head_convs, m.min_level, m.max_level, m.anchor_sizes, m.min_size, m.max_size = 1, 3, 6, [16.0, 32.0, 64.0,
                                                                                                  128.0], 64, 64
        d.train_json, d.train_images = str(shapes.train_json), str(shapes.train_images)
        d.batch_size, d.num_workers, d.aspect_grouping = 4, 0, False
        t.iterations, t.accumulate, t.device, t.checkpoint_every, t.log_every = iterations, 2, args.device, 100, 100
        with SyncRecorder() as syncs:
            train(cfg, str(folder / f"run{iterations}"), progress=False)
        counts.append([(op, where.rsplit("/", 1)[-1]) for op, where in syncs.records if "/retinanet/data/" not in where])
    added = {}
    for op, where in counts[1]:
        added[(op, where)] = added.get((op, where), 0) + 1
    for key in counts[0]:
        added[key] -= 1
    per_step = {key: n / 2 for key, n in added.items() if n}
    note = "; ".join(f"{op} at {where}: {n:g}" for (op, where), n in per_step.items())
    if not args.device.startswith("cuda"):
        note += " (on the CPU the box loss picks the foreground with nonzero, free there; a GPU takes the mask path)"
    return [Row("syncs", "engine, per optimizer step (2 micro-batches)", f"{sum(per_step.values()):g}", "syncs", "",
                note)]


def item_frcnn(args, prof: Profile, shared: dict) -> list:
    """benchmarks/bench_faster_rcnn.py on this device: one row per timed configuration."""
    cmd = [sys.executable, str(HERE / "bench_faster_rcnn.py"), "--device", args.device] + (
        ["--quick"] if args.quick else [])
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        if "No module named 'torchvision'" in out:
            return [Row("frcnn", "-", "skipped", "", "", "torchvision is not importable")]
        print(out[-4000:], file=sys.stderr)
        return [Row("frcnn", "-", "FAILED", "", "", f"exit code {proc.returncode}", failed=True)]
    return parse_bench_rows("frcnn", out)


def parse_bench_rows(item: str, text: str) -> list:
    """Rows from a benchmark's report: a title line, then "  <configuration>  <ms> ms  <ratio>x" lines
    (the first configuration the baseline); a "detections: ..." line becomes the note of the first row."""
    import re

    rows, title, note = [], "", ""
    for line in text.splitlines():
        timed = re.match(r"^\s{2}(\S.*?)\s+([\d.]+) ms\s+([\d.]+)x\s*$", line)
        if timed:
            name, ms, ratio = timed.groups()
            rows.append(Row(item, f"{title}: {name}" if title else name, ms, "ms", f"{ratio}x"))
        elif line.startswith("detections:"):
            note = line
        elif line.strip() and not line.startswith(" "):
            title = line.split(",")[0].strip()
    if rows and note:
        rows[0].note = note[:200]
    return rows or [Row(item, "-", "FAILED", "", "", "no timings in the output", failed=True)]


RUNNERS = {"tests": item_tests, "inference": item_inference, "batch": item_batch, "postprocess": item_postprocess,
           "train": item_train, "e2e": item_e2e, "loader": item_loader, "syncs": item_syncs, "frcnn": item_frcnn}


# ---------------------------------------------------------------------------------------------- main


def print_table(rows: list) -> None:
    headers = ("item", "configuration", "value", "unit", "vs baseline", "note")
    cells = [headers] + [(r.item, r.config, r.value, r.unit, r.versus, r.note) for r in rows]
    widths = [max(len(c[i]) for c in cells[:]) if i < 5 else 0 for i in range(6)]
    widths = [min(w, 60) for w in widths]
    for k, c in enumerate(cells):
        print("  ".join(f"{c[i][:widths[i]]:<{widths[i]}}" if i < 5 else c[i] for i in range(6)).rstrip())
        if k == 0:
            print("  ".join("-" * w for w in widths[:5]) + "  " + "-" * 4)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu (a dry run at small sizes)")
    parser.add_argument("--quick", action="store_true", help="the main figures: fewer repeats, shorter runs")
    parser.add_argument("--only", default=",".join(ITEMS), help=f"comma-separated items (default: {','.join(ITEMS)})")
    parser.add_argument("--json", help="also write the environment and the rows to this file")
    args = parser.parse_args(argv)
    items = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in items if s not in ITEMS]
    if unknown:
        parser.error(f"unknown item(s) {', '.join(unknown)}; choose from {', '.join(ITEMS)}")
    if args.device.startswith("cuda"):
        if not torch.cuda.is_available():
            parser.error("--device cuda, but torch sees no CUDA GPU (use --device cpu for a dry run)")
        torch.cuda.set_device(torch.device(args.device))
        torch.backends.cudnn.benchmark = True  # fixed sizes here; the same setting for torchvision and ours
    prof = profile(args.device, args.quick)
    env = environment(args.device)
    print(f"retinanet GPU benchmark, {time.strftime('%Y-%m-%d %H:%M')}: python benchmarks/gpu.py "
          f"{' '.join(argv if argv is not None else sys.argv[1:])}")
    for key, value in env.items():
        print(f"  {key}: {value}")
    print(f"  profile: {asdict(prof)}")
    rows, shared, started = [], {}, time.perf_counter()
    for name in items:
        start = time.perf_counter()
        print(f"[{name}] running ...", flush=True)
        try:
            new = RUNNERS[name](args, prof, shared)
        except Exception as e:  # reported in the table; the other items still run
            traceback.print_exc()
            new = [Row(name, "-", "FAILED", "", "", f"{type(e).__name__}: {e}"[:300].replace("\n", " "), failed=True)]
        rows += new
        print(f"[{name}] {time.perf_counter() - start:.0f} s", flush=True)
        gc.collect()
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    if "tmp" in shared:
        import shutil

        shutil.rmtree(shared["tmp"], ignore_errors=True)
    print(f"\nSummary ({args.device}{', quick' if args.quick else ''}; {time.perf_counter() - started:.0f} s; "
          f"load average now {load_average()}):\n")
    print_table(rows)
    if args.json:
        Path(args.json).write_text(json.dumps({"environment": env, "profile": asdict(prof),
                                               "rows": [asdict(r) for r in rows]}, indent=1))
    return 1 if any(r.failed for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
