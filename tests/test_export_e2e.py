"""End-to-end ONNX export (`retinanet export --end-to-end`): one graph from a uint8 RGB image to boxes,
scores and category ids gives `Predictor`'s detections at any image size (one that needs no resize, an
extreme aspect ratio) for RetinaNet's sigmoid and softmax heads and Faster R-CNN; its NMS equals the
package's on hand-made boxes with tied scores; tools/onnx_detect.py gives the same detections in a process
where neither this package nor PyTorch can be imported."""

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from retinanet.checkpoint import make_checkpoint, save_atomic
from retinanet.cli import main
from retinanet.export import END_TO_END_OPSET, EndToEndGraph, OnnxDetector, graph_nms, register_torchscript_symbolics
from retinanet.modeling import build_model
from retinanet.ops.nms import batched_nms
from retinanet.ops.transform import resized_size, resized_size_tensor
from retinanet.predict import Predictor

from conftest import tiny_config, tiny_deepmask_config
from detection_match import assert_same_detections

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

CATEGORIES = [{"id": 1, "name": "cat"}, {"id": 5, "name": "dog"}, {"id": 9, "name": "bird"}]
TOOL = Path(__file__).resolve().parents[1] / "tools" / "onnx_detect.py"
# tiny_config: min_size 128, max_size 192. (128, 160) needs no resize; (40, 400) is capped by max_size.
SIZES = [(128, 160), (100, 150), (40, 400), (257, 33)]


def _config(arch: str):
    if arch == "faster_rcnn":
        return tiny_config(num_classes=3, arch="faster_rcnn", min_level=2, max_level=6, p6_from="pool",
                           anchor_sizes=[8.0, 16.0, 32.0, 64.0, 128.0], anchor_scales=[1.0], anchor_offset=0.0,
                           anchor_style="torchvision", roi_head_dim=32, rpn_pre_nms_top_n=[200, 100],
                           rpn_post_nms_top_n=[100, 50])
    cfg = tiny_config(num_classes=3)
    if arch == "softmax":
        cfg.loss.cls = "softmax_focal"  # a K + 1 softmax classifier
    return cfg


def _spread_scores(model) -> None:
    """A random model's scores spread out, so that detections are many and distinct."""
    with torch.no_grad():
        if hasattr(model, "roi_heads"):
            model.rpn.head.cls_logits.weight.normal_(std=1.0)
            model.roi_heads.box_predictor.cls_score.weight.normal_(std=1.0)
            model.roi_heads.box_predictor.bbox_pred.weight.normal_(std=0.1)
        else:
            model.head.cls_subnet.predictor.weight.normal_(std=1.0)
            model.head.cls_subnet.predictor.bias.normal_(-4.0, 0.5)


@pytest.fixture(scope="module", params=["sigmoid", "softmax", "faster_rcnn"])
def exported(request, tmp_path_factory):
    """(arch, model, checkpoint, .onnx) for each detector, exported once by `retinanet export --end-to-end`
    (which checks the file against Predictor on a random image and exits 1 if they differ)."""
    arch = request.param
    torch.manual_seed(0)
    tmp = tmp_path_factory.mktemp(f"e2e_{arch}")
    cfg = _config(arch)
    model = build_model(cfg).eval()
    assert arch == "faster_rcnn" or model.head.classifier == arch
    _spread_scores(model)
    ckpt = tmp / "model.pt"
    save_atomic(make_checkpoint(model, cfg, CATEGORIES), str(ckpt))
    path = tmp / "model.onnx"
    assert main(["export", "--checkpoint", str(ckpt), "--output", str(path), "--end-to-end"]) == 0
    return arch, model, ckpt, path


def _session(path):
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _as_detections(boxes, scores, ids) -> dict:
    return {"boxes": np.asarray(boxes), "scores": np.asarray(scores), "labels": np.asarray(ids)}


def _expected(det) -> dict:
    """A `Predictor` result with the dataset's category ids as labels (what the graph outputs)."""
    return _as_detections(det.boxes, det.scores, det.category_ids)


def _image(size, seed: int = 0) -> np.ndarray:
    return np.random.default_rng([seed, *size]).integers(0, 256, (*size, 3), dtype=np.uint8)


