"""ONNX export, in two forms: the network in the graph with the pre- and post-processing in Python
around it (`export_onnx`, `OnnxDetector`, the default), or everything from the decoded image to the
detections in one graph (`export_end_to_end`, `EndToEndGraph`: see the section at the end).

The network-only graph is the detector's `network` (retinanet/modeling/detector.py); for RetinaNet it maps a
normalized, padded batch to the head outputs and the anchors:

    inputs:  images       (B, 3, H, W) float32: RGB in [0, 1], minus pixel_mean, over pixel_std,
                          resized (shorter side min_size, longer at most max_size) and zero-padded to
                          multiples of size_divisibility. B, H and W are dynamic.
    outputs: cls_logits   (B, N, K) float32, N = sum over levels of H_l * W_l * A; sigmoid gives scores
             box_deltas   (B, N, 4) float32 (dx, dy, dw, dh), R-CNN parameterization times box_weights
             anchors_p3 .. anchors_p7   (H_l * W_l * A, 4) float32 xyxy in the padded input's pixels;
                          their row counts split N into levels (for the per-level top-k)

Decoding and NMS are not in this graph, for users who post-process themselves (and for every
model.arch, the segment-proposal models included). `OnnxDetector` runs the graph
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

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import Config, ModelConfig, config_from_dict, config_to_dict
from .modeling.detector import ImageBatch
from .ops import nms, roi_align  # noqa: F401  (they register the custom operators translated below)
from .ops.boxes import clip_boxes, decode
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
        save_with_metadata(proto, meta, tmp, path)


def save_with_metadata(proto, meta: dict, tmp: str, path) -> None:
    """Add meta {key: JSON string} to the ONNX model proto, check it, and write it to path atomically
    (through tmp, a folder beside path)."""
    import onnx

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
        if "retinanet.end_to_end" in meta:
            raise ValueError(f"{path}: an end-to-end export (image in, detections out); run it with onnxruntime "
                             "directly (tools/onnx_detect.py), not OnnxDetector")
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


# ---------------------------------------------------------------------------------------------- end to end
#
# One graph from a decoded image to the final detections, for users who run the file without this
# package (a C++ service, a browser, Triton):
#
#     inputs:  image            (H, W, 3) uint8 RGB, any H and W
#              score_threshold  () float32, iou_threshold () float32, max_detections () int64: optional,
#                               the model's own values by default (ONNX initializers listed as inputs)
#     outputs: boxes  (D, 4) float32 xyxy in the input image's pixels, best first
#              scores (D,) float32, labels (D,) int64: the dataset's category ids
#
# Inside, the model's own steps on one image: `Detector.preprocess` (/255, normalize, resize by
# `resized_size`, bilinear, then zero-pad to size_divisibility), `network`, and the model's
# post-processing written for one image in tensor operations the torchscript tracer records:
# score threshold, top-k per level (RetinaNet), decode with the same clamps, clip, class-aware NMS
# (`nms_by_class`, ONNX NonMaxSuppression), the best max_detections, boxes scaled back. The same
# module runs in PyTorch (`EndToEndGraph(model, categories)(image)`), and the tests hold both its
# PyTorch and its ONNX results to `Predictor`'s. Equal scores (at the top-k cut, in NMS) are broken
# by index in both, which may order near-equal detections differently from `Predictor`.

END_TO_END_OPSET = 17
END_TO_END_FORMAT = "image (H, W, 3) uint8 RGB -> boxes (D, 4) xyxy, scores (D,), labels (D,) category ids"
END_TO_END_INPUTS = ("image", "score_threshold", "iou_threshold", "max_detections")
END_TO_END_OUTPUTS = ("boxes", "scores", "labels")


class _GraphNMS(torch.autograd.Function):
    """`nms_by_class` with its IoU threshold a tensor, so that it can be a graph input: in PyTorch the
    package's NMS, in ONNX one NonMaxSuppression node (rows [0, class, box], class by class, each by
    decreasing score)."""

    @staticmethod
    def forward(ctx, boxes: Tensor, scores: Tensor, iou_threshold: Tensor) -> Tensor:
        return nms.nms_by_class(boxes, scores, float(iou_threshold), -0.5)

    @staticmethod
    def symbolic(g, boxes, scores, iou_threshold):
        def const(value, dtype):
            return g.op("Constant", value_t=torch.tensor([value], dtype=dtype))

        iou = g.op("Reshape", g.op("Cast", iou_threshold, to_i=1), const(1, torch.int64))  # float32 (1,)
        return g.op("NonMaxSuppression", boxes, scores, const(_INT64_MAX, torch.int64), iou,
                    const(-0.5, torch.float32))


def _best(scores: Tensor, k) -> tuple:
    """The k best of scores (N,) (all if fewer), by decreasing score, equal scores by index -> (values, indices).
    ONNX TopK breaks ties by index; in PyTorch a stable sort does (torch.topk does not promise it)."""
    if torch.jit.is_tracing():
        from .modeling.rpn import _at_most

        if isinstance(k, Tensor):
            return scores.topk(torch.minimum(k.reshape(()), torch._shape_as_tensor(scores)[0]))
        return scores.topk(_at_most(k, scores, 0))
    values, order = scores.sort(descending=True, stable=True)
    return values[:int(k)], order[:int(k)]


class EndToEndGraph(nn.Module):
    """What the end-to-end ONNX file computes (see above): one (H, W, 3) uint8 RGB image -> (boxes, scores, labels).

    Args:
        model: a RetinaNet (sigmoid or softmax classifier) or a Faster R-CNN, in eval mode.
        categories: label i -> {"id", "name"} (checkpoint order); "placeholder" ones are never detected,
            as `Predictor`'s default.
    """

    def __init__(self, model, categories: list):
        super().__init__()
        from .modeling.faster_rcnn import FasterRCNN
        from .modeling.retinanet import RetinaNet

        if not isinstance(model, (RetinaNet, FasterRCNN)):
            raise ValueError(f"{type(model).__name__}: the end-to-end export covers RetinaNet and Faster R-CNN; "
                             "export the segment-proposal models without --end-to-end (network only)")
        if len(categories) != model.num_classes:
            raise ValueError(f"{len(categories)} categories for a model with {model.num_classes} classes")
        self.model = model
        self.two_stage = isinstance(model, FasterRCNN)
        self.register_buffer("pixel_mean", torch.tensor(model.pixel_mean, dtype=torch.float32).reshape(3, 1, 1))
        self.register_buffer("pixel_std", torch.tensor(model.pixel_std, dtype=torch.float32).reshape(3, 1, 1))
        keep = [0.0 if c.get("placeholder") else 1.0 for c in categories]
        self.register_buffer("keep_classes", torch.tensor(keep, dtype=torch.float32))  # (K,)
        self.register_buffer("category_ids", torch.tensor([int(c["id"]) for c in categories], dtype=torch.int64))

    def defaults(self) -> dict:
        """The model's own thresholds: the graph inputs' default values."""
        m = self.model
        return {"score_threshold": torch.tensor(float(m.score_thresh), dtype=torch.float32),
                "iou_threshold": torch.tensor(float(m.nms_thresh), dtype=torch.float32),
                "max_detections": torch.tensor(int(m.detections_per_image), dtype=torch.int64)}

    def forward(self, image: Tensor, score_threshold: Optional[Tensor] = None, iou_threshold: Optional[Tensor] = None,
                max_detections: Optional[Tensor] = None) -> tuple:
        """image (H, W, 3) uint8 RGB -> boxes (D, 4) xyxy in its pixels, scores (D,), labels (D,) category ids."""
        from .ops.transform import resized_size_tensor

        defaults = self.defaults()
        score_threshold = defaults["score_threshold"] if score_threshold is None else score_threshold
        iou_threshold = defaults["iou_threshold"] if iou_threshold is None else iou_threshold
        max_detections = defaults["max_detections"] if max_detections is None else max_detections
        m = self.model
        # Detector.preprocess, for one image: [0, 1], normalize, resize, pad (in that order)
        original = torch._shape_as_tensor(image)[:2]  # (2,) int64 h, w
        x = (image.permute(2, 0, 1).to(torch.float32) / 255.0 - self.pixel_mean) / self.pixel_std
        size = resized_size_tensor(original, m.min_size, m.max_size, m.resize_rounding)  # (2,) h, w
        h, w = size[0], size[1]
        x = F.interpolate(x[None], size=(h, w), mode="bilinear", align_corners=False)  # (1, 3, h, w)
        d = m.size_divisibility
        x = F.pad(x, (0, (w + d - 1) // d * d - w, 0, (h + d - 1) // d * d - h))  # zeros right and below
        outputs = m.network(x, size[None]) if self.two_stage else m.network(x)
        score_threshold = score_threshold.to(torch.float32)
        if self.two_stage:
            boxes, scores, labels = self._faster_rcnn_candidates(outputs, h, w, score_threshold)
        else:
            boxes, scores, labels = self._retinanet_candidates(outputs, h, w, score_threshold)
        boxes, scores, labels = graph_nms(boxes, scores, labels, self.keep_classes.shape[0], iou_threshold,
                                          max_detections, class_agnostic=m.class_agnostic_nms)
        # rescale_to_original: the factors in float64 as there, applied in float32
        factor = (original.to(torch.float64) / size.to(torch.float64)).to(torch.float32)  # (2,) sy, sx
        boxes = boxes * torch.stack([factor[1], factor[0], factor[1], factor[0]])
        return boxes, scores, self.category_ids[labels]

    def _retinanet_candidates(self, outputs: tuple, h: Tensor, w: Tensor, score_threshold: Tensor) -> tuple:
        """ops/postprocess.py `postprocess` before its NMS, for one image: scores > threshold, the topk_candidates
        best (anchor, class) pairs of each level, decoded and clipped -> boxes (C, 4), scores (C,), labels (C,)."""
        m = self.model
        cls_logits, box_deltas, *anchors = outputs
        if m.head.classifier == "softmax":
            scores = torch.softmax(cls_logits[0].float(), dim=-1)[:, :-1]  # (N, K): background dropped
        else:
            scores = torch.sigmoid(cls_logits[0].float())  # (N, K)
        scores = scores * self.keep_classes  # classes left out score 0: never above a threshold >= 0
        k = scores.shape[1]
        deltas = box_deltas[0]
        boxes, kept_scores, labels = [], [], []
        start = 0
        for a in anchors:  # one level at a time: (N_l, 4) anchors, and that level's rows of scores
            end = start + a.shape[0]
            top, idx = _best(scores[start:end].reshape(-1), m.topk_candidates)  # (anchor, class) pairs, flat
            above = top > score_threshold
            top, idx = top[above], idx[above]
            anchor = torch.div(idx, k, rounding_mode="floor")
            boxes.append(decode(a[anchor], deltas[start:end][anchor], m.box_weights, m.box_clamp))
            kept_scores.append(top)
            labels.append(idx - anchor * k)
            start = end
        boxes = clip_boxes(torch.cat(boxes), h, w)
        return boxes, torch.cat(kept_scores), torch.cat(labels)

    def _faster_rcnn_candidates(self, outputs: tuple, h: Tensor, w: Tensor, score_threshold: Tensor) -> tuple:
        """RoIHeads.postprocess before its NMS, for one image: each (proposal, class) with probability >
        threshold, its class's box decoded from the proposal, clipped, both sides >= 0.01 px."""
        heads = self.model.roi_heads
        class_logits, box_regression, proposals, _ = outputs
        probs = torch.softmax(class_logits.float(), dim=-1)[:, 1:] * self.keep_classes  # (R, K) background dropped
        k = probs.shape[1]
        roi, cls = torch.nonzero(probs > score_threshold, as_tuple=True)  # (M,)
        deltas = box_regression.reshape(-1, k + 1, 4)[roi, cls + 1]  # (M, 4)
        boxes = clip_boxes(decode(proposals.float()[roi], deltas, heads.box_weights, heads.box_clamp), h, w)
        big = (boxes[:, 2] - boxes[:, 0] >= 1e-2) & (boxes[:, 3] - boxes[:, 1] >= 1e-2)
        return boxes[big], probs[roi, cls][big], cls[big]


