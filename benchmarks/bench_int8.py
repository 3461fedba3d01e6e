"""INT8 ONNX against fp32 ONNX and our PyTorch fast path: COCO AP and latency on the same images.

    PYTHONPATH=$PWD python benchmarks/bench_int8.py [--checkpoint /work/ckpt/demo/final.pt] \
        [--data ~/.cache/retinanet/shapes-3d73013508be] [--num-calibration 200] [--latency-images 100] \
        [--variants default heads-float ...] [--workdir /tmp/bench_int8] [--reuse-export]

1. `export_onnx` writes the checkpoint's network (dynamo exporter, as `retinanet export`);
2. `quantize_onnx` makes one INT8 file per variant, calibrated on the first N training images (train.json);
3. AP: every validation image (val.json) through `OnnxDetector` (fp32 and each INT8 file) and `Predictor`
   (PyTorch), scored by retinanet.evaluate.evaluate_coco;
4. latency: one image per call, end to end (uint8 array -> Detections: preprocess, network, postprocess),
   fp32 ONNX, INT8 ONNX and `Predictor` on `optimize_for_inference(model)` (folded BatchNorm, channels_last),
   interleaved image by image, with 1 thread and with every core; medians.
Prints the machine (CPU, VNNI or not, load average) and the tables.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import cpu_model, load_average  # noqa: E402  (common puts the repository on sys.path)
from retinanet.checkpoint import load_model  # noqa: E402
from retinanet.data.images import load_image  # noqa: E402
from retinanet.evaluate import evaluate_coco  # noqa: E402
from retinanet.export import OnnxDetector, export_onnx  # noqa: E402
from retinanet.optimize import optimize_for_inference  # noqa: E402
from retinanet.predict import Predictor  # noqa: E402
from retinanet.quantize import quantize_onnx  # noqa: E402

HEADS = ["*cls_subnet.predictor*", "*box_subnet.predictor*"]
# name -> quantize_onnx keyword arguments (on top of the defaults: minmax, per-channel, reduce_range, nothing excluded)
VARIANTS = {
    "default": {},
    "heads-float": {"exclude": HEADS},
    "cls-head-float": {"exclude": HEADS[:1]},
    "full-range": {"reduce_range": False},
    "per-tensor": {"per_channel": False},
    "entropy": {"calibration": "entropy"},
    "percentile": {"calibration": "percentile"},
}


def vnni_flags() -> str:
    """The CPU's VNNI flags (avx512_vnni, avx_vnni), or 'none'."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return "unknown"
    found = [f for f in flags.split() if "vnni" in f]
    return " ".join(found) if found else "none"