def test_resized_size_tensor_is_the_resize_rule():
    # by hand: 375 x 500 at 800 / 1333 -> scale 800 / 375 = 2.1333..: 500 * 2.1333.. = 1066.67
    assert resized_size_tensor(torch.tensor([375, 500]), 800, 1333, "floor").tolist() == [800, 1066]
    assert resized_size_tensor(torch.tensor([375, 500]), 800, 1333, "round").tolist() == [800, 1067]
    # 1 x 3000 -> the shorter side would round to 0: at least 1 px
    assert resized_size_tensor(torch.tensor([1, 3000]), 800, 1333).tolist() == [1, 1333]
    # 6 x 5 at 3 / 1000 -> scale 3 / 5: 3.6 x 3 -> 4 x 3; 100 x 96 at 800 (floor): 96 * (800 / 96) is 800 in float64
    assert resized_size_tensor(torch.tensor([6, 5]), 3, 1000).tolist() == [4, 3]
    assert resized_size_tensor(torch.tensor([100, 96]), 800, 1333, "floor").tolist() == [833, 800]
    for rounding in ("round", "floor"):
        for h, w in [(h, w) for h in (1, 7, 33, 100, 128, 480, 641, 1999) for w in (1, 5, 96, 160, 333, 640, 4000)]:
            for lo, hi in ((128, 192), (800, 1333), (512, 512)):
                assert tuple(resized_size_tensor(torch.tensor([h, w]), lo, hi, rounding).tolist()) == \
                    resized_size(h, w, lo, hi, rounding), (h, w, lo, hi, rounding)


class _ResizedSize(torch.nn.Module):
    def __init__(self, min_size: int, max_size: int, rounding: str):
        super().__init__()
        self.rule = (min_size, max_size, rounding)

    def forward(self, image):
        return resized_size_tensor(torch._shape_as_tensor(image)[:2], *self.rule)


@pytest.mark.parametrize("rule", [(800, 1333, "floor"), (128, 192, "round")])
def test_resize_rule_in_the_graph(rule, tmp_path):
    """The resize rule as onnxruntime computes it, on a grid of image sizes: float64 throughout (the
    torchscript exporter computes 0-d tensors in float32, where 192 x (800 / 192) floors to 799)."""
    path = tmp_path / "size.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_ResizedSize(*rule), (torch.zeros(37, 53, 3, dtype=torch.uint8),), str(path), dynamo=False,
                          input_names=["image"], opset_version=17, dynamic_axes={"image": {0: "h", 1: "w"}})
    session = _session(path)

    def size(h, w):
        return tuple(session.run(None, {"image": np.zeros((h, w, 3), np.uint8)})[0].tolist())

    if rule[0] == 800:
        assert size(192, 192) == (800, 800) and size(375, 500) == (800, 1066)  # by hand, as above
    for h in (1, 5, 33, 96, 100, 128, 192, 257, 480):
        for w in (1, 7, 40, 96, 150, 192, 333, 400, 641, 4000):
            assert size(h, w) == resized_size(h, w, *rule), (h, w)


@pytest.mark.parametrize("size", SIZES)
def test_end_to_end_file_equals_predictor(exported, size):
    arch, model, _, path = exported
    assert (resized_size(*size, model.min_size, model.max_size) == size) == (size == (128, 160))  # no resize there
    image = _image(size)
    expected = Predictor(model, CATEGORIES, device="cpu")(image)
    assert len(expected) > 0
    boxes, scores, ids = _session(path).run(None, {"image": image})
    assert boxes.dtype == np.float32 and scores.dtype == np.float32 and ids.dtype == np.int64
    assert boxes.shape == (len(scores), 4) and set(ids.tolist()) <= {1, 5, 9}
    assert_same_detections(_as_detections(boxes, scores, ids), _expected(expected), score_atol=1e-4, box_atol=1e-2,
                           what=f"{arch} {size}")


def test_the_graph_module_in_pytorch_equals_predictor(exported):
    """The module that is exported, run by PyTorch: the same detections as the model's own path."""
    arch, model, _, _ = exported
    graph = EndToEndGraph(model, CATEGORIES).eval()
    for size in SIZES[:2]:
        image = _image(size, seed=1)
        with torch.no_grad():
            out = [t.numpy() for t in graph(torch.from_numpy(image))]
        assert_same_detections(_as_detections(*out), _expected(Predictor(model, CATEGORIES, device="cpu")(image)),
                               score_atol=1e-5, box_atol=1e-3, what=f"{arch} {size}")


