"""INT8: static quantization of an exported ONNX file with onnxruntime's tools, calibrated on the user's images.

    >>> from retinanet.quantize import quantize_onnx
    >>> report = quantize_onnx("model.onnx", "train/", "model.int8.onnx", num_images=200)
    >>> det = OnnxDetector("model.int8.onnx")("street.jpg")       # the same detector, int8 convolutions

What happens (onnxruntime.quantization, QDQ format):
- calibration: the fp32 graph runs on N of the user's images; `CalibrationImages` feeds it exactly what
  it takes at inference. For the network-only graph (`retinanet export`: input `images`, normalized,
  resized, padded) that is the model's own `preprocess` (retinanet/modeling/detector.py, built from the
  file's metadata on the meta device, as `OnnxDetector` does); for an end-to-end graph (input `image`,
  (H, W, 3) uint8 RGB, resizing and normalization inside) the decoded image itself.
- the graph gets QuantizeLinear/DequantizeLinear pairs around the convolutions (and MatMul/Gemm) with
  per-channel int8 weights, int32 biases, and uint8 activations whose ranges come from calibration
  (MinMax: the observed range; Entropy/Percentile: a clipped one). onnxruntime fuses DQ -> Conv -> Q into
  an integer convolution when it loads the file.
- what stays float: everything that is not a weighted layer or an operator between two quantized ones
  (ReLU, residual Add, max-pool, the FPN's upsampling): the anchors (a coordinate table, not an
  activation: int8 would move them by up to half a step), the reshapes to (B, N, K), and in an end-to-end
  graph the resizing, normalization, decoding and NMS. `exclude` keeps chosen convolutions float as well
  (glob patterns on their weights' names, e.g. "*predictor*" for the heads' last convolutions).
- the retinanet metadata (config, categories) is copied over, plus `retinanet.quantization` (the
  settings, the calibration images' count), so `OnnxDetector` runs the INT8 file as it runs the fp32 one.

On x86 without VNNI (AVX2: Zen 1-3, Intel before Cascade Lake) onnxruntime's uint8 x int8 kernels add
pairs of products in 16 bits (vpmaddubsw), which saturates with 8-bit weights; `reduce_range` (7-bit
weights) avoids it, as onnxruntime's documentation recommends for such CPUs. See BENCHMARKS.md (INT8).
"""

from __future__ import annotations

import fnmatch
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
WEIGHTED_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")
# operators quantized when they sit between two quantized weighted layers (their QDQ lets onnxruntime keep
# the tensor in int8 from one convolution to the next)
BETWEEN_OPS = ("Relu", "Clip", "Add", "MaxPool", "Resize", "Concat")
DEFAULT_EXCLUDE: tuple = ()  # measured on the demo model: see BENCHMARKS.md (INT8)


@dataclass
class QuantizationReport:
    """What `quantize_onnx` did: the convolutions quantized and kept float (by their weights' names),
    the calibration images used, the settings."""

    quantized: list = field(default_factory=list)
    kept_float: list = field(default_factory=list)
    calibration_images: int = 0
    settings: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------ images