def onnx_session(path: str, threads: int):
    """An onnxruntime CPU session on `threads` threads."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def onnx_detector(path: str, threads: int) -> OnnxDetector:
    """`OnnxDetector` whose onnxruntime session runs on `threads` threads."""
    det = OnnxDetector(path)
    det.session = onnx_session(path, threads)
    return det


def coco_ap(predictor, images: list, gt: dict) -> float:
    results = []
    for info, array in images:
        results += predictor(array).to_coco(info["id"])
    return evaluate_coco(gt, results)["AP"]


def end_to_end_ap(model, cfg, categories, work: Path, data: Path, images: list, gt: dict, num_calibration: int,
                  latency_images: int, threads_list: list):
    """The end-to-end graph (`export_end_to_end`) fp32 and INT8 (calibrated on raw images), run by onnxruntime
    alone: COCO AP of each, and the median time of one `session.run` per image (interleaved)."""
    import onnxruntime

    from retinanet.export import export_end_to_end

    paths = {"fp32": str(work / "e2e.onnx"), "INT8 default": str(work / "e2e.int8.onnx")}
    start = time.perf_counter()
    export_end_to_end(model, cfg, categories, paths["fp32"])
    quantize_onnx(paths["fp32"], data / "train.json", paths["INT8 default"], num_images=num_calibration)
    print(f"\nend-to-end graph: exported and quantized in {time.perf_counter() - start:.0f} s")
    aps = {}
    for name, path in paths.items():
        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        results = []
        for info, array in images:
            boxes, scores, labels = session.run(None, {"image": array})
            results += [{"image_id": info["id"], "category_id": int(c), "score": float(s),
                         "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])]}
                        for b, s, c in zip(boxes.astype(np.float64), scores, labels)]
        aps[name] = evaluate_coco(gt, results)["AP"]
        print(f"  {'end-to-end ' + name + ' (onnxruntime alone)':<44} {aps[name]:>7.4f} "
              f"{aps[name] - aps['fp32']:>+13.4f} (vs end-to-end fp32)")
    arrays = [a for _, a in images[:latency_images]]
    for threads in threads_list if arrays else []:
        sessions = {name: onnx_session(path, threads) for name, path in paths.items()}
        times = {name: [] for name in paths}
        for session in sessions.values():  # warm up
            for a in arrays[:5]:
                session.run(None, {"image": a})
        for a in arrays:
            for name, session in sessions.items():
                start = time.perf_counter()
                session.run(None, {"image": a})
                times[name].append(time.perf_counter() - start)
        med = {name: 1000 * statistics.median(t) for name, t in times.items()}
        print(f"  end-to-end, {threads} thread(s), median of {len(arrays)} images: fp32 {med['fp32']:.2f} ms, "
              f"INT8 {med['INT8 default']:.2f} ms ({med['fp32'] / med['INT8 default']:.2f}x; "
              f"load average {load_average()})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default="/work/ckpt/demo/final.pt")
    p.add_argument("--data", default=os.path.expanduser("~/.cache/retinanet/shapes-3d73013508be"),
                   help="a folder with train.json, train/, val.json, val/")
    p.add_argument("--num-calibration", type=int, default=200)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--latency-variants", nargs="+", default=["default"], choices=list(VARIANTS),
                   help="the INT8 variants to time")
    p.add_argument("--latency-images", type=int, default=100, help="validation images timed (0: skip latency)")
    p.add_argument("--threads", type=int, nargs="+", default=[1, os.cpu_count()])
    p.add_argument("--workdir", default="/tmp/bench_int8")
    p.add_argument("--reuse-export", action="store_true", help="use the workdir's model.onnx if it is there")
    p.add_argument("--end-to-end", action="store_true",
                   help="also the end-to-end graph (image in, detections out): fp32 vs INT8 (default settings) AP")
    args = p.parse_args()

    data, work = Path(args.data), Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(args.threads))
    print(f"cpu: {cpu_model()}, {os.cpu_count()} cores; VNNI: {vnni_flags()}; "
          f"load average at start: {load_average()}")
    import onnxruntime

    print(f"onnxruntime {onnxruntime.__version__}, torch {torch.__version__}; checkpoint {args.checkpoint}")

    model, cfg, categories = load_model(args.checkpoint, device="cpu")
    fp32 = str(work / "model.onnx")
    if not (args.reuse_export and Path(fp32).is_file()):
        start = time.perf_counter()
        export_onnx(model, cfg, categories, fp32)
        print(f"exported in {time.perf_counter() - start:.0f} s")
    files = {"fp32": fp32}
    for name in args.variants:
        files[name] = str(work / f"model.int8.{name}.onnx")
        start = time.perf_counter()
        report = quantize_onnx(fp32, data / "train.json", files[name], num_images=args.num_calibration,
                               **VARIANTS[name])
        print(f"quantized '{name}' in {time.perf_counter() - start:.0f} s: {len(report.quantized)} int8 layers, "
              f"kept float: {report.kept_float or 'none'}")

    gt = json.loads((data / "val.json").read_text())
    images = [(info, load_image(data / "val" / info["file_name"])) for info in gt["images"]]
    print(f"\nCOCO AP on {len(images)} validation images ({cfg.model.min_size} px), "
          f"calibration on the first {args.num_calibration} training images")
    print(f"  {'model':<44} {'AP':>7} {'vs fp32 ONNX':>13}")
    fast = optimize_for_inference(copy.deepcopy(model))
    torch_ap = coco_ap(Predictor(fast, categories, device="cpu"), images, gt)
    aps = {name: coco_ap(OnnxDetector(path), images, gt) for name, path in files.items()}
    print(f"  {'PyTorch (Predictor, fast path)':<44} {torch_ap:>7.4f} {torch_ap - aps['fp32']:>+13.4f}")
    for name, ap in aps.items():
        label = "fp32 ONNX" if name == "fp32" else f"INT8 ONNX {name} {VARIANTS[name] or ''}"
        print(f"  {label:<44} {ap:>7.4f} {ap - aps['fp32']:>+13.4f}")

    if args.end_to_end:
        end_to_end_ap(model, cfg, categories, work, data, images, gt, args.num_calibration, args.latency_images,
                      args.threads)

    if args.latency_images:
        arrays = [a for _, a in images[:args.latency_images]]
        for threads in args.threads:
            torch.set_num_threads(threads)
            runners = {"PyTorch fast path (Predictor)": Predictor(fast, categories, device="cpu"),
                       "fp32 ONNX (OnnxDetector)": onnx_detector(fp32, threads)}
            for name in args.latency_variants:
                runners[f"INT8 ONNX {name}"] = onnx_detector(files[name], threads)
            times = {name: [] for name in runners}
            for run in runners.values():  # warm up
                for a in arrays[:5]:
                    run(a)
            with torch.inference_mode():
                for a in arrays:  # interleaved image by image: a load change hits every runner alike
                    for name, run in runners.items():
                        start = time.perf_counter()
                        run(a)
                        times[name].append(time.perf_counter() - start)
            base = statistics.median(times["fp32 ONNX (OnnxDetector)"])
            print(f"\nlatency, {threads} thread(s), one {arrays[0].shape[0]}x{arrays[0].shape[1]} image per call, "
                  f"{len(arrays)} images (load average {load_average()})")
            print(f"  {'runner':<44} {'median ms':>10} {'p10-p90 ms':>13} {'fp32 ONNX / this':>17}")
            for name, samples in times.items():
                q = np.percentile(samples, [10, 90]) * 1000
                med = statistics.median(samples)
                print(f"  {name:<44} {1000 * med:>10.2f} {q[0]:>6.2f}-{q[1]:<6.2f} {base / med:>16.2f}x")
    print(f"\nload average at end: {load_average()}")


if __name__ == "__main__":
    main()
