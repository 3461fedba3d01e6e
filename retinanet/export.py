"""ONNX export: the network in the graph, the pre- and post-processing in Python around it.

The graph is the detector's `network` (retinanet/modeling/detector.py); for RetinaNet it maps a
normalized, padded batch to the head outputs and the anchors:

    inputs:  images       (B, 3, H, W) float32: RGB in [0, 1], minus pixel_mean, over pixel_std,
                          resized (shorter side min_size, longer at most max_size) and zero-padded to
                          multiples of size_divisibility. B, H and W are dynamic.
    outputs: cls_logits   (B, N, K) float32, N = sum over levels of H_l * W_l * A; sigmoid gives scores
             box_deltas   (B, N, 4) float32 (dx, dy, dw, dh), R-CNN parameterization times box_weights
             anchors_p3 .. anchors_p7   (H_l * W_l * A, 4) float32 xyxy in the padded input's pixels;
                          their row counts split N into levels (for the per-level top-k)

Decoding and NMS are not in the graph: ONNX NonMaxSuppression has no per-level top-k and breaks
ties its own way, so its detections would differ from PyTorch's. `OnnxDetector` runs the graph
with onnxruntime and then the model's own `postprocess` (retinanet/ops/postprocess.py): score > threshold,
top-k per level, decode (clamped dw, dh), clip, class-aware NMS, the best `detections_per_image`.

For Faster R-CNN (retinanet/modeling/faster_rcnn.py) the graph holds both stages, since the second
reads the first's proposals:

    inputs:  images, and image_sizes (B, 2) int64: each resized image's (h, w) in the padded batch
    outputs: class_logits (R, K + 1), box_regression (R, 4 (K + 1)), proposals (R, 4) xyxy in the
             padded batch's pixels and proposal_image (R,) int64, R = every image's proposals

The proposal stage is tensor operations only; its NMS within each (image, level) is one ONNX
NonMaxSuppression with the levels as classes (`nms_by_class`), the RoI features ONNX RoiAlign
(or MaxRoiPool), through the package's custom operators, whose translations are registered below
for both exporters. The detection stage (softmax, per-class decoding, NMS) is the model's
`postprocess`, as for RetinaNet. Equal scores may be broken differently by onnxruntime's NMS.
The config and categories travel in the ONNX file's metadata (`retinanet.config`,
`retinanet.categories`, JSON), so an exported file is all `OnnxDetector` needs.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor, nn

from .config import Config, ModelConfig, config_from_dict, config_to_dict
from .modeling.detector import ImageBatch
from .ops import nms, roi_align  # noqa: F401  (they register the custom operators translated below)
from .predict import Predictor

_INT64_MAX = 2 ** 63 - 1
_INT64 = 7  # onnx.TensorProto.INT64


def _roi_align_attributes(spatial_scale: float, output_height: int, output_width: int, sampling_ratio: int,
                          aligned: bool) -> dict:
    """ONNX RoiAlign (opset 16) attributes for `roi_align`'s arguments: "output_half_pixel" is the
    original RoIAlign (aligned=False, RoIs at least 1 x 1), "half_pixel" aligned=True; sampling
    ratio 0 is ONNX's adaptive grid (ours: <= 0)."""
    return dict(mode="avg", output_height=output_height, output_width=output_width,
                sampling_ratio=max(sampling_ratio, 0), spatial_scale=spatial_scale,
                coordinate_transformation_mode="half_pixel" if aligned else "output_half_pixel")


