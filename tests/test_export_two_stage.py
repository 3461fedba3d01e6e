"""ONNX export of the two-stage network: the custom operators (NMS per class, RoIAlign, RoI pooling) as
ONNX NonMaxSuppression / RoiAlign / MaxRoiPool equal ours, and the exported Faster R-CNN, run by
onnxruntime with the model's own post-processing, gives PyTorch's detections at any image size."""

import warnings

import numpy as np
import pytest
import torch

from retinanet.checkpoint import make_checkpoint, save_atomic
from retinanet.cli import main
from retinanet.export import OnnxDetector, register_torchscript_symbolics
from retinanet.modeling import build_model
from retinanet.ops.nms import nms_by_class
from retinanet.ops.roi_align import roi_align, roi_pool
from retinanet.predict import Predictor

from conftest import tiny_config
from detection_match import assert_same_detections

ort = pytest.importorskip("onnxruntime")

CATEGORIES = [{"id": 1, "name": "cat"}, {"id": 5, "name": "dog"}, {"id": 9, "name": "bird"}]


def _onnx_run(module, inputs: tuple, names: list, tmp_path, dynamic: dict):
    """Export `module` with the torchscript exporter (fast; the dynamo exporter is covered below) and run it."""
    register_torchscript_symbolics()
    path = tmp_path / "op.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, inputs, str(path), dynamo=False, input_names=names, opset_version=17,
                          dynamic_axes=dynamic)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {n: t.numpy() for n, t in zip(names, inputs)})


def _random_rois(n: int, height: int, width: int, seed: int) -> torch.Tensor:
    """(n, 5) rois of every size on a 2-image batch: tiny, huge, thin, partly outside the image."""
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * torch.tensor([width * 1.1, height * 1.1]) - 10
    wh = torch.exp(torch.rand(n, 2, generator=g) * 6) - 0.5  # 0.5 .. 400 px
    image = torch.randint(0, 2, (n, 1), generator=g).float()
    return torch.cat([image, xy, xy + wh], dim=1)


class _Align(torch.nn.Module):
    def __init__(self, scale, sampling_ratio, aligned):
        super().__init__()
        self.args = (scale, sampling_ratio, aligned)

    def forward(self, features, rois):
        scale, sampling_ratio, aligned = self.args
        return roi_align(features, rois, (7, 5), scale, sampling_ratio, aligned)


class _Pool(torch.nn.Module):
    def forward(self, features, rois):
        return roi_pool(features, rois, (7, 5), 0.25)


@pytest.mark.parametrize("sampling_ratio,aligned", [(2, False), (2, True), (0, False), (-1, True)])
def test_roi_align_in_onnx_equals_ours(sampling_ratio, aligned, tmp_path):
    torch.manual_seed(0)
    features, rois = torch.randn(2, 8, 40, 56), _random_rois(300, 160, 224, seed=1)
    module = _Align(0.25, sampling_ratio, aligned)
    with torch.no_grad():
        ours = module(features, rois)
    (theirs,) = _onnx_run(module, (features, rois), ["features", "rois"], tmp_path, {"rois": {0: "r"}})
    assert theirs.shape == (300, 8, 7, 5)
    # onnxruntime's RoiAlign kernel sums in another order: float rounding only
    assert np.abs(theirs - ours.numpy()).max() < 1e-5


def test_roi_pool_in_onnx_equals_ours(tmp_path):
    torch.manual_seed(0)
    features, rois = torch.randn(2, 8, 40, 56), _random_rois(300, 160, 224, seed=2)
    with torch.no_grad():
        ours = _Pool()(features, rois)
    (theirs,) = _onnx_run(_Pool(), (features, rois), ["features", "rois"], tmp_path, {"rois": {0: "r"}})
    assert np.array_equal(theirs, ours.numpy())  # a max: no rounding


def test_nms_by_class_by_hand():
    # image 0: class 0 has a0 (0.9) over a1 (0.8, IoU 0.9 > 0.5: suppressed) and a2 (0.7, apart);
    # class 1 scores a1 alone above the threshold; a score of exactly the threshold does not count.
    boxes = torch.tensor([[[0.0, 0, 10, 10], [0, 0, 10, 9], [20, 20, 30, 30]]])
    scores = torch.tensor([[[0.9, 0.8, 0.7], [0.1, 0.6, 0.2]]])
    assert nms_by_class(boxes, scores, 0.5, 0.2).tolist() == [[0, 0, 0], [0, 0, 2], [0, 1, 1]]
    assert nms_by_class(boxes, scores, 0.95, 0.0).tolist() == [[0, 0, 0], [0, 0, 1], [0, 0, 2], [0, 1, 1],
                                                               [0, 1, 2], [0, 1, 0]]


