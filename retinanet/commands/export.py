"""`retinanet export`: a checkpoint of any model.arch -> an ONNX model (dynamic batch and image size), checked
against PyTorch."""

from __future__ import annotations

import sys
import time


def register(sub) -> None:
    p = sub.add_parser("export", help="export a checkpoint of any model.arch to ONNX (network in the graph; decoding, "
                                      "NMS, mask pasting in OnnxDetector; or, with --end-to-end, image in, "
                                      "detections out), checked against PyTorch",
                       description="Write the model's network (normalized padded images -> its raw outputs: "
                                   "RetinaNet's class logits, box deltas and anchors per level; both stages of "
                                   "Faster R-CNN; the proposal models' scores, masks and windows) as ONNX with "
                                   "dynamic batch, height and width. Decoding, NMS and mask pasting run in Python: "
                                   "retinanet.export.OnnxDetector (see docs in retinanet/export.py). The export "
                                   "is checked with onnxruntime against PyTorch on a random image; detections "
                                   "that differ exit 1. With --end-to-end (RetinaNet and Faster R-CNN): one graph "
                                   "from a (H, W, 3) uint8 RGB image to boxes, scores and category ids, with the "
                                   "resizing, normalization, decoding and NMS inside, for onnxruntime alone "
                                   "(tools/onnx_detect.py).")
    p.add_argument("--checkpoint", required=True, help="model checkpoint (.pt)")
    p.add_argument("--format", default="onnx", choices=["onnx"], help="export format (onnx)")
    p.add_argument("--output", required=True, help="where to write the .onnx file")
    p.add_argument("--end-to-end", action="store_true",
                   help="one graph from a (H, W, 3) uint8 RGB image to boxes (D, 4) xyxy, scores (D,) and labels (D,) "
                        "category ids: resizing, normalization, the network, decoding, top-k, NMS inside; thresholds "
                        "as optional inputs (score_threshold, iou_threshold, max_detections). RetinaNet and Faster "
                        "R-CNN; torchscript exporter, opset 17 by default")
    p.add_argument("--exporter", choices=["dynamo", "torchscript"],
                   help="torch.onnx exporter: dynamo (the default, torch.export based) or torchscript (older, faster; "
                        "the only one for --end-to-end)")
    p.add_argument("--opset", type=int, help="ONNX opset (default: the exporter's; 17 with --end-to-end)")
    p.add_argument("--no-verify", action="store_true",
                   help="skip running the exported model with onnxruntime against PyTorch on a random image")
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from ..checkpoint import load_model
    from ..export import END_TO_END_OPSET, EndToEndGraph, export_end_to_end, export_onnx
    from . import check_output_path

    if Path(args.output).resolve() == Path(args.checkpoint).resolve():
        raise ValueError("--output must not be the checkpoint file")
    if args.end_to_end and args.exporter == "dynamo":
        raise ValueError("--end-to-end is exported with the torchscript exporter only (torch.export does not trace "
                         "the data-dependent sizes of the detections); leave --exporter out")
    exporter = args.exporter or ("torchscript" if args.end_to_end else "dynamo")
    check_output_path(args.output, "--output")
    model, cfg, categories = load_model(args.checkpoint, device="cpu")
    if args.end_to_end:
        EndToEndGraph(model, categories)  # a segment-proposal model fails here, before the export starts
    start = time.perf_counter()
    if args.end_to_end:
        export_end_to_end(model, cfg, categories, args.output, opset=args.opset or END_TO_END_OPSET)
    else:
        export_onnx(model, cfg, categories, args.output, exporter=exporter, opset=args.opset)
    size_mb = Path(args.output).stat().st_size / 2 ** 20
    print(f"wrote {args.output} ({size_mb:.1f} MiB) in {time.perf_counter() - start:.1f} s with the {exporter} exporter"
          + (", end to end" if args.end_to_end else ""), file=sys.stderr)
    if not args.no_verify:
        check = verify_end_to_end if args.end_to_end else verify
        report, match = check(model, categories, args.output, cfg.model)
        print(report, file=sys.stderr)
        if not match.same:
            print(f"error: {args.output}: onnxruntime's detections differ from PyTorch's on a random image "
                  f"({match.details}); the file is kept for inspection, but it is not a faithful export",
                  file=sys.stderr)
            return 1
    return 0


def verify(model, categories: list, path: str, config) -> tuple:
    """Run PyTorch and onnxruntime on one random min_size x (4/3 min_size) image.

    Returns (a line describing the differences, the detections' `retinanet.compare.DetectionMatch`:
    one to one, near-equal scores in either order, scores within 1e-4, boxes within 0.05 px). The
    network outputs' differences are reported only: the detections are what must not change.
    """
    import numpy as np
    import torch

    from ..compare import match_detections
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
    match = match_detections(b, a, score_atol=1e-4, box_atol=0.05)
    if match.same and not match.swapped and len(a) == len(b):
        det = (f"{len(a)} detections, labels identical, max |box diff| {match.max_box_diff:.2e} px, max |score diff| "
               f"{match.max_score_diff:.2e}")
    else:
        det = f"{len(a)} vs {len(b)} detections, " + ("the same: " + match.summary() if match.same else "DIFFERENT")
    return f"onnxruntime vs PyTorch on a random {image.shape[0]}x{image.shape[1]} image: {diffs}; " + det, match


def verify_end_to_end(model, categories: list, path: str, config) -> tuple:
    """Run `Predictor` and the end-to-end file (onnxruntime alone: image in, detections out) on one random
    min_size x (4/3 min_size) image. -> (a line describing the differences, the `DetectionMatch`: near-equal
    scores in either order, scores within 1e-4, boxes within 0.05 px)."""
    import numpy as np
    import onnxruntime

    from ..compare import match_detections
    from ..predict import Predictor

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(config.min_size, config.min_size * 4 // 3, 3), dtype=np.uint8)
    a = Predictor(model, categories, device="cpu")(image)
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # not the warning that the thresholds are overridable initializers
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    boxes, scores, ids = session.run(None, {"image": image})
    b = {"boxes": boxes, "scores": scores, "labels": ids}
    match = match_detections(b, {"boxes": a.boxes, "scores": a.scores, "labels": a.category_ids},
                             score_atol=1e-4, box_atol=0.05)
    if match.same and not match.swapped and len(a) == len(scores):
        det = (f"{len(a)} detections, labels identical, max |box diff| {match.max_box_diff:.2e} px, max |score diff| "
               f"{match.max_score_diff:.2e}")
    else:
        det = f"{len(a)} vs {len(scores)} detections, " + (
            "the same: " + match.summary() if match.same else "DIFFERENT")
    return f"end-to-end onnxruntime vs Predictor on a random {image.shape[0]}x{image.shape[1]} image: " + det, match