def graph_nms(boxes: Tensor, scores: Tensor, labels: Tensor, num_classes: int, iou_threshold: Tensor, max_detections,
              class_agnostic: bool = False) -> tuple:
    """The end of the post-processing for one image: NMS within each class (`nms_by_class`, ONNX
    NonMaxSuppression; across classes with class_agnostic), then the best max_detections.

    boxes (C, 4) xyxy, scores (C,) >= 0, labels (C,) in 0..num_classes-1, iou_threshold () (IoU > it
    suppresses), max_detections an int or () int64 -> boxes (D, 4), scores (D,), labels (D,) by
    decreasing score; equal scores by class, then by candidate index.
    """
    if class_agnostic:
        by_class = scores[None, None, :]  # (1, 1, C)
    else:  # (1, K, C): each candidate's score in its class's row, -1 (below NMS's -0.5 threshold) elsewhere
        rows = torch.arange(num_classes, device=labels.device)[:, None] == labels[None, :]
        by_class = torch.where(rows, scores[None, :], torch.full_like(scores, -1.0)[None, :])[None]
    selected = _GraphNMS.apply(boxes[None], by_class, iou_threshold)  # (S, 3) [0, class, candidate]
    kept = selected[:, 2]
    top, order = _best(scores[kept], max_detections)
    kept = kept[order]
    return boxes[kept], top, labels[kept]