def calibration_files(source, num_images: int, image_dir=None) -> list:
    """The first `num_images` image files of a folder (sorted by name; files with other suffixes are
    skipped) or of a COCO JSON's "images" (in the file's order; their folder: `image_dir`, else the
    folder next to the JSON named like it (train.json -> train/), else the JSON's folder).

    Each file's header is read here, so a missing, unreadable or non-image file is an error naming it
    before any work. Raises FileNotFoundError / ValueError.
    """
    from .data.images import displayed_size

    if num_images < 1:
        raise ValueError(f"the number of calibration images must be >= 1, got {num_images}")
    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"calibration images not found: {source} (give a folder of images or a COCO JSON)")
    if source.is_dir():
        entries = sorted(p for p in source.iterdir() if p.is_file())
        files = [p for p in entries if p.suffix.lower() in IMAGE_SUFFIXES]
        if not files:
            seen = ", ".join(p.name for p in entries[:3]) + (", ..." if len(entries) > 3 else "")
            raise ValueError(f"no image files in {source} (looked for {' '.join(IMAGE_SUFFIXES)}"
                             + (f"; found {seen}" if entries else "; the folder is empty") + ")")
    elif source.suffix.lower() == ".json":
        from .evaluate import read_json

        gt = read_json(source)
        if not isinstance(gt, dict) or not isinstance(gt.get("images"), list):
            raise ValueError(f"{source}: not a COCO JSON (no \"images\" list); give a folder of images or a COCO JSON")
        if not gt["images"]:
            raise ValueError(f"{source}: its \"images\" list is empty")
        folder = Path(image_dir) if image_dir else next(
            (d for d in (source.parent / source.stem, source.parent) if d.is_dir()
             and (d / str(gt["images"][0].get("file_name", ""))).is_file()), source.parent)
        files = []
        for info in gt["images"][:num_images]:
            if not isinstance(info, dict) or "file_name" not in info:
                raise ValueError(f"{source}: image entry {info!r} has no file_name")
            files.append(folder / info["file_name"])
    else:
        raise ValueError(f"--calibration-images {source}: expected a folder of images or a COCO JSON (.json), "
                         f"got a {source.suffix or 'suffix-less'} file")
    files = files[:num_images]
    for path in files:
        displayed_size(path)  # an ImageError (a ValueError) naming the file if it is missing or not an image
    return files


class CalibrationImages:
    """An onnxruntime CalibrationDataReader (get_next, rewind): image files -> the graph's inputs, one image per run.

    `session`: an onnxruntime session of the fp32 file (its inputs decide the form):
    - network-only graph (inputs `images` (B, 3, H, W) float, and `image_sizes` for Faster R-CNN): the
      model's `preprocess` at the model's size, the model built from the file's metadata on the meta
      device (no weights): {"images": (1, 3, H, W) float32[, "image_sizes": (1, 2) int64]};
    - end-to-end graph (one uint8 input (H, W, 3)): {name: the decoded RGB image}; with a batch input
      (B, H, W, 3), a batch of that one image.
    """

    def __init__(self, files: Sequence, session, model=None):
        self.files = list(files)
        self.inputs = {i.name: i for i in session.get_inputs()}
        self.model = model
        self.form = graph_input_form(session)
        if self.form == "network" and model is None:
            raise ValueError("a network-only graph needs the model (for its preprocessing)")
        self._iter: Optional[Iterator] = None

    def feeds(self) -> Iterator[dict]:
        from .data.images import load_image

        for path in self.files:
            yield self.feed(load_image(path))

    def feed(self, image: np.ndarray) -> dict:
        """One (H, W, 3) uint8 RGB image -> the graph's inputs."""
        if self.form in ("image", "images"):
            return {next(iter(self.inputs)): image if self.form == "image" else image[None]}
        import torch  # here, not at the top: `retinanet quantize --help` and the CLI parser stay torch-free

        batch = self.model.preprocess([torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)])
        values = {"images": batch.tensor.numpy(), "image_sizes": batch.sizes_tensor().numpy()}
        return {name: values[name] for name in self.inputs}

    # the CalibrationDataReader protocol
    def get_next(self) -> Optional[dict]:
        if self._iter is None:
            self._iter = self.feeds()
        return next(self._iter, None)

    def rewind(self) -> None:
        self._iter = None

    def __len__(self) -> int:
        return len(self.files)