def test_thresholds_are_inputs_with_the_models_defaults(exported):
    arch, model, _, path = exported
    session = _session(path)
    assert [i.name for i in session.get_inputs()] == ["image"]  # the others have defaults
    assert sorted(i.name for i in session.get_overridable_initializers()) == \
        ["iou_threshold", "max_detections", "score_threshold"]
    image = _image((100, 150), seed=2)
    default = Predictor(model, CATEGORIES, device="cpu")(image)
    threshold = float(np.median(default.scores))  # half of the default detections pass it
    feed = {"image": image, "score_threshold": np.array(threshold, np.float32),
            "iou_threshold": np.array(0.3, np.float32), "max_detections": np.array(7, np.int64)}
    boxes, scores, ids = session.run(None, feed)
    expected = Predictor(model, CATEGORIES, device="cpu", score_threshold=threshold, nms_threshold=0.3,
                         max_detections=7)(image)
    assert 0 < len(expected) <= 7 < len(default) and scores.min() > threshold
    assert_same_detections(_as_detections(boxes, scores, ids), _expected(expected), score_atol=1e-4, box_atol=1e-2)


def test_checker_opset_and_metadata(exported):
    arch, model, _, path = exported
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    assert {o.domain: o.version for o in proto.opset_import}[""] == END_TO_END_OPSET == 17
    image = proto.graph.input[0]
    assert image.name == "image" and image.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert [d.dim_param or d.dim_value for d in image.type.tensor_type.shape.dim] == ["height", "width", 3]
    assert [o.name for o in proto.graph.output] == ["boxes", "scores", "labels"]
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta["retinanet.categories"]) == CATEGORIES
    stored_arch = json.loads(meta["retinanet.config"])["model"]["arch"]
    assert stored_arch == ("faster_rcnn" if arch == "faster_rcnn" else "retinanet")
    assert json.loads(meta["retinanet.end_to_end"]) == {
        "opset": 17, "score_threshold": pytest.approx(model.score_thresh),
        "iou_threshold": pytest.approx(model.nms_thresh),
        "max_detections": model.detections_per_image}
    if arch == "sigmoid":
        assert sum(n.op_type == "NonMaxSuppression" for n in proto.graph.node) == 1
        with pytest.raises(ValueError, match="end-to-end export"):
            OnnxDetector(str(path))


class _NMSGraph(torch.nn.Module):
    def __init__(self, class_agnostic: bool = False):
        super().__init__()
        self.class_agnostic = class_agnostic

    def forward(self, boxes, scores, labels, iou_threshold, max_detections):
        return graph_nms(boxes, scores, labels, 3, iou_threshold, max_detections, class_agnostic=self.class_agnostic)


