"""`retinanet export`: a checkpoint of any model.arch -> an ONNX model (dynamic batch and image size), checked
against PyTorch."""

from __future__ import annotations

import sys
import time
from typing import Optional


def register(sub) -> None:
    p = sub.add_parser("export", help="export a checkpoint of any model.arch to ONNX (network in the graph; decoding, "
                                      "NMS, mask pasting in OnnxDetector), checked against PyTorch",
                       description="Write the model's network (normalized padded images -> its raw outputs: "
                                   "RetinaNet's class logits, box deltas and anchors per level; both stages of "
                                   "Faster R-CNN; the proposal models' scores, masks and windows) as ONNX with "
                                   "dynamic batch, height and width. Decoding, NMS and mask pasting run in Python: "
                                   "retinanet.export.OnnxDetector (see docs in retinanet/export.py). The export "
                                   "is checked with onnxruntime against PyTorch on a random image; detections "
                                   "that differ exit 1.")
    p.add_argument("--checkpoint", required=True, help="model checkpoint (.pt)")
    p.add_argument("--format", default="onnx", choices=["onnx"], help="export format (onnx)")
    p.add_argument("--output", required=True, help="where to write the .onnx file")
    p.add_argument("--exporter", default="dynamo", choices=["dynamo", "torchscript"],
                   help="torch.onnx exporter: dynamo (default, torch.export based) or torchscript (older, faster)")
    p.add_argument("--opset", type=int, help="ONNX opset (default: the exporter's)")
    p.add_argument("--no-verify", action="store_true",
                   help="skip running the exported model with onnxruntime against PyTorch on a random image")
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from ..checkpoint import load_model
    from ..export import export_onnx

    from . import check_output_path

    if Path(args.output).resolve() == Path(args.checkpoint).resolve():
        raise ValueError("--output must not be the checkpoint file")
    check_output_path(args.output, "--output")
    model, cfg, categories = load_model(args.checkpoint, device="cpu")
    start = time.perf_counter()
    export_onnx(model, cfg, categories, args.output, exporter=args.exporter, opset=args.opset)
    size_mb = Path(args.output).stat().st_size / 2 ** 20
    print(f"wrote {args.output} ({size_mb:.1f} MiB) in {time.perf_counter() - start:.1f} s with the {args.exporter} exporter",
          file=sys.stderr)
    if not args.no_verify:
        report, problems = verify(model, categories, args.output, cfg.model)
        print(report, file=sys.stderr)
        if problems:
            print(f"error: {args.output}: onnxruntime's detections differ from PyTorch's on a random image "
                  f"({len(problems)} problem(s): {'; '.join(problems[:3])}{'; ...' if len(problems) > 3 else ''}); "
                  f"the file is kept for inspection, but it is not a faithful export", file=sys.stderr)
            return 1
    return 0


def match_detections(a, b, *, score_tol: float = 1e-4, box_tol: float = 1e-3,
                     score_threshold: Optional[float] = None, max_detections: Optional[int] = None) -> list:
    """Whether two `Detections` of one image, from two paths that round differently (onnxruntime and
    PyTorch, say), are the same detections; returns the differences found, [] when they are.

    Detection i of `a`, best first, pairs with an unpaired detection of `b` of the same label whose
    score is within `score_tol` and whose box corners are within `box_tol` x max(1, largest |coordinate|)
    px, the nearest score among several: so the order may differ only among near-equal scores, as
    rounding reorders ties. A detection left unpaired (on either side) is a difference, unless rounding
    can explain it: its score within `score_tol` of `score_threshold`, or the other side holding
    `max_detections` (the cap) and its score within `score_tol` of the other side's lowest.
    """
    import numpy as np

    scale = max(1.0, float(np.abs(a.boxes).max(initial=0.0)), float(np.abs(b.boxes).max(initial=0.0)))
    free = np.ones(len(b), dtype=bool)  # (len(b),) not yet paired
    unpaired_a = []
    for i in range(len(a)):
        fits = (free & (b.labels == a.labels[i]) & (np.abs(b.scores - a.scores[i]) <= score_tol)
                & (np.abs(b.boxes - a.boxes[i]).max(axis=1, initial=0.0) <= box_tol * scale))  # (len(b),)
        if fits.any():
            candidates = np.flatnonzero(fits)
            free[candidates[np.argmin(np.abs(b.scores[candidates] - a.scores[i]))]] = False
        else:
            unpaired_a.append(i)

    def explained(score: float, other) -> bool:
        at_threshold = score_threshold is not None and abs(score - score_threshold) <= score_tol
        at_cap = (max_detections is not None and len(other) >= max_detections
                  and score <= float(other.scores.min()) + score_tol)
        return at_threshold or at_cap

    problems = [f"detection {i} (label {a.labels[i]}, score {a.scores[i]:.4f}) has no match"
                for i in unpaired_a if not explained(float(a.scores[i]), b)]
    problems += [f"the other side's detection {j} (label {b.labels[j]}, score {b.scores[j]:.4f}) has no match"
                 for j in np.flatnonzero(free) if not explained(float(b.scores[j]), a)]
    return problems


def verify(model, categories: list, path: str, config) -> tuple:
    """Run PyTorch and onnxruntime on one random min_size x (4/3 min_size) image.

    Returns (a line describing the differences, [the detections' differences: `match_detections`]).
    The network outputs' differences are reported only: a detection is what must not change.
    """
    import numpy as np
    import torch

    from ..export import OnnxDetector
    from ..predict import Predictor

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(config.min_size, config.min_size * 4 // 3, 3), dtype=np.uint8)
    every_class = [c["id"] for c in categories]
    torch_pred = Predictor(model, categories, device="cpu", classes=every_class)
    onnx_pred = OnnxDetector(path, classes=every_class)
    batch = model.preprocess([torch.from_numpy(image).permute(2, 0, 1)])
    with torch.inference_mode():
        ours = torch_pred.network(batch)
    theirs = onnx_pred.network(batch)
    diffs = ", ".join(f"max |{name} diff| {(a.float() - b.float()).abs().max().item():.2e}" if a.shape == b.shape
                      else f"{name}: shapes {tuple(a.shape)} vs {tuple(b.shape)}"  # e.g. NMS ties broken otherwise
                      for name, a, b in zip(model.output_names, ours, theirs))
    a, b = torch_pred.predict_arrays([image])[0], onnx_pred.predict_arrays([image])[0]
    problems = match_detections(a, b, score_threshold=torch_pred.score_threshold,
                                max_detections=model.detections_per_image)
    in_order = len(a) == len(b) and np.array_equal(a.labels, b.labels)
    det = (f"{len(a)} vs {len(b)} detections, "
           + ("DIFFERENT" if problems else "labels identical" if in_order else "the same up to near-equal scores "
              "in another order")
           + (f", max |box diff| {np.abs(a.boxes - b.boxes).max():.2e} px, max |score diff| "
              f"{np.abs(a.scores - b.scores).max():.2e}" if in_order and len(a) else ""))
    return f"onnxruntime vs PyTorch on a random {image.shape[0]}x{image.shape[1]} image: {diffs}; " + det, problems