def graph_input_form(session) -> str:
    """The form of the graph's inputs: "network" (images (B, 3, H, W) float [+ image_sizes]), "image" (one
    (H, W, 3) uint8 input) or "images" (one (B, H, W, 3) uint8 input: a batch of same-size images)."""
    inputs = session.get_inputs()
    names = [i.name for i in inputs]
    if "images" in names and set(names) <= {"images", "image_sizes"} and inputs[names.index("images")].type == \
            "tensor(float)":
        return "network"
    if len(inputs) == 1 and inputs[0].type == "tensor(uint8)" and len(inputs[0].shape) in (3, 4):
        return "image" if len(inputs[0].shape) == 3 else "images"
    described = ", ".join(f"{i.name} {i.type} {i.shape}" for i in inputs)
    raise ValueError(f"unknown ONNX input signature ({described}): expected `retinanet export`'s network graph "
                     f"(images [, image_sizes]) or an end-to-end graph (one (H, W, 3) or (B, H, W, 3) uint8 input)")


# ------------------------------------------------------------------------------------------------ the graph
def load_exported(path) -> tuple:
    """An ONNX file written by `retinanet export` -> (onnx ModelProto, onnxruntime session, the model built
    from its metadata on the meta device (for preprocessing), metadata dict). Errors name the file."""
    import onnx
    import onnxruntime

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX model not found: {path}")
    try:
        proto = onnx.load(str(path))
    except Exception as e:  # a checkpoint, a text file, a truncated file: protobuf's message is cryptic
        raise ValueError(f"{path}: not an ONNX model ({type(e).__name__}); give a file written by "
                         f"`retinanet export`") from None
    if not proto.graph.node:
        raise ValueError(f"{path}: not an ONNX model (no graph); give a file written by `retinanet export`")
    meta = {p.key: p.value for p in proto.metadata_props}
    if "retinanet.config" not in meta or "retinanet.categories" not in meta:
        raise ValueError(f"{path}: no retinanet metadata; was it written by `retinanet export`?")
    if "retinanet.quantization" in meta or any(n.op_type in ("QuantizeLinear", "DequantizeLinear")
                                               for n in proto.graph.node):
        raise ValueError(f"{path}: already quantized; quantize the fp32 file that `retinanet export` wrote")
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    model = None
    if graph_input_form(session) == "network":
        from .export import OnnxDetector

        model = OnnxDetector(str(path)).model  # the file's detector on the meta device: its preprocess
    return proto, session, model, meta


def select_nodes(graph, exclude: Sequence[str] = ()) -> tuple:
    """Which nodes to quantize: (node names to quantize, [(weight name, node name)] quantized weighted layers,
    [(weight name, node name)] weighted layers kept float).

    Weighted layers: Conv/ConvTranspose/MatMul/Gemm whose second input is an initializer (a weight), unless
    the weight's name matches a pattern of `exclude` (fnmatch, e.g. "*predictor*"). Plus the operators of
    BETWEEN_OPS that lie on a path from a quantized layer to another (ReLU, residual Add, max-pool, FPN
    upsampling and Add): not the anchors, reshapes, or an end-to-end graph's pre- and post-processing.
    """
    weights = {t.name for t in graph.initializer}
    producers = {out: n for n in graph.node for out in n.output}
    consumers: dict = {}
    for n in graph.node:
        for name in n.input:
            consumers.setdefault(name, []).append(n)
    quantized, kept = [], []
    for n in graph.node:
        if n.op_type in WEIGHTED_OPS and len(n.input) > 1 and n.input[1] in weights:
            excluded = any(fnmatch.fnmatchcase(n.input[1], p) or fnmatch.fnmatchcase(n.name, p) for p in exclude)
            (kept if excluded else quantized).append((n.input[1], n.name))
    layers = {name for _, name in quantized}

    def reach(starts, step) -> set:  # node names reachable from `starts` (not included) along `step`
        seen, todo = set(), list(starts)
        while todo:
            for nxt in step(todo.pop()):
                if nxt.name not in seen:
                    seen.add(nxt.name)
                    todo.append(nxt)
        return seen

    by_name = {n.name: n for n in graph.node}
    starts = [by_name[name] for name in layers]
    below = reach(starts, lambda n: [c for out in n.output for c in consumers.get(out, [])])
    above = reach(starts, lambda n: [producers[i] for i in n.input if i in producers])
    between = {n.name for n in graph.node if n.op_type in BETWEEN_OPS and n.name in below and n.name in above}
    return sorted(layers | between), quantized, kept