def onnx_translations() -> dict:
    """The package's custom operators (retinanet/ops) as ONNX, for the dynamo exporter:
    retinanet::nms_by_class -> NonMaxSuppression, retinanet::roi_align -> RoiAlign,
    retinanet::roi_pool -> MaxRoiPool."""
    from onnxscript import opset18 as op

    def nms_by_class(boxes, scores, iou_threshold: float, score_threshold: float):
        return op.NonMaxSuppression(boxes, scores, op.Constant(value_ints=[_INT64_MAX]),
                                    op.Constant(value_floats=[iou_threshold]),
                                    op.Constant(value_floats=[score_threshold]))

    def roi_align(features, rois, spatial_scale: float, output_height: int, output_width: int,
                  sampling_ratio: int, aligned: bool):
        image = op.Cast(op.Gather(rois, op.Constant(value_int=0), axis=1), to=_INT64)
        boxes = op.Slice(rois, op.Constant(value_ints=[1]), op.Constant(value_ints=[5]), op.Constant(value_ints=[1]))
        return op.RoiAlign(features, boxes, image, **_roi_align_attributes(
            spatial_scale, output_height, output_width, sampling_ratio, aligned))

    def roi_pool(features, rois, spatial_scale: float, output_height: int, output_width: int):
        return op.MaxRoiPool(features, rois, pooled_shape=[output_height, output_width], spatial_scale=spatial_scale)

    return {torch.ops.retinanet.nms_by_class.default: nms_by_class,
            torch.ops.retinanet.roi_align.default: roi_align,
            torch.ops.retinanet.roi_pool.default: roi_pool}


def register_torchscript_symbolics(opset: int = 16) -> None:
    """The same translations for the torchscript exporter (idempotent)."""
    from torch.onnx.symbolic_helper import parse_args

    @parse_args("v", "v", "f", "f")
    def nms_by_class(g, boxes, scores, iou_threshold, score_threshold):
        def const(value, dtype):
            return g.op("Constant", value_t=torch.tensor([value], dtype=dtype))

        return g.op("NonMaxSuppression", boxes, scores, const(_INT64_MAX, torch.int64),
                    const(iou_threshold, torch.float32), const(score_threshold, torch.float32))

    @parse_args("v", "v", "f", "i", "i", "i", "b")
    def roi_align(g, features, rois, spatial_scale, output_height, output_width, sampling_ratio, aligned):
        def ints(*values):
            return g.op("Constant", value_t=torch.tensor(values, dtype=torch.int64))

        image = g.op("Cast", g.op("Gather", rois, g.op("Constant", value_t=torch.tensor(0)), axis_i=1), to_i=_INT64)
        boxes = g.op("Slice", rois, ints(1), ints(5), ints(1))
        attributes = _roi_align_attributes(spatial_scale, output_height, output_width, sampling_ratio, aligned)
        return g.op("RoiAlign", features, boxes, image, mode_s=attributes["mode"],
                    output_height_i=output_height, output_width_i=output_width,
                    sampling_ratio_i=attributes["sampling_ratio"], spatial_scale_f=spatial_scale,
                    coordinate_transformation_mode_s=attributes["coordinate_transformation_mode"])

    @parse_args("v", "v", "f", "i", "i")
    def roi_pool(g, features, rois, spatial_scale, output_height, output_width):
        return g.op("MaxRoiPool", features, rois, pooled_shape_i=[output_height, output_width],
                    spatial_scale_f=spatial_scale)

    torch.onnx.register_custom_op_symbolic("retinanet::nms_by_class", nms_by_class, opset)
    torch.onnx.register_custom_op_symbolic("retinanet::roi_align", roi_align, opset)
    torch.onnx.register_custom_op_symbolic("retinanet::roi_pool", roi_pool, opset)


