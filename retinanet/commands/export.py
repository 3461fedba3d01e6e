"""`retinanet export`: a checkpoint -> an ONNX model (dynamic batch and image size), checked against PyTorch."""

from __future__ import annotations

import sys
import time


def register(sub) -> None:
    p = sub.add_parser("export", help="export a checkpoint to ONNX (network in the graph; decode + NMS in OnnxDetector)",
                       description="Write the network (normalized padded images -> cls_logits, box_deltas, anchors "
                                   "per level) as ONNX with dynamic batch, height and width. Decoding and NMS run "
                                   "in Python: retinanet.export.OnnxDetector (see docs in retinanet/export.py).")
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

    if Path(args.output).resolve() == Path(args.checkpoint).resolve():
        raise ValueError("--output must not be the checkpoint file")
    model, cfg, categories = load_model(args.checkpoint, device="cpu")
    start = time.perf_counter()
    export_onnx(model, cfg, categories, args.output, exporter=args.exporter, opset=args.opset)
    size_mb = Path(args.output).stat().st_size / 2 ** 20
    print(f"wrote {args.output} ({size_mb:.1f} MiB) in {time.perf_counter() - start:.1f} s with the {args.exporter} exporter",
          file=sys.stderr)
    if not args.no_verify:
        report = verify(model, categories, args.output, cfg.model)
        print(report, file=sys.stderr)
    return 0


def verify(model, categories: list, path: str, config) -> str:
    """Run PyTorch and onnxruntime on one random min_size x (4/3 min_size) image; describe the differences."""
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
    same = len(a) == len(b) and np.array_equal(a.labels, b.labels)
    det = (f"{len(a)} detections, labels {'identical' if same else 'DIFFERENT'}"
           + (f", max |box diff| {np.abs(a.boxes - b.boxes).max():.2e} px, max |score diff| "
              f"{np.abs(a.scores - b.scores).max():.2e}" if same and len(a) else ""))
    return f"onnxruntime vs PyTorch on a random {image.shape[0]}x{image.shape[1]} image: {diffs}; " + det