class _NMS(torch.nn.Module):
    def forward(self, boxes, scores):
        return nms_by_class(boxes, scores, 0.5, 0.05)


def test_nms_by_class_in_onnx_equals_ours(tmp_path):
    torch.manual_seed(0)
    xy = torch.rand(2, 400, 2) * 200
    boxes = torch.cat([xy, xy + torch.rand(2, 400, 2) * 60 + 1], dim=-1)
    scores = torch.rand(2, 3, 400)  # distinct scores: no ties to break
    ours = _NMS()(boxes, scores)
    (theirs,) = _onnx_run(_NMS(), (boxes, scores), ["boxes", "scores"], tmp_path,
                          {"boxes": {0: "b", 1: "n"}, "scores": {0: "b", 2: "n"}})
    assert len(ours) > 300
    assert np.array_equal(theirs, ours.numpy())  # the same rows in the same order (image, class, score)


def _two_stage_config():
    # torchvision's anchor convention (the converter's): the stride of a level is image // feature size,
    # which for P6 differs from 64 when the padded size is an odd multiple of 32 (160 // 3 = 53)
    return tiny_config(num_classes=3, arch="faster_rcnn", min_level=2, max_level=6, p6_from="pool",
                       anchor_sizes=[8.0, 16.0, 32.0, 64.0, 128.0], anchor_scales=[1.0], anchor_offset=0.0,
                       anchor_style="torchvision", roi_head_dim=32, rpn_pre_nms_top_n=[200, 100],
                       rpn_post_nms_top_n=[100, 50])


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny Faster R-CNN exported by `retinanet export` with the default (dynamo) exporter."""
    torch.manual_seed(0)
    tmp = tmp_path_factory.mktemp("export_two_stage")
    cfg = _two_stage_config()
    model = build_model(cfg).eval()
    with torch.no_grad():  # spread a random model's scores so that detections are many and distinct
        model.rpn.head.cls_logits.weight.normal_(std=1.0)
        model.roi_heads.box_predictor.cls_score.weight.normal_(std=1.0)
        model.roi_heads.box_predictor.bbox_pred.weight.normal_(std=0.1)
    ckpt = tmp / "model.pt"
    save_atomic(make_checkpoint(model, cfg, CATEGORIES), str(ckpt))
    path = tmp / "model.onnx"
    assert main(["export", "--checkpoint", str(ckpt), "--output", str(path), "--no-verify"]) == 0
    return model, path, ckpt


def _same_detections(a, b) -> float:
    """The same detections (> 20), scores within 1e-5, near-equal scores in either order; -> the largest box
    difference in pixels (at most 1e-3)."""
    assert len(a) > 20
    return assert_same_detections(b, a, score_atol=1e-5, box_atol=1e-3).max_box_diff


@pytest.mark.parametrize("size", [(100, 150), (128, 160), (96, 224)])
def test_exported_faster_rcnn_equals_pytorch(exported, size):
    model, path, _ = exported
    image = np.random.default_rng(size[0]).integers(0, 256, (*size, 3), dtype=np.uint8)
    ours = Predictor(model, CATEGORIES, device="cpu", score_threshold=0.0)
    theirs = OnnxDetector(str(path), score_threshold=0.0)
    assert _same_detections(ours(image), theirs(image)) < 1e-3
    batch = model.preprocess([torch.from_numpy(image).permute(2, 0, 1)])
    with torch.no_grad():
        a = model.run_network(batch)
    b = theirs.network(batch)
    assert torch.equal(a[3], b[3]) and a[2].shape == b[2].shape == (50, 4)  # the same proposals of image 0
    assert (a[2] - b[2]).abs().max() < 1e-3


def test_exported_faster_rcnn_batch_of_different_sizes(exported):
    model, path, _ = exported
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (90, 120, 3), dtype=np.uint8), rng.integers(0, 256, (130, 60, 3), dtype=np.uint8)]
    ours = Predictor(model, CATEGORIES, device="cpu", batch_size=2, score_threshold=0.0)(images)
    theirs = OnnxDetector(str(path), batch_size=2, score_threshold=0.0)(images)
    for a, b in zip(ours, theirs):
        assert _same_detections(a, b) < 1e-3


def test_torchscript_exporter_and_the_cli_check(exported, tmp_path, capsys):
    model, _, ckpt = exported
    path = tmp_path / "ts.onnx"
    assert main(["export", "--checkpoint", str(ckpt), "--output", str(path), "--exporter", "torchscript"]) == 0
    assert "labels identical" in capsys.readouterr().err
    image = np.random.default_rng(2).integers(0, 256, (120, 110, 3), dtype=np.uint8)
    ours = Predictor(model, CATEGORIES, device="cpu", score_threshold=0.0)(image)
    assert _same_detections(ours, OnnxDetector(str(path), score_threshold=0.0)(image)) < 1e-3