class NetworkGraph(nn.Module):
    """What the ONNX file computes: the detector's `network` (normalized padded batch -> its outputs)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, *inputs: Tensor) -> tuple:
        return tuple(self.model.network(*inputs))


def export_onnx(model, config: Config, categories: list, path: str, *, exporter: str = "dynamo",
                opset: Optional[int] = None) -> None:
    """Write `model`'s network as ONNX to `path` (atomically), with its config and categories as metadata.

    exporter: "dynamo" (torch.export based, PyTorch's default) or "torchscript" (the older tracer;
    much faster to run, deprecated by PyTorch). Both give the same graph semantics.
    """
    import onnx

    if exporter not in ("dynamo", "torchscript"):
        raise ValueError(f"exporter must be 'dynamo' or 'torchscript', got '{exporter}'")
    if model.onnx_unsupported:
        raise ValueError(f"model.arch {config.model.arch}: {model.onnx_unsupported}")
    graph = NetworkGraph(model).eval()
    names = list(model.output_names)
    inputs = list(model.network_inputs)
    d = config.model.size_divisibility
    device = next(model.parameters()).device
    # any size; B = 2 and H != W keep dims from specializing
    samples = {"images": torch.zeros(2, 3, 8 * d, 10 * d, device=device),
               "image_sizes": torch.tensor([[8 * d, 10 * d], [7 * d, 9 * d]], device=device)}
    sample = tuple(samples[name] for name in inputs)
    with torch.no_grad():
        ranks = [t.dim() for t in graph(*sample)]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.") as tmp:
        raw = os.path.join(tmp, "raw.onnx")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            if exporter == "dynamo":
                dim = torch.export.Dim.DYNAMIC
                dynamic = {"images": {0: dim, 2: dim, 3: dim}, "image_sizes": {0: dim}}
                program = torch.onnx.export(graph, sample, dynamo=True, input_names=inputs, output_names=names,
                                            opset_version=opset, custom_translation_table=onnx_translations(),
                                            dynamic_shapes={"inputs": tuple(dynamic[name] for name in inputs)})
                program.save(raw)
            else:
                register_torchscript_symbolics()
                axes = {"images": {0: "batch", 2: "height", 3: "width"}, "image_sizes": {0: "batch"},
                        **{n: {i: f"{n}_{i}" for i in range(rank)} for n, rank in zip(names, ranks)}}
                torch.onnx.export(graph, sample, raw, dynamo=False, input_names=inputs, output_names=names,
                                  opset_version=opset or 17, dynamic_axes={k: v for k, v in axes.items()
                                                                           if k in inputs or k in names})
        proto = onnx.load(raw)
        meta = {"retinanet.config": json.dumps(config_to_dict(config)),  # the whole Config (model, loss, ...)
                "retinanet.categories": json.dumps(list(categories)),
                "retinanet.format": "normalized padded images -> " + ", ".join(names)}
        for key, value in meta.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value
        onnx.checker.check_model(proto)
        final = os.path.join(tmp, "model.onnx")
        onnx.save(proto, final)
        os.replace(final, path)


class OnnxDetector(Predictor):
    """An exported detector run with onnxruntime: images in, `Detections` out, as `Predictor` does.

    The model is built from the file's config on the meta device (no weights, no memory) for its
    pre- and post-processing; its network is the ONNX graph.

    Args:
        path: an ONNX file written by `export_onnx` / `retinanet export`.
        providers: onnxruntime execution providers (default: CPU).
        Other keyword arguments: see `Predictor` (score_threshold, classes, batch_size, ...).

    Example:
        >>> detector = OnnxDetector("model.onnx", score_threshold=0.3)
        >>> det = detector("street.jpg")
    """

    def __init__(self, path: str, *, providers: Optional[list] = None, **kwargs):
        import onnxruntime

        from .modeling import build_model

        if not Path(path).is_file():
            raise FileNotFoundError(f"ONNX model not found: {path}")
        self.session = onnxruntime.InferenceSession(str(path), providers=providers or ["CPUExecutionProvider"])
        meta = self.session.get_modelmeta().custom_metadata_map
        if "retinanet.config" not in meta or "retinanet.categories" not in meta:
            raise ValueError(f"{path}: no retinanet metadata; was it written by `retinanet export`?")
        stored = json.loads(meta["retinanet.config"])
        if "model" in stored:
            config = config_from_dict(stored, Config)
        else:  # files of version 0.1 stored the model config only
            config = Config()
            config.model = config_from_dict(stored, ModelConfig)
        config.model.backbone_weights = None
        with torch.device("meta"):
            model = build_model(config).eval()
        super().__init__(model, json.loads(meta["retinanet.categories"]), device="cpu", **kwargs)

    def network(self, batch: ImageBatch) -> tuple:
        feed = {"images": batch.tensor.cpu().numpy(), "image_sizes": batch.sizes_tensor().cpu().numpy()}
        names = [i.name for i in self.session.get_inputs()]
        return tuple(torch.from_numpy(t) for t in self.session.run(None, {name: feed[name] for name in names}))