# ------------------------------------------------------------------------------------------------ quantize
def quantize_onnx(onnx_path, calibration_images, output, *, num_images: int = 200, image_dir=None,
                  per_channel: bool = True, calibration: str = "minmax", reduce_range: bool = True,
                  exclude: Sequence[str] = DEFAULT_EXCLUDE, preprocess: bool = True) -> QuantizationReport:
    """Quantize `onnx_path` (written by `retinanet export`) to INT8 (QDQ), calibrated on `num_images` of
    `calibration_images` (a folder or a COCO JSON: `calibration_files`), and write it to `output` atomically.

    per_channel: one weight scale per output channel (else per tensor). calibration: "minmax",
    "entropy" or "percentile" (99.999th). reduce_range: 7-bit weights (for CPUs without VNNI; see the
    module docstring). exclude: fnmatch patterns on the weighted layers' weight (or node) names to keep
    float. preprocess: run onnxruntime's `quant_pre_process` (shape inference, graph optimization) first.
    Raises FileNotFoundError / ValueError naming the file for a bad input, before calibrating.
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    from .export import save_with_metadata

    if calibration not in CALIBRATION_METHODS:
        raise ValueError(f"calibration must be one of {', '.join(CALIBRATION_METHODS)}, got '{calibration}'")
    output = Path(output)
    if output.resolve() == Path(onnx_path).resolve():
        raise ValueError(f"--output {output} is the input model; give another file name")
    proto, session, model, meta = load_exported(onnx_path)
    files = calibration_files(calibration_images, num_images, image_dir)
    if any(output.resolve() == Path(f).resolve() for f in files):
        raise ValueError(f"--output {output} is a calibration image")
    reader = CalibrationImages(files, session, model)
    del session
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output.parent, prefix=f".{output.name}.") as tmp:
        source = str(onnx_path)
        if preprocess:
            from onnxruntime.quantization.shape_inference import quant_pre_process

            source = os.path.join(tmp, "pre.onnx")
            # onnxruntime's graph optimizations and ONNX shape inference; not its symbolic shape inference:
            # with dynamic image sizes its sympy expressions (nested floors per pyramid level) take minutes
            # on an end-to-end graph, and the convolutions' quantization needs no shapes
            quant_pre_process(str(onnx_path), source, skip_symbolic_shape=True)
        graph = onnx.load(source).graph
        nodes, quantized, kept = select_nodes(graph, exclude)
        if not quantized:
            raise ValueError(f"{onnx_path}: nothing to quantize (no Conv/MatMul/Gemm with weights left by "
                             f"--exclude {' '.join(exclude)})")
        method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                  "percentile": CalibrationMethod.Percentile}[calibration]
        raw = os.path.join(tmp, "int8.onnx")
        quantize_static(source, raw, reader, quant_format=QuantFormat.QDQ, per_channel=per_channel,
                        reduce_range=reduce_range, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        nodes_to_quantize=nodes, calibrate_method=method,
                        extra_options={"CalibMaxIntermediateOutputs": 16})
        result = onnx.load(raw)
        settings = dict(per_channel=per_channel, calibration=calibration, reduce_range=reduce_range,
                        exclude=list(exclude), preprocess=preprocess, calibration_images=len(files),
                        format="QDQ, uint8 activations, int8 weights")
        report = QuantizationReport(quantized=list(dict.fromkeys(w for w, _ in quantized)),  # a shared head: once
                                    kept_float=list(dict.fromkeys(w for w, _ in kept)),
                                    calibration_images=len(files), settings=settings)
        del result.metadata_props[:]
        save_with_metadata(result, {**meta, "retinanet.quantization": json.dumps(asdict(report))}, tmp, output)
    return report