def export_end_to_end(model, config: Config, categories: list, path: str, *, opset: int = END_TO_END_OPSET) -> None:
    """Write `model` as one ONNX graph from a (H, W, 3) uint8 RGB image to its detections (see `EndToEndGraph`),
    atomically, with the config and categories as metadata; the thresholds are inputs with the model's
    values as defaults. Exported with the torchscript tracer (torch.export does not trace the
    data-dependent sizes of the candidates and NMS)."""
    import onnx
    from onnx import numpy_helper

    graph = EndToEndGraph(model.cpu().eval(), categories).eval()
    d = config.model.size_divisibility
    # H != W, neither a multiple of d nor at the model's size, so that nothing specializes
    image = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (5 * d + 3, 7 * d + 5, 3), dtype=np.uint8))
    defaults = graph.defaults()
    sample = (image, *defaults.values())
    register_torchscript_symbolics(opset)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.") as tmp:
        raw = os.path.join(tmp, "raw.onnx")
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the tracer's warnings about Python values in the trace
            torch.onnx.export(graph, sample, raw, dynamo=False, input_names=list(END_TO_END_INPUTS),
                              output_names=list(END_TO_END_OUTPUTS), opset_version=opset,
                              dynamic_axes={"image": {0: "height", 1: "width"}, "boxes": {0: "detections"},
                                            "scores": {0: "detections"}, "labels": {0: "detections"}})
        proto = onnx.load(raw)
        # the thresholds: graph inputs with an initializer of the same name, i.e. optional, with a default
        present = {i.name for i in proto.graph.initializer}
        for name, value in defaults.items():
            if name not in present:
                proto.graph.initializer.append(numpy_helper.from_array(value.numpy(), name))
        meta = {"retinanet.config": json.dumps(config_to_dict(config)),
                "retinanet.categories": json.dumps(list(categories)),
                "retinanet.format": END_TO_END_FORMAT,
                "retinanet.end_to_end": json.dumps({"opset": opset, **{k: v.item() for k, v in defaults.items()}})}
        save_with_metadata(proto, meta, tmp, path)