@pytest.mark.parametrize("class_agnostic", [False, True])
def test_in_graph_nms_equals_the_packages_on_ties(class_agnostic, tmp_path):
    """Hand-made candidates of three classes with exactly equal scores, through the exported NMS and the
    package's (`batched_nms` per class, or across classes, then the best max_detections)."""
    boxes = torch.tensor([[0, 0, 10, 10],  # 0: class 0, 0.9
                          [1, 0, 11, 10],  # 1: class 0, 0.9, the same score as 0: IoU 90/110 = 0.82, 0 (first) wins
                          [20, 20, 30, 30],  # 2: class 0, 0.8, alone
                          [0, 0, 10, 10],  # 3: class 1, 0.9: box 0's box, another class, kept
                          [0, 0, 10, 9],  # 4: class 1, 0.7: IoU 90/100 with 3, suppressed
                          [50, 50, 60, 60],  # 5: class 2, 0.9
                          [52, 50, 62, 60]], dtype=torch.float32)  # 6: class 2, 0.5: IoU 80/120 = 0.67 with 5
    scores = torch.tensor([0.9, 0.9, 0.8, 0.9, 0.7, 0.9, 0.5])
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2])
    register_torchscript_symbolics()
    path = tmp_path / "nms.onnx"
    names = ["boxes", "scores", "labels", "iou_threshold", "max_detections"]
    sample = (boxes, scores, labels, torch.tensor(0.5), torch.tensor(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_NMSGraph(class_agnostic), sample, str(path), dynamo=False, input_names=names,
                          output_names=["kept_boxes", "kept_scores", "kept_labels"], opset_version=17,
                          dynamic_axes={"boxes": {0: "c"}, "scores": {0: "c"}, "labels": {0: "c"}})
    session = _session(path)
    # (IoU threshold, max detections) -> the kept candidates, by hand
    cases = {(0.5, 3): [0, 3, 5],  # 0, 2, 3, 5 survive; the three 0.9s are the best 3
             (0.5, 10): [0, 2, 3, 5],
             (0.7, 10): [0, 2, 3, 5, 6],  # 6 survives 5 (0.67 <= 0.7)
             (0.85, 10): [0, 1, 2, 3, 5, 6]}  # 1 survives 0 (0.82), 4 not 3 (0.9)
    if class_agnostic:  # 0 (first of the four 0.9s) suppresses 1 and 3 (its own box), and 4; 5 suppresses 6
        cases = {(0.5, 10): [0, 2, 5], (0.5, 2): [0, 5], (0.85, 10): [0, 1, 2, 5, 6]}
    groups = torch.zeros_like(labels) if class_agnostic else labels
    for (iou, k), kept in cases.items():
        ours = batched_nms(boxes, scores, groups, iou)[:k]
        assert sorted(ours.tolist()) == kept, (iou, k)
        out = session.run(None, {"boxes": boxes.numpy(), "scores": scores.numpy(), "labels": labels.numpy(),
                                 "iou_threshold": np.array(iou, np.float32), "max_detections": np.array(k)})
        expected = _as_detections(boxes[kept].numpy(), scores[kept].numpy(), labels[kept].numpy())
        assert_same_detections(_as_detections(*out), expected, score_atol=0, box_atol=0, what=f"iou {iou}, {k}")
        with torch.no_grad():  # the same function in PyTorch
            eager = graph_nms(boxes, scores, labels, 3, torch.tensor(iou), k, class_agnostic=class_agnostic)
        assert_same_detections(_as_detections(*[t.numpy() for t in eager]), expected, score_atol=0, box_atol=0)


# Runs tools/onnx_detect.py with `retinanet` and `torch` made unimportable (sys.modules[name] = None
# makes `import name` raise ImportError); -I: no PYTHONPATH, no user site, not the current directory.
_WITHOUT_PACKAGE = """
import runpy, sys
sys.modules["retinanet"] = sys.modules["torch"] = None
for name in ("retinanet", "torch"):
    try:
        __import__(name)
    except ImportError:
        pass
    else:
        raise SystemExit(name + " is importable")
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_tool_without_the_package_gives_predictors_detections(exported, tmp_path):
    arch, model, _, path = exported
    files = []
    for i, size in enumerate([(128, 160), (40, 400), (90, 131)]):
        files.append(tmp_path / f"img{i}.png")
        Image.fromarray(_image(size, seed=3)).save(files[-1])
    out = tmp_path / "detections.json"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run([sys.executable, "-I", "-c", _WITHOUT_PACKAGE, str(TOOL), str(path), *map(str, files),
                          "--output", str(out), "--threads", "1"], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    results = json.loads(out.read_text())
    predictor = Predictor(model, CATEGORIES, device="cpu")
    assert [r["file"] for r in results] == list(map(str, files))
    for r, file in zip(results, files):
        expected = predictor(str(file))
        assert (r["height"], r["width"]) == expected.image_size and len(expected) > 0
        dets = r["detections"]
        assert [d["name"] for d in dets] == [{1: "cat", 5: "dog", 9: "bird"}[d["category_id"]] for d in dets]
        assert_same_detections(_as_detections([d["box"] for d in dets], [d["score"] for d in dets],
                                              [d["category_id"] for d in dets]), _expected(expected),
                               score_atol=1e-4, box_atol=1e-2, what=str(file))
    # an existing --output is not overwritten
    again = subprocess.run([sys.executable, "-I", str(TOOL), str(path), str(files[0]), "--output", str(out)],
                           env=env, capture_output=True, text=True)
    assert again.returncode == 2 and "exists" in again.stderr and json.loads(out.read_text()) == results


def test_end_to_end_refused_where_it_does_not_apply(tmp_path, capsys):
    cfg = tiny_deepmask_config()
    ckpt = tmp_path / "deepmask.pt"
    save_atomic(make_checkpoint(build_model(cfg), cfg, [{"id": 1, "name": "object"}]), str(ckpt))
    out = tmp_path / "x.onnx"
    assert main(["export", "--checkpoint", str(ckpt), "--output", str(out), "--end-to-end"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "covers RetinaNet and Faster R-CNN" in err[0] and "without --end-to-end" in err[0]
    assert main(["export", "--checkpoint", str(ckpt), "--output", str(out), "--end-to-end",
                 "--exporter", "dynamo"]) == 1
    assert "torchscript exporter only" in capsys.readouterr().err
    assert not out.exists()
