"""`retinanet quantize`: an exported ONNX file -> INT8 (static, QDQ), calibrated on the user's images."""

from __future__ import annotations

import argparse
import sys
import time


def register(sub) -> None:
    from ..quantize import CALIBRATION_METHODS, DEFAULT_EXCLUDE

    p = sub.add_parser("quantize", help="quantize an exported ONNX file to INT8 (onnxruntime static quantization, "
                                        "QDQ, per-channel weights), calibrated on your images",
                       description="Static INT8 quantization of a file written by `retinanet export` with "
                                   "onnxruntime's tools: convolutions get int8 weights (per channel) and uint8 "
                                   "activations whose ranges are measured on --num-calibration of your images, "
                                   "preprocessed as the model does at inference. Anchors, reshapes and (in an "
                                   "end-to-end graph) resizing, decoding and NMS stay float. The config and "
                                   "categories are kept: OnnxDetector and `retinanet predict`-style code run the "
                                   "INT8 file as the fp32 one. See retinanet/quantize.py and BENCHMARKS.md (INT8).")
    p.add_argument("--onnx", required=True, help="the fp32 ONNX file written by `retinanet export`")
    p.add_argument("--calibration-images", required=True, metavar="DIR_OR_JSON",
                   help="a folder of images (the first N by name) or a COCO JSON (the first N of its images); "
                        "use training images, not the ones you evaluate on")
    p.add_argument("--image-dir", metavar="D",
                   help="with a COCO JSON: its image folder (default: the folder next to it named like it, "
                        "train.json -> train/, else the JSON's folder)")
    p.add_argument("--output", required=True, help="where to write the INT8 .onnx file")
    p.add_argument("--num-calibration", type=int, default=200, metavar="N",
                   help="how many images to calibrate on (default 200)")
    p.add_argument("--per-channel", action=argparse.BooleanOptionalAction, default=True,
                   help="one weight scale per output channel (default; --no-per-channel: one per tensor)")
    p.add_argument("--calibration", default="minmax", choices=list(CALIBRATION_METHODS),
                   help="how activation ranges are chosen: minmax (observed range, default), entropy or "
                        "percentile (clipped)")
    p.add_argument("--reduce-range", action=argparse.BooleanOptionalAction, default=True,
                   help="7-bit weights (default: avoids the 16-bit saturation of CPUs without VNNI; "
                        "--no-reduce-range on CPUs with VNNI)")
    p.add_argument("--exclude", nargs="*", default=list(DEFAULT_EXCLUDE), metavar="PATTERN",
                   help="weighted layers to keep float: glob patterns on their weights' names, e.g. "
                        "'*predictor*' (the heads' last convolutions)"
                        + (f" (default: {' '.join(DEFAULT_EXCLUDE)})" if DEFAULT_EXCLUDE else " (default: none)"))
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from ..quantize import quantize_onnx
    from . import check_output_path

    check_output_path(args.output, "--output")
    start = time.perf_counter()
    report = quantize_onnx(args.onnx, args.calibration_images, args.output, num_images=args.num_calibration,
                           image_dir=args.image_dir, per_channel=args.per_channel, calibration=args.calibration,
                           reduce_range=args.reduce_range, exclude=args.exclude)
    size_mb = Path(args.output).stat().st_size / 2 ** 20
    kept = f"; kept float: {', '.join(report.kept_float)}" if report.kept_float else ""
    print(f"wrote {args.output} ({size_mb:.1f} MiB) in {time.perf_counter() - start:.1f} s: "
          f"{len(report.quantized)} weighted layers int8, calibrated on {report.calibration_images} images "
          f"({args.calibration}){kept}", file=sys.stderr)
    return 0
