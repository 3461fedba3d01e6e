"""Run an end-to-end ONNX export (`retinanet export --end-to-end`) with onnxruntime alone: images in,
detections out, as JSON. It imports onnxruntime, numpy, Pillow and the standard library only, never
this package or PyTorch: it is what a deployment without them does, and the tests run it in a
process where `import retinanet` fails.

    python tools/onnx_detect.py model.onnx street.jpg [more.png ...] [--score-threshold 0.3]
        [--iou-threshold 0.5] [--max-detections 100] [--threads 1] [--output detections.json]

Output: one entry per image, {"file", "height", "width", "detections": [{"box": [x0, y0, x1, y1] (pixels
of the image as displayed), "score", "category_id", "name"}, ...] best first}, as a JSON list, to
--output or to stdout. The thresholds left out are the model's (the file's defaults).

Images are decoded as the package decodes them for the common cases: EXIF orientation applied,
palette transparency through RGBA, alpha dropped, any mode converted to RGB by Pillow (16-bit
grayscale is not rescaled as `retinanet.data.images` does: convert such files first).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional

import numpy as np
import onnxruntime
from PIL import Image, ImageOps


def load_session(path: str, threads: int = 0) -> onnxruntime.InferenceSession:
    """An onnxruntime CPU session for the file; threads 0: onnxruntime's default (all cores)."""
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # not the notice that the thresholds are overridable initializers
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def categories(session: onnxruntime.InferenceSession) -> dict:
    """category id -> name, from the file's metadata."""
    meta = session.get_modelmeta().custom_metadata_map
    if "retinanet.end_to_end" not in meta:
        raise ValueError("not an end-to-end export (write it with `retinanet export --end-to-end`)")
    return {int(c["id"]): c["name"] for c in json.loads(meta["retinanet.categories"])}


def load_rgb(path: str) -> np.ndarray:
    """An image file -> (H, W, 3) uint8 RGB array of the displayed (EXIF-oriented) image."""
    with Image.open(path) as img:
        img.load()
        img = ImageOps.exif_transpose(img)
        if img.mode == "P" and "transparency" in img.info:
            img = img.convert("RGBA")
        return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()


def detect(session: onnxruntime.InferenceSession, image: np.ndarray, score_threshold: Optional[float] = None,
           iou_threshold: Optional[float] = None, max_detections: Optional[int] = None) -> tuple:
    """(H, W, 3) uint8 RGB -> boxes (D, 4) float32 xyxy, scores (D,) float32, category ids (D,) int64, best first."""
    feed = {"image": np.ascontiguousarray(image, dtype=np.uint8)}
    if score_threshold is not None:
        feed["score_threshold"] = np.array(score_threshold, dtype=np.float32)
    if iou_threshold is not None:
        feed["iou_threshold"] = np.array(iou_threshold, dtype=np.float32)
    if max_detections is not None:
        feed["max_detections"] = np.array(max_detections, dtype=np.int64)
    boxes, scores, ids = session.run(None, feed)
    return boxes, scores, ids


def main(argv: Optional[list] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="an .onnx file written by `retinanet export --end-to-end`")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--score-threshold", type=float)
    p.add_argument("--iou-threshold", type=float)
    p.add_argument("--max-detections", type=int)
    p.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: its default)")
    p.add_argument("--output", help="JSON file to write (default: stdout); an existing file is not overwritten")
    args = p.parse_args(argv)
    if args.output and os.path.exists(args.output):
        print(f"error: --output {args.output} exists; choose another name or remove it", file=sys.stderr)
        return 2
    try:
        session = load_session(args.model, args.threads)
        names = categories(session)
    except Exception as e:  # a missing or foreign file: one line, not a traceback
        print(f"error: {args.model}: {e}", file=sys.stderr)
        return 2
    out = []
    for path in args.images:
        try:
            image = load_rgb(path)
        except OSError as e:
            print(f"error: {path}: {e}", file=sys.stderr)
            return 2
        boxes, scores, ids = detect(session, image, args.score_threshold, args.iou_threshold, args.max_detections)
        out.append({"file": path, "height": image.shape[0], "width": image.shape[1],
                    "detections": [{"box": [float(v) for v in box], "score": float(score), "category_id": int(i),
                                    "name": names.get(int(i), str(i))}
                                   for box, score, i in zip(boxes.tolist(), scores.tolist(), ids.tolist())]})
    text = json.dumps(out)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
